"""Convert a plain folder of images and class-index masks into a segray dataset.

Expected layout (local path or ``s3://`` prefix)::

    src/
      images/   <stem>.jpg|.jpeg|.png|.bmp|.webp|.tif|.tiff
      masks/    <stem>.png    class index per pixel: mode L, P (read as indices) or 16-bit
      classes.txt             optional, one class name per line, in id order

Images and masks pair by file stem. Without ``classes.txt`` the classes are ``class_0 ..
class_{M}`` where M is the largest label found. Pixels equal to ``ignore_index`` are ignored.
Images are stored as their original bytes; masks are re-encoded losslessly as canonical PNGs.
Every file is checked before any shard is written, and all problems are reported at once.

Splits come from ``val_fraction`` (a seeded random share goes to ``val``) or from a split file:
text lines ``<stem> <split>`` or JSON ``{"<split>": [stems...]}``. A split file may put images
without a mask into a split named ``unlabeled``.

Example:
    >>> info = convert_folder("/data/my_seg", "/data/my_seg_shards", val_fraction=0.2)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from segray import storage
from segray.data.decode import decode_image
from segray.data.manifest import DatasetInfo, default_palette
from segray.data.shards import DatasetWriter, decode_mask_png, encode_mask_png

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
UNLABELED = "unlabeled"
_MAX_LISTED = 20


def _by_stem(uri: str, extensions: tuple[str, ...], problems: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    ignored = []
    for name in storage.list_dir(uri):
        p = PurePosixPath(name)
        if p.suffix.lower() not in extensions or name.startswith("."):
            ignored.append(name)
            continue
        if p.stem in out:
            problems.append(f"{storage.join(uri, name)}: stem {p.stem!r} is used by two files "
                            f"({out[p.stem].rsplit('/', 1)[-1]} and {name}); rename one")
            continue
        out[p.stem] = storage.join(uri, name)
    if ignored:
        log.warning("ignoring %d file(s) in %s that are not %s: %s", len(ignored), uri,
                    "/".join(extensions), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    return out


def read_split_file(uri: str) -> dict[str, str]:
    """Read a split file into ``{stem: split}``.

    Args:
        uri: text file of ``<stem> <split>`` lines (``#`` comments allowed) or JSON
            ``{"<split>": [stems...]}``.

    Raises:
        ValueError: malformed line or JSON, or a stem listed twice (names the line / stem).
    """
    text = storage.read_text(uri)
    pairs: list[tuple[str, str, str]] = []
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"split file {uri} is not valid JSON ({e})") from e
        if not isinstance(obj, dict) or not all(
                isinstance(v, list) and all(isinstance(s, str) for s in v) for v in obj.values()):
            raise ValueError(f'split file {uri} must map split names to lists of stems, e.g. '
                             '{"train": ["img1"], "val": ["img2"]}')
        pairs = [(stem, split, f"split {split!r}") for split, stems in obj.items() for stem in stems]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{uri} line {n}: expected '<stem> <split>', got {line!r}")
            pairs.append((parts[0], parts[1], f"line {n}"))
    out: dict[str, str] = {}
    for stem, split, where in pairs:
        if stem in out:
            raise ValueError(f"{uri} ({where}): stem {stem!r} is listed twice")
        out[stem] = split
    return out


def _random_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = int(round(len(stems) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(stems) > 1:
        n_val = 1  # a requested validation split should never silently come out empty
    val = {stems[i] for i in order[:n_val]}
    return {s: "val" if s in val else "train" for s in stems}


def _check_pair(image_uri: str, mask_uri: str | None, ignore_index: int,
                problems: list[str]) -> tuple[int, int, bytes | None, list[int], Image.Image | None]:
    """Decode one pair; returns (h, w, canonical mask PNG, label ids, P-mode mask image)."""
    try:
        h, w = decode_image(storage.read_bytes(image_uri)).shape[:2]
    except ValueError as e:
        problems.append(f"{image_uri}: unreadable image ({e})")
        return 0, 0, None, [], None
    if mask_uri is None:
        return h, w, None, [], None
    raw = storage.read_bytes(mask_uri)
    try:
        mask = decode_mask_png(raw)
    except ValueError as e:
        problems.append(f"{mask_uri}: {e}")
        return h, w, None, [], None
    if mask.shape != (h, w):
        problems.append(f"{mask_uri}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                        f"{image_uri.rsplit('/', 1)[-1]} is {w}x{h}")
        return h, w, None, [], None
    values = np.unique(mask)
    labels = [int(v) for v in values if v != ignore_index]
    with Image.open(io.BytesIO(raw)) as img:
        paletted = img.copy() if img.mode == "P" else None
    return h, w, encode_mask_png(mask), labels, paletted


def convert_folder(
    src: str,
    dst: str,
    *,
    val_fraction: float = 0.1,
    split_file: str | None = None,
    seed: int = 0,
    ignore_index: int = 255,
    name: str | None = None,
    rows_per_shard: int = 256,
) -> DatasetInfo:
    """Convert ``src`` (images/ + masks/ [+ classes.txt]) into a dataset at ``dst``.

    Args:
        src: source folder (local path or ``s3://``).
        dst: destination dataset folder.
        val_fraction: share of images put in ``val`` (ignored when ``split_file`` is given).
        split_file: explicit split assignment (see the module docstring).
        seed: seed of the random train/val split.
        ignore_index: mask value meaning "not labelled".
        name: dataset name; the source folder's name by default.
        rows_per_shard: rows per Parquet shard.

    Returns:
        The written dataset.

    Raises:
        FileNotFoundError: ``src`` has no ``images/`` folder.
        ValueError: listing every problem found, each naming its file: image without mask,
            mask without image, mask size != image size, label outside ``classes.txt``,
            unreadable image or mask, bad split file.
    """
    src = storage.absolute(src).rstrip("/")
    images_uri, masks_uri = storage.join(src, "images"), storage.join(src, "masks")
    if not storage.is_dir(images_uri):
        raise FileNotFoundError(f"{images_uri} not found; expected {src}/images/ and "
                                f"{src}/masks/ (see segray.data.folder)")
    problems: list[str] = []
    images = _by_stem(images_uri, IMAGE_EXTENSIONS, problems)
    masks = _by_stem(masks_uri, (".png",), problems)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_uri}")

    classes_uri = storage.join(src, "classes.txt")
    classes = None
    if storage.exists(classes_uri):
        classes = [c.strip() for c in storage.read_text(classes_uri).splitlines() if c.strip()]
        if not classes:
            raise ValueError(f"{classes_uri} is empty; list one class name per line")

    assignment = (read_split_file(split_file) if split_file
                  else _random_split(sorted(images), val_fraction, seed))
    for stem in sorted(set(assignment) - set(images)):
        problems.append(f"{split_file}: stem {stem!r} has no image in {images_uri}")
    for stem in sorted(set(images) - set(assignment)):
        problems.append(f"{images[stem]}: not listed in split file {split_file}")
    for stem in sorted(set(masks) - set(images)):
        problems.append(f"{masks[stem]}: mask without an image (no {stem}.* in {images_uri})")
    for stem in sorted(images):
        if stem not in masks and assignment.get(stem) != UNLABELED:
            problems.append(f"{images[stem]}: image without a mask (expected {masks_uri}/{stem}.png"
                            f"{'' if split_file else ', or list it as unlabeled in a split file'})")

    records: dict[str, tuple[int, int, bytes | None, list[int]]] = {}
    palette_source: Image.Image | None = None
    for i, stem in enumerate(sorted(s for s in images if s in assignment)):
        mask_uri = masks.get(stem) if assignment[stem] != UNLABELED else None
        h, w, mask_png, labels, paletted = _check_pair(images[stem], mask_uri, ignore_index,
                                                       problems)
        records[stem] = (h, w, mask_png, labels)
        palette_source = palette_source or paletted
        if classes is not None and labels and max(labels) >= len(classes):
            problems.append(f"{mask_uri}: label values {[v for v in labels if v >= len(classes)]} "
                            f"are outside the {len(classes)} classes of {classes_uri} "
                            f"(valid: 0..{len(classes) - 1} and ignore {ignore_index})")
        if (i + 1) % 500 == 0:
            log.info("checked %d / %d images", i + 1, len(images))
    if problems:
        shown = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"{len(problems)} problem(s) in {src}:\n  {shown}{more}")

    if classes is None:
        top = max((max(r[3]) for r in records.values() if r[3]), default=0)
        classes = [f"class_{i}" for i in range(top + 1)]
    palette = default_palette(len(classes))
    if palette_source is not None:  # P-mode masks carry the colours their authors chose
        flat = palette_source.getpalette() or []
        for c in range(min(len(flat) // 3, len(classes))):
            palette[c] = [int(v) for v in flat[3 * c:3 * c + 3]]
    split_order = sorted(set(assignment.values()), key=lambda s: (s != "train", s != "val", s))
    provenance = {"converter": "folder", "source": src, "seed": seed,
                  "val_fraction": None if split_file else val_fraction, "split_file": split_file}
    with DatasetWriter(dst, name or PurePosixPath(src).name, classes, palette, ignore_index,
                       provenance, rows_per_shard=rows_per_shard, splits=split_order) as writer:
        for split in split_order:
            stems = sorted(s for s, sp in assignment.items() if sp == split)
            for stem in stems:
                h, w, mask_png, labels = records[stem]
                writer.add(split, stem, storage.read_bytes(images[stem]), mask_png, labels, h, w)
            log.info("folder: %s split done (%d images)", split, len(stems))
    return writer.info
