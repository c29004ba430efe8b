"""Bad data end to end through ``jobs/train.py``: a bad row stops a run with exit code 2 naming
shard and key; with ``data.on_bad_sample=skip`` the run skips and counts it in its metrics and
summary (see test_bad_data.py for the checks below the job)."""

from __future__ import annotations

import json

import pytest
from bad_rows import (
    TRAIN,
    flip_a_byte,
    good_rows,
    mixed,
    rewrite_shard,
    row_variants,
    set_key,
    write_rows,
)
from conftest import job_env, run_job


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return good_rows(tmp_path_factory.mktemp("bad"))


# ------------------------------------------------------------------ through jobs/train.py

@pytest.mark.cluster
def test_train_job_stops_on_bad_data(tmp_path, good):
    info, train, val = good
    env = job_env(tmp_path)
    rows, i = row_variants(train)["corrupt_image"]
    dst = write_rows(tmp_path / "corrupt", info, rows, val)
    runs, shard = tmp_path / "runs", dst / "train-00001.parquet"
    args = [*TRAIN, "--data", str(dst), "--name", "r", "--storage", str(runs)]
    # Met while streaming: recorded, so Ray Train's retry fails at once; an input error, exit 2.
    proc = run_job("train.py", *args, "--set", "train.max_failures=1", env=env, check=False,
                   timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: bad sample '{rows[i]['key']}' in shard {shard}: image: cannot decode"
            in proc.stdout)
    assert "--set data.on_bad_sample=skip" in proc.stdout
    record = json.loads((runs / "r" / "data_error.json").read_text())
    assert (record["key"], record["shard"]) == (rows[i]["key"], str(shard))
    # The same run, told to skip: the record is cleared and the run completes.
    proc = run_job("train.py", *args, "--set", "data.on_bad_sample=skip", env=env, timeout=300)
    assert "validation mIoU" in proc.stdout and not (runs / "r" / "data_error.json").exists()
    # In a sweep, the trial that meets the row records it for the sweep: the next trial fails at
    # once, without a run folder, and the sweep ends as an input error.
    sweeps = tmp_path / "row-sweeps"
    proc = run_job("tune.py", "--method", "supervised", "--data", str(dst), "--samples", "2",
                   "--max-concurrent", "1", "--steps", "4", "--eval-every", "4",
                   "--batch-size", "4", "--set", "train.max_failures=0", "--metrics-port", "0",
                   "--name", "swc", "--storage", str(sweeps), env=env, check=False, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"error: bad sample '{rows[i]['key']}' in shard {shard}" in proc.stdout
    assert json.loads((sweeps / "swc" / "data_error.json").read_text())["key"] == rows[i]["key"]
    trials = [t.name for t in (sweeps / "swc" / "trials").iterdir() if t.is_dir()]
    assert len(trials) == 1 and (sweeps / "swc" / "trials" / trials[0] / "data_error.json").exists()
    assert (sweeps / "swc" / "trials.csv").read_text().count(",error,") == 2
    # The data fixed in place, --resume clears the record and both trials run to the end.
    write_rows(dst, info, train, val)
    proc = run_job("tune.py", "--resume", "--name", "swc", "--storage", str(sweeps),
                   "--metrics-port", "0", env=env, timeout=600)
    assert "best trial" in proc.stdout and not (sweeps / "swc" / "data_error.json").exists()
    table = (sweeps / "swc" / "trials.csv").read_text()
    assert table.count(",finished,") == 2 and ",error," not in table, table
    assert not list((sweeps / "swc" / "trials").glob("*/data_error.json"))

    dup = write_rows(tmp_path / "dup", info, train, val)
    rewrite_shard(dup, "train-00003.parquet", lambda t: set_key(t, 1, train[2]["key"]))
    proc = run_job("train.py", *TRAIN, "--data", str(dup), env=env, check=False, timeout=300)
    # Found while building the streams, before any worker starts: an input error, not a crash.
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert f"error: bad sample '{train[2]['key']}' in shard {dup / 'train-00003.parquet'}" \
        in proc.stdout
    assert "or set data.on_bad_sample=skip to skip and count such rows" in proc.stdout
    # A sweep checks the dataset once, in its driver: no trial starts and no sweep is recorded.
    proc = run_job("tune.py", "--method", "supervised", "--data", str(dup), "--samples", "2",
                   "--steps", "4", "--eval-every", "4", "--metrics-port", "0", "--name", "sw",
                   "--storage", str(tmp_path / "sweeps"), env=env, check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert f"error: bad sample '{train[2]['key']}' in shard {dup / 'train-00003.parquet'}" \
        in proc.stdout
    assert not (tmp_path / "sweeps" / "sw" / "sweep.yaml").exists()
    assert not list((tmp_path / "sweeps").rglob("trial_*"))

    changed = write_rows(tmp_path / "changed", info, train, val)
    flip_a_byte(changed / "train-00001.parquet")
    proc = run_job("train.py", *TRAIN, "--data", str(changed), "--name", "c", "--storage",
                   str(runs), "--set", "train.max_failures=1", env=env, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: shard {changed / 'train-00001.parquet'} of split 'train' does not match its "
            "manifest" in proc.stdout)
    assert "re-create the dataset and re-run the same command to resume" in proc.stdout

    empty = write_rows(tmp_path / "empty", info, train, val)
    manifest = json.loads((empty / "dataset.json").read_text())
    manifest["splits"]["val"][0]["rows"] = 0
    (empty / "dataset.json").write_text(json.dumps(manifest))
    proc = run_job("train.py", *TRAIN, "--data", str(empty), env=env, check=False, timeout=300)
    assert proc.returncode == 2 and "split 'val' is empty" in proc.stdout
    assert "Traceback" not in proc.stdout


@pytest.mark.cluster
def test_train_job_skips_and_counts(tmp_path, good):
    dst, bad, _ = mixed(tmp_path / "mixed", good)
    runs = tmp_path / "runs"
    proc = run_job("train.py", *TRAIN, "--data", str(dst), "--set", "data.on_bad_sample=skip",
                   "--name", "skip", "--storage", str(runs), env=job_env(tmp_path), timeout=300)
    assert "validation mIoU" in proc.stdout
    run = runs / "skip"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_samples_skipped"] == len(bad) + 2  # + the two duplicates
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["data/bad_samples_skipped"] for h in history if "val/mIoU" in h] == [len(bad) + 2]

    # Nothing left to train on once every bad row is skipped: an input error naming the first
    # skipped row (recorded, so Ray Train's retry fails at once), not a crash.
    info, train, val = good
    broken = [dict(r, image=b"\xff\xd8\xff\xe0 truncated jpeg") for r in train]
    dst_all = write_rows(tmp_path / "all-bad", info, broken, val)
    proc = run_job("train.py", *TRAIN, "--data", str(dst_all), "--set", "data.on_bad_sample=skip",
                   "--name", "all-bad", "--storage", str(runs), env=job_env(tmp_path),
                   check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert (f"error: the 'train' stream yielded no batch for this worker: {len(train)} bad rows "
            "were skipped") in proc.stdout
    assert "fix or remove the bad rows (re-create the dataset) and re-run" in proc.stdout
    assert json.loads((runs / "all-bad" / "data_error.json").read_text())["fix"].startswith(
        "fix or remove the bad rows")

    # Evaluation never skips: each bad val row stops jobs/evaluate.py (exit 2), naming shard and
    # key, before anything is written.
    checkpoint = next(run.glob("step_*"))
    variants = row_variants(val, row=1)
    for case in ("corrupt_image", "label_range"):  # once a traceback, once silently evaluated
        rows, i = variants[case]
        data = write_rows(tmp_path / f"val-{case}", info, train, rows)
        out = tmp_path / f"eval-{case}"
        proc = run_job("evaluate.py", "--checkpoint", str(checkpoint), "--data", str(data),
                       "--out", str(out), env=job_env(tmp_path), check=False, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
        assert (f"error: bad sample '{rows[i]['key']}' in shard {data / 'val-00000.parquet'}"
                in proc.stdout), case
        assert not out.exists(), case
