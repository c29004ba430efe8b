"""NYU Depth v2, 40-class semantic labels, in the MaskSup folder layout.

Layout (``src`` is the folder holding the four folders)::

    train_images/<name>.png    train_labels/<name>.png     class ids 0..39, 255 = void
    val_images/<name>.png      val_labels/<name>.png

Splits ``train`` (795 on the real data) and ``val`` (654); keys are ``<split>/<name>`` since
file names may repeat across the two folders. Labels are kept as they are, with 255
(void) as the ignore index. ``--void-to-zero`` instead reproduces the MaskSup loader, which sets
255 -> 0 so that void pixels are trained and scored as class 0 (wall) and nothing is ignored;
use it only to reproduce MaskSup's numbers.

Example:
    >>> convert_nyudv2("/data/nyudv2", "/data/nyudv2_shards")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

from segray import storage
from segray.data.converters.classes import NYUDV2_CLASSES, NYUDV2_PALETTE
from segray.data.converters.common import (
    Converter,
    Problems,
    common_options,
    find_root,
    option,
    paired_samples,
    write_plan,
)
from segray.data.converters.masks import (
    IGNORE_INDEX,
    identity_lut,
    index_png_reader,
    lut_from,
)
from segray.data.manifest import DatasetInfo

LAYOUT = "train_images/, train_labels/, val_images/, val_labels/ (MaskSup NYUDv2 layout)"
SPLITS = ("train", "val")
_EXPECTED = "NYUDv2 class ids 0..39 or 255 (void)"


def convert_nyudv2(
    src: str,
    dst: str,
    *,
    void_to_zero: bool = False,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert NYUDv2 (40 classes) to a dataset.

    Args:
        src: folder holding ``{train,val}_{images,labels}/``.
        dst: destination dataset folder.
        void_to_zero: map void (255) to class 0 as MaskSup does, instead of ignoring it.
        name: dataset name (default ``nyudv2``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: no ``train_images`` folder.
        ValueError: unpaired files or label values other than 0..39 and 255, each naming its file.
    """
    src = storage.absolute(src).rstrip("/")
    root = find_root(src, "train_images", ("nyudv2", "NYUDv2", "nyu"))
    if root is None:
        raise FileNotFoundError(f"{src} has no train_images folder; expected {LAYOUT}")
    lut = (lut_from({IGNORE_INDEX: 0}, keep=range(len(NYUDV2_CLASSES))) if void_to_zero
           else identity_lut(len(NYUDV2_CLASSES)))
    read = index_png_reader(lut, _EXPECTED)
    problems = Problems(root)
    plan = {split: paired_samples(storage.join(root, f"{split}_images"),
                                  storage.join(root, f"{split}_labels"), read, problems,
                                  key_prefix=f"{split}/")
            for split in SPLITS}
    problems.raise_if_any()
    provenance = {"converter": "nyudv2", "source": root, "reduce_zero_label": False,
                  "void_to_zero": bool(void_to_zero),
                  "label_map": "void 255 -> 0 (MaskSup)" if void_to_zero else None}
    return write_plan(dst, plan, name=name or "nyudv2", classes=NYUDV2_CLASSES,
                      palette=NYUDV2_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--void-to-zero``."""
    parser.add_argument("--void-to-zero", action="store_true",
                        help="map void (255) to class 0 like MaskSup, instead of ignoring it")


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_nyudv2(src, dst, void_to_zero=bool(option(args, "void_to_zero", False)),
                          **common_options(args))


CONVERTER = Converter("nyudv2", "NYU Depth v2, 40 classes, MaskSup layout", _convert,
                      add_arguments)
