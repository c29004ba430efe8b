"""Pieces shared by the training and evaluation transforms: normalisation, input checks,
reproducible randomness and the mask-consistent horizontal flip.

Images arrive from the data plane as uint8 (B, 3, H, W) RGB and masks as integer (B, H, W) class
ids with the ignore label (255) already in place; every transform here keeps that layout.

Example:
    >>> img = torch.full((2, 3, 4, 4), 128, dtype=torch.uint8)
    >>> x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)  # (2, 3, 4, 4) float32
    >>> torch.allclose(denormalize(x, IMAGENET_MEAN, IMAGENET_STD), img.float())
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import kornia.augmentation as K
import torch
from torch import nn

# ImageNet statistics on the 0-255 scale, RGB (the MMSeg default for every dataset).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

Stats = Sequence[float] | torch.Tensor


def stats_tensor(values: Stats, name: str, device: torch.device) -> torch.Tensor:
    """Turn per-channel mean/std into a float32 (1, C, 1, 1) tensor on ``device``."""
    t = torch.as_tensor(values, dtype=torch.float32).to(device).flatten()
    if t.numel() != 3:
        raise ValueError(
            f"{name} must hold 3 values (R, G, B on the 0-255 scale), got {t.numel()}: "
            f"{values!r}; e.g. {name}={IMAGENET_MEAN if name == 'mean' else IMAGENET_STD}"
        )
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive in every channel, got {values!r}")
    return t.view(1, 3, 1, 1)


def normalize(image: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Normalise RGB images given on the 0-255 scale.

    Args:
        image: (B, 3, H, W) uint8 or float tensor with values in [0, 255].
        mean: per-channel mean on the 0-255 scale, RGB order.
        std: per-channel standard deviation on the 0-255 scale, RGB order.

    Returns:
        float32 (B, 3, H, W) tensor ``(image - mean) / std``.

    Raises:
        ValueError: if ``image`` is not (B, 3, H, W) or mean/std are not 3 values (std > 0).
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) RGB, got shape {tuple(image.shape)}")
    mean_t = stats_tensor(mean, "mean", image.device)
    std_t = stats_tensor(std, "std", image.device)
    return (image.float() - mean_t) / std_t


def denormalize(image: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Invert :func:`normalize`: back to float values on the 0-255 scale (not clamped).

    Args:
        image: (B, 3, H, W) normalised float tensor.
        mean: the mean given to :func:`normalize`.
        std: the std given to :func:`normalize`.

    Returns:
        float32 (B, 3, H, W) tensor ``image * std + mean``; call ``.round().clamp(0, 255)
        .to(torch.uint8)`` to display it.

    Raises:
        ValueError: if ``image`` is not (B, 3, H, W) or mean/std are not 3 values (std > 0).
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) RGB, got shape {tuple(image.shape)}")
    mean_t = stats_tensor(mean, "mean", image.device)
    std_t = stats_tensor(std, "std", image.device)
    return image.float() * std_t + mean_t


def check_image(image: torch.Tensor) -> None:
    """Reject anything but a uint8 (B, 3, H, W) tensor, the data plane's image layout."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise TypeError(
            f"image must be uint8 with values 0-255, got dtype {image.dtype}; pass the data "
            "plane's batch unchanged (or convert with .round().clamp(0, 255).to(torch.uint8))"
        )
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W) RGB, got shape {tuple(image.shape)}")


def check_mask(mask: torch.Tensor, image: torch.Tensor) -> None:
    """Reject masks that are not integer (B, H, W) tensors matching ``image``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or mask.dtype == torch.bool:
        raise TypeError(f"mask must hold integer class ids (e.g. int64), got dtype {mask.dtype}")
    expected = (image.shape[0], *image.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask must be (B, H, W) = {expected} to match image {tuple(image.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != image.device:
        raise ValueError(f"mask is on {mask.device} but image is on {image.device}; move both")


def make_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """Accept a CPU ``torch.Generator``, an int seed or None (use the global RNG).

    Raises:
        TypeError: for any other type.
        ValueError: for a generator that is not on the CPU.
    """
    if generator is None:
        return None
    if isinstance(generator, bool):
        raise TypeError("generator must be a torch.Generator, an int seed or None, got a bool")
    if isinstance(generator, int):
        g = torch.Generator()
        g.manual_seed(generator)
        return g
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must live on the CPU (random draws are made there, then moved), "
                f"got one on {generator.device}; create it with torch.Generator()"
            )
        return generator
    raise TypeError(
        f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}"
    )


@contextlib.contextmanager
def kornia_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Make Kornia's draws reproducible from ``generator`` without touching the global RNG.

    Kornia samples from the global torch RNG of the device its modules live on, so the block runs
    under a forked RNG seeded from ``generator``; with ``generator=None`` the global RNG is used
    as is (seed it with ``torch.manual_seed`` for a reproducible run).
    """
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (B,) values to broadcast over (B, ...) ``like``, on its device and dtype."""
    values = values.to(like.device, like.dtype if values.is_floating_point() else values.dtype)
    return values.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def check_valid(valid: torch.Tensor, image: torch.Tensor) -> None:
    """Check ``valid`` (B, 2) = each crop's (height, width) before padding, within the image."""
    b, _, h, w = image.shape
    if valid.ndim != 2 or tuple(valid.shape) != (b, 2) or valid.dtype.is_floating_point:
        raise ValueError(f"valid must be integer (B, 2) = (height, width) per crop with B = {b}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    if bool((valid < 1).any()) or bool((valid[:, 0] > h).any()) or bool((valid[:, 1] > w).any()):
        raise ValueError(f"valid sizes must lie in 1..{h} x 1..{w}, got {valid.tolist()}")


def outside_valid(valid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """bool (B, H, W): True on the padding below/right of each crop's (height, width)."""
    valid = valid.long()
    rows = torch.arange(height, device=valid.device).view(1, height, 1)
    cols = torch.arange(width, device=valid.device).view(1, 1, width)
    return (rows >= valid[:, 0].view(-1, 1, 1)) | (cols >= valid[:, 1].view(-1, 1, 1))


def _shift_left(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each sample of (B, ..., W) ``x`` left by ``shift[b]`` columns (wrapping)."""
    w = x.shape[-1]
    cols = (torch.arange(w, device=x.device).view(1, w) + shift.view(-1, 1).to(x.device)) % w
    index = cols.view(x.shape[0], *([1] * (x.ndim - 2)), w).expand_as(x)
    return torch.gather(x, -1, index)


class PairedFlip(nn.Module):
    """Random horizontal flip applied identically to images and masks (Kornia).

    Masks travel through Kornia as float (B, 1, H, W); the flip moves pixels without resampling, so
    rounding back gives exactly the input label values.

    Given each crop's size before padding (``valid``), a flipped crop keeps its padding at the
    right, as in MMSeg, whose RandomFlip runs before Pad: the crop is flipped within its width.
    Without it the whole padded crop is flipped (padding moves left), as in UniMatch, which pads
    first.

    Args:
        p: probability of flipping each sample.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.seq = K.AugmentationSequential(
            K.RandomHorizontalFlip(p=p), data_keys=["input", "mask"]
        )

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flip float (B, C, H, W) images and optional integer (B, H, W) masks together; with
        ``valid`` (B, 2) crop sizes, within each crop's width."""
        params = self.seq.forward_parameters(image.shape)
        if mask is None:
            out, m = self.seq(image, data_keys=["input"], params=params), None
        else:
            m = mask.unsqueeze(1).to(torch.float32)  # (B, 1, H, W)
            out, m = self.seq(image, m, params=params)
            m = m.squeeze(1).round().to(mask.dtype)
        if valid is not None:
            flipped = params[0].data["batch_prob"].to(valid.device) > 0.5
            shift = torch.where(flipped, image.shape[-1] - valid[:, 1].long(), 0)
            if bool((shift > 0).any()):  # a full flip put the padding left: move it back right
                out = _shift_left(out, shift)
                m = None if m is None else _shift_left(m, shift)
        return out, m


class EvalTransform(nn.Module):
    """Evaluation-time transform: normalisation only.

    Args:
        mean: per-channel mean on the 0-255 scale, RGB.
        std: per-channel std on the 0-255 scale, RGB.

    Example:
        >>> t = EvalTransform(IMAGENET_MEAN, IMAGENET_STD)
        >>> t(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape
        torch.Size([1, 3, 8, 8])
    """

    def __init__(self, mean: Stats, std: Stats) -> None:
        super().__init__()
        self.register_buffer("mean", stats_tensor(mean, "mean", torch.device("cpu")), False)
        self.register_buffer("std", stats_tensor(std, "std", torch.device("cpu")), False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Normalise uint8 or 0-255 float (B, 3, H, W) images to float32 (B, 3, H, W)."""
        return normalize(image, self.mean, self.std)


def blur_kernel_size(sigma_max: float) -> int:
    """Odd Gaussian kernel size covering +-3 sigma at the largest sigma drawn."""
    return 2 * math.ceil(3 * sigma_max) + 1
