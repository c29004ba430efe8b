"""Ray Data streams on a real local Ray: fixed-shape batches, epochs, eval rows, bad rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from segray.data.decode import BadSampleError, decode_image
from segray.data.eval_stream import eval_dataset, eval_rows
from segray.data.manifest import open_dataset
from segray.data.shards import DatasetWriter
from segray.data.stream import (
    SkipCounter,
    batch_rows,
    eval_collate,
    iter_rows,
    read_split,
    train_collate,
    train_dataset,
)
from segray.data.synthetic import make_synthetic

ray = pytest.importorskip("ray")
CROP = (32, 24)


@pytest.fixture(scope="module")
def ray_local():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # in-process test cluster; no token file written
    # address="local": always a private cluster, even if `ray start` runs one on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    dst = tmp_path_factory.mktemp("stream") / "synth"
    return make_synthetic(str(dst), train=20, val=6, unlabeled=6, size=40, rows_per_shard=8)


@pytest.fixture(scope="module")
def with_bad_row(tmp_path_factory, synth):
    """Eight good rows from the synthetic set, with one corrupt image in the second shard."""
    dst = tmp_path_factory.mktemp("stream") / "bad"
    rows = list(iter_rows(synth, "train"))[:8]
    with DatasetWriter(str(dst), "bad", synth.classes, synth.palette, rows_per_shard=4) as w:
        for i, r in enumerate(rows):
            image = b"\x89PNG corrupted bytes" if i == 5 else r["image"]
            w.add("train", r["key"], image, r["mask"], r["labels"], r["height"], r["width"])
    return open_dataset(str(dst)), rows[5]["key"]


def _crops(ds) -> dict[str, np.ndarray]:
    return {k: img for b in ds.iter_batches(batch_size=8, batch_format="numpy")
            for k, img in zip(b["key"], b["image"], strict=True)}


def test_read_split_reads_manifest_shards(ray_local, synth):
    (Path(synth.uri) / "stray-00000.parquet").write_bytes(b"junk")  # never listed, never read
    ds = read_split(synth, "val", columns=["key", "height"])
    rows = ds.take_all()
    assert sorted(r["key"] for r in rows) == [f"val-{i:05d}" for i in range(6)]
    assert {Path(r["path"]).name for r in rows} == {"val-00000.parquet"}


def test_read_split_verifies_each_shard_against_the_manifest(ray_local, synth, tmp_path):
    """read_split reads the shards as every stream does: a shard rewritten after the manifest
    (still valid Parquet, other keys) is an error naming it, not rows read as they are."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    dst = tmp_path / "copy"
    shutil.copytree(synth.uri, dst)
    info = open_dataset(str(dst))
    rows = read_split(info, "train", shuffle_seed=1).take_all()  # every column, any shard order
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in iter_rows(info, "train"))
    assert {r["path"] for r in rows} == set(info.shard_uris("train"))
    assert isinstance(rows[0]["image"], bytes) and list(rows[0]["labels"]) == rows[0]["labels"]
    with pytest.raises(Exception, match=r"val-00000\.parquet of split 'val' has no column\(s\) "  # noqa: B017
                                        r"'nope'"):
        read_split(info, "val", columns=["key", "nope"]).take_all()
    table = pq.read_table(dst / "val-00000.parquet")
    keys = ["renamed"] + table.column("key").to_pylist()[1:]
    pq.write_table(table.set_column(0, "key", pa.array(keys, pa.string())),
                   dst / "val-00000.parquet")
    with pytest.raises(Exception, match=r"shard .*val-00000\.parquet of split 'val' does not "  # noqa: B017
                                        r"match its manifest"):
        read_split(info, "val", columns=["key"]).take_all()


def test_train_batches_fixed_shape(ray_local, synth):
    ds = train_dataset(synth, "train", crop=CROP, seed=0)
    # One map stage: Ray Data's per-operator CPU reservation only idles decode tasks here.
    assert ds.context.op_resource_reservation_enabled is False
    assert eval_dataset(synth, "val").context.op_resource_reservation_enabled is False
    batches = list(ds.iter_torch_batches(batch_size=8, collate_fn=train_collate, device="cpu"))
    assert sum(len(b["image"]) for b in batches) == 20
    k, padded = synth.num_classes, 0
    for b in batches:
        n = len(b["image"])
        assert tuple(b["image"].shape) == (n, 3, *CROP) and str(b["image"].dtype) == "torch.uint8"
        assert tuple(b["mask"].shape) == (n, *CROP) and str(b["mask"].dtype) == "torch.uint8"
        assert tuple(b["image_labels"].shape) == (n, k)
        assert str(b["image_labels"].dtype) == "torch.float32"
        assert tuple(b["valid"].shape) == (n, 2) and str(b["valid"].dtype) == "torch.int16"
        for image, mask, (vh, vw) in zip(b["image"], b["mask"], b["valid"].tolist(), strict=True):
            assert 1 <= vh <= CROP[0] and 1 <= vw <= CROP[1]
            assert (mask[vh:] == 255).all() and (mask[:, vw:] == 255).all()  # padding beyond
            assert (image[:, vh:] == 0).all() and (image[:, :, vw:] == 0).all()
        padded += int((b["valid"] < torch.tensor(CROP)).any(1).sum())
        for mask, labels in zip(b["mask"], b["image_labels"], strict=True):
            present = set(mask.unique().tolist()) - {255}
            assert present <= set(labels.nonzero().flatten().tolist())  # crops keep label ids
    assert padded > 0  # scales below ~0.8 leave crops smaller than CROP: the padding was checked


def test_crops_change_per_epoch_and_repeat_per_seed(ray_local, synth):
    ds = train_dataset(synth, "train", crop=CROP, seed=3)
    first, second = _crops(ds), _crops(ds)
    assert sorted(first) == sorted(second)
    changed = sum(not np.array_equal(first[k], second[k]) for k in first)
    assert changed >= 15  # a new epoch draws new scales and windows
    again = _crops(train_dataset(synth, "train", crop=CROP, seed=3))
    assert all(np.array_equal(first[k], again[k]) for k in first)  # same seed, same first epoch


def test_a_resumed_run_streams_new_crops(ray_local, synth):
    """The driver mixes the step a run resumes from into the streams' seed: not the crops of the
    run's first steps again, and the same ones for the same resume."""
    from segray.config import parse_overrides, resolve
    from segray.launch import stream_datasets

    cfg = resolve(parse_overrides([f"data.crop_size={list(CROP)}", "seed=3",
                                   "data.rows_per_execution=1"]), None, "supervised")
    fresh = _crops(stream_datasets(cfg, synth)["train"])
    resumed = _crops(stream_datasets(cfg, synth, resume_step=200)["train"])
    again = _crops(stream_datasets(cfg, synth, resume_step=200)["train"])
    assert fresh.keys() == resumed.keys()
    assert sum(not np.array_equal(fresh[k], resumed[k]) for k in fresh) >= 15
    assert all(np.array_equal(resumed[k], again[k]) for k in resumed)


def test_resample_filters_reach_the_decode_tasks(ray_local, synth):
    """``data.resample`` and ``data.mask_resample`` go from the config through the stream to every
    decode task: the same seed gives the same windows, and shrinking shows the filters apart."""
    from segray.config import parse_overrides, resolve
    from segray.launch import stream_datasets

    shrink = {"crop": CROP, "seed": 5, "scale_range": (0.3, 0.45)}
    cv2_rows = _rows(train_dataset(synth, "train", **shrink))
    pil_rows = _rows(train_dataset(synth, "train", resample="pillow",
                                   mask_resample="cv2_nearest", **shrink))
    cfg = resolve(parse_overrides([
        "data.resample=pillow", "data.mask_resample=cv2_nearest", f"data.crop_size={list(CROP)}",
        "data.scale_range=[0.3, 0.45]", "seed=5", "data.rows_per_execution=1"]), None,
        "supervised")
    assert _rows(stream_datasets(cfg, synth)["train"]).keys() == pil_rows.keys()
    for key, (image, mask) in _rows(stream_datasets(cfg, synth)["train"]).items():
        assert np.array_equal(image, pil_rows[key][0]) and np.array_equal(mask, pil_rows[key][1])
    apart = sum(np.abs(cv2_rows[k][0].astype(int) - pil_rows[k][0]).max() > 8 for k in cv2_rows)
    assert apart >= 15  # of 20: cv2 aliases the scenes' edges where Pillow smooths them
    # The masks: OpenCV's nearest pixel sits up/left of the centre's, at object edges.
    moved = sum(not np.array_equal(cv2_rows[k][1], pil_rows[k][1]) for k in cv2_rows)
    assert moved >= 15
    with pytest.raises(ValueError, match="resample must be one of"):
        train_dataset(synth, "train", crop=CROP, resample="area")
    with pytest.raises(ValueError, match="mask_resample must be one of"):
        train_dataset(synth, "train", crop=CROP, mask_resample="area")


def _rows(ds) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: (img, m) for b in ds.iter_batches(batch_size=8, batch_format="numpy")
            for k, img, m in zip(b["key"], b["image"], b["mask"], strict=True)}


def test_decode_batches_are_sized_by_bytes():
    """Decode tasks work in batches of about BATCH_BYTES of crops unless told a row count."""
    assert batch_rows((128, 128)) == 32 and batch_rows((512, 512)) == 2
    assert batch_rows((256, 256), np.uint16) == 6 and batch_rows((4096, 4096)) == 1
    assert batch_rows((16, 16)) == 1024  # capped


def test_unlabeled_stream(ray_local, synth):
    batch = train_dataset(synth, "unlabeled", crop=CROP, labeled=False).take_batch(6)
    assert batch["image"].shape == (6, *CROP, 3) and (batch["mask"] == 255).all()
    assert batch["labels"].shape == (6, synth.num_classes) and batch["labels"].sum() == 0
    rows = eval_dataset(synth, "unlabeled", labeled=False).take_batch(2)  # all-ignore masks
    assert all((m == 255).all() and m.shape == im.shape[:2]
               for m, im in zip(rows["mask"], rows["image"], strict=True))
    with pytest.raises(Exception, match=r"shard .*unlabeled-00000\.parquet: no mask, but "  # noqa: B017
                                        r"evaluation needs labelled rows"):
        eval_dataset(synth, "unlabeled").take_batch(2)  # never scored as all-ignore by mistake


def test_eval_stream_full_size(ray_local, synth):
    rows = {r["key"]: r for r in iter_rows(synth, "train")}
    ds = eval_dataset(synth, "train").materialize()  # decoded once, iterated three times below
    got = {}
    for rank in range(2):  # two workers' shares: disjoint and complete
        for r in eval_rows(ds, rank=rank, world=2):
            assert r["key"] not in got
            got[r["key"]] = r
    assert sorted(got) == sorted(rows)
    for key, r in got.items():
        assert np.array_equal(r["image"], decode_image(rows[key]["image"]))
        assert r["mask"].shape == (rows[key]["height"], rows[key]["width"])
    varied = next(iter(ds.iter_batches(batch_size=8, batch_format="numpy")))
    out = eval_collate(varied)
    assert isinstance(out["image"], list) and out["image"][0].shape[0] == 3
    fixed = eval_dataset(synth, "val").take_batch(4)
    out = eval_collate(fixed)
    assert tuple(out["image"].shape) == (4, 3, 40, 40) and tuple(out["mask"].shape) == (4, 40, 40)


def test_bad_row_error_names_shard_and_key(ray_local, with_bad_row):
    info, bad_key = with_bad_row
    with pytest.raises(Exception) as e:  # noqa: B017 - Ray wraps it; the message is what counts
        train_dataset(info, "train", crop=CROP).take_all()
    assert isinstance(e.value, BadSampleError) or "BadSampleError" in str(e.value)
    assert bad_key in str(e.value) and "train-00001.parquet" in str(e.value)
    assert "cannot decode" in str(e.value)


def test_bad_row_skip_is_counted(ray_local, with_bad_row):
    info, bad_key = with_bad_row
    counter = SkipCounter()
    ds = train_dataset(info, "train", crop=CROP, on_bad_sample="skip", skip_counter=counter)
    keys = [r["key"] for r in ds.take_all()]
    assert len(keys) == 7 and bad_key not in keys
    assert counter.total == 1
    (record,) = counter.records()
    assert record["key"] == bad_key and record["shard"].endswith("train-00001.parquet")
    with pytest.raises(ValueError, match="on_bad_sample"):
        train_dataset(info, "train", crop=CROP, on_bad_sample="ignore")
