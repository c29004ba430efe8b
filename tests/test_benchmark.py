"""Smoke tests of ``jobs/benchmark.py``: both subcommands run with tiny settings, print their table
and write their JSON. Figures are not checked against goals (no timed assertions); the parts that
compute them are checked on inputs whose answer is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import job_env, run_job
from PIL import Image

from segray.data.baselines import DecodeLimit, FolderCrops, ray_data_ceiling
from segray.data.memprobe import process_tree_memory


def test_train_benchmark_smoke(tmp_path):
    out = tmp_path / "train.json"
    proc = run_job("benchmark.py", "train", "--method", "supervised", "--bench-steps", "2",
                   "--rounds", "1", "--batch-size", "2", "--set", "model.decoder_channels=16",
                   "--out", str(out), env=job_env(tmp_path), timeout=300)
    for row in ("platform images/s", "bare PyTorch images/s", "ratio (goal >= 0.95)"):
        assert row in proc.stdout
    res = json.loads(out.read_text())
    assert res["method"] == "supervised" and res["batch"] == 2 and res["rounds"] == 1
    assert res["platform_images_per_s"] > 0 and res["bare_images_per_s"] > 0
    assert res["ratio"] == pytest.approx(res["platform_images_per_s"] / res["bare_images_per_s"])


@pytest.mark.parametrize(("flags", "expected"), [
    (["--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    (["--bench-steps", "0"], "argument --bench-steps: expected an integer >= 1, got 0"),
    (["--set", "train.precision=fp16"], "'fp16' needs a CUDA device"),
])
def test_train_benchmark_usage_errors_exit_2(tmp_path, flags, expected):
    proc = run_job("benchmark.py", "train", *flags, env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2 and expected in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.parametrize(("flags", "expected"), [
    (["--images", "0", "--local"], "argument --images: expected an integer >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["--workers", "-1"], "argument --workers: expected an integer >= 1, got -1"),
    (["--data", "/nonexistent", "--no-rss"],
     "error: --data /nonexistent: no dataset manifest at /nonexistent/dataset.json"),
])
def test_data_benchmark_usage_errors_exit_2(tmp_path, flags, expected):
    proc = run_job("benchmark.py", "data", *flags, env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2 and expected in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_train_benchmark_on_cuda_without_a_gpu_is_a_usage_error(tmp_path):
    proc = run_job("benchmark.py", "train", "--device", "cuda", env=job_env(tmp_path),
                   check=False, timeout=120)
    assert proc.returncode == 2 and "--device cuda: no CUDA device" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout


def test_bench_train_refuses_empty_rounds():
    from segray.benchmark import bench_train
    from segray.config import Config

    for kwargs in ({"steps": 0}, {"rounds": 0}, {"warmup": -1}):
        with pytest.raises(ValueError, match="steps >= 1, rounds >= 1 and warmup >= 0"):
            bench_train(Config(method="supervised"), **kwargs)


@pytest.mark.cluster
@pytest.mark.s3
def test_data_benchmark_smoke(tmp_path):
    # The default storage: shards on a local S3 server the benchmark starts and stops itself.
    out = tmp_path / "data.json"
    proc = run_job("benchmark.py", "data", "--images", "24", "--size", "48", "--crop", "32",
                   "--batch-size", "8", "--epochs", "1", "--rounds", "1", "--rss-factor", "2",
                   "--out", str(out), env=job_env(tmp_path), timeout=600)
    for row in ("segray pipeline images/s", "DataLoader(2) + PIL images/s", "ratio (goal >= 1.0x)",
                "share of decode limit (goal >= 80%)", "RSS ratio 2x / 1x (goal <= 1.2x)"):
        assert row in proc.stdout
    res = json.loads(out.read_text())
    assert res["storage"] == "s3 (moto on 127.0.0.1)" and res["dataset"].startswith("s3://")
    assert res["images"] == 24 and res["rss"]["1x"]["images"] == 24
    assert res["rss"]["large"]["images"] == 48
    assert res["ratio_vs_dataloader"] == pytest.approx(
        res["segray_images_per_s"] / res["dataloader_images_per_s"])
    assert res["share_of_decode_limit"] == pytest.approx(
        res["segray_images_per_s"] / res["decode_images_per_s_nproc"])
    assert res["share_of_decode_crop_loop"] == pytest.approx(
        res["segray_images_per_s"] / res["decode_crop_images_per_s_nproc"])
    assert res["share_of_ray_data_ceiling"] == pytest.approx(
        res["segray_images_per_s"] / res["ray_data_ceiling_images_per_s"])
    assert {k: len(v) for k, v in res["rounds"].items()} == {
        "segray": 1, "dataloader": 1, "decode": 1, "decode_crop": 1, "ray_data_ceiling": 1}
    assert "share of the decode + rescale/crop loop" in proc.stdout
    assert "share of the Ray Data ceiling" in proc.stdout
    assert "pipeline / one decode process" in proc.stdout
    assert res["rss"]["ratio"] == pytest.approx(
        res["rss"]["large"]["peak_rss_mb"] / res["rss"]["1x"]["peak_rss_mb"])
    # A Ray instance, its workers and the driver hold far more than the idle interpreter.
    assert res["rss"]["1x"]["peak_rss_mb"] > 200
    assert res["rss"]["1x"]["peak_rss_mb"] >= res["rss"]["1x"]["idle_rss_mb"] > 0


def test_folder_crops_baseline(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 15:] = 4
    Image.fromarray(image).save(tmp_path / "images" / "a", format="PNG")
    Image.fromarray(mask).save(tmp_path / "masks" / "a", format="PNG")
    data = FolderCrops(str(tmp_path), ["a"], (40, 24), (1.0, 1.0), seed=0)
    img, msk = data[0]
    assert tuple(img.shape) == (3, 40, 24) and str(img.dtype) == "torch.uint8"
    assert tuple(msk.shape) == (40, 24) and str(msk.dtype) == "torch.int64"
    # Scale 1: rows 20..39 are padding (ignore), the window shows a slice of the original.
    assert (msk[20:] == 255).all() and set(msk[:20].unique().tolist()) <= {0, 4}
    x0 = next(x for x in range(7) if np.array_equal(img[:, :20].permute(1, 2, 0).numpy(),
                                                    image[:, x:x + 24]))
    assert np.array_equal(msk[:20].numpy(), mask[:, x0:x0 + 24])


def test_decode_limit(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "images" / "a", format="JPEG")
    Image.new("L", (32, 32)).save(tmp_path / "masks" / "a", format="PNG")
    for processes, crop in ((1, None), (2, None), (2, {"crop": (16, 16), "scale_range": (0.5, 2)})):
        with DecodeLimit(tmp_path, ["a"] * 40, processes=processes, crop=crop) as limit:
            start = time.perf_counter()
            rate = limit.rate(min_seconds=0.2)
            # A timed run lasts at least min_seconds: the loop repeats a 40-image set as needed.
            assert rate > 0 and time.perf_counter() - start >= 0.2
    (tmp_path / "images" / "b").write_bytes(b"not an image")
    (tmp_path / "masks" / "b").write_bytes((tmp_path / "masks" / "a").read_bytes())
    with DecodeLimit(tmp_path, ["a", "b"], processes=1) as limit, \
            pytest.raises(ValueError, match="cannot decode"):
        limit.rate(min_seconds=0.01)


@pytest.mark.cluster
def test_ray_data_ceiling_streams_every_row_once_per_epoch(tmp_path, monkeypatch):
    import ray

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    mask = np.zeros((24, 24), np.uint8)
    mask[:, 12:] = 4
    for name in "abcde":
        Image.new("RGB", (24, 24), (200, 20, 30)).save(tmp_path / "images" / name, format="JPEG")
        Image.fromarray(mask).save(tmp_path / "masks" / name, format="PNG")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray_data_ceiling(tmp_path, list("abcde"), crop=(16, 16), scale_range=(0.5, 2.0),
                              batch_size=2, epochs=3, rows_per_task=3)
        batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        ray.shutdown()
    assert sum(len(b["image"]) for b in batches) == 3 * 5  # every row, once per epoch
    for b in batches:
        assert b["image"].shape[1:] == (16, 16, 3) and b["image"].dtype == np.uint8
        assert set(np.unique(b["mask"]).tolist()) <= {0, 4, 255}
        assert b["labels"].shape == (len(b["image"]), 1)


def test_process_tree_memory_sums_children():
    # A child whose own child holds 80 MiB of written (resident) memory.
    grandchild = "import sys, time; x = b'\\x01' * (80 * 2**20); time.sleep(60)"
    child = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; "
         f"subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(60)"],
        start_new_session=True)
    try:
        deadline, rss = time.monotonic() + 30, 0
        while rss <= 80 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.2)
            rss, _ = process_tree_memory(child.pid)
        assert rss > 80 * 2**20  # the grandchild's buffer is counted
        assert process_tree_memory(os.getpid())[0] > rss  # this tree holds the child's
        assert process_tree_memory(2**22 + 12345) == (0, 0)  # no such process
    finally:
        os.killpg(child.pid, 9)  # the session started above: the child and its child
        child.wait()


def test_synthetic_images_in_either_format():
    """``--image-format png`` writes lossless PNG images (the decode-heavy case); JPEG stays the
    default; the masks are the same class-id PNGs either way."""
    from segray.data.benchmark import DataBenchConfig, _synthetic_rows
    from segray.data.decode import decode_image

    jpeg = _synthetic_rows(DataBenchConfig(images=3, size=24))
    png = _synthetic_rows(DataBenchConfig(images=3, size=24, image_format="png"))
    assert all(r["image"][:3] == b"\xff\xd8\xff" for r in jpeg)
    assert all(r["image"][:8] == b"\x89PNG\r\n\x1a\n" for r in png)
    assert [r["mask"] for r in jpeg] == [r["mask"] for r in png]
    assert decode_image(png[0]["image"]).shape == (24, 24, 3)
    with pytest.raises(ValueError, match="image_format must be 'jpeg' or 'png'"):
        _synthetic_rows(DataBenchConfig(images=1, size=8, image_format="webp"))
