"""Command-line flags shared by the jobs, and config resolution from them.

Usage errors (unknown method, preset or key, bad value, missing dataset) are printed without a
traceback and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from segray import storage
from segray.config import ConfigError, deep_merge, load_preset, parse_overrides, resolve


class UsageParser(argparse.ArgumentParser):
    """argparse with exit code 2 and a one-line hint on errors (argparse's own convention)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}\n(see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Also record on the namespace (``_flags``) the flag each destination was given by,
        so errors about a value name the flag the user typed (``--workers-per-trial``)."""
        ns, rest = super().parse_known_args(args, namespace)
        own = {a.dest: next((o for o in a.option_strings if o.startswith("--")),
                            a.option_strings[0]) for a in self._actions if a.option_strings}
        ns._flags = {**own, **getattr(ns, "_flags", {})}  # a subcommand's own flags win
        return ns, rest


def checked_type(convert: Callable[[str], Any], check: Callable[[Any], Any],
                 expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, then ``check`` the value (it raises
    ``ValueError`` with its own message, or returns the value). Either failure becomes an
    ``ArgumentTypeError``, so a bad value is a usage error (exit code 2).

    Args:
        convert: text -> value, e.g. ``int``.
        check: value -> value, raising ``ValueError`` for a bad one.
        expected: what the value should be, for text ``convert`` cannot read.
    """
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _within(ok: Callable[[Any], bool], expected: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"expected {expected}, got {value}")
        return value
    return check


positive_int = checked_type(int, _within(lambda v: v >= 1, "an integer >= 1"), "an integer >= 1")
fraction = checked_type(float, _within(lambda v: 0 <= v < 1, "a number in [0, 1)"),
                        "a number in [0, 1)")
port_number = checked_type(int, _within(lambda v: 0 <= v <= 65535, "a port in 0-65535"),
                           "a port number")


def add_run_args(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    """Flags every run needs: method, preset, data, budget, scale, storage, name, seed, overrides."""
    p.add_argument("--method", default=method_default, help="method name (see --list-methods)")
    p.add_argument("--preset", default="demo", help="preset of the method (default: demo)")
    p.add_argument("--preset-file", default=None,
                   help="a preset YAML file instead of a shipped preset (e.g. a sweep's best.yaml)")
    p.add_argument("--data", default=None, help="dataset URI (local folder or s3://); default: "
                   "the built-in synthetic set")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate + checkpoint every N steps")
    p.add_argument("--workers", type=int, default=None, help="number of Ray Train workers")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU)")
    p.add_argument("--storage", default=None, help="run storage root (local or s3://)")
    p.add_argument("--name", default=None, help="run name; re-use a name to resume that run")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set optim.lr=0.01 (repeatable)")


# Keys of a preset file that tie it to one run folder. A run's config.yaml holds them; re-running
# it with --preset-file starts a fresh run (as the sweep's best.yaml does), so they are dropped and
# only --name / --storage pick the run.
RUN_KEYS = ("name", "storage")

FLAG_KEYS = {"data": "data.uri", "steps": "train.steps", "batch_size": "data.batch_size",
             "eval_every": "train.eval_every", "workers": "workers",
             "gpus_per_worker": "gpus_per_worker", "storage": "storage", "name": "name",
             "seed": "seed"}


def build_config(args: argparse.Namespace, warn_untrained: bool = True) -> Any:
    """Resolve preset + flags + ``--set`` overrides into a validated :class:`~segray.config.Config`.

    A ``--preset-file``'s ``name`` and ``storage`` (a run folder's ``config.yaml`` has both) are
    dropped, so the file starts a fresh run; ``--name`` / ``--storage`` choose one. Local paths
    (``data.uri``, ``model.pretrained``) are made absolute, so the saved config means the same
    files from any working directory.

    Args:
        args: parsed flags of :func:`add_run_args`.
        warn_untrained: print a warning when a non-demo preset has no ``model.pretrained``.

    Raises:
        SystemExit(2): on any usage error, with every problem listed; an error about a value
            given on the command line says which flag or ``--set`` item it came from.
    """
    from methods import get_method, preset_path

    try:
        method_cls = get_method(args.method)
        if args.preset_file:
            source = args.preset_file
            raw = load_preset(args.preset_file)
            preset = raw.pop("preset", None) or "custom"
            if raw.get("method") not in (None, args.method):
                raise ConfigError([f"{source} is a preset for method '{raw['method']}', "
                                   f"not '{args.method}'"])
            raw.pop("method", None)
            _drop_run_keys(raw, source)
        else:
            source = str(preset_path(args.method, args.preset))
            raw = load_preset(source)
            preset = args.preset
        flags = {key: getattr(args, attr) for attr, key in FLAG_KEYS.items()
                 if getattr(args, attr) is not None}
        over = parse_overrides([f"{k}={v}" for k, v in flags.items()])
        # Flags carry exact strings (paths, names): keep them unparsed.
        for key in ("storage", "name"):
            if key in flags:
                over[key] = flags[key]
        if "data.uri" in flags:
            over.setdefault("data", {})["uri"] = flags["data.uri"]
        typed = getattr(args, "_flags", {})
        origins = {k: typed.get(attr, "--" + attr.replace("_", "-"))
                   for attr, k in FLAG_KEYS.items() if k in flags}
        for item in args.overrides:
            origins[item.split("=", 1)[0].strip()] = f"--set {item}"
        raw = deep_merge(deep_merge(raw, over), parse_overrides(args.overrides))
        where = f"{source} and the command line" if origins else source
        cfg = resolve(raw, method_cls.Knobs, args.method, source=where, origins=origins)
        cfg.preset = preset
    except (ConfigError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    for section, key in ((cfg.data, "uri"), (cfg.model, "pretrained")):
        if getattr(section, key):
            setattr(section, key, storage.absolute(getattr(section, key)))
    if warn_untrained:
        warn_random_init(cfg, method_cls)
    return cfg


def _drop_run_keys(raw: dict[str, Any], source: str) -> None:
    dropped = {k: raw.pop(k) for k in RUN_KEYS if k in raw}
    named = {k: v for k, v in dropped.items() if v}
    if named:
        which = ", ".join(f"{k}: {v}" for k, v in named.items())
        again = " ".join(f"--{k} {v}" for k, v in named.items())
        print(f"[segray] note: {source} names a run ({which}); a preset file starts a fresh run: "
              f"pass {again} to resume that run instead", file=sys.stderr)


def warn_random_init(cfg: Any, method_cls: Any) -> None:
    """Warn (one line on stderr) when a non-demo preset would train without pretrained weights.

    A method whose network is meant to start from scratch for some knobs can say so with an
    optional ``pretrained_expected(knobs) -> bool``; without it, weights are expected.
    """
    if cfg.preset == "demo" or cfg.model.pretrained:
        return
    expected = getattr(method_cls, "pretrained_expected", None)
    if callable(expected) and not expected(cfg.knobs):
        return
    model = getattr(cfg.knobs, "arch", None) or cfg.model.encoder
    print(f"warning: model.pretrained is empty: training {model} from random initialisation; "
          "the paper recipe starts from pretrained weights "
          "(pass --set model.pretrained=PATH_OR_S3_URI)", file=sys.stderr)
