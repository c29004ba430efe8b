"""Small building blocks shared by the decoders: conv-BN-ReLU, the classifier, name suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch
from torch import nn


def did_you_mean(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """Closest spellings of ``name`` among ``choices`` (best first), for error messages."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)


class ConvBNReLU(nn.Sequential):
    """``conv(k x k, no bias) -> BatchNorm -> ReLU``, padded so the spatial size is kept.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: 1 or 3 (any odd size works).
        dilation: dilation of the convolution (ASPP uses 6/12/18...).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=padding,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Classifier(nn.Module):
    """Dropout2d then a 1x1 convolution to class logits.

    The weight starts from N(0, 0.01) and the bias from 0 (the MMSegmentation ``conv_seg``
    convention), so the first logits are near zero and the initial loss is close to log(K).

    Args:
        in_channels: channels of the decoded features.
        num_classes: number of output classes K.
        dropout: Dropout2d probability before the classifier (0 disables it).
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features -> (B, K, h, w) logits."""
        return self.conv(self.dropout(x))


def check_decoder_inputs(
    name: str, in_channels: list[int], strides: list[int], num_classes: int, channels: int
) -> None:
    """Validate the arguments every decoder takes.

    Raises:
        ValueError: naming the bad argument and what is expected.
    """
    if len(in_channels) != len(strides) or not in_channels:
        raise ValueError(
            f"{name}: in_channels {list(in_channels)} and strides {list(strides)} must be "
            "non-empty lists of the same length (one entry per encoder feature map)"
        )
    if list(strides) != sorted(strides):
        raise ValueError(f"{name}: strides {list(strides)} must be ordered shallow to deep")
    if num_classes < 1:
        raise ValueError(f"{name}: num_classes must be >= 1, got {num_classes}")
    if channels < 1:
        raise ValueError(f"{name}: channels must be >= 1, got {channels}")


def check_features(name: str, features: list[torch.Tensor], expected: int) -> None:
    """Raise ValueError when a decoder gets a different number of feature maps than it was built for."""
    if len(features) != expected:
        raise ValueError(
            f"{name} was built for {expected} feature maps but got {len(features)}; build it with "
            "the encoder's channels and strides"
        )
