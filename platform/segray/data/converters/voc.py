"""PASCAL VOC 2012, optionally with the SBD "aug" masks and a semi-supervised labelled subset.

Layout (``src`` is ``VOC2012/`` itself, or a folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette PNGs: pixel index = class 0..20, 255 = border
    ImageSets/Segmentation/{train,val}.txt
    SegmentationClassAug/<id>.png         optional SBD masks as index PNGs (used when present)

``--sbd PATH`` names the SBD masks elsewhere: a folder of index PNGs (``SegmentationClassAug``) or
an SBD release folder with ``cls/<id>.mat`` (``GTcls.Segmentation``; needs scipy).
``--sbd none`` ignores them.

Splits (21 classes, ignore 255, no label shift):

- without SBD: ``train`` (1,464 on the real data) and ``val`` (1,449);
- with SBD: ``train_aug`` = VOC train ∪ SBD − VOC val (10,582) and ``val``. Images of VOC train keep
  their fine ``SegmentationClass`` mask; the others take the SBD mask (MMSeg ``voc12aug``);
- with ``--labeled-list FILE`` (one id per line, e.g. the 92/183/366/732/1464 subsets of the
  semi-supervised literature): ``train_labeled`` (the listed ids), ``unlabeled`` (the rest of
  ``train_aug``, or of ``train`` without SBD; mask null, no labels) and ``val``.

An image belongs to one split only, so each labelled subset is its own converted dataset.

Example:
    >>> convert_voc("/data/VOCdevkit", "/data/voc_366",                  # doctest: +SKIP
    ...             labeled_list="splits/pascal/366/labeled.txt")
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from segray import storage
from segray.data.converters.classes import VOC_CLASSES, VOC_PALETTE
from segray.data.converters.common import (
    Converter,
    OptionError,
    Problems,
    Sample,
    common_options,
    existing_file,
    files_by_stem,
    find_root,
    option,
    read_id_list,
    require_dir,
    write_plan,
)
from segray.data.converters.masks import (
    apply_lut,
    identity_lut,
    index_png_reader,
    load_mat,
    require_scipy,
)
from segray.data.manifest import DatasetInfo

LAYOUT = ("a VOC2012 folder with JPEGImages/<id>.jpg, SegmentationClass/<id>.png and "
          "ImageSets/Segmentation/{train,val}.txt (see segray.data.converters.voc)")
_LUT = identity_lut(len(VOC_CLASSES))
_EXPECTED = "VOC class ids 0..20 or 255"
_read_png = index_png_reader(_LUT, f"{_EXPECTED} as a palette-indexed or greyscale PNG")


_SBD_EXPECTED = ("expected 'auto', 'none', a folder of SBD index PNGs (SegmentationClassAug) or "
                 "an SBD release folder with cls/*.mat")


def sbd_source(text: str) -> str:
    """argparse ``type`` for ``--sbd``: ``auto``, ``none`` or a folder that exists (a wrong path is
    a usage error, exit code 2)."""
    if text not in ("auto", "none") and not storage.is_dir(text):
        raise argparse.ArgumentTypeError(f"no folder at {text}; {_SBD_EXPECTED}")
    return text


def _read_sbd_mat(data: bytes) -> np.ndarray:
    seg = getattr(load_mat(data).get("GTcls"), "Segmentation", None)
    if seg is None or np.ndim(seg) != 2:
        raise ValueError("expected a struct GTcls with a 2-D field Segmentation (SBD cls/*.mat)")
    return apply_lut(np.asarray(seg), _LUT, _EXPECTED)


def _sbd_masks(root: str, sbd: str, problems: Problems) -> tuple[dict[str, str], str | None, Any]:
    """Locate the SBD masks: returns ({id: uri}, folder or None, reader)."""
    if sbd == "none":
        return {}, None, None
    if sbd == "auto":
        folder = storage.join(root, "SegmentationClassAug")
        if not storage.is_dir(folder):
            return {}, None, None
    else:
        folder = storage.absolute(sbd)
        if not storage.is_dir(folder):
            raise OptionError(f"--sbd: no folder at {folder}; {_SBD_EXPECTED}")
    for cls_dir in (storage.join(folder, "cls"), storage.join(folder, "dataset", "cls")):
        if storage.is_dir(cls_dir):
            require_scipy(f"reading the SBD masks in {cls_dir}")
            masks = files_by_stem(cls_dir, (".mat",), problems)
            if not masks:
                raise FileNotFoundError(f"no <id>.mat files in {cls_dir}; expected SBD GTcls files")
            return masks, cls_dir, _read_sbd_mat
    masks = files_by_stem(folder, (".png",), problems)
    if not masks:
        raise FileNotFoundError(f"no <id>.png masks in {folder}; expected SBD SegmentationClassAug "
                                "PNGs or an SBD folder with cls/*.mat")
    return masks, folder, _read_png


def convert_voc(
    src: str,
    dst: str,
    *,
    sbd: str = "auto",
    labeled_list: str | None = None,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert PASCAL VOC 2012 (see the module docstring for layout and splits).

    Args:
        src: VOC2012 folder (or a parent holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``).
        dst: destination dataset folder.
        sbd: ``auto`` (``SegmentationClassAug/`` beside the VOC folders when present), ``none``, or
            the path of SBD index PNGs or of an SBD folder with ``cls/*.mat``.
        labeled_list: text file of labelled image ids for the semi-supervised splits.
        name: dataset name (``voc2012``, or ``voc2012_aug`` with SBD).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        OptionError: ``sbd`` names no folder.
        FileNotFoundError: a required folder or list is missing (names it and the layout).
        ModuleNotFoundError: SBD ``.mat`` files without scipy.
        ValueError: every missing image or mask, id of the labelled list outside the pool, or bad
            mask value, each naming its file.
    """
    src = storage.absolute(src).rstrip("/")
    root = find_root(src, "ImageSets/Segmentation", ("VOC2012", "VOCdevkit/VOC2012"))
    if root is None:
        raise FileNotFoundError(f"{src} has no ImageSets/Segmentation folder; expected {LAYOUT}")
    jpeg = require_dir(storage.join(root, "JPEGImages"), LAYOUT)
    seg = require_dir(storage.join(root, "SegmentationClass"), LAYOUT)
    lists = {}
    for split in ("train", "val"):
        uri = storage.join(root, "ImageSets", "Segmentation", f"{split}.txt")
        if not storage.exists(uri):
            raise FileNotFoundError(f"{uri} not found; expected {LAYOUT}")
        lists[split] = read_id_list(uri)
    problems = Problems(root)
    images = files_by_stem(jpeg, (".jpg", ".jpeg"), problems)
    fine = files_by_stem(seg, (".png",), problems)
    sbd_masks, sbd_dir, sbd_reader = _sbd_masks(root, sbd, problems)
    train_ids, val_ids = set(lists["train"]), set(lists["val"])
    for i in sorted(train_ids & val_ids):
        problems.add(f"{root}: id {i!r} is listed in both train.txt and val.txt")

    def sample(i: str, labelled: bool = True) -> Sample:
        image = images.get(i, storage.join(jpeg, f"{i}.jpg"))
        if i not in images:
            problems.add(f"{image}: missing (id {i!r} is used by a split)")
        if not labelled:
            return Sample(i, image)
        if i in train_ids or i in val_ids or i not in sbd_masks:
            if i not in fine:
                problems.add(f"{storage.join(seg, i + '.png')}: missing (id {i!r} is listed in "
                             f"ImageSets/Segmentation)")
            return Sample(i, image, fine.get(i), _read_png)
        return Sample(i, image, sbd_masks[i], sbd_reader)

    pool = (sorted((train_ids | set(sbd_masks)) - val_ids) if sbd_masks else lists["train"])
    pool_name = "train_aug" if sbd_masks else "train"
    plan: dict[str, list[Sample]] = {}
    if labeled_list:
        labelled = read_id_list(labeled_list)
        pool_set = set(pool)
        for i in labelled:
            if i not in pool_set:
                where = "a val image" if i in val_ids else f"not an image of {pool_name}"
                problems.add(f"{labeled_list}: id {i!r} is {where}; labelled ids must come from "
                             f"{pool_name}")
        chosen = set(labelled)
        plan["train_labeled"] = [sample(i) for i in labelled if i in pool_set]
        plan["unlabeled"] = [sample(i, labelled=False) for i in pool if i not in chosen]
    else:
        plan[pool_name] = [sample(i) for i in pool]
    plan["val"] = [sample(i) for i in lists["val"]]
    problems.raise_if_any()

    provenance = {
        "converter": "voc", "source": root, "reduce_zero_label": False, "label_map": None,
        "masks": "SegmentationClass palette indices (0..20, 255 = void border)",
        "sbd": sbd_dir, "sbd_format": None if sbd_dir is None else (
            "mat GTcls.Segmentation" if sbd_reader is _read_sbd_mat else "png indices"),
        "train_aug": "VOC train + SBD - VOC val; VOC train keeps its SegmentationClass mask"
                     if sbd_masks else None,
        "labeled_list": storage.absolute(labeled_list) if labeled_list else None,
        "labeled_from": pool_name if labeled_list else None,
    }
    return write_plan(dst, plan, name=name or ("voc2012_aug" if sbd_masks else "voc2012"),
                      classes=VOC_CLASSES, palette=VOC_PALETTE, provenance=provenance,
                      source=root, rows_per_shard=rows_per_shard, workers=workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--sbd`` and ``--labeled-list``."""
    parser.add_argument("--sbd", type=sbd_source, default="auto",
                        help="SBD masks: 'auto' (SegmentationClassAug/ when present), 'none', or a "
                             "folder of SBD index PNGs or an SBD folder with cls/*.mat")
    parser.add_argument("--labeled-list", type=existing_file, default=None,
                        help="file of labelled image ids: writes train_labeled + unlabeled + val")


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_voc(src, dst, sbd=option(args, "sbd", "auto"),
                       labeled_list=option(args, "labeled_list", None), **common_options(args))


CONVERTER = Converter("voc", "PASCAL VOC 2012 (+ SBD train_aug, + semi-supervised labelled list)",
                      _convert, add_arguments)
