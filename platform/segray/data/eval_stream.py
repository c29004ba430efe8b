"""Evaluation streams: full-size decoded images in shard order, no augmentation.

:func:`eval_dataset` builds the Ray Data stream (shards verified as the training stream's are);
:func:`eval_rows` gives each Ray Train worker its disjoint share of it.

Example:
    >>> ds = eval_dataset(open_dataset("s3://bucket/ade20k"), "val")      # doctest: +SKIP
    >>> next(eval_rows(ds, rank=0, world=2))["image"].shape               # doctest: +SKIP
    (512, 683, 3)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from segray.data.decode import BadSampleError, validate_sample
from segray.data.manifest import DatasetInfo, ShardInfo
from segray.data.preflight import check_split
from segray.data.stream import _key_seed, _mask_dtype, _one_stage, _shard_batches


def _eval_batch(batch: dict[str, np.ndarray], *, num_classes: int, ignore_index: int,
                mask_dtype: type, scheme: str, labeled: bool) -> dict[str, np.ndarray]:
    n = len(batch["key"])
    images, masks = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i, key in enumerate(batch["key"]):
        shard = scheme + str(batch["path"][i])
        if labeled and batch["mask"][i] is None:
            raise BadSampleError(shard, key, "no mask, but evaluation needs labelled rows (is "
                                             "data.val_split an unlabelled split?)")
        image, mask = validate_sample(batch["image"][i], batch["mask"][i],
                                      num_classes=num_classes, ignore_index=ignore_index,
                                      shard=shard, key=key)
        images[i] = image
        masks[i] = (np.full(image.shape[:2], ignore_index, mask_dtype) if mask is None
                    else mask.astype(mask_dtype, copy=False))
    return {"key": np.asarray(batch["key"], dtype=object), "image": images, "mask": masks}


def eval_dataset(info: DatasetInfo, split: str, *, batch_size: int = 16,
                 labeled: bool = True) -> ray.data.Dataset:
    """An evaluation stream: full-size decoded images, no augmentation, in shard order.

    Bad rows always raise (an evaluation must never silently drop images), whatever
    ``data.on_bad_sample`` says. A row without a mask is one of them unless ``labeled=False``
    (prediction only), where it gets an all-ignore mask.

    Returns:
        A lazy Dataset with columns ``key``, ``image`` uint8 (H_i, W_i, 3) and ``mask`` (H_i, W_i).
    """
    columns = ["key", "image", "mask"]
    check_split(info, split, columns)
    shards = dict(zip(info.shard_uris(split), info.splits[split], strict=True))
    items = [{"uri": uri} for uri in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return _one_stage(ds.map_batches(
        _eval_shard, batch_format="numpy", batch_size=1, udf_modifying_row_count=True,
        fn_kwargs={"rows": batch_size, "shards": shards, "split": split, "columns": columns,
                   "kwargs": {"num_classes": info.num_classes, "ignore_index": info.ignore_index,
                              "mask_dtype": _mask_dtype(info), "scheme": "",
                              "labeled": labeled}}))


def _eval_shard(items: dict[str, np.ndarray], *, rows: int, shards: dict[str, ShardInfo],
                split: str, columns: list[str],
                kwargs: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Read one verified shard and yield decoded full-size rows, ``rows`` at a time."""
    for uri in items["uri"]:
        for batch in _shard_batches(str(uri), shards[str(uri)], split, columns, rows):
            yield _eval_batch(batch, **kwargs)


def eval_rows(iterator: Any, *, rank: int = 0, world: int = 1,
              batch_size: int = 16) -> Iterator[dict[str, Any]]:
    """This worker's share of an :func:`eval_dataset` stream, one row at a time.

    Every worker iterates the whole (unsplit) stream and keeps the rows whose key hashes to its
    rank, so the shares are disjoint and complete whatever order Ray Data delivers rows in.

    Args:
        iterator: a ``ray.data.Dataset`` or ``DataIterator`` (e.g. ``get_dataset_shard("val")``)
            over :func:`eval_dataset`.
        rank: this worker's rank.
        world: number of workers.
        batch_size: rows fetched per batch.

    Yields:
        ``{"key": str, "image": uint8 (H, W, 3), "mask": (H, W)}``.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    for batch in iterator.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            if world == 1 or _key_seed(str(key)) % world == rank:
                yield {"key": str(key), "image": batch["image"][i], "mask": batch["mask"][i]}
