"""Prometheus metrics.

Inside Ray Train workers metrics go through ``ray.util.metrics`` (exported on every node's metrics
port and found by Prometheus through Ray's service-discovery file); outside Ray workers (a job's
driver, a sweep, a pseudo-label job) :func:`serve_driver_metrics` starts a ``prometheus_client``
server on 127.0.0.1. Names carry the ``segray_`` prefix; Ray adds ``ray_`` in front of worker metrics.
"""

from __future__ import annotations

from typing import Any

TRAIN_GAUGES = {
    "train/images_per_s": ("segray_train_images_per_second", "Training images per second (all workers)"),
    "train/step_time_s": ("segray_train_step_seconds", "Mean wall time of one optimizer step"),
    "train/data_wait_share": ("segray_train_data_wait_share", "Share of step time spent waiting for data"),
    "train/loss": ("segray_train_loss", "Training loss"),
    "train/lr": ("segray_train_learning_rate", "Learning rate of the first parameter group"),
    "train/gpu_mem_gb": ("segray_train_gpu_memory_gb", "Peak GPU memory allocated, GiB"),
    "step": ("segray_train_step", "Optimizer steps done"),
}
EVAL_GAUGES = {
    "val/mIoU": ("segray_eval_miou", "Validation mIoU, percent"),
    "val/mAcc": ("segray_eval_macc", "Validation mAcc, percent"),
}


class WorkerTelemetry:
    """Gauges set from a Ray Train worker, tagged with method, run and rank.

    Does nothing outside a Ray worker process (plain PyTorch use, unit tests).
    """

    def __init__(self, method: str, run: str) -> None:
        self.tags = {"method": method, "run": run}
        self.gauges: dict[str, Any] = {}
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

    def train(self, entry: dict[str, Any]) -> None:
        """Export a training log entry."""
        self._set(entry)

    def evaluation(self, entry: dict[str, Any]) -> None:
        """Export an evaluation entry."""
        self._set(entry)


def serve_driver_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Start a ``prometheus_client`` HTTP server for metrics that live outside Ray workers."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
