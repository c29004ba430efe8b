"""The run report: ``metrics.jsonl``, curves and prediction-grid PNGs, and ``summary.json``; and
what stopped a run that no retry can mend: ``data_error.json`` (a bad row or shard) and
``diverged.json`` (the loss or weights became NaN or infinite).

Every file is written atomically into the run folder (local or ``s3://``), so a reader never sees a
half-written report.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any

import numpy as np

from segray import storage
from segray.data.decode import BadSampleError
from segray.data.manifest import DatasetError

HISTORY_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "curves.png"
PREDICTIONS_FILE = "predictions.png"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "weights.json"
DATA_ERROR_FILE = "data_error.json"
DIVERGED_FILE = "diverged.json"


def write_history(run_uri: str, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` with the whole history (one JSON object per line)."""
    lines = "".join(json.dumps(_clean(h)) + "\n" for h in history)
    storage.write_text(storage.join(run_uri, HISTORY_FILE), lines)


def write_data_error(run_uri: str, error: BadSampleError | DatasetError) -> None:
    """Record the bad data a worker met while streaming (``data_error.json``): a bad row (shard,
    key, reason) or a bad shard (the :class:`DatasetError`'s message, which names it)."""
    record = ({"shard": error.shard, "key": error.key, "reason": error.reason}
              if isinstance(error, BadSampleError)
              else {"dataset_error": str(error), "fix": getattr(error, "fix", None)})
    storage.write_text(storage.join(run_uri, DATA_ERROR_FILE), json.dumps(record) + "\n")


def read_data_error(run_uri: str) -> BadSampleError | DatasetError | None:
    """The recorded bad row or shard, or None if the run met none."""
    try:
        record = json.loads(storage.read_text(storage.join(run_uri, DATA_ERROR_FILE)))
    except FileNotFoundError:
        return None
    if "dataset_error" in record:
        return DatasetError(record["dataset_error"], fix=record.get("fix"))
    return BadSampleError(record["shard"], record["key"], record["reason"])


def data_error_advice(error: BadSampleError | DatasetError, resume: str,
                      skip: str = "add --set data.on_bad_sample=skip") -> str:
    """What to do about recorded bad data: ``resume`` says how to continue once it is fixed,
    ``skip`` how to skip such rows instead.

    A bad row can be skipped; a shard that differs from its manifest cannot, so its dataset must
    be re-created, unless the error names another fix.
    """
    if isinstance(error, BadSampleError):
        return (f"fix the row (re-create the dataset) and {resume}, or {skip} to skip and count "
                "such rows")
    return f"{getattr(error, 'fix', None) or 're-create the dataset'} and {resume}"


def clear_data_error(run_uri: str) -> None:
    """Forget recorded bad data (a new attempt may read fixed data, or skip bad rows)."""
    storage.delete(storage.join(run_uri, DATA_ERROR_FILE))


def write_divergence(run_uri: str, step: int, message: str) -> None:
    """Record that training diverged at ``step`` (``diverged.json``), with the worker's message."""
    record = {"step": int(step), "message": message}
    storage.write_text(storage.join(run_uri, DIVERGED_FILE), json.dumps(record) + "\n")


def read_divergence(run_uri: str) -> dict[str, Any] | None:
    """The recorded divergence (``{"step", "message"}``), or None if the run has not diverged."""
    try:
        return json.loads(storage.read_text(storage.join(run_uri, DIVERGED_FILE)))
    except FileNotFoundError:
        return None


def clear_divergence(run_uri: str) -> None:
    """Forget a recorded divergence (a new attempt may use a lower learning rate)."""
    storage.delete(storage.join(run_uri, DIVERGED_FILE))


def _best(history: list[dict[str, Any]], run_uri: str) -> dict[str, Any] | None:
    """The evaluation with the highest mIoU: its step, mIoU and checkpoint (which checkpoint
    pruning keeps, see :func:`segray.launch.build_trainer`)."""
    evals = [h for h in history if isinstance(h.get("val/mIoU"), float)
             and not math.isnan(h["val/mIoU"])]
    if not evals:
        return None
    from segray.checkpoint import checkpoint_name

    best = max(evals, key=lambda h: h["val/mIoU"])  # the earliest of equals
    return {"step": best["step"], "mIoU": best["val/mIoU"],
            "checkpoint": storage.join(run_uri, checkpoint_name(best["step"]))}


def finished(run_uri: str, steps: Any) -> bool:
    """Whether the run's ``summary.json`` is that of a run of ``steps`` steps (a run extended
    since, and not yet through, has only the summary of its shorter self)."""
    try:
        return read_summary(run_uri).get("steps") == steps
    except FileNotFoundError:
        return False


def read_summary(run_uri: str) -> dict[str, Any]:
    """Read a finished run's ``summary.json``."""
    return json.loads(storage.read_text(storage.join(run_uri, SUMMARY_FILE)))


def write_weights_provenance(run_uri: str, model: Any) -> None:
    """Save where pretrained weights came from (file, sha256, new/dropped keys) as ``weights.json``.

    Models record it as ``model.pretrained_report`` (a dataclass or dict) when built from a file.
    """
    rep = getattr(model, "pretrained_report", None)
    if rep is None:
        return
    data = dataclasses.asdict(rep) if dataclasses.is_dataclass(rep) else dict(rep)
    storage.write_text(storage.join(run_uri, WEIGHTS_FILE), json.dumps(json_safe(data), indent=2))


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` back (empty when the run has none yet)."""
    uri = storage.join(run_uri, HISTORY_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _clean(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in entry.items()}


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    """PNG of training loss, learning rate, throughput and validation mIoU against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train/loss", "training loss"), ("val/mIoU", "validation mIoU (%)"),
              ("train/lr", "learning rate"), ("train/images_per_s", "images / s")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(h["step"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, markersize=3)
        if key == "val/mIoU":
            base = [(h["step"], h["val/majority_mIoU"]) for h in history
                    if h.get("val/majority_mIoU") is not None]
            if base:
                ax.plot(*zip(*base), linestyle="--", color="grey", label="majority class")
                ax.legend(loc="lower right")
        for h in history:
            if h.get("event") == "resumed":
                ax.axvline(h["step"], color="red", alpha=0.3, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def colorize(mask: np.ndarray, palette: list[list[int]], ignore_index: int = 255) -> np.ndarray:
    """Map a class-id map (H, W) to RGB (H, W, 3) with the dataset palette; ignore is white."""
    lut = np.full((max(256, len(palette) + 1), 3), 255, dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    out = lut[np.clip(mask, 0, len(lut) - 1)]
    out[mask == ignore_index] = 255
    return out


def prediction_grid(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: list[list[int]],
    ignore_index: int = 255,
) -> bytes:
    """PNG grid: one row per sample with image, ground truth, prediction and overlay."""
    from PIL import Image

    rows = []
    for image, target, pred in samples:
        h, w = target.shape
        gt, pr = colorize(target, palette, ignore_index), colorize(pred, palette, ignore_index)
        overlay = (0.5 * image[:h, :w].astype(np.float32) + 0.5 * pr).astype(np.uint8)
        rows.append(np.concatenate([image[:h, :w], gt, pr, overlay], axis=1))  # (H, 4W, 3)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 256 // max(grid.shape[0] // len(rows), 1))
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def finalize(
    cfg: Any, info: Any, run_uri: str, history: list[dict[str, Any]], metrics: dict[str, Any],
    result: Any, checkpoint: str,
) -> dict[str, Any]:
    """Write curves, prediction grid and ``summary.json``; return the summary."""
    train_entries = [h for h in history if "train/images_per_s" in h]
    tail = train_entries[-max(1, len(train_entries) // 2):]  # steady state: skip warm-up logs
    per_class = dict(zip(info.classes, metrics.get("val/IoU", [])))
    summary = {
        "method": cfg.method,
        "preset": cfg.preset,
        "name": cfg.name,
        "run": run_uri,
        "dataset": info.uri,
        "steps": history[-1]["step"] if history else 0,
        "checkpoint": checkpoint,
        "best": _best(history, run_uri),
        "val": {k[4:]: v for k, v in metrics.items() if k.startswith("val/") and k != "val/IoU"},
        "val_per_class_IoU": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                              for k, v in per_class.items()},
        "cost": {
            "images_per_s": _mean(tail, "train/images_per_s"),
            "data_wait_share": _mean(tail, "train/data_wait_share"),
            "step_time_s": _mean(tail, "train/step_time_s"),
            "peak_gpu_mem_gb": max((h.get("train/gpu_mem_gb", 0.0) for h in history), default=0.0),
            "wall_time_s": _wall_time(history),
            "resumes": sum(1 for h in history if h.get("event") == "resumed"),
        },
        "bad_samples_skipped": int(metrics.get("data/bad_samples_skipped", 0)),
        "report": {
            "curves": storage.join(run_uri, CURVES_FILE),
            "metrics": storage.join(run_uri, HISTORY_FILE),
            "config": storage.join(run_uri, CONFIG_FILE),
        },
    }
    storage.write_bytes(storage.join(run_uri, CURVES_FILE), plot_curves(history))
    if result.samples:  # the summary names the grid only when there is one
        summary["report"]["predictions"] = storage.join(run_uri, PREDICTIONS_FILE)
        storage.write_bytes(summary["report"]["predictions"],
                            prediction_grid(result.samples, info.palette, info.ignore_index))
    storage.write_text(storage.join(run_uri, SUMMARY_FILE),
                       json.dumps(json_safe(summary), indent=2))
    return summary


def _wall_time(history: list[dict[str, Any]]) -> float:
    """Seconds between the first and the last timed log entry (0 with fewer than two)."""
    times = [h["time"] for h in history if isinstance(h.get("time"), int | float)]
    return max(times) - min(times) if len(times) > 1 else 0.0


def _mean(entries: list[dict[str, Any]], key: str) -> float | None:
    vals = [e[key] for e in entries if isinstance(e.get(key), int | float)]
    return float(np.mean(vals)) if vals else None


def json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
