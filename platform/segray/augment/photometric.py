"""Supervised training augmentation: horizontal flip + MMSeg-style PhotoMetricDistortion.

PhotoMetricDistortion follows MMSegmentation's defaults: each of brightness (delta 32),
contrast (factor 0.5-1.5), saturation (factor 0.5-1.5) and hue (delta 18 in OpenCV units, i.e. out
of 180) is applied with probability 0.5, independently per image, and contrast comes either before
or after the saturation/hue pair (probability 0.5). Contrast is MMSeg's plain multiplication, not a
blend with the mean. Values stay float on the 0-255 scale and are clamped to [0, 255] after every op.

The random draws (:func:`sample_photometric_params`) are separate from the deterministic core
(:func:`photometric_distortion`), so the core is checked against hand-worked values and the whole
batch is processed at once: a skipped op gets its identity value (delta 0, factor 1).

Example:
    >>> from segray.augment import IMAGENET_MEAN, IMAGENET_STD
    >>> aug = TrainAugment(IMAGENET_MEAN, IMAGENET_STD, generator=0)
    >>> img = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    >>> mask = torch.randint(0, 5, (4, 64, 64))
    >>> x, m = aug(img, mask)  # x float32 (4, 3, 64, 64) normalised, m int64 (4, 64, 64)
"""

from __future__ import annotations

import math

import kornia.color
import kornia.enhance
import torch
from torch import nn

from segray.augment.common import (
    PairedFlip,
    Stats,
    check_image,
    check_mask,
    check_valid,
    kornia_rng,
    make_generator,
    normalize,
    outside_valid,
    per_sample,
    stats_tensor,
)

# One OpenCV hue unit is 2 degrees (hue spans 0-180 for 8-bit images).
_OPENCV_HUE_TO_RAD = 2 * math.pi / 180


def sample_photometric_params(
    batch_size: int,
    generator: torch.Generator | None = None,
    brightness_delta: float = 32.0,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
    p: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Draw per-image PhotoMetricDistortion parameters (on the CPU).

    Args:
        batch_size: number of images B.
        generator: CPU generator for reproducible draws; None uses the global RNG.
        brightness_delta: brightness offsets are uniform in [-delta, delta] (0-255 scale).
        contrast_range: contrast factors are uniform in this range.
        saturation_range: saturation factors are uniform in this range.
        hue_delta: hue offsets are integers in [-hue_delta, hue_delta) OpenCV units (of 180).
        p: probability that each op is applied to an image.

    Returns:
        Dict of (B,) tensors: ``brightness`` (0 where skipped), ``contrast`` and ``saturation``
        (1 where skipped), ``hue`` (0 where skipped) and bool ``contrast_first``.
    """
    b, g = batch_size, generator

    def coin() -> torch.Tensor:
        return torch.rand(b, generator=g) < p

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=g)

    zeros, ones = torch.zeros(b), torch.ones(b)
    brightness = torch.where(coin(), uniform(-brightness_delta, brightness_delta), zeros)
    contrast = torch.where(coin(), uniform(*contrast_range), ones)
    saturation = torch.where(coin(), uniform(*saturation_range), ones)
    hue_draw = (
        torch.randint(-hue_delta, hue_delta, (b,), generator=g).float() if hue_delta > 0 else zeros
    )
    hue = torch.where(coin(), hue_draw, zeros)
    contrast_first = torch.rand(b, generator=g) < 0.5
    return {
        "brightness": brightness,
        "contrast": contrast,
        "saturation": saturation,
        "hue": hue,
        "contrast_first": contrast_first,
    }


def photometric_distortion(
    image: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    contrast_first: torch.Tensor,
) -> torch.Tensor:
    """Apply PhotoMetricDistortion with given per-image parameters (deterministic core).

    Order: brightness, contrast (if ``contrast_first``), saturation, hue, contrast (otherwise).

    Args:
        image: float (B, 3, H, W) RGB on the 0-255 scale.
        brightness: (B,) offsets added on the 0-255 scale.
        contrast: (B,) factors multiplying every channel.
        saturation: (B,) factors multiplying HSV saturation.
        hue: (B,) hue offsets in OpenCV units (180 = a full turn).
        contrast_first: (B,) bool, apply contrast before the saturation/hue pair.

    Returns:
        float (B, 3, H, W) on the 0-255 scale, clamped to [0, 255].

    Example:
        >>> img = torch.full((1, 3, 2, 2), 100.0)
        >>> one, zero = torch.ones(1), torch.zeros(1)
        >>> out = photometric_distortion(img, zero + 10, one * 1.5, one, zero, zero.bool())
        >>> out[0, 0, 0, 0].item()  # (100 + 10) * 1.5
        165.0
    """
    if image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(
            f"image must be float (B, 3, H, W) on the 0-255 scale, got {image.dtype} "
            f"{tuple(image.shape)}"
        )
    x = (image + per_sample(brightness, image)).clamp(0, 255)
    alpha = per_sample(contrast, image)
    first = per_sample(contrast_first.bool(), image)  # (B, 1, 1, 1)
    x = torch.where(first, (x * alpha).clamp(0, 255), x)

    # The HSV round trip is skipped for the whole batch when no image draws a colour op; the
    # parameters normally live on the CPU, so this check costs no device synchronisation.
    colour = (saturation != 1) | (hue != 0)  # (B,)
    if bool(colour.any()):
        hsv = kornia.color.rgb_to_hsv(x / 255.0)  # h in radians [0, 2pi), s and v in [0, 1]
        hsv = kornia.enhance.adjust_saturation_raw(hsv, saturation.to(x))
        hsv = kornia.enhance.adjust_hue_raw(hsv, hue.to(x) * _OPENCV_HUE_TO_RAD)
        rgb = (kornia.color.hsv_to_rgb(hsv) * 255.0).clamp(0, 255)
        x = torch.where(per_sample(colour, x), rgb, x)

    return torch.where(first, x, (x * alpha).clamp(0, 255))


class TrainAugment(nn.Module):
    """Supervised training augmentation on the training device: flip + photometric + normalise.

    The flip runs through ``kornia.augmentation.AugmentationSequential`` with
    ``data_keys=["input", "mask"]``, so image and mask always move together; photometric
    distortion touches the image only.

    Given each crop's size before padding (``valid``), the order is MMSeg's: flip within the
    crop, photometric distortion, normalisation, then padding, so padded pixels are 0 after
    normalisation (the mean colour), untouched by the photometric ops, and stay at the
    bottom/right. Without it, padding is whatever the uint8 crop holds there.

    Args:
        mean: per-channel mean on the 0-255 scale, RGB.
        std: per-channel std on the 0-255 scale, RGB.
        hflip: probability of a horizontal flip per image.
        photometric: apply MMSeg PhotoMetricDistortion.
        ignore_index: label of unsupervised pixels. The flip creates no new pixels, so it passes
            through unchanged; kept for callers that need it (``aug.ignore_index``).
        generator: CPU ``torch.Generator`` or int seed for reproducible output without touching
            the global RNG; None draws from the global RNG.

    Raises:
        ValueError: for an out-of-range ``hflip`` or malformed mean/std.
    """

    def __init__(
        self,
        mean: Stats,
        std: Stats,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", stats_tensor(mean, "mean", torch.device("cpu")), False)
        self.register_buffer("std", stats_tensor(std, "std", torch.device("cpu")), False)
        self.flip = PairedFlip(hflip)
        self.photometric = photometric
        self.ignore_index = ignore_index
        self.generator = make_generator(generator)

    def forward(self, image: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Args:
            image: uint8 (B, 3, H, W) RGB.
            mask: integer (B, H, W) class ids (ignore = ``ignore_index``), padding included.
            valid: integer (B, 2) each crop's (height, width) before padding at the
                bottom/right (the data plane's ``valid`` column), or None.

        Returns:
            (float32 (B, 3, H, W) normalised image, mask with the input's dtype and shape).

        Raises:
            TypeError: if image is not uint8 or mask not an integer tensor.
            ValueError: if the shapes do not match.
        """
        check_image(image)
        check_mask(mask, image)
        if valid is not None:
            check_valid(valid, image)
        x = image.float()  # (B, 3, H, W) on the 0-255 scale
        with kornia_rng(self.generator, x.device):
            x, mask = self.flip(x, mask, valid)
        if self.photometric:
            params = sample_photometric_params(image.shape[0], self.generator)
            x = photometric_distortion(x, **params)
        x = normalize(x, self.mean, self.std)
        if valid is not None:
            x = x.masked_fill(outside_valid(valid, *x.shape[-2:]).unsqueeze(1), 0.0)
        return x, mask
