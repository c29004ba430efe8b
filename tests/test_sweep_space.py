"""Search spaces, the sweep spec and the results table, without Ray."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pickle
from pathlib import Path

import pytest
import yaml

from methods import METHODS
from methods.masksup import MaskSup
from methods.supervised import Supervised
from segray.config import to_dict
from segray.sweep import results
from segray.sweep.space import (
    Dist,
    SpaceError,
    check_values,
    knob_names,
    load_space_file,
    overrides,
    parse_space,
    space_from_dicts,
    trial_config,
)
from segray.sweep.spec import (
    METRIC,
    ROUND_KEY,
    RUNGS_FILE,
    STOPPED_FILE,
    SweepSpec,
    concurrency,
    eval_round,
    local_cpus,
    trial_need,
)

MASKSUP_KNOBS = knob_names(MaskSup.Knobs)


def _base(method: str = "masksup") -> dict:
    cfg = trial_config({"train": {"steps": 12, "eval_every": 4}}, {}, METHODS[method].Knobs,
                       method)
    return to_dict(cfg)


def test_every_method_default_space_is_valid():
    for name, cls in METHODS.items():
        space = parse_space(cls.search_space, knob_names(cls.Knobs), source=name)
        assert space, name
        check_values(space, _base(name), cls.Knobs, name)


def test_parse_canonical_keys_and_distributions():
    space = parse_space({
        "mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.75},
        "knobs.alpha": {"type": "loguniform", "low": 0.1, "high": 1},
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "width": {"type": "int", "low": 8, "high": 32},
        "holes": {"type": "choice", "values": ["freeform", "patches"]},
    }, MASKSUP_KNOBS)
    assert list(space) == ["mask_ratio", "alpha", "optim.lr", "width", "holes"]
    assert space["alpha"] == Dist("alpha", "loguniform", low=0.1, high=1.0)
    assert space["alpha"].config_key == "knobs.alpha"
    assert space["optim.lr"].config_key == "optim.lr"
    assert space["width"].probes() == [8, 32]
    assert space["holes"].probes() == ["freeform", "patches"]
    # The saved form round-trips.
    assert space_from_dicts({k: d.to_dict() for k, d in space.items()}) == space


def test_tune_distributions_bounds():
    from ray import tune

    space = parse_space({"width": {"type": "int", "low": 1, "high": 2},
                         "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                         "holes": {"type": "choice", "values": ["freeform", "patches"]}},
                        MASKSUP_KNOBS)
    width = space["width"].to_tune()
    assert (width.lower, width.upper) == (1, 3)  # randint's upper end is exclusive: 2 included
    samples = {width.sample() for _ in range(200)}
    assert samples == {1, 2}
    lr = space["optim.lr"].to_tune()
    assert isinstance(lr.get_sampler(), tune.search.sample.LogUniform)
    assert (lr.lower, lr.upper) == (1e-4, 1e-2)
    assert space["holes"].to_tune().categories == ["freeform", "patches"]


def test_unknown_knob_names_closest_and_valid_ones():
    with pytest.raises(SpaceError) as e:
        parse_space({"mask_ratoi": {"type": "uniform", "low": 0.1, "high": 0.5}}, MASKSUP_KNOBS)
    msg = str(e.value)
    assert "unknown knob 'mask_ratoi'; did you mean 'mask_ratio'?" in msg
    assert "knobs: arch, width" in msg  # lists the valid knobs


def test_every_problem_reported_at_once():
    raw = {
        "mask_ratoi": {"type": "uniform", "low": 0.1, "high": 0.5},
        "alpha": {"type": "unifrom", "low": 0.1, "high": 0.5},
        "beta": {"type": "uniform", "low": 0.5, "high": 0.1},
        "gamma": {"type": "loguniform", "low": 0.0, "high": 1.0},
        "width": {"type": "int", "low": 8.5, "high": 16},
        "holes": {"type": "choice", "values": []},
        "patch_size": {"type": "choice", "vals": [8, 16]},
        "fill": 0.3,
        "optim.lrr": {"type": "uniform", "low": 0.1, "high": 0.5},
        "train.steps": {"type": "int", "low": 10, "high": 20},
        "drop_path": {"type": "uniform", "low": "a", "high": 1},
        "seed": {"low": 1, "high": 2},
    }
    with pytest.raises(SpaceError) as e:
        parse_space(raw, MASKSUP_KNOBS, source="space.yaml")
    errors = e.value.errors
    assert len(errors) == 13, errors  # patch_size: one unexpected field + one missing field
    text = "\n".join(errors)
    assert str(e.value).startswith("13 problem(s) in space.yaml:")
    for expected in [
        "unknown knob 'mask_ratoi'; did you mean 'mask_ratio'?",
        "alpha: unknown type 'unifrom'; did you mean 'uniform'? (types: uniform, loguniform, "
        "int, choice)",
        "beta: needs low < high, got low=0.5, high=0.1",
        "gamma: loguniform needs low > 0",
        "width: type int needs integer bounds",
        "holes: 'values' must be a non-empty list",
        "patch_size: unexpected field 'vals' for type choice; did you mean 'values'?",
        "patch_size: type choice needs 'values'",
        "fill: expected a distribution like {type: uniform, low: 0.1, high: 0.9}, got 0.3",
        "unknown config key 'optim.lrr'; did you mean 'optim.lr'?",
        "'train.steps' is fixed for the whole sweep",
        "drop_path: 'low' and 'high' must be numbers",
        "seed: missing 'type'",
    ]:
        assert expected in text, expected


@pytest.mark.parametrize(("raw", "expected"), [
    (None, "got nothing"),
    ([1, 2], "expected a mapping of knob -> distribution"),
    ({"mask_ratio": {"type": "choice", "values": [[0.1, 0.2]]}},
     "choice values must be numbers, strings, booleans or null"),
    ({"mask_ratio": {"type": "choice", "values": [0.1, 0.1]}}, "lists a value twice"),
    ({"knobs.mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.2},
      "mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.2}}, "appears twice"),
])
def test_malformed_spaces(raw, expected):
    with pytest.raises(SpaceError) as e:
        parse_space(raw, MASKSUP_KNOBS)
    assert expected in str(e.value)


def test_values_checked_against_the_config():
    space = parse_space({"holes": {"type": "choice", "values": ["freeform", "squares"]},
                         "optim.name": {"type": "choice", "values": ["adamw", "lion"]},
                         "width": {"type": "int", "low": 4, "high": 8}}, MASKSUP_KNOBS)
    with pytest.raises(SpaceError) as e:
        check_values(space, _base(), MaskSup.Knobs, "masksup", source="s.yaml")
    assert len(e.value.errors) == 2
    assert "holes='squares': knobs.holes: expected one of 'freeform', 'patches'" in str(e.value)
    assert "optim.name='lion': optim.name: expected one of 'sgd', 'adam', 'adamw'" in str(e.value)


def test_space_file(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("mask_ratio: {type: uniform, low: 0.2, high: 0.6}\n")
    assert parse_space(load_space_file(path), MASKSUP_KNOBS)["mask_ratio"].high == 0.6
    path.write_text("optim.lr: {type: loguniform, low: 1e-5, high: 2E-3}\n")  # YAML 1.2 floats
    assert load_space_file(path) == {"optim.lr": {"type": "loguniform", "low": 1e-5,
                                                  "high": 2e-3}}
    path.write_text("mask_ratio: {type: uniform\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space_file(path)
    with pytest.raises(FileNotFoundError, match="no search-space file at"):
        load_space_file(tmp_path / "missing.yaml")


def test_trial_config_applies_the_sample_and_revalidates():
    base = _base("supervised")
    cfg = trial_config(base, {"label_smoothing": 0.1, "optim.lr": 0.01}, Supervised.Knobs,
                       "supervised")
    assert cfg.knobs.label_smoothing == 0.1 and cfg.optim.lr == 0.01
    assert cfg.train.steps == 12  # the rest of the base config is kept
    assert overrides({"a": 1, "optim.lr": 2}) == {"knobs": {"a": 1}, "optim": {"lr": 2}}
    from segray.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr: must be > 0"):
        trial_config(base, {"optim.lr": -1.0}, Supervised.Knobs, "supervised")


def test_rounds_and_concurrency():
    assert [eval_round(s, 4) for s in (1, 4, 5, 8, 10)] == [1, 1, 2, 2, 3]
    need = trial_need(workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    assert (need.cpus, need.gpus) == (3.1, 2.0)  # 0.1 trial + 2 workers + 1 for data decoding
    assert concurrency({"CPU": 16.0, "GPU": 4.0}, need) == 2  # GPU-bound
    assert concurrency({"CPU": 6.0, "GPU": 8.0}, need) == 1  # CPU-bound
    assert concurrency({"CPU": 64.0}, need) == 0  # no GPU node (yet)
    cpu = trial_need(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0)
    assert concurrency({"CPU": 4.2}, cpu) == 2 and concurrency({"CPU": 2.0}, cpu) == 0
    # A 2-core laptop running 2 trials at once gets enough logical CPUs for both.
    assert local_cpus(cpu, 2, cores=2) == 5 and concurrency({"CPU": 5.0}, cpu) == 2


def _spec(tmp_path: Path) -> SweepSpec:
    space = parse_space({"mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.7},
                         "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                         "holes": {"type": "choice", "values": ["freeform", "patches"]}},
                        MASKSUP_KNOBS)
    return SweepSpec(name="demo", root=str(tmp_path / "demo"), method="masksup", base=_base(),
                     space=space, samples=4, grace_period=1, reduction_factor=2, seed=3)


def _fake_run(spec: SweepSpec, trial: str, mious: list[float], resumed: bool = False) -> None:
    run = Path(spec.run_uri(trial))
    run.mkdir(parents=True)
    history = []
    for i, m in enumerate(mious):
        step = 4 * (i + 1)
        history.append({"step": step, "train/loss": 1.0, "time": 0.0})
        history.append({"step": step, "val/mIoU": m})
        if resumed and i == 0:
            history.append({"step": step, "event": "resumed", "rank": 0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if len(mious) == spec.rounds:  # a completed run leaves its summary
        (run / "summary.json").write_text(json.dumps({"steps": spec.steps}))
    cfg = dict(spec.base, name=trial, storage=spec.trials_root)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_spec_round_trip(tmp_path):
    spec = _spec(tmp_path)
    spec.save()
    back = SweepSpec.load(spec.root)
    assert back == spec and back.rounds == 3 and back.steps == 12
    with pytest.raises(FileNotFoundError, match="no sweep at"):
        SweepSpec.load(str(tmp_path / "nothing"))


def test_results_folder(tmp_path):
    spec = _spec(tmp_path)
    _fake_run(spec, "trial_001_a", [10.0, 20.0, 30.0])
    _fake_run(spec, "trial_002_b", [5.0])  # stopped by the scheduler: its marker is on file
    (Path(spec.run_uri("trial_002_b")) / STOPPED_FILE).write_text("{}")
    _fake_run(spec, "trial_003_c", [12.0, 25.0, 28.0], resumed=True)
    trials = [
        {"name": "trial_002_b", "status": "TERMINATED",
         "config": {"mask_ratio": 0.5, "optim.lr": 1e-4, "holes": "patches"}, "last": {}},
        {"name": "trial_001_a", "status": "TERMINATED",
         "config": {"mask_ratio": 0.3, "optim.lr": 1e-3, "holes": "freeform"}, "last": {}},
        {"name": "trial_003_c", "status": "TERMINATED",
         "config": {"mask_ratio": 0.6, "optim.lr": 3e-3, "holes": "freeform"}, "last": {}},
        {"name": "trial_004_d", "status": "RUNNING",
         "config": {"mask_ratio": 0.2, "optim.lr": 2e-3, "holes": "patches"}, "last": {}},
    ]
    rows = results.trial_rows(spec, trials)
    assert [r.trial for r in rows] == ["trial_001_a", "trial_002_b", "trial_003_c", "trial_004_d"]
    assert [r.status for r in rows] == ["finished", "stopped", "finished", "running"]
    assert [r.steps for r in rows] == [12, 4, 12, 0]
    assert rows[2].resumes == 1 and rows[2].best_miou == 28.0 and rows[2].last_miou == 28.0
    assert results.best_row(rows).trial == "trial_001_a"
    assert results.counts(rows)["done"] == 3 and results.counts(rows)["stopped"] == 1

    files = results.write_results(spec, rows)
    root = Path(spec.root)
    table = list(csv.DictReader(io.StringIO((root / "trials.csv").read_text())))
    assert len(table) == 4
    assert table[1] == {"trial": "trial_002_b", "status": "stopped", "mask_ratio": "0.5",
                        "optim.lr": "0.0001", "holes": "patches", "best_mIoU": "5.0",
                        "last_mIoU": "5.0", "eval_rounds": "1", "steps": "4",
                        "stopped_early": "True", "resumes": "0",
                        "run": str(root / "trials" / "trial_002_b")}
    md = (root / "trials.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| trial | status | mask_ratio | optim.lr")
    for name in ("miou_by_mask_ratio.png", "miou_by_optim_lr.png", "miou_by_holes.png",
                 "best_so_far.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG", name
    html = (root / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert html.count("<tr") == 5 and '<tr class="best"><td>trial_001_a' in html
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best["method"] == "masksup" and best["preset"] == "demo-best"
    assert "name" not in best and "storage" not in best  # a re-run starts fresh
    assert (root / "best.yaml").read_text().startswith(
        "# python jobs/train.py --method masksup --preset-file best.yaml")
    # The peak and the last evaluation apart: a re-run trains to the end, as Optuna scored it.
    first = next(r for r in table if r["trial"] == "trial_001_a")
    assert (f"best validation mIoU {float(first['best_mIoU']):.2f} (at its last evaluation, step "
            f"{first['steps']}: {float(first['last_mIoU']):.2f}; a re-run reproduces the last)"
            in (root / "best.yaml").read_text())
    assert set(files) >= {"trials.csv", "trials.md", "best.yaml", "report.html"}
    # A running trial the scheduler just stopped (its marker is written at once) counts as stopped.
    (root / "trials" / "trial_004_d").mkdir()
    (root / "trials" / "trial_004_d" / STOPPED_FILE).write_text("{}")
    assert results.trial_rows(spec, trials)[3].status == "stopped"
    # Stopped by the scheduler while its workers ran on to the last evaluation, then went down
    # before the final report: stopped, not finished.
    _fake_run(spec, "trial_005_e", [1.0, 2.0, 3.0])
    (root / "trials" / "trial_005_e" / "summary.json").unlink()
    (root / "trials" / "trial_005_e" / STOPPED_FILE).write_text("{}")
    overrun = {"name": "trial_005_e", "status": "TERMINATED", "config": {}, "last": {}}
    assert results.trial_rows(spec, [overrun])[0].status == "stopped"


class _Controller:
    """What a scheduler asks of Tune's controller: the trials, in the order they were added."""

    def __init__(self, trials: list) -> None:
        self.trials = trials

    def get_trials(self) -> list:
        return self.trials


def _trial(name: str, status: str):
    from ray.tune.experiment import Trial

    number, trial_id = name.split("_")[1:]
    trial = Trial("run_trial", stub=True, trial_id=trial_id, experiment_tag=f"{int(number)}_x=1")
    trial.custom_trial_name = name
    trial.set_status(status)
    return trial


def test_asha_rebuilds_its_rungs_on_resume(tmp_path, capsys):
    from segray.sweep.schedulers import SweepASHA

    # 3 rounds: rungs at rounds 1 and 2 (floats, as the CLI's reduction factor makes them).
    spec = dataclasses.replace(_spec(tmp_path), reduction_factor=2.0)
    runs = Path(spec.trials_root)
    _fake_run(spec, "trial_001_a", [10.0, 20.0, 30.0])  # finished
    _fake_run(spec, "trial_002_b", [5.0])  # stopped at round 1
    _fake_run(spec, "trial_003_c", [4.0])  # judged at round 1 (it came first), then interrupted
    (runs / "trial_003_c" / RUNGS_FILE).write_text('{"1": 4.0}')
    _fake_run(spec, "trial_004_d", [3.0])  # its round 1 awaited judgement when the driver died
    _fake_run(spec, "trial_005_e", [2.0])  # stopped before: its marker is kept as it is
    (runs / "trial_005_e" / STOPPED_FILE).write_text('{"before": true}')
    (runs / "trial_005_e" / RUNGS_FILE).write_text('{"1": ')  # cut short: judged again
    (runs / "trial_007_g").mkdir()
    (runs / "trial_007_g" / "metrics.jsonl").write_text('{"step": 4, "val/mIoU": 1.0}\n{"st')
    trials = [_trial("trial_005_e", "PENDING"), _trial("trial_004_d", "PENDING"),
              _trial("trial_003_c", "PENDING"), _trial("trial_002_b", "TERMINATED"),
              _trial("trial_001_a", "TERMINATED"), _trial("trial_006_f", "PENDING"),
              _trial("trial_007_g", "PENDING")]
    asha = SweepASHA(spec)
    asha.set_search_properties(METRIC, "max")
    # Tune restores the scheduler pickled when the sweep started, maybe by an earlier SweepASHA
    # without the attributes added since.
    for name in ("_unjudged", "_written", "_held_ids"):
        delattr(asha, name)
    asha = pickle.loads(pickle.dumps(asha))
    controller = _Controller(trials)
    for trial in trials:  # as Tuner.restore adds them
        asha.on_trial_add(controller, trial)
    assert asha.choose_trial_to_run(controller) is trials[0]

    # c keeps the judgement it had, though 4 is now under the median of 10 and 5. d is judged
    # now (in start order, after c) on the result it reported, against 10, 5 and 4: stopped,
    # instead of training its next round first.
    assert not (runs / "trial_003_c" / STOPPED_FILE).exists()
    marker = json.loads((runs / "trial_004_d" / STOPPED_FILE).read_text())
    assert {k: v for k, v in marker.items() if k != "time"} == {"step": 4, ROUND_KEY: 1,
                                                                   METRIC: 3.0}
    assert json.loads((runs / "trial_004_d" / RUNGS_FILE).read_text()) == {"1": 3.0}
    assert (runs / "trial_005_e" / STOPPED_FILE).read_text() == '{"before": true}'
    assert json.loads((runs / "trial_005_e" / RUNGS_FILE).read_text()) == {"1": 2.0}
    out, err = capsys.readouterr()
    assert "trial_004_d stopped early by the scheduler on round 1" in out
    assert "trial_005_e" not in out and "trial_003_c" not in out
    assert f"ignoring unreadable {runs / 'trial_005_e' / RUNGS_FILE}" in err
    assert f"cannot read the results of trial_007_g from {runs / 'trial_007_g'}" in err
    assert not (runs / "trial_007_g" / STOPPED_FILE).exists()

    # Live results meet the rebuilt rungs: c's round 2 meets a's (20); f's round 1 the median 4.
    assert asha.on_trial_result(controller, trials[2], {ROUND_KEY: 2, METRIC: 15.0}) == "STOP"
    assert json.loads((runs / "trial_003_c" / RUNGS_FILE).read_text()) == {"1": 4.0, "2": 15.0}
    assert asha.on_trial_result(controller, trials[5], {ROUND_KEY: 1, METRIC: 11.0}) == "CONTINUE"
    assert json.loads((runs / "trial_006_f" / RUNGS_FILE).read_text()) == {"1": 11.0}


@pytest.mark.parametrize("scheduler", ["asha", "none"])
def test_a_resumed_sweep_starts_no_more_trials_than_its_concurrency(tmp_path, scheduler):
    from segray.sweep.schedulers import SweepASHA, SweepFIFO

    spec = dataclasses.replace(_spec(tmp_path), max_concurrent=2)
    gate = SweepASHA(spec) if scheduler == "asha" else SweepFIFO(spec)
    gate.set_search_properties(METRIC, "max")
    names = ["trial_001_a", "trial_002_b", "trial_003_c", "trial_004_d", "trial_005_e"]
    trials = [_trial(names[0], "TERMINATED")]
    controller = _Controller(trials)
    for name in reversed(names[1:]):  # Tuner.restore brings back four unfinished trials
        trials.append(_trial(name, "PENDING"))
        gate.on_trial_add(controller, trials[-1])
    status = {str(t): t.status for t in trials}
    assert status == {"trial_001_a": "TERMINATED", "trial_005_e": "PENDING",
                      "trial_004_d": "PENDING", "trial_003_c": "PAUSED", "trial_002_b": "PAUSED"}

    def step() -> str | None:  # what Tune's controller does with the scheduler's choice
        chosen = gate.choose_trial_to_run(controller)
        if chosen is not None:
            chosen.set_status("RUNNING")
        return None if chosen is None else str(chosen)

    assert {step(), step()} == {"trial_004_d", "trial_005_e"}
    assert step() is None  # two running: the held trials wait
    trials[1].set_status("TERMINATED")
    assert step() == "trial_002_b" and step() is None  # in start order, one per freed slot
    trials[2].set_status("ERROR")
    assert step() == "trial_003_c" and step() is None


def test_best_yaml_is_a_valid_preset(tmp_path):
    """build_config (what jobs/train.py --preset-file uses) accepts best.yaml unchanged."""
    import argparse

    from segray.cli import build_config

    spec = _spec(tmp_path)
    _fake_run(spec, "trial_001_a", [10.0, 20.0, 30.0])
    rows = results.trial_rows(spec, [{"name": "trial_001_a", "status": "TERMINATED",
                                      "config": {"mask_ratio": 0.3}, "last": {}}])
    results.write_results(spec, rows)
    args = argparse.Namespace(
        method="masksup", preset="demo", preset_file=str(Path(spec.root) / "best.yaml"),
        data=None, steps=None, batch_size=None, eval_every=None, workers=None,
        gpus_per_worker=None, storage=None, name=None, seed=None, overrides=[])
    cfg = build_config(args)
    assert cfg.preset == "demo-best" and cfg.name == "" and cfg.train.steps == 12
    assert math.isclose(cfg.optim.lr, spec.base["optim"]["lr"])
