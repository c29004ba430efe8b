"""Checkpoints: one folder per save, written to a temporary name and handed to Ray Train whole.

Layout of a checkpoint folder (``<run>/step_0000300/``): ``state.pt`` (model, optimizer, scheduler,
step, metric history; loaded with ``weights_only=True``) and ``meta.json`` (method, step, config).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from segray import storage

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def checkpoint_name(step: int) -> str:
    """Deterministic checkpoint folder name for ``step``."""
    return f"step_{step:07d}"


def write_local(state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write a checkpoint into a fresh temporary folder and return its path.

    A failed write (a full disk) removes the folder: retries must not pile up copies.
    """
    folder = tempfile.mkdtemp(prefix="segray-ckpt-")
    try:
        tmp = Path(folder, STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, Path(folder, STATE_FILE))
        data = Path(folder, STATE_FILE).read_bytes()
        # The folder is copied to storage file by file; the recorded size and digest let every
        # reader refuse a copy that is still in flight or was cut short.
        meta = {**meta, "state_bytes": len(data), "state_sha256": storage.sha256(data)}
        Path(folder, META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def load_state(folder_or_uri: str) -> dict[str, Any]:
    """Load ``state.pt`` from a local folder or an ``s3://`` checkpoint folder (``weights_only=True``).

    Raises:
        FileNotFoundError: naming the folder when it holds no ``state.pt``.
    """
    uri = storage.join(folder_or_uri, STATE_FILE)
    if not storage.exists(uri) or not storage.exists(storage.join(folder_or_uri, META_FILE)):
        raise FileNotFoundError(
            f"no checkpoint at {folder_or_uri}: expected {STATE_FILE} and {META_FILE} inside a "
            "step_NNNNNNN folder of a run"
        )
    data = storage.read_bytes(uri)
    meta = load_meta(folder_or_uri)
    if len(data) != meta.get("state_bytes") or storage.sha256(data) != meta.get("state_sha256"):
        raise ValueError(
            f"checkpoint {folder_or_uri} is incomplete or corrupt: {STATE_FILE} has {len(data)} "
            f"bytes, {META_FILE} expects {meta.get('state_bytes')} with a matching sha256; use an "
            "earlier step_* folder"
        )
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_meta(folder_or_uri: str) -> dict[str, Any]:
    """Load ``meta.json`` of a checkpoint.

    Raises:
        FileNotFoundError: naming the file when it is missing.
        ValueError: naming the file when it is not a JSON object (a damaged checkpoint).
    """
    uri = storage.join(folder_or_uri, META_FILE)
    try:
        meta = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ValueError(f"checkpoint file {uri} is corrupt: not valid JSON ({e}); use an "
                         "earlier step_* folder of the run") from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint file {uri} is corrupt: expected a JSON object, got "
                         f"{type(meta).__name__}; use an earlier step_* folder of the run")
    return meta


def is_complete(folder_or_uri: str) -> bool:
    """Whether a checkpoint folder holds a whole ``state.pt`` matching its ``meta.json``."""
    try:
        meta = load_meta(folder_or_uri)
        fs, path = storage.filesystem(storage.join(folder_or_uri, STATE_FILE))
        return fs.get_file_info(path).size == meta.get("state_bytes")
    except (FileNotFoundError, ValueError, OSError):
        return False


def latest_checkpoint(run_uri: str) -> str | None:
    """The newest complete ``step_*`` checkpoint folder of a run, or ``None``."""
    names = [n for n in storage.list_dir(run_uri) if n.startswith("step_")]
    for name in sorted(names, reverse=True):
        folder = storage.join(run_uri, name)
        if is_complete(folder):
            return folder
    return None


def latest_step(run_uri: str) -> int:
    """The step of a run's newest complete checkpoint; 0 when it has none (or no folder)."""
    if not storage.exists(run_uri):
        return 0
    latest = latest_checkpoint(run_uri)
    return int(latest.rstrip("/").rsplit("/", 1)[-1][len("step_"):]) if latest else 0
