"""Every shipped preset for a public dataset resolves against what that dataset's converter writes.

A preset names the splits it trains and evaluates on; the converter names the splits it writes.
Each dataset here is a tiny tree in its real layout, converted for real, and every preset named
``<dataset>_*`` (of any method) goes through ``train.py``'s config path and the split check that
runs before Ray starts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from convert_helpers import write_image, write_mask

from methods import METHODS, list_presets
from segray.cli import UsageParser, add_run_args, build_config
from segray.data.converters import CONVERTERS
from segray.launch import resolve_data


def _glas(root: Path) -> None:
    for folder, stem in [("train", "train_1"), ("test", "testA_1")]:
        write_image(root / "GlaS" / folder / "img" / f"{stem}.bmp", 4, 4, fmt="BMP")
        write_mask(root / "GlaS" / folder / "labelcol" / f"{stem}.png", np.full((4, 4), 255))


def _kvasir(root: Path) -> None:
    base = root / "polyp"
    write_image(base / "TrainDataset" / "image" / "1.png", 4, 4)
    write_mask(base / "TrainDataset" / "mask" / "1.png", np.full((4, 4), 255))
    write_image(base / "TestDataset" / "CVC-ClinicDB" / "images" / "1.png", 4, 4)
    write_mask(base / "TestDataset" / "CVC-ClinicDB" / "masks" / "1.png", np.zeros((4, 4)))


def _nyudv2(root: Path) -> None:
    for split in ("train", "val"):
        write_image(root / f"{split}_images" / "0001.png", 2, 4)
        write_mask(root / f"{split}_labels" / "0001.png", np.ones((2, 4)))


def _ade20k(root: Path) -> None:
    base = root / "ADEChallengeData2016"
    for folder, stem in [("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")]:
        write_image(base / "images" / folder / f"{stem}.jpg", 2, 4, fmt="JPEG")
        write_mask(base / "annotations" / folder / f"{stem}.png", np.ones((2, 4)))


def _cityscapes(root: Path) -> None:
    base = root / "cityscapes"
    for split, stem in [("train", "aachen_000000_000019"), ("val", "frankfurt_000000_000294")]:
        city = stem.split("_")[0]
        write_image(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 2, 4)
        write_mask(base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                   np.full((2, 4), 7))


def _cocostuff10k(root: Path) -> None:
    base = root / "coco_stuff10k"
    for folder, stem in [("train2014", "COCO_train2014_000000000077"),
                         ("test2014", "COCO_train2014_000000000139")]:
        write_image(base / "images" / folder / f"{stem}.jpg", 2, 4, fmt="JPEG")
        write_mask(base / "annotations" / folder / f"{stem}_labelTrainIds.png", np.ones((2, 4)))


TREES: dict[str, Callable[[Path], None]] = {
    "glas": _glas, "kvasir": _kvasir, "nyudv2": _nyudv2, "ade20k": _ade20k,
    "cityscapes": _cityscapes, "cocostuff10k": _cocostuff10k,
}


def _presets_of(dataset: str) -> list[tuple[str, str]]:
    return [(m, p) for m in sorted(METHODS) for p in list_presets(m) if p.startswith(f"{dataset}_")]


def test_every_dataset_preset_has_a_tree_here():
    """A new preset for a dataset without a tree here fails, instead of going unchecked."""
    prefixes = {p.split("_")[0] for m in METHODS for p in list_presets(m) if p != "demo"}
    assert prefixes <= set(TREES), prefixes - set(TREES)
    assert set(TREES) <= set(CONVERTERS)


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_presets_resolve_against_the_converted_dataset(dataset, tmp_path):
    presets = _presets_of(dataset)
    assert presets, f"no shipped preset is named {dataset}_*"
    TREES[dataset](tmp_path / "src")
    CONVERTERS[dataset].convert(str(tmp_path / "src"), str(tmp_path / "out"), {})
    parser = UsageParser()
    add_run_args(parser)
    for method, preset in presets:
        args = parser.parse_args(["--method", method, "--preset", preset,
                                  "--data", str(tmp_path / "out")])
        cfg = build_config(args)
        info = resolve_data(cfg)  # raises UsageError naming a split the dataset lacks
        assert {cfg.data.train_split, cfg.data.val_split} <= set(info.split_names), (method, preset)
