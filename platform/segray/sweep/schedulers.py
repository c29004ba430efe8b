"""Tune schedulers of a sweep: within the sweep's concurrency, and surviving a resume.

Tune saves neither its scheduler nor the concurrency of the trials it restores, so the schedulers
here write their decisions beside the trials (``stopped_early.json``, ``asha_rungs.json``) and hold
restored trials past the sweep's concurrency. :class:`SweepASHA` stops trials early on evaluation
rounds; :class:`SweepFIFO` runs every trial to the end.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from segray import report, storage
from segray.sweep.spec import (
    METRIC,
    ROUND_KEY,
    RUNGS_FILE,
    STOPPED_FILE,
    SweepSpec,
    eval_round,
    running,
)
from segray.sweep.trial import trial_name


def record_stop(spec: SweepSpec, trial: str, result: dict[str, Any]) -> None:
    """Write the scheduler's stop of ``trial`` (the result it was judged on) into its run folder.

    The marker ends a trial that is training (:func:`segray.sweep.trial._fit_until_stopped`) and
    keeps a resumed sweep from training it again.
    """
    record = {k: result.get(k) for k in ("step", ROUND_KEY, METRIC)}
    try:
        storage.write_text(storage.join(spec.run_uri(trial), STOPPED_FILE),
                           json.dumps({**record, "time": time.time()}))
    except OSError as e:  # the trial still stops; only a crash right now would revive it
        print(f"[segray] could not record that {trial} was stopped: {e}", file=sys.stderr)


class _ConcurrencyGate:
    """Keeps a resumed sweep within its concurrency: restored trials past it wait, PAUSED.

    Tune's ``max_concurrent_trials`` limits the trials its searcher creates, but ``Tuner.restore``
    queues every unfinished and errored trial at once, and a trial's Train workers hold resources
    Tune does not count. So a resumed sweep with more trials to resume than its concurrency would
    start them all together: more workers than the cluster was sized for and, on a small one,
    trials waiting on each other's CPUs for ever. A trial added while ``spec.max_concurrent``
    others are pending or running is held (PAUSED, which Tune starts only when the scheduler picks
    it); held trials start in start order as running ones end.
    """

    spec: SweepSpec
    _held_ids: set[str]  # trial ids held back (PAUSED by this gate)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tune restores the scheduler pickled when the sweep started, perhaps by an earlier
        # segray with fewer attributes, and with the folder the sweep had then.
        self.__dict__.update({"_held_ids": set(), **state, "spec": running(state["spec"])})

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        limit = self.spec.max_concurrent
        busy = sum(t.status in (Trial.PENDING, Trial.RUNNING)
                   for t in tune_controller.get_trials() if t is not trial)
        if limit and trial.status == Trial.PENDING and busy >= limit:
            trial.set_status(Trial.PAUSED)  # before Tune files it under its status
            self._held_ids.add(trial.trial_id)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trials = tune_controller.get_trials()
        held = sorted((t for t in trials if t.trial_id in self._held_ids
                       and t.status == Trial.PAUSED), key=trial_name)
        busy = sum(t.status in (Trial.PENDING, Trial.RUNNING) for t in trials)
        if held and busy < (self.spec.max_concurrent or busy + 1):
            self._held_ids.discard(held[0].trial_id)
            return held[0]
        choice = super().choose_trial_to_run(tune_controller)
        return None if choice is not None and choice.trial_id in self._held_ids else choice


class SweepFIFO(_ConcurrencyGate, FIFOScheduler):
    """Tune's first-in-first-out scheduler (no early stopping) within the sweep's concurrency."""

    def __init__(self, spec: SweepSpec) -> None:
        super().__init__()
        self.spec = spec
        self._held_ids = set()


class SweepASHA(_ConcurrencyGate, ASHAScheduler):
    """ASHA on evaluation rounds that survives a resume.

    Tune does not save its scheduler's state, so after ``Tuner.restore`` the rungs would start
    empty: trials run after the interruption would be judged against nobody, and a trial whose
    rung result was still waiting for judgement when the driver went down would be judged only
    at its next result, rounds later (after its last round, when there is nothing left to stop).
    So every judgement is written to the trial's run folder (``asha_rungs.json``; a stop also
    writes ``stopped_early.json``), and when the sweep is restored the rungs are rebuilt:

    - a trial that has ended has its results recorded at each rung, from its ``metrics.jsonl``;
    - a trial that will run again has the results ASHA had judged recorded as they were;
    - then each result a trial had reported but ASHA had not judged yet is judged, in the order
      the trials started, exactly as ASHA judges a new result. A trial stopped this way gets its
      stop marker and reports its last evaluation without training again; otherwise it resumes,
      to be judged at the rungs it has not reached.

    Restored trials past the sweep's concurrency wait their turn (see :class:`_ConcurrencyGate`).
    """

    def __init__(self, spec: SweepSpec) -> None:
        # Rungs stop short of the last round and survivors are never stopped: a trial that made
        # it there ends by itself, so its Train run shuts down cleanly and frees its placement
        # group at once (a stopped trial's group waits for Ray Train's cleaner).
        super().__init__(time_attr=ROUND_KEY, max_t=spec.rounds - 1,
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor,
                         stop_last_trials=False)
        self.spec = spec
        self._unjudged: list[tuple[Any, list[tuple[int, float, int]]]] = []
        self._written: dict[str, dict[float, float]] = {}  # trial id -> what its file holds
        self._held_ids = set()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"_unjudged": [], "_written": {}, **state})

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        run_uri = self.spec.run_uri(str(trial))
        try:
            by_round = sorted((eval_round(int(h["step"]), self.spec.eval_every), h[METRIC],
                               int(h["step"])) for h in report.read_history(run_uri)
                              if h.get(METRIC) is not None)
        except (ValueError, KeyError, TypeError) as e:  # never fail the restore over it
            print(f"[segray] cannot read the results of {trial} from {run_uri} ({e}); ASHA "
                  "judges it on new results only", file=sys.stderr)
            by_round = []
        rungs = self._trial_info[trial.trial_id]._rungs
        if trial.status == "TERMINATED":
            judged = {}
            for milestone, _ in rungs:  # ASHA records the first result at or after a milestone
                first = next((v for r, v, _ in by_round if r >= milestone), None)
                if first is not None:
                    judged[milestone] = first
        else:
            judged = self._written[trial.trial_id] = self._read_judged(run_uri)
            if by_round:
                self._unjudged.append((trial, by_round))  # once every trial is back
        for milestone, recorded in rungs:
            if milestone in judged:
                recorded[trial.trial_id] = self._metric_op * judged[milestone]

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        # Tune adds every restored trial before it first asks which to run.
        unjudged, self._unjudged = self._unjudged, []
        for trial, by_round in sorted(unjudged, key=lambda item: trial_name(item[0])):
            self._judge_late(trial, by_round)
        return super().choose_trial_to_run(tune_controller)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        self._write_judged(trial)
        return action

    def _judge_late(self, trial: Any, by_round: list[tuple[int, float, int]]) -> None:
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:  # removed meanwhile
            return
        for rnd, value, step in by_round:  # rungs already judged are passed over
            action = bracket.on_result(trial, rnd, self._metric_op * value)
            self._write_judged(trial)
            if action != TrialScheduler.STOP:
                continue
            self._num_stopped += 1
            if not storage.exists(storage.join(self.spec.run_uri(str(trial)), STOPPED_FILE)):
                print(f"[segray] {trial} stopped early by the scheduler on round {rnd}, which it "
                      f"reported before the sweep was interrupted (mIoU {value:.2f})")
                record_stop(self.spec, str(trial), {"step": step, ROUND_KEY: rnd, METRIC: value})
            return

    def _write_judged(self, trial: Any) -> None:
        bracket = self._trial_info.get(trial.trial_id)
        judged = {m: self._metric_op * recorded[trial.trial_id]
                  for m, recorded in (bracket._rungs if bracket else []) if trial.trial_id in recorded}
        if not judged or judged == self._written.get(trial.trial_id):
            return
        path = storage.join(self.spec.run_uri(str(trial)), RUNGS_FILE)
        try:
            storage.write_text(path, json.dumps({f"{m:g}": v for m, v in sorted(judged.items())}))
            self._written[trial.trial_id] = judged
        except OSError as e:  # a resume would judge this result again; nothing else is lost
            print(f"[segray] could not record ASHA's judgement of {trial}: {e}", file=sys.stderr)

    @staticmethod
    def _read_judged(run_uri: str) -> dict[float, float]:
        """Milestone -> the mIoU ASHA judged there, as written by :meth:`_write_judged`."""
        path = storage.join(run_uri, RUNGS_FILE)
        try:
            return {float(m): float(v) for m, v in json.loads(storage.read_text(path)).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as e:  # never fail the restore over it
            print(f"[segray] ignoring unreadable {path} ({e}); its results are judged again",
                  file=sys.stderr)
            return {}
