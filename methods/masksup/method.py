"""MaskSup (Zunair & Hamza, BMVC 2022): supervise a masked view of every image as well.

Each step runs the same network twice, as two separate calls (so BatchNorm normalises the clean
and the masked batch separately and updates its running statistics twice, as the official code
does): on the clean images and on a copy whose random holes are filled with ``fill`` in
normalised space (0 = the mean, mid-grey). Both predictions are supervised with the full ground
truth, including hidden pixels, and a consistency term ties them together (see
:mod:`methods.masksup.losses`). Inference uses the clean branch only.

Knobs (defaults are the paper's):

- ``arch``: ``levit_unet_384`` (GLaS/polyps, 224x224 inputs only), ``unetpp`` (NYUDv2), ``unet``;
  ``width``: base filters of unetpp/unet (32); ``drop_path``: LeViT stochastic depth (0.1);
  ``reinit_stem_conv1``: re-initialise LeViT's first conv after loading weights (None: yes when
  ``model.pretrained`` is set, as the official loader never maps it).
- ``binary``: one sigmoid logit + BCE (None: when the dataset has 2 classes). ``predict`` then
  returns ``cat([0, logit])`` so argmax equals sigmoid > 0.5.
- ``holes``: ``freeform`` (brush strokes standing in for the NVIDIA irregular masks) or
  ``patches`` (MAE-style squares of ``patch_size``, an extension); ``hole_ratio_range``: hidden
  fraction of freeform masks ([0.5, 0.6], the "heavy" bucket); ``mask_ratio``: the one knob sweeps
  tune — patches: fraction of patches hidden; freeform: centre of the range (None: as given);
  ``fill``: value of hidden pixels, normalised.
- ``alpha``, ``beta``, ``gamma``: weights of the clean, masked and consistency terms (1, 1, 1);
  ``consistency``: ``softmax_mse`` or ``argmax`` (the official NYUDv2 form, no gradient);
  ``stop_gradient``: the consistency branch that is detached (``none``, as the official code;
  ``clean``; ``masked``).
- ``trainer``: the three official trainers of the paper's ablation: ``cb_ts`` (MaskSup: clean +
  masked + consistency, default), ``cb`` (clean + masked, no consistency term; it is still
  logged) and ``base`` (the clean image only: one forward pass, so BatchNorm never sees a masked
  batch and ``alpha`` alone weighs the loss).
- ``mask_prob``: the chance that a sample of the batch is masked (1.0: every sample, every step,
  as the official code); unmasked samples enter the masked pass clean.
- ``void_to_class``: the class that void pixels (the ignore index) count as in the losses and in
  the paper metric (None: ignored). The official NYUDv2 code maps void (255) to class 0 and has no
  ignore index, and its reported 39.31 counts them, so the ``nyudv2_unetpp`` preset sets 0; the
  engine's confusion-matrix mIoU always ignores void.
- ``predict_size``: [H, W] images are resized to (aspect ratio not kept, as the official code)
  before the network and logits resized back (LeViT: always 224x224; others: None = as given).
- ``paper_metric_size``: [H, W] the paper metric is scored at, as the official code: the network's
  prediction for the image squashed to this size, against ground truth resized the official way
  (default [224, 224]; None: at each image's own size, like the engine's mIoU).
- ``seed``: hole masks of step ``s`` on rank ``r`` come from a generator seeded with
  ``(seed, s, r)``, so runs are reproducible.

Metrics: besides the engine's confusion-matrix mIoU, :meth:`MaskSup.make_eval_metric` gives the
number the paper reports, ``paper_fg_iou_mean_per_image`` (binary) or
``paper_micro_jaccard_mean_per_image`` (multi-class): per-image averages that are **not** a
class-mean IoU (see :mod:`methods.masksup.metrics`).

Example:
    >>> from methods.base import MethodContext
    >>> ctx = MethodContext(num_classes=4, crop_size=(64, 64))
    >>> method = MaskSup(MaskSupKnobs(arch="unet", width=8), ctx)
    >>> model = method.build()
    >>> batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 4, (2, 64, 64))}
    >>> sorted(method.training_step(model, batch, step=0))
    ['hole_ratio', 'loss', 'loss_clean', 'loss_consistency', 'loss_masked']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from methods.base import MethodContext
from methods.masksup.holes import HOLE_KINDS, mask_images, random_holes
from methods.masksup.losses import CONSISTENCY, STOP_GRADIENT, masksup_loss, supervised_loss
from methods.masksup.metrics import PaperMetric
from methods.masksup.models import ARCHS, LeViTUNet384, build_model

TRAINERS = ("cb_ts", "cb", "base")


@dataclass
class MaskSupKnobs:
    """MaskSup's knobs with the paper's defaults (see the module docstring).

    Raises:
        ValueError: listing every knob outside its allowed values, at construction, so
            :func:`segray.config.resolve` refuses a bad value before a run starts. Checks that
            need the dataset or the crop size run in :class:`MaskSup` instead.
    """

    arch: Literal["levit_unet_384", "unetpp", "unet"] = "levit_unet_384"
    width: int = 32
    drop_path: float = 0.1
    reinit_stem_conv1: bool | None = None
    binary: bool | None = None
    holes: Literal["freeform", "patches"] = "freeform"
    mask_ratio: float | None = None
    hole_ratio_range: list[float] = field(default_factory=lambda: [0.5, 0.6])
    patch_size: int = 16
    fill: float = 0.0
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    consistency: Literal["softmax_mse", "argmax"] = "softmax_mse"
    stop_gradient: Literal["none", "clean", "masked"] = "none"
    trainer: Literal["cb_ts", "cb", "base"] = "cb_ts"
    mask_prob: float = 1.0
    void_to_class: int | None = None
    predict_size: list[int] | None = None
    paper_metric_size: list[int] | None = field(default_factory=lambda: [224, 224])
    seed: int = 0

    def __post_init__(self) -> None:
        errors = knob_errors(vars(self))
        if errors:
            raise ValueError("invalid masksup knobs: " + "; ".join(errors))


def _real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _size(v: Any) -> bool:
    """``[H, W]``: two integers >= 1."""
    return isinstance(v, list | tuple) and len(v) == 2 and all(_integer(x) and x >= 1 for x in v)


def knob_errors(k: Mapping[str, Any]) -> list[str]:
    """Every knob value outside what MaskSup accepts, whatever the dataset (one message each).

    Args:
        k: knob name -> value, every field of :class:`MaskSupKnobs` present.

    Returns:
        One message per problem naming the knob, the value and the allowed values (empty if valid).

    Example:
        >>> knob_errors({**vars(MaskSupKnobs()), "mask_ratio": 1.5})
        ['mask_ratio must be in [0, 1] or null, got 1.5']
    """
    errors = []
    for name, allowed in (("arch", ARCHS), ("holes", HOLE_KINDS), ("consistency", CONSISTENCY),
                          ("stop_gradient", STOP_GRADIENT), ("trainer", TRAINERS)):
        if k[name] not in allowed:
            errors.append(f"{name} {k[name]!r} is not one of {allowed}")
    for name in ("width", "patch_size"):
        if not (_integer(k[name]) and k[name] >= 1):
            errors.append(f"{name} must be an integer >= 1, got {k[name]!r}")
    if not (_real(k["drop_path"]) and 0.0 <= k["drop_path"] <= 1.0):
        errors.append(f"drop_path must be in [0, 1], got {k['drop_path']!r}")
    ratio = k["mask_ratio"]
    if ratio is not None and not (_real(ratio) and 0.0 <= ratio <= 1.0):
        errors.append(f"mask_ratio must be in [0, 1] or null, got {ratio!r}")
    ratios = k["hole_ratio_range"]
    if not (isinstance(ratios, list | tuple) and len(ratios) == 2 and all(map(_real, ratios))
            and 0.0 <= ratios[0] <= ratios[1] <= 1.0):
        errors.append(f"hole_ratio_range must be [low, high] with 0 <= low <= high <= 1, got "
                      f"{ratios!r} (e.g. [0.5, 0.6], the heavy NVIDIA bucket)")
    if not (_real(k["mask_prob"]) and 0.0 <= k["mask_prob"] <= 1.0):
        errors.append(f"mask_prob must be in [0, 1], got {k['mask_prob']!r}")
    void = k["void_to_class"]
    if void is not None and not (_integer(void) and void >= 0):
        errors.append(f"void_to_class must be a class id >= 0 or null, got {void!r}")
    if k["predict_size"] is not None and not _size(k["predict_size"]):
        errors.append(f"predict_size must be [H, W] (both >= 1) or null, got {k['predict_size']!r}")
    elif (k["arch"] == "levit_unet_384" and k["predict_size"] is not None
          and tuple(k["predict_size"]) != LeViTUNet384.input_size):
        errors.append(f"arch levit_unet_384 predicts at 224x224, got predict_size "
                      f"{k['predict_size']}; leave predict_size null")
    if k["paper_metric_size"] is not None and not _size(k["paper_metric_size"]):
        errors.append(f"paper_metric_size must be [H, W] (both >= 1) or null, got "
                      f"{k['paper_metric_size']!r}")
    if not (_integer(k["seed"]) and k["seed"] >= 0):
        errors.append(f"seed must be an integer >= 0, got {k['seed']!r}")
    return errors


def _context_errors(k: Mapping[str, Any], ctx: MethodContext) -> list[str]:
    """Knob values the run's dataset (class count) or crop size rule out."""
    errors = []
    if k["binary"] and ctx.num_classes != 2:
        errors.append(
            f"binary is true but the dataset has {ctx.num_classes} classes; binary needs 2 "
            "(background, foreground) — set binary to null or false"
        )
    void = k["void_to_class"]
    if _integer(void) and void >= ctx.num_classes:  # a negative id is a knob_errors problem
        errors.append(f"void_to_class must be a class id in [0, {ctx.num_classes}) or null, got "
                      f"{void}")
    if k["arch"] == "levit_unet_384" and tuple(ctx.crop_size) != LeViTUNet384.input_size:
        errors.append(
            f"arch levit_unet_384 needs 224x224 training crops, got crop_size "
            f"{list(ctx.crop_size)}; set data.crop_size=[224,224] or use arch unet/unetpp"
        )
    return errors


class MaskSup:
    """The MaskSup method (see the module docstring for the algorithm and knobs).

    Args:
        knobs: a :class:`MaskSupKnobs` or a mapping of its fields.
        ctx: what the run tells the method (classes, ignore index, crop size, model section).

    Raises:
        KeyError: on an unknown knob name.
        ValueError: listing every invalid knob value at once.
    """

    name: ClassVar[str] = "masksup"
    Knobs: ClassVar[type] = MaskSupKnobs
    streams: ClassVar[tuple[str, ...]] = ("labeled",)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "holes": {"type": "choice", "values": ["freeform", "patches"]},
        "mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.75},
        "patch_size": {"type": "choice", "values": [8, 16, 32]},
        "alpha": {"type": "uniform", "low": 0.2, "high": 1.0},
        "beta": {"type": "uniform", "low": 0.2, "high": 1.0},
        "gamma": {"type": "uniform", "low": 0.0, "high": 1.0},
    }

    @staticmethod
    def pretrained_expected(knobs: MaskSupKnobs) -> bool:
        """Only LeViT starts from ImageNet weights; the official U-Net++ trains from scratch."""
        return knobs.arch == "levit_unet_384"

    def __init__(self, knobs: MaskSupKnobs | Mapping[str, Any], ctx: MethodContext) -> None:
        if isinstance(knobs, Mapping):
            fields = dataclasses.fields(MaskSupKnobs)
            unknown = sorted(set(knobs) - {f.name for f in fields})
            if unknown:
                raise KeyError(f"unknown masksup knobs {unknown}; known knobs: "
                               f"{sorted(f.name for f in fields)}")
            # Checked before MaskSupKnobs(...) so that its errors and the dataset's come together.
            values = {f.name: f.default if f.default_factory is dataclasses.MISSING
                      else f.default_factory() for f in fields} | dict(knobs)
        else:
            values = vars(knobs)  # checked again: a knobs object may have been changed since
        errors = knob_errors(values) + _context_errors(values, ctx)
        if errors:
            raise ValueError("invalid masksup knobs:\n  - " + "\n  - ".join(errors))
        if isinstance(knobs, Mapping):
            knobs = MaskSupKnobs(**knobs)
        self.knobs = knobs
        self.ctx = ctx
        self.binary = bool(knobs.binary) if knobs.binary is not None else ctx.num_classes == 2
        self.num_outputs = 1 if self.binary else ctx.num_classes
        if knobs.arch == "levit_unet_384":
            self.predict_size: tuple[int, int] | None = LeViTUNet384.input_size
        else:
            self.predict_size = tuple(knobs.predict_size) if knobs.predict_size else None

    def build(self) -> nn.Module:
        """The network named by ``arch``, with ``num_outputs`` channels (1 for binary tasks).

        LeViT weights come from ``model.pretrained`` of the run config (local file or ``s3://``
        URI of a timm ``levit_384`` state dict); MaskSup ignores ``model.encoder``/``decoder``.
        """
        k = self.knobs
        return build_model(
            k.arch,
            self.num_outputs,
            width=k.width,
            drop_path=k.drop_path,
            pretrained=str(self.ctx.model.get("pretrained") or ""),
            reinit_stem_conv1=k.reinit_stem_conv1,
        )

    def _generator(self, step: int) -> torch.Generator:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = np.random.SeedSequence([int(self.knobs.seed), int(step), rank]).generate_state(
            1, np.uint64
        )[0]
        return torch.Generator().manual_seed(int(seed))

    def training_step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> dict[str, torch.Tensor]:
        """Two forward passes (clean, masked) and the MaskSup loss (one pass for ``base``).

        Args:
            model: the network from :meth:`build`.
            batch: ``image`` float (B, 3, H, W) normalised, ``mask`` int64 (B, H, W).
            step: optimizer step, seeds the hole masks.

        Returns:
            ``loss``, ``loss_clean``, ``loss_masked``, ``loss_consistency`` and ``hole_ratio``
            (the hidden fraction of this batch's masks); ``trainer: base`` gives ``loss`` and
            ``loss_clean`` only.
        """
        k = self.knobs
        images, target = batch["image"], batch["mask"]
        if k.void_to_class is not None:
            target = target.masked_fill(target == self.ctx.ignore_index, int(k.void_to_class))
        if k.trainer == "base":
            loss_clean = supervised_loss(model(images), target, binary=self.binary,
                                         ignore_index=self.ctx.ignore_index)
            return {"loss": k.alpha * loss_clean, "loss_clean": loss_clean.detach()}
        b, _, h, w = images.shape
        generator = self._generator(step)
        holes = random_holes(
            b,
            h,
            w,
            kind=k.holes,
            mask_ratio=k.mask_ratio,
            patch_size=k.patch_size,
            ratio_range=k.hole_ratio_range,
            generator=generator,
            device=images.device,
        )  # (B, 1, H, W)
        if k.mask_prob < 1.0:
            chosen = torch.rand(b, generator=generator) < k.mask_prob
            holes = holes * chosen.to(holes.device, holes.dtype).view(b, 1, 1, 1)
        masked = mask_images(images, holes, fill=k.fill)
        # Two calls, not one concatenated batch: BatchNorm must see each view on its own.
        clean_logits = model(images)
        masked_logits = model(masked)
        out = masksup_loss(
            clean_logits,
            masked_logits,
            target,
            alpha=k.alpha,
            beta=k.beta,
            gamma=0.0 if k.trainer == "cb" else k.gamma,
            binary=self.binary,
            consistency=k.consistency,
            ignore_index=self.ctx.ignore_index,
            stop_gradient=k.stop_gradient,
        )
        out["hole_ratio"] = holes.mean()
        return out

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) of the clean branch at the resolution of ``images``.

        With a ``predict_size`` (always for LeViT) images are resized to it, aspect ratio not
        kept as in the official code, and the logits resized back. Binary tasks return
        ``cat([zeros, logit])``, so ``argmax(1)`` is ``sigmoid(logit) > 0.5``.
        """
        size = tuple(images.shape[-2:])
        x = images
        if self.predict_size is not None and size != self.predict_size:
            x = F.interpolate(
                images, size=self.predict_size, mode="bilinear", align_corners=False, antialias=True
            )
        logits = model(x)
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.binary:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=1)  # (B, 2, H, W)
        return logits

    def make_eval_metric(self) -> PaperMetric:
        """The paper's per-image metric, reported beside the engine's mIoU."""
        size = self.knobs.paper_metric_size
        return PaperMetric(binary=self.binary, ignore_index=self.ctx.ignore_index,
                           void_to_class=self.knobs.void_to_class,
                           score_size=tuple(int(v) for v in size) if size else None)
