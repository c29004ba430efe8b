"""Helpers of the converter tests: tiny source trees and checks of the converted rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from segray.data.manifest import open_dataset
from segray.data.shards import decode_mask_png

RNG = np.random.default_rng(0)


def write_image(path: Path, h: int = 6, w: int = 8, fmt: str | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path.read_bytes()


def write_mask(path: Path, arr: np.ndarray, palette: list[list[int]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr, dtype=np.uint8)
    if palette is None:
        Image.fromarray(arr).save(path)
        return
    img = Image.fromarray(arr).convert("P")  # a paletted PNG whose indices are the class ids
    img.putdata(arr.ravel().tolist())
    img.putpalette([v for c in palette for v in c] + [224, 224, 192] * (256 - len(palette)))
    img.save(path)
    assert Image.open(path).mode == "P"


def read_rows(dst: Path, split: str) -> dict[str, dict]:
    info = open_dataset(str(dst))
    out = {}
    for uri in info.shard_uris(split):
        for row in pq.read_table(uri).to_pylist():
            out[row["key"]] = row
    assert len(out) == info.num_rows(split)
    return out


def mask_of(row: dict) -> np.ndarray:
    return decode_mask_png(row["mask"])


def labels_of(expected: np.ndarray) -> list[int]:
    return sorted(int(v) for v in np.unique(expected) if v != 255)


def check_row(row: dict, image_file: Path, expected: np.ndarray | None) -> None:
    assert row["image"] == image_file.read_bytes()  # never re-encoded
    if expected is None:
        assert row["mask"] is None and row["labels"] == []
        return
    got = mask_of(row)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    assert row["labels"] == labels_of(expected)
    assert (row["height"], row["width"]) == expected.shape
