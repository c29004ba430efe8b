"""Semantic-FPN decoder (Kirillov et al., Panoptic FPN): an FPN neck and the per-level scale heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segray.models._common import Classifier, ConvBNReLU, check_decoder_inputs, check_features


class FPNHead(nn.Module):
    """FPN neck + Semantic-FPN head, returning logits at the finest used stride (1/4 usually).

    Neck (``neck=True``): a lateral 1x1 conv per level to ``neck_channels``, a top-down pathway
    (each level adds the nearest-upsampled coarser level), then a 3x3 conv per level. Head: each
    level at stride ``s`` gets ``max(1, log2(s / s0))`` units of conv3x3-BN-ReLU, each followed by a
    2x bilinear upsample while above the finest stride ``s0``; the branches are summed at ``s0``,
    then Dropout2d and a 1x1 classifier. ``neck=False`` applies the head straight to the encoder
    maps, as SeMask-FPN does on its Swin stages.

    Args:
        in_channels: channels of each encoder map, shallow to deep.
        strides: stride of each encoder map.
        num_classes: number of classes K.
        channels: width of the scale heads (128 in Semantic FPN).
        neck: whether to build the FPN neck in front of the head.
        neck_channels: width of the neck (256 in Semantic FPN); defaults to ``channels``.
        min_stride: levels finer than this are not used (drops the stride-2 stem of CNNs).
        dropout: Dropout2d probability before the classifier.

    Raises:
        ValueError: inconsistent ``in_channels``/``strides``, or no level at ``min_stride`` or coarser.

    Example:
        >>> head = FPNHead([64, 128, 256, 512], [4, 8, 16, 32], num_classes=5)
        >>> sizes = [(64, 16), (128, 8), (256, 4), (512, 2)]  # (channels, side) per level
        >>> feats = [torch.randn(2, c, n, n) for c, n in sizes]
        >>> head(feats).shape  # (B, K, 64 / 4, 64 / 4)
        torch.Size([2, 5, 16, 16])
    """

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        channels: int = 128,
        *,
        neck: bool = True,
        neck_channels: int | None = None,
        min_stride: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_decoder_inputs("FPNHead", in_channels, strides, num_classes, channels)
        self.num_inputs = len(in_channels)
        used = [i for i, s in enumerate(strides) if s >= min_stride]
        if not used:
            raise ValueError(
                f"FPNHead: no encoder level has stride >= min_stride={min_stride} "
                f"(strides {list(strides)}); lower min_stride"
            )
        self.used = used
        level_channels = [in_channels[i] for i in used]
        level_strides = [strides[i] for i in used]
        self.output_stride = level_strides[0]

        if neck:
            width = neck_channels or channels
            self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in level_channels)
            self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in used)
            level_channels = [width] * len(used)
        else:
            self.lateral = None
            self.smooth = None

        self.scale_heads = nn.ModuleList()
        for c, s in zip(level_channels, level_strides):
            steps = max(1, round(math.log2(s / self.output_stride)))
            units: list[nn.Module] = []
            for k in range(steps):
                units.append(ConvBNReLU(c if k == 0 else channels, channels, 3))
                if s > self.output_stride:
                    units.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*units))
        self.out_channels = channels
        self.classifier = Classifier(channels, num_classes, dropout)

    def _neck(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        return [conv(f) for conv, f in zip(self.smooth, laterals)]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> summed scale-head features (B, channels, H / s0, W / s0)."""
        check_features("FPNHead", features, self.num_inputs)
        feats = [features[i] for i in self.used]
        if self.lateral is not None:
            feats = self._neck(feats)
        size = feats[0].shape[-2:]
        out = None
        for head, f in zip(self.scale_heads, feats):
            y = head(f)
            if y.shape[-2:] != size:
                # Only reached when a stride ratio is not a power of two.
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return out

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> logits (B, K, H / s0, W / s0)."""
        return self.classifier(self.decode(features))
