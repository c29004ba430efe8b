"""The shared training loop: plain-PyTorch step logic plus the Ray Train worker around it.

:class:`StepRunner` is one optimizer step (augment → ``method.training_step`` → backward → step →
hooks) and runs without Ray, so a benchmark or a debugging session needs only torch, timm and kornia.
:func:`train_loop_per_worker` is what ``TorchTrainer`` runs on every worker: dataset shards, periodic
evaluation, checkpoints, metrics and the run report. The engine never names a method.

Gradients are averaged across workers with one bucketed ``all_reduce`` after ``backward`` instead of
``DistributedDataParallel``: methods call their module several times per step (MaskSup's two passes,
teacher and student), which DDP's reducer rejects, and the explicit reduction keeps them all correct.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from methods import MethodContext, call_hook, get_method
from segray.augment import StrongWeakAugment, TrainAugment
from segray.checkpoint import checkpoint_name, write_local
from segray.config import Config, to_dict
from segray.optim import build_optimizer, clip_gradients
from segray.runtime import Runtime, resolve_runtime, seed_everything


def method_context(cfg: Config, info: Any) -> MethodContext:
    """What the method is told about the run."""
    return MethodContext(
        num_classes=info.num_classes,
        ignore_index=info.ignore_index,
        class_names=list(info.classes),
        crop_size=tuple(cfg.data.crop_size),
        model=to_dict(cfg)["model"],
        total_steps=cfg.train.steps,
    )


def build_method(cfg: Config, info: Any) -> Any:
    """Instantiate the configured method with its knobs."""
    return get_method(cfg.method)(cfg.knobs, method_context(cfg, info))


def average_gradients(model: nn.Module, world_size: int, bucket_mb: float = 25.0) -> None:
    """Average ``.grad`` of every parameter across the process group, in flat buckets."""
    if world_size <= 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= limit):
            flat = torch.cat([b.reshape(-1) for b in bucket])  # (sum numel,)
            dist.all_reduce(flat)
            flat /= world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset: offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


class StepRunner:
    """One training step of any method, in plain PyTorch.

    Args:
        method: the method object.
        model: its module, already on ``runtime.device``.
        cfg: the resolved config.
        runtime: device and numerics.
        ignore_index: label value for padded / ignored pixels.
        world_size: number of workers whose gradients are averaged.

    Example:
        >>> runner = StepRunner(method, model, cfg, resolve_runtime(torch.device("cpu")), 255)
        >>> logs = runner.step({"image": uint8_bchw, "mask": int64_bhw, "image_labels": f_bk})
    """

    def __init__(
        self, method: Any, model: nn.Module, cfg: Config, runtime: Runtime, ignore_index: int,
        world_size: int = 1,
    ) -> None:
        self.method, self.model, self.cfg, self.runtime = method, model, cfg, runtime
        self.world_size = world_size
        a = cfg.augment
        self.augment = TrainAugment(a.mean, a.std, hflip=a.hflip, photometric=a.photometric,
                                    ignore_index=ignore_index).to(runtime.device)
        self.strong_weak = StrongWeakAugment(a.mean, a.std, hflip=a.hflip).to(runtime.device)
        base = {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay,
                "no_decay": list(cfg.optim.no_decay)}
        groups = call_hook(method, "param_groups", model, base)
        self.optimizer, self.scheduler = build_optimizer(model, cfg.optim, cfg.train.steps, groups)
        if runtime.autocast_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(runtime.device.type)
        else:
            self.scaler = None
        self.step_count = 0

    def prepare(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Augment a raw uint8 batch on the device into what ``training_step`` receives."""
        batch: dict[str, torch.Tensor] = {}
        fmt = torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        if "image" in raw:
            image, mask = self.augment(raw["image"], raw["mask"], raw.get("valid"))
            batch["image"] = image.contiguous(memory_format=fmt)
            batch["mask"] = mask.long()  # narrow on the way here (see TrainCollate)
        if "image_labels" in raw:
            batch["image_labels"] = raw["image_labels"]
        if "unlabeled_image" in raw:
            views = self.strong_weak(raw["unlabeled_image"])
            batch["unlabeled_weak"] = views["weak"].contiguous(memory_format=fmt)
            batch["unlabeled_strong"] = views["strong"].contiguous(memory_format=fmt)
            batch["unlabeled_cutmix_index"] = views["cutmix_index"]
            batch["unlabeled_cutmix"] = views["cutmix_box"]
        return batch

    def step(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """Run one optimizer step on a raw batch.

        Returns the method's logged values as detached tensors plus ``lr``; turn them into
        floats with :func:`to_floats` only when logging, so a GPU is never synchronised per step.
        """
        batch = self.prepare(raw)
        self.model.train()
        with self.runtime.autocast():
            out = self.method.training_step(self.model, batch, self.step_count)
        if "loss" not in out:
            raise KeyError(f"{type(self.method).__name__}.training_step must return a 'loss' entry; "
                           f"got {sorted(out)}")
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        average_gradients(self.model, self.world_size)
        grad_norm = clip_gradients(self.model, self.cfg.optim.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        call_hook(self.method, "after_optimizer_step", self.model, self.step_count)
        logs: dict[str, torch.Tensor | float] = {
            k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        if not math.isnan(grad_norm):
            logs["grad_norm"] = grad_norm
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's state; this config's optimizer settings win over the saved ones.

        The saved optimizer and scheduler state carry the learning rate, weight decay, betas or
        momentum the run was started with. A resume that changes them (which
        :func:`segray.launch.check_resume` allows) gets them applied, on the restored moments and
        step count, with the schedule's factor at that step.
        """
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        for group, settings in zip(self.optimizer.param_groups, fresh, strict=True):
            group.update(settings)
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        lrs = [base * factor(self.scheduler.last_epoch) for base, factor in
               zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def nonfinite_tensors(self) -> list[str]:
        """Names of the model's parameters and buffers holding NaN or infinite values."""
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        floats = [(n, t) for n, t in tensors if t.is_floating_point()]
        if not floats:
            return []
        finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()  # one sync
        return [n for (n, _), ok in zip(floats, finite.tolist()) if not ok]


class Diverged(FloatingPointError):
    """Training diverged: the loss or the weights became NaN or infinite by ``step``.

    Not a failure a retry can mend: a retry restores the last checkpoint and replays the same
    batches, so the run stops instead of retrying (see :mod:`segray.worker`).
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles a worker's exception
        return type(self), (str(self), self.step)


DIVERGED_FIX = "lower optim.lr or set optim.grad_clip"


def to_floats(logs: dict[str, torch.Tensor | float], step: int) -> dict[str, float]:
    """Logged values as floats (one device sync); a non-finite loss is an error here.

    Raises:
        Diverged: the loss is NaN or infinite, with what to try.
    """
    out = {k: float(v) for k, v in logs.items()}
    if not math.isfinite(out["loss"]):
        raise Diverged(f"the loss became {out['loss']} at step {step}; {DIVERGED_FIX}", step)
    return out


def endless(make_iter: Any, name: str, skips: Any = None,
            batch: tuple[int, int] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(epoch, batch)`` forever by re-creating an epoch iterator.

    Args:
        make_iter: returns one epoch's iterator.
        name: the stream's name, for errors.
        skips: the run's :class:`~segray.data.SkipCounter` under ``data.on_bad_sample=skip``.
        batch: ``(workers, per-worker batch size)``, for errors.

    Raises:
        DatasetError: an epoch yielded no batch: the rows left after skipping bad ones (named
            with the first of them) or the split's rows are too few for one batch per worker.
    """
    from segray.data import DatasetError

    epoch = 0
    while True:
        n = 0
        for item in make_iter():
            n += 1
            yield epoch, item
        if n == 0:
            need = f" ({batch[0]} x {batch[1]})" if batch else ""
            skipped = skips.total if skips is not None else 0
            if skipped:
                first = skips.records()[0]
                raise DatasetError(
                    f"the '{name}' stream yielded no batch for this worker: {skipped} bad rows "
                    f"were skipped (data.on_bad_sample=skip; the first: key {first['key']!r} "
                    f"in shard {first['shard']}: {first['reason']}) and too few are left for "
                    f"one batch per worker{need}",
                    fix="fix or remove the bad rows (re-create the dataset)")
            raise DatasetError(
                f"the '{name}' stream yielded no batch for this worker: its split has fewer "
                f"rows than workers x per-worker batch size{need}", fix="lower data.batch_size")
        epoch += 1


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point of every Ray Train worker (see :mod:`segray.worker` for the loop body)."""
    from segray.worker import run_worker

    return run_worker(loop_config)


def setup_worker(cfg: Config, info: Any, device: torch.device, world: int) -> tuple[Any, StepRunner]:
    """Build method, model and step runner identically on every rank."""
    runtime = resolve_runtime(device, cfg.train.precision, cfg.train.channels_last)
    seed_everything(cfg.seed)  # identical initialisation on every rank
    method = build_method(cfg, info)
    model = method.build().to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    broadcast_parameters(model)
    return method, StepRunner(method, model, cfg, runtime, info.ignore_index, world)


def save_checkpoint(runner: StepRunner, cfg: Config, history: list[dict[str, Any]]) -> str:
    """Write a checkpoint folder locally (rank 0) and return its path for ``ray.train.report``."""
    state = runner.state_dict()
    state["history"] = history
    meta = {"method": cfg.method, "preset": cfg.preset, "step": runner.step_count,
            "config": to_dict(cfg), "name": checkpoint_name(runner.step_count)}
    return write_local(state, meta)


