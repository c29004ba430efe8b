"""Shard format, manifest, writer guarantees, decoding (random scale/crop: test_scale_crop.py)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segray.data.decode import (
    BadSampleError,
    decode_image,
    decode_mask,
    multi_hot,
    validate_sample,
)
from segray.data.manifest import DatasetError, default_palette, open_dataset, verify_shards
from segray.data.shards import DatasetWriter, decode_mask_png, encode_mask_png
from segray.data.stream import iter_rows

CLASSES = ["bg", "cat", "dog"]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _row(i: int, h: int = 10, w: int = 12) -> tuple[bytes, bytes, list[int]]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = 1 + i % 2
    mask[-1, -1] = 255
    return _png(image), encode_mask_png(mask), [0, 1 + i % 2]


def _write(dst: Path, n_train: int = 7, n_val: int = 2, **kw) -> None:
    with DatasetWriter(str(dst), "toy", CLASSES, provenance={"converter": "test"},
                       rows_per_shard=3, **kw) as w:
        for i in range(n_train):
            w.add("train", f"t{i}", *_row(i), 10, 12)
        for i in range(n_val):
            img, _, _ = _row(100 + i)
            w.add("val", f"v{i}", img, None, [], 10, 12)


def test_manifest_roundtrip_and_schema(tmp_path):
    _write(tmp_path / "ds")
    info = open_dataset(str(tmp_path / "ds"))
    assert info.name == "toy" and info.classes == CLASSES and info.num_classes == 3
    assert info.palette == default_palette(3) and info.ignore_index == 255
    assert info.provenance == {"converter": "test"}
    assert info.split_names == ["train", "val"] and info.has_split("val")
    assert info.num_rows("train") == 7 and [s.rows for s in info.splits["train"]] == [3, 3, 1]
    assert [Path(u).name for u in info.shard_uris("train")] == [
        "train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    # The manifest is self-describing: its JSON reproduces the same dataset.
    text = (tmp_path / "ds" / "dataset.json").read_text()
    assert json.loads(text) == json.loads(info.to_json())
    assert json.loads(text)["format"] == "segray-dataset/1"
    assert open_dataset(str(tmp_path / "ds" / "dataset.json")).splits == info.splits

    schema = pq.read_schema(info.shard_uris("train")[0])
    assert schema.names == ["key", "image", "mask", "labels", "height", "width"]
    assert [str(schema.field(c).type) for c in ("key", "image", "mask", "height", "width")] == [
        "string", "binary", "binary", "int32", "int32"]
    assert schema.field("labels").type.value_type == pa.int32()
    rows = list(iter_rows(info, "train"))
    assert [r["key"] for r in rows] == [f"t{i}" for i in range(7)]
    for i, r in enumerate(rows):
        img, mask_png, labels = _row(i)
        assert r["image"] == img  # stored byte for byte, never re-encoded
        assert (decode_mask_png(r["mask"]) == decode_mask_png(mask_png)).all()
        assert r["labels"] == labels and (r["height"], r["width"]) == (10, 12)
    val = list(iter_rows(info, "val"))
    assert [r["mask"] for r in val] == [None, None] and val[0]["labels"] == []
    with pytest.raises(KeyError, match="no split 'test'.*train, val"):
        info.shard_uris("test")
    assert verify_shards(info) == 4


def test_row_groups_are_small(tmp_path):
    with DatasetWriter(str(tmp_path), "toy", CLASSES, rows_per_shard=80) as w:
        for i in range(70):
            w.add("train", f"k{i}", *_row(i, 4, 4), 4, 4)
    meta = pq.ParquetFile(tmp_path / "train-00000.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [32, 32, 6]
    # Encoded image/mask bytes are stored as they are (already compressed); the rest is snappy.
    group = meta.row_group(0)
    codecs = {group.column(c).path_in_schema: group.column(c).compression
              for c in range(group.num_columns)}
    assert codecs["image"] == codecs["mask"] == "UNCOMPRESSED"
    assert codecs["key"] == "SNAPPY"


def test_checksum_mismatch_names_shard(tmp_path):
    _write(tmp_path)
    info = open_dataset(str(tmp_path))
    shard = tmp_path / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_shards(info, "val") == 1  # other splits are untouched
    with pytest.raises(DatasetError, match=r"train-00001\.parquet.*sha256"):
        verify_shards(info)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset\.json.*prepare_data\.py"):
        open_dataset(str(tmp_path / "nothing"))
    _write(tmp_path / "ds")
    manifest = tmp_path / "ds" / "dataset.json"
    good = json.loads(manifest.read_text())
    for key, value, pattern in [
        ("palette", [[0, 0, 0]], "'palette'"),
        ("format", "other/2", "'format'"),
        ("classes", [], "'classes'"),
        ("ignore_index", 1, "'ignore_index'"),
        ("splits", {"train": [{"path": "../x.parquet", "rows": 1, "sha256": "0" * 64,
                               "bytes": 1}]}, r"'splits\.train\[0\]\.path'"),
    ]:
        manifest.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=pattern):
            open_dataset(str(tmp_path / "ds"))
    manifest.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_dataset(str(tmp_path / "ds"))


def test_writer_rejects_bad_rows(tmp_path):
    with DatasetWriter(str(tmp_path), "toy", CLASSES, splits=["train"]) as w:
        w.add("train", "a", *_row(0), 10, 12)
        with pytest.raises(ValueError, match="duplicate key 'a'"):
            w.add("train", "a", *_row(1), 10, 12)
        with pytest.raises(ValueError, match=r"labels \[3\] of 'b'.*0\.\.2"):
            w.add("train", "b", _row(0)[0], None, [1, 3], 10, 12)
        with pytest.raises(ValueError, match="split 'val' was not declared"):
            w.add("val", "c", *_row(0), 10, 12)
        with pytest.raises(ValueError, match="split name 'tr ain'"):
            w.add("tr ain", "d", *_row(0), 10, 12)
    assert open_dataset(str(tmp_path)).num_rows("train") == 1
    with pytest.raises(ValueError, match="split.*val.*received no rows"):
        DatasetWriter(str(tmp_path / "e"), "toy", CLASSES, splits=["train", "val"]).close()
    with pytest.raises(ValueError, match="no rows were added"):
        DatasetWriter(str(tmp_path / "f"), "toy", CLASSES).close()
    with pytest.raises(ValueError, match="'palette'"):
        DatasetWriter(str(tmp_path / "g"), "toy", CLASSES, palette=[[0, 0, 0]])


def test_writer_keeps_one_schema_per_split(tmp_path):
    """Extra columns are checked against the split's first row, not only the shard being
    filled: after a shard is written, the next may not bring other columns."""
    with DatasetWriter(str(tmp_path), "toy", CLASSES, rows_per_shard=2) as w:
        w.add("train", "t0", *_row(0), 10, 12, extra={"source": "a", "site": 1})
        w.add("train", "t1", *_row(1), 10, 12, extra={"site": 2, "source": "b"})  # shard 0 full
        with pytest.raises(ValueError, match=r"extra columns of 't2' in split 'train' are "
                                             r"\['site'\], but its earlier rows have \['site', "
                                             r"'source'\]; every row of a split must give"):
            w.add("train", "t2", *_row(2), 10, 12, extra={"site": 3})
        with pytest.raises(ValueError, match=r"'t2' in split 'train' are \(none\), but"):
            w.add("train", "t2", *_row(2), 10, 12)
        w.add("train", "t2", *_row(2), 10, 12, extra={"site": 3, "source": "c"})
        w.add("val", "v0", *_row(3), 10, 12)  # another split, its own columns
    shards = [pq.read_schema(tmp_path / f"train-{i:05d}.parquet") for i in range(2)]
    assert shards[0].equals(shards[1]) and shards[0].names[-2:] == ["source", "site"]


def test_interrupted_writer_leaves_no_manifest_and_rerun_overwrites(tmp_path):
    _write(tmp_path, n_train=7)  # a complete earlier dataset with three train shards
    assert (tmp_path / "dataset.json").exists()
    with pytest.raises(RuntimeError, match="interrupted"), \
            DatasetWriter(str(tmp_path), "toy", CLASSES, rows_per_shard=2) as w:
        for i in range(5):
            w.add("train", f"n{i}", *_row(i), 10, 12)
        raise RuntimeError("interrupted")
    # Shards were written, but no manifest: the dataset cannot be opened half-made.
    assert (tmp_path / "train-00000.parquet").exists()
    assert not (tmp_path / "dataset.json").exists()
    with pytest.raises(FileNotFoundError):
        open_dataset(str(tmp_path))
    _write(tmp_path, n_train=2, n_val=1)  # the re-run: fewer shards than before
    info = open_dataset(str(tmp_path))
    assert info.num_rows("train") == 2 and verify_shards(info) == 2
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "train-00000.parquet", "val-00000.parquet"]  # stale shards of the old run are gone
    assert not list(tmp_path.glob(".*tmp"))


def test_mask_png_roundtrip_and_modes():
    m8 = np.array([[0, 1, 2], [255, 4, 0]], dtype=np.uint8)
    assert (decode_mask_png(encode_mask_png(m8)) == m8).all()
    assert decode_mask_png(encode_mask_png(m8)).dtype == np.uint8
    m16 = np.array([[0, 300], [1000, 65535]], dtype=np.int64)
    out = decode_mask_png(encode_mask_png(m16))
    assert out.dtype == np.uint16 and out.tolist() == m16.tolist()
    # A palette PNG holds indices; decoding must return them, not the palette colours.
    p = Image.fromarray(m8, mode="L").convert("P")
    p.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    p.save(buf, format="PNG")
    assert (decode_mask(buf.getvalue()) == m8).all()
    with pytest.raises(ValueError, match="mode 'RGB'"):
        decode_mask(_png(np.zeros((2, 2, 3), np.uint8)))
    with pytest.raises(ValueError, match="2-D"):
        encode_mask_png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="0..65535"):
        encode_mask_png(np.array([[-1, 0]]))


def test_decode_image_formats():
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert (decode_image(_png(rgb)) == rgb).all()
    grey = Image.fromarray(np.full((4, 5), 7, np.uint8))
    buf = io.BytesIO()
    grey.save(buf, format="JPEG")
    out = decode_image(buf.getvalue())
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and abs(int(out[0, 0, 0]) - 7) <= 2
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(b"not an image at all")
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(_png(rgb)[:40])  # truncated


def test_validate_sample_and_bad_sample_error():
    img, mask_png, _ = _row(0)
    image, mask = validate_sample(img, mask_png, num_classes=3, shard="s.parquet", key="k",
                                  height=10, width=12, labels=[0, 1])
    assert image.shape == (10, 12, 3) and mask.shape == (10, 12) and mask[-1, -1] == 255
    cases = [
        (b"garbage", mask_png, {}, "image: cannot decode"),
        (img, encode_mask_png(np.zeros((9, 12), np.uint8)), {}, "mask is 9x12 but image is 10x12"),
        (img, encode_mask_png(np.full((10, 12), 7, np.uint8)), {}, r"label values \[7\] outside"),
        (img, None, {"height": 11, "width": 12}, "decodes to 10x12 but the row records 11x12"),
        (img, None, {"labels": [5]}, r"image-level labels \[5\]"),
    ]
    for image_bytes, mask_bytes, extra, pattern in cases:
        with pytest.raises(BadSampleError, match=pattern) as e:
            validate_sample(image_bytes, mask_bytes, num_classes=3, shard="s.parquet", key="k",
                            **extra)
        assert "'k'" in str(e.value) and "s.parquet" in str(e.value)
    err = pickle.loads(pickle.dumps(BadSampleError("a.parquet", "key1", "why")))
    assert (err.shard, err.key, err.reason) == ("a.parquet", "key1", "why")
    assert isinstance(err, ValueError)


def test_multi_hot():
    assert multi_hot([0, 2], 4).tolist() == [1, 0, 1, 0]
    assert multi_hot([], 3).tolist() == [0, 0, 0] and multi_hot(None, 2).dtype == np.uint8
