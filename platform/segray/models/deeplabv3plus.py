"""DeepLabV3+ decoder (Chen et al., 2018): ASPP on the deepest map, refined with a low-level map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segray.models._common import Classifier, ConvBNReLU, check_decoder_inputs, check_features

#: ASPP rates of the paper at output stride 16; they scale with 16 / output stride (x2 at OS 8).
BASE_RATES = (6, 12, 18)


def default_atrous_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP rates for an encoder whose deepest map has stride ``output_stride``.

    Returns:
        (12, 24, 36) at OS 8, (6, 12, 18) at OS 16, (3, 6, 9) at OS 32.

    Raises:
        ValueError: for a stride other than 8, 16 or 32 (pass ``atrous_rates`` explicitly).
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(
            f"no default ASPP rates for output stride {output_stride} (known: 8, 16, 32); "
            "pass atrous_rates=(...) explicitly"
        )
    return tuple(r * 16 // output_stride for r in BASE_RATES)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 and image pooling, fused by a 1x1.

    The image-pooling branch has no BatchNorm: after global pooling a batch of one image would give
    BatchNorm a single value per channel, which fails in training mode (batch 1 per GPU is common
    in semi-supervised recipes).
    """

    def __init__(
        self, in_channels: int, channels: int, rates: tuple[int, ...], dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_channels, channels, 1)]
            + [ConvBNReLU(in_channels, channels, 3, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, channels, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            ConvBNReLU(channels * (len(rates) + 2), channels, 1), nn.Dropout2d(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, h, w) -> (B, channels, h, w)."""
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])  # (B, channels, h, w)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder returning logits at the stride of the low-level map (1/4 usually).

    ASPP runs on the deepest encoder map; its output is bilinearly upsampled to the low-level map
    (the finest map with stride >= ``low_level_stride``), which is projected by a 1x1 conv to
    ``low_level_channels``. The concatenation goes through two conv3x3-BN-ReLU and a 1x1 classifier.
    The classic setup uses an encoder at output stride 16 (``encoder_kwargs={"output_stride": 16}``
    for timm CNNs) or 8; the ASPP rates follow the encoder's deepest stride.

    Args:
        in_channels: channels of each encoder map, shallow to deep.
        strides: stride of each encoder map.
        num_classes: number of classes K.
        channels: width of ASPP and the refinement convs (256 in the paper).
        atrous_rates: ASPP dilation rates; None = :func:`default_atrous_rates` of the deepest stride.
        low_level_channels: width of the low-level projection (48 in the paper).
        low_level_stride: the low-level map is the finest one with at least this stride.
        dropout: Dropout2d probability after ASPP and before the classifier.

    Raises:
        ValueError: inconsistent inputs, or no default rates for the encoder's stride.

    Example:
        >>> head = DeepLabV3PlusHead([64, 128, 256, 512], [4, 8, 16, 16], num_classes=3)
        >>> head.atrous_rates
        (6, 12, 18)
        >>> sizes = [(64, 16), (128, 8), (256, 4), (512, 4)]  # (channels, side) per level
        >>> head([torch.randn(2, c, n, n) for c, n in sizes]).shape  # (B, K, 64 / 4, 64 / 4)
        torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        channels: int = 256,
        *,
        atrous_rates: tuple[int, ...] | None = None,
        low_level_channels: int = 48,
        low_level_stride: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_decoder_inputs("DeepLabV3PlusHead", in_channels, strides, num_classes, channels)
        self.num_inputs = len(in_channels)
        self.atrous_rates = tuple(atrous_rates or default_atrous_rates(strides[-1]))
        candidates = [i for i, s in enumerate(strides) if s >= low_level_stride]
        self.low_index = candidates[0] if candidates else 0
        self.output_stride = strides[self.low_index]
        self.aspp = ASPP(in_channels[-1], channels, self.atrous_rates, dropout)
        self.low_proj = ConvBNReLU(in_channels[self.low_index], low_level_channels, 1)
        self.refine = nn.Sequential(
            ConvBNReLU(channels + low_level_channels, channels, 3),
            ConvBNReLU(channels, channels, 3),
        )
        self.out_channels = channels
        self.classifier = Classifier(channels, num_classes, dropout)

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> refined features (B, channels, H / s_low, W / s_low)."""
        check_features("DeepLabV3PlusHead", features, self.num_inputs)
        low = self.low_proj(features[self.low_index])
        context = F.interpolate(
            self.aspp(features[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.refine(torch.cat([context, low], dim=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Encoder maps -> logits (B, K, H / s_low, W / s_low)."""
        return self.classifier(self.decode(features))
