"""Supervised baseline: plain cross-entropy on labelled crops — the yardstick for every method.

Example:
    >>> from methods.base import MethodContext
    >>> m = Supervised(SupervisedKnobs(), MethodContext(num_classes=3, model={"encoder": "resnet18"}))
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodContext
from segray.models import build_model


@dataclass
class SupervisedKnobs:
    """Knobs of the baseline.

    Attributes:
        label_smoothing: cross-entropy label smoothing in [0, 1] (0 = off, as in MMSegmentation).

    Raises:
        ValueError: on a value outside its range, at construction, so
            :func:`segray.config.resolve` refuses it before a run starts.
    """

    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        v = self.label_smoothing
        # The range F.cross_entropy accepts; checked here, not first in the training workers.
        if not (isinstance(v, Real) and not isinstance(v, bool) and 0.0 <= v <= 1.0):
            raise ValueError(f"invalid supervised knobs: label_smoothing must be in [0, 1] "
                             f"(0 = off), got {v!r}")


class Supervised:
    """Encoder-decoder trained with cross-entropy (ignore index from the manifest)."""

    name: ClassVar[str] = "supervised"
    Knobs: ClassVar[type] = SupervisedKnobs
    streams: ClassVar[tuple[str, ...]] = ("labeled",)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "label_smoothing": {"type": "uniform", "low": 0.0, "high": 0.2},
    }

    def __init__(self, knobs: SupervisedKnobs, ctx: MethodContext) -> None:
        self.knobs = knobs
        self.ctx = ctx

    def build(self) -> nn.Module:
        m = self.ctx.model
        return build_model(
            encoder=m.get("encoder", "resnet18"),
            decoder=m.get("decoder", "fpn"),
            num_classes=self.ctx.num_classes,
            decoder_channels=m.get("decoder_channels", 128),
            pretrained=m.get("pretrained") or None,
            encoder_kwargs=m.get("encoder_kwargs") or {},
        )

    def training_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        logits = model(batch["image"])  # (B, K, H, W)
        loss = F.cross_entropy(
            logits.float(), batch["mask"], ignore_index=self.ctx.ignore_index,
            label_smoothing=self.knobs.label_smoothing,
        )
        return {"loss": loss}

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)
