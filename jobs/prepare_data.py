"""Create a segray dataset (Parquet shards + dataset.json) from a source format.

Usage:
    python jobs/prepare_data.py synthetic /data/synthetic --train 192 --val 48 --unlabeled 96
    python jobs/prepare_data.py folder /data/my_seg s3://bucket/datasets/my_seg --val-fraction 0.1
    python jobs/prepare_data.py folder /data/my_seg /data/my_seg_shards --split-file splits.txt

Destinations may be local paths or ``s3://`` URIs (endpoint and credentials from the standard AWS
environment). Exit codes: 0 success, 1 bad input data (the message names the file), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

from segray import storage
from segray.cli import fraction, positive_int
from segray.data import DatasetInfo, convert_folder, make_synthetic
from segray.data.converters import CONVERTERS, OptionError, add_common_arguments


def _add_synthetic(p: argparse.ArgumentParser) -> None:
    p.add_argument("dst", help="destination dataset folder (path or s3:// URI)")
    p.add_argument("--train", type=int, default=192, help="labelled training images")
    p.add_argument("--val", type=int, default=48, help="validation images (0 omits the split)")
    p.add_argument("--unlabeled", type=int, default=96, help="unlabelled images (0 omits)")
    p.add_argument("--size", type=int, default=64, help="nominal image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows-per-shard", type=positive_int, default=64)


def _run_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DatasetInfo:
    try:
        return make_synthetic(args.dst, train=args.train, val=args.val, unlabeled=args.unlabeled,
                              size=args.size, seed=args.seed, rows_per_shard=args.rows_per_shard)
    except ValueError as e:  # only its arguments can be wrong: a usage error
        parser.error(str(e))


def _add_folder(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder with images/, masks/ and optionally classes.txt")
    p.add_argument("dst", help="destination dataset folder (path or s3:// URI)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--val-fraction", type=fraction, default=0.1,
                       help="share of images for the val split (default 0.1)")
    group.add_argument("--split-file", help="'<stem> <split>' lines or JSON {split: [stems]}")
    p.add_argument("--seed", type=int, default=0, help="seed of the random train/val split")
    p.add_argument("--ignore-index", type=int, default=255)
    p.add_argument("--name", help="dataset name (default: the source folder's name)")
    p.add_argument("--rows-per-shard", type=positive_int, default=256)


def _run_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DatasetInfo:
    if not storage.is_dir(args.src):
        parser.error(f"source folder {args.src} does not exist")
    if args.split_file and not storage.exists(args.split_file):
        parser.error(f"split file {args.split_file} does not exist")
    return convert_folder(args.src, args.dst, val_fraction=args.val_fraction,
                          split_file=args.split_file, seed=args.seed,
                          ignore_index=args.ignore_index, name=args.name,
                          rows_per_shard=args.rows_per_shard)


Handler = Callable[[argparse.Namespace, argparse.ArgumentParser], DatasetInfo]
# format name -> (help, add its arguments, run it); a new converter is one more entry.
FORMATS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "synthetic": ("generate the built-in synthetic dataset", _add_synthetic, _run_synthetic),
    "folder": ("convert images/ + masks/ class-index PNGs", _add_folder, _run_folder),
}


def _public_dataset(name: str) -> tuple[str, Callable, Handler]:
    conv = CONVERTERS[name]

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("src", help=f"root of the {name} dataset in its standard layout")
        p.add_argument("dst", help="destination dataset folder (path or s3:// URI)")
        add_common_arguments(p)
        conv.add_arguments(p)

    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DatasetInfo:
        if not storage.is_dir(args.src):
            parser.error(f"source folder {args.src} does not exist")
        try:
            return conv.convert(args.src, args.dst, args)
        except OptionError as e:  # an option the source tree refutes: a usage error
            parser.error(str(e))

    return conv.help, add, run


FORMATS.update({name: _public_dataset(name) for name in CONVERTERS})


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The CLI parser and one sub-parser per entry of :data:`FORMATS`."""
    parser = argparse.ArgumentParser(
        prog="prepare_data.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="run `prepare_data.py <format> --help` for a format's options")
    sub = parser.add_subparsers(dest="format", required=True, metavar="format",
                                help=f"one of: {', '.join(FORMATS)}")
    subparsers = {}
    for name, (help_text, add_args, _) in FORMATS.items():
        subparsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        add_args(subparsers[name])
    return parser, subparsers


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse exits with 2 itself on usage errors)."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.monotonic()
    try:
        info = FORMATS[args.format][2](args, subparsers[args.format])
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"dataset {info.name!r}: {info.num_classes} classes ({', '.join(info.classes)})")
    for split in info.split_names:
        print(f"  {split:<10} {info.num_rows(split):>7} rows in {len(info.splits[split])} shard(s)")
    print(f"manifest: {storage.join(info.uri, 'dataset.json')}  ({time.monotonic() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
