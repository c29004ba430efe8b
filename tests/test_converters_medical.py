"""Converters of MaskSup's datasets (GLaS, Kvasir-SEG + CVC-ClinicDB, NYUDv2), each run on a tiny
tree written here in the dataset's real layout and checked pixel by pixel (see test_converters.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import check_row, mask_of, read_rows, write_image, write_mask
from PIL import Image

from segray.data.converters import CONVERTERS, add_common_arguments
from segray.data.converters.classes import NYUDV2_CLASSES
from segray.data.converters.glas import convert_glas
from segray.data.converters.kvasir import convert_kvasir
from segray.data.converters.nyudv2 import convert_nyudv2
from segray.data.manifest import open_dataset

# ----------------------------------------------------------------------------- GLaS and polyps

def _binary_pair(img: Path, mask: Path, fmt: str | None = None) -> np.ndarray:
    write_image(img, 4, 5, fmt=fmt)
    gray = np.array([[0, 100, 127, 128, 255]] * 4, np.uint8)
    write_mask(mask, gray)
    return (gray > 127).astype(np.uint8)


def test_glas(tmp_path):
    root = tmp_path / "GlaS"
    exp = _binary_pair(root / "train" / "img" / "train_1.bmp", root / "train" / "labelcol" /
                       "train_1.png", fmt="BMP")
    _binary_pair(root / "train" / "img" / "train_2.bmp", root / "train" / "labelcol" /
                 "train_2_anno.bmp", fmt="BMP")
    _binary_pair(root / "test" / "img" / "testA_1.png", root / "test" / "labelcol" / "testA_1.png")
    info = convert_glas(str(tmp_path), str(tmp_path / "out"))
    assert info.classes == ["background", "gland"] and info.split_names == ["train", "val"]
    rows = read_rows(tmp_path / "out", "train")
    assert sorted(rows) == ["train/train_1", "train/train_2"]
    check_row(rows["train/train_1"], root / "train" / "img" / "train_1.bmp", exp)
    assert mask_of(rows["train/train_2"]).tolist() == exp.tolist()
    assert list(read_rows(tmp_path / "out", "val")) == ["test/testA_1"]


def test_glas_errors(tmp_path):
    root = tmp_path / "GlaS"
    with pytest.raises(FileNotFoundError, match="train/img"):
        convert_glas(str(root), str(tmp_path / "out"))
    write_image(root / "train" / "img" / "a.png")
    write_mask(root / "train" / "labelcol" / "a.png", np.eye(6, 8))  # a 0/1 mask
    with pytest.raises(ValueError, match="test/img: missing or holds no images"):
        convert_glas(str(root), str(tmp_path / "out"))
    write_image(root / "test" / "img" / "b.png")
    write_mask(root / "test" / "labelcol" / "b.png", np.zeros((6, 8)))
    with pytest.raises(ValueError) as err:
        convert_glas(str(root), str(tmp_path / "out"))
    assert "train/labelcol/a.png: mask values are 0..1" in str(err.value)
    assert "--threshold 0" in str(err.value)
    info = convert_glas(str(root), str(tmp_path / "out"), threshold=0)
    assert mask_of(read_rows(tmp_path / "out", "train")["train/a"]).tolist() == np.eye(6, 8).tolist()
    assert info.provenance["label_map"] == "binary: luminance > 0 -> 1"


def test_glas_two_annotations_of_one_image_are_an_error(tmp_path):
    """labelcol/ holding both <name>.png and <name>_anno.bmp: one of them was taken silently."""
    root = tmp_path / "GlaS"
    for folder in ("train", "test"):
        _binary_pair(root / folder / "img" / "t1.bmp", root / folder / "labelcol" / "t1.png",
                     fmt="BMP")
    write_mask(root / "train" / "labelcol" / "t1_anno.bmp", np.zeros((4, 5)))
    with pytest.raises(ValueError) as err:
        convert_glas(str(root), str(tmp_path / "out"))
    message = str(err.value)
    assert "train/labelcol/t1" in message and "image 't1' has two annotations (" in message
    assert "t1.png" in message and "t1_anno.bmp" in message and "remove one" in message
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_kvasir(tmp_path):
    root = tmp_path / "polyp"
    exp = _binary_pair(root / "TrainDataset" / "image" / "1.png",
                       root / "TrainDataset" / "mask" / "1.png")
    for s in ("CVC-ClinicDB", "CVC-300", "Kvasir"):
        _binary_pair(root / "TestDataset" / s / "images" / "1.png",
                     root / "TestDataset" / s / "masks" / "1.png")
    # An RGB mask is read as luminance, like cv2.imread(path, 0).
    Image.fromarray(np.stack([np.array([[0, 200]] * 2, np.uint8)] * 3, -1)).save(
        root / "TestDataset" / "Kvasir" / "masks" / "2.png")
    write_image(root / "TestDataset" / "Kvasir" / "images" / "2.jpg", 2, 2, fmt="JPEG")
    info = convert_kvasir(str(tmp_path), str(tmp_path / "out"))
    assert info.split_names == ["train", "val", "test_cvc_300", "test_kvasir"]
    assert info.provenance["test_sets"]["val"] == "CVC-ClinicDB"
    check_row(read_rows(tmp_path / "out", "train")["train/1"],
               root / "TrainDataset" / "image" / "1.png", exp)
    assert list(read_rows(tmp_path / "out", "val")) == ["CVC-ClinicDB/1"]
    kv = read_rows(tmp_path / "out", "test_kvasir")
    assert mask_of(kv["Kvasir/2"]).tolist() == [[0, 1], [0, 1]] and kv["Kvasir/2"]["labels"] == [0, 1]
    with pytest.raises(ValueError, match="test sets found: CVC-300, CVC-ClinicDB, Kvasir"):
        convert_kvasir(str(root), str(tmp_path / "o2"), val_set="ETIS")
    (root / "TestDataset" / "CVC-300" / "masks" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"CVC-300/images/1.png: image without an annotation"):
        convert_kvasir(str(root), str(tmp_path / "o2"))


# ---------------------------------------------------------------------------------------- NYUDv2

def _nyu_tree(tmp_path: Path) -> tuple[Path, np.ndarray]:
    root = tmp_path / "nyudv2"
    lab = np.array([[0, 1, 39, 255], [5, 255, 0, 20]], np.uint8)
    for split in ("train", "val"):
        write_image(root / f"{split}_images" / "0001.png", 2, 4)
        write_mask(root / f"{split}_labels" / "0001.png", lab)
    return root, lab


def test_nyudv2_keeps_void_or_maps_it_to_zero(tmp_path):
    root, lab = _nyu_tree(tmp_path)  # the same file name in train and val: keys are prefixed
    info = convert_nyudv2(str(root), str(tmp_path / "out"))
    assert info.classes == NYUDV2_CLASSES and len(info.classes) == 40
    assert info.provenance["void_to_zero"] is False and info.ignore_index == 255
    check_row(read_rows(tmp_path / "out", "train")["train/0001"], root / "train_images" / "0001.png",
               lab)
    info = convert_nyudv2(str(root), str(tmp_path / "masksup"), void_to_zero=True)
    assert info.provenance["void_to_zero"] is True
    row = read_rows(tmp_path / "masksup", "val")["val/0001"]
    assert mask_of(row).tolist() == [[0, 1, 39, 0], [5, 0, 0, 20]]
    assert row["labels"] == [0, 1, 5, 20, 39]


def test_nyudv2_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_images"):
        convert_nyudv2(str(tmp_path), str(tmp_path / "out"))
    root, _ = _nyu_tree(tmp_path)
    (root / "val_images" / "0001.png").rename(root / "val_images" / "5001.png")
    with pytest.raises(ValueError) as err:
        convert_nyudv2(str(root), str(tmp_path / "out"))
    msg = str(err.value)
    assert "val_labels/0001.png: annotation without an image" in msg
    assert "val_images/5001.png: image without an annotation" in msg
    (root / "val_labels" / "0001.png").unlink()
    write_mask(root / "val_labels" / "5001.png", np.full((2, 4), 40))
    (root / "train_images" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError) as err:
        convert_nyudv2(str(root), str(tmp_path / "out"))
    msg = str(err.value)  # both file problems are reported together
    assert "train_images/0001.png: unreadable image" in msg
    assert "val_labels/5001.png: annotation holds values [40]" in msg
    assert not (tmp_path / "out" / "dataset.json").exists()


# ------------------------------------------------------------------------------------ registry

def test_registry_parses_and_converts_from_namespace(tmp_path):
    assert sorted(CONVERTERS) == ["ade20k", "cityscapes", "cocostuff10k", "glas", "kvasir",
                                  "nyudv2", "voc"]
    for conv in CONVERTERS.values():  # each set of flags coexists with the common ones
        parser = argparse.ArgumentParser()
        add_common_arguments(parser)
        conv.add_arguments(parser)
        assert conv.help
    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    CONVERTERS["nyudv2"].add_arguments(parser)
    root, _ = _nyu_tree(tmp_path)
    args = parser.parse_args(["--void-to-zero", "--name", "nyu40", "--rows-per-shard", "1"])
    info = CONVERTERS["nyudv2"].convert(str(root), str(tmp_path / "out"), args)
    assert info.name == "nyu40" and info.provenance["void_to_zero"] is True
    info = CONVERTERS["nyudv2"].convert(str(root), str(tmp_path / "out2"), {})
    assert info.name == "nyudv2" and info.provenance["void_to_zero"] is False
    assert open_dataset(str(tmp_path / "out2")).num_rows("train") == 1
