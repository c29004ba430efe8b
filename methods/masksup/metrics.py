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

The official code scores at 224x224, not at the image's own size: the network's 224x224
prediction against ground truth resized by OpenCV (:func:`official_target_resize`: nearest for
NYUDv2, pixel-area averaging of the {0, 1} mask for GLaS and polyps). With ``score_size`` set,
:class:`PaperMetric` does the same: :func:`segray.evaluation.evaluate` hands it predictions at
``score_size`` and it resizes the targets.

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


def _area_weights(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) share of each source pixel in each output pixel's footprint (rows sum to 1)."""
    scale = n_in / n_out
    edges = torch.arange(n_out + 1, dtype=torch.float64, device=device) * scale
    src = torch.arange(n_in, dtype=torch.float64, device=device)[None]
    overlap = torch.minimum(edges[1:, None], src + 1) - torch.maximum(edges[:-1, None], src)
    return overlap.clamp_min(0) / scale


def official_target_resize(target: torch.Tensor, size: tuple[int, int], *, binary: bool,
                           ignore_index: int = 255) -> torch.Tensor:
    """Resize class-id maps (B, H, W) or (H, W) to ``size`` as the official MaskSup code resizes
    its labels.

    - Multi-class (NYUDv2, ``cv2.INTER_NEAREST``): output pixel ``d`` takes source pixel
      ``floor(d * (1 / (size / H)))`` computed in double precision, as OpenCV does. Exact.
    - Binary (GLaS, polyps, ``cv2.INTER_AREA`` on the {0, 1} mask): each output pixel is the
      foreground share of its footprint, fractional pixel overlaps included, rounded as OpenCV
      rounds: a tie (0.5, to float32 precision) goes to background, except in an exact 2x
      reduction, whose fast path rounds it up. Against OpenCV 5, reducing to 224x224: equal on
      384x288 (CVC-ClinicDB), 775x522 (GLaS), 448x448, 672x448 and 896x672 masks; up to 3 pixels
      in 10^4 differ on others (OpenCV sums in float32). Enlarging (no official dataset is
      smaller than 224) OpenCV uses two-tap weights instead, and up to 5 % of a noisy mask
      differs. Ignored pixels stay ignored where the nearest resize puts them.

    Args:
        target: integer class ids (B, H, W) or (H, W).
        size: (height, width), both >= 1.
        binary: area averaging of the foreground (class 1) instead of nearest.
        ignore_index: the ignore value (binary only).

    Returns:
        ``target``'s batch shape with ``size``, in ``target``'s dtype.

    Raises:
        ValueError: ``target`` is not 2-D or 3-D, or ``size`` is not two sizes >= 1.
    """
    if target.ndim not in (2, 3):
        raise ValueError(f"target must be (B, H, W) or (H, W), got {tuple(target.shape)}")
    if len(size) != 2 or min(int(v) for v in size) < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {size}")
    size = (int(size[0]), int(size[1]))
    batch = target.reshape(-1, *target.shape[-2:]).long()
    h, w = batch.shape[-2:]

    def nearest_index(n_in: int, n_out: int) -> torch.Tensor:
        step = 1.0 / (n_out / n_in)  # in double, as OpenCV (which floors 26.999... to 26)
        index = torch.floor(torch.arange(n_out, dtype=torch.float64) * step).long()
        return index.clamp_max(n_in - 1).to(batch.device)

    out = batch[:, nearest_index(h, size[0])][:, :, nearest_index(w, size[1])]
    if binary:
        wy = _area_weights(h, size[0], batch.device)
        wx = _area_weights(w, size[1], batch.device)
        share = wy @ (batch == 1).double() @ wx.T  # (B, *size)
        tie = (share - 0.5).abs() <= 1e-6
        exact_half = (h, w) == (2 * size[0], 2 * size[1])
        fg = (share > 0.5) & ~tie | (tie & exact_half)
        out = fg.long().masked_fill(out == ignore_index, ignore_index)
    return out.reshape(*target.shape[:-2], *size).to(target.dtype)


class PaperMetric:
    """Accumulates the paper's per-image score (see the module docstring).

    Args:
        binary: foreground IoU (class 1 is foreground) instead of micro-Jaccard.
        ignore_index: target value left out of every image.
        void_to_class: count ``ignore_index`` pixels as this class instead (None: leave them out).
        score_size: (H, W) the official code scores at; predictions come at this size and
            targets of another size are resized to it (:func:`official_target_resize`). None:
            scored at the size they come in. :func:`segray.evaluation.evaluate` reads it.
    """

    def __init__(self, binary: bool, ignore_index: int = 255,
                 void_to_class: int | None = None,
                 score_size: tuple[int, int] | None = None) -> None:
        self.binary = bool(binary)
        self.ignore_index = int(ignore_index)
        self.void_to_class = None if void_to_class is None else int(void_to_class)
        self.score_size = None if score_size is None else (int(score_size[0]), int(score_size[1]))
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
            target: integer class ids of the same shape, or of any size with ``score_size``
                (then ``pred`` is at ``score_size``).

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
        if self.score_size is not None and target.ndim in (2, 3):
            if tuple(pred.shape[-2:]) != self.score_size:
                raise ValueError(f"{self.name} scores predictions at {self.score_size}, got "
                                 f"{tuple(pred.shape)}")
            if tuple(target.shape[-2:]) != self.score_size:
                target = official_target_resize(target, self.score_size, binary=self.binary,
                                                ignore_index=self.ignore_index)
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
            if (other.binary, other.ignore_index, other.void_to_class, other.score_size) != (
                    self.binary, self.ignore_index, self.void_to_class, self.score_size):
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
