"""The images/ + masks/ folder converter on tiny generated trees, including every error case."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segray.data.decode import decode_mask
from segray.data.folder import convert_folder
from segray.data.manifest import open_dataset, verify_shards
from segray.data.stream import iter_rows


def _save(path: Path, array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("P")
        img.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * (256 * 3 - 9))
    img.save(path, format=fmt)


def make_tree(root: Path, n: int = 5, classes: list[str] | None = None, h: int = 12,
              w: int = 16) -> Path:
    """n image/mask pairs; mask i holds classes {0, 1 + i % 2} and one ignore pixel."""
    for i in range(n):
        rng = np.random.default_rng(i)
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2:, : w // 2] = 1 + i % 2
        mask[0, 0] = 255
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        _save(root / "images" / f"img{i}.{ext}", image, fmt)
        _save(root / "masks" / f"img{i}.png", mask, mode="P" if i == 0 else None)
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_convert_with_val_fraction(tmp_path):
    src = make_tree(tmp_path / "src", classes=["bg", "red", "green"])
    info = convert_folder(str(src), str(tmp_path / "dst"), val_fraction=0.4, seed=0)
    assert info.classes == ["bg", "red", "green"] and info.name == "src"
    # Colours of the P-mode mask's palette are kept for the classes it defines.
    assert info.palette == [[0, 0, 0], [200, 10, 10], [10, 200, 10]]
    assert info.num_rows("train") == 3 and info.num_rows("val") == 2
    assert verify_shards(open_dataset(str(tmp_path / "dst"))) == 2
    rows = {r["key"]: r for split in ("train", "val") for r in iter_rows(info, split)}
    assert sorted(rows) == [f"img{i}" for i in range(5)]
    for i in range(5):
        ext = "jpg" if i % 2 else "png"
        row = rows[f"img{i}"]
        assert row["image"] == (src / "images" / f"img{i}.{ext}").read_bytes()  # original bytes
        expected = np.array(Image.open(src / "masks" / f"img{i}.png"))
        assert (decode_mask(row["mask"]) == expected).all()  # P read as indices, not colours
        assert row["labels"] == [0, 1 + i % 2]  # derived from the mask, ignore excluded
        assert (row["height"], row["width"]) == (12, 16)
    # The split is a seeded shuffle: same seed, same split.
    again = convert_folder(str(src), str(tmp_path / "dst2"), val_fraction=0.4, seed=0)
    assert [r["key"] for r in iter_rows(again, "val")] == [r["key"] for r in iter_rows(info, "val")]


def test_classes_default_and_split_files(tmp_path):
    src = make_tree(tmp_path / "src", n=4)
    (src / "images" / "extra.png").write_bytes((src / "images" / "img0.png").read_bytes())
    (src / "split.txt").write_text("# stem split\nimg0 train\nimg1 train\nimg2 val\n"
                                   "img3 test\nextra unlabeled\n")
    info = convert_folder(str(src), str(tmp_path / "a"), split_file=str(src / "split.txt"))
    assert info.classes == ["class_0", "class_1", "class_2"]  # max label 2 -> 3 classes
    assert {s: info.num_rows(s) for s in info.split_names} == {
        "train": 2, "val": 1, "test": 1, "unlabeled": 1}
    assert info.split_names[:2] == ["train", "val"]
    unl = list(iter_rows(info, "unlabeled"))
    assert unl[0]["key"] == "extra" and unl[0]["mask"] is None and unl[0]["labels"] == []
    (src / "split.json").write_text(json.dumps({"train": ["img0", "img1", "img2"],
                                                "val": ["img3"], "unlabeled": ["extra"]}))
    info = convert_folder(str(src), str(tmp_path / "b"), split_file=str(src / "split.json"))
    assert [r["key"] for r in iter_rows(info, "val")] == ["img3"]
    (src / "bad.txt").write_text("img0 train extra-field\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 1"):
        convert_folder(str(src), str(tmp_path / "c"), split_file=str(src / "bad.txt"))


def test_every_error_is_reported_with_its_file(tmp_path):
    src = make_tree(tmp_path / "src", n=3, classes=["bg", "red"])  # img1 holds label 2
    _save(src / "images" / "nomask.png", np.zeros((12, 16, 3), np.uint8))
    _save(src / "masks" / "noimage.png", np.zeros((12, 16), np.uint8))
    _save(src / "images" / "small.png", np.zeros((12, 16, 3), np.uint8))
    _save(src / "masks" / "small.png", np.zeros((10, 16), np.uint8))
    (src / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _save(src / "masks" / "broken.png", np.zeros((12, 16), np.uint8))
    with pytest.raises(ValueError) as e:
        convert_folder(str(src), str(tmp_path / "dst"), val_fraction=0.2)
    message = str(e.value)
    assert "5 problem(s)" in message
    assert "nomask.png: image without a mask" in message
    assert "noimage.png: mask without an image" in message
    assert "small.png: mask is 16x10 (WxH) but its image small.png is 16x12" in message
    assert "img1.png: label values [2] are outside the 2 classes" in message
    assert "broken.jpg: unreadable image" in message
    assert not (tmp_path / "dst" / "dataset.json").exists()  # checked before anything is written


def test_missing_folder_and_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="images"):
        convert_folder(str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    src = make_tree(tmp_path / "src", n=2)
    with pytest.raises(ValueError, match="val_fraction"):
        convert_folder(str(src), str(tmp_path / "dst"), val_fraction=1.5)
    (src / "split.txt").write_text("img0 train\nghost val\n")
    with pytest.raises(ValueError, match="'ghost' has no image") as e:
        convert_folder(str(src), str(tmp_path / "dst"), split_file=str(src / "split.txt"))
    assert "img1.jpg: not listed in split file" in str(e.value)
    rgb_mask = io.BytesIO()
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(rgb_mask, format="PNG")
    (src / "masks" / "img1.png").write_bytes(rgb_mask.getvalue())
    with pytest.raises(ValueError, match=r"img1\.png: mask PNG has mode 'RGB'"):
        convert_folder(str(src), str(tmp_path / "dst"), val_fraction=0.5)
