"""Hole masks for MaskSup's masked view: free-form brush strokes or MAE-style square patches.

The released MaskSup code reads free-form hole masks from the NVIDIA irregular-mask set (its
"heavy" end, hole ratio 50-60 %). That set is not shipped with the code, so ``freeform`` draws
comparable masks procedurally: random walks of thick round brush strokes (random start, angle,
segment length and width), drawn until a hidden-area ratio sampled from ``ratio_range`` is reached;
the last segment is trimmed so the achieved ratio always lies inside the range. ``patches`` hides
square patches like MAE, an extension the official code does not have.

In every mask 1 means hidden, 0 means visible.

Example:
    >>> holes = random_holes(2, 64, 64, kind="patches", mask_ratio=0.5, patch_size=16,
    ...                      ratio_range=(0.5, 0.6))
    >>> holes.shape, float(holes.mean())
    (torch.Size([2, 1, 64, 64]), 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

HOLE_KINDS = ("freeform", "patches")

# Stroke geometry relative to the short image side: thick strokes of a few vertices, like the
# NVIDIA irregular masks (which were themselves traced from random-walk occlusions).
_VERTICES = (4, 12)
_SEGMENT_LENGTH = (0.04, 0.15)
_BRUSH_WIDTH = (0.03, 0.09)
_MAX_TURN = math.pi / 3
# A 60 % mask at 224x224 needs ~40 strokes; this bound only stops a pathological range near 1.0.
_MAX_STROKES = 2000


def resolve_ratio_range(
    kind: str, mask_ratio: float | None, ratio_range: Sequence[float]
) -> tuple[float, float]:
    """The hidden-area range one mask is drawn from, after applying ``mask_ratio``.

    For ``freeform`` a given ``mask_ratio`` re-centres ``ratio_range`` on it (same width, clipped
    to [0, 1]); for ``patches`` the result is the single ratio ``(r, r)``, where ``r`` is
    ``mask_ratio`` or, when it is None, the middle of ``ratio_range``.

    Args:
        kind: ``"freeform"`` or ``"patches"``.
        mask_ratio: hidden fraction the caller asks for, or None to use ``ratio_range``.
        ratio_range: (low, high) hidden-area fractions, 0 <= low <= high <= 1.

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: on an unknown kind or a ratio outside [0, 1].
    """
    if kind not in HOLE_KINDS:
        raise ValueError(f"unknown hole kind {kind!r}; expected one of {HOLE_KINDS}")
    if len(ratio_range) != 2:
        raise ValueError(f"ratio_range must be [low, high], got {list(ratio_range)}")
    low, high = float(ratio_range[0]), float(ratio_range[1])
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(
            f"ratio_range must satisfy 0 <= low <= high <= 1, got [{low}, {high}]; "
            "e.g. [0.5, 0.6] for the heavy NVIDIA bucket"
        )
    if mask_ratio is not None and not 0.0 <= float(mask_ratio) <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1] or be None, got {mask_ratio}")
    if kind == "patches":
        r = (low + high) / 2 if mask_ratio is None else float(mask_ratio)
        return r, r
    if mask_ratio is None:
        return low, high
    half = (high - low) / 2
    return max(0.0, float(mask_ratio) - half), min(1.0, float(mask_ratio) + half)


def _keep_nearest(candidates: np.ndarray, point: tuple[float, float], count: int) -> np.ndarray:
    """Boolean map of the ``count`` candidate pixels nearest to ``point`` (x, y)."""
    ys, xs = np.nonzero(candidates)
    order = np.argsort((xs - point[0]) ** 2 + (ys - point[1]) ** 2, kind="stable")[:count]
    keep = np.zeros_like(candidates)
    keep[ys[order], xs[order]] = True
    return keep


def _hidden_count(img: Image.Image) -> int:
    # Several times faster than Image.histogram() on a 224x224 mask.
    return int(np.count_nonzero(np.asarray(img)))


def _random_stroke(
    height: int, width: int, rng: np.random.Generator
) -> tuple[list[tuple[float, float]], int]:
    """Vertices (x, y) of one random-walk stroke and its brush width in pixels."""
    side = min(height, width)
    n = int(rng.integers(_VERTICES[0], _VERTICES[1] + 1))
    brush = max(1, round(rng.uniform(*_BRUSH_WIDTH) * side))
    x, y = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
    angles = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.uniform(-_MAX_TURN, _MAX_TURN, n))
    lengths = np.maximum(1.0, rng.uniform(*_SEGMENT_LENGTH, n) * side)
    points = [(x, y)]
    for angle, length in zip(angles.tolist(), lengths.tolist()):
        # Clipping keeps the walk on the canvas, so every segment can add hidden pixels.
        x = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
        y = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
        points.append((x, y))
    return points, brush


def _dot(draw: ImageDraw.ImageDraw, point: tuple[float, float], brush: int) -> None:
    # Round caps and joints: a disc of the brush's diameter at every vertex.
    r = brush / 2
    draw.ellipse([point[0] - r, point[1] - r, point[0] + r, point[1] + r], fill=255)


def _draw_segment(
    draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], brush: int
) -> None:
    draw.line([a, b], fill=255, width=brush)
    _dot(draw, b, brush)


def freeform_hole(
    height: int, width: int, ratio_range: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """One free-form stroke mask whose hidden ratio lies in ``ratio_range``.

    A target ratio is drawn uniformly from the range; whole strokes are drawn until the target is
    reached. If the last stroke overshoots the range, it is replayed segment by segment and the
    overshooting segment is cut short (its pixels nearest the segment start are kept), so the
    result hits the target exactly.

    Args:
        height: mask height in pixels.
        width: mask width in pixels.
        ratio_range: (low, high) hidden fractions, 0 <= low <= high <= 1.
        rng: numpy generator (all randomness comes from it).

    Returns:
        bool array (height, width), True = hidden.
    """
    low, high = float(ratio_range[0]), float(ratio_range[1])
    total = height * width
    # Counts in pixels; the epsilons keep e.g. 0.5 * 4096 from rounding away from 2048.
    high_count = math.floor(high * total + 1e-9)
    target = math.ceil(rng.uniform(low, high) * total - 1e-9)
    target = min(max(target, math.ceil(low * total - 1e-9)), high_count)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    count = 0
    for _ in range(_MAX_STROKES):
        if count >= target:
            break
        points, brush = _random_stroke(height, width, rng)
        snapshot = img.copy()
        # Drawn piece by piece exactly as the replay below, so both rasterise the same pixels.
        _dot(draw, points[0], brush)
        for a, b in zip(points[:-1], points[1:]):
            _draw_segment(draw, a, b, brush)
        count = _hidden_count(img)
        if count <= high_count:
            continue
        # Overshoot: replay the stroke on the snapshot one piece at a time and cut the piece
        # that crosses the target.
        img, draw = snapshot, ImageDraw.Draw(snapshot)
        prev = np.asarray(img) > 0
        _dot(draw, points[0], brush)
        if _hidden_count(img) >= target:
            return _trim(prev, np.asarray(img) > 0, points[0], target)
        for a, b in zip(points[:-1], points[1:]):
            prev = np.asarray(img) > 0
            _draw_segment(draw, a, b, brush)
            if _hidden_count(img) >= target:
                return _trim(prev, np.asarray(img) > 0, a, target)
        count = _hidden_count(img)  # not reached: the replay draws the same pixels
    hidden = np.asarray(img) > 0
    if hidden.sum() < target:
        # Only reachable for ranges near 1.0: grow a blob from the centre to reach the target.
        extra = _keep_nearest(~hidden, (width / 2, height / 2), target - int(hidden.sum()))
        hidden = hidden | extra
    return hidden


def _trim(
    prev: np.ndarray, after: np.ndarray, start: tuple[float, float], target: int
) -> np.ndarray:
    """``prev`` plus the pixels of ``after`` new to it nearest ``start``, ``target`` in total."""
    need = target - int(prev.sum())
    if need <= 0:
        return prev
    return prev | _keep_nearest(after & ~prev, start, need)


def patch_holes(
    batch: int,
    height: int,
    width: int,
    mask_ratio: float,
    patch_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MAE-style square patch masks, exactly ``round(mask_ratio * num_patches)`` per sample.

    The patch grid is ``ceil(H / p) x ceil(W / p)``; patches on the bottom/right border are cut
    to the image, so on sizes not divisible by ``patch_size`` the hidden pixel fraction differs
    slightly from ``mask_ratio`` while the number of hidden patches stays exact.

    Args:
        batch: number of masks B.
        height: mask height H.
        width: mask width W.
        mask_ratio: fraction of patches hidden, in [0, 1].
        patch_size: patch side p in pixels.
        generator: CPU torch generator for reproducible masks.

    Returns:
        float tensor (B, 1, H, W) on the CPU, values in {0, 1}.
    """
    gh, gw = math.ceil(height / patch_size), math.ceil(width / patch_size)
    num_patches = gh * gw
    k = round(mask_ratio * num_patches)
    noise = torch.rand(batch, num_patches, generator=generator)  # (B, N)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, N) rank of each patch's noise
    hidden = (ranks < k).float().view(batch, 1, gh, gw)  # (B, 1, gh, gw)
    hidden = hidden.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return hidden[:, :, :height, :width].contiguous()  # (B, 1, H, W)


def random_holes(
    batch: int,
    height: int,
    width: int,
    *,
    kind: str,
    mask_ratio: float | None,
    patch_size: int,
    ratio_range: Sequence[float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A batch of random hole masks (1 = hidden), independent per sample.

    Args:
        batch: number of masks B.
        height: mask height H.
        width: mask width W.
        kind: ``"freeform"`` (brush strokes) or ``"patches"`` (MAE-style squares).
        mask_ratio: patches: fraction of patches hidden (None: middle of ``ratio_range``);
            freeform: centre of the hidden-ratio range (None: ``ratio_range`` as given).
        patch_size: patch side in pixels (``patches`` only).
        ratio_range: (low, high) hidden-area fractions for ``freeform``; default bucket of the
            paper's "heavy" masks is (0.5, 0.6).
        generator: CPU torch generator; the same generator state gives the same masks.
        device: device of the returned tensor (masks are drawn on the CPU).

    Returns:
        float32 tensor (B, 1, H, W) with values in {0, 1}.

    Raises:
        ValueError: on an unknown kind, a ratio outside [0, 1], or a non-positive size.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_holes(4, 224, 224, kind="freeform", mask_ratio=None, patch_size=16,
        ...              ratio_range=(0.5, 0.6), generator=g).shape
        torch.Size([4, 1, 224, 224])
    """
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(f"need batch >= 0 and a positive size, got {batch}x{height}x{width}")
    low, high = resolve_ratio_range(kind, mask_ratio, ratio_range)
    if kind == "patches":
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        holes = patch_holes(batch, height, width, low, int(patch_size), generator)
    else:
        # One 63-bit seed from the torch generator makes the numpy drawing follow its state.
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        arr = np.stack([freeform_hole(height, width, (low, high), rng) for _ in range(batch)])
        holes = torch.from_numpy(arr.astype(np.float32)).view(batch, 1, height, width)
    return holes.to(device) if device is not None else holes


def mask_images(images: torch.Tensor, holes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Replace hidden pixels by ``fill``: ``images * (1 - holes) + fill * holes``.

    MaskSup masks the already normalised image, so the default fill 0 is the normalisation mean
    (mid-grey for mean = std = 127.5), as in the official code.

    Args:
        images: float (B, C, H, W), normalised.
        holes: (B, 1, H, W) or (B, C, H, W) with values in {0, 1}, 1 = hidden.
        fill: value written into the holes, in normalised units.

    Returns:
        float (B, C, H, W), same dtype and device as ``images``.

    Raises:
        ValueError: if the shapes cannot broadcast.

    Example:
        >>> mask_images(torch.ones(1, 3, 2, 2), torch.tensor([[[[1.0, 0], [0, 0]]]]), fill=-1.0)[0, 0]
        tensor([[-1.,  1.],
                [ 1.,  1.]])
    """
    if holes.ndim != 4 or holes.shape[0] != images.shape[0] or holes.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"holes must be (B, 1, H, W) matching images {tuple(images.shape)}, "
            f"got {tuple(holes.shape)}"
        )
    holes = holes.to(images.dtype)
    return images * (1 - holes) + fill * holes
