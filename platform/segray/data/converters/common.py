"""Shared machinery of the public-dataset converters.

A converter turns a dataset's standard on-disk layout into a *plan*: split name -> list of
:class:`Sample` (key, image file, annotation file and the function that turns the annotation's
bytes into a class-id map with the dataset's label convention applied). :func:`write_plan` then
reads every file, checks it, and streams the rows into a :class:`~segray.data.shards.DatasetWriter`
(shards first, ``dataset.json`` last). Images keep their original encoded bytes; masks become
canonical uint8 class-id PNGs; image-level labels are the mask's ids other than the ignore value.

File problems (unreadable image, mask of the wrong size, label value the dataset does not define)
are collected and reported together, each naming its file; when any is found no manifest is
written, so a half-converted dataset can never be opened.

Example:
    >>> from segray.data.converters.masks import identity_lut, index_png_reader
    >>> read = index_png_reader(identity_lut(21), "VOC ids 0..20 or 255")
    >>> plan = {"train": [Sample("a", "/d/a.jpg", "/d/a.png", read)]}
    >>> info = write_plan("/data/out", plan, name="toy", classes=["bg", ...],  # doctest: +SKIP
    ...                   palette=None, provenance={"converter": "toy"})
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from segray import storage
from segray.cli import positive_int
from segray.data.converters.masks import IGNORE_INDEX, MaskReader
from segray.data.decode import decode_image
from segray.data.manifest import DatasetInfo
from segray.data.shards import DatasetWriter, encode_mask_png

log = logging.getLogger(__name__)

MAX_LISTED = 20
MAX_PROBLEMS = 200  # stop reading after this many bad files: the layout is wrong, not one file


@dataclass(frozen=True)
class Converter:
    """One public-dataset converter, as wired into ``jobs/prepare_data.py <format> <src> <dst>``.

    Attributes:
        name: the ``<format>`` word on the command line, e.g. ``voc``.
        help: one line for ``--help``.
        convert: ``(src, dst, args) -> DatasetInfo``; ``args`` is an ``argparse.Namespace`` (or
            any object / mapping) carrying the options of ``add_arguments`` and
            :func:`add_common_arguments`; missing options take their defaults.
        add_arguments: adds the format-specific flags to a parser.
    """

    name: str
    help: str
    convert: Callable[[str, str, Any], DatasetInfo]
    add_arguments: Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Sample:
    """One image to write.

    Attributes:
        key: id unique across the dataset.
        image: URI of the encoded image, stored as is.
        mask: URI of its annotation, or None for an unlabelled row.
        read_mask: turns the annotation's bytes into the final class-id map.
    """

    key: str
    image: str
    mask: str | None = None
    read_mask: MaskReader | None = None


class OptionError(ValueError):
    """A converter option's value is wrong, found only once the source tree is read (e.g.
    ``--val-set`` naming a test set the tree does not hold): a usage error, exit code 2 in
    ``jobs/prepare_data.py``, not bad data. The message names the option and what it accepts."""


def option(args: Any, name: str, default: Any) -> Any:
    """Read option ``name`` from a Namespace-like object or a mapping; None means the default."""
    if args is None:
        return default
    value = args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)
    return default if value is None else value


def existing_file(text: str) -> str:
    """argparse ``type``: a file (path or ``s3://`` URI) that exists."""
    if not storage.exists(text) or storage.is_dir(text):
        raise argparse.ArgumentTypeError(f"no file at {text}")
    return text


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every converter understands (``--name``, ``--rows-per-shard``, ``--workers``)."""
    parser.add_argument("--name", default=None, help="dataset name (default: the format's name)")
    parser.add_argument("--rows-per-shard", type=positive_int, default=256,
                        help="rows per Parquet shard")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="threads reading and checking files (default: min(8, CPUs))")


def common_options(args: Any) -> dict[str, Any]:
    """``name``, ``rows_per_shard`` and ``workers`` from ``args`` (see :func:`option`)."""
    return {"name": option(args, "name", None),
            "rows_per_shard": int(option(args, "rows_per_shard", 256)),
            "workers": option(args, "workers", None)}


class Problems:
    """Collects problems found in a source tree and raises them together."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self, stopped_early: bool = False) -> None:
        """Raise one ValueError listing the problems (the first :data:`MAX_LISTED`).

        Raises:
            ValueError: when any problem was added.
        """
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_LISTED])
        more = (f"\n  ... and {len(self.items) - MAX_LISTED} more"
                if len(self.items) > MAX_LISTED else "")
        stop = "\n  (stopped reading after this many problems)" if stopped_early else ""
        raise ValueError(f"{len(self.items)} problem(s) in {self.src}:\n  {shown}{more}{stop}")


def require_dir(uri: str, expected: str) -> str:
    """Return ``uri`` if it is a folder.

    Raises:
        FileNotFoundError: naming ``uri`` and the expected layout.
    """
    if not storage.is_dir(uri):
        raise FileNotFoundError(f"folder {uri} not found; expected {expected}")
    return uri


def find_root(src: str, marker: str, nested: Sequence[str] = ()) -> str | None:
    """The first of ``src`` and ``src/<n>`` (for ``n`` in ``nested``) that holds ``marker``."""
    for root in [src, *(storage.join(src, *n.split("/")) for n in nested)]:
        if storage.exists(storage.join(root, *marker.split("/"))):
            return root
    return None


def files_by_stem(uri: str, extensions: Sequence[str], problems: Problems,
                  suffix: str = "") -> dict[str, str]:
    """Files ``<stem><suffix><ext>`` directly under ``uri`` as ``{stem: uri}``.

    Hidden files and other extensions are left out; two files with one stem are a problem.
    """
    out: dict[str, str] = {}
    exts = tuple(e.lower() for e in extensions)
    for name in storage.list_dir(uri):
        path = PurePosixPath(name)
        if name.startswith(".") or path.suffix.lower() not in exts:
            continue
        stem = name[: -len(path.suffix)]
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[: -len(suffix)]
        if stem in out:
            problems.add(f"{storage.join(uri, name)}: stem {stem!r} is used by two files "
                         f"({PurePosixPath(out[stem]).name} and {name}); remove one")
            continue
        out[stem] = storage.join(uri, name)
    return out


def pair_files(images: Mapping[str, str], masks: Mapping[str, str], problems: Problems,
               expected_mask: str) -> list[str]:
    """Stems having both an image and a mask; every unpaired file is a problem.

    Args:
        images: ``{stem: image uri}``.
        masks: ``{stem: mask uri}``.
        problems: where unpaired files are reported.
        expected_mask: pattern shown for a missing mask, with ``{stem}`` in it.
    """
    for stem in sorted(set(images) - set(masks)):
        problems.add(f"{images[stem]}: image without an annotation (expected "
                     f"{expected_mask.format(stem=stem)})")
    for stem in sorted(set(masks) - set(images)):
        problems.add(f"{masks[stem]}: annotation without an image")
    return sorted(set(images) & set(masks))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def paired_samples(img_dir: str, mask_dir: str, read_mask: MaskReader, problems: Problems, *,
                   key_prefix: str = "", mask_tag: str = "",
                   extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Sample]:
    """Samples of an ``images/`` + ``masks/`` folder pair, matched by file stem.

    Args:
        img_dir: folder of images.
        mask_dir: folder of masks (any of ``extensions``).
        read_mask: turns a mask file's bytes into the class-id map.
        problems: where unpaired files and empty folders are reported.
        key_prefix: prepended to each stem to make the key (e.g. ``train/``).
        mask_tag: an optional tag a mask's stem may carry after the image's, e.g. ``_anno`` for
            ``img/train_1.bmp`` + ``labelcol/train_1_anno.bmp``.
        extensions: file extensions of images and masks.
    """
    images = files_by_stem(img_dir, extensions, problems)
    masks = files_by_stem(mask_dir, extensions, problems)
    if mask_tag:
        tagged: dict[str, str] = {}
        for s, uri in masks.items():
            stem = s[: -len(mask_tag)] if s.endswith(mask_tag) and s not in images else s
            if stem in tagged:  # e.g. labelcol/t1.png and labelcol/t1_anno.bmp
                problems.add(f"{uri}: image {stem!r} has two annotations "
                             f"({PurePosixPath(tagged[stem]).name} and {PurePosixPath(uri).name}); "
                             "remove one")
                continue
            tagged[stem] = uri
        masks = tagged
    if not images:
        problems.add(f"{img_dir}: missing or holds no images ({', '.join(extensions)})")
        return []
    stems = pair_files(images, masks, problems, f"{mask_dir}/{{stem}}<ext>")
    return [Sample(key_prefix + s, images[s], masks[s], read_mask) for s in stems]


def read_id_list(uri: str) -> list[str]:
    """Image ids listed one per line in a text file.

    The first token of each line is used, reduced to its file stem, so both ``2007_000032`` and
    ``JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png`` give ``2007_000032``.
    Blank lines and ``#`` comments are skipped.

    Raises:
        FileNotFoundError: no file at ``uri``.
        ValueError: an id listed twice (names the line).
    """
    ids: list[str] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(storage.read_text(uri).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        stem = PurePosixPath(line.split()[0]).stem
        if stem in seen:
            raise ValueError(f"{uri} line {n}: id {stem!r} is already listed on line {seen[stem]}")
        seen[stem] = n
        ids.append(stem)
    return ids


def split_name(text: str) -> str:
    """A split-name-safe version of ``text`` (letters, digits, ``_``), e.g. ``CVC-300 -> cvc_300``."""
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "unnamed"


# ----------------------------------------------------------------------------------- writing

def _image_size(data: bytes) -> tuple[int, int]:
    # The stream's own decoder, as strict: a file it would refuse in training (a cut or damaged
    # JPEG scan libjpeg would fill in, a PNG failing a checksum) is refused here, by name.
    try:
        return decode_image(data).shape[:2]
    except ValueError as e:
        raise ValueError(f"unreadable image ({e})") from e


def _load(sample: Sample, ignore_index: int) -> tuple[str | None, tuple]:
    """Read and check one sample; returns (problem, (image bytes, mask png, labels, h, w))."""
    try:
        image = storage.read_bytes(sample.image)
        h, w = _image_size(image)
    except (FileNotFoundError, ValueError) as e:
        return f"{sample.image}: {e}", ()
    if sample.mask is None or sample.read_mask is None:
        return None, (image, None, [], h, w)
    try:
        mask = sample.read_mask(storage.read_bytes(sample.mask))
    except (FileNotFoundError, ValueError) as e:
        return f"{sample.mask}: {e}", ()
    if mask.shape != (h, w):
        return (f"{sample.mask}: annotation is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{PurePosixPath(sample.image).name} is {w}x{h}"), ()
    labels = [int(v) for v in np.unique(mask) if v != ignore_index]
    return None, (image, encode_mask_png(mask), labels, h, w)


def write_plan(
    dst: str,
    plan: Mapping[str, Sequence[Sample]],
    *,
    name: str,
    classes: Sequence[str],
    palette: Sequence[Sequence[int]] | None,
    provenance: Mapping[str, Any],
    source: str = "",
    ignore_index: int = IGNORE_INDEX,
    rows_per_shard: int = 256,
    workers: int | None = None,
) -> DatasetInfo:
    """Read, check and write every sample of ``plan`` into a dataset at ``dst``.

    Args:
        dst: destination dataset folder (local or ``s3://``).
        plan: split name -> samples, in write order.
        name: dataset name.
        classes: class names in id order.
        palette: ``[r, g, b]`` per class (a default palette when None).
        provenance: stored in the manifest (converter, source, conventions applied).
        source: the source tree, named in error messages.
        ignore_index: mask value left out of the image-level labels.
        rows_per_shard: rows per Parquet shard.
        workers: threads reading and checking files (default ``min(8, CPUs)``).

    Returns:
        The written dataset.

    Raises:
        ValueError: an empty split, a duplicate key, or bad files (all listed, each by name);
            no manifest is written then.
    """
    empty = [s for s, samples in plan.items() if not samples]
    if empty or not plan:
        raise ValueError(f"{source}: split(s) {', '.join(empty) or '(none)'} would be empty; "
                         "check that the source tree has the expected layout")
    seen: set[str] = set()
    for samples in plan.values():
        for s in samples:
            if s.key in seen:
                raise ValueError(f"{source}: key {s.key!r} occurs twice ({s.image}); "
                                 "each image may belong to one split only")
            seen.add(s.key)
    workers = max(1, int(workers or min(8, os.cpu_count() or 1)))
    total, done = len(seen), 0
    problems = Problems(source or dst)
    stopped = False
    with (DatasetWriter(dst, name, classes, palette, ignore_index, provenance,
                        rows_per_shard=rows_per_shard, splits=list(plan)) as writer,
          ThreadPoolExecutor(workers) as pool):
        for split, samples in plan.items():
            # Bounded chunks keep at most a few images per thread in memory.
            for start in range(0, len(samples), 8 * workers):
                chunk = samples[start:start + 8 * workers]
                results = pool.map(lambda s: _load(s, ignore_index), chunk)
                for sample, (problem, row) in zip(chunk, results, strict=True):
                    if problem is not None:
                        problems.add(problem)
                    elif not problems:  # once anything is wrong, only keep checking
                        writer.add(split, sample.key, *row)
                done += len(chunk)
                if done // 500 != (done - len(chunk)) // 500 or done == total:
                    log.info("%s: %d / %d images read", name, done, total)
                if len(problems) >= MAX_PROBLEMS:
                    stopped = True
                    break
            if stopped:
                break
            log.info("%s: split %s done (%d images)", name, split, len(samples))
        problems.raise_if_any(stopped_early=stopped)
    return writer.info
