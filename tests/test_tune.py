"""End-to-end sweeps with jobs/tune.py on a local Ray instance (real Tune, Optuna, ASHA, Train).

One sweep carries the expensive checks: 4 trials, 2 at a time, a space with a learning rate that
cannot learn (so ASHA has something to stop), interrupted by killing the driver's process group
after a trial finished, resumed with ``--resume`` (Prometheus gauges scraped meanwhile), then
its results folder checked and ``best.yaml`` re-run with jobs/train.py.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, job_env, run_job

from segray import report
from segray.data.decode import BadSampleError
from segray.sweep.exporter import SweepMetrics
from segray.sweep.spec import RUNGS_FILE, STOPPED_FILE
from segray.sweep.trial import _fit_until_stopped

STEPS, EVAL_EVERY = 36, 18  # two evaluation rounds: ASHA decides at round 1
# (Before step ~18 validation mIoU is noise: BatchNorm statistics move it as much as the
# weights, so a trial at lr 1e-7 can score above one that learns.)
SPACE = ("optim.lr: {type: choice, values: [1.0e-7, 3.0e-3]}  # 1e-7 cannot learn in 36 steps\n"
         "mask_ratio: {type: uniform, low: 0.2, high: 0.3}\n")  # light masking learns fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(marker: str) -> list[int]:
    """PIDs of processes started for this test (they inherit the marker in their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"SEGRAY_TEST_MARKER={marker}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _kill_marked(marker: str, sig: int = signal.SIGKILL) -> None:
    for pid in _marked(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


@pytest.fixture
def sweep_env(tmp_path):
    """Job environment whose processes (driver, local Ray, workers) are all killed afterwards."""
    marker = uuid.uuid4().hex
    yield job_env(tmp_path, SEGRAY_TEST_MARKER=marker)
    _kill_marked(marker)


@pytest.mark.parametrize(("space", "args", "expected"), [
    ("mask_ratoi: {type: uniform, low: 0.1, high: 0.5}\n"
     "alpha: {type: uniform, low: 0.9, high: 0.1}\n"
     "holes: {type: choice, values: [freeform, squares]}\n", [],
     ["problem(s) in", "unknown knob 'mask_ratoi'; did you mean 'mask_ratio'?",
      "alpha: needs low < high"]),
    ("holes: {type: choice, values: [freeform, squares]}\n", [],
     ["holes='squares': knobs.holes: expected one of 'freeform', 'patches'"]),
    (None, ["--space", "/nonexistent/space.yaml"], ["no search-space file at /nonexistent"]),
    (None, ["--resume", "--name", "never-started"], ["no sweep at", "sweep.yaml is missing"]),
    (None, ["--samples", "0", "--reduction-factor", "1"],
     ["2 problem(s) with the flags", "--samples must be >= 1", "--reduction-factor must be > 1"]),
])
def test_usage_errors_exit_2(tmp_path, space, args, expected):
    extra = list(args)
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
        extra += ["--space", str(tmp_path / "space.yaml")]
    proc = run_job("tune.py", *extra, "--storage", str(tmp_path / "runs"), "--metrics-port", "0",
                   env=job_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    for text in expected:
        assert text in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("sweep.yaml"))


def test_a_space_file_reads_scientific_notation_and_ports_are_checked(tmp_path):
    space = tmp_path / "space.yaml"
    # The misspelt knob makes the sweep stop before Ray; the lr line must not be a second problem.
    space.write_text("optim.lr: {type: loguniform, low: 1e-4, high: 1e-2}\n"
                     "mask_ratoi: {type: uniform, low: 0.1, high: 0.5}\n")
    env = job_env(tmp_path)
    proc = run_job("tune.py", "--space", str(space), "--storage", str(tmp_path / "runs"),
                   "--metrics-port", "0", env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "1 problem(s) in" in proc.stdout and "mask_ratoi" in proc.stdout, proc.stdout
    assert "must be numbers" not in proc.stdout
    for port in ("70000", "-1", "http"):
        proc = run_job("tune.py", "--metrics-port", port, env=env, check=False, timeout=120)
        assert proc.returncode == 2 and "argument --metrics-port: expected a port" in proc.stdout
        assert "Traceback" not in proc.stdout


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(segray_sweep_\w+)(\{[^}]*\})? ([-+0-9.eE]+|NaN)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def test_sweep_metrics_exporter():
    port = _free_port()
    metrics = SweepMetrics("s1", port)
    try:
        metrics.update(running=2, done=3, stopped=1, best=41.5,
                       per_trial={"trial_001_ab": 41.5, "trial_002_cd": 12.0})
        metrics.observe(running=1, latest={"trial_003_ef": 44.0, "trial_002_cd": 13.0})
        got = _scrape(port)
        assert got['segray_sweep_trials_running{sweep="s1"}'] == 1
        assert got['segray_sweep_trials_done{sweep="s1"}'] == 3
        assert got['segray_sweep_trials_stopped{sweep="s1"}'] == 1
        assert got['segray_sweep_best_miou{sweep="s1"}'] == 44.0  # a live result beat it
        assert got['segray_sweep_trial_miou{sweep="s1",trial="trial_002_cd"}'] == 13.0
        assert got['segray_sweep_trial_miou{sweep="s1",trial="trial_001_ab"}'] == 41.5
        with pytest.raises(OSError, match=f"cannot serve sweep metrics on 127.0.0.1:{port}"):
            SweepMetrics("s2", port)
    finally:
        metrics.close()
    with pytest.raises(OSError):
        _scrape(port)  # closed
    assert SweepMetrics("s3", 0).port == 0  # 0 = not served


class _Fit:
    """Stands in for a trial's TorchTrainer: ``fit`` runs until released, or raises ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.started, self.release = error, threading.Event(), threading.Event()

    def fit(self) -> None:
        self.started.set()
        if self.error is not None:
            raise self.error
        assert self.release.wait(60), "never released"


def test_a_running_trial_ends_when_another_records_a_bad_row(tmp_path):
    sweep, run = str(tmp_path / "sw"), tmp_path / "sw" / "trials" / "t1"
    marker = str(run / "stopped_early.json")
    fit = _Fit()
    row = BadSampleError("s3://b/d/train-00001.parquet", "k7", "image: cannot decode")

    def another_trial_meets_the_row() -> None:
        fit.started.wait(30)
        report.write_data_error(sweep, row)

    threading.Thread(target=another_trial_meets_the_row, daemon=True).start()
    with pytest.raises(BadSampleError) as raised:  # an error, so --resume runs it again
        _fit_until_stopped(fit, "t1", marker, sweep, poll_s=0.05)
    assert (raised.value.shard, raised.value.key, raised.value.reason) == (
        row.shard, row.key, row.reason)
    fit.release.set()

    # The scheduler's stop marker ends it quietly; a fit's own outcome passes through.
    report.clear_data_error(sweep)
    fit = _Fit()
    run.mkdir(parents=True)
    threading.Thread(target=lambda: fit.started.wait(30) and Path(marker).write_text("{}"),
                     daemon=True).start()
    assert _fit_until_stopped(fit, "t1", marker, sweep, poll_s=0.05) is None
    fit.release.set()
    Path(marker).unlink()
    with pytest.raises(ValueError, match="its own failure"):
        _fit_until_stopped(_Fit(ValueError("its own failure")), "t1", marker, sweep, poll_s=0.05)
    done = _Fit()
    done.release.set()
    assert _fit_until_stopped(done, "t1", marker, sweep, poll_s=0.05) is None


def _rows(sweep: Path) -> list[dict[str, str]]:
    path = sweep / "trials.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def _history(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _registered(run: Path) -> list[int]:
    """Steps of the checkpoints Ray Train has registered for a run."""
    snap = run / "checkpoint_manager_snapshot.json"
    return [int(s) for s in re.findall(r'"step_(\d{7})"', snap.read_text())] if snap.exists() else []


def _interruptible(sweep: Path) -> str | None:
    """A trial in the middle of its last round while another has finished its report, if any.

    ASHA has judged its result at the only rung (its judgement is on file) and it trained on, so
    it was not stopped; its first checkpoint is registered and its last one is not.
    """
    runs = sorted((sweep / "trials").glob("trial_*"))
    if not any((run / "summary.json").exists() for run in runs):  # its report is complete
        return None
    ended = {r["trial"] for r in _rows(sweep) if r["status"] in ("finished", "stopped")}
    for run in runs:
        steps = [h["step"] for h in _history(run) if "train/loss" in h]
        ckpts = _registered(run)
        if run.name not in ended and steps and max(steps) >= EVAL_EVERY + 3 \
                and EVAL_EVERY in ckpts and STEPS not in ckpts \
                and (run / RUNGS_FILE).exists() and not (run / STOPPED_FILE).exists() \
                and not (run / "summary.json").exists():
            return run.name
    return None


@pytest.mark.cluster
def test_sweep_early_stopping_interrupt_resume_and_results(tmp_path, small_dataset, sweep_env):
    (tmp_path / "space.yaml").write_text(SPACE)
    sweep = tmp_path / "runs" / "sw"
    # Seed 12 samples lr 3e-3, 1e-7, 1e-7, 3e-3 (mask ratios 0.23, 0.29, 0.30, 0.26). ASHA
    # (reduction 2) stops a trial below the median of the results already at its rung, and the
    # first result at a rung always goes on. So the third trial, which cannot learn, meets the
    # median of a learning and a non-learning trial and stops; the last, which learns, meets a
    # median held down by two that cannot and trains on while one of the first pair has
    # finished: the interruptible moment comes whatever order the first pair reports in. (With
    # seed 1 the second learning trial came third, met the median of one learning and one
    # non-learning trial, and was sometimes stopped, leaving nothing to interrupt.)
    args = ["--method", "masksup", "--data", small_dataset, "--samples", "4",
            "--max-concurrent", "2", "--space", str(tmp_path / "space.yaml"),
            "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--set", "train.log_every=3",
            "--grace-period", "1", "--reduction-factor", "2", "--seed", "12",
            "--storage", str(tmp_path / "runs"), "--name", "sw"]
    cmd = [sys.executable, str(ROOT / "jobs" / "tune.py"), *args]

    # 1. Start the sweep; kill the driver and Ray (every process of the test) in the middle of a
    # trial's last round. The last steps of a round take about a second here, so everything is
    # frozen first and the victim confirmed on the frozen state: it cannot finish meanwhile.
    marker = sweep_env["SEGRAY_TEST_MARKER"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--metrics-port", "0"], cwd=ROOT, env=sweep_env,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 480
        victim = None
        while victim is None:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "no trial to interrupt"
            time.sleep(0.2)
            if _interruptible(sweep) is None:
                continue
            _kill_marked(marker, signal.SIGSTOP)
            victim = _interruptible(sweep)
            if victim is None:  # it finished before the freeze
                _kill_marked(marker, signal.SIGCONT)
        _kill_marked(marker)
        proc.wait()
    before = {run.name: {"lines": (run / "metrics.jsonl").read_text().splitlines(),
                         "ckpts": _registered(run),
                         "summary": (run / "summary.json").read_bytes()
                         if (run / "summary.json").exists() else None}
              for run in (sweep / "trials").glob("trial_*") if (run / "metrics.jsonl").exists()}
    finished_before = [t for t, b in before.items() if b["summary"] is not None]
    assert finished_before and victim not in finished_before

    # 2. Resume; scrape the sweep's gauges while it runs.
    port = _free_port()
    with open(tmp_path / "resume.log", "w") as log:
        proc = subprocess.Popen([*cmd, "--resume", "--metrics-port", str(port)], cwd=ROOT,
                                env=sweep_env, stdout=log, stderr=subprocess.STDOUT)
        scraped: dict[str, float] = {}
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                scraped.update(_scrape(port))
            time.sleep(0.5)
    out = (tmp_path / "resume.log").read_text()
    assert proc.returncode == 0, out[-6000:]
    assert "resuming sweep sw: 4 trials of masksup" in out
    assert f"sweep metrics on http://127.0.0.1:{port}/metrics" in out
    assert scraped['segray_sweep_trials_done{sweep="sw"}'] >= len(finished_before)
    assert scraped['segray_sweep_best_miou{sweep="sw"}'] > 0
    assert any(k.startswith('segray_sweep_trial_miou{sweep="sw",trial="trial_00') for k in scraped)
    assert 'segray_sweep_trials_running{sweep="sw"}' in scraped

    # 3. Every trial ran once: none twice from scratch, the interrupted one from its checkpoint.
    rows = {r["trial"]: r for r in _rows(sweep)}
    runs = sorted(p.name for p in (sweep / "trials").glob("trial_*"))
    assert sorted(rows) == runs and len(runs) == 4
    assert sorted(p.name for p in (sweep / "tune").glob("trial_*")) == runs
    for name in finished_before:  # kept, not re-run
        assert (sweep / "trials" / name / "summary.json").read_bytes() == before[name]["summary"]
        assert not any(h.get("event") == "resumed" for h in _history(sweep / "trials" / name))
    for name, b in before.items():
        lines = (sweep / "trials" / name / "metrics.jsonl").read_text().splitlines()
        if b["ckpts"]:
            # Its first logged step (with its wall-clock time) survives: not restarted from scratch.
            assert lines[0] == b["lines"][0], name
    history = _history(sweep / "trials" / victim)
    resumed = [h["step"] for h in history if h.get("event") == "resumed"]
    assert resumed and resumed[0] == max(before[victim]["ckpts"]) >= EVAL_EVERY
    logged = [h["step"] for h in history if "train/loss" in h]
    assert logged == sorted(set(logged)) and logged[-1] == STEPS
    assert rows[victim]["status"] == "finished" and rows[victim]["resumes"] == "1"

    # 4. ASHA stopped the trials that could not learn; the others ran to the end.
    statuses = [r["status"] for r in rows.values()]
    assert set(statuses) <= {"finished", "stopped"} and "stopped" in statuses
    for r in rows.values():
        run = sweep / "trials" / r["trial"]
        assert (r["stopped_early"] == "True") == (r["status"] == "stopped")
        # Finished: reported at its last step. Stopped: no final report, the scheduler's decision
        # on record (its workers may have logged a little past the decision before going down).
        evals = [h["step"] for h in _history(run) if "val/mIoU" in h]
        assert (run / "summary.json").exists() == (r["status"] == "finished"), r
        if r["status"] == "finished":
            assert evals[-1] == STEPS and int(r["steps"]) == STEPS and int(r["eval_rounds"]) == 2
        else:
            assert (run / "stopped_early.json").exists() and EVAL_EVERY in evals, r
    good = [float(r["best_mIoU"]) for r in rows.values() if float(r["optim.lr"]) > 1e-6]
    bad = [float(r["best_mIoU"]) for r in rows.values() if float(r["optim.lr"]) < 1e-6]
    assert good and bad and min(good) > max(bad)

    # 5. The results folder is complete.
    for name in ("sweep.yaml", "trials.csv", "trials.md", "report.html", "best.yaml",
                 "miou_by_optim_lr.png", "miou_by_mask_ratio.png", "best_so_far.png"):
        assert (sweep / name).is_file(), name
    for png in sweep.glob("*.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert len((sweep / "trials.md").read_text().splitlines()) == 2 + 4
    html = (sweep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and html.count("<tr") == 1 + 4
    for trial in runs:  # TensorBoard event files, one folder per trial
        assert list((sweep / "tune" / trial).glob("events.out.tfevents.*")), trial
    best = max((r for r in rows.values() if r["status"] == "finished"),
               key=lambda r: float(r["best_mIoU"]))
    assert f"best trial {best['trial']}: validation mIoU" in out
    preset = yaml.safe_load((sweep / "best.yaml").read_text())
    assert preset["method"] == "masksup" and preset["optim"]["lr"] == float(best["optim.lr"])
    assert preset["knobs"]["mask_ratio"] == pytest.approx(float(best["mask_ratio"]), rel=1e-3)

    # 6. best.yaml re-runs as a preset of jobs/train.py.
    run_job("train.py", "--method", "masksup", "--preset-file", str(sweep / "best.yaml"),
            "--steps", "2", "--eval-every", "2", "--name", "rerun",
            "--storage", str(tmp_path / "again"), env=sweep_env)
    rerun = tmp_path / "again" / "rerun"
    assert json.loads((rerun / "summary.json").read_text())["steps"] == 2
    cfg = yaml.safe_load((rerun / "config.yaml").read_text())
    assert cfg["knobs"] == preset["knobs"] and cfg["optim"] == preset["optim"]
    assert cfg["preset"] == "sw-best"
