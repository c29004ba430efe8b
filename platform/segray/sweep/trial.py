"""What runs inside one trial: resolve its config, then build and fit its Ray Train run.

In Ray 2.60 a Trainer is not a Tune trainable. A trial therefore runs :func:`run_trial`, a Tune
function holding a sliver of CPU, which resolves the trial's config (the sweep's base config with
the sampled knobs applied and re-validated) and fits a ``TorchTrainer`` built by
:func:`segray.launch.build_trainer`, whose workers take their own resources. Every evaluation
round's ``ray.train.report`` reaches Tune through :class:`EvalRoundReport`, which adds the round
number early stopping counts.

A trial's Train run is named after the trial and lives in ``<sweep>/trials/<trial>``, so a trial
resumed by ``Tuner.restore`` resumes its Train run from the latest checkpoint.

A trial whose run stops on a bad row (see :mod:`segray.worker`) records the row for the whole sweep
(``<sweep>/data_error.json``): every trial would read it, so the trials that start after it fail at
once, the trials running beside it fail at their next poll (within a second), and the driver
reports the row when Tune is done (:func:`segray.sweep.runner.run_sweep`). Those trials end in
error, not stopped, so ``--resume`` runs them again from their latest checkpoints.

A trial whose training diverges (the loss or weights became NaN or infinite; its Train run stops
without retrying, see :mod:`segray.worker`) has found a bad point of the space, not a failure to
retry: it ends as ``diverged`` with a last result of ``val/mIoU = 0`` (the worst score), so Optuna
learns to avoid that region (TPE ignores failed trials) and ``--resume`` does not train it again.
Its table row keeps the evaluations it made before diverging.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from segray import report, storage
from segray.checkpoint import latest_step
from segray.config import to_yaml
from segray.launch import build_trainer
from segray.sweep.space import trial_config
from segray.sweep.spec import METRIC, ROUND_KEY, STOPPED_FILE, SweepSpec, eval_round


class EvalRoundReport(TuneReportCallback):
    """Forwards each ``ray.train.report`` to Tune, adding the evaluation round (``eval_round``).

    Tune's ``training_iteration`` restarts at 1 when a trial is resumed (Tune holds no checkpoint
    of its own; the Train run does), while the round derived from the reported step continues
    where the run left off. Early stopping counts this round.
    """

    def __init__(self, eval_every: int) -> None:
        super().__init__()
        self.eval_every = eval_every

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        first = dict(metrics[0])
        first[ROUND_KEY] = eval_round(int(first.get("step", 0)), self.eval_every)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(config: dict[str, Any], spec: SweepSpec, info: Any) -> None:
    """Body of one trial: resolve its config, then build and fit its ``TorchTrainer``.

    Args:
        config: the sampled point, knob -> value.
        spec: the sweep.
        info: the dataset (opened once by the driver).

    Raises:
        ConfigError: the sampled values make an invalid config (the trial errors).
        ray.train.TrainingFailedError: the Train run failed past ``train.max_failures``.
        BadSampleError: a trial of this sweep met a bad row; this one does not start.
        DatasetError: a trial of this sweep met a shard that differs from its manifest.
    """
    import ray.data

    from methods import get_method

    ray.data.DataContext.get_current().enable_progress_bars = False
    name = tune.get_context().get_trial_name()
    run_uri = spec.run_uri(name)
    evals = [h for h in report.read_history(run_uri) if h.get(METRIC) is not None]
    stopped = storage.exists(storage.join(run_uri, STOPPED_FILE))
    if stopped or storage.exists(storage.join(run_uri, report.SUMMARY_FILE)):
        # A resumed sweep met a trial that had ended before the driver went down (stopped by the
        # scheduler, or trained to its last evaluation and reported): it must not train again.
        # Tune still needs a result from this session, so its last evaluation is reported once
        # more. A trial that went down between its last evaluation and its report resumes below
        # from its latest checkpoint, which finishes the report.
        why = "was stopped early by the scheduler" if stopped else "has finished training"
        print(f"[segray] {name} {why}; not resuming it")
        if not evals:
            raise RuntimeError(f"{name} {why} but {run_uri} holds no evaluation to report")
        tune.report(last_result(evals[-1], spec.eval_every))
        return
    diverged = report.read_divergence(run_uri)
    if diverged is not None:  # the driver went down before Tune had its result
        _report_divergence(name, diverged, spec.eval_every)
        return
    recorded = report.read_data_error(spec.root)
    if recorded is not None:
        raise recorded
    cfg = trial_config(spec.base, config, get_method(spec.method).Knobs, spec.method,
                       source=f"trial {name}")
    cfg.name, cfg.storage = name, spec.trials_root
    storage.makedirs(run_uri)
    storage.write_text(storage.join(run_uri, report.CONFIG_FILE), to_yaml(cfg))
    report.clear_data_error(run_uri)  # a resumed sweep may read fixed data
    trainer = build_trainer(cfg, info, spec.trials_root,
                            callbacks=[EvalRoundReport(spec.eval_every)],
                            resume_step=latest_step(run_uri))  # new crops for a resumed trial
    try:
        _fit_until_stopped(trainer, name, storage.join(run_uri, STOPPED_FILE), spec.root)
    except Exception:
        recorded = report.read_data_error(run_uri)
        if recorded is not None:  # the row is in every trial's data
            report.write_data_error(spec.root, recorded)
        diverged = report.read_divergence(run_uri)
        if recorded is not None or diverged is None:
            raise
        _report_divergence(name, diverged, spec.eval_every)


DIVERGED_KEY = "diverged"  # in a diverged trial's last result (1), beside val/mIoU = 0


def _report_divergence(name: str, diverged: dict[str, Any], eval_every: int) -> None:
    """End a diverged trial with the worst score, which the searcher learns from."""
    print(f"[segray] {name} diverged; it ends with val/mIoU 0 and is not resumed: "
          f"{diverged['message']}")
    step = int(diverged["step"])
    tune.report({METRIC: 0.0, DIVERGED_KEY: 1, "step": step,
                 ROUND_KEY: eval_round(step, eval_every)})


def last_result(entry: dict[str, Any], eval_every: int) -> dict[str, Any]:
    """What Tune received for an evaluation entry of a run's history."""
    out = {k: v for k, v in entry.items() if k == "step" or k.startswith("val/")}
    out[ROUND_KEY] = eval_round(int(entry["step"]), eval_every)
    return out


def _fit_until_stopped(trainer: Any, name: str, marker: str, sweep_root: str,
                       poll_s: float = 1.0) -> None:
    """``trainer.fit()``, given up as soon as the scheduler's stop marker appears, or another
    trial of the sweep records a bad row.

    Tune delivers a stop to a function trainable only after its next result, which would train a
    stopped trial through one more evaluation round. Returning here ends the trial at once; its
    Train controller and workers go down with the trial's actor. A bad row recorded under
    ``sweep_root`` is in this trial's data too: it is raised here, so the trial errors (and
    ``--resume`` re-runs it) instead of training until it reaches the row itself.

    Raises:
        BadSampleError: a bad row was recorded for the sweep while this trial trained.
    """
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's thread below
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="segray-trial-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        if not thread.is_alive():
            break
        if storage.exists(marker):
            print(f"[segray] {name} stopped early by the scheduler")
            return
        recorded = report.read_data_error(sweep_root)
        if recorded is not None:
            print(f"[segray] {name} stops: a trial of this sweep met bad data")
            raise recorded
    if "error" in outcome:
        raise outcome["error"]


def trial_name(trial: Any) -> str:
    """``trial_<number>_<id>``: start order first, then Tune's random id (unique across resumes)."""
    m = re.match(r"(\d+)", getattr(trial, "experiment_tag", "") or "")
    number = int(m.group(1)) if m else 0
    return f"trial_{number:03d}_{trial.trial_id}"
