"""Search spaces: parse, validate and apply the knobs a sweep varies (no Ray needed).

A space maps a knob to a distribution. Keys are the method's knob names (``mask_ratio``, also
accepted as ``knobs.mask_ratio``) or dotted config keys (``optim.lr``); values are mappings::

    mask_ratio: {type: uniform, low: 0.1, high: 0.75}
    optim.lr:   {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    width:      {type: int, low: 8, high: 32}          # both ends included
    holes:      {type: choice, values: [freeform, patches]}

The same shape is a method's ``search_space`` class attribute, so the default space and a user's
YAML file go through one validator, which reports every problem at once.

Example:
    >>> space = parse_space({"mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.7}},
    ...                     knob_names=["mask_ratio"])
    >>> space["mask_ratio"].config_key
    'knobs.mask_ratio'
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from segray.config import Config, ConfigError, deep_merge, resolve, yaml_load

TYPES = ("uniform", "loguniform", "int", "choice")
FIELDS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "int": ("low", "high"),
          "choice": ("values",)}
# Config sections whose leaves a sweep may vary. Run length and evaluation cadence define the
# evaluation rounds early stopping counts, and data.uri would compare different datasets, so those
# stay fixed for the whole sweep (set them with --steps / --eval-every / --data instead).
SECTIONS = ("data", "model", "optim", "augment", "train", "eval")
FIXED_KEYS = ("data.uri", "train.steps", "train.eval_every", "data.train_split", "data.val_split")


class SpaceError(ConfigError):
    """One or more problems in a search space; ``errors`` lists each of them."""


@dataclass(frozen=True)
class Dist:
    """One knob's distribution.

    Attributes:
        key: knob name (``mask_ratio``) or dotted config key (``optim.lr``), as the table shows it.
        type: ``uniform``, ``loguniform``, ``int`` (both ends included) or ``choice``.
        low: lower bound (not for ``choice``).
        high: upper bound (not for ``choice``).
        values: the choices (``choice`` only).
    """

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple[Any, ...] | None = None

    @property
    def config_key(self) -> str:
        """Where the value lands in the run config: ``knobs.<knob>`` or the dotted key itself."""
        return self.key if "." in self.key else f"knobs.{self.key}"

    @property
    def is_log(self) -> bool:
        return self.type == "loguniform"

    def probes(self) -> list[Any]:
        """Values that must all be valid configs: both bounds, or every choice."""
        return list(self.values) if self.type == "choice" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (as written in ``sweep.yaml``)."""
        if self.type == "choice":
            return {"type": "choice", "values": list(self.values or ())}
        return {"type": self.type, "low": self.low, "high": self.high}

    def to_tune(self) -> Any:
        """The matching ``ray.tune`` distribution."""
        from ray import tune

        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint excludes its upper end
        return tune.choice(list(self.values or ()))


def knob_names(knobs_type: type | None) -> list[str]:
    """The knob names of a method's ``Knobs`` dataclass."""
    if knobs_type is None or not dataclasses.is_dataclass(knobs_type):
        return []
    return [f.name for f in dataclasses.fields(knobs_type)]


def config_keys() -> list[str]:
    """Dotted config keys a sweep may vary (leaves of the run-config sections)."""
    hints = typing.get_type_hints(Config)
    keys = []
    for section in SECTIONS:
        for f in dataclasses.fields(hints[section]):
            key = f"{section}.{f.name}"
            if key not in FIXED_KEYS:
                keys.append(key)
    return keys


def load_space_file(path: str | Path) -> Any:
    """Read a space YAML with :func:`segray.config.yaml_load` (``safe_load``; ``1e-4`` is a number).

    Raises:
        FileNotFoundError: naming the missing file.
        SpaceError: when the file is not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no search-space file at {path}")
    try:
        return yaml_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError([f"not valid YAML ({e})"], str(path)) from e


def parse_space(raw: Any, knob_names: list[str], source: str = "search space") -> dict[str, Dist]:
    """Validate a raw space mapping and return one :class:`Dist` per key, in file order.

    Args:
        raw: the mapping (a method's ``search_space`` or a loaded YAML file).
        knob_names: the method's knobs; any other undotted key is an error.
        source: what to call the space in messages (file path, "masksup.search_space").

    Raises:
        SpaceError: listing every unknown key and malformed distribution at once.
    """
    if not isinstance(raw, dict) or not raw:
        got = "nothing" if raw in (None, {}) else f"{type(raw).__name__} {raw!r}"[:80]
        raise SpaceError([f"expected a mapping of knob -> distribution, e.g. "
                          f"'mask_ratio: {{type: uniform, low: 0.1, high: 0.75}}', got {got}"],
                         source)
    errors: list[str] = []
    out: dict[str, Dist] = {}
    allowed = config_keys()
    for key, spec in raw.items():
        name = _canonical(str(key), knob_names, allowed, errors)
        if name is None:
            continue
        if name in out:
            errors.append(f"'{key}': the same knob appears twice ('{name}')")
            continue
        dist = _parse_dist(name, spec, errors)
        if dist is not None:
            out[name] = dist
    if errors:
        raise SpaceError(errors, source)
    return out


def _canonical(key: str, knobs: list[str], allowed: list[str], errors: list[str]) -> str | None:
    if key.startswith("knobs."):
        key = key[len("knobs."):]
    if "." not in key:
        if key in knobs:
            return key
        close = difflib.get_close_matches(key, knobs + allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        valid = ", ".join(knobs) or "none"
        errors.append(f"unknown knob '{key}'{hint} (knobs: {valid}; or a dotted config key "
                      f"such as optim.lr)")
        return None
    if key in allowed:
        return key
    if key in FIXED_KEYS:
        errors.append(f"'{key}' is fixed for the whole sweep (it defines the runs' length, "
                      f"evaluation rounds or dataset); set it with a flag or --set instead")
        return None
    section = key.split(".", 1)[0]
    same = [k for k in allowed if k.startswith(section + ".")]
    close = difflib.get_close_matches(key, same or allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    where = (f"keys of '{section}': {', '.join(k.split('.', 1)[1] for k in same)}" if same
             else f"sections: {', '.join(SECTIONS)}")
    errors.append(f"unknown config key '{key}'{hint} ({where})")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_dist(key: str, spec: Any, errors: list[str]) -> Dist | None:
    example = "{type: uniform, low: 0.1, high: 0.9}"
    if not isinstance(spec, dict):
        errors.append(f"{key}: expected a distribution like {example}, got {spec!r}")
        return None
    kind = spec.get("type")
    if kind not in TYPES:
        close = difflib.get_close_matches(str(kind), TYPES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        what = "missing 'type'" if kind is None else f"unknown type {kind!r}{hint}"
        errors.append(f"{key}: {what} (types: {', '.join(TYPES)})")
        return None
    needed = FIELDS[kind]
    problems = []
    for extra in sorted(set(spec) - {"type", *needed}, key=str):
        close = difflib.get_close_matches(str(extra), needed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"unexpected field '{extra}' for type {kind}{hint} "
                        f"(fields: {', '.join(needed)})")
    problems += [f"type {kind} needs '{f}'" for f in needed if f not in spec]
    if problems:
        errors += [f"{key}: {p}" for p in problems]
        return None
    if kind == "choice":
        values = spec["values"]
        if not isinstance(values, list) or not values:
            errors.append(f"{key}: 'values' must be a non-empty list, got {values!r}")
            return None
        bad = [v for v in values if not (v is None or isinstance(v, bool | int | float | str))]
        if bad:
            errors.append(f"{key}: choice values must be numbers, strings, booleans or null, "
                          f"got {bad[0]!r}")
            return None
        if len({repr(v) for v in values}) != len(values):
            errors.append(f"{key}: 'values' lists a value twice: {values}")
            return None
        return Dist(key, kind, values=tuple(values))
    low, high = spec["low"], spec["high"]
    if not (_number(low) and _number(high)):
        errors.append(f"{key}: 'low' and 'high' must be numbers, got low={low!r}, high={high!r}")
        return None
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            errors.append(f"{key}: type int needs integer bounds, got low={low}, high={high}")
            return None
        if low > high:
            errors.append(f"{key}: needs low <= high, got low={low}, high={high}")
            return None
        return Dist(key, kind, low=int(low), high=int(high))
    if low >= high:
        errors.append(f"{key}: needs low < high, got low={low}, high={high}")
        return None
    if kind == "loguniform" and low <= 0:
        errors.append(f"{key}: loguniform needs low > 0, got low={low}; use uniform for ranges "
                      f"that include 0")
        return None
    return Dist(key, kind, low=float(low), high=float(high))


def overrides(sample: dict[str, Any]) -> dict[str, Any]:
    """Nested config overrides for a sampled point (``{"mask_ratio": .3}`` -> knobs.mask_ratio).

    Example:
        >>> overrides({"mask_ratio": 0.3, "optim.lr": 1e-3})
        {'knobs': {'mask_ratio': 0.3}, 'optim': {'lr': 0.001}}
    """
    out: dict[str, Any] = {}
    for key, value in sample.items():
        path = key if "." in key else f"knobs.{key}"
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def trial_config(base: dict[str, Any], sample: dict[str, Any], knobs_type: type | None,
                 method: str, source: str = "trial") -> Config:
    """The validated run config of one trial: the sweep's base config with the sample applied.

    Args:
        base: the resolved base config as a plain dict (:func:`segray.config.to_dict`).
        sample: knob -> value, as Tune sampled it.
        knobs_type: the method's ``Knobs`` dataclass.
        method: method name.
        source: what to call the config in error messages.

    Raises:
        ConfigError: when the sampled values make an invalid config.
    """
    raw = deep_merge(base, overrides(sample))
    preset = raw.get("preset", "")
    cfg = resolve(raw, knobs_type, method, source=source)
    cfg.preset = preset
    return cfg


def check_values(space: dict[str, Dist], base: dict[str, Any], knobs_type: type | None,
                 method: str, source: str = "search space") -> None:
    """Check that every bound and choice of ``space`` gives a valid run config.

    Catches values of the wrong type or outside what the config accepts (``holes: squares``,
    ``optim.lr`` down to 0) before a single trial starts.

    Raises:
        SpaceError: listing every offending value.
    """
    errors = []
    for dist in space.values():
        for value in dist.probes():
            try:
                trial_config(base, {dist.key: value}, knobs_type, method)
            except ConfigError as e:
                errors += [f"{dist.key}={value!r}: {err}" for err in e.errors]
    if errors:
        raise SpaceError(errors, source)


def space_from_dicts(raw: dict[str, dict[str, Any]]) -> dict[str, Dist]:
    """Rebuild a space saved with :meth:`Dist.to_dict` (already validated once)."""
    out = {}
    for key, spec in raw.items():
        if spec["type"] == "choice":
            out[key] = Dist(key, "choice", values=tuple(spec["values"]))
        else:
            out[key] = Dist(key, spec["type"], low=spec["low"], high=spec["high"])
    return out
