"""Optimizers and learning-rate schedules, counted in optimizer steps (MMSegmentation semantics).

Example:
    >>> model = torch.nn.Linear(2, 2)
    >>> opt, sched = build_optimizer(model, OptimConfig(lr=0.1, warmup_steps=0), total_steps=10)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from segray.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a no-decay group (names matching ``cfg.no_decay``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(key in name for key in cfg.no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr after ``step`` optimizer steps.

    ``poly``: ``(1 - step/total) ** power`` decaying to ``min_lr``; ``step``: × ``step_gamma`` every
    ``step_size`` steps; ``constant``: 1. A linear warm-up (mmcv rule) scales the result by
    ``1 - (1 - step/warmup) * (1 - warmup_ratio)`` during the first ``warmup_steps``.
    """
    if cfg.schedule == "poly":
        progress = min(step, total) / max(total, 1)
        min_factor = cfg.min_lr / cfg.lr
        factor = (1.0 - min_factor) * (1.0 - progress) ** cfg.poly_power + min_factor
    elif cfg.schedule == "step":
        factor = cfg.step_gamma ** (step // cfg.step_size)
    else:
        factor = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor *= 1.0 - (1.0 - step / cfg.warmup_steps) * (1.0 - cfg.warmup_ratio)
    return factor


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    total_steps: int,
    groups: list[dict[str, Any]] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Build the optimizer and its per-step scheduler.

    Args:
        model: the module to optimise.
        cfg: the ``optim`` config section.
        total_steps: optimizer steps of the whole run (for poly decay).
        groups: parameter groups from a method's ``param_groups`` hook; default :func:`param_groups`.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after each ``optimizer.step()``.
    """
    groups = groups if groups is not None else param_groups(model, cfg)
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                               weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
    return opt, sched


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm when ``max_norm > 0``; returns the norm (NaN when not clipped)."""
    if max_norm <= 0:
        return math.nan
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def lr_change(old: dict[str, Any], cfg: Any, step: int) -> str | None:
    """What resuming at ``step`` does to the learning rate when settings it depends on changed,
    or None when it stays (within 1 %). A poly schedule is recomputed over the new
    ``train.steps``, so extending a run raises its learning rate again from where it had
    decayed to."""
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    try:
        before = OptimConfig(**{k: v for k, v in (old.get("optim") or {}).items() if k in fields})
        total = int((old.get("train") or {}).get("steps", cfg.train.steps))
        was = before.lr * lr_factor(step, total, before)
    except (TypeError, ValueError, ZeroDivisionError):  # a config from another segray: say nothing
        return None
    now = cfg.optim.lr * lr_factor(step, cfg.train.steps, cfg.optim)
    if abs(now - was) <= 0.01 * max(abs(was), abs(now)):
        return None
    why = (f"the {cfg.optim.schedule} schedule now spans {cfg.train.steps} steps, not {total}"
           if total != cfg.train.steps and cfg.optim.schedule == "poly" else
           "its optim settings changed")
    return (f"the learning rate at step {step}, where the run resumes, goes from {was:.3g} to "
            f"{now:.3g} ({why})")
