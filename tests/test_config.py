"""Config: presets, overrides, validation reporting every error at once."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from methods import METHODS, PRESET_ROOT, get_method, list_presets, preset_path
from segray.config import (
    Config,
    ConfigError,
    deep_merge,
    load_preset,
    parse_overrides,
    resolve,
    to_dict,
    to_yaml,
)

ALL_PRESETS = [(m, p) for m in sorted(METHODS) for p in list_presets(m)]


def test_every_method_has_a_demo_preset():
    for name in METHODS:
        assert "demo" in list_presets(name), f"method {name} ships no demo preset"


def test_no_orphan_preset_folders():
    folders = {p.name for p in PRESET_ROOT.iterdir() if p.is_dir()}
    assert folders <= set(METHODS), f"preset folders without a registered method: {folders - set(METHODS)}"


@pytest.mark.parametrize(("method", "preset"), ALL_PRESETS)
def test_every_preset_loads_and_validates(method, preset):
    path = preset_path(method, preset)
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("# python jobs/train.py"), f"{path} must start with the command that runs it"
    raw = load_preset(path)
    assert "num_classes" not in yaml.safe_dump(raw), f"{path}: class count belongs to the manifest"
    cfg = resolve(raw, get_method(method).Knobs, method, source=str(path))
    assert isinstance(cfg, Config)
    # The saved form resolves back to the same config.
    again = dict(yaml.safe_load(to_yaml(cfg)))
    again.pop("method")
    assert to_dict(resolve(again, get_method(method).Knobs, method)) == to_dict(cfg)


def test_overrides_are_typed_and_nested():
    over = parse_overrides(["optim.lr=0.05", "data.crop_size=[32, 48]", "train.precision=fp32"])
    cfg = resolve(over, get_method("supervised").Knobs, "supervised")
    assert cfg.optim.lr == 0.05 and cfg.data.crop_size == [32, 48] and cfg.train.precision == "fp32"
    # an int where a float is expected is accepted and converted
    cfg = resolve(parse_overrides(["optim.lr=1"]), None, "supervised")
    assert isinstance(cfg.optim.lr, float)


def test_every_error_is_reported_at_once_with_suggestions():
    raw = parse_overrides([
        "optim.lr=fast", "optim.lrr=0.1", "train.precision=fp8", "data.crop_size=[0, 4]",
        "trian.steps=3", "knobs.label_smoothing=high",
    ])
    with pytest.raises(ConfigError) as info:
        resolve(raw, get_method("supervised").Knobs, "supervised")
    errors = info.value.errors
    text = str(info.value)
    assert len(errors) == 5, errors  # crop_size is checked only once types are right
    assert "optim.lr: expected a number, got 'fast'" in text
    assert "unknown key 'optim.lrr'; did you mean 'lr'?" in text
    assert "train.precision: expected one of 'auto', 'fp32', 'bf16', 'fp16'" in text
    assert "unknown key 'trian'; did you mean 'train'?" in text
    assert "knobs.label_smoothing: expected a number" in text


def test_semantic_checks():
    raw = parse_overrides(["data.crop_size=[0, 4]", "workers=3", "data.batch_size=8",
                           "eval.mode=slide"])
    with pytest.raises(ConfigError) as info:
        resolve(raw, None, "supervised")
    text = str(info.value)
    assert "data.crop_size" in text and "divide evenly over 3 workers" in text
    assert "eval.mode: 'slide' needs eval.crop and eval.stride" in text
    raw = parse_overrides(["data.resize=[224, 224]", "data.base_scale=[1024, 224]"])
    with pytest.raises(ConfigError, match="data.resize and data.base_scale exclude each other"):
        resolve(raw, None, "supervised")
    with pytest.raises(ConfigError, match=r"data.resize: expected two positive integers"):
        resolve(parse_overrides(["data.resize=[224]"]), None, "supervised")
    with pytest.raises(ConfigError, match=r"data.resample.*'cv2', 'pillow'"):
        resolve(parse_overrides(["data.resample=bicubic"]), None, "supervised")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["optim.lr"])


def test_one_level_of_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 5\n  log_every: 2\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain:\n  steps: 7\n")
    (tmp_path / "c.yaml").write_text("base: b\n")
    (tmp_path / "d.yaml").write_text("base: nope\n")
    merged = load_preset(tmp_path / "b.yaml")
    assert merged["train"] == {"steps": 7, "log_every": 2}
    with pytest.raises(ConfigError, match="one level"):
        load_preset(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="base preset 'nope' not found"):
        load_preset(tmp_path / "d.yaml")


def test_unknown_method_and_preset_suggest_the_closest():
    with pytest.raises(KeyError, match="did you mean 'supervised'"):
        get_method("supervisd")
    with pytest.raises(KeyError, match="did you mean 'demo'"):
        preset_path("supervised", "dmeo")


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def test_config_has_no_dataset_values():
    names = {f.name for f in dataclasses.fields(Config)}
    for section in (Config().data, Config().model):
        names |= {f.name for f in dataclasses.fields(section)}
    assert not names & {"num_classes", "palette", "ignore_index"}


def test_a_methods_own_knob_validation_is_reported_as_a_config_error():
    raw = parse_overrides(["knobs.attention=foo", "knobs.prior_weight=-1"])
    with pytest.raises(ConfigError, match="attention must be one of") as info:
        resolve(raw, get_method("semask").Knobs, "semask")
    assert "prior_weight must be >= 0" in str(info.value)
