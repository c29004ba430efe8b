"""Side-by-side throughput measurements (ratios taken in one run, never timed assertions).

``train``: the platform's :class:`~segray.engine.StepRunner` against a bare PyTorch loop on the same
model, batch and data. Both do the same work per step — normalise, random horizontal flip, the
method's ``training_step``, backward, optimizer and scheduler step — so the ratio is the cost of the
platform's machinery (Kornia augmentation, hooks, logging). Rounds alternate A/B to cancel drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from segray.config import Config
from segray.engine import StepRunner, build_method
from segray.optim import build_optimizer
from segray.runtime import resolve_runtime, seed_everything


class _SyntheticInfo:
    """Dataset facts for a benchmark on procedurally generated scenes."""

    def __init__(self) -> None:
        from segray.data.synthetic import CLASSES

        self.classes = list(CLASSES)
        self.num_classes = len(self.classes)
        self.ignore_index = 255


def synthetic_batches(n: int, batch: int, crop: tuple[int, int], seed: int = 0) -> list[dict]:
    """``n`` raw uint8 batches of synthetic scenes at the crop size (decoded once, kept in memory)."""
    from segray.data.synthetic import render_scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        images, masks = zip(*(render_scene(rng, crop[0], crop[1]) for _ in range(batch)))
        out.append({
            "image": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            "mask": torch.from_numpy(np.stack(masks).astype(np.int64)),
        })
    return out


def _bare_loop(method: Any, model: torch.nn.Module, opt: Any, sched: Any, cfg: Config, runtime: Any,
               batches: list, steps: int) -> float:
    """A hand-written training loop: what a researcher would write without a platform."""
    if steps < 1:  # nothing to time (and no loss to wait for)
        return 0.0
    mean = torch.tensor(cfg.augment.mean, device=runtime.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.augment.std, device=runtime.device).view(1, 3, 1, 1)
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        raw = batches[i % len(batches)]
        image = (raw["image"].to(runtime.device).float() - mean) / std
        mask = raw["mask"].to(runtime.device)
        flip = torch.rand(image.shape[0], device=image.device) < cfg.augment.hflip
        image = torch.where(flip.view(-1, 1, 1, 1), image.flip(-1), image)
        mask = torch.where(flip.view(-1, 1, 1), mask.flip(-1), mask)
        with runtime.autocast():
            loss = method.training_step(model, {"image": image, "mask": mask}, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    float(loss)
    _sync(runtime.device)
    return time.perf_counter() - start


def _platform_loop(runner: StepRunner, batches: list, steps: int) -> float:
    if steps < 1:
        return 0.0
    start = time.perf_counter()
    for i in range(steps):
        raw = batches[i % len(batches)]
        logs = runner.step({k: v.to(runner.runtime.device) for k, v in raw.items()})
    float(logs["loss"])  # like the bare loop, wait for the last step to finish
    _sync(runner.runtime.device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg: Config, *, steps: int = 20, warmup: int = 3, rounds: int = 3,
                device: torch.device | None = None) -> dict[str, Any]:
    """Measure images/s of the platform step vs a bare loop, alternating rounds.

    Args:
        cfg: resolved run config (its photometric augmentation is switched off so both loops do
            the same work; flip probability is kept).
        steps: timed steps per round.
        warmup: untimed steps before the first round of each loop.
        rounds: A/B rounds; the median of each side is reported.
        device: CPU by default, CUDA when given.

    Returns:
        ``{"platform_images_per_s", "bare_images_per_s", "ratio", ...}``.

    Raises:
        ValueError: ``steps`` or ``rounds`` below 1, ``warmup`` below 0.
    """
    if steps < 1 or rounds < 1 or warmup < 0:
        raise ValueError(f"bench_train needs steps >= 1, rounds >= 1 and warmup >= 0, got "
                         f"steps={steps}, rounds={rounds}, warmup={warmup}")
    device = device or torch.device("cpu")
    cfg.augment.photometric = False
    runtime = resolve_runtime(device, cfg.train.precision, cfg.train.channels_last)
    info = _SyntheticInfo()
    batch = cfg.data.batch_size
    batches = synthetic_batches(4, batch, tuple(cfg.data.crop_size), cfg.seed)

    def fresh():
        seed_everything(cfg.seed)
        method = build_method(cfg, info)
        model = method.build().to(device)
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return method, model

    method_a, model_a = fresh()
    runner = StepRunner(method_a, model_a, cfg, runtime, info.ignore_index)
    method_b, model_b = fresh()
    bare_args = (method_b, model_b, *build_optimizer(model_b, cfg.optim, cfg.train.steps), cfg,
                 runtime, batches)
    _platform_loop(runner, batches, warmup)
    _bare_loop(*bare_args, warmup)
    plat, bare = [], []
    for _ in range(rounds):
        plat.append(batch * steps / _platform_loop(runner, batches, steps))
        bare.append(batch * steps / _bare_loop(*bare_args, steps))
    p, b = statistics.median(plat), statistics.median(bare)
    return {
        "method": cfg.method, "preset": cfg.preset, "device": str(device),
        "precision": runtime.precision, "batch": batch, "crop": list(cfg.data.crop_size),
        "steps_per_round": steps, "rounds": rounds,
        "platform_images_per_s": p, "bare_images_per_s": b, "ratio": p / b,
        "platform_rounds": plat, "bare_rounds": bare,
    }
