"""Evaluate a method's model on full-size images: whole, sliding-window or ms+flip TTA.

Used by the training engine (periodic validation, rows sharded over workers) and by
``jobs/evaluate.py``. Rows are dicts with ``image`` uint8 (H, W, 3) and ``mask`` (H, W) arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segray import storage
from segray.augment import normalize
from segray.config import EvalConfig
from segray.inference import segment
from segray.metrics import SegMetrics, all_reduce_sum


@dataclass
class EvalResult:
    """Metrics of one evaluation plus what the report needs.

    Attributes:
        metrics: the standard confusion-matrix metrics (MMSegmentation 1.x semantics).
        extra: a method's own metric object (e.g. a paper's per-image metric), or ``None``.
        samples: up to ``keep`` (image, target, prediction) uint8 arrays for the report.
        images: number of images evaluated here.
    """

    metrics: SegMetrics
    extra: Any = None
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    images: int = 0

    def all_reduce(self) -> EvalResult:
        """Sum every metric state over the process group (no-op without one).

        A method's own metric needs only ``state()``, ``reset()`` and ``merge(state)``; the sum
        runs on the device the group's backend reduces on (:func:`segray.metrics.all_reduce_sum`).
        """
        self.metrics.all_reduce()
        if self.extra is not None:
            state = all_reduce_sum(self.extra.state().to(torch.float64))
            self.extra.reset()
            self.extra.merge(state)
        return self

    def summary(self) -> dict[str, Any]:
        """Flat dict: ``val/mIoU``, ``val/mAcc``... plus ``val/majority_mIoU`` and extra metrics."""
        m = self.metrics.compute()
        out = {f"val/{k}": float(m[k]) for k in ("mIoU", "mAcc", "aAcc", "mDice")}
        out["val/IoU"] = [float(v) for v in m["IoU"]]
        out["val/majority_mIoU"] = majority_miou(self.metrics.state())
        if self.extra is not None:
            out.update({f"val/{k}": float(v) for k, v in self.extra.compute().items()})
        return out


def evaluate(
    method: Any,
    model: torch.nn.Module,
    rows: Iterable[dict[str, np.ndarray]],
    *,
    num_classes: int,
    ignore_index: int,
    eval_cfg: EvalConfig,
    mean: list[float],
    std: list[float],
    device: torch.device,
    autocast: Any = None,
    keep: int = 0,
    max_images: int | None = None,
) -> EvalResult:
    """Segment every row and accumulate metrics (no all-reduce; call :meth:`EvalResult.all_reduce`).

    A method's own metric (``method.make_eval_metric()``) gets the same predictions as the
    engine's, or, when it has a ``score_size`` (H, W), a prediction of the image squashed to that
    size (bilinear, antialiased; one more forward pass, without TTA, sliding or ``test_scale``)
    and the full-size target, which it resizes itself: MaskSup's paper metric is scored this way
    at 224x224, as the official code scores it.

    Args:
        method: the method object (its ``predict`` turns normalised images into logits).
        model: the trained module, switched to eval mode here and back to train mode after.
        rows: full-size samples, ``image`` uint8 (H, W, 3) and ``mask`` (H, W).
        num_classes: K.
        ignore_index: label value excluded from metrics.
        eval_cfg: inference mode (whole / slide), test scale and TTA.
        mean: normalisation mean (0-255 scale).
        std: normalisation std.
        device: where to run.
        autocast: optional context-manager factory for mixed precision.
        keep: how many samples to keep for the report's prediction grid.
        max_images: evaluate at most this many images (None = all; 0 = none, for a worker whose
            share of a capped evaluation is empty).

    Returns:
        The accumulated :class:`EvalResult`.
    """
    metrics = SegMetrics(num_classes, ignore_index)
    maker = getattr(method, "make_eval_metric", None)
    extra = maker() if callable(maker) else None
    extra_size = getattr(extra, "score_size", None)
    result = EvalResult(metrics, extra)
    was_training = model.training
    model.eval()

    def predict_fn(x: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return method.predict(model, x).float()
        with autocast():
            return method.predict(model, x).float()

    try:
        with torch.no_grad():
            for row in rows:
                if max_images is not None and result.images >= max_images:
                    break
                image = torch.as_tensor(np.ascontiguousarray(row["image"]), device=device)
                image = image.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) uint8
                target = torch.as_tensor(np.asarray(row["mask"]).astype(np.int64), device=device)
                x = normalize(image, mean, std)
                probs = segment(
                    predict_fn, x, num_classes=num_classes,
                    mode=eval_cfg.mode,
                    crop=tuple(eval_cfg.crop) if eval_cfg.crop else None,
                    stride=tuple(eval_cfg.stride) if eval_cfg.stride else None,
                    tta=eval_cfg.tta, ratios=tuple(eval_cfg.ratios), flip=eval_cfg.flip,
                    test_scale=tuple(eval_cfg.test_scale) if eval_cfg.test_scale else None,
                )
                pred = probs.argmax(1)[0]  # (H, W)
                metrics.update(pred, target)
                if extra is not None and extra_size is not None:
                    # Scored at its own size: the image squashed to it, predicted once more.
                    small = F.interpolate(x, size=extra_size, mode="bilinear",
                                          align_corners=False, antialias=True)
                    extra.update(predict_fn(small).argmax(1), target[None])
                elif extra is not None:
                    extra.update(pred[None], target[None])
                if len(result.samples) < keep:
                    result.samples.append((
                        np.asarray(row["image"], dtype=np.uint8),
                        np.asarray(row["mask"]).astype(np.int64),
                        pred.cpu().numpy().astype(np.int64),
                    ))
                result.images += 1
    finally:
        model.train(was_training)
    return result


def majority_miou(state: torch.Tensor) -> float:
    """mIoU (percent) of predicting the most frequent target class at every evaluated pixel.

    Derived exactly from a metric state (4, C): that class gets IoU = its pixels / all pixels, every
    other class present in the targets gets 0, absent classes are NaN and skipped.
    """
    area_label = state[3].to(torch.float64)  # (C,)
    total = float(area_label.sum())
    if total == 0:
        return float("nan")
    major = int(area_label.argmax())
    iou = torch.where(area_label > 0, torch.zeros_like(area_label), torch.full_like(area_label, float("nan")))
    iou[major] = area_label[major] / total
    return float(torch.nanmean(iou) * 100)


def load_for_eval(checkpoint: str, data_uri: str | None = None) -> tuple[Any, Any, Any, Any]:
    """Rebuild method, model (weights loaded with ``weights_only=True``), config and dataset.

    Raises:
        FileNotFoundError: no checkpoint or dataset at the given URI.
    """
    from methods import get_method
    from segray.checkpoint import load_meta, load_state
    from segray.config import resolve
    from segray.data import ensure_synthetic, open_dataset
    from segray.engine import build_method

    state = load_state(checkpoint)
    meta = load_meta(checkpoint)
    raw = dict(meta["config"])
    method_name = raw.pop("method")
    cfg = resolve(raw, get_method(method_name).Knobs, method_name, source=f"{checkpoint}/meta.json")
    uri = data_uri or cfg.data.uri or ensure_synthetic()
    info = open_dataset(uri)
    if data_uri and cfg.data.uri and storage.absolute(data_uri) != cfg.data.uri:
        _check_classes(checkpoint, cfg.data.uri, info)
    method = build_method(cfg, info)
    model = method.build()
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes differ: another number of classes, as a rule
        raise ValueError(
            f"checkpoint {checkpoint} does not fit dataset {info.uri} ({info.num_classes} "
            f"classes): {str(e).splitlines()[-1].strip()}; pass the dataset it was trained on "
            f"({cfg.data.uri or 'see its meta.json'}) or one with the same classes") from None
    return method, model, cfg, info


def _check_classes(checkpoint: str, trained_on: str, info: Any) -> None:
    """Refuse a dataset whose classes differ from those of the one a checkpoint was trained on
    (when that one can still be read): the scores would be of other classes, silently."""
    from segray.data import DatasetError, open_dataset

    try:
        trained = open_dataset(trained_on).classes
    except (FileNotFoundError, DatasetError, OSError):
        return  # moved or gone: the model's shape is the check left
    if list(trained) != list(info.classes):
        raise ValueError(
            f"checkpoint {checkpoint} was trained on {trained_on} with classes "
            f"{_names(trained)}, but {info.uri} has {_names(info.classes)}; evaluate on a "
            "dataset with the same classes in the same order")


def _names(classes: list[str]) -> str:
    shown = ", ".join(classes[:6])
    return f"[{shown}{', ...' if len(classes) > 6 else ''}] ({len(classes)})"


def run_evaluation(method: Any, model: torch.nn.Module, cfg: Any, info: Any, split: str, out: str,
                   *, max_images: int = 0, keep: int = 8) -> dict[str, Any]:
    """Evaluate on one split in this process and write ``metrics.json`` + ``overlays.png`` to ``out``.

    The split is checked first as the training streams check it
    (:func:`~segray.data.preflight.check_split`: columns present, keys unique across the
    dataset, shards as the manifest records them), then every row as in training
    (:func:`~segray.data.decode.validate_sample`). Evaluation never skips a row: it would score
    a different set of images. The files are written once the rows are evaluated, so bad data
    leaves ``out`` as it was, and ``metrics.json`` is written last. ``overlays.png`` is removed
    when no image is kept (``keep=0``), so it never shows an earlier evaluation.

    Raises:
        BadSampleError: a key of the split occurs twice in the dataset, or a row is unlabelled,
            undecodable, of mismatched size or has labels outside the dataset's classes (names
            shard and key).
        DatasetError: a shard lacks a column the evaluation reads (``key``, ``image``,
            ``mask``), or differs from the manifest (names it).
        FileNotFoundError: a shard is missing (names it).
    """
    import json

    from segray import report, storage
    from segray.data import iter_rows
    from segray.data.decode import BadSampleError, validate_sample
    from segray.data.preflight import check_split
    from segray.runtime import default_device, resolve_runtime

    check_split(info, split, ["key", "image", "mask"])  # reported before any image is scored
    device = default_device()
    runtime = resolve_runtime(device, cfg.train.precision, "off")
    model.to(device)

    def rows():
        for row in iter_rows(info, split, with_shard=True):
            if row.get("mask") is None:
                raise BadSampleError(row["shard"], row["key"], "no mask: evaluation needs "
                                                               "labelled rows")
            image, mask = validate_sample(
                row["image"], row["mask"], num_classes=info.num_classes,
                ignore_index=info.ignore_index, shard=row["shard"], key=row["key"],
                height=row.get("height"), width=row.get("width"))
            yield {"image": image, "mask": mask}

    result = evaluate(method, model, rows(), num_classes=info.num_classes,
                      ignore_index=info.ignore_index, eval_cfg=cfg.eval, mean=cfg.augment.mean,
                      std=cfg.augment.std, device=device, autocast=runtime.autocast, keep=keep,
                      max_images=max_images or None)
    metrics = result.summary()
    summary = {"split": split, "dataset": info.uri, "images": result.images,
               "eval": {"mode": cfg.eval.mode, "tta": cfg.eval.tta},
               "metrics": {k[4:]: v for k, v in metrics.items()},
               "per_class": dict(zip(info.classes, metrics["val/IoU"]))}
    # metrics.json last, so it is there only with its overlays; an earlier evaluation's overlays
    # in the same folder would not match it.
    overlays = storage.join(out, "overlays.png")
    if result.samples:
        storage.write_bytes(overlays, report.prediction_grid(result.samples, info.palette,
                                                             info.ignore_index))
    else:
        storage.delete(overlays)
    storage.write_text(storage.join(out, "metrics.json"),
                       json.dumps(report.json_safe(summary), indent=2))
    return summary
