"""Throughput measured side by side in one run, printed as a table (``--out`` writes JSON).

``python jobs/benchmark.py train --method supervised [--preset demo] [--bench-steps 20] [--rounds 3]
[--device cuda]``
``python jobs/benchmark.py data [--local | --data URI] [--images 512] [--size 256] [--crop 128]``
"""

from __future__ import annotations

import json
import sys

from segray.cli import UsageParser, build_config, positive_int


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def cmd_train(args) -> dict:
    import torch

    from segray.benchmark import bench_train
    from segray.launch import fail_usage

    if args.device == "cuda" and not torch.cuda.is_available():
        fail_usage("--device cuda: no CUDA device is visible to PyTorch (torch.cuda.is_available() "
                   "is False); use --device cpu")
    if args.device == "cuda" and args.gpus_per_worker is None:
        args.gpus_per_worker = 1.0  # the config's device checks (e.g. fp16) then see the GPU
    cfg = build_config(args, warn_untrained=False)
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


def cmd_data(args) -> dict:
    from segray.data.benchmark import DataBenchConfig, bench_data

    cfg = DataBenchConfig(images=args.images, size=args.size, crop=args.crop,
                          batch_size=args.batch_size, epochs=args.epochs, rounds=args.rounds,
                          workers=args.workers, rss_factor=args.rss_factor,
                          image_format=args.image_format)
    from segray.data import DatasetError
    from segray.launch import fail_usage

    try:
        res = bench_data(cfg, data=args.data, local=args.local, rss=not args.no_rss)
    except (FileNotFoundError, DatasetError) as e:  # --data names no usable dataset
        fail_usage(f"--data {args.data}: {e}" if args.data else str(e))
    goals = res["goals"]

    def check(value: float, goal: float, low_is_good: bool = False) -> str:
        ok = value <= goal if low_is_good else value >= goal
        return "met" if ok else "NOT met"

    rows = [
        ("storage / images", f"{res['storage']} / {res['images']} "
                             f"{'' if args.data else cfg.image_format.upper() + ' '}"
                             f"at crop {cfg.crop}, "
                             f"batch {cfg.batch_size}, {cfg.epochs} epochs x {cfg.rounds} rounds"),
        ("segray pipeline images/s", f"{res['segray_images_per_s']:.1f}"),
        (f"DataLoader({cfg.workers}) + PIL images/s", f"{res['dataloader_images_per_s']:.1f}"),
        ("ratio (goal >= 1.0x)", f"{res['ratio_vs_dataloader']:.2f}x  "
                                 f"{check(res['ratio_vs_dataloader'], goals['ratio_vs_dataloader'])}"),
        ("decode-only images/s, 1 process", f"{res['decode_images_per_s_1proc']:.1f}"),
        (f"decode-only images/s, {cfg.workers} processes",
         f"{res['decode_images_per_s_nproc']:.1f}"),
        ("share of decode limit (goal >= 80%)",
         f"{100 * res['share_of_decode_limit']:.0f}%  "
         f"{check(res['share_of_decode_limit'], goals['share_of_decode_limit'])}"),
        ("pipeline / one decode process",
         f"{100 * res['segray_images_per_s'] / res['decode_images_per_s_1proc']:.0f}%"),
        (f"decode + rescale/crop loop images/s, {cfg.workers} processes",
         f"{res['decode_crop_images_per_s_nproc']:.1f}"),
        ("share of the decode + rescale/crop loop", f"{100 * res['share_of_decode_crop_loop']:.0f}%"),
        ("Ray Data ceiling (that work only) images/s",
         f"{res['ray_data_ceiling_images_per_s']:.1f} "
         f"({100 * res['ray_data_ceiling_images_per_s'] / res['decode_images_per_s_nproc']:.0f}%"
         " of the decode limit)"),
        ("share of the Ray Data ceiling", f"{100 * res['share_of_ray_data_ceiling']:.0f}%"),
    ]
    if "rss" in res:
        small, big = res["rss"]["1x"], res["rss"]["large"]
        rows += [
            ("peak RSS streaming 1x", f"{small['peak_rss_mb']:.0f} MB ({small['images']} images;"
                                      f" {small['idle_rss_mb']:.0f} MB before reading)"),
            (f"peak RSS streaming {cfg.rss_factor}x",
             f"{big['peak_rss_mb']:.0f} MB ({big['images']} images; "
             f"{big['idle_rss_mb']:.0f} MB before reading)"),
            (f"RSS ratio {cfg.rss_factor}x / 1x (goal <= 1.2x)",
             f"{res['rss']['ratio']:.2f}x  {check(res['rss']['ratio'], goals['rss_ratio'], True)}"),
        ]
        if res["rss"]["pss_ratio"]:
            rows.append(("PSS ratio (shared pages split)", f"{res['rss']['pss_ratio']:.2f}x"))
    print(_table(rows))
    return res


def main(argv: list[str] | None = None) -> int:
    p = UsageParser(prog="jobs/benchmark.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True, parser_class=UsageParser)
    t = sub.add_parser("train", help="platform step vs bare PyTorch loop")
    from segray.cli import add_run_args

    add_run_args(t, method_default="supervised")
    t.add_argument("--bench-steps", type=positive_int, default=20, help="timed steps per round")
    t.add_argument("--rounds", type=positive_int, default=3,
                   help="alternating timed rounds (median kept)")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--out", default=None, help="write the results as JSON here")
    d = sub.add_parser("data", help="segray data pipeline vs DataLoader, decode limit, memory")
    where = d.add_mutually_exclusive_group()
    where.add_argument("--data", default=None,
                       help="stream this dataset's train split (default: synthetic JPEGs on a "
                            "local S3 server started for the run)")
    where.add_argument("--local", action="store_true", help="synthetic JPEGs in a local folder")
    d.add_argument("--images", type=positive_int, default=512, help="synthetic images (1x dataset)")
    d.add_argument("--size", type=positive_int, default=256, help="synthetic image side")
    d.add_argument("--crop", type=positive_int, default=128, help="training crop side")
    d.add_argument("--image-format", default="jpeg", choices=["jpeg", "png"],
                   help="encoding of the synthetic images")
    d.add_argument("--batch-size", type=positive_int, default=32)
    d.add_argument("--epochs", type=positive_int, default=20, help="epochs per timed round")
    d.add_argument("--rounds", type=positive_int, default=3, help="alternating timed rounds (best kept)")
    d.add_argument("--workers", type=positive_int, default=2,
                   help="DataLoader workers and decode-limit processes")
    d.add_argument("--rss-factor", type=positive_int, default=10, help="size of the large memory test")
    d.add_argument("--no-rss", action="store_true", help="skip the streaming-memory test")
    d.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    res = {"train": cmd_train, "data": cmd_data}[args.what](args)
    if args.out:
        from segray import storage

        storage.write_text(args.out, json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
