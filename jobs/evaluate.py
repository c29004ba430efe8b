"""Evaluate a checkpoint on a dataset split: metrics JSON + prediction overlays.

``python jobs/evaluate.py --checkpoint RUN/step_0000300 [--data URI] [--split val]
[--mode whole|slide --crop 512 512 --stride 341 341] [--tta | --no-tta] [--test-scale LONG SHORT]
[--max-images N] [--images 8] [--out DIR]``

Options left out keep the checkpoint's own ``eval`` settings.
"""

from __future__ import annotations

import argparse
import json
import sys

from segray.cli import UsageParser, positive_int
from segray.launch import fail_usage


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (local or s3://)")
    p.add_argument("--data", default=None, help="dataset URI (default: the run's dataset)")
    p.add_argument("--split", default="val")
    p.add_argument("--mode", choices=["whole", "slide"], default=None)
    p.add_argument("--crop", type=positive_int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--stride", type=positive_int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="multi-scale + flip test-time augmentation on or off "
                        "(default: the checkpoint's eval.tta)")
    p.add_argument("--test-scale", type=positive_int, nargs=2, default=None,
                   metavar=("LONG", "SHORT"))
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most N images (0: all)")
    p.add_argument("--images", type=int, default=8, help="overlays to save (0: none)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/eval/<step>-<split>, beside the checkpoints)")
    args = p.parse_args(argv)
    for flag in ("max_images", "images"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")

    from segray import storage
    from segray.config import check
    from segray.data import BadSampleError, DatasetError
    from segray.evaluation import load_for_eval, run_evaluation

    try:
        method, model, cfg, info = load_for_eval(args.checkpoint, args.data)
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail_usage(str(e.args[0] if isinstance(e, KeyError) else e))
    if not info.has_split(args.split):
        fail_usage(f"dataset {info.uri} has no split '{args.split}' "
                   f"(it has: {', '.join(info.split_names)})")
    e = cfg.eval
    e.mode = args.mode or e.mode
    e.crop, e.stride = args.crop or e.crop, args.stride or e.stride
    e.tta = e.tta if args.tta is None else args.tta
    e.test_scale = args.test_scale or e.test_scale
    if e.mode == "slide" and not (e.crop and e.stride):
        fail_usage("--mode slide needs --crop H W and --stride H W (e.g. --crop 512 512 --stride 341 341)")
    problems = check(cfg)  # the flags over the checkpoint's settings, e.g. a stride above the crop
    if problems:
        fail_usage("\n  - ".join([f"{len(problems)} problem(s) with the evaluation settings:",
                                   *problems]))
    # Beside the run's checkpoints, not in one: Ray prunes checkpoint folders whole.
    checkpoint = args.checkpoint.rstrip("/")
    run, _, step = checkpoint.rpartition("/")
    out = args.out or storage.join(run or ".", "eval", f"{step}-{args.split}")
    try:
        summary = run_evaluation(method, model, cfg, info, args.split, out,
                                 max_images=args.max_images, keep=args.images)
    except (DatasetError, BadSampleError, FileNotFoundError) as e:  # names the shard (and key)
        fail_usage(f"{e}; nothing was written to {out}")
    print(json.dumps(summary["metrics"], indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
