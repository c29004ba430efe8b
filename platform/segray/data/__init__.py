"""The data plane: Parquet shards + ``dataset.json``, converters, the synthetic dataset, Ray streams.

Front door: :func:`open_dataset` (a folder or ``s3://`` URI -> :class:`DatasetInfo`). Making data:
:func:`make_synthetic` / :func:`ensure_synthetic`, :func:`convert_folder`, :class:`DatasetWriter`.
Reading it: :func:`train_dataset`, :func:`eval_dataset`, :func:`read_split` (Ray Data) and
:func:`iter_rows` (plain pyarrow). The Ray-based names are imported on first use, so tools that only
read manifests or decode images do not import Ray.
"""

from __future__ import annotations

from typing import Any

from segray.data.decode import (
    BadSampleError,
    decode_image,
    decode_mask,
    multi_hot,
    open_image,
    random_scale_crop,
    validate_sample,
)
from segray.data.folder import convert_folder
from segray.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    DatasetError,
    DatasetInfo,
    ShardInfo,
    default_palette,
    open_dataset,
    verify_shards,
)
from segray.data.shards import DatasetWriter, decode_mask_png, encode_mask_png
from segray.data.synthetic import ensure_synthetic, make_synthetic

_STREAM_NAMES = (
    "EvalCollate",
    "SkipCounter",
    "TrainCollate",
    "eval_collate",
    "eval_dataset",
    "eval_rows",
    "iter_rows",
    "read_split",
    "train_collate",
    "train_dataset",
)

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "BadSampleError",
    "DatasetError",
    "DatasetInfo",
    "DatasetWriter",
    "ShardInfo",
    "convert_folder",
    "decode_image",
    "open_image",
    "decode_mask",
    "decode_mask_png",
    "default_palette",
    "encode_mask_png",
    "ensure_synthetic",
    "make_synthetic",
    "multi_hot",
    "open_dataset",
    "random_scale_crop",
    "validate_sample",
    "verify_shards",
    *_STREAM_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in ("eval_dataset", "eval_rows"):
        from segray.data import eval_stream

        return getattr(eval_stream, name)
    if name in _STREAM_NAMES:
        from segray.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'segray.data' has no attribute {name!r}")
