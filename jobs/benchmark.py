"""Throughput measured side by side in one run, printed as a table (``--out`` writes JSON).

``python jobs/benchmark.py train --method supervised [--preset demo] [--steps 20] [--device cuda]``
"""

from __future__ import annotations

import json
import sys

from segray.cli import UsageParser, build_config


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_train(args) -> dict:
    import torch

    from segray.benchmark import bench_train

    cfg = build_config(args)
    res = bench_train(cfg, steps=args.bench_steps, rounds=args.rounds,
                      device=torch.device(args.device))
    print(_table([
        ("method / preset", f"{res['method']} / {res['preset']}"),
        ("device / precision", f"{res['device']} / {res['precision']}"),
        ("batch x crop", f"{res['batch']} x {res['crop']}"),
        ("platform images/s", f"{res['platform_images_per_s']:.2f}"),
        ("bare PyTorch images/s", f"{res['bare_images_per_s']:.2f}"),
        ("ratio (goal >= 0.95)", f"{res['ratio']:.3f}"),
    ]))
    return res


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="jobs/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True, parser_class=UsageParser)
    t = sub.add_parser("train", help="platform step vs bare PyTorch loop")
    from segray.cli import add_run_args

    add_run_args(t, method_default="supervised")
    t.add_argument("--bench-steps", type=int, default=20, help="timed steps per round")
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    res = {"train": cmd_train}[args.what](args)
    if args.out:
        from segray import storage

        storage.write_text(args.out, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
