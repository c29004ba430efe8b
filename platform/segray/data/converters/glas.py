"""GlaS (gland segmentation, MICCAI 2015) in the UCTransNet folder layout, as binary masks.

Layout (``src`` is the GlaS folder)::

    train/img/<name>.bmp|png        train/labelcol/<name>.png (or <name>_anno.bmp)
    test/img/<name>.bmp|png         test/labelcol/<name>.png

Masks are read as luminance and thresholded, ``> 127`` -> 1 (gland), else 0 (background), as the
MaskSup loader does; the threshold is ``--threshold``. Splits ``train`` (85 on the real data) and
``val`` = the ``test`` folder (80; MaskSup selects and reports on it). Keys are
``train/<name>`` and ``test/<name>``.

Example:
    >>> convert_glas("/data/GlaS", "/data/glas")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from segray import storage
from segray.data.converters.classes import BINARY_PALETTE, GLAS_CLASSES
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
    add_threshold_argument,
    binary_reader,
    check_threshold,
)
from segray.data.manifest import DatasetInfo

LAYOUT = "train/img/*, train/labelcol/*, test/img/*, test/labelcol/* (UCTransNet GlaS layout)"
SPLITS = {"train": "train", "val": "test"}


def convert_glas(
    src: str,
    dst: str,
    *,
    threshold: int = 127,
    name: str | None = None,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Convert GlaS to a binary background/gland dataset.

    Args:
        src: GlaS folder (holding ``train/`` and ``test/``).
        dst: destination dataset folder.
        threshold: mask luminance above which a pixel is gland.
        name: dataset name (default ``glas``).
        rows_per_shard: rows per Parquet shard.
        workers: threads reading files.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: no ``train/img`` folder.
        ValueError: unpaired files, missing folders or unreadable files, each named.
    """
    threshold = check_threshold(threshold)
    src = storage.absolute(src).rstrip("/")
    root = find_root(src, "train/img", ("GlaS", "GLAS", "glas"))
    if root is None:
        raise FileNotFoundError(f"{src} has no train/img folder; expected {LAYOUT}")
    problems = Problems(root)
    read = binary_reader(threshold)
    plan = {split: paired_samples(storage.join(root, folder, "img"),
                                  storage.join(root, folder, "labelcol"), read, problems,
                                  key_prefix=f"{folder}/", mask_tag="_anno")
            for split, folder in SPLITS.items()}
    problems.raise_if_any()
    provenance = {"converter": "glas", "source": root, "reduce_zero_label": False,
                  "label_map": f"binary: luminance > {threshold} -> 1", "val": "test"}
    return write_plan(dst, plan, name=name or "glas", classes=GLAS_CLASSES,
                      palette=BINARY_PALETTE, provenance=provenance, source=root,
                      rows_per_shard=rows_per_shard, workers=workers)


def _convert(src: str, dst: str, args: Any) -> DatasetInfo:
    return convert_glas(src, dst, threshold=int(option(args, "threshold", 127)),
                        **common_options(args))


CONVERTER = Converter("glas", "GlaS glands, UCTransNet layout (binary masks)", _convert,
                      add_threshold_argument)
