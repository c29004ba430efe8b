"""``build_model``: the one front door to segmentation models."""

from __future__ import annotations

from typing import Any

from torch import nn

from segray.models._common import did_you_mean
from segray.models.deeplabv3plus import DeepLabV3PlusHead
from segray.models.encoder import TimmEncoder
from segray.models.fpn import FPNHead
from segray.models.segmodel import SegModel
from segray.models.unet import UNetDecoder
from segray.models.weights import load_encoder_weights

#: Decoder name -> class taking (in_channels, strides, num_classes, channels, **kwargs).
DECODERS: dict[str, type[nn.Module]] = {
    "fpn": FPNHead,
    "deeplabv3plus": DeepLabV3PlusHead,
    "unet": UNetDecoder,
}


def build_model(
    encoder: str = "resnet18",
    decoder: str = "fpn",
    *,
    num_classes: int,
    decoder_channels: int = 128,
    pretrained: str | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
) -> SegModel:
    """Build a timm encoder + decoder segmentation model.

    Args:
        encoder: timm model name (created with ``features_only=True, pretrained=False``).
        decoder: one of :data:`DECODERS` (``fpn``, ``deeplabv3plus``, ``unet``).
        num_classes: number of classes K.
        decoder_channels: decoder width (``channels`` of the decoder).
        pretrained: local path or ``s3://`` URI of encoder weights (a timm state dict file);
            loaded strictly, the report is kept in ``model.pretrained_report``.
        encoder_kwargs: extra arguments of :class:`~segray.models.encoder.TimmEncoder`
            (``out_indices``, ``output_stride``, ``img_size``, ``drop_path_rate``...).
        decoder_kwargs: extra keyword arguments of the decoder class (``neck=False`` for FPN,
            ``atrous_rates`` for DeepLabV3+...).

    Returns:
        A :class:`~segray.models.segmodel.SegModel` mapping (B, 3, H, W) to (B, K, H, W).

    Raises:
        ValueError: unknown encoder or decoder name (with the closest matches), bad decoder
            arguments, or weights that do not fit the encoder.

    Example:
        >>> model = build_model("resnet18", "deeplabv3plus", num_classes=21,
        ...                     encoder_kwargs={"output_stride": 16})
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 21, 64, 64])
    """
    if decoder not in DECODERS:
        close = did_you_mean(decoder, DECODERS)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown decoder {decoder!r}; {hint}choose one of {', '.join(sorted(DECODERS))}"
        )
    enc = TimmEncoder(encoder, **(encoder_kwargs or {}))
    dec = DECODERS[decoder](
        enc.channels, enc.strides, num_classes, decoder_channels, **(decoder_kwargs or {})
    )
    model = SegModel(enc, dec)
    if pretrained:
        model.pretrained_report = load_encoder_weights(enc, pretrained)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
