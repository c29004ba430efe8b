"""Weak and strong views for semi-supervised methods, with CutMix inside the batch.

The weak view is flip + normalise. The strong view starts from the same flipped image and adds
colour jitter (p 0.8, brightness/contrast/saturation 0.5, hue 0.25), random grayscale (p 0.2),
Gaussian blur (p 0.5, sigma 0.1-2.0) and CutMix (p 0.5): a box of random area (2-40 % of the
image) and aspect ratio (0.3-1/0.3) is pasted from a partner image chosen by a random permutation of
the batch. The partner index and box are returned so a method can mix teacher pseudo-labels or
logits exactly the same way with :func:`apply_cutmix`.

Example:
    >>> from segray.augment import IMAGENET_MEAN, IMAGENET_STD
    >>> aug = StrongWeakAugment(IMAGENET_MEAN, IMAGENET_STD, generator=0)
    >>> out = aug(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    >>> out["weak"].shape, out["strong"].shape, out["cutmix_box"].shape
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 3, 64, 64]), torch.Size([4, 64, 64]))
    >>> pseudo = teacher(out["weak"]).argmax(1)  # (4, 64, 64)  # doctest: +SKIP
    >>> target = apply_cutmix(pseudo, out["cutmix_index"], out["cutmix_box"])  # doctest: +SKIP
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from segray.augment.common import (
    PairedFlip,
    Stats,
    blur_kernel_size,
    check_image,
    check_mask,
    kornia_rng,
    make_generator,
    normalize,
    stats_tensor,
)


def sample_cutmix(
    batch_size: int,
    height: int,
    width: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw CutMix partners and boxes for a batch.

    Args:
        batch_size: number of images B.
        height: image height H.
        width: image width W.
        p: probability that an image receives a box (otherwise its box is empty).
        area: box area as a fraction of H*W, uniform in this range.
        aspect: box height/width ratio, uniform in this range.
        generator: CPU generator for reproducible draws; None uses the global RNG.
        device: where the returned tensors live.

    Returns:
        ``index`` long (B,), a permutation: image i receives pixels from image ``index[i]``,
        never itself (the images are paired along one random cycle, so a box always mixes two
        images); ``box`` bool (B, H, W), True where image i takes its partner's pixels. A batch
        of one has no partner and gets no box.
    """
    b, g = batch_size, generator
    apply = (torch.rand(b, generator=g) < p) & (b > 1)
    box_area = (area[0] + (area[1] - area[0]) * torch.rand(b, generator=g)) * height * width
    ratio = aspect[0] + (aspect[1] - aspect[0]) * torch.rand(b, generator=g)
    box_w = (box_area / ratio).sqrt().floor().clamp(1, width)
    box_h = (box_area * ratio).sqrt().floor().clamp(1, height)
    x0 = (torch.rand(b, generator=g) * (width - box_w + 1)).floor()
    y0 = (torch.rand(b, generator=g) * (height - box_h + 1)).floor()
    order = torch.randperm(b, generator=g)
    index = torch.empty(b, dtype=torch.long)
    index[order] = order.roll(-1)  # order[j] takes from order[j + 1]: one cycle, no fixed point

    ys = torch.arange(height, dtype=torch.float32, device=device).view(1, height)
    xs = torch.arange(width, dtype=torch.float32, device=device).view(1, width)
    x0, y0, box_w, box_h, apply = (t.to(device).view(b, 1) for t in (x0, y0, box_w, box_h, apply))
    rows = (ys >= y0) & (ys < y0 + box_h) & apply  # (B, H)
    cols = (xs >= x0) & (xs < x0 + box_w)  # (B, W)
    box = rows.unsqueeze(2) & cols.unsqueeze(1)  # (B, H, W)
    return index.to(device), box


def apply_cutmix(tensor: torch.Tensor, index: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paste ``tensor[index]`` into ``tensor`` where ``box`` is True.

    Works for images (B, C, H, W), masks (B, H, W), logits or any (B, ..., H, W) tensor; the dtype
    is kept, so labels stay exact.

    Args:
        tensor: (B, ..., H, W) tensor.
        index: long (B,) partner index from :func:`sample_cutmix`.
        box: bool (B, H, W) paste region from :func:`sample_cutmix`.

    Returns:
        Tensor shaped and typed like ``tensor``.

    Raises:
        ValueError: if the shapes of ``tensor``, ``index`` and ``box`` disagree.

    Example:
        >>> m = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])  # (2, 2, 2)
        >>> box = torch.tensor([[[True, False], [False, False]]]).expand(2, 2, 2)
        >>> apply_cutmix(m, torch.tensor([1, 0]), box)[0].tolist()
        [[1, 0], [0, 0]]
    """
    if box.dtype != torch.bool or box.ndim != 3:
        raise ValueError(f"box must be bool (B, H, W), got {box.dtype} {tuple(box.shape)}")
    b, h, w = box.shape
    if tensor.ndim < 3 or tensor.shape[0] != b or tuple(tensor.shape[-2:]) != (h, w):
        raise ValueError(
            f"tensor must be (B, ..., H, W) with B, H, W = {b}, {h}, {w} to match the box, "
            f"got {tuple(tensor.shape)}"
        )
    if tuple(index.shape) != (b,):
        raise ValueError(f"index must be ({b},) to match the box, got {tuple(index.shape)}")
    region = box.view(b, *([1] * (tensor.ndim - 3)), h, w)  # (B, 1, ..., 1, H, W)
    return torch.where(region, tensor[index], tensor)


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")


class StrongWeakAugment(nn.Module):
    """Weak (flip) and strong (flip + colour + blur + CutMix) views of unlabelled images.

    Args:
        mean: per-channel mean on the 0-255 scale, RGB.
        std: per-channel std on the 0-255 scale, RGB.
        hflip: probability of a horizontal flip, shared by both views.
        jitter: colour jitter (brightness, contrast, saturation, hue) as in torchvision.
        jitter_p: probability of colour jitter.
        grayscale_p: probability of conversion to grayscale.
        blur_p: probability of Gaussian blur.
        blur_sigma: range of the blur's sigma (pixels); the kernel covers +-3 sigma.
        cutmix_p: probability that an image receives a CutMix box.
        cutmix_area: box area as a fraction of the image.
        cutmix_aspect: box height/width ratio range.
        generator: CPU ``torch.Generator`` or int seed for reproducible output without touching
            the global RNG; None draws from the global RNG.

    Raises:
        ValueError: for probabilities outside [0, 1] or malformed mean/std.
    """

    def __init__(
        self,
        mean: Stats,
        std: Stats,
        hflip: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        cutmix_p: float = 0.5,
        cutmix_area: tuple[float, float] = (0.02, 0.4),
        cutmix_aspect: tuple[float, float] = (0.3, 1 / 0.3),
        generator: torch.Generator | int | None = None,
    ) -> None:
        super().__init__()
        probs = {"jitter_p": jitter_p, "grayscale_p": grayscale_p, "blur_p": blur_p}
        for name, p in {**probs, "cutmix_p": cutmix_p}.items():
            _check_prob(name, p)
        self.register_buffer("mean", stats_tensor(mean, "mean", torch.device("cpu")), False)
        self.register_buffer("std", stats_tensor(std, "std", torch.device("cpu")), False)
        self.flip = PairedFlip(hflip)
        kernel = blur_kernel_size(blur_sigma[1])
        # Kornia's colour ops expect [0, 1] images; they run on the 0-255 image divided by 255.
        self.colour = K.ImageSequential(
            K.ColorJitter(*jitter, p=jitter_p),
            K.RandomGrayscale(p=grayscale_p),
            K.RandomGaussianBlur((kernel, kernel), blur_sigma, p=blur_p),
        )
        self.cutmix_p = cutmix_p
        self.cutmix_area = cutmix_area
        self.cutmix_aspect = cutmix_aspect
        self.generator = make_generator(generator)

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Build both views of a batch.

        Args:
            image: uint8 (B, 3, H, W) RGB.
            mask: optional integer (B, H, W) labels, flipped with the images.

        Returns:
            Dict with ``weak`` and ``strong`` float32 (B, 3, H, W) normalised views,
            ``cutmix_index`` long (B,) and ``cutmix_box`` bool (B, H, W); with a mask also
            ``mask`` (matching ``weak``) and ``mask_strong`` (CutMix applied, matching ``strong``),
            both with the input's dtype.

        Raises:
            TypeError: if image is not uint8 or mask not an integer tensor.
            ValueError: if the shapes do not match.
        """
        check_image(image)
        if mask is not None:
            check_mask(mask, image)
        b, _, h, w = image.shape
        x = image.float()  # (B, 3, H, W) on the 0-255 scale
        with kornia_rng(self.generator, x.device):
            x, mask = self.flip(x, mask)
            strong = (self.colour(x / 255.0) * 255.0).clamp(0, 255)
        index, box = sample_cutmix(
            b, h, w, self.cutmix_p, self.cutmix_area, self.cutmix_aspect, self.generator, x.device
        )
        out = {
            "weak": normalize(x, self.mean, self.std),
            "strong": normalize(apply_cutmix(strong, index, box), self.mean, self.std),
            "cutmix_index": index,
            "cutmix_box": box,
        }
        if mask is not None:
            out["mask"] = mask
            out["mask_strong"] = apply_cutmix(mask, index, box)
        return out
