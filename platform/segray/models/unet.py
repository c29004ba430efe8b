"""U-Net decoder (Ronneberger et al., 2015) over the maps of any encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segray.models._common import Classifier, ConvBNReLU, check_decoder_inputs, check_features


class UNetBlock(nn.Module):
    """Upsample to the skip map's size (bilinear), concatenate it, then two conv3x3-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNReLU(in_channels + skip_channels, out_channels, 3),
            ConvBNReLU(out_channels, out_channels, 3),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w), skip (B, C_skip, h', w') -> (B, C_out, h', w')."""
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Plain U-Net decoder, returning logits at the finest encoder stride.

    Starting from the deepest map, each block merges the next finer map. The first block is
    ``channels`` wide and every following block halves the width (never below ``min_channels``),
    as U-Net decoders narrow towards full resolution.

    Args:
        in_channels: channels of each encoder map, shallow to deep.
        strides: stride of each encoder map.
        num_classes: number of classes K.
        channels: width of the deepest decoder block.
        min_channels: smallest block width.
        dropout: Dropout2d probability before the classifier (0 by default, as in U-Net).

    Example:
        >>> dec = UNetDecoder([64, 64, 128, 256, 512], [2, 4, 8, 16, 32], num_classes=4)
        >>> sizes = [(64, 32), (64, 16), (128, 8), (256, 4), (512, 2)]  # (channels, side)
        >>> dec([torch.randn(2, c, n, n) for c, n in sizes]).shape  # (B, K, 64 / 2, 64 / 2)
        torch.Size([2, 4, 32, 32])
    """

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        channels: int = 128,
        *,
        min_channels: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_decoder_inputs("UNetDecoder", in_channels, strides, num_classes, channels)
        self.num_inputs = len(in_channels)
        self.output_stride = strides[0]
        self.blocks = nn.ModuleList()
        width_in = in_channels[-1]
        for k, skip_channels in enumerate(reversed(in_channels[:-1])):
            width = max(channels // 2**k, min_channels)
            self.blocks.append(UNetBlock(width_in, skip_channels, width))
            width_in = width
        # A one-level encoder has nothing to merge: a conv block keeps the decoder non-trivial.
        self.stem = ConvBNReLU(in_channels[-1], channels, 3) if not self.blocks else None
        self.out_channels = width_in if self.blocks else channels
        self.classifier = Classifier(self.out_channels, num_classes, dropout)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> features (B, out_channels, H / s0, W / s0)."""
        check_features("UNetDecoder", features, self.num_inputs)
        if self.stem is not None:
            return self.stem(features[-1])
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(x, skip)
        return x

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> logits (B, K, H / s0, W / s0)."""
        return self.classifier(self.decode(features))
