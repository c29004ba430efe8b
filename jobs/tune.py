"""Sweep a method's knobs: ``python jobs/tune.py --method masksup --samples 32 [--space S.yaml]``.

Each trial is a Ray Train run of the method with sampled knobs; Optuna (TPE) picks the points,
ASHA stops poor trials after a few evaluation rounds. The sweep folder ``<storage>/<name>`` gets
a table of trials, plots, ``best.yaml`` (re-run with ``jobs/train.py --preset-file``) and
``report.html``. Ctrl-C (SIGINT) or SIGUSR1 interrupts a sweep: Tune saves its state, the running
trials show as ``interrupted`` and the job exits 130, printing the ``--resume`` command that
continues them. On a cluster that autoscales from zero, pass ``--max-concurrent``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import TYPE_CHECKING

from segray import storage
from segray.cli import UsageParser, build_config, port_number
from segray.config import ConfigError, read_yaml, to_dict
from segray.launch import UsageError, default_storage, fail_usage
from segray.sweep import SweepSpec, check_values, parse_space
from segray.sweep.exporter import DEFAULT_PORT
from segray.sweep.space import knob_names

if TYPE_CHECKING:
    from segray.sweep.results import TrialRow


def parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="jobs/tune.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="masksup", help="method to sweep (default: masksup)")
    p.add_argument("--preset", default="demo", help="base preset of every trial (default: demo)")
    p.add_argument("--preset-file", default=None, help="a preset YAML file as the base instead")
    p.add_argument("--data", default=None, help="dataset URI (default: the built-in synthetic set)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of a full trial")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size of a trial")
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate + checkpoint every N steps (one evaluation = one ASHA round)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value for every trial (repeatable)")
    p.add_argument("--samples", type=int, default=16, help="number of trials (default: 16)")
    p.add_argument("--space", default=None,
                   help="search-space YAML (default: the method's search_space)")
    p.add_argument("--workers-per-trial", dest="workers", type=int, default=None,
                   help="Ray Train workers of each trial")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per worker (0 = CPU)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once, kept by --resume (default: as many as the cluster "
                   "holds now; needed on a cluster with no room for one trial yet)")
    p.add_argument("--storage", default=None, help="storage root (local or s3://); the sweep "
                   "folder is <storage>/<name>")
    p.add_argument("--name", default=None, help="sweep name (default: <method>-sweep-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep --name with its saved settings")
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha",
                   help="asha: stop poor trials early; none: run every trial to the end")
    p.add_argument("--grace-period", type=int, default=1,
                   help="evaluation rounds before ASHA may stop a trial (default: 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA keeps the best 1/R of trials at each rung (default: 2)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler and of every run")
    p.add_argument("--metrics-port", type=port_number, default=DEFAULT_PORT,
                   help=f"Prometheus port on 127.0.0.1 (default: {DEFAULT_PORT}; 0 = off)")
    return p


def new_spec(args: argparse.Namespace, root: str, name: str) -> SweepSpec:
    """Resolve the base config and the space into a sweep definition (exit 2 on any problem)."""
    from methods import get_method

    problems = []
    if args.samples < 1:
        problems.append(f"--samples must be >= 1, got {args.samples}")
    if args.grace_period < 1:
        problems.append(f"--grace-period must be >= 1 evaluation round, got {args.grace_period}")
    if args.reduction_factor <= 1:
        problems.append(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        problems.append(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if problems:
        fail_usage("\n  - ".join([f"{len(problems)} problem(s) with the flags:", *problems]))
    # Trials get their own names and folders under the sweep: the base config has neither.
    cfg = build_config(argparse.Namespace(**{**vars(args), "name": None, "storage": None}))
    base = to_dict(cfg)
    base["name"], base["storage"] = "", ""
    knobs = get_method(args.method).Knobs
    try:
        if args.space:
            # Read as config files are (YAML 1.2 numbers: low: 1e-4 is a number, not text).
            raw, source = read_yaml(args.space, what="search-space file"), args.space
        else:
            raw, source = get_method(args.method).search_space, f"{args.method}.search_space"
            if not raw:
                fail_usage(f"method '{args.method}' has no default search space; pass --space "
                           f"FILE (e.g. 'optim.lr: {{type: loguniform, low: 1.0e-4, high: "
                           f"1.0e-2}}')")
        space = parse_space(raw, knob_names(knobs), source=source)
        check_values(space, base, knobs, args.method, source=source)
    except (ConfigError, FileNotFoundError) as e:
        fail_usage(str(e))
    spec = SweepSpec(name=name, root=root, method=args.method, base=base, space=space,
                     samples=args.samples, scheduler=args.scheduler,
                     grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                     seed=args.seed or 0, max_concurrent=args.max_concurrent)
    if spec.scheduler == "asha" and spec.grace_period >= spec.rounds:
        print(f"[segray] note: a trial evaluates {spec.rounds} time(s) (train.steps / "
              f"train.eval_every), so ASHA with --grace-period {spec.grace_period} cannot stop "
              f"one early; every trial runs to the end (evaluate more often to use ASHA)",
              file=sys.stderr)
    return spec


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = storage.absolute(args.storage or default_storage())
    if args.resume:
        if not args.name:
            fail_usage("--resume needs the --name of the sweep to continue (and its --storage)")
        root = storage.join(store, args.name)
        try:
            spec = SweepSpec.load(root)
        except FileNotFoundError as e:
            fail_usage(f"{e}; start the sweep without --resume")
        if args.max_concurrent is not None and args.max_concurrent != spec.max_concurrent:
            # Tune restores its trial limit with the sweep's state: a new value would not apply.
            fail_usage(f"--max-concurrent {args.max_concurrent}: sweep {spec.name} runs "
                       f"{spec.max_concurrent} trial(s) at a time, fixed when it started, and a "
                       f"resumed sweep keeps it; drop --max-concurrent, or start a new sweep")
        print(f"[segray] --resume: sweep {spec.name} continues with the settings it started with "
              f"({storage.join(root, 'sweep.yaml')}); other sweep flags are not used")
    else:
        name = args.name or f"{args.method}-sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        root = storage.join(store, name)
        if storage.exists(storage.join(root, "sweep.yaml")):
            fail_usage(f"sweep '{name}' already exists at {root}; add --resume to continue it or "
                       f"pick another --name")
        spec = new_spec(args, root, name)
    from segray.sweep.runner import run_sweep

    try:
        outcome = run_sweep(spec, resume=args.resume, metrics_port=args.metrics_port)
    except (UsageError, OSError) as e:
        fail_usage(str(e))
    except KeyboardInterrupt:  # before Tune caught the signal, or a second Ctrl-C
        return interrupted(spec, store)
    print("\n" + open_table(outcome.files))
    if outcome.interrupted:
        return interrupted(spec, store, outcome.rows)
    best = outcome.best
    if best is None:
        from segray.engine import DIVERGED_FIX

        diverged = sum(r.status == "diverged" for r in outcome.rows)
        print(f"every trial diverged: {DIVERGED_FIX} in the base config or the space"
              if diverged and diverged == len(outcome.rows) else
              "no trial produced a validation mIoU; see the errors above")
        return 1
    knobs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in best.knobs.items())
    print(f"best trial {best.trial}: validation mIoU {best.best_miou:.2f} ({knobs})")
    if "best.yaml" in outcome.files:
        print(f"re-run it: {rerun_command(spec.method, outcome.files['best.yaml'])}")
    print(f"sweep folder: {spec.root} (report.html, trials.csv, TensorBoard: {spec.tune_dir})")
    return 0


def interrupted(spec: SweepSpec, store: str, rows: list[TrialRow] | None = None) -> int:
    """Say how to continue an interrupted sweep; the exit code of an interrupt (130)."""
    if not storage.exists(storage.join(spec.root, "sweep.yaml")):
        print(f"sweep {spec.name} interrupted before it started; run the same command again")
        return 130
    if rows is not None:
        from segray.sweep.results import ENDED

        ended = sum(r.status in ENDED for r in rows)
        cut = [r.trial for r in rows if r.status == "interrupted"]
        print(f"sweep {spec.name} interrupted: {ended} of {spec.samples} trials ended"
              + (f"; interrupted, to continue on resume: {', '.join(cut)}" if cut else ""))
    print(f"resume it: {resume_command(spec.name, store)}")
    return 130


def resume_command(name: str, store: str) -> str:
    """The command that continues the sweep ``name`` under the storage root ``store``."""
    return (f"python jobs/tune.py --name {shlex.quote(name)} --storage {shlex.quote(store)} "
            f"--resume")


def rerun_command(method: str, best: str) -> str:
    """The command that re-runs the best trial (a preset on S3 is copied down first)."""
    if storage.is_s3(best):
        return (f"aws s3 cp {best} best.yaml && python jobs/train.py --method {method} "
                f"--preset-file best.yaml")
    return f"python jobs/train.py --method {method} --preset-file {best}"


def open_table(files: dict[str, str]) -> str:
    """The Markdown table of trials, as written to the sweep folder."""
    return storage.read_text(files["trials.md"]) if "trials.md" in files else ""


if __name__ == "__main__":
    sys.exit(main())
