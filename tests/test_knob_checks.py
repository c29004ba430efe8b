"""Knob range checks that run when the config is resolved, before Ray starts.

MaskSup's and the supervised baseline's knobs check their own ranges in ``__post_init__`` (as
SeMask's do), so :func:`segray.config.resolve`, the jobs and a sweep's value check refuse a bad
value as a usage error. Only the checks that need the dataset (class count) or the crop size stay
in the method's constructor.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import job_env, run_job

from methods import list_presets, preset_path
from methods.base import MethodContext
from methods.masksup import MaskSup, MaskSupKnobs
from methods.supervised import Supervised, SupervisedKnobs
from segray.config import ConfigError, deep_merge, load_preset, resolve, to_dict
from segray.sweep.space import SpaceError, check_values, knob_names, parse_space

METHODS = {"masksup": (MaskSup, MaskSupKnobs), "supervised": (Supervised, SupervisedKnobs)}

# (knob, bad value, text of the allowed values the message must give)
MASKSUP_BAD = [
    ("mask_ratio", 1.5, "[0, 1] or null"),
    ("mask_ratio", -0.1, "[0, 1] or null"),
    ("mask_prob", 1.5, "[0, 1]"),
    ("mask_prob", -0.5, "[0, 1]"),
    ("width", 0, ">= 1"),
    ("patch_size", 0, ">= 1"),
    ("patch_size", -8, ">= 1"),
    ("hole_ratio_range", [0.6, 0.5], "0 <= low <= high <= 1"),
    ("hole_ratio_range", [0.5, 1.2], "0 <= low <= high <= 1"),
    ("hole_ratio_range", [-0.1, 0.5], "0 <= low <= high <= 1"),
    ("hole_ratio_range", [0.5], "[low, high]"),
    ("drop_path", 1.5, "[0, 1]"),
    ("void_to_class", -1, ">= 0 or null"),
    ("predict_size", [0, 32], "[H, W] (both >= 1)"),
    ("predict_size", [32], "[H, W] (both >= 1)"),
    ("paper_metric_size", [0, 224], "[H, W] (both >= 1)"),
    ("seed", -1, ">= 0"),
]
SUPERVISED_BAD = [
    ("label_smoothing", 5.0, "[0, 1]"),
    ("label_smoothing", -1, "[0, 1]"),
    ("label_smoothing", 1.5, "[0, 1]"),
]
BAD = [("masksup", *case) for case in MASKSUP_BAD] + [("supervised", *case) for case in SUPERVISED_BAD]


def _demo(method: str) -> dict[str, Any]:
    return load_preset(preset_path(method, "demo"))


def _resolve(method: str, knobs: dict[str, Any]) -> Any:
    raw = deep_merge(_demo(method), {"knobs": knobs})
    return resolve(raw, METHODS[method][1], method, source="test")


@pytest.mark.parametrize(("method", "knob", "value", "allowed"), BAD)
def test_resolve_rejects_a_bad_knob_naming_it(method, knob, value, allowed):
    with pytest.raises(ConfigError) as err:
        _resolve(method, {knob: value})
    assert len(err.value.errors) == 1, err.value.errors
    text = err.value.errors[0]
    assert f"invalid {method} knobs" in text
    assert f"{knob} must be" in text and f"got {value!r}" in text and allowed in text, text


@pytest.mark.parametrize(("method", "knob", "value", "allowed"), BAD)
def test_knobs_dataclass_rejects_a_bad_value_at_construction(method, knob, value, allowed):
    with pytest.raises(ValueError, match=f"{knob} must be"):
        METHODS[method][1](**{knob: value})


def test_every_bad_knob_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        _resolve("masksup", {"mask_ratio": 1.5, "mask_prob": 2.0, "patch_size": 0,
                             "hole_ratio_range": [0.6, 0.5]})
    text = str(err.value)
    for knob in ("mask_ratio", "mask_prob", "patch_size", "hole_ratio_range"):
        assert f"{knob} must be" in text, text


def test_a_bad_knob_names_the_set_item_it_came_from():
    origins = {"knobs.mask_ratio": "--set knobs.mask_ratio=1.5"}
    with pytest.raises(ConfigError, match=r"got 1\.5 \(from --set knobs\.mask_ratio=1\.5\)"):
        resolve(deep_merge(_demo("masksup"), {"knobs": {"mask_ratio": 1.5}}), MaskSupKnobs,
                "masksup", origins=origins)


def test_levit_predict_size_is_checked_without_the_dataset():
    with pytest.raises(ConfigError, match=r"levit_unet_384 predicts at 224x224"):
        _resolve("masksup", {"arch": "levit_unet_384", "predict_size": [64, 64]})
    assert MaskSupKnobs(predict_size=[224, 224]).predict_size == [224, 224]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_and_presets_pass(method):
    knobs_type = METHODS[method][1]
    assert resolve({}, knobs_type, method).knobs == knobs_type()
    for preset in list_presets(method):
        resolve(load_preset(preset_path(method, preset)), knobs_type, method, source=preset)


@pytest.mark.parametrize(("method", "knobs"), [
    ("masksup", {"mask_ratio": 0.0, "mask_prob": 0.0, "hole_ratio_range": [0.0, 0.0]}),
    ("masksup", {"mask_ratio": 1.0, "mask_prob": 1.0, "hole_ratio_range": [1.0, 1.0],
                 "drop_path": 1.0, "width": 1, "patch_size": 1, "void_to_class": 0}),
    ("masksup", {"mask_ratio": None, "predict_size": None, "paper_metric_size": None}),
    ("supervised", {"label_smoothing": 0.0}),
    ("supervised", {"label_smoothing": 1.0}),
])
def test_values_at_the_bounds_pass(method, knobs):
    cfg = _resolve(method, knobs)
    assert all(getattr(cfg.knobs, k) == v for k, v in knobs.items())


def test_dataset_checks_stay_with_the_method():
    """binary, void_to_class's upper bound and LeViT's crop need the class count / crop size."""
    ctx = MethodContext(num_classes=4, crop_size=(32, 32))
    for knobs, message in (({"binary": True}, "binary is true but the dataset has 4 classes"),
                           ({"void_to_class": 4}, r"void_to_class must be a class id in \[0, 4\)"),
                           ({"arch": "levit_unet_384"}, "needs 224x224 training crops")):
        resolve({"knobs": {"arch": "unet", **knobs}}, MaskSupKnobs, "masksup")  # no dataset: fine
        with pytest.raises(ValueError, match=message):
            MaskSup(MaskSupKnobs(**{"arch": "unet", **knobs}), ctx)
    # Given as a mapping, the knob errors and the dataset's come in one message.
    with pytest.raises(ValueError) as err:
        MaskSup({"arch": "unet", "mask_ratio": 1.5, "binary": True}, ctx)
    assert "mask_ratio must be" in str(err.value) and "binary is true" in str(err.value)
    # A knobs object changed after construction is checked again.
    knobs = MaskSupKnobs(arch="unet")
    knobs.mask_prob = 3.0
    with pytest.raises(ValueError, match=r"mask_prob must be in \[0, 1\], got 3\.0"):
        MaskSup(knobs, ctx)


@pytest.mark.parametrize(("method", "space", "expected"), [
    ("masksup", {"mask_ratio": {"type": "uniform", "low": 0.1, "high": 1.5}},
     "mask_ratio=1.5: knobs: invalid masksup knobs: mask_ratio must be in [0, 1] or null"),
    ("masksup", {"patch_size": {"type": "choice", "values": [0, 16]}},
     "patch_size=0: knobs: invalid masksup knobs: patch_size must be an integer >= 1"),
    ("masksup", {"mask_prob": {"type": "uniform", "low": -0.5, "high": 1.0}},
     "mask_prob=-0.5: knobs: invalid masksup knobs: mask_prob must be in [0, 1]"),
    ("supervised", {"label_smoothing": {"type": "uniform", "low": 0.0, "high": 5.0}},
     "label_smoothing=5.0: knobs: invalid supervised knobs: label_smoothing must be in [0, 1]"),
])
def test_sweep_value_check_refuses_ranges_outside_the_knob(method, space, expected):
    method_cls, knobs_type = METHODS[method]
    base = to_dict(resolve(_demo(method), knobs_type, method))
    parsed = parse_space(space, knob_names(knobs_type))
    with pytest.raises(SpaceError) as err:
        check_values(parsed, base, knobs_type, method)
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith(expected), err.value.errors
    # The methods' own default spaces stay inside their knobs' ranges.
    check_values(parse_space(method_cls.search_space, knob_names(knobs_type)), base, knobs_type,
                 method)


def test_train_job_refuses_a_bad_knob_before_ray(tmp_path):
    proc = run_job("train.py", "--method", "masksup", "--set", "knobs.mask_ratio=1.5",
                   "--storage", str(tmp_path / "runs"), env=job_env(tmp_path), check=False,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "mask_ratio must be in [0, 1] or null, got 1.5" in proc.stdout, proc.stdout
    assert "(from --set knobs.mask_ratio=1.5)" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stdout and "Ray" not in proc.stdout, proc.stdout
    assert not (tmp_path / "runs").exists()


def test_tune_job_refuses_a_space_outside_a_knob_before_ray(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("mask_ratio: {type: uniform, low: 0.1, high: 1.5}\n")
    proc = run_job("tune.py", "--method", "masksup", "--space", str(space), "--storage",
                   str(tmp_path / "runs"), "--metrics-port", "0", env=job_env(tmp_path),
                   check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "mask_ratio=1.5: knobs: invalid masksup knobs: mask_ratio must be in [0, 1]" in proc.stdout
    assert "Traceback" not in proc.stdout and "Ray" not in proc.stdout, proc.stdout
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("sweep.yaml"))
