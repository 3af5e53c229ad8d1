"""Sub-shard units: the index, the unit readers, the driver's split, and a kill in a multi-unit shard.

A shard is split into units of ``engine.unit_images`` images in reader order; each unit reads only
its own bytes (uncompressed tars seek to the unit's first member), and each (level, unit) commits
once. A run killed mid-shard keeps the units it committed: the rerun does not recompute them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grand_pipeline.commit import commit_staged, stage_writer
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sample import make_sample
from grand_pipeline.sources import index_shard, iter_shard, iter_unit_items, list_shards, write_sa1b_tar
from grand_pipeline.store import Store
from grand_pipeline.units import ShardIndex, UnitError, split_unit_id, unit_id

REPO = Path(__file__).resolve().parents[1]


def _items(n: int) -> list[tuple[str, bytes, dict]]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((6, 8, 3), 10 * i, np.uint8)).save(buf, "JPEG")
        out.append((f"sa_{i}", buf.getvalue(), {"image": {"width": 8, "height": 6}, "annotations": []}))
    return out


def _unit_reads(ref, index: ShardIndex) -> list[list[str]]:
    return [[item.image_id for item in iter_unit_items(u.shard, u.image_ids, u.start)] for u in index.units(ref)]


def test_unit_ids_split_exactly_and_refuse_anything_else() -> None:
    assert unit_id("sa_000001", 3) == "sa_000001@00003"
    assert split_unit_id("a.b-c_d@00012") == ("a.b-c_d", 12)
    for bad in ("sa_000001", "sa@1", "sa@000001", "@00001", "../x@00001", 7):
        with pytest.raises(UnitError):
            split_unit_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_index_matches_the_reader_and_units_read_only_their_images(tmp_path, name) -> None:
    write_sa1b_tar(str(tmp_path / name), _items(7))
    ref = list_shards(str(tmp_path / name))[0]
    ids, offsets = index_shard(ref)
    assert ids == [item.image_id for item in iter_shard(ref)]
    # Members are 512-byte aligned; a compressed tar cannot be entered mid-way.
    assert (offsets is None) == name.endswith(".gz")
    index = ShardIndex(ref.shard_id, 3, tuple(ids), None if offsets is None else tuple(offsets))
    assert index.num_units == 3 and index.unit_ids() == ["s@00000", "s@00001", "s@00002"]
    assert _unit_reads(ref, index) == [ids[0:3], ids[3:6], ids[6:7]]
    starts = [u.start for u in index.units(ref)]
    assert starts == ([0, 0, 0] if offsets is None else [0, offsets[3], offsets[6]])


def test_a_unit_starting_mid_tar_reads_from_its_own_offset(tmp_path) -> None:
    write_sa1b_tar(str(tmp_path / "s.tar"), _items(6))
    ref = list_shards(str(tmp_path / "s.tar"))[0]
    ids, offsets = index_shard(ref)
    unit = list(ShardIndex(ref.shard_id, 2, tuple(ids), tuple(offsets)).units(ref))[2]
    # Overwrite the bytes before the unit: a reader that did not seek would fail on them.
    data = bytearray((tmp_path / "s.tar").read_bytes())
    data[: unit.start] = b"\xff" * unit.start
    (tmp_path / "s.tar").write_bytes(bytes(data))
    items = list(iter_unit_items(ref, unit.image_ids, unit.start))
    assert [i.image_id for i in items] == ids[4:6] and all(i.error is None for i in items)


def test_truncated_tar_keeps_its_error_item_in_the_last_unit(tmp_path) -> None:
    write_sa1b_tar(str(tmp_path / "s.tar"), _items(5))
    ref = list_shards(str(tmp_path / "s.tar"))[0]
    last = index_shard(ref)[1][-1]
    raw = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(raw[: last + 600])  # ends inside the last image's data
    ids, offsets = index_shard(ref)
    assert ids[-1] == "s__truncated" and ids == [item.image_id for item in iter_shard(ref)]
    index = ShardIndex(ref.shard_id, 2, tuple(ids), tuple(offsets))
    reads = _unit_reads(ref, index)
    assert [i for unit in reads for i in unit] == ids


def test_folder_shards_split_by_file_order(tmp_path) -> None:
    for i in range(5):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / f"img{i}.png")
    ref = list_shards(str(tmp_path))[0]
    ids, offsets = index_shard(ref)
    assert offsets is None and ids == [f"img{i}" for i in range(5)]
    assert _unit_reads(ref, ShardIndex(ref.shard_id, 2, tuple(ids))) == [ids[0:2], ids[2:4], ids[4:5]]


def test_stored_index_round_trips_and_rejects_garbage(tmp_path) -> None:
    store = Store(str(tmp_path))
    index = ShardIndex("s", 2, ("a", "b", "c"), (0, 1024, 2048))
    RunMeta(store).write_index(index)
    assert RunMeta(store).read_index("s") == index and RunMeta(store).unit_counts() == {"s": 2}
    path = tmp_path / "_run" / "units" / "s.json"
    path.write_text(json.dumps({"version": 1, "shard": "other", "unit_images": 2, "image_ids": [], "offsets": None}))
    with pytest.raises(Exception, match="index of s"):
        RunMeta(store).read_index("s")


# ---- the driver over a multi-unit shard ---------------------------------------------------------


@pytest.fixture(scope="module")
def six_images(tmp_path_factory, tiny_cfg) -> Path:
    folder = tmp_path_factory.mktemp("units-input")
    make_sample(str(folder), tiny_cfg, images=6, shard_id="sa_000030", start=1)
    return folder


def _command(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(inp), "-o", str(out),
            "--profile", "tiny-lite", "--executor", "local", "--set", "engine.unit_images=2", *extra]


def _parquets(out: Path, level: int = 1) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / f"level{level}").glob("*.parquet"))}


def test_sigkill_in_a_multi_unit_shard_keeps_committed_units(six_images, tmp_path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_command(six_images, reference), cwd=REPO, check=True, capture_output=True)
    expected = _parquets(reference)
    assert sorted(expected) == [f"sa_000030@0000{k}.parquet" for k in range(3)]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(six_images, out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not list((out / "level1").glob("*.success.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_mid_shard = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    assert killed_mid_shard, "the run finished before the kill; the test proved nothing"
    survivors = {u: m["attempt"] for u, m in Store(str(out)).committed(1).items()}
    assert 1 <= len(survivors) < 3

    final = subprocess.run(_command(six_images, out), cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert _parquets(out) == expected
    markers = Store(str(out)).committed(1, verify=True)
    # The units committed before the kill were not recomputed: their markers are the killed run's.
    assert all(markers[u]["attempt"] == a for u, a in survivors.items())
    assert {m["attempt"] for u, m in markers.items() if u not in survivors} == {max(survivors.values()) + 1}


def test_a_different_unit_size_is_refused_on_resume(six_images, tmp_path) -> None:
    out = tmp_path / "out"
    subprocess.run(_command(six_images, out, "--level", "1"), cwd=REPO, check=True, capture_output=True)
    done = subprocess.run(_command(six_images, out, "--level", "2", "--set", "engine.unit_images=4"),
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and "engine.unit_images=2" in lines[0]
    assert not (out / "level2").exists() or not list((out / "level2").glob("*.success.json"))



def test_streamed_unit_is_byte_identical_to_the_table_written_at_once(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grand_pipeline.unit_writer import PARQUET_OPTIONS, ROW_GROUP_ROWS
    from tests.test_store import STATS, make_table

    table = make_table("s", n=150, errors={3: "detect", 70: None, 149: "depth"})
    reference = pa.BufferOutputStream()
    pq.write_table(table, reference, row_group_size=ROW_GROUP_ROWS, **PARQUET_OPTIONS)

    store = Store(str(tmp_path / "streamed"))
    writer = stage_writer(store, 1, "s@00000", attempt=1)
    for start, size in ((0, 7), (7, 60), (67, 83)):  # micro-batch edges that are not row-group edges
        writer.write(table.slice(start, size))
    staged = writer.close()
    assert staged.counts == {"rows": 150, "ok": 147, "failed": 3,
                             "failures_by_stage": {"depth": 1, "detect": 1, "unknown": 1}}
    assert commit_staged(store, staged, STATS, attempt=1)
    streamed = (tmp_path / "streamed" / "level1" / "s@00000.parquet").read_bytes()
    assert streamed == reference.getvalue().to_pybytes()
    assert store.marker(1, "s@00000")["parquet_bytes"] == len(streamed)
    assert pq.ParquetFile(tmp_path / "streamed" / "level1" / "s@00000.parquet").num_row_groups == 3
