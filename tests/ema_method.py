"""A small test-only teacher-student method: proves the method contract carries semi-supervised
regimes (the ``unlabeled`` stream, strong/weak views and the ``after_optimizer_step`` EMA hook)
without the engine knowing anything about it. Loaded as ``--method ema_method:EMATeacher``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodContext
from segray.augment import apply_cutmix
from segray.models import build_model


@dataclass
class EMAKnobs:
    ema_decay: float = 0.99
    threshold: float = 0.5
    unsup_weight: float = 1.0


class TeacherStudent(nn.Module):
    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


class EMATeacher:
    name: ClassVar[str] = "ema_teacher"
    Knobs: ClassVar[type] = EMAKnobs
    streams: ClassVar[tuple[str, ...]] = ("labeled", "unlabeled")
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "threshold": {"type": "uniform", "low": 0.3, "high": 0.95},
    }

    def __init__(self, knobs: EMAKnobs, ctx: MethodContext) -> None:
        self.knobs, self.ctx = knobs, ctx

    def build(self) -> nn.Module:
        m = self.ctx.model
        return TeacherStudent(build_model(encoder=m["encoder"], decoder=m["decoder"],
                                          num_classes=self.ctx.num_classes,
                                          decoder_channels=m["decoder_channels"],
                                          encoder_kwargs=m["encoder_kwargs"]))

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict:
        sup = F.cross_entropy(model(batch["image"]), batch["mask"], ignore_index=self.ctx.ignore_index)
        with torch.no_grad():
            probs = model.teacher(batch["unlabeled_weak"]).softmax(1)  # (B, K, H, W)
            conf, pseudo = probs.max(1)
            pseudo = apply_cutmix(pseudo, batch["unlabeled_cutmix_index"], batch["unlabeled_cutmix"])
            conf = apply_cutmix(conf, batch["unlabeled_cutmix_index"], batch["unlabeled_cutmix"])
            pseudo[conf < self.knobs.threshold] = self.ctx.ignore_index
        logits = model(batch["unlabeled_strong"])
        unsup = F.cross_entropy(logits, pseudo, ignore_index=self.ctx.ignore_index)
        if not torch.isfinite(unsup):  # every pixel below the threshold
            unsup = logits.sum() * 0.0
        return {"loss": sup + self.knobs.unsup_weight * unsup, "loss_sup": sup, "loss_unsup": unsup,
                "pseudo_kept": (pseudo != self.ctx.ignore_index).float().mean()}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        d = self.knobs.ema_decay
        with torch.no_grad():
            for t, s in zip(model.teacher.parameters(), model.student.parameters()):
                t.mul_(d).add_(s.detach(), alpha=1 - d)
            for t, s in zip(model.teacher.buffers(), model.student.buffers()):
                t.copy_(s)
            model.ema_updates += 1

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model.teacher(images)
