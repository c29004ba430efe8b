"""Prometheus metrics.

Inside Ray Train workers metrics go through ``ray.util.metrics`` (exported on every node's metrics
port and found by Prometheus through Ray's service-discovery file); outside Ray workers (a job's
driver, a sweep, a pseudo-label job) :func:`serve_driver_metrics` starts a ``prometheus_client``
server on 127.0.0.1. Names carry the ``segray_`` prefix; Ray adds ``ray_`` in front of worker
metrics.

A worker's gauges reach the node's endpoint only when its core worker exports them, every
``metrics_report_interval_ms`` (Ray's default: 10 s; set ``RAY_metrics_report_interval_ms`` in a
job's runtime env ``env_vars`` to change it). Ray Train kills its workers as soon as a run ends, so
the last values of a run are exported only if the worker lives one interval longer:
:meth:`WorkerTelemetry.flush` waits exactly that long.

Example:
    >>> telemetry = WorkerTelemetry("semask", "ade-semask-t")    # inside a Train worker
    >>> telemetry.train({"step": 100, "train/loss": 0.71, "train/images_per_s": 412.0})
    >>> telemetry.evaluation({"step": 100, "val/mIoU": 41.3})
    >>> telemetry.flush()      # before the worker returns: the final values get exported
"""

from __future__ import annotations

import time
from typing import Any

# Loopback ports of the prometheus_client servers outside Ray's workers; cluster/prometheus/
# prometheus.yml scrapes these.
DRIVER_METRICS_PORT = 9464
SWEEP_METRICS_PORT = 9465
# Ray's default metrics_report_interval_ms, used when the running value cannot be read.
DEFAULT_EXPORT_INTERVAL_S = 10.0

TRAIN_GAUGES = {
    "train/images_per_s": ("segray_train_images_per_second",
                           "Training images per second (all workers)"),
    "train/step_time_s": ("segray_train_step_seconds", "Mean wall time of one optimizer step"),
    "train/data_wait_share": ("segray_train_data_wait_share",
                              "Share of step time spent waiting for data"),
    "train/loss": ("segray_train_loss", "Training loss"),
    "train/lr": ("segray_train_learning_rate", "Learning rate of the first parameter group"),
    "train/gpu_mem_gb": ("segray_train_gpu_memory_gb", "Peak GPU memory allocated, GiB"),
    "step": ("segray_train_step", "Optimizer steps done"),
}
EVAL_GAUGES = {
    "val/mIoU": ("segray_eval_miou", "Validation mIoU, percent"),
    "val/mAcc": ("segray_eval_macc", "Validation mAcc, percent"),
}


def export_interval_s() -> float:
    """Seconds between two exports of this process's ``ray.util.metrics`` to the node's agent.

    Ray exports every ``max(metrics_report_interval_ms, 1000)`` ms; outside a Ray process the
    default interval is returned.
    """
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:  # noqa: BLE001 - a private API; fall back to Ray's documented default
        return DEFAULT_EXPORT_INTERVAL_S


class WorkerTelemetry:
    """Gauges set from a Ray Train worker, tagged with method and run.

    Ray adds ``WorkerId`` (among others) to every series, so the workers of one run never overwrite
    each other; aggregate them with ``max by (method, run)``. Does nothing outside a Ray worker
    process (plain PyTorch use, unit tests).

    Args:
        method: method name, the ``method`` label.
        run: run name, the ``run`` label.
    """

    def __init__(self, method: str, run: str) -> None:
        self.tags = {"method": method, "run": run}
        self.gauges: dict[str, Any] = {}
        self._last_set: float | None = None
        try:
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Gauge
        except Exception:  # noqa: BLE001 - metrics must never break training
            return
        for key, (name, desc) in {**TRAIN_GAUGES, **EVAL_GAUGES}.items():
            self.gauges[key] = Gauge(name, description=desc, tag_keys=("method", "run"))

    def _set(self, entry: dict[str, Any]) -> None:
        for key, value in entry.items():
            gauge = self.gauges.get(key)
            if gauge is not None and isinstance(value, int | float):
                gauge.set(float(value), tags=self.tags)
                self._last_set = time.monotonic()

    def train(self, entry: dict[str, Any]) -> None:
        """Export a training log entry (keys of ``TRAIN_GAUGES``; others are ignored)."""
        self._set(entry)

    def evaluation(self, entry: dict[str, Any]) -> None:
        """Export an evaluation entry (keys of ``EVAL_GAUGES`` and ``step``)."""
        self._set(entry)

    def flush(self, margin_s: float = 1.0) -> float:
        """Block until the values set so far have been exported to the node's metrics agent.

        Call it once at the end of a run: Ray Train kills the worker right after it returns, and
        values set during the last export interval would never reach Prometheus. Waits at most
        one export interval (plus ``margin_s``) counted from the last value set, so nothing when
        the run's end took longer than that anyway.

        Returns:
            The seconds waited.
        """
        if self._last_set is None:
            return 0.0
        wait = self._last_set + export_interval_s() + margin_s - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return max(wait, 0.0)


def serve_driver_metrics(port: int = DRIVER_METRICS_PORT, host: str = "127.0.0.1") -> None:
    """Start a ``prometheus_client`` HTTP server for metrics that live outside Ray workers.

    Args:
        port: :data:`DRIVER_METRICS_PORT` for a job's driver, :data:`SWEEP_METRICS_PORT` for a
            sweep.
        host: bind address; the loopback, reached through the same tunnel as the dashboard.
    """
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
