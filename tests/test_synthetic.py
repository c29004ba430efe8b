"""The built-in synthetic dataset: determinism, exact masks, labels, sizes, cache location."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from segray.data.decode import decode_image, decode_mask
from segray.data.manifest import open_dataset, verify_shards
from segray.data.stream import iter_rows
from segray.data.synthetic import CLASSES, PALETTE, ensure_synthetic, make_synthetic, render_scene


def _small(dst, seed=0):
    return make_synthetic(str(dst), train=12, val=4, unlabeled=5, size=40, seed=seed,
                          rows_per_shard=5)


def test_deterministic_given_seed(tmp_path):
    a, b, c = _small(tmp_path / "a"), _small(tmp_path / "b"), _small(tmp_path / "c", seed=1)
    assert a.splits == b.splits  # same shard names, rows, sizes and checksums: byte-identical
    assert [s.sha256 for s in a.splits["train"]] != [s.sha256 for s in c.splits["train"]]
    assert verify_shards(a) == 3 + 1 + 1  # 12 train rows in shards of 5, 4 val, 5 unlabelled


def test_manifest_and_splits(tmp_path):
    info = _small(tmp_path)
    assert info.classes == CLASSES and info.palette == PALETTE and info.ignore_index == 255
    assert {k: info.num_rows(k) for k in info.split_names} == {"train": 12, "val": 4,
                                                               "unlabeled": 5}
    assert info.provenance["converter"] == "synthetic" and info.provenance["seed"] == 0
    assert open_dataset(str(tmp_path)).splits == info.splits
    no_unl = make_synthetic(str(tmp_path / "x"), train=2, val=0, unlabeled=0)
    assert no_unl.split_names == ["train"]
    with pytest.raises(ValueError, match="train >= 1"):
        make_synthetic(str(tmp_path / "y"), train=0)


def test_masks_exact_and_consistent_with_labels(tmp_path):
    info = _small(tmp_path)
    sizes = {}
    for split in ("train", "val"):
        for row in iter_rows(info, split):
            image, mask = decode_image(row["image"]), decode_mask(row["mask"])
            assert image.shape == (row["height"], row["width"], 3)
            assert mask.shape == (row["height"], row["width"]) and mask.dtype == np.uint8
            assert np.unique(mask).tolist() == row["labels"]  # labels = classes present
            assert mask.max() < len(CLASSES)
            sizes.setdefault(split, set()).add(image.shape[:2])
    assert sizes["val"] == {(40, 40)}
    assert len(sizes["train"]) > 3 and all(24 <= s <= 56 for hw in sizes["train"] for s in hw)
    for row in iter_rows(info, "unlabeled"):
        assert row["mask"] is None and row["labels"] == []
        assert decode_image(row["image"]).shape == (row["height"], row["width"], 3)


def test_classes_have_distinctive_colours():
    sums = np.zeros((len(CLASSES), 3))
    counts = np.zeros(len(CLASSES))
    for i in range(40):
        image, mask = render_scene(np.random.default_rng([9, i]), 48, 48)
        for c in range(len(CLASSES)):
            sums[c] += image[mask == c].reshape(-1, 3).sum(0)
            counts[c] += (mask == c).sum()
    assert (counts > 0).all()  # every class occurs
    mean = sums / counts[:, None]
    r, g, b = mean.T
    assert r[1] > g[1] + 60 and r[1] > b[1] + 60  # disc: red
    assert g[2] > r[2] + 40 and g[2] > b[2] + 40  # square: green
    assert b[3] > r[3] + 60 and b[3] > g[3] + 60  # triangle: blue
    assert r[4] > b[4] + 60 and g[4] > b[4] + 40  # striped ellipse: yellow/brown
    assert r[5] > g[5] + 60 and b[5] > g[5] + 60  # ring: purple


def test_ensure_synthetic_default_location_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGRAY_CACHE", str(tmp_path / "cache"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_synthetic()))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = str(tmp_path / "cache" / "synthetic-v1")
    assert results == [expected, expected]  # concurrent first use: both get the same dataset
    info = open_dataset(expected)
    assert info.num_rows("train") == 192 and info.num_rows("val") == 48
    assert info.num_rows("unlabeled") == 96 and verify_shards(info) > 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["synthetic-v1"]
    stamp = (tmp_path / "cache" / "synthetic-v1" / "dataset.json").stat().st_mtime_ns
    assert ensure_synthetic() == expected
    assert (tmp_path / "cache" / "synthetic-v1" / "dataset.json").stat().st_mtime_ns == stamp
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no dataset.json"):
        ensure_synthetic(str(junk))
