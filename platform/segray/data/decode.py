"""Decoding and the CPU-side geometric augmentation (random rescale + fixed-size crop).

JPEG images (colour or greyscale) are decoded by libjpeg-turbo through ``simplejpeg``: the same
pixels as Pillow, which bundles the same library, in two thirds of the time (its per-image
overhead is the difference). The decode is strict (:mod:`segray.data.jpeg`): damage libjpeg would
paper over with made-up pixels is an error. Everything else (PNG, other formats, CMYK JPEG) goes
through Pillow, whose errors name what is wrong; a PNG's chunk checksums are checked first, as
every mask's are (Pillow skips the pixel data's and accepts a file missing its end).

Pure NumPy/PIL/OpenCV, no Ray: the Ray Data stream (:mod:`segray.data.stream`) calls these per
row, and tools and tests call them directly. Flips and photometric/strong augmentation are not
here: they run on the training device in :mod:`segray.augment`.

Example:
    >>> rng = np.random.default_rng(0)
    >>> img = np.zeros((50, 70, 3), np.uint8); msk = np.zeros((50, 70), np.uint8)
    >>> out_img, out_msk = random_scale_crop(img, msk, crop=(64, 64), rng=rng)
    >>> out_img.shape, out_msk.shape
    ((64, 64, 3), (64, 64))
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from segray.data import jpeg, maskpng
from segray.data.shards import decode_mask_png

RESAMPLE_FILTERS = ("cv2", "pillow")
MASK_FILTERS = ("nearest", "cv2_nearest", "cv2_area")
_CV2_MAX_SIDE = 32767  # OpenCV's remap addresses pixels with int16; Pillow takes larger images


class BadSampleError(ValueError):
    """A row whose bytes cannot be used; names the shard and key so the file can be fixed.

    Attributes:
        shard: shard path or URI the row came from.
        key: the row's key.
        reason: what is wrong with it.
    """

    def __init__(self, shard: str, key: str, reason: str) -> None:
        self.shard, self.key, self.reason = shard, key, reason
        super().__init__(f"bad sample {key!r} in shard {shard}: {reason}")

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions raised in workers; the default reduce would pass only the message.
        return type(self), (self.shard, self.key, self.reason)


def open_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, ...) to a loaded RGB PIL image.

    EXIF orientation is deliberately not applied: masks are aligned with the stored pixels.

    Raises:
        ValueError: the bytes are not a decodable image.
    """
    try:
        img = Image.open(io.BytesIO(data))  # in-memory bytes: nothing to close
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image bytes ({type(e).__name__}: {e})") from e


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to a uint8 (H, W, 3) RGB array.

    A JPEG is decoded strictly (:func:`segray.data.jpeg.decode`): a colour or greyscale one by
    libjpeg-turbo directly; another colour space (CMYK), or one whose metadata libjpeg warns
    about, is checked as strictly and decoded by Pillow. Anything else as :func:`open_image`, a
    PNG once its chunks' checksums are checked. Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) holds throughout. EXIF orientation is not applied.

    Raises:
        ValueError: the bytes are not a decodable image, or damaged image data a lenient decoder
            would fill with made-up pixels (a cut or corrupt JPEG scan, a PNG failing a checksum
            or cut short).
    """
    if data[:3] == jpeg.SOI:
        pixels = jpeg.decode(data)
        if pixels is not None:
            return pixels
    elif data[:8] == _PNG_SIGNATURE:
        try:
            maskpng.decode_unfiltered(data)  # checks every chunk; decodes only grey/palette PNGs
        except ValueError as e:
            raise ValueError(f"cannot decode image bytes ({e})") from e
    return np.asarray(open_image(data), dtype=np.uint8)


def decode_mask(data: bytes) -> np.ndarray:
    """Decode a class-id PNG to uint8 (H, W) (uint16 for datasets past 255 values).

    Raises:
        ValueError: not a single-channel PNG.
    """
    return decode_mask_png(data)


def multi_hot(labels: Sequence[int] | np.ndarray | None, num_classes: int) -> np.ndarray:
    """Image-level class ids -> uint8 multi-hot vector (K,).

    Example:
        >>> multi_hot([0, 2], 4).tolist()
        [1, 0, 1, 0]
    """
    out = np.zeros(num_classes, dtype=np.uint8)
    if labels is not None and len(labels):
        out[np.asarray(labels, dtype=np.int64)] = 1
    return out


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size`` = (H, W), sampling pixel centres.

    Label values are copied, never blended, so the output holds only values of the input.
    """
    return _nearest_window(mask, size, (0, size[0]), (0, size[1]))


def _nearest_window(mask: np.ndarray, size: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int], centre: bool = True) -> np.ndarray:
    """``resize_nearest(mask, size)[rows[0]:rows[1], cols[0]:cols[1]]`` without the full resize.

    ``centre=False`` takes OpenCV's ``INTER_NEAREST`` pixel instead: ``floor(dst * (1 / (size /
    src)))`` in double precision, as OpenCV computes it.
    """
    h, w = mask.shape[:2]
    if centre:
        r = ((np.arange(*rows) + 0.5) * h / size[0]).astype(np.intp)
        c = ((np.arange(*cols) + 0.5) * w / size[1]).astype(np.intp)
    else:
        r = np.floor(np.arange(*rows) * (1.0 / (size[0] / h))).astype(np.intp)
        c = np.floor(np.arange(*cols) * (1.0 / (size[1] / w))).astype(np.intp)
    # Two 1-D gathers: several times faster than one 2-D fancy index.
    return mask[np.minimum(r, h - 1)][:, np.minimum(c, w - 1)]


def _area_window(mask: np.ndarray, size: tuple[int, int], rows: tuple[int, int],
                 cols: tuple[int, int], ignore_index: int) -> np.ndarray:
    """OpenCV's ``INTER_AREA`` resize of a binary {0, 1} label map, cropped to the window.

    The foreground (class 1) is averaged over each output pixel's footprint and rounded by
    OpenCV itself; ignored pixels stay where the nearest resize puts them.

    Raises:
        ValueError: the map holds a label other than 0, 1 and ``ignore_index``.
    """
    labels = np.unique(mask)
    extra = sorted(set(labels.tolist()) - {0, 1, ignore_index})
    if extra:
        raise ValueError(f"mask_resample 'cv2_area' needs a binary {{0, 1}} label map, found "
                         f"labels {extra[:5]}; use 'nearest' or 'cv2_nearest' for class maps")
    cv2 = _cv2()
    fg = cv2.resize((mask == 1).astype(np.uint8), (size[1], size[0]),
                    interpolation=cv2.INTER_AREA)[rows[0]:rows[1], cols[0]:cols[1]]
    out = fg.astype(mask.dtype)
    if ignore_index in labels:
        ignored = _nearest_window(mask, size, rows, cols, centre=False) == ignore_index
        out[ignored] = ignore_index
    return out


def random_scale_crop(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    rng: np.random.Generator | None = None,
    cat_max_ratio: float = 1.0,
    ignore_index: int = 255,
    *,
    base_scale: tuple[int, int] | None = None,
    scale_choices: tuple[float, ...] | None = None,
    resize: tuple[int, int] | None = None,
    resample: str = "cv2",
    mask_resample: str = "nearest",
    with_valid: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Random rescale, random crop and pad to a fixed size (MMSeg ``Resize(img_scale,
    ratio_range)`` + ``RandomCrop`` + ``Pad`` semantics).

    The image is rescaled by a ratio drawn uniformly from ``scale_range`` keeping its aspect
    (bilinear for the image, nearest for the mask), a ``crop``-sized window is drawn uniformly,
    and what falls outside the rescaled image is padded at the bottom/right with 0 (image) and
    ``ignore_index`` (mask). Only the window is resampled, never the whole rescaled image.

    ``resample`` picks the image filter of the official code being reproduced:

    - ``"cv2"``: mmcv's ``cv2.resize(INTER_LINEAR)`` (MMSeg, and tensor ``interpolate`` as in
      U2PL-style code): 2x2 taps at ``(dst + 0.5) * scale - 0.5`` at any ratio, so shrinking
      aliases. The window is sampled by ``cv2.warpAffine`` on the same grid: within one grey
      level of resize-then-crop, 50-60 µs for a 128x128 window at any ratio.
    - ``"pillow"``: Pillow's bilinear ``resize`` (torchvision's ``Resize`` of PIL images), whose
      filter widens when shrinking (antialiased): the same pixels as cv2 within one level at
      ratios >= 1, blurrier below. 40-410 µs for the same window, the most when shrinking.

    ``mask_resample`` picks the label filter:

    - ``"nearest"`` (default): the source pixel under each output pixel's centre, in step with
      the image.
    - ``"cv2_nearest"``: OpenCV's ``INTER_NEAREST``, ``floor(dst * scale)``: up to one source
      pixel up/left of the centre's (MaskSup's NYUDv2 loader; mmcv's ``imresize`` of labels).
    - ``"cv2_area"``: OpenCV's ``INTER_AREA`` on a binary {0, 1} map, each pixel the rounded
      foreground share of its footprint (MaskSup's GLaS and polyp loaders).

    With ``cat_max_ratio < 1`` up to 10 windows are tried until no single class covers more than
    that share of the labelled pixels (and at least two classes are seen).

    Args:
        image: uint8 (H, W, 3).
        mask: integer (H, W) class ids, or None for an unlabelled image (output all ignore).
        crop: output (crop_h, crop_w).
        scale_range: (low, high) rescale ratios.
        rng: random generator; a fresh unseeded one when None.
        cat_max_ratio: largest share one class may take of a crop (1.0 disables the check).
        ignore_index: mask value for padding.
        base_scale: mmseg ``img_scale`` (long, short). The drawn ratio r scales it to
            (long·r, short·r) and the image is resized keeping its aspect so it fits (mmcv
            ``rescale_size``). None: the image's own size is scaled by r.
        scale_choices: discrete ratios drawn uniformly (the SeMask fork's list ``ratio_range``)
            instead of the ``scale_range`` interval.
        resize: (h, w) the image is resized to, aspect not kept (mmseg ``keep_ratio=False``),
            before the drawn ratio scales it; excludes ``base_scale``.
        resample: the image filter, ``"cv2"`` or ``"pillow"`` (see above). The first ``"cv2"``
            call sets OpenCV to one thread in the process: a decode task owns one CPU.
        mask_resample: the label filter, ``"nearest"``, ``"cv2_nearest"`` or ``"cv2_area"``
            (see above).
        with_valid: also return the crop's (height, width) before padding.

    Returns:
        ``(image, mask)``: uint8 (crop_h, crop_w, 3) and (crop_h, crop_w) of the mask's dtype
        (uint8 for an unlabelled image); with ``with_valid`` also ``(valid_h, valid_w)``, the
        part of the crop that is image, not padding (its top-left).

    Raises:
        ValueError: bad crop size, scale range, ``resample`` or ``mask_resample``, ``resize``
            with ``base_scale``, mask size differs from image size, or ``"cv2_area"`` on a mask
            that is not binary.
    """
    crop_h, crop_w = (int(v) for v in crop)
    lo, hi = (float(v) for v in scale_range)
    if crop_h < 1 or crop_w < 1:
        raise ValueError(f"crop must be (height, width) >= 1, got {crop}")
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    if resize is not None and base_scale is not None:
        raise ValueError("resize and base_scale exclude each other")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {RESAMPLE_FILTERS}, got {resample!r}")
    if mask_resample not in MASK_FILTERS:
        raise ValueError(f"mask_resample must be one of {MASK_FILTERS}, got {mask_resample!r}")
    h, w = image.shape[:2]
    if mask is None:
        mask = np.full((h, w), ignore_index, dtype=np.uint8)
    elif mask.shape[:2] != (h, w):
        raise ValueError(f"mask is {mask.shape[0]}x{mask.shape[1]} but image is {h}x{w}")
    rng = rng if rng is not None else np.random.default_rng()

    ratio = float(rng.choice(scale_choices)) if scale_choices else rng.uniform(lo, hi)
    if resize is not None:
        size = (max(1, int(resize[0] * ratio + 0.5)), max(1, int(resize[1] * ratio + 0.5)))
    else:
        if base_scale is not None:
            long_max, short_max = int(max(base_scale) * ratio), int(min(base_scale) * ratio)
            factor = min(long_max / max(h, w), short_max / min(h, w))
        else:
            factor = ratio
        size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))

    # Only the window is resampled: its pixel centres map to the source as in a whole-image
    # resize, at a fraction of the cost.
    margin_h, margin_w = max(size[0] - crop_h, 0), max(size[1] - crop_w, 0)
    for _ in range(10 if cat_max_ratio < 1.0 else 1):
        y0, x0 = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        y1, x1 = min(y0 + crop_h, size[0]), min(x0 + crop_w, size[1])
        if mask_resample == "cv2_area" and size != (h, w):
            window = _area_window(mask, size, (y0, y1), (x0, x1), ignore_index)
        else:
            window = _nearest_window(mask, size, (y0, y1), (x0, x1),
                                     centre=mask_resample == "nearest")
        if cat_max_ratio >= 1.0:
            break
        counts = np.bincount(window[window != ignore_index].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    sy, sx = h / size[0], w / size[1]
    if size == (h, w):  # no rescale: a plain crop
        part = image[y0:y1, x0:x1]
    elif resample == "cv2" and max(h, w, size[0], size[1]) < _CV2_MAX_SIDE:
        part = _warp_window(image, (y1 - y0, x1 - x0), (y0, x0), (sy, sx))
    else:
        box = (x0 * sx, y0 * sy, min(x1 * sx, w), min(y1 * sy, h))  # no float overshoot
        part = _resample_box(image, (y1 - y0, x1 - x0), box, (sy, sx))

    out_image = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    out_mask = np.full((crop_h, crop_w), ignore_index, dtype=mask.dtype)
    out_image[: part.shape[0], : part.shape[1]] = part
    out_mask[: window.shape[0], : window.shape[1]] = window
    if with_valid:
        return out_image, out_mask, (y1 - y0, x1 - x0)
    return out_image, out_mask


@functools.cache
def _cv2() -> Any:
    import cv2

    cv2.setNumThreads(1)  # on 2 threads a 128x128 window took 45 % more CPU in all
    return cv2


def _warp_window(image: np.ndarray, out: tuple[int, int], origin: tuple[int, int],
                 scale: tuple[float, float]) -> np.ndarray:
    """Rows ``origin[0]:+out[0]``, columns ``origin[1]:+out[1]`` of ``cv2.resize(image,
    INTER_LINEAR)`` to a size ``scale`` times smaller, as uint8 (h, w, 3).

    ``warpAffine`` on the same source grid: output pixel ``(y, x)`` of the window reads the
    source at ``((origin + (y, x) + 0.5) * scale - 0.5)``, borders replicated as ``resize``
    clamps them. Its 1/32-pixel positions put values within one grey level of ``resize``.

    OpenCV's vectorised path warps 4-channel images only (3 channels take 2.5x as long), so the
    source rows and columns the window's taps reach are widened to RGBA first and the result
    narrowed back: 50-60 µs for a 128x128 window instead of 115. Moving the grid's origin by
    whole pixels rounds a few of its fixed-point positions the other way: about 1 value in 4,000
    differs by one grey level from warping the whole image.
    """
    cv2 = _cv2()
    (y0, x0), (sy, sx) = origin, scale
    h, w = image.shape[:2]
    top, left = (y0 + 0.5) * sy - 0.5, (x0 + 0.5) * sx - 0.5
    # The taps reach floor(p) and floor(p) + 1; one pixel more each side for the rounding.
    r0 = min(max(int(np.floor(top)) - 1, 0), h - 1)
    c0 = min(max(int(np.floor(left)) - 1, 0), w - 1)
    r1 = min(max(int(np.floor(top + (out[0] - 1) * sy)) + 3, r0 + 1), h)
    c1 = min(max(int(np.floor(left + (out[1] - 1) * sx)) + 3, c0 + 1), w)
    region = cv2.cvtColor(np.ascontiguousarray(image[r0:r1, c0:c1]), cv2.COLOR_RGB2RGBA)
    inverse = np.array([[sx, 0.0, left - c0], [0.0, sy, top - r0]])
    warped = cv2.warpAffine(region, inverse, (out[1], out[0]),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)


def _resample_box(image: np.ndarray, out: tuple[int, int],
                  box: tuple[float, float, float, float],
                  scale: tuple[float, float]) -> np.ndarray:
    """Pillow's bilinear ``resize(out[::-1], box=box)`` of ``image``, as uint8 (h, w, 3).

    The image goes to Pillow only as far as the filter reaches around ``box`` (its support is one
    source pixel, times the scale when shrinking), not whole: copying a whole decoded image into
    Pillow costs about as much as resampling the window. The taps are those of the whole-image
    call, clamped at the same image edges, but Pillow's fixed-point sums depend on the region it
    is given: about 6 % of the values differ by one grey level, about 0.1 % by two.
    """
    h, w = image.shape[:2]
    reach_y, reach_x = max(scale[0], 1.0) + 1, max(scale[1], 1.0) + 1
    r0, r1 = max(int(box[1] - reach_y), 0), min(int(box[3] + reach_y) + 1, h)
    c0, c1 = max(int(box[0] - reach_x), 0), min(int(box[2] + reach_x) + 1, w)
    region = Image.fromarray(np.ascontiguousarray(image[r0:r1, c0:c1]))
    local = (box[0] - c0, box[1] - r0, box[2] - c0, box[3] - r0)
    return np.asarray(region.resize(out[::-1], Image.BILINEAR, box=local))


def validate_sample(
    image_bytes: bytes,
    mask_bytes: bytes | None,
    *,
    num_classes: int,
    ignore_index: int = 255,
    shard: str = "?",
    key: str = "?",
    height: int | None = None,
    width: int | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one row and check it, so a bad row is reported by shard and key.

    Args:
        image_bytes: encoded image.
        mask_bytes: class-id PNG or None.
        num_classes: valid label values are ``0 .. num_classes - 1`` and ``ignore_index``.
        ignore_index: the ignore value.
        shard: shard the row came from (for the error).
        key: the row's key (for the error).
        height: the row's recorded height, checked if given.
        width: the row's recorded width, checked if given.
        labels: the row's image-level class ids, checked against ``num_classes`` if given.

    Returns:
        ``(image, mask)``: uint8 (H, W, 3) and (H, W) or None.

    Raises:
        BadSampleError: undecodable image or mask, mask size != image size, recorded size !=
            decoded size, mask values outside ``[0, num_classes)`` other than ignore, or
            image-level labels outside ``[0, num_classes)``.
    """
    if labels is not None and len(labels):
        ids = np.asarray(labels, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= num_classes:
            raise BadSampleError(shard, key, f"image-level labels {ids.tolist()} are outside "
                                             f"[0, {num_classes})")
    try:
        image = decode_image(image_bytes)
    except ValueError as e:
        raise BadSampleError(shard, key, f"image: {e}") from e
    h, w = image.shape[:2]
    if height is not None and width is not None and (int(height), int(width)) != (h, w):
        raise BadSampleError(shard, key, f"image decodes to {h}x{w} but the row records "
                                         f"{height}x{width}")
    if mask_bytes is None:
        return image, None
    try:
        mask = decode_mask(mask_bytes)
    except ValueError as e:
        raise BadSampleError(shard, key, f"mask: {e}") from e
    if mask.shape != (h, w):
        raise BadSampleError(shard, key, f"mask is {mask.shape[0]}x{mask.shape[1]} but image is "
                                         f"{h}x{w}")
    bad = _labels_outside(mask, num_classes, ignore_index)
    if bad.size:
        raise BadSampleError(shard, key, f"mask has label values {bad[:10].tolist()} outside "
                                         f"[0, {num_classes}) (ignore = {ignore_index})")
    return image, mask


def _labels_outside(mask: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """The distinct values of ``mask`` outside ``[0, num_classes)`` other than ``ignore_index``."""
    if not mask.size or int(mask.max()) < num_classes:  # the common case: one pass, no copy
        return np.zeros(0, dtype=mask.dtype)
    high = mask[mask >= num_classes]
    return np.unique(high[high != ignore_index])
