"""The sweep driver: Ray Tune with Optuna (TPE) and ASHA over trials of :mod:`segray.sweep.trial`.

Each trial is a Tune function that builds and fits a Ray Train ``TorchTrainer``; its workers take
resources outside Tune's accounting, so ``max_concurrent_trials`` is derived from what one trial's
workers take and what the cluster holds. Early stopping counts evaluation rounds and survives a
resume; the results folder and the Prometheus gauges follow the trials as they end.

Example:
    >>> outcome = run_sweep(spec, metrics_port=9465)
    >>> outcome.best.trial, outcome.best.best_miou, outcome.files["best.yaml"]
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from segray import launch, report, storage
from segray.launch import UsageError, resolve_data, stream_datasets, take_lease
from segray.sweep import exporter, results

# SweepASHA is imported here too: sweeps pickled before the schedulers moved name it here.
from segray.sweep.schedulers import SweepASHA, SweepFIFO, record_stop
from segray.sweep.space import trial_config
from segray.sweep.spec import (
    METRIC,
    TRIAL_CPUS,
    SweepSpec,
    TrialNeed,
    concurrency,
    local_cpus,
    running,
    set_running,
    trial_need,
)
from segray.sweep.trial import run_trial, trial_name


def describe(trials: list[Any], overrides: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Plain descriptions of Tune trials for :func:`segray.sweep.results.trial_rows`."""
    overrides = overrides or {}
    return [{"name": str(t), "status": overrides.get(t.trial_id, t.status),
             "config": dict(t.config), "last": dict(t.last_result or {})} for t in trials]


class SweepProgress(tune.Callback):
    """Keeps the results folder and the Prometheus gauges current while the sweep runs.

    Holds only the (picklable) spec: Tune stores its callbacks in the experiment state, and a
    resumed sweep gets this object back from there.
    """

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self._shown = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, spec=running(state["spec"]))  # where the sweep is now

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # First loop step: a resumed sweep's report and gauges show the restored trials at once.
        if not self._shown and trials:
            self._shown = True
            self.refresh(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._gauges(trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        if result.get("done"):  # the scheduler decided to stop this trial
            record_stop(self.spec, str(trial), result)
        self._gauges(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.refresh(trials, {trial.trial_id: "TERMINATED"})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.refresh(trials, {trial.trial_id: "ERROR"})

    def refresh(self, trials: list, overrides: dict[str, str] | None = None) -> None:
        """Rewrite the results folder and set the gauges from the trials' current state."""
        try:
            rows = results.trial_rows(self.spec, describe(trials, overrides))
            results.write_results(self.spec, rows)
            publish(self.spec.name, rows)
        except Exception as e:  # noqa: BLE001 - a report problem must not stop the sweep
            print(f"[segray] could not refresh the sweep report: {e}", file=sys.stderr)

    def _gauges(self, trials: list) -> None:
        metrics = exporter.active(self.spec.name)
        if metrics is not None:
            latest = {str(t): float(t.last_result[METRIC]) for t in trials
                      if (t.last_result or {}).get(METRIC) is not None}
            metrics.observe(running=sum(t.status == "RUNNING" for t in trials), latest=latest)


def publish(sweep: str, rows: list[results.TrialRow]) -> None:
    """Set the sweep's gauges from the table rows (when an exporter is active)."""
    metrics = exporter.active(sweep)
    if metrics is None:
        return
    n = results.counts(rows)
    scores = [r.best_miou for r in rows if r.best_miou is not None]
    metrics.update(running=n["running"], done=n["done"], stopped=n["stopped"],
                   best=max(scores) if scores else None,
                   per_trial={r.trial: r.last_miou for r in rows if r.last_miou is not None})


@dataclass
class SweepOutcome:
    """What a sweep returns when Tune is done: its table, the best trial and the results files."""

    rows: list[results.TrialRow]
    best: results.TrialRow | None
    files: dict[str, str]
    max_concurrent: int
    interrupted: bool = False  # ended before its trials did (SIGINT/SIGUSR1): --resume continues


def plan_concurrency(attached: bool, cluster: dict[str, float], need: TrialNeed,
                     requested: int | None, samples: int) -> tuple[int, str]:
    """Trials at once, from what the Ray instance holds when the sweep starts.

    A private local instance is all there will be: a trial needing more GPUs than it has can never
    run. A cluster (``RAY_ADDRESS``) may hold less now than it will: an autoscaling one with
    ``min_workers: 0`` GPU nodes reports no GPU until trials ask for them. There the default (as
    many as fit) cannot be worked out while not one trial fits, and guessing 1 would fix a sweep to
    one trial at a time for good (``sweep.yaml`` keeps it across resumes), so the user must say.

    Args:
        attached: attached to an existing cluster rather than a private local instance.
        cluster: ``ray.cluster_resources()``.
        need: what one trial takes.
        requested: ``--max-concurrent`` (None = as many as fit).
        samples: trials in the sweep.

    Returns:
        ``(k, note)``; ``note`` explains a choice the user should know about ("" otherwise).

    Raises:
        UsageError: locally, a trial needs more GPUs than the machine has; attached, no trial
            fits now and no ``--max-concurrent`` was given.

    Example:
        >>> need = trial_need(workers=1, cpus_per_worker=1.0, gpus_per_worker=1.0)
        >>> plan_concurrency(True, {"CPU": 8.0}, need, 4, 32)[0]
        4
    """
    fits = concurrency(cluster, need)
    ask = f"{need.cpus:g} CPU" + (f" + {need.gpus:g} GPU" if need.gpus else "")
    holds = f"{cluster.get('CPU', 0.0):g} CPU, {cluster.get('GPU', 0.0):g} GPU"
    if not attached and need.gpus > cluster.get("GPU", 0.0):
        raise UsageError(f"a trial needs {need.gpus:g} GPUs (workers x --gpus-per-worker) but this "
                         f"machine has {cluster.get('GPU', 0.0):g}; pass --gpus-per-worker 0 to "
                         f"train on CPU")
    if requested:
        if requested <= fits:
            return requested, ""
        if not attached:
            return requested, (f"--max-concurrent {requested} is more than this machine holds "
                               f"({fits} trials of {ask}); the extra trials wait for the others")
        if fits == 0:
            return requested, (f"the cluster has no room for one trial ({ask}) yet (it holds "
                               f"{holds}); the trials wait for the autoscaler to add nodes, "
                               f"{requested} at a time")
        return requested, (f"--max-concurrent {requested} is more than the cluster holds now "
                           f"({fits} trials of {ask}); the extra trials wait for the autoscaler "
                           f"to add nodes")
    if fits > 0:
        return min(fits, samples), ""
    if attached:
        raise UsageError(f"the cluster has no room for one trial ({ask}) yet: it holds {holds} "
                         f"(autoscaling from zero?), so the trials to run at once cannot be worked "
                         f"out from it; pass --max-concurrent N: N trials of {ask} run at once "
                         f"as the autoscaler adds nodes for them")
    return 1, f"this Ray instance cannot hold one trial ({ask}) now; running one at a time"


def attached_to_cluster() -> bool:
    """Whether Ray attaches to an existing cluster (``RAY_ADDRESS``) rather than starting one."""
    return os.environ.get("RAY_ADDRESS", "").strip() not in ("", "local")


def init_ray(need: TrialNeed, requested: int | None) -> bool:
    """Attach to ``RAY_ADDRESS``, or start a private local instance sized for the sweep.

    Locally, trials run ``requested`` at a time, or as many as the machine's cores hold (at least
    one); the instance gets enough logical CPUs for that, so even a 2-core laptop runs the defaults.

    Returns:
        Whether it attached to an existing cluster (see :func:`plan_concurrency`).
    """
    cores = os.cpu_count() or 1
    trials = requested or max(1, math.floor(cores / need.cpus))
    attached = attached_to_cluster()
    launch.init_ray(local_cpus(need, trials, cores))
    return attached


def _tune_storage(spec: SweepSpec) -> tuple[str, Any]:
    if storage.is_s3(spec.root):
        fs, path = storage.filesystem(spec.root)
        return path, fs
    return spec.root, None


def _trainable(spec: SweepSpec, info: Any) -> Any:
    return tune.with_resources(tune.with_parameters(run_trial, spec=spec, info=info),
                               {"cpu": TRIAL_CPUS})


def build_tuner(spec: SweepSpec, info: Any, max_concurrent: int) -> tune.Tuner:
    """A new ``Tuner``: Optuna TPE (seeded, :class:`~segray.sweep.searcher.SweepOptuna`)
    maximising mIoU, ASHA on evaluation rounds or FIFO."""
    from segray.sweep.searcher import SweepOptuna

    scheduler: FIFOScheduler = SweepFIFO(spec)
    if spec.scheduler == "asha" and spec.grace_period < spec.rounds:
        scheduler = SweepASHA(spec)
    path, fs = _tune_storage(spec)
    return tune.Tuner(
        _trainable(spec, info),
        param_space={key: dist.to_tune() for key, dist in spec.space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=SweepOptuna(seed=spec.seed),
            scheduler=scheduler, num_samples=spec.samples, max_concurrent_trials=max_concurrent,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs,
                                  callbacks=[SweepProgress(spec)], verbose=1),
    )


def can_resume(spec: SweepSpec) -> bool:
    """Whether Tune saved enough of the sweep to restore it (it had started its first trial)."""
    path, fs = _tune_storage(spec)
    path = f"{path.rstrip('/')}/tune"
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return False
    return any(name.startswith("experiment_state-") for name in storage.list_dir(spec.tune_dir))


def restore_tuner(spec: SweepSpec, info: Any) -> tune.Tuner:
    """The sweep's ``Tuner`` from storage: finished trials kept, unfinished and errored resumed."""
    path, fs = _tune_storage(spec)
    return tune.Tuner.restore(f"{path.rstrip('/')}/tune", _trainable(spec, info),
                              resume_unfinished=True, resume_errored=True, storage_filesystem=fs)


def run_sweep(spec: SweepSpec, *, resume: bool = False, metrics_port: int = exporter.DEFAULT_PORT,
              say: Any = print) -> SweepOutcome:
    """Run (or resume) a sweep until it ends or is interrupted, and write its results folder.

    A new sweep fixes its concurrency when it starts (``spec.max_concurrent``, or what the cluster
    holds) and saves it in ``sweep.yaml``; a resumed one keeps it, as Tune does. SIGINT (Ctrl-C)
    or SIGUSR1 interrupts it: Tune saves its state and returns, the trials that were running are
    ``interrupted`` in the table and ``outcome.interrupted`` is set; ``resume=True`` continues them.

    Args:
        spec: the sweep (saved to ``sweep.yaml`` when it starts).
        resume: restore it from storage instead of starting it (a sweep interrupted before Tune
            saved any state starts over).
        metrics_port: Prometheus port on 127.0.0.1 (0 = none).
        say: where progress lines go.

    One driver at a time works on a sweep: it holds the sweep folder's lease
    (:mod:`segray.runlock`) while it runs.

    Raises:
        UsageError: bad data or resources; also a bad row a trial met while streaming (the
            trials after it do not start; see :mod:`segray.sweep.trial`); another live driver
            working on this sweep.
        OSError: the metrics port is taken.
    """
    lease = take_lease(spec.root, "a sweep driver")
    try:
        return _run_sweep(spec, resume, metrics_port, say)
    finally:
        lease.release()


def _run_sweep(spec: SweepSpec, resume: bool, metrics_port: int, say: Any) -> SweepOutcome:
    from methods import get_method

    base = trial_config(spec.base, {}, get_method(spec.method).Knobs, spec.method)
    info = resolve_data(base)
    need = trial_need(base.workers, base.cpus_per_worker, base.gpus_per_worker)
    metrics = exporter.SweepMetrics(spec.name, metrics_port)
    exporter.activate(metrics)
    try:
        attached = init_ray(need, spec.max_concurrent)
        k, note = plan_concurrency(attached, ray.cluster_resources(), need, spec.max_concurrent,
                                   spec.samples)
        if base.data.on_bad_sample == "error":
            stream_datasets(base, info)  # a bad dataset stops the sweep here, not in every trial
        report.clear_data_error(spec.root)  # a bad row an earlier session met may be fixed now
        restore = resume and can_resume(spec)
        if not restore:
            spec.max_concurrent = k
            spec.save()
        verb = "resuming" if restore else "starting over" if resume else "starting"
        say(f"[segray] {verb} sweep {spec.name}: {spec.samples} trials of {spec.method}, {k} at a "
            f"time ({base.workers} worker(s) each), scheduler {spec.scheduler}, {spec.rounds} "
            f"evaluation round(s) per trial -> {spec.root}")
        if metrics.port:
            say(f"[segray] sweep metrics on http://127.0.0.1:{metrics.port}/metrics")
        if note:
            say(f"[segray] note: {note}")
        set_running(spec)  # the restored scheduler and callback write to spec.root
        tuner = restore_tuner(spec, info) if restore else build_tuner(spec, info, k)
        # Tune catches SIGINT and SIGUSR1: it saves its state with the running trials unfinished,
        # stops them (TERMINATED, no error) and returns. The table tells them from trials that
        # ended (see results.trial_rows), so the interruption is not reported as the sweep's end.
        grid = tuner.fit()
        trials = [{"name": os.path.basename(r.path.rstrip("/")),
                   "status": "ERROR" if r.error else "TERMINATED",
                   "config": dict(r.config or {}), "last": dict(r.metrics or {})} for r in grid]
        rows = results.trial_rows(spec, trials)
        files = results.write_results(spec, rows)
        publish(spec.name, rows)
        for r in grid:
            if r.error:
                say(f"[segray] trial {os.path.basename(r.path.rstrip('/'))} failed: "
                    f"{str(r.error).strip().splitlines()[-1][:300]}")
        recorded = report.read_data_error(spec.root)
        if recorded is not None:
            advice = report.data_error_advice(
                recorded, "add --resume to continue the sweep",
                skip="start a new sweep with --set data.on_bad_sample=skip")
            raise UsageError(f"{recorded}; the trials running then ended in error, and later "
                             f"ones at their start (results so far: {spec.root}): {advice}")
        return SweepOutcome(rows=rows, best=results.best_row(rows), files=files,
                            max_concurrent=k, interrupted=not results.complete(spec, rows))
    finally:
        metrics.close()
