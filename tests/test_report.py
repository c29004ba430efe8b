"""The run report: summary.json, curves and history files written by ``segray.report``."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from segray import report


def _finalize(tmp_path, history: list[dict]) -> dict:
    cfg = SimpleNamespace(method="supervised", preset="demo", name="r1")
    info = SimpleNamespace(classes=["bg", "cat"], palette=[[0, 0, 0], [255, 0, 0]],
                           ignore_index=255, uri="/data/toy")
    metrics = {"val/mIoU": 40.0, "val/IoU": [60.0, float("nan")], "val/majority_mIoU": 10.0}
    return report.finalize(cfg, info, str(tmp_path), history, metrics,
                           SimpleNamespace(samples=[]), checkpoint=str(tmp_path / "step_0000009"))


def test_finalize_writes_summary_and_curves(tmp_path):
    history = [
        {"step": 3, "time": 100.0, "train/loss": 2.0, "train/images_per_s": 10.0,
         "train/data_wait_share": 0.5, "train/step_time_s": 0.4},
        {"step": 6, "time": 112.0, "train/loss": 1.0, "train/images_per_s": 20.0,
         "train/data_wait_share": 0.1, "train/step_time_s": 0.2},
        {"step": 6, "event": "resumed", "rank": 0},
        {"step": 9, "time": 130.0, "train/loss": 0.5, "train/images_per_s": 30.0,
         "train/data_wait_share": 0.0, "train/step_time_s": 0.1},
        {"step": 9, "val/mIoU": 40.0},  # evaluation entries carry no time
    ]
    summary = _finalize(tmp_path, history)
    assert summary == json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    assert summary["steps"] == 9 and summary["val"] == {"mIoU": 40.0, "majority_mIoU": 10.0}
    assert summary["val_per_class_IoU"] == {"bg": 60.0, "cat": None}  # NaN is not JSON
    cost = summary["cost"]
    assert cost["wall_time_s"] == 30.0 and cost["resumes"] == 1
    assert cost["images_per_s"] == pytest.approx(30.0)  # steady state: the later half (1 of 3)
    assert (tmp_path / report.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / report.PREDICTIONS_FILE).exists()  # no samples kept, and the
    assert "predictions" not in summary["report"]  # summary names no missing file


def test_wall_time_needs_two_timed_entries(tmp_path):
    # A run shorter than its log interval logs once: no interval to measure, never negative.
    history = [{"step": 2, "time": 50.0, "train/loss": 1.0, "train/images_per_s": 5.0},
               {"step": 2, "val/mIoU": 1.0}]
    wall = _finalize(tmp_path, history)["cost"]["wall_time_s"]
    assert wall == 0.0 and not math.copysign(1.0, wall) < 0
