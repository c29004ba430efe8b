"""Counting rows dropped by ``on_bad_sample="skip"`` across every Ray worker, so a skip is never
silent: each is logged, counted in the Prometheus counter ``segray_data_bad_samples`` and recorded
by a :class:`SkipCounter` the driver reads."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import ray

from segray.data.decode import BadSampleError

log = logging.getLogger("segray.data.stream")

_MAX_RECORDS = 1000
_METRICS: dict[str, Any] = {}

__all__ = ["SkipCounter", "count_skip"]


class _SkipTally:
    """Skipped rows, each counted once however many epochs meet it."""

    def __init__(self) -> None:
        self.total = 0
        self.seen: set[tuple[str, int | str]] = set()
        self.records: list[dict[str, Any]] = []

    def add(self, shard: str, key: str, reason: str, row: int | None = None) -> None:
        # A row is its shard and its number there: a key repeated within a shard is several
        # rows, each dropped, so each is counted. Only a row of unknown number goes by its key.
        seen = (shard, key if row is None else int(row))
        if seen in self.seen:  # every epoch meets the same bad rows again
            return
        self.seen.add(seen)
        self.total += 1
        if len(self.records) < _MAX_RECORDS:
            self.records.append({"shard": shard, "key": key, "row": row, "reason": reason})

    def get(self) -> tuple[int, list[dict[str, Any]]]:
        return self.total, list(self.records)


_SkipLog = ray.remote(num_cpus=0)(_SkipTally)


class SkipCounter:
    """Counts rows dropped by ``on_bad_sample="skip"`` across every Ray worker.

    Backed by a named actor of the current Ray job (created on construction, so Ray must be
    initialised); the object is passed into the stream and pickles with its actor handle.

    Args:
        name: actor name; a unique one when None (so concurrent trials never share counts).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"segray-skips-{uuid.uuid4().hex[:12]}"
        self._actor = _SkipLog.options(name=self.name, get_if_exists=True).remote()

    def record(self, error: BadSampleError, row: int | None = None) -> None:
        """Count one dropped row (called by stream workers).

        Args:
            error: why the row is dropped (names shard and key).
            row: the row's number in its shard, which tells apart rows sharing a key.
        """
        ray.get(self._actor.add.remote(error.shard, error.key, error.reason, row))

    @property
    def total(self) -> int:
        """Distinct rows dropped so far (a row met again in a later epoch counts once)."""
        return ray.get(self._actor.get.remote())[0]

    def records(self) -> list[dict[str, Any]]:
        """The first 1000 dropped rows as ``{"shard", "key", "row", "reason"}`` dicts."""
        return ray.get(self._actor.get.remote())[1]


def count_skip(error: BadSampleError, counter: SkipCounter | None, dataset: str,
               split: str, row: int | None = None) -> None:
    """Log, count (Prometheus) and record one dropped row; ``row`` is its number in its shard."""
    log.warning("skipping %s", error)
    if "bad" not in _METRICS:
        from ray.util.metrics import Counter

        _METRICS["bad"] = Counter("segray_data_bad_samples",
                                  description="rows dropped by on_bad_sample='skip'",
                                  tag_keys=("dataset", "split"))
    _METRICS["bad"].inc(1.0, tags={"dataset": dataset, "split": split})
    if counter is not None:
        counter.record(error, row)
