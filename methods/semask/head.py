"""The Semantic-FPN head of SeMask-FPN and its parameter-free semantic decoder.

There is no FPN neck: the Panoptic-FPN head runs directly on the four normed backbone maps. For a
map of stride ``s`` (relative to the finest stride ``s0``) a branch of ``max(1, log2(s / s0))``
units (conv3x3-BN-ReLU, then a bilinear x2 upsample when ``s > s0``) brings it to the finest
resolution; the branches are summed, then Dropout2d(0.1) and a 1x1 classifier give the logits.
The semantic decoder brings each stage's prior logits to the finest resolution by the same x2
upsamples and sums them.

Example:
    >>> head = SemanticFPNHead([16, 32, 64, 128], [4, 8, 16, 32], num_classes=5, channels=8)
    >>> feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128],
    ...                                                               [4, 8, 16, 32])]
    >>> tuple(head(feats).shape)
    (2, 5, 16, 16)
    >>> priors = [torch.randn(2, 5, 64 // s, 64 // s) for s in [4, 8, 16, 32]]
    >>> tuple(decode_priors(priors, [4, 8, 16, 32]).shape)
    (2, 5, 16, 16)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _num_units(stride: int, finest: int) -> int:
    """Units of a branch: max(1, log2(stride / finest))."""
    ratio = stride // finest
    if ratio < 1 or stride % finest or ratio & (ratio - 1):
        raise ValueError(f"feature strides must be power-of-two multiples of the finest stride "
                         f"{finest}, got {stride}")
    return max(1, int(math.log2(ratio)))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm -> ReLU, mmcv ``ConvModule`` style initialisation.

    The norm is called ``bn`` (as in mmcv), so a ``norm`` no-decay rule does not match it: the
    official head's BatchNorm parameters are weight-decayed.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class _Branch(nn.Module):
    """``units`` conv units, each followed by a x2 upsample when ``upsample``."""

    def __init__(self, in_channels: int, channels: int, units: int, upsample: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBNReLU(in_channels if k == 0 else channels, channels) for k in range(units))
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
            if self.upsample:
                x = _up2(x)
        return x


class SemanticFPNHead(nn.Module):
    """Panoptic-FPN semantic head on multi-scale features (no neck).

    Args:
        in_channels: channels of each input map, finest first.
        strides: stride of each input map, finest first.
        num_classes: number of classes K.
        channels: width of the branches (256 in SeMask-FPN).
        dropout: Dropout2d probability before the classifier.

    Raises:
        ValueError: mismatched ``in_channels`` / ``strides`` or strides that are not
            power-of-two multiples of the finest one.
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int,
                 channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) != len(strides) or not strides:
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} must "
                             "be non-empty and of the same length")
        self.strides = list(strides)
        s0 = self.strides[0]
        self.scale_heads = nn.ModuleList(
            _Branch(c, channels, _num_units(s, s0), upsample=s > s0)
            for c, s in zip(in_channels, self.strides))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Features [(B, C_i, H_i, W_i)] -> logits (B, K, H_0, W_0) at the finest resolution."""
        if len(features) != len(self.scale_heads):
            raise ValueError(f"expected {len(self.scale_heads)} feature maps, got {len(features)}")
        out = self.scale_heads[0](features[0])
        for branch, f in zip(self.scale_heads[1:], features[1:]):
            # Odd stage sizes make the x2 chain overshoot or undershoot by a pixel; resize to fit.
            out = out + _resize(branch(f), out.shape[-2:])
        return self.conv_seg(self.dropout(out))


def decode_priors(priors: Sequence[torch.Tensor], strides: Sequence[int]) -> torch.Tensor:
    """Sum of the stage priors, each brought to the finest resolution by repeated x2 upsamples.

    Args:
        priors: per-stage prior logits [(B, K, H_i, W_i)], finest first.
        strides: stride of each map, finest first.

    Returns:
        (B, K, H_0, W_0) summed prior logits ``P = S_1 + up(S_2) + up(S_3) + up(S_4)``.
    """
    out = priors[0]
    for p, s in zip(priors[1:], strides[1:]):
        for _ in range(_num_units(s, strides[0])):
            p = _up2(p)
        out = out + _resize(p, out.shape[-2:])
    return out
