"""SeMask Swin: timm Swin stages, each followed by a semantic layer, with per-stage output norms.

The semantic layer (SeMask, Jain et al. 2021) turns each stage's tokens into class-prior logits
``S`` and re-weights the tokens by a class-driven attention. Placement follows the official
SeMask-FPN code: after a stage's Swin blocks and before the next patch merging. timm stages are
``[PatchMerging -> blocks]``, so the semantic layer is appended at the end of each timm stage and
its output (``LN(x) + gamma * ...``) is what the next stage merges.

Example:
    >>> net = build_semask_swin("swin_tiny_patch4_window7_224", num_classes=5, img_size=64,
    ...                         encoder_kwargs={"embed_dim": 16, "depths": [1, 1, 1, 1],
    ...                                         "num_heads": [1, 1, 1, 1], "window_size": 4})
    >>> feats, priors = net(torch.randn(2, 3, 64, 64))
    >>> [tuple(f.shape) for f in feats]
    [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]
    >>> tuple(priors[0].shape)
    (2, 5, 16, 16)
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
from torch import nn

from segray import storage

ATTENTION_MODES = ("official", "windowed", "global")
_SWIN_EXAMPLES = ("swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224",
                  "swin_base_patch4_window12_384", "swin_large_patch4_window12_384")


def stage_attention(embed_dim: int, num_classes: int, mode: str = "official",
                    num_stages: int = 4) -> list[str]:
    """Attention extent (``"windowed"`` or ``"global"``) of each stage's semantic layer.

    ``official`` reproduces the hard-coded rule of SeMask-FPN: when ``embed_dim`` is 96 or 192
    (Swin-T/S/L) and there are more than 19 classes, stages 1-2 are windowed and stages 3-4 global;
    otherwise (Swin-B, or any size on Cityscapes) every stage is windowed.

    Args:
        embed_dim: channels of the first Swin stage.
        num_classes: number of classes K.
        mode: ``official``, ``windowed`` (all stages) or ``global`` (all stages).
        num_stages: number of Swin stages.

    Returns:
        One entry per stage.

    Raises:
        ValueError: for an unknown ``mode``.

    Example:
        >>> stage_attention(96, 150)
        ['windowed', 'windowed', 'global', 'global']
        >>> stage_attention(128, 150)
        ['windowed', 'windowed', 'windowed', 'windowed']
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    if mode == "official":
        large = embed_dim in (96, 192) and num_classes > 19
        return ["windowed" if (i < 2 or not large) else "global" for i in range(num_stages)]
    return [mode] * num_stages


class SemanticAttention(nn.Module):
    """One SeMask attention block on LayerNormed tokens ``x`` (..., N, C).

    ``S = q(x)`` (N x K) are the semantic-prior logits, ``Kc = k(x)`` (N x K), ``V = v(x)``
    (N x C); ``A = softmax(S Kc^T)`` with no 1/sqrt(d) scaling (``scaled=True`` adds 1/sqrt(K));
    the output is ``gamma * Dropout(res(A V)) + x`` with a scalar ``gamma`` starting at 0.

    Args:
        dim: token channels C.
        num_classes: number of classes K.
        dropout: dropout on the attention branch (0.1 in the official code).
        gamma_init: initial value of ``gamma``.
        scaled: divide ``S Kc^T`` by sqrt(K) (absent in the official code).
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1,
                 gamma_init: float = 0.0, scaled: bool = False) -> None:
        super().__init__()
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.gamma = nn.Parameter(torch.full((1,), float(gamma_init)))
        self.scale = num_classes ** -0.5 if scaled else 1.0
        # The official module zeroes mlp_res in its own init, but the backbone-wide
        # trunc_normal(0.02) init overwrites it; zeroing both mlp_res and gamma would freeze the
        # branch (gamma, mlp_res and mlp_v would never get a gradient), so it is not reproduced.
        for lin in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v, self.mlp_res):
            trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (..., N, C) -> (prior logits (..., N, K), tokens (..., N, C))."""
        s = self.mlp_cls_q(x)  # (..., N, K)
        kc = self.mlp_cls_k(x)  # (..., N, K)
        v = self.mlp_v(x)  # (..., N, C)
        # SDPA computes softmax(q k^T * scale) v with fused kernels where available; the head
        # axis it expects is added and removed around it.
        out = F.scaled_dot_product_attention(
            s.unsqueeze(-3), kc.unsqueeze(-3), v.unsqueeze(-3), scale=self.scale
        ).squeeze(-3)  # (..., N, C)
        out = self.proj_drop(self.mlp_res(out))
        return s, self.gamma * out + x


class SemanticLayer(nn.Module):
    """LayerNorm + ``num_blocks`` SemanticAttention blocks, windowed or global, on NHWC tokens.

    Windowed attention uses non-shifted ``window`` x ``window`` windows; the normed tokens are
    zero-padded bottom/right to a multiple of the window, the padded tokens take part in the
    attention unmasked (as in the official code), and the outputs are cropped back. The residual
    is added to the normed tokens, so the stage output is ``LN(x) + gamma * (...)``.

    Args:
        dim: token channels C.
        num_classes: number of classes K.
        window: window size for windowed attention; 0 = global attention over all tokens.
        num_blocks: number of SemanticAttention blocks (only the last block's priors are returned).
        **attn_kwargs: passed to :class:`SemanticAttention`.
    """

    def __init__(self, dim: int, num_classes: int, window: int = 7, num_blocks: int = 1,
                 **attn_kwargs: Any) -> None:
        super().__init__()
        self.window = window
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            SemanticAttention(dim, num_classes, **attn_kwargs) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, H, W, C) -> (tokens (B, H, W, C), prior logits (B, H, W, K))."""
        b, h, w, c = x.shape
        x = self.norm(x)
        if self.window <= 0:
            t = x.reshape(b, h * w, c)  # (B, N, C)
            for blk in self.blocks:
                s, t = blk(t)
            return t.reshape(b, h, w, c), s.reshape(b, h, w, -1)
        ws = self.window
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = x.shape[1:3]
        t = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3)  # (B, nh, nw, ws, ws, C)
        t = t.reshape(-1, ws * ws, c)  # (B*nW, ws*ws, C)
        for blk in self.blocks:
            s, t = blk(t)
        t = _merge_windows(t, b, hp, wp, ws)[:, :h, :w]  # (B, H, W, C)
        s = _merge_windows(s, b, hp, wp, ws)[:, :h, :w]  # (B, H, W, K)
        return t, s


def _merge_windows(t: torch.Tensor, b: int, hp: int, wp: int, ws: int) -> torch.Tensor:
    """(B*nW, ws*ws, D) windows -> (B, Hp, Wp, D) map."""
    t = t.reshape(b, hp // ws, wp // ws, ws, ws, -1).transpose(2, 3)  # (B, nh, ws, nw, ws, D)
    return t.reshape(b, hp, wp, -1)


class SeMaskSwin(nn.Module):
    """A timm Swin trunk with a semantic layer after each stage and per-stage output norms.

    Parameter names of the trunk (``patch_embed.*``, ``layers.*``) are timm's, so a timm Swin
    state dict loads into it directly; ``semantic_layers.*`` and ``norm0..norm3`` are new.

    Args:
        trunk: a timm :class:`SwinTransformer` (its final norm and classifier are not used).
        num_classes: number of classes K of the semantic priors.
        attention: per-stage ``"windowed"`` / ``"global"`` (see :func:`stage_attention`).
        sem_window: window of the windowed semantic layers.
        num_sem_blocks: SemanticAttention blocks per semantic layer: one count for every stage,
            or one per stage.
        **attn_kwargs: passed to :class:`SemanticAttention` (dropout, gamma_init, scaled).

    Attributes:
        channels: channels of the four feature maps; strides: their reductions.
    """

    def __init__(self, trunk: SwinTransformer, num_classes: int, attention: Sequence[str],
                 sem_window: int, num_sem_blocks: int | Sequence[int] = 1,
                 **attn_kwargs: Any) -> None:
        super().__init__()
        self.patch_embed = trunk.patch_embed
        self.layers = trunk.layers
        self.patch_size = int(self.patch_embed.patch_size[0])
        self.channels = [int(f["num_chs"]) for f in trunk.feature_info]
        self.strides = [int(f["reduction"]) for f in trunk.feature_info]
        self.attention = list(attention)
        if len(self.attention) != len(self.channels):
            raise ValueError(f"attention needs one entry per stage ({len(self.channels)}), "
                             f"got {self.attention}")
        blocks = ([int(num_sem_blocks)] * len(self.channels) if isinstance(num_sem_blocks, int)
                  else [int(n) for n in num_sem_blocks])
        if len(blocks) != len(self.channels):
            raise ValueError(f"num_sem_blocks needs one count per stage ({len(self.channels)}), "
                             f"got {list(num_sem_blocks)}")
        self.semantic_layers = nn.ModuleList(
            SemanticLayer(c, num_classes, window=sem_window if a == "windowed" else 0,
                          num_blocks=n, **attn_kwargs)
            for c, a, n in zip(self.channels, self.attention, blocks))
        for i, c in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def new_parameter_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the parameters a Swin checkpoint does not hold."""
        return ("semantic_layers.", *(f"norm{i}." for i in range(len(self.channels))))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images (B, 3, H, W) -> (features [(B, C_i, H_i, W_i)], priors [(B, K, H_i, W_i)]).

        The input is zero-padded bottom/right to a multiple of the patch size (as the official
        PatchEmbed does), so any size is accepted; H_i = ceil(H / patch) halved (rounding up) per
        stage.
        """
        p = self.patch_size
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.patch_embed(x)  # (B, H/p, W/p, C0), NHWC
        feats, priors = [], []
        for i, (stage, sem) in enumerate(zip(self.layers, self.semantic_layers)):
            x = stage(x)  # (B, H_i, W_i, C_i)
            x, s = sem(x)
            out = getattr(self, f"norm{i}")(x)
            feats.append(out.permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
            priors.append(s.permute(0, 3, 1, 2).contiguous())  # (B, K, H_i, W_i)
        return feats, priors


def create_swin_trunk(encoder: str, img_size: Sequence[int] | int,
                      encoder_kwargs: dict[str, Any] | None = None) -> SwinTransformer:
    """Create a randomly initialised timm Swin (``pretrained=False``) that accepts any input size.

    Args:
        encoder: a timm Swin name, e.g. ``swin_tiny_patch4_window7_224``.
        img_size: training crop size; fixes each stage's window (timm shrinks a window to the
            stage's size when the stage is smaller).
        encoder_kwargs: extra ``timm.create_model`` arguments (embed_dim, depths, num_heads,
            window_size, drop_path_rate, ...); an ``img_size`` here wins over ``img_size``.

    Raises:
        ValueError: unknown model name or a model that is not a timm Swin Transformer.
        TypeError: ``encoder_kwargs`` the model does not accept.
    """
    if not timm.is_model(encoder):
        close = difflib.get_close_matches(encoder, timm.list_models("swin*"), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown encoder {encoder!r}; {hint}SeMask needs a timm Swin, "
                         f"e.g. {', '.join(_SWIN_EXAMPLES)}")
    family = timm.models.model_entrypoint(encoder).__module__
    if not family.endswith(".swin_transformer"):
        raise ValueError(f"encoder {encoder!r} ({family}) is not a timm Swin Transformer; "
                         f"use one of {', '.join(_SWIN_EXAMPLES)}")
    kwargs = {"img_size": img_size, "dynamic_img_size": True, **(encoder_kwargs or {})}
    try:
        trunk = timm.create_model(encoder, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise TypeError(f"model.encoder_kwargs {sorted(kwargs)} not accepted by timm model "
                        f"{encoder!r}: {e}") from e
    if not isinstance(trunk, SwinTransformer):
        raise ValueError(f"encoder {encoder!r} is a {type(trunk).__name__}, not a timm Swin "
                         f"Transformer; use one of {', '.join(_SWIN_EXAMPLES)}")
    return trunk


def swin_window(trunk: SwinTransformer, encoder_kwargs: dict[str, Any] | None = None) -> int:
    """The Swin window the model was configured with (the largest, if given per stage or as
    (h, w)), not the one timm shrinks to for stages smaller than the window."""
    ws = (encoder_kwargs or {}).get("window_size")
    if ws is None:
        ws = getattr(trunk, "_ref_window_sizes", None) or trunk.layers[0].blocks[0].attn.window_size
    flat, todo = [], [ws]
    while todo:
        v = todo.pop()
        if isinstance(v, (list, tuple)):
            todo.extend(v)
        else:
            flat.append(int(v))
    return max(flat)


def build_semask_swin(encoder: str, num_classes: int, img_size: Sequence[int] | int,
                      encoder_kwargs: dict[str, Any] | None = None, attention: str = "official",
                      sem_window_size: int = 0, num_sem_blocks: int | Sequence[int] = 1,
                      **attn_kwargs: Any) -> SeMaskSwin:
    """Build a SeMask Swin backbone (random weights; see :func:`load_pretrained`).

    Args:
        encoder: timm Swin name.
        num_classes: number of classes K (always the dataset's class count).
        img_size: training crop size (H, W) or an int.
        encoder_kwargs: extra ``timm.create_model`` arguments.
        attention: ``official`` | ``windowed`` | ``global`` (see :func:`stage_attention`).
        sem_window_size: window of windowed semantic layers; 0 = the Swin window.
        num_sem_blocks: SemanticAttention blocks per stage: one count, or one per stage.
        **attn_kwargs: dropout, gamma_init, scaled (see :class:`SemanticAttention`).

    Returns:
        The backbone, with ``features, priors = net(images)``.
    """
    trunk = create_swin_trunk(encoder, img_size, encoder_kwargs)
    modes = stage_attention(int(trunk.embed_dim), num_classes, attention, len(trunk.layers))
    window = sem_window_size or swin_window(trunk, encoder_kwargs)
    return SeMaskSwin(trunk, num_classes, modes, window, num_sem_blocks, **attn_kwargs)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_pretrained(net: SeMaskSwin, uri: str) -> dict[str, Any]:
    """Load a timm Swin state dict (local file or ``s3://`` URI) strictly into the trunk.

    The file is read with ``torch.load(weights_only=True)`` (or safetensors for ``.safetensors``)
    and passed through timm's Swin checkpoint filter, which also accepts the original Microsoft
    layout and bicubically resizes relative-position tables when the window differs. The
    classifier (``head.*``) and the final norm (``norm.*``) are dropped; the semantic layers and
    ``norm0..3`` are new. Every other trunk parameter must be in the file.

    Args:
        net: the backbone to load into (in place).
        uri: path or ``s3://`` URI of the state dict.

    Returns:
        A report: ``file``, ``sha256``, ``loaded`` (count), ``new`` and ``dropped`` key lists.

    Raises:
        FileNotFoundError: no file at ``uri``.
        ValueError: not a state dict, or missing / unexpected / wrongly shaped trunk keys (named).
    """
    path = storage.local_copy(uri)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: expected a state dict (a mapping of tensors), "
                         f"got {type(state).__name__}")
    try:
        state = checkpoint_filter_fn(state, net)
    except AttributeError as e:
        raise ValueError(f"{uri}: not a Swin state dict matching this model ({e})") from e
    dropped = sorted(k for k in state if k.startswith(("head.", "norm.")))
    state = {k: v for k, v in state.items() if k not in dropped}
    own = net.state_dict()
    new = [k for k in own if k.startswith(net.new_parameter_prefixes()) and k not in state]
    missing = [k for k in own if k not in state and k not in new]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = [f"{name}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for name, keys in (("missing trunk keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", wrong)) if keys]
    if problems:
        raise ValueError(f"{uri} does not fit the Swin trunk of model.encoder — "
                         + "; ".join(problems)
                         + ". Use a timm state dict of the same Swin variant and window size.")
    net.load_state_dict(state, strict=False)
    return {"file": uri, "sha256": _file_sha256(path), "loaded": len(state), "new": new,
            "dropped": dropped}
