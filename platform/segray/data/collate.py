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
    GPU prefer), ``mask`` int64 (B, H, W), ``image_labels`` float32 (B, K). The ``key`` column is
    dropped. Runs in Ray's prefetch threads: CPU-only, no shared state.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        image = torch.from_numpy(np.array(batch["image"], dtype=np.uint8))  # (B, H, W, 3)
        return {
            "image": image.permute(0, 3, 1, 2),  # (B, 3, H, W), channels-last strides
            "mask": torch.from_numpy(np.asarray(batch["mask"]).astype(np.int64)),
            "image_labels": torch.from_numpy(np.asarray(batch["labels"]).astype(np.float32)),
        }


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
