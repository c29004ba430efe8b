"""Writing datasets: Parquet shards with one row per image, then the manifest.

Shard schema (extra columns are allowed after these):

======== ================ ====================================================================
column   type             meaning
======== ================ ====================================================================
key      string           unique id of the image across the whole dataset
image    binary           the original encoded bytes (JPEG/PNG/...), never re-encoded
mask     binary, nullable PNG of the class-id map (uint8, or uint16 past 255 values); null when
                          unlabelled; value ``ignore_index`` (255) is never supervised
labels   list<int32>      image-level class ids present in the image
height   int32            image height in pixels
width    int32            image width in pixels
======== ================ ====================================================================

Shards roll every ``rows_per_shard`` rows and hold small row groups, so Ray Data streams them
without loading whole files. Each shard is written atomically; ``dataset.json`` is written last and
only when the writer closes without error, so an interrupted conversion leaves no manifest and a
re-run overwrites it cleanly.

Example:
    >>> with DatasetWriter("/tmp/ds", "toy", ["bg", "fg"]) as w:        # doctest: +SKIP
    ...     w.add("train", "img0", png_bytes, encode_mask_png(mask), [0, 1], 64, 64)
    >>> w.info.num_rows("train")                                        # doctest: +SKIP
    1
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segray import storage
from segray.data import maskpng
from segray.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    DatasetInfo,
    ShardInfo,
    default_palette,
    manifest_uri,
)

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("mask", pa.binary(), nullable=True),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
])
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-\d{5}\.parquet$")


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode a 2-D class-id map losslessly as PNG.

    Values up to 255 are stored as an 8-bit greyscale PNG, larger ones as 16-bit; rows are left
    unfiltered, which makes label maps smaller and lets :func:`decode_mask_png` skip Pillow
    (:mod:`segray.data.maskpng`).

    Args:
        mask: integer array (H, W) of class ids (and the ignore value).

    Returns:
        PNG bytes.

    Raises:
        ValueError: not 2-D, not integer, or values outside 0..65535.

    Example:
        >>> m = np.array([[0, 1], [255, 2]], dtype=np.uint8)
        >>> (decode_mask_png(encode_mask_png(m)) == m).all()
        True
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"a mask must be a non-empty 2-D (H, W) array, got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a mask must hold integer class ids, got dtype {mask.dtype}")
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0 or hi > 65535:
        raise ValueError(f"mask values must lie in 0..65535, got {lo}..{hi}")
    return maskpng.encode(mask.astype(np.uint8 if hi <= 255 else np.uint16))


def decode_mask_png(data: bytes) -> np.ndarray:
    """Decode a class-id PNG to a 2-D uint8 (or uint16) array.

    Palette (``P``) PNGs are read as their indices, not their colours. Masks written by
    :func:`encode_mask_png` are read without Pillow; any other image goes through it.

    Raises:
        ValueError: the bytes are not an image, or a colour image (class ids need one channel).
    """
    try:
        fast = maskpng.decode_unfiltered(data)
    except ValueError as e:
        raise ValueError(f"cannot decode mask bytes ({e})") from e
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot decode mask bytes ({e})") from e
    if mode in ("L", "P"):
        return arr.astype(np.uint8, copy=False)
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise ValueError(f"mask PNG of mode {mode} holds values outside 0..65535")
        return arr.astype(np.uint16)
    raise ValueError(
        f"mask PNG has mode {mode!r}; class-id masks must be single-channel "
        "(mode L, P or 16-bit greyscale) with one class index per pixel"
    )


# Image and mask bytes are already compressed (JPEG/PNG): snappy on them saved nothing and cost
# 0.2 ms a row to read back (measured on 512x512 JPEG shards); the small columns keep it. Nor
# do they get a dictionary: hashing every blob to find repeats costs writing and reading time,
# and distinct images never repeat.
_COMPRESSION = {"image": "none", "mask": "none"}


class DatasetWriter:
    """Write a dataset's shards and, on success, its manifest.

    Use it as a context manager: the manifest is written on a clean exit only.

    Args:
        dst_uri: dataset folder (local path or ``s3://`` URI).
        name: dataset name.
        classes: class names in id order.
        palette: one ``[r, g, b]`` per class; a default palette when None.
        ignore_index: mask value that is never supervised.
        provenance: how the data was made; stored verbatim in the manifest.
        rows_per_shard: rows per Parquet file.
        row_group_size: rows per Parquet row group (the unit Ray Data streams).
        splits: if given, the only split names allowed, and each must receive rows.
        overwrite: if False, refuse to write where a manifest already exists.

    Raises:
        FileExistsError: ``overwrite=False`` and a dataset already exists at ``dst_uri``.
        ValueError: bad classes, palette or ignore index.
    """

    def __init__(
        self,
        dst_uri: str,
        name: str,
        classes: Sequence[str],
        palette: Sequence[Sequence[int]] | None = None,
        ignore_index: int = 255,
        provenance: Mapping[str, Any] | None = None,
        *,
        rows_per_shard: int = 256,
        row_group_size: int = 32,
        splits: Sequence[str] | None = None,
        overwrite: bool = True,
    ) -> None:
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError(f"rows_per_shard and row_group_size must be >= 1, got "
                             f"{rows_per_shard} and {row_group_size}")
        palette = [list(map(int, c)) for c in (palette or default_palette(len(classes)))]
        self.uri = storage.absolute(dst_uri)
        # Validates classes/palette/ignore the same way readers will, before any file is written.
        self.info = DatasetInfo.from_dict(
            {"format": FORMAT, "name": name, "classes": list(classes),
             "palette": palette, "ignore_index": ignore_index,
             "splits": {}, "provenance": dict(provenance or {})},
            self.uri, source=f"dataset being written to {self.uri}", allow_no_splits=True)
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self._declared = list(splits) if splits is not None else None
        for split in self._declared or []:
            self._check_split_name(split)
        self._buffers: dict[str, list[dict[str, Any]]] = {}
        self._extra: dict[str, tuple[str, ...]] = {}  # split -> extra columns, from its first row
        self._keys: set[str] = set()
        self._written: set[str] = set()
        self._closed = False
        if storage.exists(manifest_uri(self.uri)):
            if not overwrite:
                raise FileExistsError(f"a dataset already exists at {self.uri}; pass "
                                      "overwrite=True (or pick another destination)")
            # Removed first so that an interrupted re-run cannot leave the old manifest pointing
            # at shards that have been partly replaced.
            storage.delete(manifest_uri(self.uri))
        storage.makedirs(self.uri)

    def _check_split_name(self, split: str) -> None:
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise ValueError(f"split name {split!r} must be letters, digits or '_' "
                             "(e.g. train, val, unlabeled)")

    def add(
        self,
        split: str,
        key: str,
        image_bytes: bytes,
        mask_png_bytes: bytes | None,
        labels: Sequence[int],
        height: int,
        width: int,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one image to ``split``.

        Args:
            split: split name, e.g. ``train``.
            key: id unique across the whole dataset.
            image_bytes: the encoded image, stored as is.
            mask_png_bytes: class-id PNG (see :func:`encode_mask_png`), or None if unlabelled.
            labels: image-level class ids.
            height: image height in pixels.
            width: image width in pixels.
            extra: additional columns; every row of a split must give the same names (so
                every shard of the split has one schema).

        Raises:
            ValueError: duplicate key, unknown split, label out of range, bad sizes, extra
                columns other than the split's first row gave or clashing with the schema.
        """
        if self._closed:
            raise ValueError(f"DatasetWriter for {self.uri} is closed; open a new one")
        self._check_split_name(split)
        if self._declared is not None and split not in self._declared:
            raise ValueError(f"split {split!r} was not declared; declared splits: "
                             f"{', '.join(self._declared)}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in dataset {self.info.name!r}; "
                             "keys must be unique across all splits")
        if not isinstance(image_bytes, bytes | bytearray | memoryview) or not len(image_bytes):
            raise ValueError(f"image bytes of {key!r} must be non-empty bytes")
        if mask_png_bytes is not None and not isinstance(mask_png_bytes, bytes | bytearray):
            raise ValueError(f"mask of {key!r} must be PNG bytes or None, "
                             f"got {type(mask_png_bytes).__name__}")
        labels = [int(v) for v in labels]
        k = self.info.num_classes
        out = [v for v in labels if not 0 <= v < k]
        if out:
            raise ValueError(f"labels {out} of {key!r} are outside the class ids 0..{k - 1}")
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"height and width of {key!r} must be >= 1, got {height}x{width}")
        row = {"key": key, "image": bytes(image_bytes),
               "mask": None if mask_png_bytes is None else bytes(mask_png_bytes),
               "labels": sorted(set(labels)), "height": int(height), "width": int(width)}
        extra = dict(extra or {})
        clash = set(extra) & set(row)
        if clash:
            raise ValueError(f"extra columns {sorted(clash)} of {key!r} clash with the schema")
        # Against the split's first row, not the current shard's: shards are written as they
        # fill, and each must have the schema of the others.
        expected = self._extra.get(split, tuple(extra))
        if set(extra) != set(expected):
            raise ValueError(f"extra columns of {key!r} in split {split!r} are "
                             f"{sorted(extra) or '(none)'}, but its earlier rows have "
                             f"{sorted(expected) or '(none)'}; every row of a split must give "
                             "the same extra columns")
        self._extra[split] = expected
        row.update(extra)
        self._keys.add(key)
        buf = self._buffers.setdefault(split, [])
        buf.append(row)
        if len(buf) >= self.rows_per_shard:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._buffers.get(split) or []
        if not rows:
            return
        columns = {c: [r[c] for r in rows] for c in SCHEMA.names}
        table = pa.table(columns, schema=SCHEMA)
        for c in self._extra[split]:  # in one order in every shard of the split
            table = table.append_column(c, pa.array([r[c] for r in rows]))
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=self.row_group_size,
                       compression={c: _COMPRESSION.get(c, "snappy") for c in table.column_names},
                       use_dictionary=[c for c in table.column_names if c not in _COMPRESSION])
        data = sink.getvalue()
        shards = self.info.splits.setdefault(split, [])
        path = f"{split}-{len(shards):05d}.parquet"
        storage.write_bytes(storage.join(self.uri, path), data)
        shards.append(ShardInfo(path, len(rows), storage.sha256(data), len(data)))
        self._written.add(path)
        self._buffers[split] = []
        log.info("wrote %s (%d rows, %.1f MiB)", storage.join(self.uri, path), len(rows),
                 len(data) / 2**20)

    def close(self) -> DatasetInfo:
        """Flush the remaining rows, write ``dataset.json`` and return the dataset.

        Raises:
            ValueError: no rows at all, or a declared split received none.
        """
        if self._closed:
            return self.info
        for split in list(self._buffers):
            self._flush(split)
        empty = [s for s in self._declared or [] if s not in self.info.splits]
        if empty:
            raise ValueError(f"split(s) {', '.join(empty)} of dataset {self.info.name!r} received "
                             "no rows; every split needs at least one image")
        if not self.info.splits:
            raise ValueError(f"no rows were added to dataset {self.info.name!r} at {self.uri}")
        if self._declared is not None:
            self.info.splits = {s: self.info.splits[s] for s in self._declared}
        storage.write_text(manifest_uri(self.uri), self.info.to_json())
        self._closed = True
        self._remove_stale_shards()
        return self.info

    def _remove_stale_shards(self) -> None:
        # Shards of an earlier, larger run at the same place would otherwise linger; only files
        # following our own naming scheme are touched.
        for name in storage.list_dir(self.uri):
            if _SHARD_RE.match(name) and name not in self._written and name != MANIFEST_NAME:
                storage.delete(storage.join(self.uri, name))

    def abort(self) -> None:
        """Stop without writing a manifest; written shards stay until a re-run replaces them."""
        self._closed = True
        self._buffers.clear()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
