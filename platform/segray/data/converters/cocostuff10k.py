"""COCO-Stuff 10k (171 classes), from MMSeg's converted PNGs or the original ``.mat`` release.

Layouts (``src`` is the dataset folder)::

    converted (MMSeg tools/dataset_converters/coco_stuff10k.py output):
        images/{train2014,test2014}/<name>.jpg
        annotations/{train2014,test2014}/<name>_labelTrainIds.png    ids 0..171, 0 = unlabeled
    original release (needs scipy):
        images/<name>.jpg
        annotations/<name>.mat                                        field S: COCO ids 0..182
        imageLists/{train,test}.txt

Both end with the same labels: the 171 used COCO ids (1..182 without the 11 thing ids COCO-Stuff
never annotates) become ids 0..170 in increasing order, and 0 = unlabeled becomes 255. For the
PNGs this is MMSeg's ``reduce_zero_label`` (0 -> 255, v -> v - 1); for the ``.mat`` files it is the
official 182 -> 171 mapping followed by the same reduction (any unused id would be ignored too).
Splits ``train`` (9,000 on the real data) and ``val`` (the 1,000 ``test2014`` images MMSeg
evaluates on).

Example:
    >>> convert_cocostuff10k("/data/coco_stuff10k", "/data/cocostuff10k")   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from segray import storage
from segray.data.converters.classes import (
    COCO_STUFF_CLASSES,
    COCO_STUFF_MAX_ID,
    COCO_STUFF_PALETTE,
    COCO_STUFF_UNUSED_IDS,
)
from segray.data.converters.common import (
    Converter,
    Problems,
    Sample,
    common_options,
    files_by_stem,
    find_root,
    option,
    pair_files,
    read_id_list,
    require_dir,
    write_plan,
)
from segray.data.converters.masks import (
    IGNORE_INDEX,
    apply_lut,
    index_png_reader,
    load_mat,
    lut_from,
    reduce_zero_label_lut,
    require_scipy,
)
from segray.data.manifest import DatasetInfo

LAYOUT = ("images/{train2014,test2014}/*.jpg + annotations/{train2014,test2014}/"
          "*_labelTrainIds.png (MMSeg layout), or images/*.jpg + annotations/*.mat + "
          "imageLists/{train,test}.txt (original release)")
SPLITS = {"train": ("train2014", "train"), "val": ("test2014", "test")}
FORMATS = ("auto", "png", "mat")

_USED_IDS = [i for i in range(1, COCO_STUFF_MAX_ID + 1) if i not in COCO_STUFF_UNUSED_IDS]
# COCO id -> class index 0..170; unlabeled (0) and the unused ids are ignored.
COCO_ID_LUT = lut_from({0: IGNORE_INDEX, **{i: IGNORE_INDEX for i in COCO_STUFF_UNUSED_IDS},
                        **{coco: k for k, coco in enumerate(_USED_IDS)}})
read_train_ids_png = index_png_reader(reduce_zero_label_lut(len(COCO_STUFF_CLASSES)),
                                      "COCO-Stuff 10k train ids 0..171 (0 = unlabeled)")


def read_coco_mat(data: bytes) -> np.ndarray:
    """Class-id map (H, W) from an original COCO-Stuff 10k ``.mat`` annotation (field ``S``)."""
    seg = load_mat(data).get("S")
    if seg is None or np.ndim(seg) != 2:
        raise ValueError("expected a 2-D field S of COCO class ids (COCO-Stuff 10k .mat file)")
    return apply_lut(np.asarray(seg), COCO_ID_LUT, f"COCO ids 0..{COCO_STUFF_MAX_ID}")


def _plan_png(root: str, problems: Problems) -> dict[str, list[Sample]]:
    plan = {}
    for split, (folder, _) in SPLITS.items():
        img_dir = require_dir(storage.join(root, "images", folder), LAYOUT)
        ann_dir = require_dir(storage.join(root, "annotations", folder), LAYOUT)
        images = files_by_stem(img_dir, (".jpg", ".jpeg"), problems)
        masks = files_by_stem(ann_dir, (".png",), problems, suffix="_labelTrainIds")
        if not masks:  # early MMSeg versions wrote the test2014 masks as <name>.png
            masks = files_by_stem(ann_dir, (".png",), problems)
        else:  # both forms for one image: which is meant cannot be told
            plain = files_by_stem(ann_dir, (".png",), Problems(ann_dir))
            for stem in sorted(set(masks) & set(plain)):
                problems.add(f"{plain[stem]}: image {stem!r} has two annotations "
                             f"({stem}_labelTrainIds.png and {stem}.png); remove one")
        stems = pair_files(images, masks, problems, f"{ann_dir}/{{stem}}_labelTrainIds.png")
        plan[split] = [Sample(s, images[s], masks[s], read_train_ids_png) for s in stems]
    return plan


def _plan_mat(root: str, problems: Problems) -> dict[str, list[Sample]]:
    require_scipy(f"reading the COCO-Stuff .mat annotations in {root}/annotations")
    img_dir = require_dir(storage.join(root, "images"), LAYOUT)
    ann_dir = require_dir(storage.join(root, "annotations"), LAYOUT)
    images = files_by_stem(img_dir, (".jpg", ".jpeg"), problems)
    masks = files_by_stem(ann_dir, (".mat",), problems)
    plan = {}
    for split, (_, list_name) in SPLITS.items():
        list_uri = storage.join(root, "imageLists", f"{list_name}.txt")
        if not storage.exists(list_uri):
            raise FileNotFoundError(f"{list_uri} not found; expected {LAYOUT}")
        samples = []
        for stem in read_id_list(list_uri):
            if stem not in images:
                problems.add(f"{img_dir}/{stem}.jpg: missing (listed in {list_uri})")
            elif stem not in masks:
                problems.add(f"{ann_dir}/{stem}.mat: missing (listed in {list_uri})")
            else:
                samples.append(Sample(stem, images[stem], masks[stem], read_coco_mat))
        plan[split] = samples
    return plan


def convert_cocostuff10k(
    src: str,
    dst: str,
    *,
    annotations: str = "auto",
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert COCO-Stuff 10k to a 171-class dataset (see the module docstring).

    Args:
        src: dataset folder.
        dst: destination dataset folder.
        annotations: ``png`` (MMSeg layout), ``mat`` (original release) or ``auto`` (``png`` when
            ``images/train2014`` exists, else ``mat``).
        name: dataset name (default ``cocostuff10k``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: neither layout found, or a folder / list of it missing.
        ModuleNotFoundError: ``.mat`` annotations without scipy.
        ValueError: unknown ``annotations``, unpaired files or undefined label values, each
            naming its file.
    """
    if annotations not in FORMATS:
        raise ValueError(f"annotations={annotations!r} is not one of {', '.join(FORMATS)}")
    src = storage.absolute(src).rstrip("/")
    png_root = find_root(src, "images/train2014", ("coco_stuff10k", "cocostuff10k"))
    mat_root = find_root(src, "imageLists/train.txt", ("cocostuff-10k-v1.1",))
    if annotations == "auto":
        annotations = "png" if png_root else "mat"
    root = png_root if annotations == "png" else mat_root
    if root is None:
        raise FileNotFoundError(f"{src} is not a COCO-Stuff 10k folder of the {annotations} kind; "
                                f"expected {LAYOUT}")
    problems = Problems(root)
    plan = _plan_png(root, problems) if annotations == "png" else _plan_mat(root, problems)
    problems.raise_if_any()
    provenance = {
        "converter": "cocostuff10k", "source": root, "annotations": annotations,
        "reduce_zero_label": True,
        "label_map": ("coco ids 0..182 -> 0..171 (11 unused ids dropped), then reduce_zero_label"
                      if annotations == "mat" else None),
        "val": "test2014",
    }
    return write_plan(dst, plan, name=name or "cocostuff10k", classes=COCO_STUFF_CLASSES,
                      palette=COCO_STUFF_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--annotations``."""
    parser.add_argument("--annotations", choices=FORMATS, default="auto",
                        help="png: MMSeg-converted *_labelTrainIds.png; mat: original .mat "
                             "release (needs scipy); auto: png when images/train2014 exists")


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_cocostuff10k(src, dst, annotations=option(args, "annotations", "auto"),
                                **common_options(args))


CONVERTER = Converter("cocostuff10k", "COCO-Stuff 10k (171 classes, reduce_zero_label applied)",
                      _convert, add_arguments)
