"""``jobs/evaluate.py --data`` on a dataset other than the one a checkpoint was trained on: the
same classes are fine; other classes are a usage error naming both datasets (never a traceback,
never scores of other classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bad_rows import good_rows
from conftest import job_env, run_job

from segray.checkpoint import write_local
from segray.data import DatasetWriter
from segray.data.shards import encode_mask_png


def _copy(dst: Path, info, rows: list[dict], classes: list[str]) -> Path:
    """``rows`` as train and val of a new dataset with class names ``classes``."""
    n = len(classes)
    with DatasetWriter(str(dst), "other", classes, info.palette[:n], rows_per_shard=8) as w:
        for split in ("train", "val"):
            for r in rows:
                mask = np.minimum(np.asarray(_decode(r["mask"])), n - 1).astype(np.uint8)
                w.add(split, f"{split}-{r['key']}", r["image"], encode_mask_png(mask),
                      sorted(set(np.unique(mask).tolist())), r["height"], r["width"])
    return dst


def _decode(png: bytes) -> np.ndarray:
    from segray.data.decode import decode_mask

    return decode_mask(png)


def _checkpoint(tmp_path: Path, info) -> Path:
    from segray.cli import UsageParser, add_run_args, build_config
    from segray.config import to_dict
    from segray.engine import build_method

    parser = UsageParser(prog="test")
    add_run_args(parser, method_default="supervised")
    cfg = build_config(parser.parse_args(["--data", info.uri, "--set",
                                          "model.decoder_channels=16"]))
    model = build_method(cfg, info).build()
    folder = tmp_path / "run" / "step_0000001"
    folder.parent.mkdir()
    Path(write_local({"model": model.state_dict(), "step": 1},
                     {"config": to_dict(cfg), "method": "supervised", "step": 1})).rename(folder)
    return folder


def test_evaluate_refuses_a_dataset_with_other_classes(tmp_path):
    info, train, _ = good_rows(tmp_path)
    ckpt = _checkpoint(tmp_path, info)
    env = job_env(tmp_path)
    rows = train[:4]
    same = _copy(tmp_path / "same", info, rows, list(info.classes))
    proc = run_job("evaluate.py", "--checkpoint", str(ckpt), "--data", str(same), "--images",
                   "0", env=env, timeout=300)
    assert '"mIoU"' in proc.stdout

    fewer = _copy(tmp_path / "fewer", info, rows, list(info.classes[:3]))
    renamed = _copy(tmp_path / "renamed", info, rows, [f"x{i}" for i in range(info.num_classes)])
    for data in (fewer, renamed):
        proc = run_job("evaluate.py", "--checkpoint", str(ckpt), "--data", str(data), env=env,
                       check=False, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
        assert (f"error: checkpoint {ckpt} was trained on {info.uri} with classes "
                f"[{', '.join(info.classes[:6])}") in proc.stdout
        assert f"but {data} has [" in proc.stdout

    # The dataset it was trained on is gone: the model's shape still catches another class count.
    Path(info.uri, "dataset.json").rename(Path(info.uri, "moved.json"))
    proc = run_job("evaluate.py", "--checkpoint", str(ckpt), "--data", str(fewer), env=env,
                   check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert f"error: checkpoint {ckpt} does not fit dataset {fewer} (3 classes): " in proc.stdout
