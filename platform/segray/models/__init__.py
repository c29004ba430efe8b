"""Segmentation models: timm encoders and reusable decoders behind one ``build_model``.

Example:
    >>> from segray.models import build_model
    >>> model = build_model("resnet18", "fpn", num_classes=5)
    >>> model(torch.randn(2, 3, 64, 64)).shape
    torch.Size([2, 5, 64, 64])
"""

from __future__ import annotations

from segray.models.deeplabv3plus import ASPP, DeepLabV3PlusHead, default_atrous_rates
from segray.models.encoder import TimmEncoder
from segray.models.factory import DECODERS, build_model, count_parameters
from segray.models.fpn import FPNHead
from segray.models.segmodel import SegModel
from segray.models.unet import UNetDecoder
from segray.models.weights import LoadReport, load_encoder_weights, read_state_dict

__all__ = [
    "ASPP",
    "DECODERS",
    "DeepLabV3PlusHead",
    "FPNHead",
    "LoadReport",
    "SegModel",
    "TimmEncoder",
    "UNetDecoder",
    "build_model",
    "count_parameters",
    "default_atrous_rates",
    "load_encoder_weights",
    "read_state_dict",
]
