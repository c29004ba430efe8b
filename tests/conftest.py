"""Shared fixtures: a small synthetic dataset, job runners and isolation of caches/run folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    """A small synthetic dataset (64 train / 16 val / 32 unlabelled images), built once per session."""
    from segray.data.synthetic import make_synthetic

    dst = tmp_path_factory.mktemp("data") / "synth-small"
    make_synthetic(str(dst), train=64, val=16, unlabeled=32, size=48, seed=3, rows_per_shard=32)
    return str(dst)


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a job subprocess: private cache and run storage, test methods importable."""
    env = dict(os.environ)
    env.update(
        SEGRAY_CACHE=str(tmp_path / "cache"),
        SEGRAY_STORAGE=str(tmp_path / "runs"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="token",
    )
    env.update(extra)
    return env


def run_job(script: str, *args: str, env: dict[str, str], timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python jobs/<script> args...`` and return the completed process (stdout+stderr merged)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc
