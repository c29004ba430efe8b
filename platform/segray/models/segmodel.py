"""The encoder-decoder segmentation model every method builds on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SegModel(nn.Module):
    """Encoder + decoder; logits come back at the input's size, whatever that size is.

    Inputs whose height or width is not a multiple of the encoder's largest stride are zero-padded
    at the bottom and right (zero is the mean colour of normalised images), and the logits are
    cropped back, so pixel (i, j) of the output always belongs to pixel (i, j) of the input.

    Args:
        encoder: module returning a list of NCHW maps, with ``channels`` and ``strides`` attributes
            (a :class:`~segray.models.encoder.TimmEncoder`).
        decoder: module taking that list and returning logits at its ``output_stride``.

    Attributes:
        pretrained_report: the :class:`~segray.models.weights.LoadReport` of the encoder weights,
            or None when the encoder starts from random weights.

    Example:
        >>> model = build_model("resnet18", "fpn", num_classes=5)
        >>> model(torch.randn(2, 3, 70, 50)).shape
        torch.Size([2, 5, 70, 50])
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.pretrained_report: Any = None

    @property
    def size_divisor(self) -> int:
        """Input sizes that are multiples of this need no padding."""
        return max(getattr(self.encoder, "strides", [1]))

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        d = self.size_divisor
        pad_h, pad_w = (-x.shape[-2]) % d, (-x.shape[-1]) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))  # (B, C, H + pad_h, W + pad_w)
        return x

    @staticmethod
    def _to_input_size(logits: torch.Tensor, padded: torch.Tensor, h: int, w: int) -> torch.Tensor:
        # Resize to the padded size first, then crop: the padding sits outside the image.
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at the input size and the decoder's pre-classifier features.

        Methods that add heads on the decoded features (e.g. a representation head) use this; the
        decoder must have ``decode`` and ``classifier`` (all built-in decoders do).

        Args:
            x: (B, C, H, W) normalised images.

        Returns:
            ``(logits (B, K, H, W), features (B, C_dec, H_p / s, W_p / s))`` where ``H_p, W_p`` is
            the padded size and ``s`` the decoder's output stride.
        """
        h, w = x.shape[-2:]
        padded = self._pad(x)
        features = self.decoder.decode(self.encoder(padded))
        logits = self.decoder.classifier(features)
        return self._to_input_size(logits, padded, h, w), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised images -> (B, K, H, W) logits."""
        h, w = x.shape[-2:]
        padded = self._pad(x)
        return self._to_input_size(self.decoder(self.encoder(padded)), padded, h, w)
