"""Collate functions for ``iter_torch_batches`` over the segray streams (run in Ray's prefetch
threads: CPU-only, no shared state)."""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

__all__ = ["EvalCollate", "TrainCollate", "eval_collate", "train_collate"]


class TrainCollate(NumpyBatchCollateFn):
    """Collate for ``iter_torch_batches`` over :func:`train_dataset`.

    Returns a dict: ``image`` uint8 (B, 3, H, W) (channels-last memory, which convolutions on
    GPU prefer), ``mask`` (B, H, W) as stored (uint8; int32 for datasets past 256 labels, which
    torch cannot index with uint16), ``image_labels`` float32 (B, K), ``valid`` int16 (B, 2)
    (each crop's size before padding). The ``key`` column is dropped. Masks stay narrow on the
    host and on the way to the device (an eighth of int64's bytes); the training step widens
    them there (:meth:`segray.engine.StepRunner.prepare`).
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        mask = np.asarray(batch["mask"])
        return {
            "image": _tensor(batch["image"]).permute(0, 3, 1, 2),  # channels-last strides
            "mask": _tensor(mask if mask.dtype == np.uint8 else mask.astype(np.int32)),
            "image_labels": torch.from_numpy(np.asarray(batch["labels"]).astype(np.float32)),
            "valid": _tensor(np.asarray(batch["valid"], dtype=np.int16).reshape(-1, 2)),
        }


def _tensor(array: np.ndarray) -> Any:
    """A tensor over ``array``, copied only when it is read-only (a block in Ray's object store)."""
    import torch

    array = np.asarray(array)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class EvalCollate(NumpyBatchCollateFn):
    """Collate for :func:`eval_dataset`: stacked tensors when all images share a size, else lists.

    Returns a dict: ``key`` list[str]; ``image`` uint8 (B, 3, H, W) or a list of (3, H_i, W_i);
    ``mask`` int64 (B, H, W) or a list of (H_i, W_i). Lists are not moved to the device by Ray;
    move each tensor yourself.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        images, masks = batch["image"], batch["mask"]
        out: dict[str, Any] = {"key": [str(k) for k in batch["key"]]}
        if isinstance(images, np.ndarray) and images.dtype != object and images.ndim == 4:
            out["image"] = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # (B, 3, H, W)
            out["mask"] = torch.from_numpy(np.asarray(masks).astype(np.int64))
        else:
            out["image"] = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
            out["mask"] = [torch.from_numpy(np.asarray(m).astype(np.int64)) for m in masks]
        return out


train_collate = TrainCollate()
eval_collate = EvalCollate()
