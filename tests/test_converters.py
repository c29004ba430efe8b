"""Public-dataset converters, each run on a tiny tree written here in the dataset's real layout.

Every check is pixel by pixel against the label convention worked by hand, image bytes against the
source files, image-level labels, split row counts, and at least one malformed tree per format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from convert_helpers import RNG, check_row, mask_of, read_rows, write_image, write_mask
from PIL import Image

from segray.data.converters.ade20k import convert_ade20k
from segray.data.converters.cityscapes import convert_cityscapes
from segray.data.converters.classes import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    COCO_STUFF_CLASSES,
    VOC_PALETTE,
)
from segray.data.converters.cocostuff10k import COCO_ID_LUT, convert_cocostuff10k
from segray.data.converters.common import OptionError
from segray.data.converters.masks import apply_lut, reduce_zero_label_lut
from segray.data.converters.voc import convert_voc
from segray.data.manifest import open_dataset, verify_shards

# ----------------------------------------------------------------------------------- label maps

def test_label_maps_match_hand_worked_values():
    assert reduce_zero_label_lut(150)[[0, 1, 2, 150, 255]].tolist() == [255, 0, 1, 149, 255]
    # COCO ids: 0 unlabeled, 11 -> 10, 12 unused, 13 -> 11 (first id after the gap), 91 unused,
    # 92 -> 80 (first stuff class 'banner'), 182 -> 170 ('wood').
    raw = np.array([[0, 1, 11, 12], [13, 91, 92, 182]])
    got = apply_lut(raw, COCO_ID_LUT, "COCO ids")
    assert got.tolist() == [[255, 0, 10, 255], [11, 255, 80, 170]]
    assert COCO_STUFF_CLASSES[80] == "banner" and COCO_STUFF_CLASSES[170] == "wood"
    with pytest.raises(ValueError, match=r"\[183\].*COCO ids"):
        apply_lut(np.array([[183]]), COCO_ID_LUT, "COCO ids")


# ------------------------------------------------------------------------------------------ VOC

def _voc_tree(tmp_path: Path) -> dict:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000001", "2007_000002", "2007_000003"],
           "val": ["2008_000001", "2008_000002"]}
    fine, aug = {}, {}
    for i in ids["train"] + ids["val"] + ["2009_000001", "2009_000002"]:
        write_image(root / "JPEGImages" / f"{i}.jpg", fmt="JPEG")
    for i in ids["train"] + ids["val"]:
        m = RNG.integers(0, 21, (6, 8)).astype(np.uint8)
        m[0, :] = 255  # object border
        write_mask(root / "SegmentationClass" / f"{i}.png", m, VOC_PALETTE)
        fine[i] = m
    # SBD covers one VOC train id (its fine mask must win), two SBD-only ids and one val id
    # (which must stay out of train_aug).
    for i in ["2007_000001", "2009_000001", "2009_000002", "2008_000001"]:
        aug[i] = RNG.integers(0, 21, (6, 8)).astype(np.uint8)
        write_mask(root / "SegmentationClassAug" / f"{i}.png", aug[i])
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for split, lst in ids.items():
        (sets / f"{split}.txt").write_text("\n".join(lst) + "\n")
    return {"root": root, "ids": ids, "fine": fine, "aug": aug}


def test_voc_without_sbd(tmp_path):
    t = _voc_tree(tmp_path)
    info = convert_voc(str(tmp_path / "VOCdevkit"), str(tmp_path / "out"), sbd="none")
    assert info.split_names == ["train", "val"] and len(info.classes) == 21
    assert info.palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert info.provenance["reduce_zero_label"] is False and info.provenance["sbd"] is None
    for split in ("train", "val"):
        rows = read_rows(tmp_path / "out", split)
        assert sorted(rows) == sorted(t["ids"][split])
        for i, row in rows.items():
            check_row(row, t["root"] / "JPEGImages" / f"{i}.jpg", t["fine"][i])
    assert verify_shards(open_dataset(str(tmp_path / "out"))) == 2


def test_voc_train_aug_and_labeled_list(tmp_path):
    t = _voc_tree(tmp_path)
    info = convert_voc(str(t["root"]), str(tmp_path / "aug"))  # SegmentationClassAug found
    assert info.split_names == ["train_aug", "val"] and info.name == "voc2012_aug"
    rows = read_rows(tmp_path / "aug", "train_aug")
    assert sorted(rows) == sorted(t["ids"]["train"] + ["2009_000001", "2009_000002"])
    for i, row in rows.items():
        expected = t["fine"][i] if i in t["fine"] else t["aug"][i]
        check_row(row, t["root"] / "JPEGImages" / f"{i}.jpg", expected)

    lst = tmp_path / "labeled.txt"  # both plain ids and UniMatch-style "path path" lines
    lst.write_text("2007_000002\nJPEGImages/2009_000001.jpg SegmentationClassAug/2009_000001.png\n")
    info = convert_voc(str(t["root"]), str(tmp_path / "semi"), labeled_list=str(lst))
    assert info.split_names == ["train_labeled", "unlabeled", "val"]
    assert [info.num_rows(s) for s in info.split_names] == [2, 3, 2]
    lab = read_rows(tmp_path / "semi", "train_labeled")
    check_row(lab["2009_000001"], t["root"] / "JPEGImages" / "2009_000001.jpg",
               t["aug"]["2009_000001"])
    unl = read_rows(tmp_path / "semi", "unlabeled")
    assert sorted(unl) == ["2007_000001", "2007_000003", "2009_000002"]
    for i, row in unl.items():
        check_row(row, t["root"] / "JPEGImages" / f"{i}.jpg", None)


def test_voc_sbd_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    t = _voc_tree(tmp_path)
    cls = tmp_path / "benchmark_RELEASE" / "dataset" / "cls"
    cls.mkdir(parents=True)
    seg = RNG.integers(0, 21, (6, 8)).astype(np.uint8)
    scipy_io.savemat(cls / "2009_000001.mat",
                     {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.unique(seg)}})
    info = convert_voc(str(t["root"]), str(tmp_path / "out"),
                       sbd=str(tmp_path / "benchmark_RELEASE"))
    assert info.provenance["sbd_format"].startswith("mat")
    rows = read_rows(tmp_path / "out", "train_aug")
    assert len(rows) == 4  # 3 VOC train + 1 SBD .mat
    check_row(rows["2009_000001"], t["root"] / "JPEGImages" / "2009_000001.jpg", seg)


def test_voc_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Segmentation"):
        convert_voc(str(tmp_path), str(tmp_path / "out"))
    t = _voc_tree(tmp_path)
    (t["root"] / "JPEGImages" / "2007_000003.jpg").unlink()
    Image.new("RGB", (8, 6)).save(t["root"] / "SegmentationClass" / "2008_000002.png")
    lst = tmp_path / "bad.txt"
    lst.write_text("2008_000001\n")
    with pytest.raises(ValueError) as err:
        convert_voc(str(t["root"]), str(tmp_path / "out"), labeled_list=str(lst))
    msg = str(err.value)
    assert "JPEGImages/2007_000003.jpg: missing" in msg
    assert "'2008_000001' is a val image" in msg
    assert not (tmp_path / "out" / "dataset.json").exists()
    write_image(t["root"] / "JPEGImages" / "2007_000003.jpg", fmt="JPEG")
    lst.write_text("2007_000001\n# comment\n2007_000001\n")
    with pytest.raises(ValueError, match=r"bad.txt line 3: id '2007_000001' is already listed on "
                                         r"line 1"):
        convert_voc(str(t["root"]), str(tmp_path / "out"), labeled_list=str(lst))
    with pytest.raises(ValueError, match=r"2008_000002\.png: mask PNG has mode 'RGB'"):
        convert_voc(str(t["root"]), str(tmp_path / "out"), sbd="none")
    assert not (tmp_path / "out" / "dataset.json").exists()
    # An --sbd folder that is not there is a wrong option (a usage error), not bad data.
    with pytest.raises(OptionError, match=rf"--sbd: no folder at {tmp_path / 'nosuch'}; "
                                          "expected 'auto', 'none'"):
        convert_voc(str(t["root"]), str(tmp_path / "out"), sbd=str(tmp_path / "nosuch"))


# ----------------------------------------------------------------------------------- Cityscapes

def test_cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.arange(34, dtype=np.uint8).reshape(2, 17)  # every labelId once
    expected = np.full((2, 17), 255, np.uint8)
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                               23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17,
                               33: 18}.items():
        expected[ids == label_id] = train_id
    stems = {"train": ["aachen_000000_000019", "aachen_000001_000019"],
             "val": ["frankfurt_000000_000294"]}
    for split, names in stems.items():
        for s in names:
            city = s.split("_")[0]
            write_image(root / "leftImg8bit" / split / city / f"{s}_leftImg8bit.png", 2, 17)
            write_mask(root / "gtFine" / split / city / f"{s}_gtFine_labelIds.png", ids)
            write_mask(root / "gtFine" / split / city / f"{s}_gtFine_color.png", ids)
    # A ready-made labelTrainIds file takes precedence over labelIds.
    train_ids = RNG.integers(0, 19, (2, 17)).astype(np.uint8)
    train_ids[0, 0] = 255
    write_mask(root / "gtFine" / "train" / "aachen" / "aachen_000001_000019_gtFine_labelTrainIds.png",
          train_ids)
    info = convert_cityscapes(str(tmp_path), str(tmp_path / "out"))
    assert info.classes == CITYSCAPES_CLASSES and info.palette[0] == [128, 64, 128]
    assert info.provenance["label_map"] == "cityscapes labelIds->trainIds"
    assert info.provenance["annotations"] == {"labelTrainIds": 1, "labelIds": 2}
    rows = read_rows(tmp_path / "out", "train")
    img = root / "leftImg8bit" / "train" / "aachen"
    check_row(rows["aachen_000000_000019"], img / "aachen_000000_000019_leftImg8bit.png", expected)
    check_row(rows["aachen_000001_000019"], img / "aachen_000001_000019_leftImg8bit.png",
               train_ids)
    assert list(read_rows(tmp_path / "out", "val")) == ["frankfurt_000000_000294"]


def test_cityscapes_errors(tmp_path):
    root = tmp_path / "cs"
    write_image(root / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000001_leftImg8bit.png")
    write_image(root / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000002_leftImg8bit.png")
    gt = root / "gtFine" / "train" / "ulm"
    write_mask(gt / "ulm_000000_000001_gtFine_labelIds.png", np.full((6, 8), 40))
    with pytest.raises(FileNotFoundError, match="leftImg8bit/val not found"):
        convert_cityscapes(str(root), str(tmp_path / "out"))
    with pytest.raises(ValueError) as err:
        convert_cityscapes(str(root), str(tmp_path / "out"), splits=("train",))
    assert "ulm_000000_000002_leftImg8bit.png: no annotation (expected " in str(err.value)
    write_mask(gt / "ulm_000000_000002_gtFine_labelIds.png", np.zeros((6, 8)))
    with pytest.raises(ValueError, match=r"000001_gtFine_labelIds.png: .*\[40\].*labelIds 0..33"):
        convert_cityscapes(str(root), str(tmp_path / "out"), splits=("train",))
    with pytest.raises(ValueError, match="unknown Cityscapes split"):
        convert_cityscapes(str(root), str(tmp_path / "out"), splits=("test",))


# -------------------------------------------------------------------------------------- ADE20K

def test_ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    raw = {"train": np.array([[0, 1, 2, 150], [75, 0, 149, 3]], np.uint8),
           "val": np.array([[150, 150, 0, 1]], np.uint8)}
    for split, folder, stem in [("train", "training", "ADE_train_00000001"),
                                ("val", "validation", "ADE_val_00000001")]:
        write_image(root / "images" / folder / f"{stem}.jpg", *raw[split].shape, fmt="JPEG")
        write_mask(root / "annotations" / folder / f"{stem}.png", raw[split])
    info = convert_ade20k(str(tmp_path), str(tmp_path / "out"))
    assert info.classes == ADE20K_CLASSES and info.classes[7] == "bed"
    assert info.palette[0] == [120, 120, 120] and info.palette[-1] == [92, 0, 255]
    assert info.provenance["reduce_zero_label"] is True
    row = read_rows(tmp_path / "out", "train")["ADE_train_00000001"]
    expected = np.array([[255, 0, 1, 149], [74, 255, 148, 2]], np.uint8)
    check_row(row, root / "images" / "training" / "ADE_train_00000001.jpg", expected)
    assert row["labels"] == [0, 1, 2, 74, 148, 149]
    val = read_rows(tmp_path / "out", "val")["ADE_val_00000001"]
    assert mask_of(val).tolist() == [[149, 149, 255, 0]]


def test_ade20k_errors(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    with pytest.raises(FileNotFoundError, match="images/training"):
        convert_ade20k(str(root), str(tmp_path / "out"))
    for folder, stem in [("training", "ADE_train_1"), ("validation", "ADE_val_1")]:
        write_image(root / "images" / folder / f"{stem}.jpg", fmt="JPEG")
        write_mask(root / "annotations" / folder / f"{stem}.png", np.full((6, 8), 151))
    write_image(root / "images" / "training" / "ADE_train_2.jpg", fmt="JPEG")
    write_mask(root / "annotations" / "validation" / "ADE_val_1.png", np.zeros((5, 8)))
    with pytest.raises(ValueError) as err:
        convert_ade20k(str(root), str(tmp_path / "out"))
    assert "ADE_train_2.jpg: image without an annotation" in str(err.value)
    (root / "images" / "training" / "ADE_train_2.jpg").unlink()
    with pytest.raises(ValueError) as err:
        convert_ade20k(str(root), str(tmp_path / "out"))
    assert "ADE_train_1.png: annotation holds values [151]" in str(err.value)
    assert "ADE_val_1.png: annotation is 8x5 (WxH) but its image ADE_val_1.jpg is 8x6" in str(
        err.value)


def test_damaged_jpeg_is_refused_at_conversion_by_name(tmp_path):
    """A JPEG whose scan is cut (an end marker appended) or damaged decodes in Pillow with made-up
    pixels; the converter refuses it, naming the file, as training would."""
    root = tmp_path / "ADEChallengeData2016"
    for folder, stem in [("training", "ADE_train_1"), ("validation", "ADE_val_1")]:
        write_image(root / "images" / folder / f"{stem}.jpg", 48, 64, fmt="JPEG")
        write_mask(root / "annotations" / folder / f"{stem}.png", np.zeros((48, 64)))
    bad = root / "images" / "training" / "ADE_train_1.jpg"
    good = bad.read_bytes()
    sos = good.index(b"\xff\xda")
    bad.write_bytes(good[: sos + (len(good) - sos) // 3] + b"\xff\xd9")
    Image.open(bad).load()  # Pillow reads it without complaint
    with pytest.raises(ValueError) as err:
        convert_ade20k(str(root), str(tmp_path / "out"))
    assert (f"{bad}: unreadable image (cannot decode image bytes (damaged JPEG data: libjpeg "
            "warns 'Corrupt JPEG data: premature end of data segment'") in str(err.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


# ------------------------------------------------------------------------------- COCO-Stuff 10k

def test_cocostuff10k_png(tmp_path):
    root = tmp_path / "coco_stuff10k"
    raw = np.array([[0, 1, 2, 171], [255, 80, 81, 0]], np.uint8)
    expected = np.array([[255, 0, 1, 170], [255, 79, 80, 255]], np.uint8)
    for folder, stem in [("train2014", "COCO_train2014_000000000077"),
                         ("train2014", "COCO_train2014_000000000078"),
                         ("test2014", "COCO_train2014_000000000139")]:
        write_image(root / "images" / folder / f"{stem}.jpg", 2, 4, fmt="JPEG")
        write_mask(root / "annotations" / folder / f"{stem}_labelTrainIds.png", raw)
    info = convert_cocostuff10k(str(tmp_path), str(tmp_path / "out"))
    assert len(info.classes) == 171 and info.palette[0] == [0, 192, 64]
    assert [info.num_rows(s) for s in info.split_names] == [2, 1]
    assert info.provenance["reduce_zero_label"] is True and info.provenance["val"] == "test2014"
    row = read_rows(tmp_path / "out", "val")["COCO_train2014_000000000139"]
    check_row(row, root / "images" / "test2014" / "COCO_train2014_000000000139.jpg", expected)


def test_cocostuff10k_two_annotations_of_one_image_are_an_error(tmp_path):
    root = tmp_path / "coco_stuff10k"
    raw = np.zeros((2, 4), np.uint8)
    for folder, stem in [("train2014", "a"), ("test2014", "b")]:
        write_image(root / "images" / folder / f"{stem}.jpg", 2, 4, fmt="JPEG")
        write_mask(root / "annotations" / folder / f"{stem}_labelTrainIds.png", raw)
    write_mask(root / "annotations" / "train2014" / "a.png", raw + 1)  # which one is meant?
    with pytest.raises(ValueError) as err:
        convert_cocostuff10k(str(tmp_path), str(tmp_path / "out"))
    assert (f"{root / 'annotations' / 'train2014' / 'a.png'}: image 'a' has two annotations "
            "(a_labelTrainIds.png and a.png); remove one") in str(err.value)


def test_cocostuff10k_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "cocostuff-10k-v1.1"
    s = np.array([[0, 1, 11, 13], [91, 92, 181, 182]], np.uint16)
    for stem in ("COCO_train2014_000000000077", "COCO_train2014_000000000139"):
        write_image(root / "images" / f"{stem}.jpg", 2, 4, fmt="JPEG")
        (root / "annotations").mkdir(exist_ok=True)
        scipy_io.savemat(root / "annotations" / f"{stem}.mat", {"S": s, "names": ["x"]})
    (root / "imageLists").mkdir()
    (root / "imageLists" / "train.txt").write_text("COCO_train2014_000000000077\n")
    (root / "imageLists" / "test.txt").write_text("COCO_train2014_000000000139\n")
    info = convert_cocostuff10k(str(root), str(tmp_path / "out"))
    assert info.provenance["annotations"] == "mat"
    row = read_rows(tmp_path / "out", "train")["COCO_train2014_000000000077"]
    expected = np.array([[255, 0, 10, 11], [255, 80, 169, 170]], np.uint8)
    check_row(row, root / "images" / "COCO_train2014_000000000077.jpg", expected)
    (root / "imageLists" / "test.txt").write_text("COCO_train2014_000000000999\n")
    with pytest.raises(ValueError, match=r"COCO_train2014_000000000999\.jpg: missing \(listed in"):
        convert_cocostuff10k(str(root), str(tmp_path / "out2"))


def test_cocostuff10k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a COCO-Stuff 10k folder"):
        convert_cocostuff10k(str(tmp_path), str(tmp_path / "out"))
    root = tmp_path / "c"
    write_image(root / "images" / "train2014" / "a.jpg", fmt="JPEG")
    write_mask(root / "annotations" / "train2014" / "a_labelTrainIds.png", np.full((6, 8), 172))
    with pytest.raises(FileNotFoundError, match="images/test2014"):
        convert_cocostuff10k(str(root), str(tmp_path / "out"))
    write_image(root / "images" / "test2014" / "b.jpg", fmt="JPEG")
    write_mask(root / "annotations" / "test2014" / "b_labelTrainIds.png", np.zeros((6, 8)))
    with pytest.raises(ValueError, match=r"a_labelTrainIds.png: annotation holds values \[172\]"):
        convert_cocostuff10k(str(root), str(tmp_path / "out"))
