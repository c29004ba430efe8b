"""Train a method: ``python jobs/train.py --method semask [--preset P] [--data URI] [--set k=v]``.

With no argument it trains the default method's ``demo`` preset on the built-in synthetic dataset,
on a local Ray instance, and prints the validation mIoU and the run folder. Re-running with the same
``--name`` (and ``--storage``) resumes that run from its latest checkpoint.
"""

from __future__ import annotations

import sys

from segray.cli import UsageParser, add_run_args, build_config
from segray.launch import UsageError, fail_usage, run_training

DEFAULT_METHOD = "semask"


def main(argv: list[str] | None = None) -> int:
    parser = UsageParser(prog="jobs/train.py", description=__doc__.split("\n\n")[0])
    add_run_args(parser, method_default=DEFAULT_METHOD)
    parser.add_argument("--list-methods", action="store_true", help="list methods and presets")
    args = parser.parse_args(argv)
    if args.list_methods:
        from methods import METHODS, list_presets

        for name in sorted(METHODS):
            print(f"{name}: {', '.join(list_presets(name))}")
        return 0
    cfg = build_config(args)
    try:
        summary = run_training(cfg)
    except UsageError as e:
        fail_usage(str(e))
    except FloatingPointError as e:  # segray.engine.Diverged: the run's settings, not the
        fail_usage(str(e), code=1)     # command line; exit 1, without a traceback
    val = summary["val"]
    print(f"\nvalidation mIoU: {val['mIoU']:.2f}  (majority-class baseline: "
          f"{val['majority_mIoU']:.2f})  mAcc {val['mAcc']:.2f}  aAcc {val['aAcc']:.2f}")
    cost = summary["cost"]
    if cost.get("images_per_s"):
        wall = f", wall {cost['wall_time_s']:.0f} s" if cost.get("wall_time_s") else ""
        print(f"throughput: {cost['images_per_s']:.1f} images/s, data wait "
              f"{100 * (cost['data_wait_share'] or 0):.0f}%{wall}")
    print(f"run folder: {summary['run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
