"""End-to-end runs of jobs/train.py and jobs/evaluate.py on a local Ray instance (real Ray Train,
real Ray Data), including recovery from a killed worker and resume after an interrupted driver."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, job_env, run_job

from segray.checkpoint import load_state

SHORT = ["--method", "supervised", "--set", "model.decoder_channels=32", "--set", "train.log_every=5"]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize(("args", "expected"), [
    (["--method", "semsk"], "unknown method 'semsk'; did you mean 'semask'?"),
    (["--method", "supervised", "--preset", "dmeo"], "did you mean 'demo'?"),
    (["--method", "supervised", "--set", "optim.lrr=0.1"], "unknown key 'optim.lrr'; did you mean 'lr'?"),
    (["--method", "supervised", "--set", "train.steps=many"], "train.steps: expected an integer"),
    (["--method", "supervised", "--steps", "ten"], "invalid int value: 'ten'"),
    (["--method", "supervised", "--data", "/nonexistent/data"], "no dataset manifest at /nonexistent/data/dataset.json"),
])
def test_usage_errors_exit_2_without_traceback(tmp_path, args, expected):
    proc = run_job("train.py", *args, env=job_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert expected in proc.stdout
    assert "Traceback" not in proc.stdout


def test_help_everywhere(tmp_path):
    for script in ("train.py", "evaluate.py", "prepare_data.py", "benchmark.py"):
        proc = run_job(script, "--help", env=job_env(tmp_path), timeout=120)
        assert "usage:" in proc.stdout


@pytest.mark.cluster
def test_train_then_evaluate(tmp_path, small_dataset):
    import hashlib

    import timm

    env = job_env(tmp_path)
    weights = tmp_path / "resnet18.pt"  # a classifier's state dict, as users download them
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    proc = run_job("train.py", *SHORT, "--data", small_dataset, "--steps", "20", "--eval-every", "10",
                   "--name", "short", "--storage", str(tmp_path / "runs"),
                   "--set", f"model.pretrained={weights}", env=env)
    out = proc.stdout
    assert "validation mIoU:" in out and "majority-class baseline" in out
    run = tmp_path / "runs" / "short"
    assert f"run folder: {run}" in out
    assert "step 20/20" in out  # progress lines
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "predictions.png", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    provenance = json.loads((run / "weights.json").read_text())
    assert provenance["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert provenance["loaded"] > 0 and any(k.startswith("fc.") for k in provenance["unexpected"])
    summary = _summary(run)
    assert summary["steps"] == 20 and summary["checkpoint"].endswith("step_0000020")
    assert 0 <= summary["val"]["mIoU"] <= 100 and summary["cost"]["images_per_s"] > 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val/mIoU" in h] == [10, 20]
    assert all(0 <= h["train/data_wait_share"] <= 1 for h in history if "train/loss" in h)
    state = torch.load(run / "step_0000020" / "state.pt", weights_only=True)
    assert state["step"] == 20
    # keep_checkpoints: 2 → both evaluation checkpoints are kept, nothing half-written is visible
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000010", "step_0000020"]
    assert not list(run.rglob("*.tmp"))

    ev = run_job("evaluate.py", "--checkpoint", str(run / "step_0000020"), "--out",
                 str(tmp_path / "eval"), env=env)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 16
    # Evaluation in-process agrees with the evaluation done by the Ray workers at the same step.
    assert metrics["metrics"]["mIoU"] == pytest.approx(summary["val"]["mIoU"], abs=1e-6)
    assert (tmp_path / "eval" / "overlays.png").is_file()
    assert '"mIoU"' in ev.stdout
    # Again into the same folder, capped and with no overlays: the old overlays go with the old
    # metrics, so nothing in the folder describes another evaluation.
    run_job("evaluate.py", "--checkpoint", str(run / "step_0000020"), "--out",
            str(tmp_path / "eval"), "--max-images", "5", "--images", "0", "--no-tta", env=env)
    capped = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert capped["images"] == 5 and capped["eval"]["tta"] is False
    assert not (tmp_path / "eval" / "overlays.png").exists()
    bad = run_job("evaluate.py", "--checkpoint", str(run / "step_0000020"), "--images", "-1",
                  env=env, check=False)
    assert bad.returncode == 2 and "--images must be >= 0" in bad.stdout
    tta = run_job("evaluate.py", "--checkpoint", str(run / "step_0000020"), "--tta", "--out",
                  str(tmp_path / "eval_tta"), env=env)
    assert json.loads((tmp_path / "eval_tta" / "metrics.json").read_text())["eval"]["tta"] is True
    assert tta.returncode == 0
    # A checkpoint trained with eval.tta on: it is the default, and --no-tta turns it off (the
    # plain numbers come back).
    tta_ckpt = tmp_path / "tta_ckpt"
    shutil.copytree(run / "step_0000020", tta_ckpt)
    meta = json.loads((tta_ckpt / "meta.json").read_text())
    meta["config"]["eval"]["tta"] = True
    (tta_ckpt / "meta.json").write_text(json.dumps(meta))
    for flags, want in (([], True), (["--no-tta"], False)):
        run_job("evaluate.py", "--checkpoint", str(tta_ckpt), *flags, "--images", "0", "--out",
                str(tmp_path / "eval_flags"), env=env)
        result = json.loads((tmp_path / "eval_flags" / "metrics.json").read_text())
        assert result["eval"]["tta"] is want, flags
    assert result["metrics"]["mIoU"] == pytest.approx(metrics["metrics"]["mIoU"], abs=1e-6)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"job ended early:\n{proc.stdout.read()[-5000:]}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("timed out waiting for the job")


def _registered(run: Path, step: int) -> bool:
    """Whether Ray Train has registered the checkpoint of ``step`` (not merely started writing it)."""
    snap = run / "checkpoint_manager_snapshot.json"
    return snap.exists() and f'"step_{step:07d}"' in snap.read_text()


def _popen(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.cluster
def test_interrupted_run_resumes_with_the_same_name(tmp_path, small_dataset):
    env = job_env(tmp_path)
    args = [*SHORT, "--data", small_dataset, "--steps", "40", "--eval-every", "10", "--name", "again",
            "--storage", str(tmp_path / "runs")]
    run = tmp_path / "runs" / "again"
    proc = _popen(args, env)
    _wait_for(lambda: _registered(run, 20), 300, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert not (run / "summary.json").exists()
    out = run_job("train.py", *args, env=env).stdout
    assert "resuming run again" in out and "resumed from step_00000" in out
    summary = _summary(run)
    assert summary["steps"] == 40 and summary["cost"]["resumes"] == 1
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed_at = next(h["step"] for h in history if h.get("event") == "resumed")
    assert resumed_at >= 20  # restarted from a checkpoint, not from scratch
    steps = [h["step"] for h in history if "train/loss" in h]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no step logged twice


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line]


@pytest.mark.cluster
def test_killed_worker_recovers_from_last_checkpoint(tmp_path, small_dataset):
    env = job_env(tmp_path)
    args = [*SHORT, "--data", small_dataset, "--steps", "60", "--eval-every", "10", "--workers", "2",
            "--name", "faulty", "--storage", str(tmp_path / "runs")]
    run = tmp_path / "runs" / "faulty"
    proc = _popen(args, env)
    _wait_for(lambda: _registered(run, 10) and len(_train_worker_pids()) == 2, 300, proc)
    victim = _train_worker_pids()[-1]
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    assert "Connection reset by peer" in out or "died" in out  # the failure was seen...
    summary = _summary(run)
    assert summary["steps"] == 60 and summary["cost"]["resumes"] >= 1  # ...and recovered from
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert next(h["step"] for h in history if h.get("event") == "resumed") >= 10
    state = load_state(str(run / "step_0000060"))
    assert state["step"] == 60


@pytest.mark.cluster
def test_teacher_student_method_trains_through_ray(tmp_path, small_dataset):
    """A test-only EMA teacher-student method: the unlabelled stream reaches it through Ray Data."""
    env = job_env(tmp_path)
    run_job("train.py", "--method", "ema_method:EMATeacher", "--preset-file",
            str(ROOT / "methods" / "presets" / "supervised" / "demo.yaml"), "--data", small_dataset,
            "--steps", "8", "--eval-every", "8", "--set", "model.decoder_channels=16", "--name", "ts",
            "--storage", str(tmp_path / "runs"), env=env)
    state = torch.load(tmp_path / "runs" / "ts" / "step_0000008" / "state.pt", weights_only=True)
    assert int(state["model"]["ema_updates"]) == 8
    history = [json.loads(x) for x in (tmp_path / "runs" / "ts" / "metrics.jsonl").read_text().split("\n") if x]
    assert any("train/loss_unsup" in h for h in history)


@pytest.mark.cluster
def test_quick_start_learns(tmp_path):
    """The README's main command, exactly as a new user runs it: no arguments at all."""
    out = run_job("train.py", env=job_env(tmp_path), timeout=900).stdout
    line = next(x for x in out.splitlines() if x.startswith("validation mIoU:"))
    miou = float(line.split()[2])
    majority = float(line.split("baseline:")[1].split(")")[0])
    assert miou > majority + 25, line  # real learning, far above predicting the majority class
    run = Path(out.split("run folder: ")[1].split()[0])
    assert run.parent == tmp_path / "runs" and run.name.startswith("semask-demo-")
    summary = _summary(run)
    assert summary["method"] == "semask" and summary["steps"] == 600
    assert (tmp_path / "cache" / "synthetic-v1" / "dataset.json").is_file()  # generated on first use


@pytest.mark.cluster
def test_masksup_trains_through_the_job(tmp_path, small_dataset):
    run_job("train.py", "--method", "masksup", "--data", small_dataset, "--steps", "6",
            "--eval-every", "6", "--name", "ms", "--storage", str(tmp_path / "runs"),
            env=job_env(tmp_path))
    summary = _summary(tmp_path / "runs" / "ms")
    # the paper's per-image metric is reported beside the standard mIoU, under its own name
    assert "paper_micro_jaccard_mean_per_image" in summary["val"] and "mIoU" in summary["val"]
    history = [json.loads(x) for x in (tmp_path / "runs" / "ms" / "metrics.jsonl").read_text().split("\n") if x]
    assert any("train/loss_masked" in h and "train/loss_consistency" in h for h in history)
