"""Ctrl-C on a running sweep: jobs/tune.py exits 130 with the resume command, its table says which
trials were interrupted (not stopped early), and ``--resume`` finishes them from their checkpoints,
also once the sweep folder has moved.

A local Ray instance started by the job itself; two trials of the supervised method, one at a
time, no early stopping, so the only trial that can end without finishing is the interrupted one.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from conftest import ROOT, job_env
from test_tune import _history, _kill_marked, _registered, _rows

from segray import launch

STEPS, EVAL_EVERY = 40, 10


@pytest.fixture
def env(tmp_path):
    """Job environment whose processes (driver, local Ray, workers) are all killed afterwards."""
    marker = uuid.uuid4().hex
    yield job_env(tmp_path, SEGRAY_TEST_MARKER=marker)
    _kill_marked(marker)


def _victim(sweep) -> str | None:
    """A trial whose first checkpoint is registered and which has not finished, if any."""
    for run in sorted((sweep / "trials").glob("trial_*")):
        if _registered(run) and not (run / "summary.json").exists():
            return run.name
    return None


@pytest.mark.cluster
def test_sigint_interrupts_the_sweep_and_resume_finishes_it(tmp_path, small_dataset, env):
    runs, sweep = tmp_path / "runs", tmp_path / "runs" / "sw"
    args = ["--method", "supervised", "--data", small_dataset, "--samples", "2",
            "--max-concurrent", "1", "--scheduler", "none", "--steps", str(STEPS),
            "--eval-every", str(EVAL_EVERY), "--set", "train.log_every=5", "--seed", "1",
            "--storage", str(runs), "--name", "sw", "--metrics-port", "0"]

    # 1. Start the sweep; once a trial has checkpointed, Ctrl-C the driver.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "tune.py"), *args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 150
            victim = None
            while victim is None:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
                assert time.time() < deadline, "no trial checkpointed in time"
                time.sleep(0.2)
                victim = _victim(sweep)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = (tmp_path / "first.log").read_text()
    assert code == 130, out[-6000:]
    line = next((x for x in out.splitlines() if x.startswith("resume it: ")), None)
    assert line == f"resume it: python jobs/tune.py --name sw --storage {runs} --resume", out[-3000:]
    assert not any(x.startswith("best trial ") for x in out.splitlines())
    rows = {r["trial"]: r for r in _rows(sweep)}
    assert rows[victim]["status"] == "interrupted" and rows[victim]["stopped_early"] == "False"
    assert not any(r["status"] == "stopped" for r in rows.values()), rows
    assert f"interrupted, to continue on resume: {victim}" in out
    checkpointed = max(_registered(sweep / "trials" / victim))

    # 2. The sweep folder moves to other storage (a copy to another bucket or mount): the printed
    # command, pointed there, continues it; the interrupted trial resumes from its checkpoint,
    # and nothing is written to the old folder (Tune's restored scheduler and callback held it).
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    sweep = sweep.rename(moved / "sw")
    cmd = shlex.split(line.removeprefix("resume it: "))
    assert cmd[:2] == ["python", "jobs/tune.py"]
    cmd[cmd.index("--storage") + 1] = str(moved)
    resumed = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune.py"), *cmd[2:],
                              "--metrics-port", "0"], cwd=ROOT, env=env, timeout=240,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert resumed.returncode == 0, resumed.stdout[-6000:]
    assert "resuming sweep sw: 2 trials of supervised" in resumed.stdout
    assert "\nbest trial trial_00" in resumed.stdout and "resume it:" not in resumed.stdout
    rows = {r["trial"]: r for r in _rows(sweep)}
    assert len(rows) == 2 and {r["status"] for r in rows.values()} == {"finished"}, rows
    history = _history(sweep / "trials" / victim)
    assert [h["step"] for h in history if h.get("event") == "resumed"] == [checkpointed]
    # The resumed trial's streams draw new crops (their seed mixes in the step it resumed from).
    seed = yaml.safe_load((sweep / "trials" / victim / "config.yaml").read_text())["seed"]
    assert [h["stream_seed"] for h in history if h.get("event") == "resumed"] == [
        launch.data_seed(seed, checkpointed)] != [launch.data_seed(seed, 0)]
    assert rows[victim]["resumes"] == "1" and int(rows[victim]["steps"]) == STEPS
    assert not (runs / "sw").exists()
