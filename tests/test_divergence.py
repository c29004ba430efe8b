"""A run whose loss or weights become NaN or infinite: it stops at once instead of retrying into
the same blow-up, says which checkpoint it keeps and how to go on, resumes once the learning rate
is lowered; in a sweep such a trial ends as ``diverged`` with the worst score."""

from __future__ import annotations

import dataclasses
import json
import pickle
import uuid

import pytest
import torch
from conftest import job_env, run_job
from test_sweep_space import _fake_run, _spec

from segray import launch, report
from segray.engine import DIVERGED_FIX, Diverged, to_floats
from segray.sweep import results

SMALL = ["--method", "supervised", "--set", "model.decoder_channels=16", "--batch-size", "4"]


def test_divergence_survives_pickling_and_is_recorded_in_the_run_folder(tmp_path):
    with pytest.raises(Diverged, match=r"the loss became inf at step 3; lower optim.lr") as e:
        to_floats({"loss": torch.tensor(float("inf"))}, 3)
    again = pickle.loads(pickle.dumps(e.value))  # as Ray hands a worker's error to the driver
    assert type(again) is Diverged and again.step == 3 and str(again) == str(e.value)

    run = str(tmp_path / "run")
    assert report.read_divergence(run) is None
    report.write_divergence(run, 3, str(e.value))
    assert report.read_divergence(run) == {"step": 3, "message": str(e.value)}
    report.clear_divergence(run)
    assert report.read_divergence(run) is None
    report.clear_divergence(run)  # nothing recorded: nothing to do


def test_the_drivers_error_names_the_kept_checkpoint_and_the_fix():
    recorded = {"step": 9, "message": f"the loss became nan at step 9; {DIVERGED_FIX}"}
    error = launch.diverged_error("r1", recorded, kept=8)
    assert isinstance(error, FloatingPointError) and error.step == 9
    assert str(error) == ("run r1 diverged and stopped without retrying: the loss became nan at "
                          "step 9. It keeps its checkpoints, the latest at step 8: lower optim.lr "
                          "or set optim.grad_clip (--set optim.lr=...) and re-run the same "
                          "command to resume from there")
    assert "It has no checkpoint yet: " in str(launch.diverged_error("r1", recorded, kept=0))


def test_a_diverged_trial_has_ended_and_is_never_the_best(tmp_path):
    spec = _spec(tmp_path)
    _fake_run(spec, "trial_001_a", [10.0, 20.0, 30.0])
    _fake_run(spec, "trial_002_b", [45.0])  # the best mIoU, then NaN
    report.write_divergence(spec.run_uri("trial_002_b"), 6, "the loss became nan at step 6")
    config = {"mask_ratio": 0.3, "optim.lr": 1e-3, "holes": "freeform"}
    rows = results.trial_rows(spec, [
        {"name": name, "status": "TERMINATED", "config": config, "last": {}}
        for name in ("trial_001_a", "trial_002_b")])
    assert [r.status for r in rows] == ["finished", "diverged"]
    assert rows[1].best_miou == 45.0  # its table row keeps the evaluations it made
    assert results.best_row(rows).trial == "trial_001_a"
    n = results.counts(rows)
    assert (n["diverged"], n["done"], n["error"]) == (1, 2, 0)
    assert not results.complete(spec, rows)  # 2 of 4 samples
    assert results.complete(dataclasses.replace(spec, samples=2), rows)
    assert results.best_row(rows[1:]) is None  # not even when it is the only scored trial


@pytest.mark.cluster
def test_a_diverged_run_stops_without_retrying_and_resumes_with_a_lower_lr(tmp_path,
                                                                            small_dataset):
    """lr=1e30: the loss at step 2 is no longer finite. Two retries are allowed, but a retry
    would replay the same batches from the same state, so the run trains once and stops (the
    progress line of step 1 appears once, not three times). With a sane lr the same command
    trains the run to the end."""
    env = job_env(tmp_path)
    args = [*SMALL, "--data", small_dataset, "--steps", "6", "--eval-every", "3", "--name", "nan",
            "--storage", str(tmp_path / "runs"), "--set", "train.log_every=1",
            "--set", "train.max_failures=2"]
    proc = run_job("train.py", *args, "--set", "optim.lr=1e30", env=env, check=False,
                   timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "error: run nan diverged and stopped without retrying: the loss became" in out, \
        out[-3000:]
    assert "It has no checkpoint yet: lower optim.lr or set optim.grad_clip" in out
    assert out.count("] step 1/6 loss") == 1, out[-3000:]
    run = tmp_path / "runs" / "nan"
    recorded = json.loads((run / report.DIVERGED_FILE).read_text())
    assert recorded["step"] in (2, 3) and not list(run.glob("step_*"))

    proc = run_job("train.py", *args, "--set", "optim.lr=0.01", env=env, timeout=300)
    assert "validation mIoU" in proc.stdout
    assert not (run / report.DIVERGED_FILE).exists()
    assert json.loads((run / report.SUMMARY_FILE).read_text())["steps"] == 6
    assert (run / "step_0000006").is_dir()


def test_the_searcher_learns_a_diverged_trials_worst_score():
    from test_sweep_searcher import _searcher

    from segray.sweep.searcher import SweepOptuna
    from segray.sweep.spec import METRIC
    from segray.sweep.trial import DIVERGED_KEY

    s = _searcher(SweepOptuna)
    s.suggest("t1")
    s.on_trial_complete("t1", result={METRIC: 0.0, DIVERGED_KEY: 1})  # as _report_divergence
    (told,) = s._ot_study.get_trials()
    assert told.state.name == "COMPLETE" and told.value == 0.0  # TPE ignores FAIL trials


@pytest.mark.cluster
def test_a_diverged_sweep_trial_ends_diverged_with_the_worst_score(tmp_path, small_dataset):
    """Its Train run stops without retrying, Tune's last result for it is val/mIoU 0 (what the
    searcher learns), its table status is ``diverged``, and the sweep says what to change."""
    from test_tune import _kill_marked, _rows

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {type: choice, values: [1.0e+30]}\n")
    marker = uuid.uuid4().hex
    env = job_env(tmp_path, SEGRAY_TEST_MARKER=marker)
    try:
        proc = run_job("tune.py", "--method", "supervised", "--data", small_dataset,
                       "--samples", "1", "--max-concurrent", "1", "--scheduler", "none",
                       "--steps", "6", "--eval-every", "3", "--space", str(space),
                       "--set", "train.log_every=1", "--set", "train.max_failures=2",
                       "--set", "model.decoder_channels=16", "--storage", str(tmp_path / "runs"),
                       "--name", "dv", "--metrics-port", "0", env=env, check=False, timeout=400)
    finally:
        _kill_marked(marker)
    out = proc.stdout
    assert proc.returncode == 1, out[-5000:]
    assert "every trial diverged: lower optim.lr or set optim.grad_clip" in out, out[-3000:]
    assert out.count("] step 1/6 loss") == 1, out[-3000:]
    sweep = tmp_path / "runs" / "dv"
    (row,) = _rows(sweep)
    assert row["status"] == "diverged", row
    (result_file,) = (sweep / "tune").rglob("result.json")
    last = json.loads(result_file.read_text().splitlines()[-1])
    assert last["val/mIoU"] == 0.0 and last["diverged"] == 1
