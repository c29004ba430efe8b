"""MaskSup: masked supervised learning for segmentation (Zunair & Hamza, BMVC 2022).

See :mod:`methods.masksup.method` for the algorithm, the knobs and the paper's metric (a per-image
score, not a class-mean IoU).
"""

from __future__ import annotations

from methods.masksup.holes import mask_images, random_holes, resolve_ratio_range
from methods.masksup.losses import masksup_loss, supervised_loss
from methods.masksup.method import MaskSup, MaskSupKnobs
from methods.masksup.metrics import (
    BINARY_NAME,
    MULTICLASS_NAME,
    PaperMetric,
    official_target_resize,
)
from methods.masksup.models import (
    LeViTUNet384,
    NestedUNet,
    UNet,
    build_model,
    count_parameters,
    load_levit_pretrained,
)

__all__ = [
    "BINARY_NAME",
    "MULTICLASS_NAME",
    "LeViTUNet384",
    "MaskSup",
    "MaskSupKnobs",
    "NestedUNet",
    "PaperMetric",
    "UNet",
    "build_model",
    "count_parameters",
    "load_levit_pretrained",
    "mask_images",
    "masksup_loss",
    "official_target_resize",
    "random_holes",
    "resolve_ratio_range",
    "supervised_loss",
]
