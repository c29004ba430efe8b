"""The metric MaskSup's paper reports, which is **not** a class-mean IoU.

The paper's "mIoU" is a mean over test images of a per-image score (sklearn ``jaccard_score``):

- binary tasks (GLaS, polyps): ``paper_fg_iou_mean_per_image``, the foreground IoU of each image
  (sklearn's default binary mode; background is not a class). An image where neither prediction
  nor ground truth has foreground scores 0, as sklearn does (``zero_division="warn"`` acts as 0);
- multi-class (NYUDv2): ``paper_micro_jaccard_mean_per_image``, the micro-averaged Jaccard of each
  image, which for single-label maps equals ``acc / (2 - acc)`` with ``acc`` the image's pixel
  accuracy, i.e. a monotone function of accuracy.

Both are in percent. Pixels labelled ``ignore_index`` are left out of every image (the official
code has none to leave out), or with ``void_to_class`` counted as that class (the official NYUDv2
code merges void into class 0), and an image with no labelled pixel is not counted. The engine's
confusion-matrix mIoU stays the standard number to compare methods with.

The state is ``[sum of per-image scores, number of images]`` (float64), so shards combine by
adding states.

Example:
    >>> m = PaperMetric(binary=False)
    >>> m.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [1, 0]]]))
    >>> round(m.compute()["paper_micro_jaccard_mean_per_image"], 2)  # acc 0.75 -> 0.75 / 1.25
    60.0
"""

from __future__ import annotations

import torch

from segray.metrics import all_reduce_sum

BINARY_NAME = "paper_fg_iou_mean_per_image"
MULTICLASS_NAME = "paper_micro_jaccard_mean_per_image"


class PaperMetric:
    """Accumulates the paper's per-image score (see the module docstring).

    Args:
        binary: foreground IoU (class 1 is foreground) instead of micro-Jaccard.
        ignore_index: target value left out of every image.
        void_to_class: count ``ignore_index`` pixels as this class instead (None: leave them out).
    """

    def __init__(self, binary: bool, ignore_index: int = 255,
                 void_to_class: int | None = None) -> None:
        self.binary = bool(binary)
        self.ignore_index = int(ignore_index)
        self.void_to_class = None if void_to_class is None else int(void_to_class)
        self.name = BINARY_NAME if self.binary else MULTICLASS_NAME
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._state = torch.zeros(2, dtype=torch.float64)

    def per_image(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (fractions, not percent) of each image and which images count.

        Args:
            pred: integer class ids (B, H, W) or (H, W).
            target: integer class ids of the same shape.

        Returns:
            ``(scores, counted)``: float64 (B,) and bool (B,).

        Raises:
            TypeError: if an input is not an integer tensor.
            ValueError: on a shape mismatch.
        """
        for name, t in (("pred", pred), ("target", target)):
            if (
                not isinstance(t, torch.Tensor)
                or t.dtype.is_floating_point
                or t.dtype == torch.bool
            ):
                raise TypeError(
                    f"{name} must be an integer tensor of class ids, got "
                    f"{getattr(t, 'dtype', type(t).__name__)}; take logits.argmax(1) first"
                )
        if pred.shape != target.shape or pred.ndim not in (2, 3):
            raise ValueError(
                f"pred and target must both be (B, H, W) or (H, W), got {tuple(pred.shape)} and "
                f"{tuple(target.shape)}"
            )
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
        target = target.to(pred.device)
        if self.void_to_class is not None:
            target = target.masked_fill(target == self.ignore_index, self.void_to_class)
        valid = target != self.ignore_index  # (B, H, W)
        n = valid.flatten(1).sum(1).double()  # (B,)
        if self.binary:
            fg_pred, fg_true = (pred == 1) & valid, (target == 1) & valid
            inter = (fg_pred & fg_true).flatten(1).sum(1).double()  # (B,)
            union = (fg_pred | fg_true).flatten(1).sum(1).double()  # (B,)
            scores = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))
        else:
            correct = ((pred == target) & valid).flatten(1).sum(1).double()  # (B,)
            # Micro-Jaccard: TP = correct, FP = FN = n - correct  ->  correct / (2n - correct).
            scores = correct / (2 * n - correct).clamp_min(1)
        return scores, n > 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and target class-id maps (B, H, W) or one map (H, W)."""
        scores, counted = self.per_image(pred, target)
        add = torch.stack([scores[counted].sum(), counted.sum().double()]).cpu()
        self._state = self._state + add

    def state(self) -> torch.Tensor:
        """``[sum of per-image scores, number of images]`` as a float64 CPU tensor (2,)."""
        return self._state.clone()

    def merge(self, other: torch.Tensor | PaperMetric) -> PaperMetric:
        """Add another shard's state (a (2,) tensor or a :class:`PaperMetric`); returns ``self``.

        Raises:
            ValueError: if the state does not have shape (2,) or the metrics differ in kind.
        """
        if isinstance(other, PaperMetric):
            if (other.binary, other.ignore_index, other.void_to_class) != (
                    self.binary, self.ignore_index, self.void_to_class):
                raise ValueError(f"cannot merge {other.name} into {self.name}")
            other = other.state()
        other_t = torch.as_tensor(other, dtype=torch.float64).cpu()
        if other_t.shape != (2,):
            raise ValueError(f"state must have shape (2,), got {tuple(other_t.shape)}")
        self._state = self._state + other_t
        return self

    def all_reduce(self) -> PaperMetric:
        """Sum the state over the default process group (no-op without one); returns ``self``."""
        self._state = all_reduce_sum(self._state)
        return self

    def compute(self) -> dict[str, float]:
        """``{name: mean per-image score in percent}`` (NaN before any image)."""
        total, count = self._state.tolist()
        return {self.name: 100.0 * total / count if count > 0 else float("nan")}
