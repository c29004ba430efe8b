"""Annotation readers and label conventions shared by the converters.

A reader turns an annotation file's bytes into the final uint8 class-id map (H, W), with the
dataset's convention applied at conversion time: a 256-entry lookup table maps raw values to
class ids or to the ignore value 255, and raw values the dataset does not define are reported
(not silently ignored).

Example:
    >>> lut = reduce_zero_label_lut(150)          # ADE20K: 0 -> 255, v -> v - 1
    >>> apply_lut(np.array([[0, 1], [150, 255]]), lut, "0..150").tolist()
    [[255, 0], [149, 255]]
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from segray.cli import checked_type
from segray.data.shards import decode_mask_png

IGNORE_INDEX = 255
INVALID = -1  # marks label values a dataset does not define in a lookup table

#: annotation file bytes -> class-id map (H, W) with the dataset's conventions applied.
MaskReader = Callable[[bytes], np.ndarray]


def lut_from(mapping: Mapping[int, int], keep: Iterable[int] = ()) -> np.ndarray:
    """A 256-entry lookup table: ``mapping`` plus identity on ``keep``; all else is invalid."""
    lut = np.full(256, INVALID, dtype=np.int16)
    for v in keep:
        lut[v] = v
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def identity_lut(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Ids ``0..num_classes-1`` and ``ignore_index`` are kept as they are; others are invalid."""
    return lut_from({}, keep=[*range(num_classes), ignore_index])


def reduce_zero_label_lut(max_raw: int) -> np.ndarray:
    """MMSeg ``reduce_zero_label``: 0 -> 255, v -> v - 1 for v in 1..max_raw, 255 stays 255.

    Example:
        >>> reduce_zero_label_lut(150)[[0, 1, 2, 150, 255]].tolist()
        [255, 0, 1, 149, 255]
    """
    return lut_from({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, max_raw + 1)},
                     IGNORE_INDEX: IGNORE_INDEX})


def apply_lut(mask: np.ndarray, lut: np.ndarray, expected: str) -> np.ndarray:
    """Map raw annotation values through ``lut``.

    Args:
        mask: integer array (H, W) of raw annotation values.
        lut: 256-entry table from :func:`lut_from`.
        expected: what the raw values should be, for the error message.

    Returns:
        uint8 class-id map (H, W).

    Raises:
        ValueError: values outside 0..255 or undefined in ``lut`` (lists them).
    """
    mask = np.asarray(mask)
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise ValueError(f"annotation values {int(mask.min())}..{int(mask.max())} do not fit the "
                         f"expected {expected}")
    out = lut[mask.astype(np.uint8, copy=False)]
    if (out == INVALID).any():
        bad = np.unique(mask[out == INVALID]).tolist()
        raise ValueError(f"annotation holds values {bad[:10]} that are not defined "
                         f"(expected {expected})")
    return out.astype(np.uint8)


def index_png_reader(lut: np.ndarray, expected: str) -> MaskReader:
    """A reader for single-channel index PNGs (mode L or P, read as indices) mapped by ``lut``."""

    def read(data: bytes) -> np.ndarray:
        return apply_lut(decode_mask_png(data), lut, expected)

    return read


def to_gray(data: bytes) -> np.ndarray:
    """Decode any image to 8-bit luminance (H, W), as ``cv2.imread(path, 0)`` does.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode the annotation ({type(e).__name__}: {e})") from e


def binary_reader(threshold: int) -> MaskReader:
    """A reader for binary masks: luminance > ``threshold`` -> 1, else 0.

    A mask whose brightest pixel is non-zero but not above ``threshold`` (e.g. a 0/1 mask with
    the default 127) would silently become all background, so it is reported instead.
    """

    def read(data: bytes) -> np.ndarray:
        gray = to_gray(data)
        top = int(gray.max()) if gray.size else 0
        if 0 < top <= threshold:
            raise ValueError(f"mask values are 0..{top}, all at or below the threshold {threshold},"
                             f" so the mask would be empty; for 0/1 masks pass --threshold 0")
        return (gray > threshold).astype(np.uint8)

    return read


def check_threshold(threshold: int) -> int:
    """Validate a binary-mask threshold (0..254)."""
    if not isinstance(threshold, int) or isinstance(threshold, bool) or not 0 <= threshold < 255:
        raise ValueError(f"threshold must be an int in 0..254 (mask > threshold is foreground), "
                         f"got {threshold!r}")
    return threshold


def add_threshold_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--threshold`` (shared by the binary-mask converters)."""
    parser.add_argument("--threshold", type=checked_type(int, check_threshold, "an int in 0..254"),
                        default=127,
                        help="mask luminance above which a pixel is foreground (default 127)")


def load_mat(data: bytes) -> dict[str, Any]:
    """Parse MATLAB ``.mat`` bytes (structs as attribute objects).

    Raises:
        ModuleNotFoundError: scipy is not installed (says how to avoid the need).
        ValueError: the bytes are not a ``.mat`` file.
    """
    require_scipy("reading .mat annotations")
    import scipy.io

    try:
        return scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
    except (ValueError, TypeError, OSError, NotImplementedError) as e:
        raise ValueError(f"cannot read the .mat file ({type(e).__name__}: {e})") from e


def require_scipy(what: str) -> None:
    """Raise a clear error when scipy, needed for ``what``, is missing."""
    try:
        import scipy.io  # noqa: F401
    except ImportError as e:
        raise ModuleNotFoundError(
            f"{what} needs scipy, which is not installed; install it (pip install scipy) or use "
            "the PNG version of the annotations") from e
