"""The built-in synthetic dataset: procedural scenes with exact masks, so every command runs offline.

Each image is a textured, noisy background (class 0) with one to four overlapping objects drawn
from five classes. Every class has its own shape *and* colour/texture distribution (a shaded red
disc, a green checkered square, a noisy blue triangle, a yellow-striped ellipse, a banded purple
ring); backgrounds draw their colour from a range that overlaps the objects', so a small CNN
learns the task in minutes but not from colour alone. Splits: ``train`` and ``unlabeled`` images
vary in size (``size`` ± 16 per side) to exercise the rescale/crop path; ``val`` is ``size`` x
``size``; ``unlabeled`` rows have no mask and no labels. Images are encoded once (PNG for every
fourth, JPEG otherwise) and never re-encoded. Generation is deterministic given ``seed``.

Example:
    >>> info = make_synthetic("/tmp/synth", train=8, val=4, unlabeled=4)   # doctest: +SKIP
    >>> info.classes                                                       # doctest: +SKIP
    ['background', 'disc', 'square', 'triangle', 'striped_ellipse', 'ring']
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from segray import storage
from segray.data.manifest import DatasetInfo, manifest_uri
from segray.data.shards import DatasetWriter, encode_mask_png

log = logging.getLogger(__name__)

CLASSES = ["background", "disc", "square", "triangle", "striped_ellipse", "ring"]
PALETTE = [[0, 0, 0], [220, 40, 40], [40, 180, 60], [40, 80, 220], [230, 200, 40], [170, 60, 200]]
VERSION = 1
_SPLIT_IDS = {"train": 0, "val": 1, "unlabeled": 2}


def _background(rng: np.random.Generator, h: int, w: int, yy: np.ndarray,
                xx: np.ndarray) -> np.ndarray:
    base = rng.uniform(60, 170, size=3)
    # Low-frequency colour blotches: a coarse random grid upsampled smoothly.
    coarse = np.clip(128 + rng.normal(0, 45, size=(5, 5, 3)), 0, 255).astype(np.uint8)
    blotch = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32) - 128
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
    wave = 14 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    return base + 0.6 * blotch + wave[..., None] + rng.normal(0, 9, size=(h, w, 3))


def _shape(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean (H, W) region of class ``cls`` in rotated object coordinates ``u, v``."""
    d2 = u**2 + v**2
    if cls == 1:  # disc
        return d2 <= r**2
    if cls == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if cls == 3:  # equilateral triangle with circumradius r: inside all three edges (inradius r/2)
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 3 + k * 2 * np.pi / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
        return inside
    if cls == 4:  # ellipse
        return (u / r) ** 2 + (v / (0.55 * r)) ** 2 <= 1
    return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)  # ring


def _texture(cls: int, rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
             r: float) -> np.ndarray:
    """Float (H, W, 3) colour field of class ``cls`` (only read inside its shape)."""
    h, w = u.shape
    jitter = rng.normal(0, 18, size=3)
    noise = rng.normal(0, 6, size=(h, w, 3))
    if cls == 1:  # red disc, shaded towards the rim
        shade = 1 - 0.35 * np.clip((u**2 + v**2) / r**2, 0, 1)
        return (np.array([205, 50, 45]) + jitter) * shade[..., None] + noise
    if cls == 2:  # green checkerboard
        period = rng.integers(3, 6)
        check = ((np.floor(u / period) + np.floor(v / period)) % 2)[..., None]
        c1 = np.array([60, 175, 70]) + jitter
        return c1 * (1 - 0.4 * check) + noise
    if cls == 3:  # blue with heavy grain
        return np.array([50, 80, 210]) + jitter + rng.normal(0, 28, size=(h, w, 3))
    if cls == 4:  # yellow / brown stripes across the long axis
        period = rng.uniform(4, 7)
        stripe = (np.sin(u * 2 * np.pi / period) > 0)[..., None]
        return np.where(stripe, np.array([232, 205, 50]), np.array([110, 70, 25])) + jitter + noise
    bands = 0.75 + 0.25 * np.cos(np.sqrt(u**2 + v**2) * 1.3)  # purple ring, concentric bands
    return (np.array([175, 70, 205]) + jitter) * bands[..., None] + noise


def render_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene.

    Returns:
        ``(image, mask)``: uint8 (h, w, 3) and uint8 (h, w) class ids (exact, no ignore).
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = _background(rng, h, w, yy, xx)
    mask = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.15, 0.32) * min(h, w)
        cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
        theta = rng.uniform(0, 2 * np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        region = _shape(cls, u, v, r)
        image[region] = _texture(cls, rng, u, v, r)[region]
        mask[region] = cls  # later objects occlude earlier ones, in the mask as in the image
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _encode(image: np.ndarray, png: bool) -> bytes:
    buf = io.BytesIO()
    if png:
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def make_synthetic(
    dst_uri: str,
    *,
    train: int = 192,
    val: int = 48,
    unlabeled: int = 96,
    size: int = 64,
    seed: int = 0,
    rows_per_shard: int = 64,
    name: str = "synthetic",
) -> DatasetInfo:
    """Generate the synthetic dataset at ``dst_uri`` (local path or ``s3://``).

    Args:
        dst_uri: destination folder; an existing dataset there is replaced.
        train: number of labelled training images (>= 1).
        val: number of validation images (0 omits the split).
        unlabeled: number of unlabelled images (0 omits the split).
        size: nominal image side; train/unlabeled sides vary by ± 16 px.
        seed: random seed; equal seeds give byte-identical shards.
        rows_per_shard: rows per Parquet shard.
        name: dataset name in the manifest.

    Returns:
        The written dataset.

    Raises:
        ValueError: a count is negative, ``train`` is 0, or ``size`` < 24.
    """
    counts = {"train": train, "val": val, "unlabeled": unlabeled}
    if train < 1 or min(counts.values()) < 0:
        raise ValueError(f"image counts must be >= 0 with train >= 1, got {counts}")
    if size < 24:
        raise ValueError(f"size must be >= 24 pixels (images vary by ± 16), got {size}")
    splits = [s for s, n in counts.items() if n > 0]
    provenance = {"converter": "synthetic", "version": VERSION, "seed": seed, "size": size,
                  "counts": counts}
    with DatasetWriter(dst_uri, name, CLASSES, PALETTE, 255, provenance,
                       rows_per_shard=rows_per_shard, splits=splits) as writer:
        for split in splits:
            for i in range(counts[split]):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
                if split == "val":
                    h = w = size
                else:
                    h, w = (int(v) for v in size + rng.integers(-16, 17, size=2))
                image, mask = render_scene(rng, h, w)
                labelled = split != "unlabeled"
                writer.add(split, f"{split}-{i:05d}", _encode(image, png=i % 4 == 0),
                           encode_mask_png(mask) if labelled else None,
                           np.unique(mask).tolist() if labelled else [], h, w)
            log.info("synthetic: generated %d %s images", counts[split], split)
    return writer.info


def ensure_synthetic(uri: str | None = None) -> str:
    """Return the URI of the default synthetic dataset, generating it on first use.

    The default location is ``segray.storage.cache_dir() / "synthetic-v1"``. A local dataset is
    generated in a temporary sibling folder and renamed into place, so concurrent callers never
    see a half-written dataset (the first rename wins; the others discard their copy).

    Args:
        uri: where the dataset should live; the default cache location when None.

    Returns:
        The dataset folder's absolute URI.

    Raises:
        FileExistsError: ``uri`` exists, is not empty and holds no ``dataset.json``.
    """
    target = storage.absolute(uri or str(storage.cache_dir() / f"synthetic-v{VERSION}"))
    if storage.exists(manifest_uri(target)):
        return target
    if storage.is_s3(target):
        make_synthetic(target)  # the manifest, written last, is the commit point on S3
        return target
    dst = Path(target)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists but holds no dataset.json; remove it or pass "
                              "another location")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        log.info("generating the synthetic dataset at %s (first use)", dst)
        make_synthetic(str(tmp))
        try:
            os.rename(tmp, dst)
        except OSError:
            if not storage.exists(manifest_uri(target)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
