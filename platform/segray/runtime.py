"""Run-time choices made from what the machine has: device, precision, channels_last, DDP backend.

Defaults work on one CPU (gloo, fp32) and pick nccl, bf16 autocast and channels_last on CUDA.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Runtime:
    """Resolved numerics for a device.

    Attributes:
        device: where the model and batches live.
        autocast_dtype: dtype of ``torch.autocast`` (``None`` = full fp32).
        channels_last: whether to use NHWC memory format.
    """

    device: torch.device
    autocast_dtype: torch.dtype | None
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for the forward pass (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def resolve_runtime(device: torch.device, precision: str = "auto", channels_last: str = "auto") -> Runtime:
    """Pick autocast dtype and memory format for ``device``.

    Args:
        device: the worker's device.
        precision: ``auto`` (bf16 on CUDA with bf16 support, else fp32), ``fp32``, ``bf16``, ``fp16``.
        channels_last: ``auto`` (on for CUDA), ``on`` or ``off``.

    Raises:
        ValueError: fp16 requested on CPU, where autocast has no fp16 kernels worth using.
    """
    cuda = device.type == "cuda"
    if precision == "auto":
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    elif precision == "fp32":
        dtype = None
    elif precision == "bf16":
        dtype = torch.bfloat16
    elif precision == "fp16":
        if not cuda:
            raise ValueError("train.precision: 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        dtype = torch.float16
    else:
        raise ValueError(f"train.precision: unknown value {precision!r} (auto, fp32, bf16, fp16)")
    cl = cuda if channels_last == "auto" else channels_last == "on"
    return Runtime(device=device, autocast_dtype=dtype, channels_last=cl)


def default_device() -> torch.device:
    """CUDA when present, else CPU (used outside Ray Train)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads(per_worker_cpus: float) -> None:
    """Limit intra-op threads to the CPUs a worker was given, so workers do not fight for cores."""
    n = max(1, int(per_worker_cpus))
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(n)
