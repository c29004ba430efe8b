"""How many trials a sweep runs at once, and how an interrupted sweep's trials are reported.

No Ray instance: :func:`plan_concurrency` is given what the caller saw (attached or local, the
cluster's resources), and the table is built from fake run folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import job_env, run_job

from methods.supervised import Supervised
from segray.config import to_dict
from segray.launch import UsageError
from segray.sweep import results
from segray.sweep import runner as runner_mod
from segray.sweep.runner import attached_to_cluster, plan_concurrency
from segray.sweep.space import knob_names, parse_space, trial_config
from segray.sweep.spec import STOPPED_FILE, SweepSpec, trial_need

GPU_TRIAL = trial_need(workers=1, cpus_per_worker=1.0, gpus_per_worker=1.0)  # 2.1 CPU + 1 GPU
CPU_TRIAL = trial_need(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0)  # 2.1 CPU
IDLE = {"CPU": 8.0}  # an autoscaling cluster's head: GPU workers scale from zero


def test_attached_to_an_idle_gpu_cluster_trials_wait_for_the_autoscaler():
    k, note = plan_concurrency(True, IDLE, GPU_TRIAL, 4, samples=32)
    assert k == 4
    assert "no room for one trial (2.1 CPU + 1 GPU) yet" in note
    assert "wait for the autoscaler" in note
    # Some room now, more asked for: the extra trials wait for nodes too.
    k, note = plan_concurrency(True, {"CPU": 8.0, "GPU": 1.0}, GPU_TRIAL, 3, samples=32)
    assert k == 3 and "more than the cluster holds now (1 trials" in note
    assert "autoscaler" in note


def test_attached_with_no_room_and_no_max_concurrent_is_a_usage_error():
    with pytest.raises(UsageError) as raised:
        plan_concurrency(True, IDLE, GPU_TRIAL, None, samples=32)
    message = str(raised.value)
    for text in ("the cluster has no room for one trial (2.1 CPU + 1 GPU) yet",
                 "it holds 8 CPU, 0 GPU", "autoscaling from zero?", "pass --max-concurrent N"):
        assert text in message, message
    with pytest.raises(UsageError, match="no room for one trial"):  # CPU-bound too
        plan_concurrency(True, {"CPU": 2.0}, CPU_TRIAL, None, samples=8)


def test_attached_with_room_fills_it_up_to_the_samples():
    cluster = {"CPU": 16.0, "GPU": 4.0}
    assert plan_concurrency(True, cluster, GPU_TRIAL, None, samples=32) == (4, "")
    assert plan_concurrency(True, cluster, GPU_TRIAL, None, samples=3) == (3, "")
    assert plan_concurrency(True, cluster, GPU_TRIAL, 2, samples=32) == (2, "")


def test_a_local_instance_keeps_its_checks():
    # A private instance is all there is: a GPU trial on a machine without one never runs.
    with pytest.raises(UsageError, match="this machine has 0; pass --gpus-per-worker 0"):
        plan_concurrency(False, {"CPU": 8.0}, GPU_TRIAL, None, samples=4)
    with pytest.raises(UsageError, match="this machine has 0"):
        plan_concurrency(False, {"CPU": 8.0}, GPU_TRIAL, 2, samples=4)
    assert plan_concurrency(False, {"CPU": 5.0}, CPU_TRIAL, None, samples=4) == (2, "")
    k, note = plan_concurrency(False, {"CPU": 1.0}, CPU_TRIAL, None, samples=4)
    assert k == 1 and "running one at a time" in note
    k, note = plan_concurrency(False, {"CPU": 5.0, "GPU": 1.0}, GPU_TRIAL, 3, samples=4)
    assert k == 3 and "more than this machine holds" in note and "autoscaler" not in note


def test_a_resumed_sweep_keeps_its_saved_concurrency_on_an_idle_cluster():
    # run_sweep passes the value saved in sweep.yaml as the request: no error, no new guess.
    k, note = plan_concurrency(True, IDLE, GPU_TRIAL, 6, samples=32)
    assert k == 6 and "autoscaler" in note


@pytest.mark.parametrize(("address", "attached"), [
    (None, False), ("", False), ("local", False), ("auto", True),
    ("ray://head:10001", True), ("10.0.0.5:6379", True)])
def test_attached_means_ray_address(monkeypatch, address, attached):
    if address is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", address)
    assert attached_to_cluster() is attached


def _spec(tmp_path: Path, samples: int = 3) -> SweepSpec:
    base = to_dict(trial_config({"train": {"steps": 8, "eval_every": 4}}, {}, Supervised.Knobs,
                                "supervised"))
    space = parse_space({"label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2}},
                        knob_names(Supervised.Knobs))
    return SweepSpec(name="sw", root=str(tmp_path / "sw"), method="supervised", base=base,
                     space=space, samples=samples, max_concurrent=2)


def test_run_sweep_on_an_idle_cluster_stops_before_saving_anything(tmp_path, monkeypatch,
                                                                    small_dataset):
    spec = _spec(tmp_path)
    spec.base["data"]["uri"] = small_dataset
    spec.base["gpus_per_worker"] = 1.0
    spec.max_concurrent = None
    monkeypatch.setattr(runner_mod, "init_ray", lambda need, requested: True)
    monkeypatch.setattr(runner_mod.ray, "cluster_resources", lambda: dict(IDLE))
    with pytest.raises(UsageError, match="pass --max-concurrent N"):
        runner_mod.run_sweep(spec, metrics_port=0, say=lambda line: None)
    assert not (tmp_path / "sw" / "sweep.yaml").exists()  # the same command may run again


def _run(spec: SweepSpec, trial: str, steps: list[int], *, summary: bool = False,
         marker: bool = False) -> None:
    run = Path(spec.run_uri(trial))
    run.mkdir(parents=True)
    lines = [{"step": s, "train/loss": 1.0} for s in steps]
    lines += [{"step": s, "val/mIoU": 10.0 + s} for s in steps if s % 4 == 0]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in lines))
    (run / "config.yaml").write_text("name: x\n")
    if summary:
        (run / "summary.json").write_text("{}")
    if marker:
        (run / STOPPED_FILE).write_text("{}")


def test_trials_ended_by_an_interruption_are_interrupted_not_stopped(tmp_path):
    spec = _spec(tmp_path, samples=5)
    _run(spec, "trial_001_a", [4, 8], summary=True)  # finished
    _run(spec, "trial_002_b", [4], marker=True)  # stopped by the scheduler
    _run(spec, "trial_003_c", [4, 6])  # running when the driver caught SIGINT
    # Tune stops the running trials at the interruption: TERMINATED, no error (what the grid says).
    trials = [{"name": n, "status": "TERMINATED", "config": {"label_smoothing": 0.1}, "last": {}}
              for n in ("trial_001_a", "trial_002_b", "trial_003_c", "trial_004_d")]
    rows = results.trial_rows(spec, trials)
    assert [r.status for r in rows] == ["finished", "stopped", "interrupted", "pending"]
    assert [r.stopped_early for r in rows] == [False, True, False, False]
    assert not results.complete(spec, rows)
    n = results.counts(rows)
    assert (n["interrupted"], n["stopped"], n["done"], n["pending"]) == (1, 1, 2, 1)
    results.write_results(spec, rows)
    table = (Path(spec.root) / "trials.csv").read_text().splitlines()
    assert table[3].startswith("trial_003_c,interrupted,") and ",False,0," in table[3]
    assert "1 interrupted" in (Path(spec.root) / "report.html").read_text()

    # Resumed to the end: every trial has ended, the sweep is complete.
    _run(spec, "trial_004_d", [4, 8], summary=True)
    _run(spec, "trial_005_e", [4, 8], summary=True)
    (Path(spec.run_uri("trial_003_c")) / "summary.json").write_text("{}")
    trials.append({"name": "trial_005_e", "status": "ERROR", "config": {}, "last": {}})
    rows = results.trial_rows(spec, trials)
    assert [r.status for r in rows] == ["finished", "stopped", "finished", "finished", "error"]
    assert results.complete(spec, rows)
    assert not results.complete(spec, rows[:4])  # a trial not even created yet


def test_resume_refuses_another_max_concurrent(tmp_path):
    spec = _spec(tmp_path)
    spec.root = str(tmp_path / "runs" / "sw")
    spec.save()
    env = job_env(tmp_path)
    proc = run_job("tune.py", "--resume", "--name", "sw", "--storage", str(tmp_path / "runs"),
                   "--max-concurrent", "5", "--metrics-port", "0", env=env, check=False,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "--max-concurrent 5: sweep sw runs 2 trial(s) at a time, fixed when it started" \
        in proc.stdout
    assert "Traceback" not in proc.stdout
