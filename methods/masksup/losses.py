"""MaskSup's training objective: supervise the clean and the masked view, tie them together.

``loss = alpha * L(f(I), Y) + beta * L(f(I_m), Y) + gamma * C(f(I), f(I_m))``

- binary tasks (one logit channel): L = BCE with logits, C = MSE of sigmoid probabilities;
- multi-class: L = cross-entropy, C = MSE of softmax probabilities (``softmax_mse``, default) or
  ``argmax``: MSE between the two argmax class-index maps cast to float. ``argmax`` reproduces the
  official NYUDv2 trainer, whose consistency term therefore carries **no gradient**: it changes
  the logged loss only, so the trained model is the one of CE(clean) + CE(masked) ("CB" in the
  paper's ablation). For binary tasks ``argmax`` compares the hard predictions (logit > 0).

No stop-gradient is applied to either branch of C, as in the official code (``stop_gradient``
detaches one branch instead, a sweep option). Supervised terms are
means over labelled pixels: pixels equal to ``ignore_index`` are skipped (the official code has
no ignore index; it maps NYUDv2's void label to class 0 in its data instead). The consistency
term needs no labels and averages over every pixel.

Example:
    >>> out = masksup_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4),
    ...                    torch.ones(2, 4, 4, dtype=torch.long), binary=True)
    >>> round(float(out["loss"]), 4)  # 2 * ln 2
    1.3863
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONSISTENCY = ("softmax_mse", "argmax")
STOP_GRADIENT = ("none", "clean", "masked")


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # Sum / count instead of .mean() so an all-ignored batch gives 0 rather than NaN.
    return (values * valid).sum() / valid.sum().clamp_min(1)


def supervised_loss(logits: torch.Tensor, target: torch.Tensor, *, binary: bool,
                    ignore_index: int = 255) -> torch.Tensor:
    """L of one view: BCE with logits on one channel (``binary``) or cross-entropy, in float32,
    averaged over the pixels whose target is not ``ignore_index``.

    Args:
        logits: (B, 1, H, W) when ``binary`` else (B, K, H, W).
        target: int64 (B, H, W); binary tasks use {0, 1} (and ``ignore_index``).
        binary: one-logit sigmoid task.
        ignore_index: target value excluded from the mean.

    Raises:
        ValueError: a binary task whose logits have more than one channel.
    """
    logits = logits.float()
    valid = target != ignore_index  # (B, H, W)
    if binary:
        if logits.shape[1] != 1:
            raise ValueError(
                f"a binary task needs 1 logit channel, got {logits.shape[1]}; build the model "
                "with one output or set binary to false"
            )
        y = (target == 1).float().unsqueeze(1)  # (B, 1, H, W)
        return _masked_mean(F.binary_cross_entropy_with_logits(logits, y, reduction="none"),
                            valid.unsqueeze(1).float())
    safe = torch.where(valid, target, torch.zeros_like(target))
    return _masked_mean(F.cross_entropy(logits, safe, reduction="none"), valid.float())


def _stop(clean: torch.Tensor, masked: torch.Tensor, which: str) -> tuple[torch.Tensor, ...]:
    # Only the consistency term sees the detached copy; the supervised terms keep their gradient.
    return (clean.detach() if which == "clean" else clean,
            masked.detach() if which == "masked" else masked)


def masksup_loss(
    clean_logits: torch.Tensor,
    masked_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    binary: bool,
    consistency: str = "softmax_mse",
    ignore_index: int = 255,
    stop_gradient: str = "none",
) -> dict[str, torch.Tensor]:
    """The MaskSup loss of one batch and its three parts.

    Args:
        clean_logits: (B, 1, H, W) when ``binary`` else (B, K, H, W), from the clean images.
        masked_logits: same shape, from the masked images.
        target: int64 (B, H, W) class ids; binary tasks use {0, 1} (and ``ignore_index``).
        alpha: weight of the clean-view supervised term.
        beta: weight of the masked-view supervised term.
        gamma: weight of the consistency term.
        binary: one-logit sigmoid task (BCE) instead of a softmax task (CE).
        consistency: ``"softmax_mse"`` (probability MSE, differentiable) or ``"argmax"``
            (hard-prediction MSE, no gradient, the official NYUDv2 form).
        ignore_index: target value excluded from the supervised terms.
        stop_gradient: branch of the consistency term that is detached: ``"none"`` (official:
            C pulls both predictions), ``"clean"`` (the clean prediction is a fixed target) or
            ``"masked"``.

    Returns:
        ``loss`` (weighted sum, to back-propagate) and the unweighted ``loss_clean``,
        ``loss_masked``, ``loss_consistency``; all float32 scalars.

    Raises:
        ValueError: on mismatched shapes, a binary task without exactly one logit channel, or an
            unknown ``consistency`` or ``stop_gradient``.
    """
    if consistency not in CONSISTENCY:
        raise ValueError(f"unknown consistency {consistency!r}; expected one of {CONSISTENCY}")
    if stop_gradient not in STOP_GRADIENT:
        raise ValueError(f"unknown stop_gradient {stop_gradient!r}; expected one of "
                         f"{STOP_GRADIENT}")
    if clean_logits.shape != masked_logits.shape:
        raise ValueError(
            f"clean and masked logits differ in shape: {tuple(clean_logits.shape)} vs "
            f"{tuple(masked_logits.shape)}"
        )
    if clean_logits.ndim != 4 or target.shape != (clean_logits.shape[0], *clean_logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, C, H, W) and target (B, H, W), got {tuple(clean_logits.shape)} "
            f"and {tuple(target.shape)}"
        )
    # Losses in float32 even under autocast, as the official AMP trainer does (.float()).
    clean, masked = clean_logits.float(), masked_logits.float()
    if binary:
        loss_clean = supervised_loss(clean, target, binary=True, ignore_index=ignore_index)
        loss_masked = supervised_loss(masked, target, binary=True, ignore_index=ignore_index)
        clean, masked = _stop(clean, masked, stop_gradient)
        if consistency == "softmax_mse":
            loss_cons = F.mse_loss(torch.sigmoid(clean), torch.sigmoid(masked))
        else:
            loss_cons = F.mse_loss((clean > 0).float(), (masked > 0).float())
    else:
        loss_clean = supervised_loss(clean, target, binary=False, ignore_index=ignore_index)
        loss_masked = supervised_loss(masked, target, binary=False, ignore_index=ignore_index)
        clean, masked = _stop(clean, masked, stop_gradient)
        if consistency == "softmax_mse":
            loss_cons = F.mse_loss(clean.softmax(1), masked.softmax(1))
        else:
            # The official form: class indices as floats; argmax cuts the graph.
            loss_cons = F.mse_loss(clean.argmax(1).float(), masked.argmax(1).float())
    loss = alpha * loss_clean + beta * loss_masked + gamma * loss_cons
    return {
        "loss": loss,
        "loss_clean": loss_clean.detach(),
        "loss_masked": loss_masked.detach(),
        "loss_consistency": loss_cons.detach(),
    }
