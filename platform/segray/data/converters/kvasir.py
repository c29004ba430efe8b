"""Polyp segmentation (Kvasir-SEG + CVC-ClinicDB) in the PraNet layout, as binary masks.

Layout (``src`` is the folder holding ``TrainDataset/`` and ``TestDataset/``)::

    TrainDataset/image/<name>.png       TrainDataset/mask/<name>.png
    TestDataset/<set>/images/<name>.png TestDataset/<set>/masks/<name>.png
        <set> in CVC-300, CVC-ClinicDB, CVC-ColonDB, ETIS-LaribPolypDB, Kvasir

Masks are read as luminance and thresholded, ``> 127`` -> 1 (polyp), as the MaskSup loader does.
Splits: ``train`` (1,450 on the real data: Kvasir 900 + ClinicDB 550), ``val`` = the test set of
``--val-set`` (CVC-ClinicDB by default, 62 images, the one MaskSup reports), and one
``test_<set>`` split per other test set (e.g. ``test_cvc_colondb``). File names repeat across
sets, so keys are ``<set>/<name>`` (``train/<name>`` for the training images).

Example:
    >>> convert_kvasir("/data/polyp", "/data/kvasir")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

from segray import storage
from segray.data.converters.classes import BINARY_PALETTE, POLYP_CLASSES
from segray.data.converters.common import (
    Converter,
    OptionError,
    Problems,
    common_options,
    find_root,
    option,
    paired_samples,
    require_dir,
    split_name,
    write_plan,
)
from segray.data.converters.masks import (
    add_threshold_argument,
    binary_reader,
    check_threshold,
)
from segray.data.manifest import DatasetInfo

LAYOUT = ("TrainDataset/{image,mask}/*.png and TestDataset/<set>/{images,masks}/*.png "
          "(PraNet layout)")
DEFAULT_VAL_SET = "CVC-ClinicDB"


def _sub(folder: str, *names: str) -> str:
    """The first of ``folder/<name>`` that exists (PraNet mixes ``image`` and ``images``)."""
    for n in names:
        if storage.is_dir(storage.join(folder, n)):
            return storage.join(folder, n)
    return storage.join(folder, names[0])


def convert_kvasir(
    src: str,
    dst: str,
    *,
    val_set: str = DEFAULT_VAL_SET,
    threshold: int = 127,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert the PraNet polyp data to a binary background/polyp dataset.

    Args:
        src: folder holding ``TrainDataset/`` and ``TestDataset/``.
        dst: destination dataset folder.
        val_set: the test set written as ``val``; the others become ``test_<set>``.
        threshold: mask luminance above which a pixel is polyp.
        name: dataset name (default ``kvasir``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: no ``TrainDataset`` or ``TestDataset`` folder.
        OptionError: ``val_set`` is not a test set (lists those present).
        ValueError: unpaired or unreadable files (each named).
    """
    threshold = check_threshold(threshold)
    src = storage.absolute(src).rstrip("/")
    root = find_root(src, "TrainDataset", ("polyp", "data"))
    if root is None:
        raise FileNotFoundError(f"{src} has no TrainDataset folder; expected {LAYOUT}")
    test_root = require_dir(storage.join(root, "TestDataset"), LAYOUT)
    sets = [s for s in storage.list_dir(test_root)
            if not s.startswith(".") and storage.is_dir(storage.join(test_root, s))]
    if val_set not in sets:
        raise OptionError(f"--val-set: val set {val_set!r} is not in {test_root}; test sets "
                          f"found: {', '.join(sorted(sets)) or '(none)'}; pass one of them")
    problems = Problems(root)
    read = binary_reader(threshold)
    train_dir = storage.join(root, "TrainDataset")
    plan = {"train": paired_samples(_sub(train_dir, "image", "images"),
                                    _sub(train_dir, "mask", "masks"), read, problems,
                                    key_prefix="train/")}
    splits = {val_set: "val"}
    for s in sets:
        if s != val_set:
            splits[s] = f"test_{split_name(s)}"
    if len(set(splits.values())) != len(splits):
        raise ValueError(f"test sets {sets} of {test_root} give clashing split names "
                         f"{list(splits.values())}; rename the folders")
    for s, split in splits.items():
        folder = storage.join(test_root, s)
        plan[split] = paired_samples(_sub(folder, "images", "image"),
                                     _sub(folder, "masks", "mask"), read, problems,
                                     key_prefix=f"{s}/")
    problems.raise_if_any()
    provenance = {"converter": "kvasir", "source": root, "reduce_zero_label": False,
                  "label_map": f"binary: luminance > {threshold} -> 1",
                  "test_sets": {split: s for s, split in splits.items()}}
    return write_plan(dst, plan, name=name or "kvasir", classes=POLYP_CLASSES,
                      palette=BINARY_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--val-set`` and ``--threshold``."""
    parser.add_argument("--val-set", default=DEFAULT_VAL_SET,
                        help="TestDataset/<set> written as the val split (default CVC-ClinicDB); "
                             "the other sets become test_<set>")
    add_threshold_argument(parser)


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_kvasir(src, dst, val_set=option(args, "val_set", DEFAULT_VAL_SET),
                          threshold=int(option(args, "threshold", 127)), **common_options(args))


CONVERTER = Converter("kvasir", "polyp data (Kvasir + CVC), PraNet layout (binary masks)",
                      _convert, add_arguments)
