"""Evaluation-time inference modes shared by every method: whole, sliding window, multi-scale TTA.

Follows MMSegmentation: sliding windows average LOGITS through a count map; each test pass is
resized back to the original size bilinearly, soft-maxed and un-flipped; TTA averages the
PROBABILITIES of all passes. The argmax is left to the caller.

``predict_fn`` everywhere is a callable ``images (B, 3, h, w) -> logits (B, K, h', w')``; logits at
another resolution than their input are resized bilinearly to it (as MMSegmentation's
``encode_decode`` does).

Example:
    >>> conv = torch.nn.Conv2d(3, 4, 1)
    >>> probs = segment(conv, torch.randn(1, 3, 40, 60), num_classes=4, mode="slide",
    ...                 crop=32, stride=21)
    >>> probs.shape
    torch.Size([1, 4, 40, 60])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

PredictFn = Callable[[torch.Tensor], torch.Tensor]
MODES = ("whole", "slide")
DEFAULT_TTA_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (h, w) pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _predict(predict_fn: PredictFn, images: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Run ``predict_fn`` and return float32 logits (B, K, h, w) at the input resolution."""
    logits = predict_fn(images)
    b, _, h, w = images.shape
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4 or logits.shape[0] != b:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"predict_fn must return logits (B={b}, K, h, w), got {got}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"predict_fn returned {logits.shape[1]} channels but num_classes is {num_classes}"
        )
    return _resize(logits.float(), (h, w))


def slide_windows(
    h: int, w: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """MMSegmentation's sliding-window grid over an h x w image.

    Windows start every ``stride`` pixels; the last one in each direction is pulled back to sit
    flush with the border, and a crop larger than the image yields one image-sized window.

    Args:
        h: image height.
        w: image width.
        crop: window size, int or (h_c, w_c).
        stride: step between windows, int or (h_s, w_s).

    Returns:
        ``[(y0, y1, x0, x1), ...]`` row-major, half-open ranges.

    Example:
        >>> slide_windows(512, 683, 512, 341)
        [(0, 512, 0, 512), (0, 512, 171, 683)]
    """
    h_c, w_c = _pair(crop, "crop")
    h_s, w_s = _pair(stride, "stride")
    rows = max(h - h_c + h_s - 1, 0) // h_s + 1
    cols = max(w - w_c + w_s - 1, 0) // w_s + 1
    windows = []
    for i in range(rows):
        y1 = min(i * h_s + h_c, h)
        y0 = max(y1 - h_c, 0)
        for j in range(cols):
            x1 = min(j * w_s + w_c, w)
            x0 = max(x1 - w_c, 0)
            windows.append((y0, y1, x0, x1))
    return windows


def whole_inference(
    predict_fn: PredictFn,
    image: torch.Tensor,
    pad_to: int | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Logits of the whole image in one call, optionally zero-padded to a multiple of ``pad_to``.

    Padding goes at the bottom/right (zero = the mean colour of a normalised image) and is cropped
    off the logits, for backbones that need H and W divisible by their output stride.

    Args:
        predict_fn: ``(B, 3, h, w) -> (B, K, h, w)`` logits.
        image: float (B, 3, H, W).
        pad_to: pad H and W up to a multiple of this, or ``None``.
        num_classes: if given, the channel count the logits must have.

    Returns:
        float32 logits (B, K, H, W).
    """
    h, w = image.shape[-2:]
    if pad_to is not None:
        if not isinstance(pad_to, int) or pad_to < 1:
            raise ValueError(f"pad_to must be a positive int or None, got {pad_to!r}")
        pad_h, pad_w = (-h) % pad_to, (-w) % pad_to
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))  # (B, 3, H+pad_h, W+pad_w)
    logits = _predict(predict_fn, image, num_classes)
    return logits[..., :h, :w]


def slide_inference(
    predict_fn: PredictFn,
    image: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
    pad_to: int | None = None,
    window_batch: int = 1,
) -> torch.Tensor:
    """Logits averaged over MMSegmentation's sliding windows (count-map mean, no weighting).

    Args:
        predict_fn: ``(B, 3, h, w) -> (B, K, h, w)`` logits.
        image: float (B, 3, H, W).
        crop: window size, int or (h_c, w_c).
        stride: step, int or (h_s, w_s).
        num_classes: K.
        pad_to: zero-pad each window to a multiple of this before ``predict_fn`` (see
            :func:`whole_inference`).
        window_batch: windows stacked into one ``predict_fn`` call (all windows have the same
            size); raise it on large GPUs for speed.

    Returns:
        float32 logits (B, K, H, W).
    """
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}")
    b, _, h, w = image.shape
    windows = slide_windows(h, w, crop, stride)
    logits = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start : start + window_batch]
        crops = torch.cat([image[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk])  # (n*B, 3, ...)
        out = whole_inference(predict_fn, crops, pad_to=pad_to, num_classes=num_classes)
        for k, (y0, y1, x0, x1) in enumerate(chunk):
            logits[:, :, y0:y1, x0:x1] += out[k * b : (k + 1) * b]
            count[:, :, y0:y1, x0:x1] += 1
    return logits / count


def resize_keep_ratio(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """Size after mmcv's keep-ratio rescale into ``scale`` (order-free: long and short edge).

    factor = min(max(scale) / long_edge, min(scale) / short_edge); sizes are ``int(x * f + 0.5)``.

    Args:
        h: image height.
        w: image width.
        scale: the (long, short) bound in either order, e.g. (2048, 512).

    Returns:
        ``(h2, w2)``.

    Example:
        >>> resize_keep_ratio(1024, 2048, (2048, 512)), resize_keep_ratio(375, 500, (2048, 512))
        ((512, 1024), (512, 683))
    """
    s0, s1 = _pair(tuple(scale), "scale")
    factor = min(max(s0, s1) / max(h, w), min(s0, s1) / min(h, w))
    # max(1, .) only guards degenerate tiny images; mmcv's rule is int(x * f + 0.5).
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def tta_scales(
    h: int, w: int, ratios: Sequence[float], base_scale: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """Scale arguments of MMSegmentation 0.x ``MultiScaleFlipAug``, in its (w, h)-style order.

    With ``base_scale`` each ratio multiplies it; without one, it multiplies the image's (w, h).
    Each scale is then applied with :func:`resize_keep_ratio`.

    Args:
        h: image height.
        w: image width.
        ratios: scale ratios, e.g. (0.5, 1.0, 2.0).
        base_scale: e.g. (2048, 512), or ``None`` for the image size.

    Returns:
        ``[(int(s0 * r), int(s1 * r)), ...]``, one per ratio.

    Example:
        >>> tta_scales(288, 512, [0.5, 1.0, 2.0], None)
        [(256, 144), (512, 288), (1024, 576)]
    """
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of positive numbers, got {ratios!r}")
    s0, s1 = (w, h) if base_scale is None else _pair(tuple(base_scale), "base_scale")
    return [(int(s0 * r), int(s1 * r)) for r in ratios]


@torch.no_grad()
def segment(
    predict_fn: PredictFn,
    image: torch.Tensor,
    *,
    num_classes: int,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    tta: bool = False,
    ratios: Sequence[float] = DEFAULT_TTA_RATIOS,
    flip: bool = True,
    test_scale: Sequence[int] | None = None,
    pad_to: int | None = None,
    window_batch: int = 1,
) -> torch.Tensor:
    """Class probabilities at the original size, from one pass or a multi-scale + flip TTA.

    Each pass resizes the image (bilinear) to its scale, runs whole or slide inference, resizes
    the logits back to (H, W), soft-maxes them and un-flips; passes are averaged. Without TTA the
    single pass is at ``test_scale`` (keep-ratio) or the native size. With TTA the passes are
    every ratio of :func:`tta_scales` (relative to ``test_scale``, or to the image size when it
    is ``None``), each without and, if ``flip``, with a horizontal flip.

    Args:
        predict_fn: ``(B, 3, h, w) -> (B, K, h, w)`` logits.
        image: normalised float (B, 3, H, W).
        num_classes: K.
        mode: ``"whole"`` or ``"slide"``.
        crop: slide window size (required for ``"slide"``).
        stride: slide step (required for ``"slide"``).
        tta: run the multi-scale (+ flip) passes.
        ratios: TTA scale ratios (MMSegmentation's ``--aug-test`` six by default).
        flip: add horizontally flipped passes under TTA.
        test_scale: keep-ratio test scale such as (2048, 512), or ``None`` for the native size.
        pad_to: zero-pad each network input to a multiple of this.
        window_batch: windows per ``predict_fn`` call in slide mode.

    Returns:
        float32 probabilities (B, K, H, W); ``.argmax(1)`` gives the prediction.

    Raises:
        ValueError: on an unknown mode, a slide mode without crop/stride, or a bad image shape.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError(
            f"mode='slide' needs crop and stride (got crop={crop!r}, stride={stride!r}), "
            "e.g. crop=512, stride=341; or use mode='whole'"
        )
    if image.ndim != 4 or image.shape[1] != 3 or not image.dtype.is_floating_point:
        raise ValueError(
            f"image must be a float (B, 3, H, W) tensor, got {image.dtype} {tuple(image.shape)}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    h, w = image.shape[-2:]
    if tta:
        sizes = [resize_keep_ratio(h, w, s) for s in tta_scales(h, w, ratios, test_scale)]
        flips = (False, True) if flip else (False,)
    else:
        sizes = [resize_keep_ratio(h, w, test_scale) if test_scale is not None else (h, w)]
        flips = (False,)

    probs = image.new_zeros((image.shape[0], num_classes, h, w), dtype=torch.float32)
    for size in sizes:
        scaled = _resize(image, size)
        for flipped in flips:
            x = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                logits = slide_inference(
                    predict_fn, x, crop, stride, num_classes, pad_to, window_batch
                )
            else:
                logits = whole_inference(predict_fn, x, pad_to=pad_to, num_classes=num_classes)
            p = _resize(logits, (h, w)).softmax(dim=1)
            probs += p.flip(-1) if flipped else p
    return probs / (len(sizes) * len(flips))
