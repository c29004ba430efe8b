"""What a run folder allows on resume, and what keeps a run's work safe: no checkpoint under a
name already stored, no step below the newest checkpoint, no silently ignored change to a
finished run, fresh crops after a resume, the best checkpoint named and kept, no temporary copies
left by a failed save."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import job_env, run_job

from segray import launch, report
from segray.checkpoint import checkpoint_name, latest_step, write_local

SHORT = ["--method", "supervised", "--set", "model.decoder_channels=16",
         "--set", "train.log_every=5", "--batch-size", "4"]


def _run_folder(tmp_path: Path, steps: int = 20) -> tuple[Path, object]:
    """A run folder with config.yaml and a complete checkpoint at step ``steps``."""
    from segray.cli import UsageParser, add_run_args, build_config
    from segray.config import to_dict, to_yaml

    parser = UsageParser(prog="test")
    add_run_args(parser, method_default="supervised")
    cfg = build_config(parser.parse_args(["--steps", str(steps), "--name", "r",
                                          "--storage", str(tmp_path / "runs")]))
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    folder = write_local({"step": steps}, {"config": to_dict(cfg), "step": steps})
    Path(folder).rename(run / checkpoint_name(steps))
    return run, cfg


def test_resume_may_not_go_below_the_newest_checkpoint(tmp_path):
    run, cfg = _run_folder(tmp_path, steps=20)
    assert latest_step(str(run)) == 20 and latest_step(str(tmp_path / "none")) == 0
    cfg.train.steps = 10
    with pytest.raises(launch.UsageError, match="has a checkpoint at step 20: train.steps 10 "
                                                "may not go below it"):
        launch.check_resume(cfg, str(run))
    cfg.train.steps = 20  # the final checkpoint without its summary: finish the report
    assert launch.check_resume(cfg, str(run)) == []


def test_resuming_says_when_the_learning_rate_jumps(tmp_path, capsys):
    run, cfg = _run_folder(tmp_path, steps=20)  # poly over 20 steps: decayed to 0 at step 20
    cfg.train.eval_every = 5
    assert launch.check_resume(cfg, str(run)) == ["train.eval_every"]
    assert "learning rate" not in capsys.readouterr().err
    cfg.train.steps = 40
    launch.check_resume(cfg, str(run))
    now = cfg.optim.lr * 0.5 ** cfg.optim.poly_power
    assert (f"note: the learning rate at step 20, where the run resumes, goes from 0 to "
            f"{now:.3g} (the poly schedule now spans 40 steps, not 20)") in capsys.readouterr().err
    cfg.train.steps, cfg.optim.min_lr = 20, cfg.optim.lr / 10
    launch.check_resume(cfg, str(run))
    assert "goes from 0 to 0.0002 (its optim settings changed)" in capsys.readouterr().err


def test_a_finished_run_is_extended_or_left_alone(tmp_path):
    run, cfg = _run_folder(tmp_path, steps=20)
    (run / report.SUMMARY_FILE).write_text(json.dumps({"steps": 20}))
    assert report.finished(str(run), 20) and not report.finished(str(run), 40)
    assert launch.check_resume(cfg, str(run)) == []  # the same command: its summary again
    cfg.seed = 7
    with pytest.raises(launch.UsageError, match=r"has finished, and re-running it with changed "
                                                r"settings \(seed\) would only return"):
        launch.check_resume(cfg, str(run))
    cfg.train.steps = 40  # extending it is allowed, with the other change
    assert launch.check_resume(cfg, str(run)) == ["seed", "train.steps"]


def test_default_names_differ_within_a_second_and_resumes_draw_new_crops():
    from segray.config import Config

    cfg = Config(method="supervised", preset="demo")
    names = {launch.default_name(cfg) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith("supervised-demo-") for n in names)
    assert launch.data_seed(3, 0) == 3  # a fresh run: the configured seed
    assert launch.data_seed(3, 200) == launch.data_seed(3, 200)  # reproducible...
    assert len({launch.data_seed(3, s) for s in (0, 200, 400)}) == 3  # ...and new per resume


def test_a_failed_save_leaves_no_temporary_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_local({"step": 1}, {"step": 1})
    assert not list(tmp_path.glob("segray-ckpt-*"))


def test_summary_names_the_best_evaluation():
    history = [{"step": 10, "val/mIoU": 30.0}, {"step": 15, "train/loss": 1.0},
               {"step": 20, "val/mIoU": 45.5}, {"step": 30, "val/mIoU": 40.0},
               {"step": 30, "event": "resumed"}]
    assert report._best(history, "s3://b/runs/r") == {
        "step": 20, "mIoU": 45.5, "checkpoint": "s3://b/runs/r/step_0000020"}
    assert report._best([{"step": 5, "val/mIoU": float("nan")}], "/r") is None


@pytest.mark.cluster
def test_resume_at_the_final_checkpoint_finishes_the_report(tmp_path, small_dataset):
    """The driver died after the final checkpoint was stored, before summary.json: the re-run
    evaluates and writes the summary without storing that checkpoint again (Ray would register
    a second entry for the same folder and later prune it from under the first), and the run
    can be extended after that. Pruning keeps the best evaluation's checkpoint."""
    env = job_env(tmp_path)
    base = [*SHORT, "--data", small_dataset, "--eval-every", "4", "--name", "f",
            "--storage", str(tmp_path / "runs"), "--set", "train.keep_checkpoints=1"]
    args = [*base, "--steps", "12"]
    run_job("train.py", *args, env=env)
    run = tmp_path / "runs" / "f"
    first = json.loads((run / "summary.json").read_text())
    best = first["best"]
    assert best["mIoU"] == max(h["val/mIoU"] for h in _history(run) if "val/mIoU" in h)
    assert Path(best["checkpoint"], "state.pt").is_file()  # kept by pruning, best or latest
    stored = (run / "step_0000012" / "state.pt").stat().st_mtime_ns
    (run / "summary.json").unlink()
    out = run_job("train.py", *args, env=env).stdout
    assert "resumed from step_0000012" in out and "validation mIoU" in out
    assert (run / "step_0000012" / "state.pt").stat().st_mtime_ns == stored  # not written again
    again = json.loads((run / "summary.json").read_text())
    assert again["steps"] == 12 and again["val"]["mIoU"] == pytest.approx(first["val"]["mIoU"])
    assert [h["step"] for h in _history(run) if "val/mIoU" in h] == [4, 8, 12]  # no duplicate
    # Extending it afterwards resumes from Ray's record of the checkpoints, which is intact.
    out = run_job("train.py", *base, "--steps", "16", env=env).stdout
    assert "resumed from step_0000012" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 16
    assert os.path.isdir(run / "step_0000016")


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cluster
def test_weights_gone_nan_are_never_checkpointed(tmp_path, small_dataset):
    """A learning rate that blows the weights up between log steps: the evaluation step refuses
    to store them, so the run's latest checkpoint stays one to resume from."""
    env = job_env(tmp_path)
    proc = run_job("train.py", "--method", "supervised", "--set", "model.decoder_channels=16",
                   "--batch-size", "4", "--set", "train.log_every=100", "--data", small_dataset,
                   "--steps", "8", "--eval-every", "4", "--name", "nan",
                   "--storage", str(tmp_path / "runs"), "--set", "optim.lr=1e30",
                   "--set", "train.max_failures=0", env=env, check=False, timeout=300)
    assert proc.returncode == 1
    assert ("error: run nan diverged and stopped without retrying: the model's weights became "
            "NaN or infinite by step 4") in proc.stdout, proc.stdout[-3000:]
    assert not list((tmp_path / "runs" / "nan").glob("step_*"))
    assert json.loads((tmp_path / "runs" / "nan" / report.DIVERGED_FILE).read_text())["step"] == 4
