"""Semantic checks of a run config that types alone cannot express (:func:`check`).

:func:`segray.config.resolve` runs them after every value has its type; ``jobs/evaluate.py`` runs
them again after applying its flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from segray.config import Config


def check(cfg: Config) -> list[str]:
    """Semantic checks that types alone cannot express: every number within what a run can use,
    settings that need or exclude each other, and a precision the configured device supports.

    Args:
        cfg: a config whose values already have the right types.

    Returns:
        One message per problem, naming the key, the value and what is expected (empty if valid).
    """
    e: list[str] = []
    d, m, o, a, t, ev = cfg.data, cfg.model, cfg.optim, cfg.augment, cfg.train, cfg.eval

    def pair(name: str, v: list | None, allow_none: bool = False) -> None:
        if v is None:
            if not allow_none:
                e.append(f"{name}: expected two positive integers [h, w]")
            return
        if len(v) != 2 or any(x <= 0 for x in v):
            e.append(f"{name}: expected two positive integers [h, w], got {v}")

    def at_least(name: str, v: float, low: float, meaning: str = "") -> None:
        if v < low:
            e.append(f"{name}: must be >= {low}{meaning}, got {v}")

    def within(name: str, v: float, low: float, high: float, meaning: str = "") -> None:
        if not low <= v <= high:
            e.append(f"{name}: must be in [{low}, {high}]{meaning}, got {v}")

    pair("data.crop_size", d.crop_size)
    pair("data.base_scale", d.base_scale, allow_none=True)
    pair("data.resize", d.resize, allow_none=True)
    if d.base_scale and d.resize:
        e.append("data.resize and data.base_scale exclude each other: resize sets the exact size "
                 "(aspect not kept), base_scale a size to fit keeping the aspect; set one to null")
    pair("eval.test_scale", ev.test_scale, allow_none=True)
    pair("eval.crop", ev.crop, allow_none=True)
    pair("eval.stride", ev.stride, allow_none=True)
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        e.append(f"data.scale_range: expected [low, high] with 0 < low <= high, got {d.scale_range}")
    if d.scale_choices is not None and (not d.scale_choices or min(d.scale_choices) <= 0):
        e.append(f"data.scale_choices: expected a non-empty list of ratios > 0, or null for "
                 f"data.scale_range, got {d.scale_choices}")
    if not 0 < d.cat_max_ratio <= 1:
        e.append(f"data.cat_max_ratio: must be in (0, 1] (1 = off), got {d.cat_max_ratio}")
    for name, split in [("data.train_split", d.train_split), ("data.val_split", d.val_split),
                        ("data.unlabeled_split", d.unlabeled_split)]:
        if not split.strip():
            e.append(f"{name}: must name a split of the dataset, got {split!r}")
    if ev.mode == "slide" and not (ev.crop and ev.stride):
        e.append("eval.mode: 'slide' needs eval.crop and eval.stride, e.g. [512, 512] and [341, 341]")
    if (ev.crop and ev.stride and len(ev.crop) == len(ev.stride) == 2
            and any(s > c for s, c in zip(ev.stride, ev.crop))):
        e.append(f"eval.stride: must be <= eval.crop in both directions (windows must overlap or "
                 f"touch to cover the image), got stride {ev.stride} for crop {ev.crop}")
    if ev.tta and not ev.ratios:
        e.append("eval.ratios: eval.tta needs at least one ratio, e.g. [0.5, 1.0, 1.5]; or set "
                 "eval.tta=false")
    if ev.ratios and min(ev.ratios) <= 0:
        e.append(f"eval.ratios: every ratio must be > 0, got {ev.ratios}")
    for name, v in [("data.batch_size", d.batch_size), ("data.eval_batch_size", d.eval_batch_size),
                    ("train.steps", t.steps), ("train.log_every", t.log_every),
                    ("workers", cfg.workers), ("model.decoder_channels", m.decoder_channels)]:
        if v < 1:
            e.append(f"{name}: must be >= 1, got {v}")
    if t.eval_every < 0:
        e.append(f"train.eval_every: must be >= 0 (0 = only at the end), got {t.eval_every}")
    at_least("data.prefetch_batches", d.prefetch_batches, 0)
    at_least("data.rows_per_execution", d.rows_per_execution, 0, " (0 = the whole run)")
    at_least("data.shuffle_buffer", d.shuffle_buffer, 0, " rows (0 = no local shuffle)")
    at_least("train.keep_checkpoints", t.keep_checkpoints, 0, " (0 = keep all)")
    at_least("train.max_failures", t.max_failures, -1, " (-1 = retry without limit)")
    at_least("train.eval_max_images", t.eval_max_images, 0, " (0 = the whole split)")
    at_least("train.report_images", t.report_images, 0)
    if d.batch_size % max(cfg.workers, 1):
        e.append(f"data.batch_size: the global batch {d.batch_size} must divide evenly over "
                 f"{cfg.workers} workers")
    if o.lr <= 0:
        e.append(f"optim.lr: must be > 0, got {o.lr}")
    at_least("optim.weight_decay", o.weight_decay, 0)
    within("optim.momentum", o.momentum, 0, 1)
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        e.append(f"optim.betas: expected two values in [0, 1), got {o.betas}")
    at_least("optim.poly_power", o.poly_power, 0)
    at_least("optim.min_lr", o.min_lr, 0)
    at_least("optim.warmup_steps", o.warmup_steps, 0)
    within("optim.warmup_ratio", o.warmup_ratio, 0, 1, " (of optim.lr at step 0)")
    at_least("optim.step_size", o.step_size, 0)
    if o.step_gamma <= 0:
        e.append(f"optim.step_gamma: must be > 0, got {o.step_gamma}")
    at_least("optim.grad_clip", o.grad_clip, 0, " (0 = off)")
    if o.schedule == "step" and o.step_size < 1:
        e.append("optim.step_size: schedule 'step' needs step_size >= 1 (in optimizer steps)")
    if len(a.mean) != 3 or len(a.std) != 3 or min(a.std) <= 0:
        e.append("augment.mean/std: expected three values each, std > 0")
    within("augment.hflip", a.hflip, 0, 1, " (a probability)")
    if cfg.gpus_per_worker < 0:
        e.append(f"gpus_per_worker: must be >= 0, got {cfg.gpus_per_worker}")
    at_least("cpus_per_worker", cfg.cpus_per_worker, 0)
    within("seed", cfg.seed, 0, 2**32 - 1, " (NumPy's and Optuna's seed range)")
    if t.precision == "fp16" and cfg.gpus_per_worker == 0:
        e.append("train.precision: 'fp16' needs a CUDA device, but gpus_per_worker is 0 (CPU "
                 "workers); use 'bf16', 'fp32' or 'auto' on CPU, or pass --gpus-per-worker 1")
    return e
