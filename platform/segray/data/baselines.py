"""What the data benchmark compares the segray stream with (see :mod:`segray.data.benchmark`).

- :class:`FolderCrops`: the PyTorch baseline, a map-style dataset doing PIL decode and the same
  random rescale + crop over files on disk, for a ``DataLoader`` with worker processes.
- :class:`DecodeLimit`: tight loops over the same bytes in one or more processes: decoding only
  (the decode limit), or decoding plus the pipeline's rescale + crop of each row.
- :func:`ray_data_ceiling`: a Ray Data stream doing only that per-row work on bytes held in
  Ray's object store (no storage, Parquet, checks or seeding): what any pipeline built on Ray
  Data can reach on the machine, so the segray stream's own costs show apart from Ray's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class FolderCrops:
    """A map-style PyTorch dataset: PIL decode + random rescale + crop/pad of files on disk.

    What a researcher writes without a platform; picklable, so DataLoader workers can run it.

    Returns per item ``(image uint8 (3, h, w), mask int64 (h, w))`` with ``(h, w) = crop``.
    """

    def __init__(self, folder: str, keys: list[str], crop: tuple[int, int],
                 scale_range: tuple[float, float], seed: int) -> None:
        self.folder, self.keys, self.crop, self.scale_range = folder, keys, crop, scale_range
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        rng = np.random.default_rng()
        key = self.keys[i]
        with Image.open(os.path.join(self.folder, "images", key)) as img:
            image = img.convert("RGB")
        with Image.open(os.path.join(self.folder, "masks", key)) as m:
            mask = m.copy()  # a closed image has no pixels
        r = rng.uniform(*self.scale_range)
        size = (max(1, round(image.width * r)), max(1, round(image.height * r)))
        image = np.asarray(image.resize(size, Image.BILINEAR))
        mask = np.asarray(mask.resize(size, Image.NEAREST))
        ch, cw = self.crop
        y0 = int(rng.integers(0, max(size[1] - ch, 0) + 1))
        x0 = int(rng.integers(0, max(size[0] - cw, 0) + 1))
        out_i = np.zeros((ch, cw, 3), np.uint8)
        out_m = np.full((ch, cw), 255, np.uint8)
        win_i, win_m = image[y0:y0 + ch, x0:x0 + cw], mask[y0:y0 + ch, x0:x0 + cw]
        out_i[: win_i.shape[0], : win_i.shape[1]] = win_i
        out_m[: win_m.shape[0], : win_m.shape[1]] = win_m
        return (torch.from_numpy(out_i).permute(2, 0, 1),  # (3, h, w)
                torch.from_numpy(out_m.astype(np.int64)))


_SAMPLES: list[tuple[bytes, bytes]] = []
_CROP: dict[str, Any] = {}  # crop and scale_range when the loop also rescales and crops


def _load_samples(folder: str, names: list[str], crop: dict[str, Any] | None = None) -> None:
    # Each process reads the files itself: no large pickle through the pool's pipes.
    _SAMPLES[:] = [(Path(folder, "images", n).read_bytes(), Path(folder, "masks", n).read_bytes())
                   for n in names]
    _CROP.clear()
    _CROP.update(crop or {})


def _decode_range(bounds: tuple[int, int], loops: int = 1) -> int:
    from segray.data.decode import decode_image, decode_mask, random_scale_crop

    rng = np.random.default_rng(bounds[0])
    for _ in range(loops):
        for image_bytes, mask_bytes in _SAMPLES[bounds[0]:bounds[1]]:
            image = decode_image(image_bytes)  # the pipeline's decoder
            mask = decode_mask(mask_bytes)
            if _CROP:
                random_scale_crop(image, mask, _CROP["crop"], _CROP["scale_range"], rng)
    return loops * (bounds[1] - bounds[0])


class DecodeLimit:
    """A tight decode loop (image + mask) over files written by the benchmark, kept ready.

    The bytes are read into memory first (``folder/images/<name>``, ``folder/masks/<name>``).
    With ``processes > 1`` they are split evenly across a pool whose workers stay up between
    measurements, so :meth:`rate` can be taken between the pipelines' rounds and drift on the
    machine hits all of them alike. With ``crop`` the loop also does the pipeline's random
    rescale + crop of each decoded row (everything a decode task does to a row but checks and
    batching). Use it as a context manager.

    Args:
        folder: the files.
        names: file names under ``images/`` and ``masks/``.
        processes: processes sharing the loop.
        crop: ``{"crop": (h, w), "scale_range": (lo, hi)}``, or None for decoding only.

    Raises:
        ValueError: (from :meth:`rate`) a file is not a decodable image.
    """

    def __init__(self, folder: str | Path, names: list[str], processes: int = 1,
                 crop: dict[str, Any] | None = None) -> None:
        self.n, self.processes = len(names), max(1, processes)
        cuts = np.linspace(0, self.n, self.processes + 1).astype(int)
        self._parts = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
        self._pool = None
        if self.processes == 1:
            _load_samples(str(folder), names, crop)
        else:
            self._pool = mp.get_context("spawn").Pool(
                self.processes, initializer=_load_samples, initargs=(str(folder), names, crop))
            self._pool.map(_decode_range, [(0, 1)] * self.processes)  # up, imports done

    def rate(self, min_seconds: float = 1.0) -> float:
        """images/s of one timed run of at least about ``min_seconds`` (after a short probe)."""
        loops, elapsed = 1, 0.0
        while True:
            start = time.perf_counter()
            done = self._run(loops)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return done / elapsed
            loops = max(loops + 1, int(loops * 1.2 * min_seconds / max(elapsed, 1e-3)))

    def _run(self, loops: int) -> int:
        if self._pool is None:
            return _decode_range((0, self.n), loops)
        return sum(self._pool.starmap(_decode_range, [(p, loops) for p in self._parts],
                                      chunksize=1))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        else:
            _SAMPLES.clear()
            _CROP.clear()

    def __enter__(self) -> DecodeLimit:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_HELD: dict[str, list[tuple[bytes, bytes]]] = {}  # per Ray worker: the samples, fetched once


def ray_data_ceiling(folder: str | Path, names: list[str], *, crop: tuple[int, int],
                     scale_range: tuple[float, float], batch_size: int, epochs: int,
                     rows_per_task: int = 256) -> Any:
    """A Ray Data stream of decoded, rescaled and cropped rows, and nothing else.

    The bytes go to Ray's object store once; each task takes ``rows_per_task`` of them (a shard's
    worth) and yields batches of ``batch_size`` rows like the segray stream, so the two differ only
    in what segray adds per row: reading shards, checksums, Parquet, validation, seeding. Needs
    a running Ray; iterate it like the segray stream.

    Returns:
        A lazy ``ray.data.Dataset`` with columns ``image`` uint8 (N, h, w, 3), ``mask`` (N, h, w),
        ``labels`` (N, 1) (zeros) and ``valid`` (N, 2), as ``train_collate`` expects.
    """
    import ray
    import ray.data

    samples = [(Path(folder, "images", n).read_bytes(), Path(folder, "masks", n).read_bytes())
               for n in names]
    starts = range(0, len(samples), rows_per_task)
    items = [{"start": s, "epoch": e} for e in range(epochs) for s in starts]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ceiling_task, batch_size=1, batch_format="numpy", udf_modifying_row_count=True,
        fn_kwargs={"held": [ray.put(samples)], "crop": crop, "scale_range": scale_range,
                   "rows": rows_per_task, "batch_size": batch_size})
    ds.context.op_resource_reservation_enabled = False  # as the segray stream
    return ds


def _ceiling_task(items: dict[str, np.ndarray], *, held: list[Any], crop: tuple[int, int],
                  scale_range: tuple[float, float], rows: int,
                  batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    import ray

    from segray.data.decode import decode_image, decode_mask, random_scale_crop

    ref = held[0]  # in a list, so Ray passes the reference instead of the value
    if ref.hex() not in _HELD:
        _HELD.clear()
        _HELD[ref.hex()] = ray.get(ref)
    samples = _HELD[ref.hex()]
    for start, epoch in zip(items["start"], items["epoch"]):
        rng = np.random.default_rng([int(start), int(epoch)])
        chunk = samples[int(start):int(start) + rows]
        for i in range(0, len(chunk), batch_size):
            images, masks, valid = [], [], []
            for image_bytes, mask_bytes in chunk[i:i + batch_size]:
                image, mask, size = random_scale_crop(decode_image(image_bytes),
                                                      decode_mask(mask_bytes), crop, scale_range,
                                                      rng, with_valid=True)
                images.append(image)
                masks.append(mask)
                valid.append(size)
            yield {"image": np.stack(images), "mask": np.stack(masks),
                   "labels": np.zeros((len(images), 1), np.uint8),
                   "valid": np.array(valid, dtype=np.int16)}
