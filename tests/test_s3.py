"""Object storage end to end against a real S3-compatible HTTP server (moto's server mode on
127.0.0.1): prepare a dataset to ``s3://``, train from it with checkpoints and report on S3,
evaluate from it, resume; a sweep with its folder on S3; integrity (changed shards, interrupted
writes) and no leaked credential.

The jobs run as subprocesses whose only route to the bucket is the standard AWS environment; the
Ray workers of the training job (decode tasks reading shards, the Train worker writing the run
folder) inherit it from the driver, which the successful run on S3 demonstrates.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import job_env, run_job
from s3server import start_s3_server

from segray import storage
from segray.data.manifest import open_dataset, verify_shards
from segray.data.shards import DatasetWriter
from segray.data.stream import iter_rows

pytestmark = pytest.mark.s3

TRAIN = ["--method", "supervised", "--data", "s3://bucket/synth", "--storage", "s3://bucket/runs",
         "--name", "s3run", "--steps", "6", "--eval-every", "3",
         "--set", "model.decoder_channels=16"]


@pytest.fixture(scope="module")
def s3():
    with start_s3_server(bucket="bucket") as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The AWS environment of the test process itself (for in-process reads and writes)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.env


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory):
    """``s3://bucket/synth``, written by the prepare_data job."""
    env = job_env(tmp_path_factory.mktemp("prep"), **s3.env)
    proc = run_job("prepare_data.py", "synthetic", "s3://bucket/synth", "--train", "32", "--val",
                   "8", "--unlabeled", "8", "--size", "48", "--rows-per-shard", "16", env=env,
                   timeout=120)
    assert "manifest: s3://bucket/synth/dataset.json" in proc.stdout
    assert s3.secret not in proc.stdout
    return "s3://bucket/synth"


def test_prepared_dataset_on_s3(s3, s3_env, dataset):
    assert s3.keys("synth/") == ["synth/dataset.json", "synth/train-00000.parquet",
                                 "synth/train-00001.parquet", "synth/unlabeled-00000.parquet",
                                 "synth/val-00000.parquet"]
    info = open_dataset(dataset)
    assert info.uri == "s3://bucket/synth" and info.num_rows("train") == 32
    assert verify_shards(info) == 4
    assert len(list(iter_rows(info, "val"))) == 8


def test_region_and_credentials_from_a_profile(s3, dataset, tmp_path):
    """With no AWS_REGION or key variables, the profile's region and keys are used, as boto3 would.

    A fresh process each time: the AWS SDK reads its config files once per process.
    """
    (tmp_path / "config").write_text("[profile lab]\nregion = eu-west-2\n")
    (tmp_path / "credentials").write_text(
        f"[lab]\naws_access_key_id = {s3.env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3.secret}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3.endpoint, AWS_EC2_METADATA_DISABLED="true", AWS_PROFILE="lab",
               AWS_CONFIG_FILE=str(tmp_path / "config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"))
    probe = ("from segray import storage; from segray.data.manifest import open_dataset; "
             f"print(storage.s3_filesystem().region, open_dataset({dataset!r}).num_rows('val'))")

    def run(**extra: str) -> str:
        proc = subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run() == "eu-west-2 8"
    assert run(AWS_REGION="ap-south-1") == "ap-south-1 8"  # the variable wins over the profile


def test_large_write_is_one_complete_object(s3, s3_env):
    # Past 10 MiB pyarrow uploads in parts; the object appears only once the upload completes.
    data = os.urandom(11 * 2**20 + 17)
    storage.write_bytes("s3://bucket/big/blob.bin", data)
    assert s3.keys("big/") == ["big/blob.bin"] and s3.get("big/blob.bin") == data
    assert storage.read_bytes("s3://bucket/big/blob.bin") == data
    storage.delete("s3://bucket/big")
    assert not storage.exists("s3://bucket/big/blob.bin")


def test_interrupted_prepare_leaves_no_manifest(s3, s3_env, dataset, tmp_path):
    info = open_dataset(dataset)
    rows = list(iter_rows(info, "train"))[:6]
    dst = "s3://bucket/interrupted"

    def write(fail_after: int | None) -> None:
        with DatasetWriter(dst, "x", info.classes, info.palette, rows_per_shard=2) as w:
            for i, r in enumerate(rows):
                if i == fail_after:
                    raise RuntimeError("interrupted")
                w.add("train", r["key"], r["image"], r["mask"], r["labels"], r["height"],
                      r["width"])

    with pytest.raises(RuntimeError, match="interrupted"):
        write(fail_after=5)
    assert s3.keys("interrupted/") == ["interrupted/train-00000.parquet",
                                       "interrupted/train-00001.parquet"]
    with pytest.raises(FileNotFoundError, match="no dataset manifest at s3://bucket/interrupted"):
        open_dataset(dst)
    write(fail_after=None)  # a re-run succeeds
    assert open_dataset(dst).num_rows("train") == 6
    # Re-writing a complete dataset withdraws its manifest first: an interrupted re-write never
    # leaves the old manifest pointing at shards that have been partly replaced.
    with pytest.raises(RuntimeError):
        write(fail_after=3)
    assert "interrupted/dataset.json" not in s3.keys("interrupted/")
    env = job_env(tmp_path, **s3.env)
    run_job("prepare_data.py", "synthetic", dst, "--train", "4", "--val", "2", "--unlabeled", "0",
            "--size", "32", env=env, timeout=120)
    again = open_dataset(dst)
    assert again.num_rows("train") == 4 and verify_shards(again) == 2
    assert s3.keys("interrupted/") == ["interrupted/dataset.json",
                                       "interrupted/train-00000.parquet",
                                       "interrupted/val-00000.parquet"]  # stale shards removed


@pytest.fixture(scope="module")
def changed(s3, dataset):
    """A copy of the dataset whose val shard was overwritten on S3 with other bytes."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env.items():
            mp.setenv(key, value)
        for name in storage.list_dir(dataset):
            storage.write_bytes(storage.join("s3://bucket/changed", name),
                                storage.read_bytes(storage.join(dataset, name)))
    data = bytearray(s3.get("changed/val-00000.parquet"))
    data[len(data) // 2] ^= 0x01  # same size, other bytes
    s3.put("changed/val-00000.parquet", bytes(data))
    return "s3://bucket/changed"


def test_changed_shard_on_s3_is_named(s3_env, changed):
    info = open_dataset(changed)
    assert verify_shards(info, "train") == 2
    with pytest.raises(ValueError, match=r"shard s3://bucket/changed/val-00000\.parquet of split "
                                         r"'val' does not match its manifest"):
        verify_shards(info)
    with pytest.raises(ValueError, match=r"s3://bucket/changed/val-00000\.parquet"):
        next(iter_rows(info, "val"))


@pytest.mark.cluster
def test_train_evaluate_resume_on_s3(s3, dataset, changed, tmp_path):
    env = job_env(tmp_path, **s3.env)
    first = run_job("train.py", *TRAIN, env=env, timeout=600)
    assert "run folder: s3://bucket/runs/s3run" in first.stdout
    keys = s3.keys("runs/s3run/")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "predictions.png",
                 "step_0000003/state.pt", "step_0000003/meta.json", "step_0000006/state.pt",
                 "step_0000006/meta.json"):
        assert f"runs/s3run/{name}" in keys, name
    assert "runs/s3run/run.lock" not in keys  # the lease, released when the job ended
    summary = json.loads(s3.get("runs/s3run/summary.json"))
    assert summary["steps"] == 6 and summary["checkpoint"] == "s3://bucket/runs/s3run/step_0000006"
    assert summary["dataset"] == "s3://bucket/synth"
    history = [json.loads(line) for line in s3.get("runs/s3run/metrics.jsonl").splitlines()]
    assert [h["step"] for h in history if "val/mIoU" in h] == [3, 6]
    assert s3.get("runs/s3run/curves.png")[:4] == b"\x89PNG"

    ev = run_job("evaluate.py", "--checkpoint", "s3://bucket/runs/s3run/step_0000006", "--data",
                 "s3://bucket/synth", "--out", "s3://bucket/eval", env=env, timeout=300)
    metrics = json.loads(s3.get("eval/metrics.json"))
    assert metrics["images"] == 8 and metrics["dataset"] == "s3://bucket/synth"
    assert metrics["metrics"]["mIoU"] == pytest.approx(summary["val"]["mIoU"], abs=1e-6)

    # Evaluation on a dataset whose shard changed on S3 stops and names the shard.
    bad = run_job("evaluate.py", "--checkpoint", "s3://bucket/runs/s3run/step_0000006", "--data",
                  changed, "--out", "s3://bucket/eval-changed", env=env, check=False, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stdout, bad.stdout[-3000:]
    assert "shard s3://bucket/changed/val-00000.parquet of split 'val' does not match" in bad.stdout
    assert not s3.keys("eval-changed/")

    again = run_job("train.py", *TRAIN, env=env, timeout=600)
    assert "resum" in again.stdout and "run folder: s3://bucket/runs/s3run" in again.stdout

    # No credential in any output or in any file of the run folder.
    secrets = (s3.secret, s3.env["AWS_ACCESS_KEY_ID"])
    for proc in (first, ev, bad, again):
        assert not any(s in proc.stdout for s in secrets)
    for key in s3.keys("runs/") + s3.keys("eval/"):
        body = s3.get(key)
        assert not any(s.encode() in body for s in secrets), key


@pytest.mark.cluster
def test_sweep_on_s3(s3, dataset, tmp_path):
    env = job_env(tmp_path, **s3.env)
    (tmp_path / "space.yaml").write_text("optim.lr: {type: choice, values: [1.0e-7, 3.0e-3]}\n")
    where = ["--storage", "s3://bucket/sweeps", "--name", "s3sw", "--metrics-port", "0"]
    first = run_job("tune.py", "--method", "supervised", "--data", dataset, "--samples", "2",
                    "--max-concurrent", "1", "--space", str(tmp_path / "space.yaml"), "--steps",
                    "4", "--eval-every", "2", "--set", "model.decoder_channels=16", "--seed", "1",
                    *where, env=env, timeout=600)
    assert "-> s3://bucket/sweeps/s3sw" in first.stdout and "best trial" in first.stdout
    keys = s3.keys("sweeps/s3sw/")
    for name in ("sweep.yaml", "trials.csv", "trials.md", "report.html", "best.yaml"):
        assert f"sweeps/s3sw/{name}" in keys, name
    assert any(k.startswith("sweeps/s3sw/tune/experiment_state-") for k in keys)  # Tune's state
    assert "sweeps/s3sw/run.lock" not in keys  # the driver's lease, released when it ended
    rows = list(csv.DictReader(io.StringIO(s3.get("sweeps/s3sw/trials.csv").decode())))
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"finished", "stopped"}, rows
    for r in rows:  # each trial's Train run, and ASHA's judgement at its rung (round 1)
        run = f"sweeps/s3sw/trials/{r['trial']}/"
        assert r["run"] == "s3://bucket/" + run.rstrip("/")
        assert {run + "metrics.jsonl", run + "step_0000002/state.pt"} <= set(keys), r
        assert set(json.loads(s3.get(run + "asha_rungs.json"))) == {"1"}

    # Resuming the finished sweep from S3 keeps both trials as they were.
    again = run_job("tune.py", "--resume", *where, env=env, timeout=600)
    assert "resuming sweep s3sw: 2 trials of supervised" in again.stdout
    assert list(csv.DictReader(io.StringIO(s3.get("sweeps/s3sw/trials.csv").decode()))) == rows
    secrets = (s3.secret, s3.env["AWS_ACCESS_KEY_ID"])
    assert not any(s in proc.stdout for s in secrets for proc in (first, again))
    for key in s3.keys("sweeps/"):
        assert not any(s.encode() in s3.get(key) for s in secrets), key
