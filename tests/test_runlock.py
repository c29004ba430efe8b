"""One process at a time per run or sweep folder: the lease is exclusive, names its holder when
refused, is renewed, taken over once its holder is gone, and released; on a local folder and on a
real S3-compatible server; and two training jobs under one --name."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, job_env, run_job
from s3server import start_s3_server

from segray import launch
from segray.runlock import LOCK_FILE, RunInUse, RunLease


@pytest.fixture(scope="module")
def s3():
    with start_s3_server(bucket="bucket") as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    s3 = request.getfixturevalue("s3")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return f"s3://bucket/runs/{tmp_path.name}/r1"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(lease: RunLease, **record) -> None:
    """Write a lease record as another process would have."""
    other = RunLease(lease.uri, "another run")
    assert other._backend.create({**other.record(), **record})


def test_the_lease_is_exclusive_names_its_holder_and_is_released(folder):
    first = RunLease(folder, "a training run").acquire()
    try:
        with pytest.raises(RunInUse, match=r"is in use by a training run on host "
                                            rf"{socket.gethostname()} \(pid {os.getpid()}, since "
                                            r".* UTC, last heartbeat 0 s ago\); wait for it to "
                                            r"end or pick another --name"):
            RunLease(folder, "a sweep driver").acquire()
        assert first.renew() and not first.lost
    finally:
        first.release()
    second = RunLease(folder, "a sweep driver").acquire()  # released: free again
    assert second.taken_over is None
    second.release()
    assert RunLease(folder, "x")._backend.read() == (None, None)


def test_a_lease_whose_holder_is_gone_is_taken_over(folder):
    lease = RunLease(folder, "a training run")
    # A process of this host that has exited: gone at once, heartbeat or not.
    _plant(lease, pid=_dead_pid(), heartbeat=time.time())
    lease.acquire()
    assert lease.taken_over["holder"] == "another run"
    lease.release()
    # Another host, silent past the expiry: gone; still beating: in use.
    _plant(lease, host="elsewhere", pid=1, heartbeat=time.time() - 500)
    lease = RunLease(folder, "a training run").acquire()
    assert lease.taken_over["host"] == "elsewhere"
    lease.release()
    _plant(lease, host="elsewhere", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(RunInUse, match=r"on host elsewhere \(pid 1, .*last heartbeat 30 s ago"):
        RunLease(folder, "a training run").acquire()


def test_a_holder_that_missed_its_heartbeats_learns_it_lost_the_lease(folder):
    slow = RunLease(folder, "a training run", expire_s=0.0).acquire()  # expires at once
    try:
        time.sleep(0.05)
        taker = RunLease(folder, "another run", expire_s=0.0)
        taker.acquire()
        assert taker.taken_over["token"] == slow.token
        assert not slow.renew() and slow.lost
        slow.release()  # not its lease any more: left alone
        record, _ = taker._backend.read()
        assert record["token"] == taker.token
        taker.release()
    finally:
        slow._stop.set()


def test_the_lease_is_renewed_while_held(tmp_path):
    lease = RunLease(str(tmp_path / "r"), "a training run", heartbeat_s=0.05).acquire()
    try:
        first = json.loads((tmp_path / "r" / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["heartbeat"] > first
    finally:
        lease.release()
    assert not (tmp_path / "r").exists()  # made for the lease, nothing else written: removed


def test_take_lease_is_a_usage_error(tmp_path):
    held = launch.take_lease(str(tmp_path / "r"), "a training run")
    try:
        with pytest.raises(launch.UsageError, match="is in use by a training run"):
            launch.take_lease(str(tmp_path / "r"), "a training run")
    finally:
        held.release()


@pytest.mark.cluster
def test_a_second_training_job_under_the_same_name_is_refused(tmp_path, small_dataset):
    env = job_env(tmp_path)
    args = ["--method", "supervised", "--set", "model.decoder_channels=16", "--batch-size", "4",
            "--data", small_dataset, "--steps", "2000", "--name", "busy",
            "--storage", str(tmp_path / "runs")]
    lock = tmp_path / "runs" / "busy" / LOCK_FILE
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args],
                                 cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.time() + 120
        while not lock.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first job never took the lease"
            time.sleep(0.1)
        second = run_job("train.py", *args, env=env, check=False, timeout=120)
        assert second.returncode == 2, second.stdout[-3000:]
        assert (f"error: {tmp_path / 'runs' / 'busy'} is in use by a training run on host "
                f"{socket.gethostname()} (pid {first.pid}") in second.stdout, second.stdout[-3000:]
        assert first.poll() is None  # the first run goes on
    finally:
        os.killpg(first.pid, signal.SIGINT)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not lock.exists()  # Ctrl-C released it
