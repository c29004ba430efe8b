"""The method contract: the one interface between a method's algorithm and the shared engine.

A method is a class with the attributes and methods of :class:`Method`. The engine builds it with
``MethodClass(knobs, ctx)`` and never looks inside: it only calls the members below. Every method's
whole algorithm (model, losses, pseudo-labels, hooks) lives in its own module of ``methods/``.

Batches handed to :meth:`Method.training_step` are dicts of tensors already on the device and
already augmented by :mod:`segray.augment`:

- ``image``: float (B, 3, H, W), normalised; ``mask``: int64 (B, H, W), ignore = 255
  (stream ``labeled``);
- ``image_labels``: float (B, K) multi-hot image-level labels (every stream carries them);
- ``unlabeled_weak`` / ``unlabeled_strong``: float (B, 3, H, W) two views of the same unlabelled
  images (stream ``unlabeled``), plus ``unlabeled_cutmix`` (B, H, W) bool where the strong view
  holds pixels pasted from another image of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

STREAMS = ("labeled", "unlabeled", "image_labels", "pseudo")


@dataclass
class MethodContext:
    """What a method may know about the run it is part of.

    Attributes:
        num_classes: number of classes of the dataset (from its manifest).
        ignore_index: label value that is never supervised (from the manifest, 255 by default).
        class_names: class names in id order.
        crop_size: (H, W) of training crops.
        model: the ``model`` section of the resolved config, as a plain dict.
        total_steps: optimizer steps the run will take.
    """

    num_classes: int
    ignore_index: int = 255
    class_names: list[str] = field(default_factory=list)
    crop_size: tuple[int, int] = (64, 64)
    model: dict[str, Any] = field(default_factory=dict)
    total_steps: int = 1


@runtime_checkable
class Method(Protocol):
    """What every method module exposes (see the module docstring for the batch layout).

    Attributes:
        name: registry name, as typed on the command line.
        Knobs: dataclass of the method's knobs with the paper's defaults.
        streams: data streams the method consumes, a subset of :data:`STREAMS`.
        search_space: default Tune space over knobs, ``{knob: {"type": "uniform", "low": .., ...}}``
            with types ``uniform``, ``loguniform``, ``int``, ``choice`` (``values``).
    """

    name: ClassVar[str]
    Knobs: ClassVar[type]
    streams: ClassVar[tuple[str, ...]]
    search_space: ClassVar[dict[str, dict[str, Any]]]

    def __init__(self, knobs: Any, ctx: MethodContext) -> None: ...

    def build(self) -> nn.Module:
        """Build the trainable module (a teacher-student pair is one module)."""
        ...

    def training_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        """Named losses (must contain ``loss``, the one to back-propagate) and logged scalars."""
        ...

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) at the resolution of ``images`` (B, 3, H, W), normalised."""
        ...


def call_hook(method: Any, hook: str, *args: Any, **kwargs: Any) -> Any:
    """Call an optional hook (``after_optimizer_step``, ``on_epoch_end``) if the method has it.

    Hooks: ``after_optimizer_step(model, step)`` runs after every optimizer step (EMA teachers);
    ``on_epoch_end(model, epoch)`` runs after each pass over the labelled stream (cyclic pseudo-masks);
    ``param_groups(model, base)`` may return optimizer parameter groups instead of the engine's default.
    """
    fn = getattr(method, hook, None)
    return fn(*args, **kwargs) if callable(fn) else None
