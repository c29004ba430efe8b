"""Ray Data streams over a dataset's shards: decode + random scale/crop on CPU workers.

Only the shards named by the manifest are read (never a folder listing). Training rows come out
fixed-size, so batches stack without padding; flips and photometric augmentation happen later on
the training device (:mod:`segray.augment`).

Training rows (``train_dataset``): ``key`` str, ``image`` uint8 (H, W, 3), ``mask`` uint8 (H, W)
(all ``ignore_index`` for unlabelled streams), ``labels`` uint8 (K,) multi-hot, ``valid`` int16
(2,): the crop's height and width before padding (at the bottom/right), so the device can pad
after normalisation as MMSeg does (:class:`segray.augment.TrainAugment`). Evaluation rows
(:func:`~segray.data.eval_stream.eval_dataset`): ``key``, full-size ``image`` (H_i, W_i, 3) and
``mask`` (H_i, W_i).

Randomness: each row's rescale/crop is drawn from ``(seed, execution index, key)``. Ray Data
counts executions of a dataset, so every epoch (every pass over the stream, also through
``streaming_split`` in Ray Train) gets new crops, and a run with the same seed gets the same ones.

Integrity: only the shards the manifest lists are read, each whole and checked against its
recorded size and SHA-256 (a mismatch is an error naming the shard, in any mode). Before a stream
is built, :func:`~segray.data.preflight.check_split` reads the shards' footers and keys: a
missing column, or a key repeated within the split or shared with another split, is reported
there before any Ray work (with ``"skip"``, those rows are skipped and counted instead).

Bad rows: with ``on_bad_sample="error"`` the first bad row stops the stream with a
:class:`~segray.data.decode.BadSampleError` naming its shard and key. With ``"skip"`` it is
dropped, logged as a warning by the worker, counted in the Prometheus counter
``segray_data_bad_samples`` (tags ``dataset``, ``split``) and recorded by a :class:`SkipCounter`,
a small named Ray actor every worker reports to, which the driver reads::

    counter = SkipCounter()
    ds = train_dataset(info, "train", crop=(64, 64), on_bad_sample="skip", skip_counter=counter)
    ...  # iterate
    counter.total, counter.records()[:3]

Example:
    >>> ds = train_dataset(info, "train", crop=(64, 64))                      # doctest: +SKIP
    >>> batch = next(iter(ds.iter_torch_batches(batch_size=8, collate_fn=train_collate)))
    >>> batch["image"].shape, batch["mask"].dtype                              # doctest: +SKIP
    (torch.Size([8, 3, 64, 64]), torch.int64)
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from segray import storage
from segray.data.collate import (  # noqa: F401 - re-exported: the stream's collates
    EvalCollate,
    TrainCollate,
    eval_collate,
    train_collate,
)
from segray.data.decode import (
    MASK_FILTERS,
    RESAMPLE_FILTERS,
    BadSampleError,
    multi_hot,
    random_scale_crop,
    validate_sample,
)
from segray.data.manifest import (
    DatasetError,
    DatasetInfo,
    ShardInfo,
    check_shard_bytes,
    read_shard,
)
from segray.data.preflight import check_split
from segray.data.skips import SkipCounter, count_skip

log = logging.getLogger(__name__)

BAD_SAMPLE_MODES = ("error", "skip")
BATCH_BYTES = 2 * 2**20  # of crops per decode batch (see train_dataset's batch_size)


def _key_seed(key: str) -> int:
    # Python's hash() is salted per process; the augmentation must not depend on the worker.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _scheme(info: DatasetInfo) -> str:
    # Ray's `path` column has no scheme; errors should name a URI the user can open.
    return "s3://" if storage.is_s3(info.uri) else ""


def _mask_dtype(info: DatasetInfo) -> type:
    return np.uint8 if max(info.num_classes, info.ignore_index + 1) <= 256 else np.uint16


def read_split(info: DatasetInfo, split: str, *, columns: Sequence[str] | None = None,
               shuffle_seed: int | None = None) -> ray.data.Dataset:
    """The raw shard rows of ``split`` as a Ray Dataset, plus a ``path`` column (the shard's URI).

    For tools: rows are neither decoded nor checked, but each shard is read whole and checked
    against the manifest's size and SHA-256 before any of its rows is used, as in every stream
    (one read task per shard).

    Args:
        info: the dataset.
        split: split name.
        columns: columns to read (all when None); ``path`` is always added.
        shuffle_seed: if given, shard order is shuffled, differently on every execution (and
            the same way for the same seed and execution).

    Returns:
        A lazy Dataset of the shards' columns (Arrow types kept) and ``path``.

    Raises:
        KeyError: unknown split (names the ones that exist).
        DatasetError: while executing, a shard whose bytes differ from the manifest, or that
            lacks a requested column (names it).
    """
    shards = dict(zip(info.shard_uris(split), info.splits[split], strict=True))
    ds = ray.data.range(len(shards), override_num_blocks=len(shards))
    return _one_stage(ds.map_batches(
        _raw_shard, batch_format="numpy", batch_size=1, udf_modifying_row_count=True,
        fn_kwargs={"shards": shards, "split": split, "seed": shuffle_seed,
                   "columns": [c for c in columns if c != "path"] if columns else None}))


def _raw_shard(items: dict[str, np.ndarray], *, shards: dict[str, ShardInfo], split: str,
               columns: list[str] | None, seed: int | None) -> Iterator[pa.Table]:
    """Read the shard at position ``items["id"]`` of this execution's shard order, verified."""
    uris = list(shards)
    order = np.arange(len(uris))
    if seed is not None:
        execution = getattr(ray.data.DataContext.get_current(), "_execution_idx", 0)
        order = np.random.default_rng([seed, execution]).permutation(len(uris))
    for i in items["id"]:
        uri = uris[order[int(i)]]
        reader = pq.ParquetFile(pa.BufferReader(_verified_shard(uri, shards[uri], split)))
        missing = [c for c in columns or () if c not in reader.schema_arrow.names]
        if missing:
            raise DatasetError(f"shard {uri} of split {split!r} has no column(s) "
                               f"{', '.join(map(repr, missing))} (it has: "
                               f"{', '.join(reader.schema_arrow.names)})")
        for record_batch in reader.iter_batches(columns=columns):
            table = pa.Table.from_batches([record_batch])
            yield table.append_column("path", pa.array([uri] * table.num_rows, pa.string()))


def _train_batch(batch: dict[str, np.ndarray], *, num_classes: int, ignore_index: int,
                 crop: tuple[int, int], scale_range: tuple[float, float], seed: int,
                 cat_max_ratio: float, labeled: bool, on_bad_sample: str,
                 base_scale: tuple[int, int] | None, scale_choices: tuple[float, ...] | None,
                 resize: tuple[int, int] | None, resample: str, mask_resample: str,
                 copy: int,
                 counter: SkipCounter | None, dataset: str, split: str,
                 mask_dtype: type, scheme: str,
                 exclude: frozenset[int] = frozenset()) -> dict[str, np.ndarray]:
    execution = getattr(ray.data.DataContext.get_current(), "_execution_idx", 0)
    # Crops go straight into the batch's arrays: no list of crops and no stacked copy of it.
    n, (h, w) = len(batch["key"]), crop
    images, masks = np.empty((n, h, w, 3), np.uint8), np.empty((n, h, w), mask_dtype)
    labels, valid = np.zeros((n, num_classes), np.uint8), np.empty((n, 2), np.int16)
    keys: list[str] = []
    for i, key in enumerate(batch["key"]):
        if exclude and int(batch["row"][i]) in exclude:  # counted when the stream was built
            continue
        shard = scheme + str(batch["path"][i])
        try:
            mask_bytes = batch["mask"][i] if labeled else None
            if labeled and mask_bytes is None:
                raise BadSampleError(shard, key, "no mask, but this stream needs labelled rows "
                                                 "(use labeled=False for unlabelled splits)")
            image, mask = validate_sample(batch["image"][i], mask_bytes, num_classes=num_classes,
                                          ignore_index=ignore_index, shard=shard, key=key,
                                          labels=batch["labels"][i])
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            count_skip(e, counter, dataset, split, row=int(batch["row"][i]))
            continue
        rng = np.random.default_rng([seed, execution, copy, _key_seed(key)])
        image, mask, size = random_scale_crop(image, mask, crop, scale_range, rng,
                                              cat_max_ratio, ignore_index, base_scale=base_scale,
                                              scale_choices=scale_choices, resize=resize,
                                              resample=resample, mask_resample=mask_resample,
                                              with_valid=True)
        j = len(keys)
        images[j], masks[j], valid[j] = image, mask, size
        labels[j] = multi_hot(batch["labels"][i], num_classes)
        keys.append(key)
    kept = len(keys)
    return {"key": np.array(keys, dtype=object), "image": images[:kept], "mask": masks[:kept],
            "labels": labels[:kept], "valid": valid[:kept]}


def train_dataset(
    info: DatasetInfo,
    split: str,
    *,
    crop: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    seed: int = 0,
    on_bad_sample: Literal["error", "skip"] = "error",
    labeled: bool = True,
    cat_max_ratio: float = 1.0,
    skip_counter: SkipCounter | None = None,
    batch_size: int | None = None,
    base_scale: tuple[int, int] | None = None,
    scale_choices: tuple[float, ...] | None = None,
    resize: tuple[int, int] | None = None,
    resample: str = "cv2",
    mask_resample: str = "nearest",
    passes: int = 1,
) -> ray.data.Dataset:
    """A training stream of fixed-size crops (decode + random rescale + crop on CPU tasks).

    Args:
        info: the dataset.
        split: split name, e.g. ``train`` or ``unlabeled``.
        crop: output (height, width).
        scale_range: rescale ratios relative to each image's size.
        seed: base seed of shard order and crops (see the module docstring); rows within a
            shard keep their order, so add ``local_shuffle_buffer_size`` when iterating.
        on_bad_sample: ``"error"`` stops at the first bad row; ``"skip"`` drops and counts it.
        labeled: require masks; with False the mask column is not read and masks are all ignore.
        cat_max_ratio: largest share one class may take of a crop (1.0 disables the retry).
        skip_counter: where skipped rows are counted (see :class:`SkipCounter`).
        batch_size: rows a decode task decodes and hands to Ray Data at a time; None: about
            ``BATCH_BYTES`` of crops (32 rows of 128x128, 2 of 512x512). Each batch costs a
            conversion to Arrow and a join into the task's block, so larger batches stream
            faster (256 rows of 128x128 crops: 10 % more images/s than 32) but hold more
            memory: the data benchmark's streaming-memory ratio (10x vs 1x) rose from about
            1.14x to 1.19x, against a goal of 1.2x.
        base_scale: mmseg ``img_scale`` (long, short): ratios scale it and the image is resized
            keeping its aspect to fit; None scales the image's own size.
        scale_choices: discrete ratios drawn uniformly instead of the ``scale_range`` interval.
        resize: (h, w) every image is resized to before the drawn ratio scales it, aspect not
            kept (mmseg ``keep_ratio=False``); excludes ``base_scale``.
        resample: image filter of the rescale, ``"cv2"`` (mmcv) or ``"pillow"`` (PIL, as
            torchvision): see :func:`~segray.data.decode.random_scale_crop`.
        mask_resample: label filter of the rescale, ``"nearest"`` (pixel centres),
            ``"cv2_nearest"`` or ``"cv2_area"`` (OpenCV's, binary maps): see
            :func:`~segray.data.decode.random_scale_crop`.
        passes: epochs one execution of the stream covers. Every execution restarts Ray Data's
            executor and the split coordinator (seconds); on a small dataset several epochs per
            execution keep the accelerator fed. Each pass draws its own crops.

    Returns:
        A lazy Dataset with columns ``key``, ``image`` uint8 (H, W, 3), ``mask`` (H, W),
        ``labels`` uint8 (K,) and ``valid`` int16 (2,) (the crop's size before padding).

    Raises:
        ValueError: bad ``on_bad_sample``, ``crop``, ``resample`` or ``mask_resample``; with
            ``on_bad_sample="error"`` also a shard without a needed column or a repeated key (see
            :func:`~segray.data.preflight.check_split`). Bad rows raise
            :class:`~segray.data.decode.BadSampleError` while streaming; a shard whose bytes
            differ from the manifest raises ``ValueError`` in either mode.
        KeyError: unknown split.
    """
    if on_bad_sample not in BAD_SAMPLE_MODES:
        raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_MODES}, got {on_bad_sample!r}")
    if len(crop) != 2 or min(int(c) for c in crop) < 1:
        raise ValueError(f"crop must be (height, width) with both >= 1, got {crop}")
    columns = ["key", "image", "labels"] + (["mask"] if labeled else [])
    if on_bad_sample == "skip" and skip_counter is None:
        skip_counter = SkipCounter()
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"resample must be one of {RESAMPLE_FILTERS}, got {resample!r}")
    if mask_resample not in MASK_FILTERS:
        raise ValueError(f"mask_resample must be one of {MASK_FILTERS}, got {mask_resample!r}")
    fn_kwargs = {"num_classes": info.num_classes, "ignore_index": info.ignore_index,
                 "crop": (int(crop[0]), int(crop[1])),
                 "scale_range": (float(scale_range[0]), float(scale_range[1])), "seed": seed,
                 "cat_max_ratio": cat_max_ratio, "labeled": labeled,
                 "on_bad_sample": on_bad_sample, "counter": skip_counter,
                 "dataset": info.name, "split": split, "mask_dtype": _mask_dtype(info),
                 "scheme": _scheme(info),
                 "base_scale": tuple(int(v) for v in base_scale) if base_scale else None,
                 "scale_choices": tuple(float(v) for v in scale_choices) if scale_choices else None,
                 "resize": tuple(int(v) for v in resize) if resize else None,
                 "resample": resample, "mask_resample": mask_resample}
    fn_kwargs["scheme"] = ""  # the work items below carry full URIs
    drop, exclude = check_split(info, split, columns, skip=on_bad_sample == "skip",
                                counter=skip_counter)
    # One work item per (pass, shard), shard order permuted per pass. Each item is its own block,
    # so decode tasks run in parallel (Ray Data joins a task's batches into blocks of up to
    # DataContext.target_max_block_size, so a shard's crops usually arrive together). This is
    # one Ray Data execution for any number of passes (a union of per-pass reads was measured
    # at 80 s to the first batch for 25 passes vs 6 s for one).
    rng = np.random.default_rng([seed, _key_seed(split)])
    shards = dict(zip(info.shard_uris(split), info.splits[split], strict=True))
    uris = list(shards)
    items = [{"uri": uris[i], "copy": copy} for copy in range(passes)
             for i in rng.permutation(len(uris)) if uris[i] not in drop]
    if not items:
        raise DatasetError(f"no shard of split {split!r} of {info.uri} is usable: all were "
                           "skipped")
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return _one_stage(ds.map_batches(
        _train_shard, batch_format="numpy", batch_size=1, udf_modifying_row_count=True,
        fn_kwargs={"columns": columns, "shards": shards, "split": split,
                   "rows": batch_size or batch_rows(crop, fn_kwargs["mask_dtype"]),
                   "exclude": exclude, "kwargs": fn_kwargs}))


def batch_rows(crop: tuple[int, int], mask_dtype: type = np.uint8) -> int:
    """Rows of ``crop``-sized training crops that make a decode batch of about ``BATCH_BYTES``.

    Example:
        >>> batch_rows((128, 128)), batch_rows((512, 512)), batch_rows((1024, 2048), np.uint16)
        (32, 2, 1)
    """
    row = int(crop[0]) * int(crop[1]) * (3 + np.dtype(mask_dtype).itemsize)
    return int(min(1024, max(1, BATCH_BYTES // row)))


def _one_stage(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` (one map stage over work items) without Ray Data's per-operator CPU reservation.

    The reservation keeps CPUs for each stage of a multi-stage pipeline. These streams have one
    stage, and on a small node it left decode tasks waiting between work items: the 2-CPU data
    benchmark streamed 1,000 images/s with it and 1,480 without.
    """
    ds.context.op_resource_reservation_enabled = False
    return ds


def _verified_shard(uri: str, shard: ShardInfo, split: str) -> bytes:
    """A shard's whole bytes, checked against the manifest (:func:`check_shard_bytes`)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:  # it was there when the stream was built
        raise DatasetError(f"shard {uri} of split {split!r} is listed by the manifest but is "
                           "gone; re-create the dataset") from e
    check_shard_bytes(data, uri, shard, split)
    return data


def _shard_batches(uri: str, shard: ShardInfo, split: str, columns: list[str],
                   rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows of one shard, ``rows`` at a time, as NumPy columns plus ``path`` (the shard) and
    ``row`` (each row's number in the shard).

    The shard is fetched whole (one GET on S3, rather than one per row group) and checked against
    the manifest before any row is used; a decode task holds one shard in memory.
    """
    data = _verified_shard(uri, shard, split)
    start = 0
    for record_batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=rows,
                                                                          columns=columns):
        batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False)
                 for name in columns}
        batch["path"] = np.full(record_batch.num_rows, uri, dtype=object)
        batch["row"] = np.arange(start, start + record_batch.num_rows)
        start += record_batch.num_rows
        yield batch


def _train_shard(items: dict[str, np.ndarray], *, columns: list[str], rows: int,
                 shards: dict[str, ShardInfo], split: str, exclude: dict[str, frozenset[int]],
                 kwargs: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
    """Read one shard (a work item) and yield decoded, cropped batches of ``rows`` rows."""
    for uri, copy in zip(items["uri"], items["copy"]):
        uri = str(uri)
        for batch in _shard_batches(uri, shards[uri], split, columns, rows):
            yield _train_batch(batch, copy=int(copy), exclude=exclude.get(uri, frozenset()),
                               **kwargs)


def iter_rows(info: DatasetInfo, split: str, columns: Sequence[str] | None = None, *,
              with_shard: bool = False) -> Iterator[dict[str, Any]]:
    """Iterate the raw rows of ``split`` with pyarrow, without Ray (for tools and tests).

    Each shard is read whole and checked against the manifest's size and SHA-256 first.

    Args:
        info: the dataset.
        split: split name.
        columns: columns to read (all when None).
        with_shard: add ``shard``, the URI of the row's shard (for errors naming it).

    Yields:
        One dict per row (``key``, ``image`` bytes, ``mask`` bytes or None, ``labels`` list,
        ``height``, ``width`` and any extra columns), in manifest order.

    Raises:
        ValueError: a shard's bytes differ from the manifest (names it).
    """
    for uri, shard in zip(info.shard_uris(split), info.splits[split], strict=True):
        reader = pq.ParquetFile(pa.BufferReader(read_shard(info, split, shard)))
        for record_batch in reader.iter_batches(batch_size=32,
                                                columns=list(columns) if columns else None):
            for row in record_batch.to_pylist():
                yield dict(row, shard=uri) if with_shard else row
