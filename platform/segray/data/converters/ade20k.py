"""ADE20K (MIT SceneParsing 2016, 150 classes) with ``reduce_zero_label`` applied.

Layout (``src`` is ``ADEChallengeData2016/`` or its parent)::

    images/{training,validation}/ADE_{train,val}_<n>.jpg
    annotations/{training,validation}/ADE_{train,val}_<n>.png   values 0..150, 0 = "other"

Annotation 0 is not a class, so it becomes the ignore value and every class id shifts down by one
(MMSeg ``reduce_zero_label``: 0 -> 255, v -> v - 1; 150 classes wall..flag with ids 0..149).
Splits ``train`` (20,210 on the real data) and ``val`` (2,000).

Example:
    >>> convert_ade20k("/data/ADEChallengeData2016", "/data/ade20k")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

from segray import storage
from segray.data.converters.classes import ADE20K_CLASSES, ADE20K_PALETTE
from segray.data.converters.common import (
    Converter,
    Problems,
    Sample,
    common_options,
    files_by_stem,
    find_root,
    pair_files,
    require_dir,
    write_plan,
)
from segray.data.converters.masks import (
    index_png_reader,
    reduce_zero_label_lut,
)
from segray.data.manifest import DatasetInfo

LAYOUT = ("ADEChallengeData2016/images/{training,validation}/*.jpg and "
          "annotations/{training,validation}/*.png")
SPLITS = {"train": "training", "val": "validation"}
read_ade_mask = index_png_reader(reduce_zero_label_lut(len(ADE20K_CLASSES)),
                                 "ADE20K annotation values 0..150")


def convert_ade20k(
    src: str,
    dst: str,
    *,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert ADE20K (SceneParsing) to a 150-class dataset with ``reduce_zero_label`` applied.

    Args:
        src: ``ADEChallengeData2016`` folder, or a folder holding it.
        dst: destination dataset folder.
        name: dataset name (default ``ade20k``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: ``images/<folder>`` or ``annotations/<folder>`` missing.
        ValueError: unpaired files or annotation values above 150, each naming its file.
    """
    src = storage.absolute(src).rstrip("/")
    root = find_root(src, "images/training", ("ADEChallengeData2016",))
    if root is None:
        raise FileNotFoundError(f"{src} has no images/training folder; expected {LAYOUT}")
    problems = Problems(root)
    plan: dict[str, list[Sample]] = {}
    for split, folder in SPLITS.items():
        img_dir = require_dir(storage.join(root, "images", folder), LAYOUT)
        ann_dir = require_dir(storage.join(root, "annotations", folder), LAYOUT)
        images = files_by_stem(img_dir, (".jpg", ".jpeg"), problems)
        masks = files_by_stem(ann_dir, (".png",), problems)
        stems = pair_files(images, masks, problems, f"{ann_dir}/{{stem}}.png")
        if not images:
            problems.add(f"{img_dir}: no .jpg images")
        plan[split] = [Sample(s, images[s], masks[s], read_ade_mask) for s in stems]
    problems.raise_if_any()
    provenance = {"converter": "ade20k", "source": root, "reduce_zero_label": True,
                  "label_map": None}
    return write_plan(dst, plan, name=name or "ade20k", classes=ADE20K_CLASSES,
                      palette=ADE20K_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ADE20K has no format-specific flags."""
    del parser


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_ade20k(src, dst, **common_options(args))


CONVERTER = Converter("ade20k", "ADE20K SceneParsing (150 classes, reduce_zero_label applied)",
                      _convert, add_arguments)
