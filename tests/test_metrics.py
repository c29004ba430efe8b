"""Tests for segray.metrics: MMSegmentation's metric cases, hand-worked tables, merging, all_reduce."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.masksup.metrics import PaperMetric
from segray.evaluation import EvalResult
from segray.metrics import SegMetrics, intersect_and_union, metrics_from_state


def legacy_metrics(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int, beta=1.0):
    """Reference metrics (fractions) from a confusion matrix, rows = ground truth."""
    keep = label != ignore
    p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    cm = np.bincount(num_classes * t + p, minlength=num_classes**2).reshape(num_classes, -1)
    diag, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = diag / cols, diag / rows
        return {
            "aAcc": diag.sum() / cm.sum(),
            "Acc": diag / rows,
            "IoU": diag / (rows + cols - diag),
            "Dice": 2 * diag / (rows + cols),
            "Precision": precision,
            "Recall": recall,
            "Fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
        }


def random_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 19, size=(10, 30, 30))
    label = rng.integers(0, 19, size=(10, 30, 30))
    label[:, 2, 5:10] = 255
    return pred, label


def run(pred, label, num_classes, **kw) -> dict:
    m = SegMetrics(num_classes, ignore_index=kw.pop("ignore_index", 255))
    m.update(torch.as_tensor(pred), torch.as_tensor(label))
    return m.compute(**kw)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_matches_legacy_confusion_matrix(beta):
    pred, label = random_case()
    ref = legacy_metrics(pred, label, 19, 255, beta)
    res = run(pred, label, 19, beta=beta)
    assert res["aAcc"] == pytest.approx(ref["aAcc"] * 100, abs=1e-9)
    for key in ("IoU", "Acc", "Dice", "Precision", "Recall", "Fscore"):
        np.testing.assert_allclose(res[key], ref[key] * 100, rtol=1e-9)
        assert res["m" + key] == pytest.approx(np.nanmean(ref[key]) * 100)
    assert res["num_pixels"] == 10 * 30 * 30 - 10 * 5


def test_nan_to_num_makes_absent_classes_count():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, size=(10, 30, 30))
    label = rng.integers(0, 4, size=(10, 30, 30))
    plain = run(pred, label, 19)
    filled = run(pred, label, 19, nan_to_num=-1)
    for key in ("Acc", "IoU", "Dice", "Precision", "Recall", "Fscore"):
        assert math.isnan(plain[key][-1])
        assert filled[key][-1] == -1
    # 14 classes absent from both maps are skipped by nanmean, but counted as -1 when filled.
    iou = np.asarray(plain["IoU"])
    assert plain["mIoU"] == pytest.approx(np.nanmean(iou))
    assert filled["mIoU"] == pytest.approx((np.nansum(iou) - 14) / 19)


def test_histc_regression_59_classes():
    pred = torch.full((1, 59), 31)
    label = torch.arange(59).reshape(1, 59)
    res = run(pred, label, 59)
    assert not any(math.isnan(v) for v in res["IoU"])
    expected = [0.0] * 59
    expected[31] = 100 / 59
    np.testing.assert_allclose(res["IoU"], expected, atol=1e-12)
    assert res["aAcc"] == pytest.approx(100 / 59)


PRED = torch.tensor([[0, 1, 2], [1, 2, 0]])


def test_hand_worked_table_c5():
    res = run(PRED, torch.tensor([[0, 1, 1], [1, 2, 0]]), 5)
    nan = math.nan
    table = {
        "IoU": [1, 2 / 3, 1 / 2, nan, nan],
        "Acc": [1, 2 / 3, 1, nan, nan],
        "Dice": [1, 0.8, 2 / 3, nan, nan],
        "Precision": [1, 1, 0.5, nan, nan],
        "Recall": [1, 2 / 3, 1, nan, nan],
        "Fscore": [1, 0.8, 2 / 3, nan, nan],
    }
    for key, vals in table.items():
        np.testing.assert_allclose(res[key], np.asarray(vals) * 100, rtol=1e-12)
    means = {"mIoU": 72.22, "mAcc": 88.89, "mDice": 82.22, "mPrecision": 83.33, "mRecall": 88.89}
    for key, val in {**means, "mFscore": 82.22}.items():
        assert round(res[key], 2) == val
    assert res["aAcc"] == pytest.approx(500 / 6)
    assert res["num_pixels"] == 6


def test_ignored_pixel_gives_perfect_scores():
    res = run(PRED, torch.tensor([[0, 1, 255], [1, 2, 0]]), 5)
    assert res["IoU"][:3] == [100.0, 100.0, 100.0]
    assert res["aAcc"] == 100.0 and res["num_pixels"] == 5


def test_out_of_range_target_still_counts_prediction():
    label = torch.tensor([[0, 1, 7], [1, 2, 0]])
    state = intersect_and_union(PRED, label, 5)
    # class 2: predicted twice (once on the GT-7 pixel), labelled once, hit once.
    assert state[:, 2].tolist() == [1, 2, 2, 1]
    res = run(PRED, label, 5)
    assert res["IoU"][2] == pytest.approx(50.0)
    assert res["num_pixels"] == 5
    # The confusion-matrix convention would drop the pixel and give IoU_2 = 1.
    assert legacy_metrics(PRED.numpy(), np.where(label == 7, 255, label), 5, 255)["IoU"][2] == 1


def test_out_of_range_prediction_dropped_target_kept():
    state = intersect_and_union(torch.tensor([-1, 9, 1]), torch.tensor([0, 0, 1]), 2)
    assert state.tolist() == [[0, 1], [2, 1], [0, 1], [2, 1]]


def test_batched_equals_unbatched_and_numpy_inputs():
    pred, label = random_case(2)
    whole = SegMetrics(19)
    whole.update(torch.as_tensor(pred), torch.as_tensor(label))
    per_image = SegMetrics(19)
    for p, t in zip(pred, label):
        per_image.update(torch.as_tensor(p).to(torch.int32), torch.as_tensor(t).to(torch.uint8))
    from_numpy = SegMetrics(19)
    from_numpy.update(pred, label.astype(np.uint16))
    assert torch.equal(whole.state(), per_image.state())
    assert torch.equal(whole.state(), from_numpy.state())
    assert whole.state().dtype == torch.int64 and whole.state().shape == (4, 19)


def test_merge_halves_equals_whole_and_from_state():
    pred, label = random_case(3)
    whole = SegMetrics(19)
    whole.update(torch.as_tensor(pred), torch.as_tensor(label))
    a, b = SegMetrics(19), SegMetrics(19)
    a.update(torch.as_tensor(pred[:5]), torch.as_tensor(label[:5]))
    b.update(torch.as_tensor(pred[5:]), torch.as_tensor(label[5:]))
    assert not torch.equal(a.state(), whole.state())
    assert torch.equal(a.merge(b.state()).state(), whole.state())
    rebuilt = SegMetrics.from_state(whole.state().numpy())
    assert rebuilt.num_classes == 19
    assert rebuilt.compute()["mIoU"] == whole.compute()["mIoU"]
    assert metrics_from_state(whole.state())["aAcc"] == whole.compute()["aAcc"]
    whole.reset()
    assert int(whole.state().sum()) == 0


def test_bad_inputs_raise():
    m = SegMetrics(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="argmax"):
        m.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        m.merge(torch.zeros(4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="class_names"):
        SegMetrics(3, class_names=["a", "b"])


def test_format_table_names_every_class():
    m = SegMetrics(5, class_names=["wall", "building", "sky", "floor", "tree"])
    m.update(PRED, torch.tensor([[0, 1, 1], [1, 2, 0]]))
    table = m.format_table()
    lines = table.splitlines()
    assert "IoU" in lines[0] and "Dice" in lines[0]
    assert lines[4].startswith("| sky") and "50.00" in lines[4]
    assert "mIoU: 72.22" in table


def test_all_reduce_without_group_is_noop():
    m = SegMetrics(3)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    before = m.state()
    assert torch.equal(m.all_reduce().state(), before)


def _rank_data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    pred = torch.randint(0, 6, (2, 8, 8), generator=gen)
    label = torch.randint(0, 6, (2, 8, 8), generator=gen)
    label[:, 0] = 255
    return pred, label


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str,
                       backend: str = "gloo") -> None:
    """One rank: reduce the standard metrics and MaskSup's per-image metric as an evaluation does."""
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = EvalResult(SegMetrics(6), PaperMetric(binary=False))
        result.metrics.update(*_rank_data(rank))
        result.extra.update(*_rank_data(rank))
        result.all_reduce()
        torch.save({"metrics": result.metrics.state(), "extra": result.extra.state()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _expected_states(world: int) -> dict[str, torch.Tensor]:
    metrics, extra = SegMetrics(6), PaperMetric(binary=False)
    for rank in range(world):
        metrics.update(*_rank_data(rank))
        extra.update(*_rank_data(rank))
    return {"metrics": metrics.state(), "extra": extra.state()}


def test_all_reduce_sums_over_gloo_group(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
             join=True)
    expected = _expected_states(2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["metrics"], expected["metrics"])
        assert torch.allclose(got["extra"], expected["extra"]) and got["extra"][1] == 4


@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="needs CUDA and NCCL")
def test_all_reduce_on_an_nccl_group(tmp_path):
    """NCCL reduces only CUDA tensors: every metric state, a method's own included, must be moved
    there (a CPU tensor fails with 'No backend type associated with device type cpu')."""
    mp.spawn(_all_reduce_worker, args=(1, str(tmp_path / "init"), str(tmp_path), "nccl"),
             nprocs=1, join=True)
    got, expected = torch.load(tmp_path / "rank0.pt", weights_only=True), _expected_states(1)
    assert torch.equal(got["metrics"], expected["metrics"])
    assert torch.allclose(got["extra"], expected["extra"]) and got["extra"].device.type == "cpu"
