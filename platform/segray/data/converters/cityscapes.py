"""Cityscapes (fine annotations), mapped to the 19 evaluation classes (trainIds).

Layout (``src`` is the folder holding ``leftImg8bit/`` and ``gtFine/``)::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                             (or ..._gtFine_labelTrainIds.png, used as is when present)

``labelIds`` (0..33) are mapped to trainIds with the cityscapesScripts table: 19 classes, every
other id (void, and the classes not evaluated such as parking, guard rail or caravan) -> 255.
Splits ``train`` (2,975 on the real data) and ``val`` (500); keys are ``<city>_<seq>_<frame>``.
The ``test`` images have no public labels and are not converted.

Example:
    >>> convert_cityscapes("/data/cityscapes", "/data/cityscapes_shards")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

from segray import storage
from segray.data.converters.classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAINID,
    CITYSCAPES_NUM_IDS,
    CITYSCAPES_PALETTE,
)
from segray.data.converters.common import (
    Converter,
    Problems,
    Sample,
    common_options,
    files_by_stem,
    find_root,
    option,
    require_dir,
    write_plan,
)
from segray.data.converters.masks import (
    IGNORE_INDEX,
    identity_lut,
    index_png_reader,
    lut_from,
)
from segray.data.manifest import DatasetInfo

LAYOUT = ("leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png and "
          "gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)")
SPLITS = ("train", "val")
IMAGE_SUFFIX = "_leftImg8bit"
LABEL_IDS = "_gtFine_labelIds.png"
TRAIN_IDS = "_gtFine_labelTrainIds.png"

# Every labelId that is not one of the 19 classes becomes 255; so does 255 itself.
_ID_LUT = lut_from({**{i: IGNORE_INDEX for i in range(CITYSCAPES_NUM_IDS)},
                    **CITYSCAPES_ID_TO_TRAINID, IGNORE_INDEX: IGNORE_INDEX})
read_label_ids = index_png_reader(_ID_LUT, f"Cityscapes labelIds 0..{CITYSCAPES_NUM_IDS - 1}")
read_train_ids = index_png_reader(identity_lut(len(CITYSCAPES_CLASSES)),
                                  "Cityscapes trainIds 0..18 or 255")


def convert_cityscapes(
    src: str,
    dst: str,
    *,
    splits: tuple[str, ...] = SPLITS,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert Cityscapes fine annotations to a 19-class dataset.

    Args:
        src: folder holding ``leftImg8bit/`` and ``gtFine/`` (or a parent with ``cityscapes/``).
        dst: destination dataset folder.
        splits: which of ``train`` and ``val`` to convert.
        name: dataset name (default ``cityscapes``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: ``leftImg8bit/<split>`` or ``gtFine/<split>`` missing.
        ValueError: an unknown split, an image without annotation (or the reverse), or a label
            value that is not a Cityscapes id, each naming its file.
    """
    src = storage.absolute(src).rstrip("/")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise ValueError(f"unknown Cityscapes split(s) {bad or splits}; choose from "
                         f"{', '.join(SPLITS)} (test has no public labels)")
    root = find_root(src, "leftImg8bit", ("cityscapes",))
    if root is None:
        raise FileNotFoundError(f"{src} has no leftImg8bit folder; expected {LAYOUT}")
    problems = Problems(root)
    plan: dict[str, list[Sample]] = {}
    used = {"labelTrainIds": 0, "labelIds": 0}
    for split in splits:
        img_dir = require_dir(storage.join(root, "leftImg8bit", split), LAYOUT)
        gt_dir = require_dir(storage.join(root, "gtFine", split), LAYOUT)
        samples: list[Sample] = []
        for city in storage.list_dir(img_dir):
            city_img = storage.join(img_dir, city)
            if city.startswith(".") or not storage.is_dir(city_img):
                continue
            images = files_by_stem(city_img, (".png",), problems, suffix=IMAGE_SUFFIX)
            city_gt = storage.join(gt_dir, city)
            gt_names = set(storage.list_dir(city_gt))
            if images and not gt_names:
                problems.add(f"{city_gt}: missing or empty; expected the gtFine annotations of "
                             f"the {len(images)} images of {city_img}")
                continue
            for stem in sorted(images):
                if stem + TRAIN_IDS in gt_names:
                    samples.append(Sample(stem, images[stem], storage.join(city_gt, stem + TRAIN_IDS),
                                          read_train_ids))
                    used["labelTrainIds"] += 1
                elif stem + LABEL_IDS in gt_names:
                    samples.append(Sample(stem, images[stem], storage.join(city_gt, stem + LABEL_IDS),
                                          read_label_ids))
                    used["labelIds"] += 1
                else:
                    problems.add(f"{images[stem]}: no annotation (expected "
                                 f"{storage.join(city_gt, stem + LABEL_IDS)})")
            for gt in sorted(gt_names):
                for suffix in (LABEL_IDS, TRAIN_IDS):
                    if gt.endswith(suffix) and gt[: -len(suffix)] not in images:
                        problems.add(f"{storage.join(city_gt, gt)}: annotation without an image "
                                     f"(expected {city_img}/{gt[: -len(suffix)]}"
                                     f"{IMAGE_SUFFIX}.png)")
        if not samples and not problems:
            problems.add(f"{img_dir}: no <city>/<name>{IMAGE_SUFFIX}.png images found")
        plan[split] = samples
    problems.raise_if_any()
    provenance = {
        "converter": "cityscapes", "source": root, "reduce_zero_label": False,
        # labelTrainIds files already hold the result of this map (cityscapesScripts made them)
        "label_map": "cityscapes labelIds->trainIds",
        "annotations": used,
    }
    return write_plan(dst, plan, name=name or "cityscapes", classes=CITYSCAPES_CLASSES,
                      palette=CITYSCAPES_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--splits``."""
    parser.add_argument("--splits", type=_splits_arg, default=SPLITS,
                        help="comma-separated splits to convert (train, val)")


def _splits_arg(text: str) -> tuple[str, ...]:
    """argparse ``type`` for ``--splits`` (a bad value is a usage error, exit code 2)."""
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise argparse.ArgumentTypeError(f"unknown Cityscapes split(s) {bad or text!r}; choose "
                                         f"from {', '.join(SPLITS)} (test has no public labels)")
    return splits


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    splits = option(args, "splits", "train,val")
    if isinstance(splits, str):
        splits = tuple(s.strip() for s in splits.split(",") if s.strip())
    return convert_cityscapes(src, dst, splits=tuple(splits), **common_options(args))


CONVERTER = Converter("cityscapes", "Cityscapes gtFine, labelIds mapped to the 19 trainIds",
                      _convert, add_arguments)
