"""Data-plane throughput and memory, measured side by side in one run (``jobs/benchmark.py data``).

Three comparisons, each a ratio of figures taken in the same run on the same images:

1. **segray vs PyTorch.** images/s of the segray pipeline (shards on S3 or a local folder → Ray
   Data decode + random scale/crop → uint8 batches through ``iter_torch_batches`` with
   ``train_collate``) against a ``torch.utils.data.DataLoader`` whose worker processes do PIL
   decode and the same random scale/crop over the same images, written as files to local disk.
   Both are timed in steady state (the middle half of the images) over the same epochs; rounds
   alternate between them (and the decode loops) to cancel drift, and each side's best round is
   reported (other load on the machine only ever slows a round down). Goal: ≥ 1.0×.
2. **Share of the decode limit.** A tight decode loop (image + mask, with the pipeline's own
   decoders, the fastest here) over the same bytes, in one process and in as many processes as
   the DataLoader has workers (timed in each round, between the two pipelines); the
   pipeline's best images/s over the best multi-process figure.
   Goal: ≥ 80 %. The same loop with the pipeline's random rescale + crop of each row is timed
   too, and a Ray Data stream doing only that per-row work on bytes in the object store (the
   most any Ray Data pipeline reaches here): the first shows what the per-row work costs, the
   second what Ray costs, the rest is segray's (storage, Parquet, checks, seeding).
3. **Streaming memory.** Peak memory of the whole process tree (driver, Raylet, Ray workers)
   while streaming a dataset ``rss_factor`` times larger vs 1×, each size in a fresh
   subprocess. Goal: ≤ 1.2×.

Without ``data``, the images are synthetic scenes encoded as JPEG; their shards go to an
S3-compatible server on 127.0.0.1 started for the run (moto, a test dependency), or to a local
folder with ``local=True``.

Example:
    >>> res = bench_data(DataBenchConfig(images=64, size=96, crop=64), local=True)  # doctest: +SKIP
    >>> res["ratio_vs_dataloader"], res["share_of_decode_limit"], res["rss"]["ratio"]
"""

from __future__ import annotations

import bisect
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segray import storage
from segray.data.baselines import DecodeLimit, FolderCrops, ray_data_ceiling
from segray.data.memprobe import stream_memory

GOALS = {"ratio_vs_dataloader": 1.0, "share_of_decode_limit": 0.8, "rss_ratio": 1.2}
# moto rejects pyarrow's multipart uploads (any object past 10 MiB); shards stay below that.
_MAX_SHARD_BYTES = 8 * 2**20


@dataclass
class DataBenchConfig:
    """Sizes of the data benchmark (defaults finish in a few minutes on 2 cores).

    Attributes:
        images: images in the 1× dataset.
        size: side of the synthetic images in pixels.
        crop: side of the training crop.
        batch_size: images per batch.
        epochs: epochs per timed round.
        rounds: timed rounds per pipeline (alternating); the best is reported.
        workers: DataLoader workers and decode-limit processes.
        scale_range: random rescale ratios (both pipelines).
        rss_factor: size of the large dataset of the memory test, in multiples of ``images``.
        quality: JPEG quality of the synthetic images.
        image_format: ``"jpeg"`` or ``"png"`` (lossless, as Cityscapes ships: far slower to
            decode, so decoding takes a larger share of each row's work).
        seed: seed of the synthetic scenes.
    """

    images: int = 512
    size: int = 256
    crop: int = 128
    batch_size: int = 32
    epochs: int = 20
    rounds: int = 3
    workers: int = 2
    scale_range: tuple[float, float] = (0.5, 2.0)
    rss_factor: int = 10
    quality: int = 90
    image_format: str = "jpeg"
    seed: int = 0


def bench_data(cfg: DataBenchConfig, *, data: str | None = None, local: bool = False,
               rss: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the three comparisons and return their figures, ratios and goals.

    Args:
        cfg: sizes.
        data: an existing dataset whose labelled ``train`` split is streamed as it is (the
            baseline, decode limit and memory test use copies of all its rows, held in memory:
            use a sample of a large dataset); None writes ``cfg.images`` synthetic JPEGs.
        local: write the synthetic set to a local folder instead of a local S3 server.
        rss: also run the streaming-memory comparison (two fresh subprocesses).
        log: progress lines go here.

    Returns:
        A JSON-ready dict; the headline ratios are ``ratio_vs_dataloader``,
        ``share_of_decode_limit`` and ``rss["ratio"]``.
    """
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segray-bench-")))
        if data is not None:
            # The user's dataset is streamed as it is; the memory test uses local copies.
            uri_1x, rows, classes = _rows_of(data)
            base, where = str(work / "data"), "s3" if storage.is_s3(data) else "local"
        else:
            if not local:
                stack.enter_context(_local_s3_server())
            base = str(work / "data") if local else "s3://segray-bench/data"
            where = "local" if local else "s3 (moto on 127.0.0.1)"
            rows, classes = _synthetic_rows(cfg), None
            uri_1x = _write(storage.join(base, "1x"), rows, 1, classes)
        keys = _write_files(work / "files", rows)
        log(f"[bench] {len(rows)} images ({rows[0]['width']}x{rows[0]['height']} first) at "
            f"{uri_1x}; the same as files under {work / 'files'}")

        with DecodeLimit(work / "files", keys, processes=1) as limit:
            single = limit.rate()
        log(f"[bench] decode-only, 1 process: {single:.0f} img/s")
        rounds = _throughput(cfg, uri_1x, work / "files", keys, log)
        result: dict[str, Any] = {
            "config": asdict(cfg), "storage": where, "dataset": uri_1x, "images": len(rows),
            "segray_images_per_s": max(rounds["segray"]),
            "dataloader_images_per_s": max(rounds["dataloader"]),
            "decode_images_per_s_1proc": single,
            "decode_images_per_s_nproc": max(rounds["decode"]),
            "decode_crop_images_per_s_nproc": max(rounds["decode_crop"]),
            "ray_data_ceiling_images_per_s": max(rounds["ray_data_ceiling"]),
            "rounds": rounds, "goals": GOALS,
        }
        result["ratio_vs_dataloader"] = (result["segray_images_per_s"]
                                         / result["dataloader_images_per_s"])
        result["share_of_decode_limit"] = (result["segray_images_per_s"]
                                           / result["decode_images_per_s_nproc"])
        result["share_of_decode_crop_loop"] = (result["segray_images_per_s"]
                                               / result["decode_crop_images_per_s_nproc"])
        result["share_of_ray_data_ceiling"] = (result["segray_images_per_s"]
                                               / result["ray_data_ceiling_images_per_s"])
        if rss:
            small_uri = uri_1x if data is None else _write(storage.join(base, "1x"), rows, 1,
                                                             classes)
            large_uri = _write(storage.join(base, f"{cfg.rss_factor}x"), rows, cfg.rss_factor,
                               classes)
            small = stream_memory(small_uri, cfg.crop, cfg.batch_size)
            log(f"[bench] streaming 1x ({small['images']} images): peak {small['peak_rss_mb']:.0f}"
                f" MB")
            big = stream_memory(large_uri, cfg.crop, cfg.batch_size)
            log(f"[bench] streaming {cfg.rss_factor}x ({big['images']} images): peak "
                f"{big['peak_rss_mb']:.0f} MB")
            result["rss"] = {"1x": small, "large": big, "factor": cfg.rss_factor,
                             "ratio": big["peak_rss_mb"] / small["peak_rss_mb"],
                             "pss_ratio": (big["peak_pss_mb"] / small["peak_pss_mb"]
                                           if small["peak_pss_mb"] else None)}
        return result


# ----------------------------------------------------------------------------- datasets


def _synthetic_rows(cfg: DataBenchConfig) -> list[dict[str, Any]]:
    from segray.data.shards import encode_mask_png
    from segray.data.synthetic import render_scene

    if cfg.image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format must be 'jpeg' or 'png', got {cfg.image_format!r}")
    rng = np.random.default_rng(cfg.seed)
    # Rendering is slow (~30 ms a scene); 128 distinct scenes repeat under distinct keys, which
    # costs decoding exactly as much as distinct ones.
    scenes = []
    for _ in range(min(cfg.images, 128)):
        image, mask = render_scene(rng, cfg.size, cfg.size)
        buf = io.BytesIO()
        if cfg.image_format == "png":
            Image.fromarray(image).save(buf, format="PNG")
        else:
            Image.fromarray(image).save(buf, format="JPEG", quality=cfg.quality)
        scenes.append({"image": buf.getvalue(), "mask": encode_mask_png(mask),
                       "labels": np.unique(mask).tolist(), "height": cfg.size,
                       "width": cfg.size})
    return [dict(scenes[i % len(scenes)], key=f"img{i:06d}") for i in range(cfg.images)]


def _rows_of(uri: str) -> tuple[str, list[dict[str, Any]], list[str]]:
    from segray.data.manifest import open_dataset
    from segray.data.stream import iter_rows

    info = open_dataset(uri)
    rows = [r for r in iter_rows(info, "train") if r["mask"] is not None]
    if len(rows) != info.num_rows("train"):
        raise ValueError(f"dataset {uri}: the benchmark needs a fully labelled 'train' split")
    return info.uri, rows, info.classes


def _write(uri: str, rows: list[dict[str, Any]], factor: int,
           classes: list[str] | None) -> str:
    """Write ``rows`` repeated ``factor`` times (distinct keys) as a one-split dataset."""
    from segray.data.shards import DatasetWriter
    from segray.data.synthetic import CLASSES

    per_row = statistics.mean(len(r["image"]) + len(r["mask"]) for r in rows)
    rows_per_shard = int(max(1, min(256, _MAX_SHARD_BYTES // per_row)))
    with DatasetWriter(uri, "bench", classes or CLASSES, rows_per_shard=rows_per_shard) as w:
        for copy in range(factor):
            for r in rows:
                w.add("train", f"{r['key']}-{copy}", r["image"], r["mask"], r["labels"],
                      r["height"], r["width"])
    return storage.absolute(uri)


def _write_files(folder: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Write each row's image and mask as files (named by position: keys may hold '/')."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    names = [f"{i:06d}" for i in range(len(rows))]
    for name, r in zip(names, rows):
        (folder / "images" / name).write_bytes(r["image"])
        (folder / "masks" / name).write_bytes(r["mask"])
    return names


@contextmanager
def _local_s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 and point this process's AWS environment at it."""
    try:
        import moto.server  # noqa: F401
    except ImportError as e:
        raise ValueError("the S3 leg of the benchmark needs moto (pip install 'moto[server]'); "
                         "or pass --local, or --data s3://<your dataset>") from e
    script = ("import logging, sys\n"
              "logging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
              "from moto.server import ThreadedMotoServer\n"
              "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
              "s.start()\nprint(s.get_host_and_port()[1], flush=True)\nsys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    saved = dict(os.environ)
    try:
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError("the local S3 server (moto) did not start")
        os.environ.update({
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"})
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(
            Bucket="segray-bench")
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proc.stdin.close()  # the server exits at end of input
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------- throughput


def _throughput(cfg: DataBenchConfig, uri: str, folder: Path, keys: list[str],
                log: Callable[[str], None]) -> dict[str, list[float]]:
    """Alternating rounds of the segray stream, the DataLoader and the two tight loops.

    Returns:
        images/s per round: ``segray``, ``dataloader``, ``decode``, ``decode_crop`` and
        ``ray_data_ceiling``.
    """
    import ray
    import torch

    from segray.data.manifest import open_dataset
    from segray.data.stream import batch_rows, train_collate, train_dataset

    crop = (cfg.crop, cfg.crop)
    loader = torch.utils.data.DataLoader(
        FolderCrops(str(folder), keys, crop, cfg.scale_range, cfg.seed),
        batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        # spawn: this process runs Ray's threads, which a forked child must not inherit.
        multiprocessing_context="spawn" if cfg.workers > 0 else None)
    limit = DecodeLimit(folder, keys, processes=cfg.workers)
    limit_crop = DecodeLimit(folder, keys, processes=cfg.workers,
                             crop={"crop": crop, "scale_range": cfg.scale_range})
    ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False,
             log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        info = open_dataset(uri)
        stream = train_dataset(info, "train", crop=crop, scale_range=cfg.scale_range,
                               seed=cfg.seed, passes=cfg.epochs)  # batches sized as in training
        # Tasks of a shard's rows, as the stream's: a task's crops arrive as one block, and
        # fewer, larger blocks than the stream's would time lumps, not a rate.
        ceiling = ray_data_ceiling(folder, keys, crop=crop, scale_range=cfg.scale_range,
                                   batch_size=batch_rows(crop), epochs=cfg.epochs,
                                   rows_per_task=max(s.rows for s in info.splits["train"]))

        def epochs_of(ds: Any) -> Iterator[Any]:
            yield from ds.iter_torch_batches(batch_size=cfg.batch_size, device="cpu",
                                             collate_fn=train_collate, prefetch_batches=2)

        def torch_epochs() -> Iterator[Any]:
            for _ in range(cfg.epochs):
                for image, _mask in loader:
                    yield {"image": image}

        rounds: dict[str, list[float]] = {"segray": [], "dataloader": [], "decode": [],
                                          "decode_crop": [], "ray_data_ceiling": []}
        for i in range(cfg.rounds):
            rounds["segray"].append(_rate(epochs_of(stream)))
            rounds["dataloader"].append(_rate(torch_epochs()))
            rounds["decode"].append(limit.rate())
            rounds["decode_crop"].append(limit_crop.rate())
            rounds["ray_data_ceiling"].append(_rate(epochs_of(ceiling)))
            log(f"[bench] round {i + 1}/{cfg.rounds}, images/s: " + ", ".join(
                f"{name} {values[-1]:.0f}" for name, values in rounds.items()))
        return rounds
    finally:
        limit.close()
        limit_crop.close()
        ray.shutdown()


def _rate(batches: Iterator[Any]) -> float:
    """Steady-state images/s: batch arrivals between a quarter and three quarters of the images.

    A pipeline works ahead of its consumer (Ray Data's in-flight blocks, the DataLoader's
    prefetched batches): batches ready before the first arrives, or drained after the producers
    stop, would count images whose work was never timed. In the middle of the run the buffer is
    full and arrivals come at the production rate. With too few batches for a middle, the whole
    run from the start is timed.
    """
    start = time.perf_counter()
    times, counts, n = [], [], 0
    for batch in batches:
        n += len(batch["image"])
        times.append(time.perf_counter())
        counts.append(n)
    i = bisect.bisect_left(counts, n / 4)  # first arrival at or past a quarter
    j = bisect.bisect_right(counts, 3 * n / 4) - 1  # last arrival at or before three quarters
    if j <= i:
        return n / (times[-1] - start)
    return (counts[j] - counts[i]) / (times[j] - times[i])
