"""A thin adapter over timm's ``features_only`` models: one interface for every backbone family."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from segray.models._common import did_you_mean


def check_model_name(name: str) -> None:
    """Raise a helpful ValueError when timm has no model called ``name``.

    Raises:
        ValueError: naming ``name`` and the closest timm model names.
    """
    if timm.is_model(name):
        return
    close = did_you_mean(name, timm.list_models())
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ValueError(
        f"unknown encoder {name!r}; {hint}(any name from timm.list_models() that supports "
        "features_only works, e.g. 'resnet18', 'convnext_tiny', 'swin_tiny_patch4_window7_224')"
    )


class TimmEncoder(nn.Module):
    """A timm backbone that returns a list of NCHW feature maps, shallow to deep.

    The model is always created with ``pretrained=False``: weights come from files, loaded with
    :func:`segray.models.weights.load_encoder_weights`. Transformer families that emit NHWC maps
    (Swin, some MaxViT/Hiera variants) are permuted so callers always get NCHW.

    Args:
        name: a timm model name, e.g. ``"resnet18"``.
        out_indices: which feature levels to return (timm's ``out_indices``); None = timm's default.
        in_chans: input channels.
        **timm_kwargs: passed to ``timm.create_model`` (``output_stride=16``, ``img_size=...``,
            ``strict_img_size=False`` for Swin at other input sizes, ``drop_path_rate``...).

    Attributes:
        channels: channels of each returned feature map.
        strides: reduction (input size / feature size) of each returned feature map.

    Raises:
        ValueError: unknown model name (with the closest matches), or a model without
            ``features_only`` support.

    Example:
        >>> enc = TimmEncoder("resnet18")
        >>> [f.shape[1] for f in enc(torch.randn(2, 3, 64, 64))] == enc.channels
        True
        >>> enc.strides
        [2, 4, 8, 16, 32]
    """

    def __init__(
        self,
        name: str,
        out_indices: tuple[int, ...] | None = None,
        in_chans: int = 3,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        check_model_name(name)
        kwargs = dict(timm_kwargs)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, in_chans=in_chans, **kwargs
            )
        except RuntimeError as e:
            if "features_only" not in str(e):
                raise
            raise ValueError(
                f"timm model {name!r} cannot return feature maps (features_only): {e}; "
                "choose a CNN or hierarchical transformer backbone"
            ) from e
        self.name = name
        info = self.body.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = [int(r) for r in info.reduction()]
        fmt = getattr(self.body, "output_fmt", "NCHW")
        # timm declares the layout of its feature wrapper; families without the attribute are NCHW.
        self.nhwc = str(getattr(fmt, "value", fmt)).upper() == "NHWC"

    @property
    def max_stride(self) -> int:
        """Largest reduction of any returned map: input sizes should be multiples of it."""
        return max(self.strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C_in, H, W) images -> list of (B, C_i, H / s_i, W / s_i) feature maps."""
        features = self.body(x)
        if isinstance(features, dict):
            features = list(features.values())
        if self.nhwc:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]  # NHWC -> NCHW
        for f, c in zip(features, self.channels):
            if f.shape[1] != c:
                raise ValueError(
                    f"encoder {self.name!r} returned a map of shape {tuple(f.shape)} where "
                    f"{c} channels were declared; its layout is not NCHW/NHWC as timm reports"
                )
        return list(features)
