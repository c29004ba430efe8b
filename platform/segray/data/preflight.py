"""Checks of a split before it is streamed, from shard footers and ``key`` columns only.

A stream reads each shard whole inside a Ray task, so a problem found there surfaces late and
far from the driver. What can be known from the manifest and the shards' footers is checked
first, in the driver: every listed shard exists with its recorded size and is Parquet with its
recorded number of rows, holds the columns the stream needs, and no key repeats within the
dataset. Only a few small reads per
shard (footer, ``key`` column), several shards at a time, so this is cheap on S3 too.

Example:
    >>> info = open_dataset("/data/synthetic")                            # doctest: +SKIP
    >>> drop, exclude = check_split(info, "train", ["key", "image", "mask"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from segray import storage
from segray.data.decode import BadSampleError
from segray.data.manifest import DatasetError, DatasetInfo, ShardInfo, manifest_uri
from segray.data.skips import SkipCounter, count_skip


@dataclass(frozen=True)
class ShardScan:
    """What a shard holds, read from its footer and ``key`` column only (no image is read).

    Attributes:
        uri: the shard's URI.
        split: its split.
        columns: its column names.
        keys: its keys in row order (empty when it has no ``key`` column).
        rows: its number of rows.
    """

    uri: str
    split: str
    columns: tuple[str, ...]
    keys: tuple[str, ...]
    rows: int


_SCANS: dict[tuple[str, str, int], ShardScan] = {}


def scan_shards(info: DatasetInfo, splits: list[str] | None = None,
                threads: int = 8) -> list[ShardScan]:
    """Read the schema and keys of every shard of ``splits`` (all when None), in manifest order.

    Only each file's footer and ``key`` column are fetched, several shards at a time, so this
    costs a few small reads per shard even on S3. Results are cached per shard and checksum.

    Raises:
        FileNotFoundError: a listed shard is missing (names it).
        DatasetError: a shard's size or row count differs from the manifest (names it), or it
            is not Parquet.
    """
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(name, shard) for name in (splits or info.split_names)
            for shard in info._shards(name)]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        return list(pool.map(lambda job: _scan_one(info, *job), jobs))


def _scan_one(info: DatasetInfo, split: str, shard: ShardInfo) -> ShardScan:
    uri = storage.join(info.uri, shard.path)
    cache_key = (uri, shard.sha256, shard.bytes)
    scan = _SCANS.get(cache_key) or _read_scan(info, uri, split, shard)
    _SCANS[cache_key] = scan
    if scan.rows != shard.rows:
        # The stream's batches and every count (rows per epoch, steps, skips) go by the
        # manifest: a shard holding fewer rows would pass for a full one.
        raise DatasetError(f"shard {uri} of split {split!r} holds {scan.rows} rows, the manifest "
                           f"says {shard.rows}; the manifest does not describe this file: "
                           "re-create the dataset with `python jobs/prepare_data.py`")
    return scan


def _read_scan(info: DatasetInfo, uri: str, split: str, shard: ShardInfo) -> ShardScan:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    try:
        f = fs.open_input_file(path)
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or "not found" in str(e).lower():
            raise FileNotFoundError(f"shard {uri} of split {split!r}, listed in "
                                    f"{manifest_uri(info.uri)}, is missing") from e
        raise
    with f:
        if f.size() != shard.bytes:
            raise DatasetError(f"shard {uri} of split {split!r} has {f.size()} bytes, the manifest "
                             f"says {shard.bytes}; the file changed after the dataset was written; "
                             f"re-create the dataset with `python jobs/prepare_data.py`")
        try:
            parquet = pq.ParquetFile(f)
            columns = tuple(parquet.schema_arrow.names)
            keys = (tuple(str(k) for k in parquet.read(columns=["key"]).column("key").to_pylist())
                    if "key" in columns else ())
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DatasetError(f"shard {uri} of split {split!r} is not a readable Parquet file "
                             f"({type(e).__name__}: {e}); re-create the dataset") from e
    return ShardScan(uri, split, columns, keys, parquet.metadata.num_rows)


def duplicate_keys(scans: list[ShardScan]) -> list[tuple[str, str, str, int]]:
    """Keys that occur more than once, in scan order.

    Returns:
        ``(key, first_shard, repeat_shard, repeat_row)`` for every occurrence after the first:
        ``repeat_row`` is the repeat's row number in its shard (both shards may be the same file).

    Example:
        >>> a = ShardScan("a.parquet", "train", ("key",), ("x", "y"), 2)
        >>> b = ShardScan("b.parquet", "val", ("key",), ("y",), 1)
        >>> duplicate_keys([a, b])
        [('y', 'a.parquet', 'b.parquet', 0)]
    """
    first: dict[str, str] = {}
    out = []
    for scan in scans:
        for row, key in enumerate(scan.keys):
            if key in first:
                out.append((key, first[key], scan.uri, row))
            else:
                first[key] = scan.uri
    return out


def check_split(info: DatasetInfo, split: str, columns: Sequence[str], *, skip: bool = False,
                counter: SkipCounter | None = None) -> tuple[set[str], dict[str, frozenset[int]]]:
    """Check the shards of ``split`` before streaming them: columns present, keys unique.

    Reads only shard footers and ``key`` columns (see :func:`scan_shards`).
    A key of ``split`` may not occur twice, nor in another split: one image in two splits leaks
    between them. In skip mode the first occurrence (in manifest order) is kept.

    Args:
        info: the dataset.
        split: the split about to be streamed.
        columns: the columns the stream reads.
        skip: instead of raising, plan to skip (and count) the affected rows of ``split``: every
            row of a shard lacking a column, and each repeat of a key after its first occurrence
            (a first occurrence in ``split`` repeated elsewhere is the other split's to skip).
        counter: where skipped rows are counted.

    Returns:
        ``(shards_to_drop, rows_to_skip)``: shard URIs to leave out entirely, and per shard URI
        the row numbers to leave out (rows, not keys: a key repeated within one shard keeps its
        first row).

    Raises:
        DatasetError: a shard lacks a column (names split and shard); in skip mode, every row of
            ``split`` is to be skipped (names the split and the count). Whatever ``skip`` says,
            a shard whose size or row count differs from the manifest (names it).
        BadSampleError: a key repeats (names shard, key and fix).
        FileNotFoundError: a listed shard is missing (names it).
    """
    scans = scan_shards(info)
    drop: set[str] = set()
    exclude: dict[str, set[int]] = {}
    skipped: list[tuple[BadSampleError, int]] = []  # with each row's number in its shard
    for scan in scans:
        missing = [c for c in columns if c not in scan.columns]
        if scan.split != split or not missing:
            continue
        reason = (f"shard has no column(s) {', '.join(map(repr, missing))} (it has: "
                  f"{', '.join(scan.columns)}); a segray shard holds key, image, mask, labels, "
                  "height, width: re-create the dataset with `python jobs/prepare_data.py`")
        if not skip:
            raise DatasetError(f"split {split!r}: shard {scan.uri}: {reason}")
        drop.add(scan.uri)
        skipped += [(BadSampleError(scan.uri, k, reason), i)
                    for i, k in enumerate(scan.keys or [f"<row {i}>" for i in range(scan.rows)])]
    ours = {scan.uri for scan in scans if scan.split == split}
    for key, first, repeat, row in duplicate_keys(scans):
        if first not in ours and repeat not in ours:
            continue  # another split's problem, reported when that split is streamed
        reason = (f"duplicate key: {key!r} also occurs in {first}; keys must be unique across "
                  "the dataset (fix the source or its converter and re-create the dataset)")
        if not skip:
            raise BadSampleError(repeat, key, reason)
        if repeat in ours and repeat not in drop:
            exclude.setdefault(repeat, set()).add(row)
            skipped.append((BadSampleError(repeat, key, reason), row))
    for error, row in skipped:
        count_skip(error, counter, info.name, split, row=row)
    if skipped and len(skipped) >= info.num_rows(split):
        # Streaming nothing would fail later, in every worker, as a batch-size problem.
        first = skipped[0][0]
        raise DatasetError(f"split {split!r} of {info.uri} has no usable row: all {len(skipped)} "
                           f"rows are skipped (data.on_bad_sample=skip), e.g. {first.key!r} in "
                           f"{first.shard}: {first.reason}")
    return drop, {uri: frozenset(rows) for uri, rows in exclude.items()}
