"""Segmentation metrics with MMSegmentation 1.x semantics, summable across workers.

The state of a metric is four per-class int64 vectors summed over every pixel seen:
``area_intersect``, ``area_union``, ``area_pred`` and ``area_label`` (rows 0-3 of
:meth:`SegMetrics.state`). Metrics are computed once from the totals (no per-image averaging),
so shards evaluated by different Ray Train workers or Ray Data tasks combine exactly by summing
their states.

Counting rules (MMSegmentation's ``intersect_and_union``):

- pixels whose target equals ``ignore_index`` are dropped entirely;
- a target outside ``[0, C)`` that is not the ignore index is dropped from ``area_label`` but the
  prediction at that pixel still counts in ``area_pred`` (and so enlarges that class's union);
- predictions outside ``[0, C)`` are dropped from ``area_pred`` (the target still counts).

Example:
    >>> m = SegMetrics(num_classes=5)
    >>> m.update(torch.tensor([[0, 1, 2], [1, 2, 0]]), torch.tensor([[0, 1, 1], [1, 2, 0]]))
    >>> round(m.compute()["mIoU"], 2)
    72.22
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STATE_ROWS = ("area_intersect", "area_union", "area_pred", "area_label")
SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall")
PER_CLASS_KEYS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")


def _as_label_tensor(x: Any, name: str) -> torch.Tensor:
    """Convert an integer array/tensor to an int64 tensor, rejecting float/bool inputs."""
    if isinstance(x, np.ndarray):
        if not (np.issubdtype(x.dtype, np.integer)):
            raise ValueError(
                f"{name} must hold integer class ids, got numpy dtype {x.dtype}; "
                "take the argmax over the class axis for predictions"
            )
        x = torch.from_numpy(x.astype(np.int64, copy=False))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class ids, got dtype {x.dtype}; "
            "take the argmax over the class axis for predictions (e.g. logits.argmax(1))"
        )
    return x.long()


def intersect_and_union(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Per-class areas of one or many label maps, summed over all pixels.

    Args:
        pred: integer predicted class ids, any shape, e.g. (B, H, W) or (H, W).
        target: integer ground-truth ids of the same shape; ``ignore_index`` pixels are skipped.
        num_classes: number of classes C.
        ignore_index: target value that is not evaluated.

    Returns:
        int64 tensor (4, C) on ``pred``'s device: intersect, union, pred and label areas.

    Raises:
        ValueError: if shapes differ or either input is not integer-typed.

    Example:
        >>> intersect_and_union(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 7]), 3)[1]
        tensor([1, 1, 1])
    """
    pred = _as_label_tensor(pred, "pred")
    target = _as_label_tensor(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {tuple(pred.shape)} and "
            f"target {tuple(target.shape)}; pass (B, H, W) or (H, W) class-id maps for both"
        )
    c = num_classes
    pred = pred.reshape(-1)  # (N,)
    target = target.to(pred.device).reshape(-1)  # (N,)
    # One bincount over a (C+2, C+1) joint table keeps every shape static (no boolean
    # indexing): pred bin C = out of range; target bin C = out of range, C+1 = ignored.
    p = torch.where((pred >= 0) & (pred < c), pred, c)
    t = torch.where((target >= 0) & (target < c), target, c)
    t = torch.where(target == ignore_index, c + 1, t)
    joint = torch.bincount(t * (c + 1) + p, minlength=(c + 2) * (c + 1))
    joint = joint.reshape(c + 2, c + 1)  # (target bin, pred bin)
    area_intersect = joint[:c, :c].diagonal()
    area_pred = joint[: c + 1, :c].sum(0)  # out-of-range targets still count their prediction
    area_label = joint[:c, :].sum(1)  # out-of-range predictions still count their target
    area_union = area_pred + area_label - area_intersect
    return torch.stack([area_intersect, area_union, area_pred, area_label])  # (4, C)


def _nanmean(values: torch.Tensor) -> float:
    valid = ~torch.isnan(values)
    return float(values[valid].mean()) if bool(valid.any()) else math.nan


def metrics_from_state(
    state: torch.Tensor, nan_to_num: float | None = None, beta: float = 1.0
) -> dict[str, Any]:
    """Metrics in percent from a (4, C) state, as MMSegmentation's ``IoUMetric`` computes them.

    Args:
        state: int64 (4, C) rows intersect, union, pred, label (see :data:`STATE_ROWS`).
        nan_to_num: if set, 0/0 entries take this value (in percent, the output's unit) before
            averaging, so they count in the means (MMSegmentation's ``nan_to_num``); otherwise
            they are NaN and skipped.
        beta: F-score beta.

    Returns:
        ``aAcc``, ``mIoU``, ``mAcc``, ``mDice``, ``mFscore``, ``mPrecision``, ``mRecall`` (floats,
        percent, not rounded), per-class lists ``IoU``, ``Acc``, ``Dice``, ``Fscore``,
        ``Precision``, ``Recall`` (percent) and ``num_pixels`` (evaluated target pixels).
        As in MMSegmentation, a class with precision = recall = 0 has a NaN F-score.
    """
    if state.ndim != 2 or state.shape[0] != 4:
        raise ValueError(f"state must have shape (4, C), got {tuple(state.shape)}")
    inter, union, area_pred, area_label = state.detach().cpu().double()
    # Tensor division turns 0/0 into NaN silently: absent classes become NaN, as in mmseg.
    precision = inter / area_pred
    recall = inter / area_label
    per_class = {
        "IoU": inter / union,
        "Acc": recall,
        "Dice": 2 * inter / (area_pred + area_label),
        "Fscore": (1 + beta**2) * precision * recall / (beta**2 * precision + recall),
        "Precision": precision,
        "Recall": recall,
    }
    a_acc = inter.sum() / area_label.sum()
    per_class = {k: v * 100 for k, v in per_class.items()}
    a_acc = a_acc * 100
    if nan_to_num is not None:
        # Substituted in the output's unit (percent), so nan_to_num=-1 reads back as -1.
        per_class = {k: torch.nan_to_num(v, nan=nan_to_num) for k, v in per_class.items()}
        a_acc = torch.nan_to_num(a_acc, nan=nan_to_num)
    out: dict[str, Any] = {"aAcc": float(a_acc)}
    for key in PER_CLASS_KEYS:
        out[f"m{key}"] = _nanmean(per_class[key])
    for key in PER_CLASS_KEYS:
        out[key] = [float(v) for v in per_class[key]]
    out["num_pixels"] = int(area_label.sum())
    return out


def all_reduce_sum(state: torch.Tensor) -> torch.Tensor:
    """``state`` summed over the default process group, on ``state``'s device.

    The sum runs where the group's backend can reduce: on the current CUDA device under NCCL
    (which reduces only CUDA tensors), on the CPU under gloo. Without a group ``state`` comes back
    as it is. Every metric state goes through here, so a method's own metric cannot pick the
    wrong device.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return state
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    buf = state.to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(state.device)


class SegMetrics:
    """Accumulates per-class areas over batches and computes mIoU, mAcc, aAcc, mDice, F-score.

    Args:
        num_classes: number of classes C.
        ignore_index: target value that is not evaluated.
        class_names: optional names in id order, used by :meth:`format_table`.

    Raises:
        ValueError: if ``num_classes`` < 1 or ``class_names`` has the wrong length.

    Example:
        >>> m = SegMetrics(3)
        >>> m.update(torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 4, 4, dtype=torch.long))
        >>> m.state().shape, m.compute()["aAcc"]
        (torch.Size([4, 3]), 100.0)
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but num_classes is {num_classes}; "
                "pass one name per class id"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        """Zero the accumulated areas."""
        self._state = torch.zeros(4, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add a batch (B, H, W) or a single map (H, W) of predicted and target class ids.

        Args:
            pred: integer predicted class ids (take ``argmax(1)`` of logits first).
            target: integer target ids of the same shape; may live on another device.

        Raises:
            ValueError: on a shape mismatch or a float/bool dtype.
        """
        areas = intersect_and_union(pred, target, self.num_classes, self.ignore_index)
        # The accumulator follows the data so GPU evaluation does not copy per batch.
        self._state = self._state.to(areas.device) + areas

    def state(self) -> torch.Tensor:
        """The accumulated areas as a CPU int64 (4, C) tensor (rows: :data:`STATE_ROWS`)."""
        return self._state.detach().cpu().clone()

    def merge(self, other: torch.Tensor | np.ndarray | SegMetrics) -> SegMetrics:
        """Add another shard's state (a (4, C) tensor/array or a :class:`SegMetrics`).

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: if the other state's shape or dtype does not fit.
        """
        if isinstance(other, SegMetrics):
            if other.ignore_index != self.ignore_index:
                raise ValueError(
                    f"cannot merge metrics with ignore_index {other.ignore_index} into "
                    f"metrics with ignore_index {self.ignore_index}"
                )
            other = other.state()
        other_t = torch.as_tensor(other)
        if other_t.dtype.is_floating_point or other_t.dtype.is_complex:
            raise ValueError(f"state must be integer-typed, got dtype {other_t.dtype}")
        if tuple(other_t.shape) != (4, self.num_classes):
            raise ValueError(
                f"state must have shape (4, {self.num_classes}), got {tuple(other_t.shape)}"
            )
        self._state = self._state + other_t.to(self._state.device, torch.int64)
        return self

    @classmethod
    def from_state(
        cls,
        state: torch.Tensor | np.ndarray,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> SegMetrics:
        """Rebuild metrics from a (4, C) state, e.g. one summed by a Ray Data reduce step."""
        state_t = torch.as_tensor(state)
        if state_t.ndim != 2 or state_t.shape[0] != 4:
            raise ValueError(f"state must have shape (4, C), got {tuple(state_t.shape)}")
        metrics = cls(state_t.shape[1], ignore_index=ignore_index, class_names=class_names)
        return metrics.merge(state_t)

    def all_reduce(self) -> SegMetrics:
        """Sum the state over all ranks of the default process group (no-op without one).

        Call it once per evaluation, on every rank, before :meth:`compute`; calling it twice
        would count every shard again.

        Returns:
            ``self``, for chaining.
        """
        self._state = all_reduce_sum(self._state)
        return self

    def compute(self, nan_to_num: float | None = None, beta: float = 1.0) -> dict[str, Any]:
        """Metrics in percent from the accumulated areas; see :func:`metrics_from_state`."""
        return metrics_from_state(self._state, nan_to_num=nan_to_num, beta=beta)

    def format_table(self, digits: int = 2) -> str:
        """A plain-text per-class table (IoU, Acc, Dice, Fscore, Precision, Recall in percent).

        Args:
            digits: decimals shown.

        Returns:
            The table followed by a summary line, e.g. ``| road | 97.10 | ...``.
        """
        res = self.compute()
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        header = ["Class", *PER_CLASS_KEYS]
        rows = [
            [name, *(f"{res[k][i]:.{digits}f}" for k in PER_CLASS_KEYS)]
            for i, name in enumerate(names)
        ]
        widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]

        def line(cells: list[str]) -> str:
            padded = [cells[0].ljust(widths[0])]
            padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "| " + " | ".join(padded) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        summary = "  ".join(f"{k}: {res[k]:.{digits}f}" for k in SUMMARY_KEYS)
        return "\n".join([line(header), sep, *(line(r) for r in rows), "", summary])
