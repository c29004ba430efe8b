"""Augmentation on the training device (Kornia), mask-consistent.

Batches arrive from the data plane already scaled and cropped on the CPU: ``image`` uint8
(B, 3, H, W) RGB and ``mask`` integer (B, H, W) with ignore = 255. Everything here runs batched on
the batch's device (GPU when present):

- :class:`TrainAugment`: flip + MMSeg PhotoMetricDistortion + normalise (supervised streams);
- :class:`StrongWeakAugment`: weak (flip) and strong (flip, colour, blur, CutMix) views for
  semi-supervised methods, with :func:`apply_cutmix` to mix pseudo-labels the same way;
- :class:`EvalTransform`, :func:`normalize`, :func:`denormalize`.

Example:
    >>> from segray.augment import IMAGENET_MEAN, IMAGENET_STD, TrainAugment
    >>> aug = TrainAugment(IMAGENET_MEAN, IMAGENET_STD).to(device)  # doctest: +SKIP
    >>> image, mask = aug(batch["image"], batch["mask"])  # doctest: +SKIP
"""

from __future__ import annotations

from segray.augment.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    denormalize,
    normalize,
)
from segray.augment.photometric import (
    TrainAugment,
    photometric_distortion,
    sample_photometric_params,
)
from segray.augment.strong import StrongWeakAugment, apply_cutmix, sample_cutmix

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "StrongWeakAugment",
    "TrainAugment",
    "apply_cutmix",
    "denormalize",
    "normalize",
    "photometric_distortion",
    "sample_cutmix",
    "sample_photometric_params",
]
