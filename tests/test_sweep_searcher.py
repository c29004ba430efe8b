"""The sweep's searcher learns from an errored trial that ``--resume`` re-ran to completion
(the stock ``OptunaSearch`` drops that result, and TPE ignores failed trials)."""

from __future__ import annotations

import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from segray.sweep.searcher import SweepOptuna
from segray.sweep.spec import METRIC

SPACE = {"mask_ratio": tune.uniform(0.1, 0.9), "width": tune.randint(8, 33)}


def _searcher(cls: type):
    s = cls(seed=0)
    s.set_search_properties(METRIC, "max", SPACE)
    return s


@pytest.mark.parametrize(("cls", "learns"), [(SweepOptuna, True), (OptunaSearch, False)])
def test_a_failed_trial_rerun_on_resume_is_told_its_result(tmp_path, cls, learns):
    s = _searcher(cls)
    point = s.suggest("t1")
    s.on_trial_complete("t1", error=True)  # a bad row, a lost node...
    s.save(str(tmp_path / "searcher.pkl"))  # the sweep's driver goes down; --resume restores
    restored = _searcher(cls)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t1", result={METRIC: 55.0})  # the re-run finished
    states = [(t.state, t.value) for t in restored._ot_study.get_trials()]
    done = [t for t in restored._ot_study.get_trials()
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert states[0] == (optuna.trial.TrialState.FAIL, None)
    if learns:
        assert [(t.value, t.params) for t in done] == [(55.0, point)]
        restored.on_trial_complete("t1", result={METRIC: 60.0})  # told once only
        assert len(restored._ot_study.get_trials()) == 2
    else:
        assert done == []


def test_a_finished_or_stopped_trial_keeps_its_result(tmp_path):
    s = _searcher(SweepOptuna)
    s.suggest("t1")
    s.on_trial_complete("t1", result={METRIC: 40.0})
    s.on_trial_complete("t1", result={METRIC: 70.0})  # an extra report: ignored, as Tune does
    assert [t.value for t in s._ot_study.get_trials()] == [40.0]
