"""Bad rows and shards for the bad-data tests: the real writer, then targeted damage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from segray import storage
from segray.data.shards import DatasetWriter, encode_mask_png
from segray.data.stream import iter_rows
from segray.data.synthetic import make_synthetic

NUM_CLASSES = 6  # the synthetic set's classes
TRAIN = ["--method", "supervised", "--steps", "4", "--eval-every", "4", "--batch-size", "4",
         "--set", "model.decoder_channels=16", "--set", "train.log_every=2"]


def good_rows(folder: Path) -> tuple:
    """Rows of a small clean synthetic set: 16 train and 4 val images of 32x32."""
    info = make_synthetic(str(folder / "good"), train=16, val=4, unlabeled=0, size=32, seed=5,
                          rows_per_shard=8)
    return info, list(iter_rows(info, "train")), list(iter_rows(info, "val"))


def write_rows(dst: Path, info, train: list[dict], val: list[dict]) -> Path:
    """Write rows with the real writer: 4 rows per shard, so shard i holds rows 4i..4i+3."""
    with DatasetWriter(str(dst), "bad", info.classes, info.palette, rows_per_shard=4) as w:
        for split, rows in (("train", train), ("val", val)):
            for r in rows:
                w.add(split, r["key"], r["image"], r["mask"], r["labels"], r["height"], r["width"])
    return dst


def rewrite_shard(dst: Path, name: str, edit) -> None:
    """Replace a shard with ``edit(table)`` and record its new checksum in the manifest.

    This bypasses the writer's own checks (unique keys, schema), as a hand-edited or foreign
    dataset would; the manifest stays consistent, so only the structure checks can catch it.
    """
    table = edit(pq.read_table(dst / name))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    (dst / name).write_bytes(data)
    manifest = json.loads((dst / "dataset.json").read_text())
    for shards in manifest["splits"].values():
        for shard in shards:
            if shard["path"] == name:
                shard.update(sha256=storage.sha256(data), bytes=len(data), rows=table.num_rows)
    (dst / "dataset.json").write_text(json.dumps(manifest))


def set_key(table: pa.Table, row: int, key: str) -> pa.Table:
    keys = table.column("key").to_pylist()
    keys[row] = key
    return table.set_column(table.schema.get_field_index("key"), "key",
                            pa.array(keys, pa.string()))


def drop_mask(table: pa.Table) -> pa.Table:
    return table.drop_columns(["mask"])


def row_variants(rows: list[dict], row: int = 5) -> dict[str, tuple[list[dict], int]]:
    """Row-level bad cases, each at index ``row``: (rows, index of the bad row)."""

    def with_row(**change) -> tuple[list[dict], int]:
        out = [dict(r) for r in rows]
        out[row].update(change)
        return out, row

    h, w = rows[row]["height"], rows[row]["width"]
    out_of_range = np.zeros((h, w), np.uint8)
    out_of_range[0, :3] = [1, NUM_CLASSES + 3, 255]  # 9 is no class; 255 (ignore) is fine
    jpeg = rows[row]["image"]
    assert jpeg[:2] == b"\xff\xd8", "the synthetic set stores this row as a JPEG"
    sos = jpeg.index(b"\xff\xda")
    return {
        "corrupt_image": with_row(image=b"\xff\xd8\xff\xe0 truncated jpeg"),
        # A scan cut to a third, an end marker appended: Pillow makes up the rest of the image.
        "cut_jpeg": with_row(image=jpeg[: sos + (len(jpeg) - sos) // 3] + b"\xff\xd9"),
        "mask_size": with_row(mask=encode_mask_png(np.zeros((h + 3, w), np.uint8))),
        "label_range": with_row(mask=encode_mask_png(out_of_range)),
    }



def flip_a_byte(shard: Path) -> None:
    """Change a shard in place, keeping its size (the manifest's checksum no longer matches)."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))



def mixed(tmp_path: Path, good) -> tuple[Path, set[str], list[str]]:
    """Every skippable case in one train split.

    Returns:
        The dataset folder, the keys of the bad rows, and the keys whose second occurrence is a
        duplicate: one in another shard (shard 2), one in the same shard (shard 1).
    """
    info, train, val = good
    rows = [dict(r) for r in train]
    variants = row_variants(train)
    for j, case in enumerate(("corrupt_image", "mask_size", "label_range")):
        bad_rows, i = variants[case]
        rows[4 * j + 1] = dict(bad_rows[i], key=rows[4 * j + 1]["key"])  # shards 0, 1, 2
    dst = write_rows(tmp_path, info, rows, val)
    rewrite_shard(dst, "train-00003.parquet", drop_mask)  # shard 3: rows 12..15
    rewrite_shard(dst, "train-00002.parquet", lambda t: set_key(t, 3, rows[0]["key"]))
    rewrite_shard(dst, "train-00001.parquet", lambda t: set_key(t, 2, rows[4]["key"]))
    bad = {rows[1]["key"], rows[5]["key"], rows[9]["key"], *(r["key"] for r in rows[12:])}
    return dst, bad, [rows[0]["key"], rows[4]["key"]]
