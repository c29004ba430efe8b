"""Sweep-level Prometheus gauges, served by the sweep driver with ``prometheus_client``.

Names and labels are the contract of ``cluster/grafana/segray.json`` (see ``cluster/README.md``):
``segray_sweep_trials_running``, ``segray_sweep_trials_done``, ``segray_sweep_trials_stopped``,
``segray_sweep_best_miou`` (label ``sweep``) and ``segray_sweep_trial_miou`` (``sweep``, ``trial``).
The server binds 127.0.0.1 only; port 0 disables it.

Example:
    >>> m = SweepMetrics("demo", port=9465)
    >>> m.update(running=2, done=1, stopped=0, best=41.5, per_trial={"trial_001_ab12cd34": 41.5})
    >>> # curl -s 127.0.0.1:9465/metrics | grep segray_sweep_best_miou
    >>> m.close()
"""

from __future__ import annotations

import threading

DEFAULT_PORT = 9465

_ACTIVE: dict[str, SweepMetrics] = {}
_LOCK = threading.Lock()


class SweepMetrics:
    """The five sweep gauges on a private registry, optionally served over HTTP.

    Args:
        sweep: value of the ``sweep`` label.
        port: TCP port on 127.0.0.1 (0 = do not serve; the gauges still hold their values).
        host: bind address.

    Raises:
        OSError: the port is taken (the message names it and the flags that change it).
    """

    def __init__(self, sweep: str, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.sweep = sweep
        # A private registry: several sweeps (or tests) in one process never collide.
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("sweep",)) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.running = gauge("segray_sweep_trials_running", "Trials running")
        self.done = gauge("segray_sweep_trials_done", "Trials finished (including stopped early)")
        self.stopped = gauge("segray_sweep_trials_stopped", "Trials stopped early by the scheduler")
        self.best = gauge("segray_sweep_best_miou", "Best validation mIoU so far, percent")
        self.trial = gauge("segray_sweep_trial_miou", "Latest validation mIoU of each trial, percent",
                           ("sweep", "trial"))
        self.server = None
        self.port = 0
        self._best: float | None = None
        if port:
            try:
                self.server, self._thread = start_http_server(port, addr=host,
                                                              registry=self.registry)
            except OSError as e:
                raise OSError(f"cannot serve sweep metrics on {host}:{port} ({e.strerror}); pass "
                              f"--metrics-port with a free port, or --metrics-port 0 to disable "
                              f"them") from e
            self.port = self.server.server_port

    def update(self, running: int, done: int, stopped: int, best: float | None,
               per_trial: dict[str, float]) -> None:
        """Set every gauge (``best`` None = no evaluation yet; left unset)."""
        self.running.labels(self.sweep).set(running)
        self.done.labels(self.sweep).set(done)
        self.stopped.labels(self.sweep).set(stopped)
        if best is not None:
            self._best = best
            self.best.labels(self.sweep).set(best)
        for trial, miou in per_trial.items():
            self.trial.labels(self.sweep, trial).set(miou)

    def observe(self, running: int, latest: dict[str, float]) -> None:
        """Update from live results: trials running and each trial's latest mIoU."""
        self.running.labels(self.sweep).set(running)
        for trial, miou in latest.items():
            self.trial.labels(self.sweep, trial).set(miou)
        if latest:
            best = max(latest.values())
            if self._best is None or best > self._best:
                self._best = best
                self.best.labels(self.sweep).set(best)

    def close(self) -> None:
        """Stop serving (the gauges keep their last values)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        with _LOCK:
            if _ACTIVE.get(self.sweep) is self:
                del _ACTIVE[self.sweep]


def activate(metrics: SweepMetrics) -> None:
    """Make ``metrics`` the gauges that sweep callbacks in this process update."""
    with _LOCK:
        _ACTIVE[metrics.sweep] = metrics


def active(sweep: str) -> SweepMetrics | None:
    """The gauges of ``sweep`` in this process, if any.

    Tune pickles its callbacks into the experiment state, so a callback cannot hold the HTTP
    server itself; it looks the gauges up here instead.
    """
    with _LOCK:
        return _ACTIVE.get(sweep)
