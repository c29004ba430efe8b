"""The dataset manifest: ``dataset.json`` beside the Parquet shards.

A dataset is a folder (local or ``s3://``) holding shards and one manifest that names them::

    {"format": "segray-dataset/1", "name": "synthetic",
     "classes": ["background", "disc", ...], "palette": [[0, 0, 0], ...], "ignore_index": 255,
     "splits": {"train": [{"path": "train-00000.parquet", "rows": 64,
                           "sha256": "...", "bytes": 123456}, ...], ...},
     "provenance": {"converter": "synthetic", ...}}

The manifest is written last, so its presence means every shard it names is complete. Readers
only ever read the shards it lists (never a folder listing), which keeps stale or half-written
files out of every run.

Example:
    >>> info = open_dataset("/data/synthetic")          # doctest: +SKIP
    >>> info.num_classes, info.num_rows("train")        # doctest: +SKIP
    (6, 192)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from segray import storage

FORMAT = "segray-dataset/1"
MANIFEST_NAME = "dataset.json"
class DatasetError(ValueError):
    """A dataset that cannot be used as it is: its manifest, a split or a shard is wrong.

    The message names the manifest, split or shard and says how to fix it. Jobs report it as an
    input error (exit code 2), not as a crash.

    Args:
        message: what is wrong, naming the manifest, split or shard.
        fix: what the user should change, when it is not re-creating the dataset (jobs say it
            after the message).
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix

    def __reduce__(self) -> tuple:
        # Ray pickles a worker's exception; the default reduce would drop ``fix``.
        return _dataset_error, (type(self), str(self), self.fix)


def _dataset_error(cls: type[DatasetError], message: str, fix: str | None) -> DatasetError:
    return cls(message, fix=fix)


_PREPARE_HINT = "create one with `python jobs/prepare_data.py synthetic <dst>` (or `folder <src> <dst>`)"


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet shard of a split.

    Attributes:
        path: file name relative to the dataset folder, e.g. ``train-00000.parquet``.
        rows: number of rows (images) in the shard.
        sha256: hex SHA-256 of the file's bytes.
        bytes: file size in bytes.
    """

    path: str
    rows: int
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes}


@dataclass
class DatasetInfo:
    """A dataset as described by its manifest.

    Attributes:
        uri: absolute local path or ``s3://`` URI of the dataset folder.
        name: dataset name.
        classes: class names in id order (class id = list index).
        palette: one ``[r, g, b]`` colour per class, for visualisation.
        ignore_index: mask value that is never supervised nor scored.
        splits: split name -> its shards, in read order.
        provenance: how the data was made (converter and its options, or the run and checkpoint
            that produced pseudo-masks).
    """

    uri: str
    name: str
    classes: list[str]
    palette: list[list[int]]
    ignore_index: int = 255
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of classes (ids ``0 .. num_classes - 1``)."""
        return len(self.classes)

    @property
    def split_names(self) -> list[str]:
        """Names of the splits present, in manifest order."""
        return list(self.splits)

    def has_split(self, split: str) -> bool:
        """Whether the dataset has a split called ``split``."""
        return split in self.splits

    def _shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(
                f"dataset {self.name!r} at {self.uri} has no split {split!r}; "
                f"it has: {', '.join(self.splits) or '(none)'}"
            )
        return self.splits[split]

    def shard_uris(self, split: str) -> list[str]:
        """Full URIs of the shards of ``split``, in read order.

        Raises:
            KeyError: naming the split and the splits that exist.
        """
        return [storage.join(self.uri, s.path) for s in self._shards(split)]

    def num_rows(self, split: str) -> int:
        """Number of rows (images) in ``split``, from the manifest (no file is read)."""
        return sum(s.rows for s in self._shards(split))

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict (``uri`` is not part of it: datasets can move)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "classes": list(self.classes),
            "palette": [list(map(int, c)) for c in self.palette],
            "ignore_index": int(self.ignore_index),
            "splits": {k: [s.to_dict() for s in v] for k, v in self.splits.items()},
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        """The manifest text written to ``dataset.json``."""
        # Provenance may hold paths or other non-JSON values; they are kept as text.
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_dict(
        cls, obj: Any, uri: str, source: str = "manifest", *, allow_no_splits: bool = False
    ) -> DatasetInfo:
        """Validate a parsed manifest and build a :class:`DatasetInfo`.

        Args:
            obj: the parsed JSON object.
            uri: the dataset folder the manifest belongs to.
            source: what to call the manifest in error messages (its URI).
            allow_no_splits: accept an empty ``splits`` (a dataset still being written).

        Raises:
            DatasetError: naming the offending key and what was expected.
        """

        def bad(key: str, expected: str, got: Any) -> DatasetError:
            return DatasetError(f"{source}: key {key!r} must be {expected}, got {got!r:.200}")

        if not isinstance(obj, dict):
            raise bad("(top level)", "a JSON object", obj)
        if obj.get("format") != FORMAT:
            raise bad("format", f"{FORMAT!r} (the only supported format)", obj.get("format"))
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            raise bad("name", "a non-empty string", name)
        classes = obj.get("classes")
        if (not isinstance(classes, list) or not classes
                or not all(isinstance(c, str) and c for c in classes)):
            raise bad("classes", "a non-empty list of class-name strings", classes)
        palette = obj.get("palette")
        if (not isinstance(palette, list) or len(palette) != len(classes) or not all(
                isinstance(c, list) and len(c) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in palette)):
            raise bad("palette", f"a list of {len(classes)} [r, g, b] lists of ints in 0..255",
                      palette)
        ignore = obj.get("ignore_index", 255)
        if not isinstance(ignore, int) or isinstance(ignore, bool) or ignore < 0:
            raise bad("ignore_index", "a non-negative int", ignore)
        if 0 <= ignore < len(classes):
            raise bad("ignore_index", f"outside the class ids 0..{len(classes) - 1}", ignore)
        splits_obj = obj.get("splits")
        if not isinstance(splits_obj, dict) or not (splits_obj or allow_no_splits):
            raise bad("splits", "a non-empty object of split name -> list of shards", splits_obj)
        splits: dict[str, list[ShardInfo]] = {}
        for split, shards in splits_obj.items():
            key = f"splits.{split}"
            if not isinstance(shards, list) or not shards:
                raise bad(key, "a non-empty list of shards", shards)
            parsed = []
            for i, s in enumerate(shards):
                skey = f"{key}[{i}]"
                if not isinstance(s, dict):
                    raise bad(skey, "an object with path, rows, sha256, bytes", s)
                path = s.get("path")
                if (not isinstance(path, str) or not path or path.startswith("/")
                        or "://" in path or ".." in path.split("/")):
                    raise bad(f"{skey}.path", "a file name relative to the dataset folder", path)
                for int_key in ("rows", "bytes"):
                    v = s.get(int_key)
                    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                        raise bad(f"{skey}.{int_key}", "a non-negative int", v)
                digest = s.get("sha256")
                if not isinstance(digest, str) or len(digest) != 64:
                    raise bad(f"{skey}.sha256", "a 64-character hex SHA-256", digest)
                parsed.append(ShardInfo(path, s["rows"], digest, s["bytes"]))
            if not sum(sh.rows for sh in parsed):
                raise DatasetError(f"{source}: split {split!r} is empty (its shards hold 0 rows); "
                                 "every split needs at least one image: re-create the dataset "
                                 "or remove the split from the manifest")
            splits[split] = parsed
        provenance = obj.get("provenance", {})
        if not isinstance(provenance, dict):
            raise bad("provenance", "an object", provenance)
        return cls(uri=uri, name=name, classes=list(classes), palette=[list(c) for c in palette],
                   ignore_index=ignore, splits=splits, provenance=provenance)


def manifest_uri(uri: str) -> str:
    """Where the manifest of the dataset folder ``uri`` lives."""
    return storage.join(uri, MANIFEST_NAME)


def open_dataset(uri: str) -> DatasetInfo:
    """Open a dataset folder (local path or ``s3://`` URI) by reading its manifest.

    Args:
        uri: the dataset folder, or its ``dataset.json`` itself.

    Returns:
        The validated :class:`DatasetInfo`, whose ``uri`` is absolute (Ray workers change
        directory, so relative paths would break there).

    Raises:
        FileNotFoundError: no ``dataset.json`` at ``uri`` (the message says how to make one).
        DatasetError: the manifest is not valid JSON or a key is malformed (the message names it).
    """
    uri = str(uri).rstrip("/")
    if uri.endswith("/" + MANIFEST_NAME) or uri == MANIFEST_NAME:
        uri = uri[: -len(MANIFEST_NAME)].rstrip("/") or "."
    uri = storage.absolute(uri)
    source = manifest_uri(uri)
    try:
        text = storage.read_text(source)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no dataset manifest at {source}; {_PREPARE_HINT}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{source} is not valid JSON ({e}); re-create the dataset") from e
    return DatasetInfo.from_dict(obj, uri, source)


def check_shard_bytes(data: bytes, uri: str, shard: ShardInfo, split: str) -> None:
    """Check a shard's bytes against what the manifest records for it.

    Args:
        data: the shard file's whole content.
        uri: where it was read from (named in the error).
        shard: the manifest's record of it.
        split: its split (named in the error).

    Raises:
        DatasetError: size or SHA-256 differ; the message names the shard and how to fix it.
    """
    digest = storage.sha256(data)
    if len(data) != shard.bytes or digest != shard.sha256:
        raise DatasetError(
            f"shard {uri} of split {split!r} does not match its manifest: {len(data)} bytes "
            f"with sha256 {digest[:12]}…, the manifest says {shard.bytes} bytes with sha256 "
            f"{shard.sha256[:12]}…; the file changed after the dataset was written; re-create "
            f"the dataset with `python jobs/prepare_data.py`"
        )


def read_shard(info: DatasetInfo, split: str, shard: ShardInfo) -> bytes:
    """Read one shard of ``split`` whole and verify it (see :func:`check_shard_bytes`).

    Raises:
        FileNotFoundError: the shard is missing (names it).
        DatasetError: its bytes differ from the manifest's record (names it).
    """
    uri = storage.join(info.uri, shard.path)
    data = storage.read_bytes(uri)
    check_shard_bytes(data, uri, shard, split)
    return data


def verify_shards(info: DatasetInfo, split: str | None = None) -> int:
    """Re-read every shard of ``split`` (all splits if None) and check size and SHA-256.

    Returns:
        Number of shards verified.

    Raises:
        FileNotFoundError: a shard named by the manifest is missing (names it).
        DatasetError: a shard's bytes differ from what the manifest records (names it).
    """
    splits = [split] if split is not None else info.split_names
    count = 0
    for name in splits:
        for shard in info._shards(name):
            read_shard(info, name, shard)
            count += 1
    return count


def default_palette(num_classes: int) -> list[list[int]]:
    """Distinct colours for ``num_classes`` classes (the PASCAL VOC bit-interleaved scheme).

    Example:
        >>> default_palette(3)
        [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    """
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.append([r, g, b])
    return palette
