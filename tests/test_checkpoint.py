"""Checkpoint folders: complete ones load with weights_only, cut-short ones are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from segray.checkpoint import (
    checkpoint_name,
    is_complete,
    latest_checkpoint,
    load_meta,
    load_state,
    write_local,
)


def _write(run: Path, step: int) -> Path:
    folder = write_local({"model": {"w": torch.full((3,), float(step))}, "step": step},
                         {"method": "supervised", "step": step})
    dst = run / checkpoint_name(step)
    shutil.move(folder, dst)
    return dst


def test_names_are_deterministic_and_sortable():
    assert checkpoint_name(300) == "step_0000300"
    assert sorted(checkpoint_name(s) for s in (1000, 20, 300)) == [
        "step_0000020", "step_0000300", "step_0001000"]


def test_roundtrip_and_latest(tmp_path):
    _write(tmp_path, 10)
    _write(tmp_path, 20)
    state = load_state(str(tmp_path / "step_0000020"))
    assert state["step"] == 20 and torch.equal(state["model"]["w"], torch.full((3,), 20.0))
    assert load_meta(str(tmp_path / "step_0000020"))["method"] == "supervised"
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_0000020")


def test_a_cut_short_checkpoint_is_refused_and_skipped(tmp_path):
    _write(tmp_path, 10)
    partial = _write(tmp_path, 20)
    data = (partial / "state.pt").read_bytes()
    (partial / "state.pt").write_bytes(data[: len(data) // 2])  # an upload still in flight
    assert not is_complete(str(partial))
    with pytest.raises(ValueError, match="incomplete or corrupt"):
        load_state(str(partial))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step_0000010")


def test_a_folder_without_state_names_what_is_expected(tmp_path):
    (tmp_path / "step_0000005").mkdir()
    with pytest.raises(FileNotFoundError, match="expected state.pt and meta.json"):
        load_state(str(tmp_path / "step_0000005"))
    assert latest_checkpoint(str(tmp_path)) is None


def test_only_tensors_and_plain_data_load(tmp_path):
    """weights_only=True: a pickled arbitrary object is rejected, not executed."""
    folder = tmp_path / "step_0000001"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, folder / "state.pt")
    data = (folder / "state.pt").read_bytes()
    from segray import storage

    (folder / "meta.json").write_text(
        f'{{"state_bytes": {len(data)}, "state_sha256": "{storage.sha256(data)}"}}')
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_state(str(folder))


@pytest.mark.parametrize("damage", [b'{"method": "supervised", "st', b"\xff\xfe", b"[1, 2]"])
def test_a_corrupt_meta_json_is_named(tmp_path, damage):
    folder = _write(tmp_path, 10)
    (folder / "meta.json").write_bytes(damage)
    with pytest.raises(ValueError, match=f"checkpoint file {folder / 'meta.json'} is corrupt"):
        load_meta(str(folder))
    with pytest.raises(ValueError, match="meta.json is corrupt"):
        load_state(str(folder))
    assert not is_complete(str(folder)) and latest_checkpoint(str(tmp_path)) is None
