"""Shard format, manifest, writer guarantees, decoding and the random scale/crop."""

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
    random_scale_crop,
    resize_nearest,
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


def test_resize_nearest_hand_worked():
    m = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert resize_nearest(m, (4, 6)).tolist() == [
        [1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6], [4, 4, 5, 5, 6, 6]]
    assert resize_nearest(m, (1, 3)).tolist() == [[4, 5, 6]]  # centre row 1.0 -> row 1


def test_random_scale_crop_pads_small_images():
    image = np.full((3, 4, 3), 200, np.uint8)
    mask = np.array([[0, 1, 1, 2]] * 3, dtype=np.uint8)
    out_img, out_mask = random_scale_crop(image, mask, crop=(6, 8), scale_range=(2.0, 2.0),
                                          rng=np.random.default_rng(0))
    # Scaled 2x to 6x8 exactly: fills the crop, mask is the nearest upsampling.
    assert out_mask.tolist() == [[0, 0, 1, 1, 1, 1, 2, 2]] * 6
    out_img, out_mask = random_scale_crop(image, mask, crop=(5, 6), scale_range=(1.0, 1.0),
                                          rng=np.random.default_rng(0))
    assert out_img.shape == (5, 6, 3) and out_mask.shape == (5, 6)
    assert (out_img[:3, :4] == 200).all() and (out_img[3:] == 0).all() and (out_img[:, 4:] == 0).all()
    assert (out_mask[:3, :4] == mask).all()
    assert (out_mask[3:] == 255).all() and (out_mask[:, 4:] == 255).all()
    *_, valid = random_scale_crop(image, mask, crop=(5, 6), scale_range=(1.0, 1.0),
                                  rng=np.random.default_rng(0), with_valid=True)
    assert valid == (3, 4)  # the image part, top-left; the rest is padding
    _, unl = random_scale_crop(image, None, crop=(4, 4), rng=np.random.default_rng(0))
    assert unl.dtype == np.uint8 and (unl == 255).all()


def test_random_scale_crop_fixed_size_and_label_set():
    rng = np.random.default_rng(1)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(5, 60, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 3, 255], np.uint8), size=(h, w))
        out_img, out_mask = random_scale_crop(image, mask, crop=(32, 24), rng=rng)
        assert out_img.shape == (32, 24, 3) and out_img.dtype == np.uint8
        assert out_mask.shape == (32, 24) and out_mask.dtype == np.uint8
        assert set(np.unique(out_mask).tolist()) <= {0, 3, 255}
    with pytest.raises(ValueError, match="mask is 2x2 but image is 3x3"):
        random_scale_crop(np.zeros((3, 3, 3), np.uint8), np.zeros((2, 2), np.uint8), (2, 2))
    with pytest.raises(ValueError, match="scale_range"):
        random_scale_crop(np.zeros((3, 3, 3), np.uint8), None, (2, 2), scale_range=(2.0, 1.0))


def _cv2_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2 ``INTER_LINEAR`` (mmcv's image resize), written out: 2x2 taps at
    ``(dst + 0.5) * scale - 0.5``, coordinates clamped at the borders."""
    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        lo = np.floor(f).astype(int)
        frac = f - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        frac[lo >= n_in - 1], lo[lo >= n_in - 1] = 0.0, n_in - 1
        return lo, np.minimum(lo + 1, n_in - 1), frac

    (y0, y1, fy), (x0, x1, fx) = taps(size[0], image.shape[0]), taps(size[1], image.shape[1])
    src, fx = image.astype(np.float64), fx[None, :, None]
    top = src[y0][:, x0] * (1 - fx) + src[y0][:, x1] * fx
    bottom = src[y1][:, x0] * (1 - fx) + src[y1][:, x1] * fx
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def _whole_resize(image: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    if resample == "cv2":
        return _cv2_linear(image, size)
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)).astype(float)


@pytest.mark.parametrize(("resample", "tolerance"), [("cv2", 1.0), ("pillow", 2.0)])
def test_random_scale_crop_matches_whole_image_resize_then_crop(resample, tolerance):
    """Resampling only the window gives the pixels of MMSeg's resize-everything-then-crop: masks
    exactly; images within fixed-point rounding of the filter's whole-image resize, at ratios
    that shrink and enlarge (cv2: 2x2 taps written out in NumPy; Pillow: its own resize, whose
    sums depend on the region it is given).

    Many windows lie inside their image, so too narrow a margin around the window (taps clamped
    at its edge instead of the image's) or a window off by a pixel shows beyond rounding."""
    rng = np.random.default_rng(7)
    for i in range(150):
        h, w = (int(v) for v in rng.integers(8, 120, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 5, size=(h, w), dtype=np.uint8)
        crop = (int(rng.integers(4, 48)), int(rng.integers(4, 48)))
        out_img, out_mask = random_scale_crop(image, mask, crop, (0.4, 2.5), resample=resample,
                                              rng=np.random.default_rng(i))

        ref = np.random.default_rng(i)  # the same draws, the reference way
        factor = ref.uniform(0.4, 2.5)
        size = (max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5)))
        big, big_mask = _whole_resize(image, size, resample), resize_nearest(mask, size)
        y0 = int(ref.integers(0, max(size[0] - crop[0], 0) + 1))
        x0 = int(ref.integers(0, max(size[1] - crop[1], 0) + 1))
        want = big[y0:y0 + crop[0], x0:x0 + crop[1]]
        want_mask = big_mask[y0:y0 + crop[0], x0:x0 + crop[1]]
        ch, cw = want_mask.shape
        assert (out_mask[:ch, :cw] == want_mask).all(), (h, w, crop, factor)
        assert (out_mask[ch:] == 255).all() and (out_mask[:, cw:] == 255).all()
        diff = np.abs(out_img[:ch, :cw] - want)
        assert diff.max() <= tolerance + 1e-9, (h, w, crop, factor, diff.max())
        assert (out_img[ch:] == 0).all() and (out_img[:, cw:] == 0).all()


def test_random_scale_crop_filters_differ_only_when_shrinking():
    """The two filters agree within a grey level when enlarging; when shrinking, Pillow's
    antialiased filter smooths a fine pattern that cv2's 2x2 taps alias, so the two recipes
    really train on different pixels (and a swapped filter would show here)."""
    rng = np.random.default_rng(3)
    for i in range(20):
        h, w = (int(v) for v in rng.integers(8, 60, size=2))
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        crop = (2 * h + 3, 2 * w + 3)  # all of the rescaled image fits
        cv, _ = random_scale_crop(image, None, crop, (1.0, 2.0), np.random.default_rng(i))
        pil, _ = random_scale_crop(image, None, crop, (1.0, 2.0), np.random.default_rng(i),
                                   resample="pillow")
        assert np.abs(cv.astype(int) - pil.astype(int)).max() <= 1
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel columns: the finest detail there is
    cv, _ = random_scale_crop(stripes, None, (32, 32), (0.5, 0.5), np.random.default_rng(0))
    pil, _ = random_scale_crop(stripes, None, (32, 32), (0.5, 0.5), np.random.default_rng(0),
                               resample="pillow")
    inner = (slice(None), slice(1, -1))  # Pillow's filter is cut at the border columns
    assert np.abs(pil[inner].astype(int) - 127.5).max() <= 1  # averaged to grey
    assert np.abs(cv.astype(int) - 127.5).max() <= 1  # 2x: cv2's taps straddle both columns
    cv, _ = random_scale_crop(stripes, None, (24, 24), (0.375, 0.375), np.random.default_rng(0))
    pil, _ = random_scale_crop(stripes, None, (24, 24), (0.375, 0.375), np.random.default_rng(0),
                               resample="pillow")
    assert cv.std() > 3 * pil.std()  # cv2 aliases the stripes into a coarser pattern
    with pytest.raises(ValueError, match="resample must be one of"):
        random_scale_crop(stripes, None, (8, 8), resample="bicubic")


def test_random_scale_crop_resize_ignores_the_aspect():
    """``resize`` squashes every image to one size (mmseg keep_ratio=False), then the ratio
    scales that size: MaskSup's 224x224 recipe is ``resize=(224, 224)`` at ratio 1."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, size=(30, 52, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, size=(30, 52), dtype=np.uint8)
    out, out_mask = random_scale_crop(image, mask, (16, 16), (1.0, 1.0), rng, resize=(16, 16))
    assert np.abs(out - _cv2_linear(image, (16, 16))).max() <= 1 + 1e-9  # the default filter
    pil, _ = random_scale_crop(image, mask, (16, 16), (1.0, 1.0), np.random.default_rng(0),
                               resize=(16, 16), resample="pillow")
    want = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR)).astype(int)
    assert np.abs(pil.astype(int) - want).max() <= 1  # MaskSup's: torchvision on PIL images
    assert (out_mask == resize_nearest(mask, (16, 16))).all()  # all of it: no crop, no pad
    out, out_mask = random_scale_crop(image, mask, (20, 20), (0.5, 0.5), rng, resize=(16, 24))
    assert (out_mask[:8, :12] == resize_nearest(mask, (8, 12))).all()  # (16, 24) x 0.5, padded
    assert (out_mask[8:] == 255).all() and (out_mask[:, 12:] == 255).all()
    with pytest.raises(ValueError, match="resize and base_scale exclude each other"):
        random_scale_crop(image, mask, (8, 8), resize=(8, 8), base_scale=(64, 32))


@pytest.mark.parametrize("shape", [(288, 384), (522, 775), (480, 640), (100, 90)])
def test_mask_resample_as_opencv_resizes_labels(shape):
    """``cv2_nearest`` / ``cv2_area`` are OpenCV's INTER_NEAREST / INTER_AREA of the labels (MaskSup's
    loaders), whole or in a random window; the default takes pixel centres and differs."""
    import cv2
    import torch

    from methods.masksup.metrics import official_target_resize

    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    binary = ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 3) ** 2 < (shape[0] / 3) ** 2)
    binary = binary.astype(np.uint8)
    classes = rng.integers(0, 40, size=shape, dtype=np.uint8)
    size = (224, 224)
    _, nearest = random_scale_crop(image, classes, size, (1.0, 1.0), rng, resize=size,
                                   mask_resample="cv2_nearest")
    want = cv2.resize(classes, size[::-1], interpolation=cv2.INTER_NEAREST)
    assert (nearest == want).all()
    assert (nearest == official_target_resize(torch.from_numpy(classes), size,
                                              binary=False).numpy()).all()
    assert not (want == resize_nearest(classes, size)).all()  # the default differs
    _, area = random_scale_crop(image, binary, size, (1.0, 1.0), rng, resize=size,
                                mask_resample="cv2_area")
    assert (area == cv2.resize(binary, size[::-1], interpolation=cv2.INTER_AREA)).all()
    # A window of a rescale: the same pixels as resizing whole, then cropping (the window's
    # offset is found by search, not taken from the implementation).
    texture = ((xx // 3 + (yy // 5) * 7 + (xx * yy) % 11) % 3 == 0).astype(np.uint8)
    for mode, flag in (("cv2_area", cv2.INTER_AREA), ("cv2_nearest", cv2.INTER_NEAREST)):
        _, window, (vh, vw) = random_scale_crop(image, texture, (64, 64), (0.7, 0.7),
                                                np.random.default_rng(3), mask_resample=mode,
                                                with_valid=True)
        scaled = (int(shape[0] * 0.7 + 0.5), int(shape[1] * 0.7 + 0.5))
        whole = cv2.resize(texture, scaled[::-1], interpolation=flag)
        views = np.lib.stride_tricks.sliding_window_view(whole, (vh, vw))
        assert (views == window[:vh, :vw]).all(axis=(2, 3)).any(), mode
        assert (window[vh:] == 255).all() and (window[:, vw:] == 255).all()
    with pytest.raises(ValueError, match="needs a binary"):
        random_scale_crop(image, classes, (32, 32), (0.5, 0.5), rng, mask_resample="cv2_area")
    with pytest.raises(ValueError, match="mask_resample must be one of"):
        random_scale_crop(image, classes, (32, 32), mask_resample="area")


def test_cat_max_ratio_prefers_mixed_crops():
    image = np.zeros((100, 100, 3), np.uint8)
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50:] = 1

    def balanced(ratio: float) -> int:
        """How many of 30 seeded crops have no class above 75 % of the pixels."""
        count = 0
        for seed in range(30):
            _, m = random_scale_crop(image, mask, (20, 20), (1.0, 1.0),
                                     np.random.default_rng(seed), cat_max_ratio=ratio)
            count += np.bincount(m.ravel()).max() / m.size < 0.75
        return count

    # One window is balanced with probability 9/81; ten tries give 1 - (72/81)**10 = 0.69.
    assert balanced(1.0) <= 8 and balanced(0.75) >= 15


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
