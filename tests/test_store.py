"""The output store: commit protocol, fencing, integrity checks, run metadata and status."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from grand_pipeline.commit import clear_staging, commit
from grand_pipeline.locations import check_separate, check_writable, require_existing
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema
from grand_pipeline.sources.base import ShardRef
from grand_pipeline.status import run_status
from grand_pipeline.store import (
    ROW_GROUP_ROWS,
    NotCommitted,
    OldLayout,
    SchemaMismatch,
    Store,
    StoreError,
)
from grand_pipeline.units import ShardIndex, unit_id


def make_table(
    shard: str, n: int = 6, errors: dict[int, str | None] | None = None, level: int = 1
) -> pa.Table:
    """Rows with only the common columns filled; list columns empty, others null.

    ``errors`` maps a row index to its error stage (None leaves the stage unset).
    """
    errors = errors or {}
    schema = level_schema(level)
    rows = []
    for i in range(n):
        failed = i in errors
        row = {f.name: ([] if pa.types.is_list(f.type) else None) for f in schema}
        row.update(
            image_id=f"{shard}-{i}",
            shard_id=shard,
            file_name=f"sa_{i}.jpg",
            width=640,
            height=480,
            status=STATUS_ERROR if failed else STATUS_OK,
            error="boom" if failed else None,
            error_stage=errors.get(i),
            provenance={"config_hash": "abc123", "backends": [], "prompt_versions": []},
        )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


STATS = {"seconds": 2.0, "models": {"tagger": "tiny:1"}, "config_hash": "abc123", "host": "n1"}


def staging_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) if "_staging" in d for f in files]


U1 = unit_id("sa_000001", 0)  # "sa_000001@00000": store keys are unit ids
S1 = unit_id("s1", 0)


def test_commit_roundtrip_and_marker(tmp_path):
    store = Store(str(tmp_path / "out"))
    table = make_table("sa_000001", errors={1: "tagger", 3: "tagger", 4: None})
    assert U1 == "sa_000001@00000"
    assert not store.is_committed(1, U1)
    assert commit(store, 1, U1, table, STATS, attempt=1) is True
    assert store.is_committed(1, U1)
    assert store.read(1, U1).equals(table)
    assert store.read(1, U1, columns=["image_id"]).column_names == ["image_id"]

    m = store.marker(1, U1)
    assert (m["level"], m["unit"], m["shard"], m["attempt"]) == (1, U1, "sa_000001", 1)
    assert (m["rows"], m["ok"], m["failed"]) == (6, 3, 3)
    assert m["failures_by_stage"] == {"tagger": 2, "unknown": 1}
    assert m["images_per_second"] == pytest.approx(3.0)
    assert m["models"] == {"tagger": "tiny:1"} and m["config_hash"] == "abc123"
    assert m["host"] == "n1"  # extra caller keys are kept
    assert store.parquet_path(1, U1).endswith("/level1/sa_000001@00000.parquet")
    assert store.marker_path(1, U1).endswith("/level1/sa_000001@00000.success.json")
    data = (tmp_path / "out" / "level1" / "sa_000001@00000.parquet").read_bytes()
    assert m["parquet_bytes"] == len(data)
    assert m["parquet_sha256"] == hashlib.sha256(data).hexdigest()
    assert store.committed(1).keys() == {U1}
    assert store.committed(1, verify=True).keys() == {U1}
    assert staging_files(tmp_path) == []


def test_table_counts_override_wrong_caller_stats(tmp_path):
    store = Store(str(tmp_path))
    unit = unit_id("s", 0)
    commit(store, 1, unit, make_table("s", n=4, errors={0: "depth"}), {**STATS, "ok": 99}, attempt=1)
    m = store.marker(1, unit)
    assert (m["ok"], m["failed"], m["failures_by_stage"]) == (3, 1, {"depth": 1})


def test_same_table_gives_identical_bytes(tmp_path):
    table = make_table("sa_7", errors={2: "detector"})
    unit = unit_id("sa_7", 0)
    # Different chunking and schema metadata must not change the bytes either.
    rechunked = pa.concat_tables([table.slice(0, 2), table.slice(2)]).replace_schema_metadata({"x": "y"})
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    assert commit(a, 1, unit, table, STATS, attempt=1)
    assert commit(b, 1, unit, rechunked, {**STATS, "seconds": 5.0}, attempt=3)
    pa_bytes = (tmp_path / "a" / "level1" / f"{unit}.parquet").read_bytes()
    assert pa_bytes == (tmp_path / "b" / "level1" / f"{unit}.parquet").read_bytes()
    assert a.marker(1, unit)["parquet_sha256"] == b.marker(1, unit)["parquet_sha256"]


def test_parquet_without_marker_is_not_committed_and_is_overwritten(tmp_path):
    store = Store(str(tmp_path))
    commit(store, 1, S1, make_table("s1"), STATS, attempt=1)
    os.remove(store.marker_path(1, S1))  # as if killed between the two publishes
    assert not store.is_committed(1, S1)
    assert store.committed(1) == {}
    with pytest.raises(NotCommitted):
        store.read(1, S1)
    new = make_table("s1", n=3)
    assert commit(store, 1, S1, new, STATS, attempt=2)
    assert store.read(1, S1).equals(new)


def test_corrupt_parquet_is_not_committed(tmp_path):
    store = Store(str(tmp_path))
    commit(store, 1, S1, make_table("s1"), STATS, attempt=1)
    path = store.parquet_path(1, S1)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different hash
    with open(path, "wb") as f:
        f.write(bytes(data))
    assert store.marker(1, S1) is not None
    assert not store.is_committed(1, S1)
    assert store.committed(1, verify=True) == {}
    with pytest.raises(NotCommitted):
        store.read(1, S1)
    # A corrupt commit does not fence: the next commit repairs it.
    assert commit(store, 1, S1, make_table("s1"), STATS, attempt=2)
    assert store.is_committed(1, S1)


def test_unparseable_marker_is_ignored(tmp_path, caplog):
    store = Store(str(tmp_path))
    commit(store, 1, S1, make_table("s1"), STATS, attempt=1)
    with open(store.marker_path(1, S1), "w") as f:
        f.write("{not json")
    assert store.marker(1, S1) is None
    assert "unparseable" in caplog.text
    assert not store.is_committed(1, S1)


def test_marker_of_another_unit_is_ignored(tmp_path):
    # A marker copied next to another unit's Parquet must not vouch for it.
    store = Store(str(tmp_path))
    other = unit_id("s1", 1)
    commit(store, 1, S1, make_table("s1"), STATS, attempt=1)
    commit(store, 1, other, make_table("s1"), STATS, attempt=1)
    with open(store.marker_path(1, S1), "rb") as f:
        marker = f.read()
    with open(store.marker_path(1, other), "wb") as f:
        f.write(marker)
    assert store.marker(1, other) is None
    assert not store.is_committed(1, other)
    assert store.committed(1).keys() == {S1}


def test_second_commit_is_fenced(tmp_path):
    store = Store(str(tmp_path))
    first = make_table("s1", n=5)
    assert commit(store, 1, S1, first, STATS, attempt=1)
    before = open(store.parquet_path(1, S1), "rb").read()
    assert commit(store, 1, S1, make_table("s1", n=2, errors={0: "x"}), STATS, attempt=2) is False
    assert open(store.parquet_path(1, S1), "rb").read() == before
    assert store.marker(1, S1)["attempt"] == 1
    assert store.read(1, S1).equals(first)
    assert staging_files(tmp_path) == []


def test_units_of_one_shard_commit_independently(tmp_path):
    store = Store(str(tmp_path))
    second = unit_id("s1", 1)
    assert commit(store, 1, S1, make_table("s1", n=5), STATS, attempt=1)
    # Another unit of the same shard is not fenced by the first one's commit.
    assert commit(store, 1, second, make_table("s1", n=2), STATS, attempt=2)
    assert store.committed(1).keys() == {S1, second}
    assert (store.marker(1, S1)["rows"], store.marker(1, second)["rows"]) == (5, 2)
    assert store.marker(1, second)["shard"] == "s1"
    store.clear_shard(1, "s1")
    assert store.committed(1) == {}


def test_schema_mismatch_names_the_field(tmp_path):
    store = Store(str(tmp_path))
    table = make_table("s1")
    wrong = table.set_column(
        table.schema.get_field_index("width"), "width", table.column("width").cast(pa.int64())
    )
    with pytest.raises(SchemaMismatch, match="'width'"):
        commit(store, 1, S1, wrong, STATS, attempt=1)
    with pytest.raises(SchemaMismatch, match="'depth_source'"):
        commit(store, 1, S1, table.drop_columns(["depth_source"]), STATS, attempt=1)
    assert not os.path.exists(store.parquet_path(1, S1))


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a b", ".hidden", "x..y"])
def test_bad_shard_ids_are_refused(tmp_path, bad):
    store = Store(str(tmp_path))
    with pytest.raises(StoreError):
        commit(store, 1, unit_id(bad, 0), make_table("ok"), STATS, attempt=1)
    with pytest.raises(StoreError):
        store.parquet_path(1, unit_id(bad, 0))
    with pytest.raises(StoreError):
        RunMeta(store).record_shards(None, [bad])
    with pytest.raises(StoreError):
        RunMeta(store).record_units(bad, 1)


@pytest.mark.parametrize(
    "bad",
    [
        "sa_000001",
        "sa_000001@1",
        "sa_000001@000001",
        "sa_000001@0000x",
        "@00000",
        "sa_000001@00000/x",
        "a@b@00000",
    ],
)
def test_bad_unit_ids_are_refused(tmp_path, bad):
    store = Store(str(tmp_path))
    with pytest.raises(StoreError, match="invalid unit id"):
        commit(store, 1, bad, make_table("sa_000001"), STATS, attempt=1)
    for call in (
        store.parquet_path,
        store.marker_path,
        store.is_committed,
        store.marker,
        store.read,
        store.clear,
    ):
        with pytest.raises(StoreError, match="invalid unit id"):
            call(1, bad)
    assert not (tmp_path / "level1").exists()  # refused before anything was staged


def test_clear_and_clear_staging(tmp_path):
    store = Store(str(tmp_path))
    commit(store, 1, S1, make_table("s1"), STATS, attempt=1)
    store.clear(1, S1)
    assert not store.is_committed(1, S1)
    assert not os.path.exists(store.parquet_path(1, S1))
    store.clear(1, S1)  # idempotent
    debris = tmp_path / "level1" / "_staging" / "s2@00000.a1.dead.parquet"
    debris.write_bytes(b"partial")
    clear_staging(store, 1)
    assert not debris.exists()
    clear_staging(store, 3)  # a level that never existed


def test_run_meta_shards_and_attempts(tmp_path):
    store = Store(str(tmp_path))
    assert RunMeta(store).read_run_meta() is None and RunMeta(store).known_shards() == []
    RunMeta(store).write_run_meta("profile: lite\n", {"config_hash": "abc123", "version": "0.1.0"})
    assert RunMeta(store).read_run_meta() == {"config_hash": "abc123", "version": "0.1.0"}
    assert RunMeta(store).read_config_yaml() == "profile: lite\n"
    RunMeta(store).record_shards(None, ["b", "a"])
    RunMeta(store).record_shards(2, ["c", "a"])
    assert RunMeta(store).known_shards() == ["a", "b", "c"]
    assert RunMeta(store).known_shards(2) == ["a", "c"]
    assert RunMeta(store).known_shards(1) == ["a", "b", "c"]
    assert [RunMeta(store).next_attempt() for _ in range(3)] == [1, 2, 3]
    assert RunMeta(Store(str(tmp_path))).next_attempt() == 4
    assert staging_files(tmp_path) == []


def test_status_two_levels(tmp_path):
    from grand_pipeline import schemas

    store = Store(str(tmp_path))
    RunMeta(store).record_shards(None, ["s1", "s2", "s3"])
    commit(store, 1, S1, make_table("s1", n=4, errors={0: "tagger"}), {**STATS, "seconds": 1.0}, attempt=1)
    commit(
        store,
        1,
        unit_id("s2", 0),
        make_table("s2", n=6, errors={1: "depth", 2: "tagger"}),
        {**STATS, "seconds": 4.0},
        1,
    )
    # A second level with the same columns, declared just for this test.
    schemas._LEVEL_FIELDS[97] = schemas.LEVEL1_FIELDS
    try:
        commit(store, 97, S1, make_table("s1", n=2, level=97), {**STATS, "seconds": 0.0}, attempt=1)
        status = run_status(store, levels=[5])
    finally:
        schemas._LEVEL_FIELDS.pop(97)
    json.dumps(status)  # JSON-serialisable
    by_level = {s["level"]: s for s in status["levels"]}
    assert sorted(by_level) == [1, 5, 97]
    one = by_level[1]
    # No shard is indexed: each counts as one unit.
    assert (one["units_committed"], one["units_total"]) == (2, 3)
    assert (one["shards_committed"], one["shards_total"]) == (2, 3)
    assert (one["images_ok"], one["images_failed"]) == (7, 3)
    assert one["failures_by_stage"] == {"depth": 1, "tagger": 2}
    assert one["seconds"] == pytest.approx(5.0)
    assert one["images_per_second"] == pytest.approx(2.0)
    assert by_level[97]["images_ok"] == 2 and by_level[97]["images_per_second"] == 0.0
    assert (by_level[97]["units_committed"], by_level[97]["shards_committed"]) == (1, 1)
    assert (by_level[5]["shards_committed"], by_level[5]["units_committed"]) == (0, 0)
    assert status["shards"] == ["s1", "s2", "s3"]
    assert status["matrix"]["s1"] == {"1": "committed", "5": "missing", "97": "committed"}
    assert status["matrix"]["s3"]["1"] == "missing"


def test_status_counts_units_and_shows_a_partial_shard(tmp_path):
    store = Store(str(tmp_path))
    shard = "sa_000000"
    index = ShardIndex(shard, 2, tuple(f"{shard}-{i}" for i in range(6)))  # 6 images in units of 2
    RunMeta(store).record_shards(None, [shard, "sa_000001"])
    RunMeta(store).write_index(index)
    assert index.unit_ids() == [unit_id(shard, k) for k in range(3)]
    for k in (0, 1):
        assert commit(store, 1, unit_id(shard, k), make_table(shard, n=2), STATS, attempt=1)
    status = run_status(store)
    json.dumps(status)
    [one] = status["levels"]
    assert (one["units_committed"], one["units_total"]) == (2, 4)  # sa_000001: not indexed, one unit
    assert (one["shards_committed"], one["shards_total"]) == (0, 2)
    assert one["images_ok"] == 4
    assert status["matrix"] == {shard: {"1": "partial"}, "sa_000001": {"1": "missing"}}

    commit(store, 1, unit_id(shard, 2), make_table(shard, n=2), STATS, attempt=2)
    commit(store, 1, unit_id("sa_000001", 0), make_table("sa_000001", n=1), STATS, attempt=2)
    status = run_status(store)
    [one] = status["levels"]
    assert (one["units_committed"], one["units_total"]) == (4, 4)
    assert (one["shards_committed"], one["shards_total"]) == (2, 2)
    assert status["matrix"] == {shard: {"1": "committed"}, "sa_000001": {"1": "committed"}}

    store.clear(1, unit_id(shard, 0))
    status = run_status(store)
    assert (status["levels"][0]["units_committed"], status["levels"][0]["shards_committed"]) == (3, 1)
    assert status["matrix"][shard] == {"1": "partial"}


def test_index_round_trip_and_record_units(tmp_path):
    store = Store(str(tmp_path))
    assert RunMeta(store).read_index("sa_000000") is None  # before its first Level-1 run
    assert RunMeta(store).unit_counts() == {}
    ids = tuple(f"sa_{i}" for i in range(1, 6))
    with_offsets = ShardIndex("sa_000000", 2, ids, (0, 1536, 3072, -1, 6144))
    without = ShardIndex("sa_000001", 500, ids[:1])
    RunMeta(store).record_shards(None, ["sa_000000", "sa_000001"])
    RunMeta(store).write_index(with_offsets)
    RunMeta(store).write_index(without)
    assert (tmp_path / "_run" / "units" / "sa_000000.json").exists()
    assert RunMeta(store).read_index("sa_000000") == with_offsets
    assert RunMeta(store).read_index("sa_000001") == without
    assert RunMeta(Store(str(tmp_path))).read_index("sa_000000") == with_offsets  # a fresh Store reads it back
    assert (with_offsets.num_units, without.num_units) == (3, 1)
    # write_index records the unit counts that status reads; the shard lists are kept.
    assert RunMeta(store).unit_counts() == {"sa_000000": 3, "sa_000001": 1}
    assert RunMeta(store).known_shards() == ["sa_000000", "sa_000001"]
    RunMeta(store).record_units("sa_000002", 7)
    RunMeta(store).record_units("sa_000001", 2)
    assert RunMeta(store).unit_counts() == {"sa_000000": 3, "sa_000001": 2, "sa_000002": 7}
    assert RunMeta(store).known_shards() == ["sa_000000", "sa_000001"]
    ref = ShardRef("sa_000000", str(tmp_path / "sa_000000.tar"), "sa1b_tar")
    units = list(RunMeta(store).read_index("sa_000000").units(ref))
    assert [u.unit_id for u in units] == [unit_id("sa_000000", k) for k in range(3)]
    # Unit 1 holds a -1 offset (no seek possible): it is read from the top.
    assert [(u.index, u.image_ids, u.start) for u in units] == [
        (0, ids[:2], 0),
        (1, ids[2:4], 0),
        (2, ids[4:], 6144),
    ]

    # A stored index of another shard, or an unreadable one, is refused rather than used.
    (tmp_path / "_run" / "units" / "sa_000003.json").write_text(json.dumps(with_offsets.to_doc()))
    with pytest.raises(StoreError, match="sa_000003"):
        RunMeta(store).read_index("sa_000003")
    (tmp_path / "_run" / "units" / "sa_000004.json").write_text(
        json.dumps({"version": 1, "shard": "sa_000004"})
    )
    with pytest.raises(StoreError, match="sa_000004"):
        RunMeta(store).read_index("sa_000004")
    with pytest.raises(StoreError):
        RunMeta(store).read_index("../x")
    RunMeta(store).drop_index("sa_000000")
    assert RunMeta(store).read_index("sa_000000") is None


def test_old_per_shard_layout_is_refused_in_one_line(tmp_path):
    store = Store(str(tmp_path))
    level1 = tmp_path / "level1"
    level1.mkdir()
    (level1 / "sa_000000.parquet").write_bytes(b"PAR1 written by an older version")
    (level1 / "sa_000000.success.json").write_text(
        json.dumps(
            {
                "level": 1,
                "shard": "sa_000000",
                "attempt": 1,
                "rows": 2,
                "parquet_bytes": 32,
                "parquet_sha256": "0" * 64,
            }
        )
    )
    for call in (lambda: store.committed(1), lambda: store.committed(1, verify=True), lambda: run_status(store)):
        with pytest.raises(OldLayout) as err:
            call()
        message = str(err.value)
        assert isinstance(err.value, StoreError)
        assert "\n" not in message
        assert "sa_000000.success.json" in message and "--output" in message


def test_iter_batches_streams_the_committed_rows_in_order(tmp_path):
    store = Store(str(tmp_path))
    n = 2 * ROW_GROUP_ROWS + 22
    table = make_table("s1", n=n, errors={5: "depth", n - 1: "tagger"})
    assert commit(store, 1, S1, table, STATS, attempt=1)
    # Row groups of ROW_GROUP_ROWS rows: later levels read a unit a group at a time.
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(store.parquet_path(1, S1)).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [
        ROW_GROUP_ROWS,
        ROW_GROUP_ROWS,
        22,
    ]

    batches = list(store.iter_batches(1, S1))
    assert [b.num_rows for b in batches] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 22]
    assert pa.Table.from_batches(batches).equals(table)
    small = list(store.iter_batches(1, S1, columns=["image_id", "status"], batch_size=10))
    assert len(small) > 3 and all(b.num_rows <= 10 for b in small)
    assert small[0].schema.names == ["image_id", "status"]
    got = [i for b in small for i in b.column("image_id").to_pylist()]
    assert got == table.column("image_id").to_pylist() == [f"s1-{i}" for i in range(n)]

    with pytest.raises(NotCommitted):
        list(store.iter_batches(1, unit_id("s1", 1)))  # never committed
    path = store.parquet_path(1, S1)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different hash
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(NotCommitted):
        list(store.iter_batches(1, S1))


def test_an_output_inside_its_input_is_refused(tmp_path):
    demo = tmp_path / "demo"
    (demo / "input").mkdir(parents=True)
    os.symlink(demo, tmp_path / "link")
    for inp, out in [
        (demo, demo / "out"),  # the mistaken `--input demo_out --output demo_out/out`
        (demo, demo),
        (tmp_path / "link", demo / "out"),  # through a symlink
        (demo / "input" / "..", demo / "out" / "x"),
        ("s3://bucket/runs", "s3://bucket/runs/out"),
        ("s3://bucket/runs/", "s3a://bucket/runs"),
    ]:
        with pytest.raises(StoreError, match="is inside --input"):
            check_separate(str(inp), str(out))
    for inp, out in [
        (demo / "input", demo / "out"),  # siblings: make demo's layout
        (demo / "input", demo / "input2"),  # a shared name prefix is not containment
        (demo / "input" / "sa_000000.tar", demo / "out"),
        ("s3://bucket/runs", "s3://other/runs/out"),
        ("s3://bucket/in", str(tmp_path / "bucket" / "in" / "out")),
    ]:
        check_separate(str(inp), str(out))


def test_output_location_checks_name_the_path(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        check_writable(Store(str(a_file)))
    with pytest.raises(StoreError, match=f"is under the file {a_file}"):
        check_writable(Store(str(a_file / "out")))
    with pytest.raises(StoreError, match="/proc/grand-out is not writable"):
        check_writable(Store("/proc/grand-out"))
    fresh = tmp_path / "new" / "out"
    check_writable(Store(str(fresh)))
    assert fresh.is_dir() and list(fresh.iterdir()) == []  # the probe file is gone
    with pytest.raises(StoreError, match="does not exist"):
        require_existing(Store(str(tmp_path / "missing")))
    with pytest.raises(StoreError, match="is a file, not an output folder"):
        require_existing(Store(str(a_file)))
    require_existing(Store(str(fresh)))
