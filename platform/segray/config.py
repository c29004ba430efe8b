"""Typed run configuration: a preset YAML, at most one level of ``base:`` inheritance, and
``--set a.b=c`` overrides, validated against dataclasses with every error reported at once.

Class count, palette and ignore index are deliberately absent: they come from the dataset manifest.

Example:
    >>> cfg = resolve({"train": {"steps": 10}}, knobs_type=None, method="supervised")
    >>> cfg.train.steps
    10
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from segray.config_checks import check  # noqa: F401 - part of this module's API


class ConfigError(ValueError):
    """One or more invalid config values; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str], source: str = "config") -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} problem(s) in {source}:\n{lines}")


@dataclass
class DataConfig:
    """Where the data comes from and how training crops are made (on CPU, in Ray Data)."""

    uri: str = ""  # "" = the built-in synthetic set in the cache folder
    crop_size: list[int] = field(default_factory=lambda: [64, 64])
    base_scale: list[int] | None = None  # mmseg img_scale [long, short]; None = the image's own size
    resize: list[int] | None = None  # [h, w]: every image resized to exactly this (aspect not kept,
    #                                  mmseg keep_ratio=False), then scaled by the drawn ratio
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    scale_choices: list[float] | None = None  # discrete ratios instead of a uniform range
    resample: Literal["cv2", "pillow"] = "cv2"  # image filter of the rescale: mmcv's cv2 bilinear,
    #                                             or Pillow's antialiased one (torchvision on PIL)
    mask_resample: Literal["nearest", "cv2_nearest", "cv2_area"] = "nearest"  # label filter:
    #   pixel centres, OpenCV's INTER_NEAREST, or OpenCV's INTER_AREA of binary {0, 1} labels
    cat_max_ratio: float = 1.0
    batch_size: int = 8  # global batch, split across workers
    eval_batch_size: int = 8
    train_split: str = "train"
    val_split: str = "val"
    unlabeled_split: str = "unlabeled"
    on_bad_sample: Literal["error", "skip"] = "error"
    prefetch_batches: int = 2
    rows_per_execution: int = 0  # >= this many rows per Ray Data execution; 0 = the whole run
    shuffle_buffer: int = 64  # rows; shards keep row order, so mix within a worker too


@dataclass
class ModelConfig:
    """Backbone and decoder, used by methods that build a generic encoder-decoder."""

    encoder: str = "resnet18"
    decoder: str = "fpn"
    decoder_channels: int = 128
    pretrained: str = ""  # local file or s3:// URI of a timm state dict
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (all counted in optimizer steps)."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    amsgrad: bool = False
    no_decay: list[str] = field(default_factory=list)  # name substrings with weight decay 0
    schedule: Literal["poly", "constant", "step"] = "poly"
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6
    step_size: int = 0
    step_gamma: float = 0.1
    grad_clip: float = 0.0


@dataclass
class AugmentConfig:
    """On-device augmentation (Kornia) and normalisation, statistics on the 0-255 scale, RGB."""

    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    hflip: float = 0.5
    photometric: bool = True


@dataclass
class TrainConfig:
    """Length, cadence and numerics of the training loop."""

    steps: int = 1000
    eval_every: int = 200
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    keep_checkpoints: int = 2
    max_failures: int = 3
    channels_last: Literal["auto", "on", "off"] = "auto"
    eval_max_images: int = 0  # 0 = the whole split
    report_images: int = 8


@dataclass
class EvalConfig:
    """How validation and ``jobs/evaluate.py`` segment full-size images."""

    mode: Literal["whole", "slide"] = "whole"
    test_scale: list[int] | None = None  # keep-ratio [long, short]
    crop: list[int] | None = None
    stride: list[int] | None = None
    tta: bool = False
    ratios: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    flip: bool = True


@dataclass
class Config:
    """A fully resolved run configuration."""

    method: str = ""  # set by the job from --method
    preset: str = ""
    name: str = ""
    storage: str = ""  # run storage root (local or s3://); "" = <cache>/runs
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    knobs: Any = None  # the method's Knobs dataclass


# ---------------------------------------------------------------------------------------------
# Loading presets and overrides
# ---------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (same safe constructors) that reads floats as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``2e-4`` and ``1E5`` load as strings and
    ``optim.lr=2e-4`` would be refused. Here an exponent alone makes a float too; integers, dates
    and everything else resolve as before.
    """


_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:
     [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 floats: ``2e-4``, ``1E5`` and ``1.0e-4`` are numbers.

    Example:
        >>> yaml_load("lr: 2e-4")
        {'lr': 0.0002}
    """
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: safe_load semantics


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping with :func:`yaml_load`; errors name the file.

    Raises:
        FileNotFoundError: naming the missing file (``what`` says what it should have been).
        ConfigError: the file is not UTF-8, not valid YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        data = yaml_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a {what} "
                           "must be a UTF-8 YAML file"], str(path)) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"], str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top, got {type(data).__name__}"])
    return data


def load_preset(path: str | Path) -> dict[str, Any]:
    """Load a preset file and merge it over its ``base`` (one level only, same folder)."""
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    if base:
        base_path = path.with_name(f"{base}.yaml")
        if not base_path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise ConfigError([f"{path}: base preset '{base}' not found{_suggest(base, known)}"])
        base_data = read_yaml(base_path)
        if base_data.get("base"):
            raise ConfigError(
                [f"{path}: base '{base}' has a base of its own; presets allow one level of "
                 "inheritance — copy the values into the base instead"]
            )
        data = deep_merge(base_data, data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into a copy of ``base`` (mappings merge, other values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars/lists
    (:func:`yaml_load`, so ``optim.lr=2e-4`` is a number).

    Raises:
        ConfigError: for an item without ``=``.
    """
    out: dict[str, Any] = {}
    errors = []
    for item in items:
        if "=" not in item:
            errors.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                errors.append(f"--set {item!r}: '{p}' is set both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    if errors:
        raise ConfigError(errors, "--set overrides")
    return out


def resolve(raw: dict[str, Any], knobs_type: type | None, method: str, source: str = "config",
            origins: dict[str, str] | None = None) -> Config:
    """Build and validate a :class:`Config` from a raw mapping, reporting every error at once.

    Args:
        raw: merged preset + overrides.
        knobs_type: the method's Knobs dataclass (``None`` for no knobs).
        method: method name recorded in the config.
        source: what to call the input in error messages (preset path, "--set overrides"...).
        origins: where values not from ``source`` came from, by dotted key
            (``{"optim.lr": "--set optim.lr=2e-4"}``); an error about such a key names it.

    Raises:
        ConfigError: listing every unknown key, wrong type and invalid value.
    """
    errors: list[str] = []
    raw = dict(raw)
    raw.pop("base", None)
    knobs_raw = raw.pop("knobs", None) or {}
    cfg = _build(Config, raw, "", errors)
    cfg.method = method
    if knobs_type is not None:
        cfg.knobs = _build(knobs_type, knobs_raw, "knobs.", errors)
    elif knobs_raw:
        errors.append(f"knobs: method '{method}' has no knobs, got {sorted(knobs_raw)}")
    if not errors:
        errors += check(cfg)
    if errors:
        raise ConfigError([_with_origin(err, origins or {}) for err in errors], source)
    return cfg


def _with_origin(error: str, origins: dict[str, str]) -> str:
    """``error`` with ``(from --set ...)`` appended when the key it is about came from there."""
    match = re.match(r"(?:unknown key ')?([\w.]+)", error)
    key = match.group(1) if match else ""
    found = [origins[k] for k in origins if k == key or k.startswith(key + ".")] if key else []
    return f"{error} (from {', '.join(dict.fromkeys(found))})" if found else error


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """A plain, YAML-safe dict of the config (knobs included)."""
    out = dataclasses.asdict(dataclasses.replace(cfg, knobs=None))
    out["knobs"] = dataclasses.asdict(cfg.knobs) if dataclasses.is_dataclass(cfg.knobs) else {}
    return out


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, as saved in every run folder."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (choices: {', '.join(choices)})"


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            errors.append(f"unknown key '{prefix}{key}'{_suggest(str(key), names)}")
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", errors)
        elif hint is Any:
            kwargs[key] = value
        else:
            ok, converted, expected = _coerce(value, hint)
            if ok:
                kwargs[key] = converted
            else:
                errors.append(f"{prefix}{key}: expected {expected}, got {value!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a dataclass's own __post_init__ validation
        errors.append(f"{prefix.rstrip('.') or 'config'}: {e}")
        return cls()


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Check ``value`` against a type hint, converting int→float; returns (ok, value, expected)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return value in args, value, "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None, "null"
        expected = []
        for a in args:
            if a is type(None):
                continue
            ok, conv, exp = _coerce(value, a)
            if ok:
                return True, conv, exp
            expected.append(exp)
        return False, value, " or ".join(expected) + " or null"
    if origin is list:
        (item,) = args or (Any,)
        if not isinstance(value, list | tuple):
            return False, value, f"a list of {_name(item)}"
        out = []
        for v in value:
            ok, conv, _ = _coerce(v, item) if item is not Any else (True, v, "")
            if not ok:
                return False, value, f"a list of {_name(item)}"
            out.append(conv)
        return True, out, f"a list of {_name(item)}"
    if origin is dict:
        return isinstance(value, dict), value, "a mapping"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):  # .inf / .nan are YAML numbers no setting can use
            return False, value, "a finite number"
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    return isinstance(value, hint), value, _name(hint)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
