"""MaskSup's networks: LeViT-UNet-384 (GLaS, polyps), UNet++ (NYUDv2) and a plain U-Net.

- :class:`LeViTUNet384`: timm ``levit_384`` (stem + three transformer stages) as the encoder; the
  four stem convolutions are U-Net skips; stage outputs are fused at 14x14 into 2048 channels and
  decoded by three up blocks and a 3x3 head followed by a x2 bilinear upsampling. LeViT's attention
  biases are tied to the 14/7/4 token grids, so the input must be 224x224.
- :class:`NestedUNet` (UNet++, deep supervision off) and :class:`UNet`: from scratch, VGG blocks
  (2 x conv3x3 + BN + ReLU), 2x2 max-pool, bilinear x2 upsampling with ``align_corners=True``;
  filters ``width * [1, 2, 4, 8, 16]`` (the paper's ``width`` is 32). Inputs whose sides are not
  multiples of 16 are zero-padded and the logits cropped back.

Example:
    >>> model = build_model("unetpp", num_outputs=40)
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 40, 64, 64])
"""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from segray import storage

log = logging.getLogger(__name__)

ARCHS = ("levit_unet_384", "unetpp", "unet")


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias, BN follows) + BN + ReLU, as in the LeViT-UNet decoder."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UpBlock(nn.Module):
    """x2 bilinear upsampling (``align_corners=True``) then two conv-BN-ReLU."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(_up2(x)))


class LeViTUNet384(nn.Module):
    """LeViT-UNet-384: timm ``levit_384`` encoder with stem skips and a U-Net decoder.

    Args:
        num_outputs: output channels (1 for binary tasks, else the number of classes).
        drop_path: stochastic-depth rate of every LeViT residual (0.1 in the official model).

    Example:
        >>> LeViTUNet384(1)(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1, 224, 224])
    """

    input_size = (224, 224)

    def __init__(self, num_outputs: int, drop_path: float = 0.1) -> None:
        super().__init__()
        self.encoder = timm.create_model(
            "levit_384", pretrained=False, num_classes=0, drop_path_rate=drop_path
        )
        # Token grids of the three stages for a 224x224 input: 14, 7, 4.
        self._grids = (14, 7, 4)
        self.decoder1 = UpBlock(384 + 384 + 512 + 768, 512)  # 2048 @14 -> 512 @28
        self.decoder2 = UpBlock(512 + 192, 256)  # 704 @28 -> 256 @56
        self.decoder3 = UpBlock(256 + 96, 128)  # 352 @56 -> 128 @112
        self.head = nn.Conv2d(128 + 48, num_outputs, 3, padding=1)  # 176 @112

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_outputs, 224, 224) of images (B, 3, 224, 224).

        Raises:
            ValueError: if the input is not 224x224.
        """
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"LeViT-UNet-384 needs 224x224 inputs (its attention biases are tied to that "
                f"resolution), got {tuple(x.shape[-2:])}; set data.crop_size to [224, 224] "
                "(predict() resizes evaluation images itself)"
            )
        stem = self.encoder.stem
        # The stem's intermediate maps are the U-Net skips (timm Stem16: conv1, act1, ... conv4).
        s1 = stem.act1(stem.conv1(x))  # (B, 48, 112, 112)
        s2 = stem.act2(stem.conv2(s1))  # (B, 96, 56, 56)
        s3 = stem.act3(stem.conv3(s2))  # (B, 192, 28, 28)
        s4 = stem.conv4(s3)  # (B, 384, 14, 14), no activation as in LeViT
        b = x.shape[0]
        tokens = s4.flatten(2).transpose(1, 2)  # (B, 196, 384)
        maps = []
        for stage, grid in zip(self.encoder.stages, self._grids):
            tokens = stage(tokens)  # (B, grid*grid, C)
            maps.append(tokens.transpose(1, 2).reshape(b, -1, grid, grid))  # (B, C, grid, grid)
        f1, f2, f3 = maps  # 384 @14, 512 @7, 768 @4
        f2 = _up2(f2)  # (B, 512, 14, 14)
        f3 = _up2(_up2(f3))  # (B, 768, 16, 16)
        f3 = F.interpolate(f3, size=f1.shape[-2:], mode="bilinear", align_corners=True)
        y = torch.cat([s4, f1, f2, f3], dim=1)  # (B, 2048, 14, 14)
        y = torch.cat([self.decoder1(y), s3], dim=1)  # (B, 704, 28, 28)
        y = torch.cat([self.decoder2(y), s2], dim=1)  # (B, 352, 56, 56)
        y = torch.cat([self.decoder3(y), s1], dim=1)  # (B, 176, 112, 112)
        return _up2(self.head(y))  # (B, K, 224, 224)


def load_levit_pretrained(
    model: LeViTUNet384, uri: str, reinit_stem_conv1: bool = True
) -> dict[str, Any]:
    """Load a timm ``levit_384`` state dict into the encoder, strictly, and report what happened.

    Classifier heads (``head.*``, ``head_dist.*``) are dropped, as the official code does; every
    other key must match the encoder exactly.

    Args:
        model: the network to load into.
        uri: local path or ``s3://`` URI of a ``torch.save``-d state dict (optionally wrapped in
            ``{"state_dict": ...}`` or ``{"model": ...}``), e.g. timm's ``levit_384.fb_dist_in1k``.
        reinit_stem_conv1: re-initialise ``stem.conv1`` (conv + BN) after loading, because the
            official loader never maps the first stem convolution, so it trains from scratch.

    Returns:
        ``{"file", "sha256", "loaded", "dropped", "reinitialised"}``.

    Raises:
        FileNotFoundError: if ``uri`` does not exist.
        KeyError: if keys are missing or unexpected (all of them are listed).
    """
    path = storage.local_copy(uri)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    dropped = sorted(k for k in state if k.startswith(("head.", "head_dist.")))
    state = {k: v for k, v in state.items() if k not in set(dropped)}
    result = model.encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{uri} is not a timm levit_384 state dict: missing keys {result.missing_keys}, "
            f"unexpected keys {result.unexpected_keys}; export one with "
            "torch.save(timm.create_model('levit_384', pretrained=True).state_dict(), path)"
        )
    if reinit_stem_conv1:
        for m in model.encoder.stem.conv1.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()
    with open(path, "rb") as f:
        digest = storage.sha256(f.read())
    report = {
        "file": uri,
        "sha256": digest,
        "loaded": len(state),
        "dropped": dropped,
        "reinitialised": ["stem.conv1"] if reinit_stem_conv1 else [],
    }
    log.info("loaded %d tensors from %s (sha256 %s), dropped %s", len(state), uri, digest, dropped)
    return report


class VGGBlock(nn.Module):
    """conv3x3 + BN + ReLU, twice (convolutions with bias, as in the UNet++ reference)."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class NestedUNet(nn.Module):
    """UNet++ with dense nested skips x^{i,j}; one 1x1 output conv on x^{0,4}.

    Args:
        num_outputs: output channels.
        width: filters of the first level; the levels have ``width * [1, 2, 4, 8, 16]``.

    Example:
        >>> NestedUNet(40)(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 40, 64, 64])
    """

    def __init__(self, num_outputs: int, width: int = 32) -> None:
        super().__init__()
        f = [width * 2**i for i in range(5)]
        self.pool = nn.MaxPool2d(2, 2)
        # nodes[i][j] is x^{i,j}: level i, j-th node on that level; its inputs are the j earlier
        # nodes of level i and the upsampled x^{i+1,j-1}.
        self.nodes = nn.ModuleList()
        for i in range(5):
            level = nn.ModuleList([VGGBlock(3 if i == 0 else f[i - 1], f[i], f[i])])
            for j in range(1, 5 - i):
                level.append(VGGBlock(f[i] * j + f[i + 1], f[i], f[i]))
            self.nodes.append(level)
        self.final = nn.Conv2d(f[0], num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _pad_to(x, 16)
        grid: list[list[torch.Tensor]] = [[] for _ in range(5)]
        for i in range(5):
            grid[i].append(self.nodes[i][0](x if i == 0 else self.pool(grid[i - 1][0])))
            # Each new backbone node completes one anti-diagonal of the nested grid.
            for j in range(1, i + 1):
                lvl = i - j
                inputs = [*grid[lvl], _up2(grid[lvl + 1][j - 1])]
                grid[lvl].append(self.nodes[lvl][j](torch.cat(inputs, dim=1)))
        return self.final(grid[0][4])[..., :h, :w]  # (B, K, H, W)


class UNet(nn.Module):
    """Plain U-Net with the same VGG blocks, pooling and upsampling as :class:`NestedUNet`.

    Args:
        num_outputs: output channels.
        width: filters of the first level; the levels have ``width * [1, 2, 4, 8, 16]``.

    Example:
        >>> UNet(3, width=8)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, num_outputs: int, width: int = 32) -> None:
        super().__init__()
        f = [width * 2**i for i in range(5)]
        self.pool = nn.MaxPool2d(2, 2)
        self.down = nn.ModuleList(
            [VGGBlock(3 if i == 0 else f[i - 1], f[i], f[i]) for i in range(5)]
        )
        self.up = nn.ModuleList([VGGBlock(f[i] + f[i + 1], f[i], f[i]) for i in range(4)])
        self.final = nn.Conv2d(f[0], num_outputs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _pad_to(x, 16)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        y = skips[4]
        for i in reversed(range(4)):
            y = self.up[i](torch.cat([skips[i], _up2(y)], dim=1))
        return self.final(y)[..., :h, :w]  # (B, K, H, W)


def build_model(
    arch: str,
    num_outputs: int,
    *,
    width: int = 32,
    drop_path: float = 0.1,
    pretrained: str = "",
    reinit_stem_conv1: bool | None = None,
) -> nn.Module:
    """Build one of MaskSup's networks.

    Args:
        arch: ``"levit_unet_384"``, ``"unetpp"`` or ``"unet"``.
        num_outputs: output channels (1 for binary tasks).
        width: base filters of ``unetpp``/``unet`` (ignored by LeViT, whose widths are fixed).
        drop_path: LeViT stochastic-depth rate.
        pretrained: LeViT only: local path or ``s3://`` URI of a timm ``levit_384`` state dict;
            ``""`` trains from scratch. The load report is kept in ``model.pretrained_report``.
        reinit_stem_conv1: re-initialise the first stem conv after loading (None: yes when
            ``pretrained`` is set, matching the official loader).

    Returns:
        The network, in training mode.

    Raises:
        ValueError: on an unknown arch, a bad width, or weights for a from-scratch arch.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown MaskSup arch {arch!r}; expected one of {ARCHS}")
    if arch == "levit_unet_384":
        model = LeViTUNet384(num_outputs, drop_path=drop_path)
        if pretrained:
            reinit = True if reinit_stem_conv1 is None else bool(reinit_stem_conv1)
            model.pretrained_report = load_levit_pretrained(model, pretrained, reinit)
        return model
    if int(width) < 1:
        raise ValueError(f"width must be a positive number of filters, got {width}")
    if pretrained:
        raise ValueError(
            f"arch {arch!r} is trained from scratch (no timm encoder) but model.pretrained is "
            f"{pretrained!r}; clear model.pretrained or use arch levit_unet_384"
        )
    cls = NestedUNet if arch == "unetpp" else UNet
    return cls(num_outputs, width=int(width))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ARCHS",
    "LeViTUNet384",
    "NestedUNet",
    "UNet",
    "build_model",
    "count_parameters",
    "load_levit_pretrained",
]
