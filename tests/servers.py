"""Real servers for end-to-end tests, on the loopback only: a Ray head node (Prometheus is in
:mod:`promserver`).

``start_ray_head`` runs ``ray start --head`` the way a cluster's head runs it — token
authentication, a metrics export port, the dashboard (and so the Jobs API) — in its own temp dir,
on ports picked for it, so it never meets another Ray instance on the machine.
``start_prometheus`` runs Debian's ``prometheus`` with a config derived from
``cluster/prometheus/prometheus.yml``. Both are stopped by killing exactly their own processes
(never ``ray stop``), and a watchdog child kills them too if the test process dies first.

Example:
    >>> head = start_ray_head()                                              # doctest: +SKIP
    >>> prom = start_prometheus(prometheus_config(head), head.base / "prom")
    >>> head.ray("job", "submit", "--", "python", "-c", "print(1)").returncode
    0
    >>> prom.query('up{job="ray"}')[0]["value"][1]
    '1'
    >>> prom.stop(); head.stop()
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


# --- ports, sockets and processes -------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all held open while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _decode_address(hex_address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(ip_hex)
    if sys.byteorder == "little":  # /proc/net/tcp* prints each 32-bit word in host byte order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback address (``::ffff:127.0.0.1``)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")[-60:]
    except OSError:
        return "?"


def listening_sockets(pids: Iterable[int]) -> list[tuple[str, int, str]]:
    """TCP sockets in LISTEN state owned by ``pids``, as ``(address, port, "<pid> <process>")``.

    Read from ``/proc/net/tcp{,6}`` and each process's open file descriptors, so the answer covers
    every port a process bound, including ones Ray picks at random.
    """
    listen: dict[str, tuple[Any, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":  # TCP_LISTEN
                    listen[cols[9]] = _decode_address(cols[1])
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode in listen:
                    ip, port = listen[inode]
                    found.append((str(ip), port, f"{pid} {_process_name(pid)}"))
    return sorted(set(found))


def processes_of(marker: str) -> set[int]:
    """Processes whose command line or environment contains ``marker``, and all their descendants.

    Ray's daemons carry the temp dir on their command line; the ones that do not (the Ray Client
    server) inherited the marker variable ``start_ray_head`` sets; workers are their descendants.
    """
    needle = marker.encode()
    parent: dict[int, int] = {}
    marked: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                hit = needle in f.read()
            if not hit:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    hit = needle in f.read()
        except (OSError, ValueError, IndexError):
            continue
        if hit:
            marked.add(pid)
    grew = True
    while grew:
        children = {p for p, pp in parent.items() if pp in marked and p not in marked}
        marked |= children
        grew = bool(children)
    return marked


def kill_processes(marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process of ``marker`` (see :func:`processes_of`), then SIGKILL survivors."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0), (signal.SIGKILL, 2.0)):
        pids = processes_of(marker)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and processes_of(marker):
            time.sleep(0.2)


def start_watchdog(marker: str) -> subprocess.Popen:
    """A child that kills the processes of ``marker`` when this test process goes away.

    It blocks on its stdin, which the kernel closes when the test process exits, however it exits.
    The marker travels hex-encoded, so the watchdog is not one of the processes it looks for.
    """
    return subprocess.Popen([sys.executable, __file__, "reap-on-eof", marker.encode().hex()],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def stop_watchdog(watchdog: subprocess.Popen) -> None:
    if watchdog.stdin is not None:
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=30)
    except subprocess.TimeoutExpired:
        watchdog.kill()


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 10) -> tuple[int, bytes]:
    """GET ``url``; returns ``(status, body)`` for any HTTP status, raises on connection errors."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` names ``what``."""
    deadline = time.time() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# --- Ray head ---------------------------------------------------------------------------------


@dataclass
class RayHead:
    """A running ``ray start --head`` and how to reach it.

    Attributes:
        base: private folder holding the token file and Ray's temp dir.
        temp_dir: Ray's ``--temp-dir`` (session logs, ``prom_metrics_service_discovery.json``).
        token: the cluster's auth token (also in ``token_file``).
        ports: the ports chosen for it, by role (``gcs``, ``dashboard``, ``metrics``, ...).
        env: environment for a client of this cluster: token mode and ``RAY_AUTH_TOKEN_PATH``.
    """

    base: Path
    temp_dir: Path
    token: str = field(repr=False)
    token_file: Path
    ports: dict[str, int]
    env: dict[str, str] = field(repr=False)
    _watchdog: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """The dashboard / Jobs API address, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def metrics_url(self) -> str:
        """This node's Prometheus endpoint (Ray's and segray's worker metrics)."""
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    @property
    def service_discovery_file(self) -> Path:
        return self.temp_dir / "prom_metrics_service_discovery.json"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> set[int]:
        return processes_of(str(self.temp_dir))

    def listeners(self) -> list[tuple[str, int, str]]:
        """Every listening TCP socket of the cluster's processes, ``(address, port, process)``."""
        return listening_sockets(self.processes())

    def ray(self, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the ``ray`` CLI (``ray job submit ...``) as a client of this cluster.

        ``--address`` is added after the sub-command (``ray job submit --address ...``); ``env``
        replaces the client environment (default: :attr:`env`, which holds the token).
        """
        cmd = [_ray_cli(), *args]
        if args[:1] == ("job",) and len(args) > 1:
            cmd = [_ray_cli(), "job", args[1], "--address", self.address, *args[2:]]
        return subprocess.run(cmd, cwd=cwd, env=self.env if env is None else env, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def job_info(self, submission_id: str) -> dict[str, Any] | None:
        """The Jobs API's record of a job (``status``, ``message``, ...), or None if unknown."""
        status, body = http_get(f"{self.address}/api/jobs/{submission_id}", self.auth_headers)
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"GET /api/jobs/{submission_id}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def stop(self) -> None:
        """Kill the cluster's processes (and nothing else) and remove its folder."""
        kill_processes(str(self.temp_dir))
        if self._watchdog is not None:
            stop_watchdog(self._watchdog)
        shutil.rmtree(self.base, ignore_errors=True)


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


PORT_ROLES = ("gcs", "dashboard", "metrics", "client", "agent_http", "agent_grpc", "runtime_env",
              "node_manager", "object_manager", "autoscaler_metrics", "dashboard_metrics")


def start_ray_head(num_cpus: int = 4, extra_env: dict[str, str] | None = None,
                   timeout: float = 120) -> RayHead:
    """Start a single-node Ray cluster with token authentication, bound to the loopback.

    Args:
        num_cpus: logical CPUs the node advertises.
        extra_env: more environment for every Ray process of the cluster.
        timeout: seconds to wait for the dashboard and the metrics endpoint to answer.

    Returns:
        The running head; call :meth:`RayHead.stop` when done.

    Raises:
        RuntimeError: ``ray start`` failed or the cluster did not come up (its output included).
    """
    # A short base path: Ray puts Unix sockets under the temp dir, and socket paths are limited
    # to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="segray-ray-"))
    temp_dir = base / "ray"
    token = secrets.token_hex(32)
    token_file = base / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    ports = dict(zip(PORT_ROLES, free_ports(len(PORT_ROLES))))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    client_env = {k: v for k, v in os.environ.items()
                  if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    client_env.update(auth)
    env = dict(client_env)
    env.update(
        # Ray turns `--node-ip-address 127.0.0.1` into the machine's address, and its daemons then
        # listen on every interface. This switch (meant for single-machine Windows/macOS use)
        # keeps the node on the loopback, so every Ray port binds 127.0.0.1.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # The dashboard's and the autoscaler's own metrics ports are fixed (44227, 44217) unless
        # set here; the service-discovery file lists them, so keep them private to this cluster.
        DASHBOARD_METRIC_PORT=str(ports["dashboard_metrics"]),
        AUTOSCALER_METRIC_PORT=str(ports["autoscaler_metrics"]),
        RAY_USAGE_STATS_ENABLED="0",
        SEGRAY_TEST_RAY_HEAD=str(temp_dir),  # lets processes_of() find the Ray Client server
        **(extra_env or {}),
    )
    watchdog = start_watchdog(str(temp_dir))
    head = RayHead(base=base, temp_dir=temp_dir, token=token, token_file=token_file, ports=ports,
                   env=client_env, _watchdog=watchdog)
    cmd = [_ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(ports["gcs"]), "--num-cpus", str(num_cpus),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(ports["dashboard"]),
           "--metrics-export-port", str(ports["metrics"]),
           "--ray-client-server-port", str(ports["client"]),
           "--dashboard-agent-listen-port", str(ports["agent_http"]),
           "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
           "--runtime-env-agent-port", str(ports["runtime_env"]),
           "--node-manager-port", str(ports["node_manager"]),
           "--object-manager-port", str(ports["object_manager"]),
           "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=base, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{proc.stdout[-4000:]}")
        wait_until(lambda: http_get(f"{head.address}/api/version", head.auth_headers)[0] == 200,
                   timeout, f"the dashboard at {head.address}")
        wait_until(lambda: http_get(head.metrics_url)[0] == 200, timeout, head.metrics_url)
        wait_until(head.service_discovery_file.exists, timeout, str(head.service_discovery_file))
    except BaseException:
        head.stop()
        raise
    return head


# --- fixtures ---------------------------------------------------------------------------------


# Import this into a test module to use the fixture `ray_head` there (the function name differs
# from the fixture name so that linters see no shadowed import).
@pytest.fixture(scope="module", name="ray_head")
def ray_head_fixture() -> Iterator[RayHead]:
    """A token-authenticated single-node Ray cluster for the test module, stopped afterwards."""
    head = start_ray_head()
    yield head
    head.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["reap-on-eof"]:
    sys.stdin.read()  # returns when the test process closes the pipe or dies
    kill_processes(bytes.fromhex(sys.argv[2]).decode())
