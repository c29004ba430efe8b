"""The sweep's Optuna searcher: Ray Tune's ``OptunaSearch``, learning from trials re-run on resume.

A trial that errored (bad data, a lost node) is told to Optuna as failed, and TPE ignores failed
trials. ``jobs/tune.py --resume`` re-runs errored trials from their checkpoints; when one of them
then finishes, the stock searcher drops its result ("additional completion ... already
finished"), so the sweep trains the trial and Optuna never learns from it. :class:`SweepOptuna`
records such a result as a completed trial at the same point instead.
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class SweepOptuna(OptunaSearch):
    """``OptunaSearch`` that tells Optuna the result of a failed trial re-run to completion."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials and not error:
            self._tell_rerun(trial_id, result)
            return
        super().on_trial_complete(trial_id, result, error)

    def _tell_rerun(self, trial_id: str, result: dict[str, Any] | None) -> None:
        import optuna

        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        asked = self._ot_trials.get(trial_id)
        if value is None or asked is None:
            return
        trials = self._ot_study.get_trials(deepcopy=False)
        told = next((t for t in trials if t.number == asked.number), None)
        if told is None or told.state != optuna.trial.TrialState.FAIL:
            return  # completed or pruned already: its result stands
        if any(t.user_attrs.get("rerun_of") == told.number for t in trials):
            return  # the re-run's result is in already
        self._ot_study.add_trial(optuna.trial.create_trial(
            params=told.params, distributions=told.distributions, value=float(value),
            user_attrs={"rerun_of": told.number}))
