"""Bad data: every kind of broken row or shard is a clear error naming the shard and key (or the
split), by default; with ``data.on_bad_sample=skip`` a run skips the bad rows and counts them in
its metrics and summary.

Detection is checked without Ray first (decode checks, shard scans, manifests), then on a real
local Ray through the streams the train job builds; end to end through ``jobs/train.py`` in
test_bad_data_jobs.py.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_rows import (
    NUM_CLASSES,
    drop_mask,
    flip_a_byte,
    good_rows,
    mixed,
    rewrite_shard,
    row_variants,
    set_key,
    write_rows,
)

from segray import storage
from segray.data.decode import BadSampleError, validate_sample
from segray.data.manifest import DatasetError, open_dataset
from segray.data.preflight import check_split
from segray.data.shards import DatasetWriter, encode_mask_png
from segray.data.stream import iter_rows
from segray.worker import data_error_in, run_worker


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return good_rows(tmp_path_factory.mktemp("bad"))


def test_row_checks_name_shard_and_key(good):
    _, train, _ = good
    for case, (rows, i) in row_variants(train).items():
        r = rows[i]
        with pytest.raises(BadSampleError) as e:
            validate_sample(r["image"], r["mask"], num_classes=NUM_CLASSES,
                            shard="s3://b/ds/train-00001.parquet", key=r["key"])
        assert e.value.key == r["key"] and "train-00001.parquet" in str(e.value), case
        h, w = r["height"], r["width"]
        expected = {"corrupt_image": "cannot decode",
                    "cut_jpeg": "image: cannot decode image bytes (damaged JPEG data: libjpeg "
                                "warns 'Corrupt JPEG data: premature end of data segment'",
                    "mask_size": f"mask is {h + 3}x{w} but image is {h}x{w}",
                    "label_range": "label values [9] outside [0, 6)"}[case]
        assert expected in str(e.value)
    # Ignore-valued pixels and every class id are accepted.
    ok = np.array([[0, 5, 255]], np.uint8)
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (3, 1)).save(png, format="PNG")
    _, mask = validate_sample(png.getvalue(), encode_mask_png(ok), num_classes=NUM_CLASSES)
    assert mask.tolist() == ok.tolist()


def test_structure_checks(tmp_path, good):
    info, train, val = good
    # A shard without its mask column, listed (with a matching checksum) by the manifest.
    dst = write_rows(tmp_path / "nomask", info, train, val)
    rewrite_shard(dst, "train-00002.parquet", drop_mask)
    ds = open_dataset(str(dst))
    with pytest.raises(DatasetError, match=r"split 'train': shard .*train-00002\.parquet: shard has "
                                         r"no column\(s\) 'mask'"):
        check_split(ds, "train", ["key", "image", "labels", "mask"])
    assert check_split(ds, "train", ["key", "image", "labels"]) == (set(), {})  # unlabelled use
    # A key repeated in a second shard (and one repeated across splits).
    dst = write_rows(tmp_path / "dup", info, train, val)
    rewrite_shard(dst, "train-00003.parquet", lambda t: set_key(t, 1, train[2]["key"]))
    ds = open_dataset(str(dst))
    with pytest.raises(BadSampleError) as e:
        check_split(ds, "train", ["key", "image", "mask"])
    assert e.value.key == train[2]["key"] and e.value.shard.endswith("train-00003.parquet")
    assert "also occurs in" in str(e.value) and "train-00000.parquet" in str(e.value)
    assert check_split(ds, "val", ["key", "image", "mask"]) == (set(), {})  # val is clean
    # Skip mode leaves out the repeat by its row, so a key repeated in its own shard keeps its
    # first row: shard 3 row 1 (in another shard), then shard 0 row 3 (in the same shard).
    both = write_rows(tmp_path / "dup2", info, train, val)
    rewrite_shard(both, "train-00003.parquet", lambda t: set_key(t, 1, train[2]["key"]))
    rewrite_shard(both, "train-00000.parquet", lambda t: set_key(t, 3, train[1]["key"]))
    drop, skip_rows = check_split(open_dataset(str(both)), "train", ["key", "image", "mask"],
                                  skip=True)
    assert drop == set() and skip_rows == {str(both / "train-00000.parquet"): {3},
                                           str(both / "train-00003.parquet"): {1}}
    # A training image that is also a validation image: both splits refuse it.
    rewrite_shard(dst, "train-00003.parquet", lambda t: set_key(t, 1, train[13]["key"]))
    rewrite_shard(dst, "val-00000.parquet", lambda t: set_key(t, 0, train[0]["key"]))
    ds = open_dataset(str(dst))
    for split in ("train", "val"):
        with pytest.raises(BadSampleError, match=r"val-00000\.parquet: duplicate key"):
            check_split(ds, split, ["key", "image", "mask"])


def test_empty_split_names_the_split(tmp_path, good):
    info, train, val = good
    dst = write_rows(tmp_path / "empty", info, train, val)
    manifest = json.loads((dst / "dataset.json").read_text())
    # A split whose shards hold no row (a zero-row Parquet file with the right checksum).
    sink = io.BytesIO()
    pq.write_table(pq.read_table(dst / "val-00000.parquet").slice(0, 0), sink)
    (dst / "val-00000.parquet").write_bytes(sink.getvalue())
    manifest["splits"]["val"] = [{"path": "val-00000.parquet", "rows": 0, "bytes": len(
        sink.getvalue()), "sha256": storage.sha256(sink.getvalue())}]
    (dst / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"split 'val' is empty"):
        open_dataset(str(dst))
    manifest["splits"]["val"] = []
    (dst / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"'splits\.val'"):
        open_dataset(str(dst))
    # The writer refuses to produce one in the first place.
    r = train[0]
    with (pytest.raises(ValueError, match=r"split\(s\) val .* received no rows"),
          DatasetWriter(str(tmp_path / "w"), "x", info.classes, splits=["train", "val"]) as w):
        w.add("train", r["key"], r["image"], r["mask"], r["labels"], r["height"], r["width"])
    assert not (tmp_path / "w" / "dataset.json").exists()


def test_changed_shard_fails_every_reader(tmp_path, good):
    info, train, val = good
    dst = write_rows(tmp_path / "changed", info, train, val)
    flip_a_byte(dst / "train-00001.parquet")  # same size, other bytes
    ds = open_dataset(str(dst))
    with pytest.raises(DatasetError, match=r"shard .*train-00001\.parquet of split 'train' does "
                                         r"not match its manifest"):
        list(iter_rows(ds, "train"))
    assert len(list(iter_rows(ds, "val"))) == 4


def test_row_count_differs_from_manifest(tmp_path, good):
    """A shard whose footer holds another number of rows than the manifest records (an empty one
    included) is an error naming it, though its size and checksum match."""
    info, train, val = good
    dst = write_rows(tmp_path / "rows", info, train, val)
    manifest = json.loads((dst / "dataset.json").read_text())
    manifest["splits"]["val"][0]["rows"] = 6  # the file holds 4
    (dst / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"shard .*val-00000\.parquet of split 'val' holds 4 "
                                         r"rows, the manifest says 6"):
        check_split(open_dataset(str(dst)), "val", ["key", "image", "mask"])
    empty = write_rows(tmp_path / "empty-shard", info, train, val)
    rewrite_shard(empty, "train-00001.parquet", lambda t: t.slice(0, 0))
    manifest = json.loads((empty / "dataset.json").read_text())
    manifest["splits"]["train"][1]["rows"] = 4  # as before the shard was emptied
    (empty / "dataset.json").write_text(json.dumps(manifest))
    ds = open_dataset(str(empty))
    assert ds.num_rows("train") == 16
    for split in ("train", "val"):  # every split's check scans the whole dataset
        with pytest.raises(DatasetError, match=r"train-00001\.parquet of split 'train' holds 0 "
                                             r"rows, the manifest says 4"):
            check_split(ds, split, ["key", "image", "mask"])


class _Tally:
    """A :class:`~segray.data.skips.SkipCounter` without Ray: the actor's own bookkeeping."""

    def __init__(self) -> None:
        from segray.data.skips import _SkipTally

        self.tally = _SkipTally()

    def record(self, error: BadSampleError, row: int | None = None) -> None:
        self.tally.add(error.shard, error.key, error.reason, row)

    @property
    def total(self) -> int:
        return self.tally.total


def test_skips_count_rows_not_keys(tmp_path, good):
    """A key three times in one shard is two rows dropped, and counted as two (once each however
    many epochs meet them)."""
    info, train, val = good
    dst = write_rows(tmp_path / "thrice", info, train, val)
    for row in (1, 3):  # shard 1: rows 4..7; its rows 1 and 3 repeat its row 0
        rewrite_shard(dst, "train-00001.parquet", lambda t, r=row: set_key(t, r, train[4]["key"]))
    counter = _Tally()
    drop, skip_rows = check_split(open_dataset(str(dst)), "train", ["key", "image", "mask"],
                                  skip=True, counter=counter)
    assert drop == set() and skip_rows == {str(dst / "train-00001.parquet"): {1, 3}}
    assert counter.total == 2
    for row in (1, 3):  # met again in a later epoch
        counter.record(BadSampleError(str(dst / "train-00001.parquet"), train[4]["key"], "dup"),
                       row)
    assert counter.total == 2


def test_skip_mode_with_no_usable_row_is_a_dataset_error(tmp_path, good):
    """Skipping every row of a split (here each val key repeats a train key) stops the stream
    before it is built, naming the split and the count; not later, in each worker, as a
    batch-size problem."""
    from segray.data.stream import train_dataset

    info, train, val = good
    dst = write_rows(tmp_path / "all-dup", info, train, val)
    keys = pa.array([r["key"] for r in train[:4]], pa.string())
    rewrite_shard(dst, "val-00000.parquet", lambda t: t.set_column(0, "key", keys))
    ds = open_dataset(str(dst))
    with pytest.raises(DatasetError, match=r"split 'val' of .* has no usable row: all 4 rows are "
                                         r"skipped \(data\.on_bad_sample=skip\), e\.g\. "
                                         r"'train-00000' in .*val-00000\.parquet: duplicate key"):
        train_dataset(ds, "val", crop=(16, 16), on_bad_sample="skip", skip_counter=_Tally())
    assert check_split(ds, "train", ["key", "image", "mask"], skip=True,
                       counter=_Tally()) == (set(), {})  # train keeps the first occurrences


def _evaluate(info, out: Path) -> dict:
    """``jobs/evaluate.py``'s core on the val split, with a 1x1 convolution for a model."""
    from types import SimpleNamespace

    import torch

    from segray.config import EvalConfig
    from segray.evaluation import run_evaluation

    method = SimpleNamespace(predict=lambda model, x: model(x))
    cfg = SimpleNamespace(train=SimpleNamespace(precision="fp32"), eval=EvalConfig(),
                          augment=SimpleNamespace(mean=[0.0] * 3, std=[1.0] * 3))
    return run_evaluation(method, torch.nn.Conv2d(3, NUM_CLASSES, 1), cfg, info, "val", str(out),
                          keep=0)


def test_evaluation_checks_the_split_as_training_does(tmp_path, good):
    """A repeated key was scored twice, a shard without ``image`` raised a bare KeyError and one
    without ``mask`` was blamed on its rows: each is now the training streams' error, naming
    shard (and key), before anything is written."""
    info, train, val = good
    assert _evaluate(open_dataset(str(write_rows(tmp_path / "ok", info, train, val))),
                     tmp_path / "eval-ok")["images"] == 4
    dup = write_rows(tmp_path / "dup", info, train, val)
    rewrite_shard(dup, "val-00000.parquet", lambda t: set_key(t, 3, val[0]["key"]))
    with pytest.raises(BadSampleError) as e:
        _evaluate(open_dataset(str(dup)), tmp_path / "eval-dup")
    assert e.value.key == val[0]["key"] and e.value.shard == str(dup / "val-00000.parquet")
    assert "duplicate key" in e.value.reason and not (tmp_path / "eval-dup").exists()
    for column in ("image", "mask"):
        dst = write_rows(tmp_path / f"no-{column}", info, train, val)
        rewrite_shard(dst, "val-00000.parquet", lambda t, c=column: t.drop_columns([c]))
        with pytest.raises(DatasetError, match=rf"split 'val': shard .*val-00000\.parquet: shard "
                                             rf"has no column\(s\) '{column}'"):
            _evaluate(open_dataset(str(dst)), tmp_path / f"eval-no-{column}")
        assert not (tmp_path / f"eval-no-{column}").exists()


# ------------------------------------------------------------------ Ray streams (local, in-process)

@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # in-process test cluster; no token file written
    # address="local": a private instance, never another engineer's `ray start` cluster.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.cluster
def test_streams_error_then_skip_and_count(ray_local, tmp_path, good):
    from segray.data import SkipCounter, eval_dataset, train_dataset

    info, train, val = good
    crop = (24, 24)
    for case, (rows, i) in row_variants(train).items():
        ds = open_dataset(str(write_rows(tmp_path / case, info, rows, val)))
        with pytest.raises(Exception) as e:  # noqa: B017 - Ray wraps it; the message counts
            train_dataset(ds, "train", crop=crop).take_all()
        assert rows[i]["key"] in str(e.value) and "train-00001.parquet" in str(e.value), case
        found = data_error_in(e.value)  # what a training worker records to stop the run
        assert found is not None and found.key == rows[i]["key"], case
        assert found.shard == str(Path(ds.uri) / "train-00001.parquet"), case

    dst, bad, dups = mixed(tmp_path / "mixed", good)
    ds = open_dataset(str(dst))
    with pytest.raises(DatasetError, match="train-00003.parquet: shard has no column"):
        train_dataset(ds, "train", crop=crop)  # structure problems stop before any Ray work
    counter = SkipCounter()
    stream = train_dataset(ds, "train", crop=crop, on_bad_sample="skip", skip_counter=counter,
                           passes=2)
    kept = [r["key"] for r in stream.take_all()]
    assert len(kept) == 2 * (16 - len(bad) - 2)  # each epoch: the good rows, each dup key once
    assert not set(kept) & bad and all(kept.count(dup) == 2 for dup in dups)
    assert counter.total == len(bad) + 2  # distinct rows, though 2 epochs met them
    reasons = {r["key"]: r["reason"] for r in counter.records()}
    assert all("duplicate key" in reasons[dup] for dup in dups)
    assert "no column(s) 'mask'" in reasons[train[12]["key"]]
    # Evaluation never skips (it takes no on_bad_sample): a bad val row fails the val stream.
    assert len(eval_dataset(ds, "val").take_all()) == 4
    rows, i = row_variants(val, row=2)["label_range"]
    broken = open_dataset(str(write_rows(tmp_path / "bad-val", info, train, rows)))
    with pytest.raises(Exception) as e:  # noqa: B017 - Ray wraps it; the message counts
        eval_dataset(broken, "val").take_all()
    assert f"bad sample '{rows[i]['key']}' in shard" in str(e.value)
    assert "val-00000.parquet" in str(e.value)


@pytest.mark.cluster
def test_skip_counter_counts_each_row_of_a_repeated_key(ray_local, tmp_path, good):
    """Through the real counter (a Ray actor) and stream: a key three times in one shard drops
    two rows and counts two, over two epochs; a bad row is counted by its row number too."""
    from segray.data.stream import SkipCounter, train_dataset

    info, train, val = good
    rows = [dict(r) for r in train]
    rows[9] = dict(row_variants(train)["label_range"][0][5], key=rows[9]["key"])
    dst = write_rows(tmp_path / "thrice", info, rows, val)
    for row in (1, 3):  # shard 1: rows 4..7; its rows 1 and 3 repeat its row 0
        rewrite_shard(dst, "train-00001.parquet", lambda t, r=row: set_key(t, r, train[4]["key"]))
    counter = SkipCounter()
    kept = train_dataset(open_dataset(str(dst)), "train", crop=(24, 24), on_bad_sample="skip",
                         skip_counter=counter, passes=2).take_all()
    assert len(kept) == 2 * (16 - 3)
    assert counter.total == 3
    assert sorted((r["row"], r["key"]) for r in counter.records()) == [
        (1, train[4]["key"]), (1, train[9]["key"]), (3, train[4]["key"])]


@pytest.mark.cluster
def test_a_changed_shard_is_recorded_like_a_bad_row(ray_local, tmp_path, good):
    """A shard changed at the same size passes the footer scan and fails in a decode task; the
    worker records it as it does a bad row, so a retry fails at once instead of re-reading."""
    from segray.data.stream import train_dataset
    from segray.report import read_data_error, write_data_error

    info, train, val = good
    dst = write_rows(tmp_path / "changed", info, train, val)
    flip_a_byte(dst / "train-00001.parquet")
    with pytest.raises(Exception) as e:  # noqa: B017 - Ray wraps it; the message counts
        train_dataset(open_dataset(str(dst)), "train", crop=(24, 24),
                      on_bad_sample="skip").take_all()  # a shard is not a row: never skipped
    found = data_error_in(e.value)
    assert isinstance(found, DatasetError)
    assert f"shard {dst / 'train-00001.parquet'} of split 'train' does not match" in str(found)
    write_data_error(str(tmp_path / "run"), found)
    recorded = read_data_error(str(tmp_path / "run"))
    assert isinstance(recorded, DatasetError) and str(recorded) == str(found)
    with pytest.raises(DatasetError, match="does not match its manifest"):
        run_worker({"run_uri": str(tmp_path / "run")})
    # A shard deleted after the stream was built is a bad shard too, not a crash.
    gone = write_rows(tmp_path / "gone", info, train, val)
    stream = train_dataset(open_dataset(str(gone)), "train", crop=(24, 24))
    (gone / "train-00002.parquet").unlink()
    with pytest.raises(Exception) as e:  # noqa: B017 - Ray wraps it; the message counts
        stream.take_all()
    assert isinstance(data_error_in(e.value), DatasetError)
    assert (f"shard {gone / 'train-00002.parquet'} of split 'train' is listed by the manifest "
            "but is gone") in str(e.value)


def test_worker_fails_fast_on_a_recorded_bad_row(tmp_path):
    # A retry after a bad row raises before it builds anything (no Ray Train context needed).
    from segray.report import write_data_error

    write_data_error(str(tmp_path), BadSampleError("s3://b/d/train-00001.parquet", "k7",
                                                    "image: cannot decode"))
    with pytest.raises(BadSampleError, match=r"bad sample 'k7' in shard s3://b/d/train-00001"):
        run_worker({"run_uri": str(tmp_path)})
