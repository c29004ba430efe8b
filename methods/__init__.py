"""segray's methods: one module (or package) per method, plus presets in ``methods/presets/``.

The registry is a plain dict filled by explicit imports, so a method is known exactly when it is
imported here — never as a side effect of importing something else.

Example:
    >>> get_method("supervised").name
    'supervised'
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from methods.base import STREAMS, Method, MethodContext, call_hook
from methods.masksup import MaskSup
from methods.semask import SeMask
from methods.supervised import Supervised

METHODS: dict[str, type] = {
    MaskSup.name: MaskSup,
    SeMask.name: SeMask,
    Supervised.name: Supervised,
}

PRESET_ROOT = Path(__file__).parent / "presets"

__all__ = ["METHODS", "STREAMS", "Method", "MethodContext", "call_hook", "get_method",
           "list_presets", "preset_path"]


def _unknown(kind: str, name: str, choices: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return KeyError(f"unknown {kind} '{name}'{hint} ({', '.join(choices)})")


def get_method(name: str) -> type:
    """Return the method class registered under ``name``, or named ``package.module:Class``.

    The ``module:Class`` form plugs in a method that lives outside this package (a user's own
    module on the Python path) without editing the registry.

    Raises:
        KeyError: naming the closest registered method and listing all of them.
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"cannot load method '{name}': {e}") from e
    if name not in METHODS:
        raise _unknown("method", name, sorted(METHODS))
    return METHODS[name]


def list_presets(method: str) -> list[str]:
    """Names of the presets shipped for ``method``."""
    return sorted(p.stem for p in (PRESET_ROOT / method).glob("*.yaml"))


def preset_path(method: str, preset: str) -> Path:
    """Path of a shipped preset.

    Raises:
        KeyError: naming the closest preset of that method and listing all of them.
    """
    path = PRESET_ROOT / method / f"{preset}.yaml"
    if not path.is_file():
        raise _unknown(f"preset for method '{method}'", preset, list_presets(method))
    return path
