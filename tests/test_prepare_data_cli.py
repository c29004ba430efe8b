"""jobs/prepare_data.py as users run it: exit codes, messages, summary, datasets it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from segray.data.manifest import open_dataset, verify_shards

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), str(ROOT),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare_data.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _tree(root: Path, with_orphan_image: bool = False) -> Path:
    for i in range(4):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "images" / f"a{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[4:] = 1
        Image.fromarray(mask).save(root / "masks" / f"a{i}.png")
    if with_orphan_image:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "orphan.png")
    return root


def test_help_lists_formats():
    proc = _run("--help")
    assert proc.returncode == 0 and "synthetic" in proc.stdout and "folder" in proc.stdout
    proc = _run("folder", "--help")
    assert proc.returncode == 0 and "--val-fraction" in proc.stdout and "--split-file" in proc.stdout


def test_synthetic(tmp_path):
    dst = tmp_path / "synth"
    proc = _run("synthetic", str(dst), "--train", "6", "--val", "2", "--unlabeled", "3",
                "--size", "32", "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    info = open_dataset(str(dst))
    assert {s: info.num_rows(s) for s in info.split_names} == {"train": 6, "val": 2, "unlabeled": 3}
    assert info.provenance["seed"] == 4 and verify_shards(info) == 3
    assert str(dst / "dataset.json") in proc.stdout
    assert "train" in proc.stdout and " 6 rows" in proc.stdout


def test_folder(tmp_path):
    src = _tree(tmp_path / "src")
    proc = _run("folder", str(src), str(tmp_path / "dst"), "--val-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    info = open_dataset(str(tmp_path / "dst"))
    assert info.num_rows("train") == 3 and info.num_rows("val") == 1
    assert info.classes == ["class_0", "class_1"]


def test_usage_errors_exit_2_without_traceback(tmp_path):
    for args, expected in [
        (("coco", "x", "y"), "invalid choice: 'coco'"),
        (("folder", str(tmp_path / "missing"), str(tmp_path / "dst")), "does not exist"),
        (("synthetic",), "the following arguments are required: dst"),
        (("synthetic", str(tmp_path / "s"), "--train", "0"), "train >= 1"),
        (("folder", str(_tree(tmp_path / "ok")), str(tmp_path / "d"), "--val-fraction", "0.1",
          "--split-file", "s.txt"), "not allowed with argument"),
        # Option values are checked before any file is read: usage errors, not bad data.
        (("folder", str(tmp_path / "ok"), str(tmp_path / "d"), "--val-fraction", "1.5"),
         "argument --val-fraction: expected a number in [0, 1), got 1.5"),
        (("folder", str(tmp_path / "ok"), str(tmp_path / "d"), "--rows-per-shard", "0"),
         "argument --rows-per-shard: expected an integer >= 1, got 0"),
        (("synthetic", str(tmp_path / "s"), "--rows-per-shard", "-3"), "expected an integer >= 1"),
        (("glas", str(tmp_path), str(tmp_path / "d"), "--threshold", "300"),
         "argument --threshold: threshold must be an int in 0..254"),
        (("kvasir", str(tmp_path), str(tmp_path / "d"), "--threshold", "x"),
         "argument --threshold: expected an int in 0..254, got 'x'"),
        (("cityscapes", str(tmp_path), str(tmp_path / "d"), "--splits", "train,test"),
         "argument --splits: unknown Cityscapes split(s) ['test']"),
        (("voc", str(tmp_path), str(tmp_path / "d"), "--labeled-list", str(tmp_path / "no.txt")),
         f"argument --labeled-list: no file at {tmp_path / 'no.txt'}"),
        (("ade20k", str(tmp_path), str(tmp_path / "d"), "--workers", "0"),
         "argument --workers: expected an integer >= 1, got 0"),
    ]:
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_wrong_option_values_exit_2_even_when_only_the_tree_tells(tmp_path):
    """A --val-set the tree does not hold and an --sbd folder that does not exist are usage
    errors (exit 2, naming the option), not bad data (exit 1)."""
    polyp = tmp_path / "polyp"
    (polyp / "TrainDataset").mkdir(parents=True)
    (polyp / "TestDataset" / "CVC-ClinicDB").mkdir(parents=True)
    (polyp / "TestDataset" / "Kvasir").mkdir()
    nosuch = tmp_path / "nosuch"
    for args, expected in [
        (("kvasir", str(polyp), str(tmp_path / "d"), "--val-set", "CVC-Typo"),
         f"error: --val-set: val set 'CVC-Typo' is not in {polyp / 'TestDataset'}; test sets "
         "found: CVC-ClinicDB, Kvasir; pass one of them"),
        (("voc", str(tmp_path), str(tmp_path / "d"), "--sbd", str(nosuch)),
         f"argument --sbd: no folder at {nosuch}; expected 'auto', 'none', a folder of SBD"),
    ]:
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "usage: prepare_data.py" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_bad_data_exits_1_naming_the_file(tmp_path):
    src = _tree(tmp_path / "src", with_orphan_image=True)
    proc = _run("folder", str(src), str(tmp_path / "dst"))
    assert proc.returncode == 1
    assert "orphan.png: image without a mask" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "dst" / "dataset.json").exists()
