"""A real Prometheus for end-to-end tests, on the loopback only.

``start_prometheus`` runs Debian's ``prometheus`` with a config derived from
``cluster/prometheus/prometheus.yml`` (see :func:`prometheus_config`), stopped by killing exactly
its own processes, with a watchdog child that kills it too if the test process dies first.

Example:
    >>> head = start_ray_head()                                              # doctest: +SKIP
    >>> prom = start_prometheus(prometheus_config(head), head.base / "prom")
    >>> prom.query('up{job="ray"}')[0]["value"][1]
    '1'
    >>> prom.stop(); head.stop()
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import (
    ROOT,
    RayHead,
    free_ports,
    http_get,
    kill_processes,
    listening_sockets,
    processes_of,
    start_watchdog,
    stop_watchdog,
    wait_until,
)

PROMETHEUS_CONFIG = ROOT / "cluster" / "prometheus" / "prometheus.yml"


def prometheus_config(head: RayHead, scrape_interval: str = "1s",
                      static_ports: dict[int, int] | None = None) -> dict[str, Any]:
    """The shipped ``cluster/prometheus/prometheus.yml``, pointed at ``head``.

    Its file-based service discovery reads the head's temp dir; intervals are shortened; each
    static target port is mapped through ``static_ports`` (e.g. ``{9464: <driver port>}``) and
    scrape jobs with unmapped ports are dropped, so nothing else on this machine is scraped.

    Raises:
        ValueError: the shipped config has no ``file_sd_configs`` job to point at the cluster.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval,
                            scrape_timeout=scrape_interval)
    jobs = []
    found_sd = False
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(head.service_discovery_file)]
            sd["refresh_interval"] = "2s"
            found_sd = True
        keep = True
        for static in job.get("static_configs", []):
            mapped = []
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if int(port) not in (static_ports or {}):
                    keep = False
                    break
                mapped.append(f"{host}:{static_ports[int(port)]}")
            static["targets"] = mapped
        if keep:
            jobs.append(job)
    if not found_sd:
        raise ValueError(f"{PROMETHEUS_CONFIG} has no scrape job with file_sd_configs; the tests "
                         "point that job at Ray's prom_metrics_service_discovery.json")
    config["scrape_configs"] = jobs
    return config


@dataclass
class PrometheusServer:
    """A running Prometheus and its HTTP API.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        folder: config, TSDB and log.
    """

    url: str
    folder: Path
    process: subprocess.Popen = field(repr=False)
    _watchdog: subprocess.Popen | None = field(default=None, repr=False)

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raises on an API error."""
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}?{query}")
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}?{query}: HTTP {status}: {reply}")
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant PromQL query; returns the result vector (``[{metric, value}, ...]``)."""
        return self.api("query", query=expr)["result"]

    def values(self, expr: str) -> list[float]:
        """The sample values of an instant query, as floats."""
        return [float(r["value"][1]) for r in self.query(expr)]

    def log(self) -> str:
        return (self.folder / "prometheus.log").read_text(errors="replace")

    def listeners(self) -> list[tuple[str, int, str]]:
        """The server's listening TCP sockets, ``(address, port, process)``."""
        return listening_sockets(processes_of(str(self.folder / "tsdb")))

    def stop(self) -> None:
        """Stop the server and its watchdog; keeps the folder for inspection."""
        kill_processes(str(self.folder / "tsdb"))
        if self._watchdog is not None:
            stop_watchdog(self._watchdog)
        self.process.wait(timeout=10)


def prometheus_binary() -> str:
    """Path of the ``prometheus`` binary (Debian's package installs ``/usr/bin/prometheus``).

    Raises:
        FileNotFoundError: not installed, with the command that installs it.
    """
    path = shutil.which("prometheus")
    if path is None:
        raise FileNotFoundError("the prometheus binary is not on PATH; install it with "
                                "`apt-get install -y --no-install-recommends prometheus`")
    return path


def start_prometheus(config: dict[str, Any], folder: Path, lifetime_s: int = 1800,
                     timeout: float = 60) -> PrometheusServer:
    """Start Prometheus on a free 127.0.0.1 port with ``config``, storing into ``folder``.

    Args:
        config: a parsed Prometheus config (see :func:`prometheus_config`).
        folder: where the config, the TSDB and the log go.
        lifetime_s: hard limit; the server is killed after this many seconds whatever happens.
        timeout: seconds to wait until the server reports ready.

    Raises:
        RuntimeError: the server exited or did not become ready (its log included).
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_ports(1)[0]
    tsdb = folder / "tsdb"
    cmd = ["timeout", "-s", "KILL", str(lifetime_s), prometheus_binary(),
           f"--config.file={folder / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
           f"--storage.tsdb.path={tsdb}", "--storage.tsdb.retention.time=1d", "--log.level=warn"]
    watchdog = start_watchdog(str(tsdb))
    with open(folder / "prometheus.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = PrometheusServer(url=f"http://127.0.0.1:{port}", folder=folder, process=process,
                              _watchdog=watchdog)
    try:
        ready = f"{server.url}/-/ready"
        wait_until(lambda: process.poll() is not None or http_get(ready)[0] == 200, timeout,
                   f"Prometheus at {server.url}")
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited {process.returncode}:\n{server.log()[-4000:]}")
    except BaseException:
        server.stop()
        raise
    return server


# Import this into a test module (with servers.ray_head_fixture) to use the fixture `prometheus`.
@pytest.fixture(scope="module", name="prometheus")
def prometheus_fixture(ray_head: RayHead,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """Prometheus scraping ``ray_head`` every second with the shipped config, stopped afterwards."""
    server = start_prometheus(prometheus_config(ray_head), tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()
