"""SeMask-FPN as a segray method: knobs, the SeMask losses and the method class.

The model is a SeMask Swin backbone (semantic layers inside each Swin stage, see
:mod:`methods.semask.backbone`) with the Semantic-FPN head (:mod:`methods.semask.head`). Training
minimises ``CE(seg) + prior_weight * CE(P)`` where ``P`` is the sum of the four stages' semantic-prior
logits, both maps bilinearly upsampled to the label size.

Faithfulness to the official SeMask-FPN code (mmseg 0.11):

- Kept by default: the CE reduction divides by ALL pixels of the batch, ignored ones included
  (``loss_mean_over_all_pixels=True``; OHEM-dropped pixels also stay in the denominator). This
  changes the effective loss scale, so it affects reported numbers; set the knob to False for the
  modern mean over supervised pixels.
- Not reproduced (bugs): the COCO-Stuff configs left the backbone's class count at 150 against
  171 head classes (an out-of-range CE target); here the prior has K = ``ctx.num_classes``
  channels always. The dead zero-init of ``mlp_res`` (which, with gamma = 0, would freeze the
  semantic branch) is not reproduced either: the semantic Linears are trunc_normal(0.02) and
  gamma = 0, the initialisation the official code effectively ends up with.

Example:
    >>> ctx = MethodContext(num_classes=6, crop_size=(64, 64), model={
    ...     "encoder": "swin_tiny_patch4_window7_224", "decoder_channels": 16,
    ...     "encoder_kwargs": {"embed_dim": 16, "depths": [1, 1, 1, 1],
    ...                        "num_heads": [1, 1, 1, 1], "window_size": 4}})
    >>> method = SeMask(SeMaskKnobs(), ctx)
    >>> model = method.build()
    >>> batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 6, (2, 64, 64))}
    >>> sorted(method.training_step(model, batch, 0))
    ['acc_seg', 'loss', 'loss_prior', 'loss_seg']
    >>> tuple(method.predict(model.eval(), torch.randn(1, 3, 70, 90)).shape)
    (1, 6, 70, 90)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import MethodContext
from methods.semask.backbone import (
    ATTENTION_MODES,
    SeMaskSwin,
    build_semask_swin,
    load_pretrained,
)
from methods.semask.head import SemanticFPNHead, decode_priors

#: Name substrings the official optimiser config exempts from weight decay (gamma is decayed).
OFFICIAL_NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm")


@dataclass
class SeMaskKnobs:
    """Knobs of SeMask-FPN, with the official defaults.

    Attributes:
        prior_weight: weight of the semantic-prior CE (``cate_w``, 0.4 in every official config).
        attention: per-stage extent of the semantic attention: ``official`` (the hard-coded rule:
            Swin-T/S/L with K > 19 -> stages 1-2 windowed, 3-4 global; otherwise all windowed),
            ``windowed`` or ``global`` for every stage.
        num_sem_blocks: SemanticAttention blocks per semantic layer: one count for every stage
            (1) or one per stage (the official config's ``[1, 1, 1, 1]``).
        sem_window_size: window of windowed semantic layers; 0 = the Swin window (7 or 12).
        sem_dropout: dropout on the semantic-attention branch (0.1, hard-coded officially).
        gamma_init: initial value of the semantic branch's scalar gate (0).
        scaled_attention: divide ``S Kc^T`` by sqrt(K) (absent in the official code).
        ohem: online hard example mining on the segmentation CE (ADE Swin-L and all COCO).
        ohem_min_kept: pixels kept per image by OHEM (100000); the batch keeps min_kept x B.
        loss_mean_over_all_pixels: mmseg 0.11 reduction (divide by all B*H*W pixels, ignored
            ones included); False divides by the supervised (kept, non-ignored) pixels.
    """

    prior_weight: float = 0.4
    attention: str = "official"
    num_sem_blocks: int | list[int] = 1
    sem_window_size: int = 0
    sem_dropout: float = 0.1
    gamma_init: float = 0.0
    scaled_attention: bool = False
    ohem: bool = False
    ohem_min_kept: int = 100000
    loss_mean_over_all_pixels: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.attention not in ATTENTION_MODES:
            errors.append(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.prior_weight < 0:
            errors.append(f"prior_weight must be >= 0, got {self.prior_weight}")
        counts = (self.num_sem_blocks if isinstance(self.num_sem_blocks, list)
                  else [self.num_sem_blocks])
        if not counts or min(counts) < 1:
            errors.append(f"num_sem_blocks must be >= 1 for every stage (the priors need a "
                          f"block), got {self.num_sem_blocks}")
        if self.sem_window_size < 0:
            errors.append(f"sem_window_size must be >= 0 (0 = the Swin window), "
                          f"got {self.sem_window_size}")
        if not 0 <= self.sem_dropout < 1:
            errors.append(f"sem_dropout must be in [0, 1), got {self.sem_dropout}")
        if self.ohem_min_kept < 1:
            errors.append(f"ohem_min_kept must be >= 1, got {self.ohem_min_kept}")
        if errors:
            raise ValueError("invalid SeMask knobs: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def ohem_weights(pixel_ce: torch.Tensor, target: torch.Tensor, ignore_index: int,
                 min_kept: int) -> torch.Tensor:
    """0/1 weights keeping the ``min_kept * B`` valid pixels with the highest CE (mmseg OHEM).

    Args:
        pixel_ce: per-pixel CE (B, H, W).
        target: labels (B, H, W).
        ignore_index: label never supervised.
        min_kept: pixels kept per image; all valid pixels are kept when there are fewer.

    Returns:
        Float weights (B, H, W): 1 on kept pixels, 0 elsewhere (ignored pixels always 0).
    """
    valid = (target != ignore_index).flatten()  # (B*H*W,)
    weights = torch.zeros_like(valid, dtype=pixel_ce.dtype)
    kept = min(min_kept * target.shape[0], int(valid.sum()))
    if kept > 0:
        valid_idx = valid.nonzero().squeeze(1)
        top = pixel_ce.detach().flatten()[valid_idx].topk(kept).indices
        weights[valid_idx[top]] = 1.0
    return weights.view_as(pixel_ce)


def semask_loss(seg_logits: torch.Tensor, prior_logits: torch.Tensor, target: torch.Tensor,
                prior_weight: float = 0.4, ignore_index: int = 255,
                ohem_min_kept: int | None = None,
                mean_over_all_pixels: bool = True) -> dict[str, torch.Tensor]:
    """The SeMask-FPN loss on logits already at label resolution.

    ``loss = CE(seg) + prior_weight * CE(prior)``; OHEM (when ``ohem_min_kept``) weights the
    segmentation CE only.

    Args:
        seg_logits: (B, K, H, W) segmentation logits.
        prior_logits: (B, K, H, W) summed semantic-prior logits.
        target: (B, H, W) int64 labels.
        prior_weight: weight of the prior CE.
        ignore_index: label never supervised.
        ohem_min_kept: OHEM pixels kept per image, or None for no OHEM.
        mean_over_all_pixels: divide by all B*H*W pixels (mmseg 0.11) instead of the
            supervised ones.

    Returns:
        ``loss``, ``loss_seg`` and ``loss_prior`` (the unweighted prior CE).

    Example:
        >>> logits = torch.zeros(1, 2, 1, 2)
        >>> out = semask_loss(logits, logits, torch.tensor([[[0, 255]]]))
        >>> round(float(out["loss_seg"]), 4)  # log(2) / 2 pixels
        0.3466
    """
    ce_seg = F.cross_entropy(seg_logits.float(), target, ignore_index=ignore_index,
                             reduction="none")  # (B, H, W), 0 on ignored pixels
    ce_prior = F.cross_entropy(prior_logits.float(), target, ignore_index=ignore_index,
                               reduction="none")
    valid = (target != ignore_index).to(ce_seg.dtype)
    w_seg = valid if ohem_min_kept is None else ohem_weights(ce_seg, target, ignore_index,
                                                            ohem_min_kept)
    if mean_over_all_pixels:
        loss_seg = (ce_seg * w_seg).sum() / target.numel()
        loss_prior = ce_prior.sum() / target.numel()
    else:
        loss_seg = (ce_seg * w_seg).sum() / w_seg.sum().clamp(min=1.0)
        loss_prior = ce_prior.sum() / valid.sum().clamp(min=1.0)
    return {"loss": loss_seg + prior_weight * loss_prior, "loss_seg": loss_seg,
            "loss_prior": loss_prior}


# ---------------------------------------------------------------------------------------------
# Model and method
# ---------------------------------------------------------------------------------------------


def _upsample_crop(x: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Logits at 1/``stride`` of the patch-padded input -> (B, K, *size) at the input size."""
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    return x[..., : size[0], : size[1]]


class SeMaskFPN(nn.Module):
    """SeMask Swin backbone + Semantic-FPN head.

    ``forward(images)`` returns ``{"seg": (B, K, H, W)}`` logits at the input size, plus
    ``"prior"`` (the summed semantic priors, same shape) when ``with_prior`` (default: in
    training mode). Maps at 1/4 of the patch-padded input are upsampled to the padded size and
    cropped back, which equals the official resize whenever H and W are multiples of the patch.

    Attributes:
        pretrained_report: the pretrained-loading report (file, sha256, new/dropped keys), or None.
    """

    def __init__(self, backbone: SeMaskSwin, head: SemanticFPNHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = head
        self.pretrained_report: dict[str, Any] | None = None

    def forward(self, images: torch.Tensor,
                with_prior: bool | None = None) -> dict[str, torch.Tensor]:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        feats, priors = self.backbone(images)
        stride = self.backbone.strides[0]
        out = {"seg": _upsample_crop(self.decode_head(feats), stride, size)}
        if with_prior is None:
            with_prior = self.training
        if with_prior:
            prior = decode_priors(priors, self.backbone.strides)
            out["prior"] = _upsample_crop(prior, stride, size)
        return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The SeMaskFPN inside a DDP / compiled wrapper."""
    while not isinstance(model, SeMaskFPN) and hasattr(model, "module"):
        model = model.module
    return model


class SeMask:
    """SeMask-FPN (Jain et al., 2021): semantic priors inside Swin, Semantic-FPN head.

    Args:
        knobs: :class:`SeMaskKnobs`.
        ctx: run context; uses ``num_classes``, ``ignore_index``, ``crop_size`` and ``model``
            (``encoder``: a timm Swin name, ``pretrained``: "" or a path/URI of a timm Swin state
            dict, ``encoder_kwargs``: extra timm arguments, ``decoder_channels``: head width).
    """

    name: ClassVar[str] = "semask"
    Knobs: ClassVar[type] = SeMaskKnobs
    streams: ClassVar[tuple[str, ...]] = ("labeled",)
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "prior_weight": {"type": "uniform", "low": 0.1, "high": 1.0},
        "attention": {"type": "choice", "values": list(ATTENTION_MODES)},
        "num_sem_blocks": {"type": "int", "low": 1, "high": 2},
        "ohem": {"type": "choice", "values": [False, True]},
    }

    def __init__(self, knobs: SeMaskKnobs, ctx: MethodContext) -> None:
        if not isinstance(knobs, SeMaskKnobs):
            raise TypeError(f"knobs must be SeMaskKnobs, got {type(knobs).__name__}")
        self.knobs = knobs
        self.ctx = ctx

    def build(self) -> nn.Module:
        """Build the SeMask-FPN model with K = ``ctx.num_classes`` (also for the priors).

        Raises:
            ValueError: a non-Swin encoder, or a pretrained file that does not fit the trunk.
        """
        m, k = self.ctx.model, self.knobs
        encoder = m.get("encoder") or "swin_tiny_patch4_window7_224"
        backbone = build_semask_swin(
            encoder, self.ctx.num_classes, img_size=tuple(self.ctx.crop_size),
            encoder_kwargs=dict(m.get("encoder_kwargs") or {}), attention=k.attention,
            sem_window_size=k.sem_window_size, num_sem_blocks=k.num_sem_blocks,
            dropout=k.sem_dropout, gamma_init=k.gamma_init, scaled=k.scaled_attention)
        head = SemanticFPNHead(backbone.channels, backbone.strides, self.ctx.num_classes,
                               channels=int(m.get("decoder_channels") or 256))
        model = SeMaskFPN(backbone, head)
        if m.get("pretrained"):
            model.pretrained_report = load_pretrained(backbone, m["pretrained"])
        return model

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor],
                      step: int) -> dict[str, torch.Tensor]:
        """SeMask loss on a labelled batch; also logs the pixel accuracy ``acc_seg``.

        Raises:
            ValueError: when the mask's spatial size differs from the image's.
        """
        images, target = batch["image"], batch["mask"]
        if tuple(target.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"mask size {tuple(target.shape[-2:])} must equal image size "
                             f"{tuple(images.shape[-2:])}")
        out = model(images, with_prior=True)
        k = self.knobs
        losses = semask_loss(
            out["seg"], out["prior"], target, prior_weight=k.prior_weight,
            ignore_index=self.ctx.ignore_index, ohem_min_kept=k.ohem_min_kept if k.ohem else None,
            mean_over_all_pixels=k.loss_mean_over_all_pixels)
        with torch.no_grad():
            valid = target != self.ctx.ignore_index
            hits = (out["seg"].argmax(1) == target) & valid
            losses["acc_seg"] = hits.sum() / valid.sum().clamp(min=1)
        return losses

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, K, H, W) at the size of ``images``."""
        return model(images, with_prior=False)["seg"]

    def param_groups(self, model: nn.Module, base: dict[str, Any]) -> list[dict[str, Any]]:
        """AdamW groups with the official decay rule.

        Weight decay 0 for names containing ``absolute_pos_embed``, ``relative_position_bias_table``
        or ``norm`` (all LayerNorms, norm0-3, the semantic layers' norms) and any substring in
        ``base["no_decay"]``; everything else, gamma and the head's BatchNorm (named ``bn`` as in
        mmcv) included, is decayed.

        Args:
            model: the built model (DDP-wrapped or not).
            base: ``lr``, ``weight_decay``, ``no_decay`` and any other optimizer options.

        Returns:
            Up to two groups, ``{"params", "lr", "weight_decay", "group"}`` (+ other base keys).
        """
        rules = (*OFFICIAL_NO_DECAY, *(base.get("no_decay") or ()))
        opts = {k: v for k, v in base.items() if k != "no_decay"}
        decay, no_decay = [], []
        for name, p in _unwrap(model).named_parameters():
            if p.requires_grad:
                (no_decay if any(r in name for r in rules) else decay).append(p)
        groups = [{**opts, "params": decay, "group": "decay"},
                  {**opts, "params": no_decay, "weight_decay": 0.0, "group": "no_decay"}]
        return [g for g in groups if g["params"]]
