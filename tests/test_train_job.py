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
import yaml
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
    # Without --out the results go beside the run's checkpoints (Ray prunes those whole).
    capped_run = run_job("evaluate.py", "--checkpoint", str(run / "step_0000020") + "/",
                         "--max-images", "5", "--images", "0", "--no-tta", env=env)
    assert f"results: {run / 'eval' / 'step_0000020-val'}" in capped_run.stdout
    capped = json.loads((run / "eval" / "step_0000020-val" / "metrics.json").read_text())
    assert capped["images"] == 5 and capped["eval"]["tta"] is False
    assert not (run / "eval" / "step_0000020-val" / "overlays.png").exists()
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


def test_impossible_values_fail_before_ray_starts(tmp_path):
    """Values that used to pass validation and then gave NaN results or failed inside Ray."""
    proc = run_job("train.py", "--method", "supervised", "--set", "train.eval_max_images=-1",
                   "--set", "train.keep_checkpoints=-1", "--set", "train.precision=fp16",
                   "--set", "eval.tta=true", "--set", "eval.ratios=[]",
                   "--set", "data.shuffle_buffer=-1", "--storage", str(tmp_path / "runs"),
                   env=job_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    for text in ("5 problem(s)", "train.eval_max_images: must be >= 0",
                 "train.keep_checkpoints: must be >= 0", "'fp16' needs a CUDA device",
                 "eval.tta needs at least one ratio", "data.shuffle_buffer: must be >= 0",
                 "(from --set train.eval_max_images=-1)"):
        assert text in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout and "Ray" not in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_scientific_notation_and_a_non_utf8_preset_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# r\xe9glages\noptim:\n  lr: 2e-4\n".encode("latin-1"))
    proc = run_job("train.py", "--method", "supervised", "--preset-file", str(bad),
                   env=job_env(tmp_path), check=False, timeout=120)
    assert proc.returncode == 2 and f"{bad}: not UTF-8 text" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout
    # The README's example value is a number; the run then stops at the (missing) dataset.
    proc = run_job("train.py", "--method", "supervised", "--set", "optim.lr=2e-4",
                   "--data", str(tmp_path / "none"), env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2 and "no dataset manifest" in proc.stdout, proc.stdout
    assert "expected a number" not in proc.stdout


def _saved_run(tmp_path: Path, *flags: str) -> Path:
    """A run folder as a first attempt leaves it: config.yaml written, no checkpoint yet."""
    from segray.cli import UsageParser, add_run_args, build_config
    from segray.config import to_yaml

    parser = UsageParser(prog="test")
    add_run_args(parser, method_default="supervised")
    cfg = build_config(parser.parse_args([*flags, "--name", "r1", "--storage",
                                          str(tmp_path / "runs")]))
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def test_resuming_with_another_model_is_refused_before_ray(tmp_path):
    run = _saved_run(tmp_path, "--set", "model.decoder_channels=32")
    before = (run / "config.yaml").read_text()
    proc = run_job("train.py", "--method", "supervised", "--set", "model.decoder_channels=64",
                   "--set", "model.encoder=resnet34", "--steps", "50", "--name", "r1",
                   "--storage", str(tmp_path / "runs"), env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert f"run folder {run} holds a run whose checkpoints do not fit this config" in proc.stdout
    assert "model.decoder_channels: 32 -> 64" in proc.stdout
    assert "model.encoder: 'resnet18' -> 'resnet34'" in proc.stdout
    assert "train.steps" not in proc.stdout  # allowed changes are not part of the error
    assert "Traceback" not in proc.stdout and "Started a local Ray" not in proc.stdout
    assert (run / "config.yaml").read_text() == before  # the original is never overwritten
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_check_resume_sorts_allowed_from_refused_changes(tmp_path):
    import dataclasses

    from methods import get_method
    from segray import launch
    from segray.checkpoint import checkpoint_name, write_local
    from segray.config import resolve, to_dict

    knobs = get_method("supervised").Knobs
    run = _saved_run(tmp_path)
    raw = {k: v for k, v in launch.saved_config(str(run)).items() if k != "method"}
    cfg = resolve({**raw, "train": {**raw["train"], "steps": 999, "eval_every": 7}}, knobs,
                  "supervised")
    assert launch.check_resume(cfg, str(run)) == ["train.eval_every", "train.steps"]
    assert launch.check_resume(cfg, str(tmp_path / "runs" / "new")) is None
    refused = [
        dataclasses.replace(cfg, method="semask"),
        resolve({**raw, "optim": {**raw["optim"], "name": "sgd"}}, knobs, "supervised"),
        resolve({**raw, "model": {**raw["model"], "encoder_kwargs": {"output_stride": 8}}},
                knobs, "supervised"),
    ]
    for other, key in zip(refused, ("method", "optim.name", "model.encoder_kwargs")):
        with pytest.raises(launch.UsageError, match=key) as info:
            launch.check_resume(other, str(run))
        assert f"run folder {run} " in str(info.value)
    # A setting segray gained after the run started is missing from its config.yaml: at its
    # default it is no change (not even a knob); set otherwise it is one.
    import yaml

    older = yaml.safe_load((run / "config.yaml").read_text())
    del older["data"]["mask_resample"], older["knobs"]["label_smoothing"]
    (run / "config.yaml").write_text(yaml.safe_dump(older))
    assert launch.check_resume(resolve(raw, knobs, "supervised"), str(run)) == []
    newer = resolve({**raw, "data": {**raw["data"], "mask_resample": "cv2_nearest"}}, knobs,
                    "supervised")
    assert launch.check_resume(newer, str(run)) == ["data.mask_resample"]
    with pytest.raises(launch.UsageError, match="knobs.label_smoothing"):
        launch.check_resume(resolve({**raw, "knobs": {"label_smoothing": 0.1}}, knobs,
                                    "supervised"), str(run))
    # A run folder with checkpoints but no config.yaml: the newest checkpoint's config counts.
    (run / "config.yaml").unlink()
    folder = write_local({"step": 3}, {"config": to_dict(cfg), "step": 3})
    Path(folder).rename(run / checkpoint_name(3))
    assert launch.check_resume(cfg, str(run)) == []
    with pytest.raises(launch.UsageError, match="optim.name"):
        launch.check_resume(refused[1], str(run))
    assert launch.backup_config(str(run)) is None


def test_an_allowed_change_on_resume_keeps_the_previous_config(tmp_path, small_dataset,
                                                              monkeypatch, capsys):
    """Everything run_training does before Ray starts, with Ray replaced by a stop."""
    from segray import launch

    class Stop(Exception):
        pass

    def stop(num_cpus):
        raise Stop

    monkeypatch.chdir(Path(small_dataset).parent)  # --data relative to the working folder
    run = _saved_run(tmp_path, "--data", Path(small_dataset).name, "--steps", "20")
    before = (run / "config.yaml").read_text()
    monkeypatch.setattr(launch, "init_ray", stop)
    from segray.cli import UsageParser, add_run_args, build_config

    parser = UsageParser(prog="test")
    add_run_args(parser, method_default="supervised")
    cfg = build_config(parser.parse_args(["--data", Path(small_dataset).name, "--steps", "40",
                                          "--name", "r1", "--storage", str(tmp_path / "runs")]))
    with pytest.raises(Stop):
        launch.run_training(cfg, quiet=True)
    note = capsys.readouterr().err
    assert "resuming r1 with changed settings: train.steps (the previous config.yaml is kept as " \
        "config." in note
    kept = [p for p in run.iterdir() if p.name.startswith("config.") and p.name != "config.yaml"]
    assert len(kept) == 1 and kept[0].read_text() == before
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 40
    assert saved["data"]["uri"] == small_dataset  # absolute, whatever folder evaluate.py runs in


def test_evaluate_flag_and_checkpoint_errors_exit_2(tmp_path):
    from segray.checkpoint import write_local

    env = job_env(tmp_path)
    for flags, expected in (
        (["--mode", "slide", "--crop", "0", "0", "--stride", "0", "0"],
         "argument --crop: expected an integer >= 1, got 0"),
        (["--test-scale", "0", "5"], "argument --test-scale: expected an integer >= 1, got 0"),
    ):
        proc = run_job("evaluate.py", "--checkpoint", str(tmp_path), *flags, env=env,
                       check=False, timeout=120)
        assert proc.returncode == 2 and expected in proc.stdout, proc.stdout
        assert "Traceback" not in proc.stdout
    ckpt = tmp_path / "step_0000001"
    Path(write_local({"model": {}}, {"method": "supervised"})).rename(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(meta)[:-5])  # cut short
    proc = run_job("evaluate.py", "--checkpoint", str(ckpt), env=env, check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert f"checkpoint file {ckpt / 'meta.json'} is corrupt" in proc.stdout
    assert "Traceback" not in proc.stdout
