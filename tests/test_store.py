"""The output store: commit protocol, fencing, integrity checks, run metadata and status."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema
from grand_pipeline.store import NotCommitted, SchemaMismatch, Store, StoreError


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


def test_commit_roundtrip_and_marker(tmp_path):
    store = Store(str(tmp_path / "out"))
    table = make_table("sa_000001", errors={1: "tagger", 3: "tagger", 4: None})
    assert not store.is_committed(1, "sa_000001")
    assert store.commit(1, "sa_000001", table, STATS, attempt=1) is True
    assert store.is_committed(1, "sa_000001")
    assert store.read(1, "sa_000001").equals(table)
    assert store.read(1, "sa_000001", columns=["image_id"]).column_names == ["image_id"]

    m = store.marker(1, "sa_000001")
    assert (m["level"], m["shard"], m["attempt"]) == (1, "sa_000001", 1)
    assert (m["rows"], m["ok"], m["failed"]) == (6, 3, 3)
    assert m["failures_by_stage"] == {"tagger": 2, "unknown": 1}
    assert m["images_per_second"] == pytest.approx(3.0)
    assert m["models"] == {"tagger": "tiny:1"} and m["config_hash"] == "abc123"
    assert m["host"] == "n1"  # extra caller keys are kept
    data = (tmp_path / "out" / "level1" / "sa_000001.parquet").read_bytes()
    assert m["parquet_bytes"] == len(data)
    assert m["parquet_sha256"] == hashlib.sha256(data).hexdigest()
    assert store.committed(1).keys() == {"sa_000001"}
    assert store.committed(1, verify=True).keys() == {"sa_000001"}
    assert staging_files(tmp_path) == []


def test_table_counts_override_wrong_caller_stats(tmp_path):
    store = Store(str(tmp_path))
    store.commit(1, "s", make_table("s", n=4, errors={0: "depth"}), {**STATS, "ok": 99}, attempt=1)
    m = store.marker(1, "s")
    assert (m["ok"], m["failed"], m["failures_by_stage"]) == (3, 1, {"depth": 1})


def test_same_table_gives_identical_bytes(tmp_path):
    table = make_table("sa_7", errors={2: "detector"})
    # Different chunking and schema metadata must not change the bytes either.
    rechunked = pa.concat_tables([table.slice(0, 2), table.slice(2)]).replace_schema_metadata({"x": "y"})
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    assert a.commit(1, "sa_7", table, STATS, attempt=1)
    assert b.commit(1, "sa_7", rechunked, {**STATS, "seconds": 5.0}, attempt=3)
    pa_bytes = (tmp_path / "a" / "level1" / "sa_7.parquet").read_bytes()
    assert pa_bytes == (tmp_path / "b" / "level1" / "sa_7.parquet").read_bytes()
    assert a.marker(1, "sa_7")["parquet_sha256"] == b.marker(1, "sa_7")["parquet_sha256"]


def test_parquet_without_marker_is_not_committed_and_is_overwritten(tmp_path):
    store = Store(str(tmp_path))
    store.commit(1, "s1", make_table("s1"), STATS, attempt=1)
    os.remove(store.marker_path(1, "s1"))  # as if killed between the two publishes
    assert not store.is_committed(1, "s1")
    assert store.committed(1) == {}
    with pytest.raises(NotCommitted):
        store.read(1, "s1")
    new = make_table("s1", n=3)
    assert store.commit(1, "s1", new, STATS, attempt=2)
    assert store.read(1, "s1").equals(new)


def test_corrupt_parquet_is_not_committed(tmp_path):
    store = Store(str(tmp_path))
    store.commit(1, "s1", make_table("s1"), STATS, attempt=1)
    path = store.parquet_path(1, "s1")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, different hash
    with open(path, "wb") as f:
        f.write(bytes(data))
    assert store.marker(1, "s1") is not None
    assert not store.is_committed(1, "s1")
    assert store.committed(1, verify=True) == {}
    with pytest.raises(NotCommitted):
        store.read(1, "s1")
    # A corrupt commit does not fence: the next commit repairs it.
    assert store.commit(1, "s1", make_table("s1"), STATS, attempt=2)
    assert store.is_committed(1, "s1")


def test_unparseable_marker_is_ignored(tmp_path, caplog):
    store = Store(str(tmp_path))
    store.commit(1, "s1", make_table("s1"), STATS, attempt=1)
    with open(store.marker_path(1, "s1"), "w") as f:
        f.write("{not json")
    assert store.marker(1, "s1") is None
    assert "unparseable" in caplog.text
    assert not store.is_committed(1, "s1")


def test_second_commit_is_fenced(tmp_path):
    store = Store(str(tmp_path))
    first = make_table("s1", n=5)
    assert store.commit(1, "s1", first, STATS, attempt=1)
    before = open(store.parquet_path(1, "s1"), "rb").read()
    assert store.commit(1, "s1", make_table("s1", n=2, errors={0: "x"}), STATS, attempt=2) is False
    assert open(store.parquet_path(1, "s1"), "rb").read() == before
    assert store.marker(1, "s1")["attempt"] == 1
    assert store.read(1, "s1").equals(first)
    assert staging_files(tmp_path) == []


def test_schema_mismatch_names_the_field(tmp_path):
    store = Store(str(tmp_path))
    table = make_table("s1")
    wrong = table.set_column(
        table.schema.get_field_index("width"), "width", table.column("width").cast(pa.int64())
    )
    with pytest.raises(SchemaMismatch, match="'width'"):
        store.commit(1, "s1", wrong, STATS, attempt=1)
    with pytest.raises(SchemaMismatch, match="'depth_source'"):
        store.commit(1, "s1", table.drop_columns(["depth_source"]), STATS, attempt=1)
    assert not os.path.exists(store.parquet_path(1, "s1"))


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", "a b", ".hidden", "x..y"])
def test_bad_shard_ids_are_refused(tmp_path, bad):
    store = Store(str(tmp_path))
    with pytest.raises(StoreError):
        store.commit(1, bad, make_table("ok"), STATS, attempt=1)
    with pytest.raises(StoreError):
        store.parquet_path(1, bad)
    with pytest.raises(StoreError):
        store.record_shards(None, [bad])


def test_clear_and_clear_staging(tmp_path):
    store = Store(str(tmp_path))
    store.commit(1, "s1", make_table("s1"), STATS, attempt=1)
    store.clear(1, "s1")
    assert not store.is_committed(1, "s1")
    assert not os.path.exists(store.parquet_path(1, "s1"))
    store.clear(1, "s1")  # idempotent
    debris = tmp_path / "level1" / "_staging" / "s2.a1.dead.parquet"
    debris.write_bytes(b"partial")
    store.clear_staging(1)
    assert not debris.exists()
    store.clear_staging(3)  # a level that never existed


def test_run_meta_shards_and_attempts(tmp_path):
    store = Store(str(tmp_path))
    assert store.read_run_meta() is None and store.known_shards() == []
    store.write_run_meta("profile: lite\n", {"config_hash": "abc123", "version": "0.1.0"})
    assert store.read_run_meta() == {"config_hash": "abc123", "version": "0.1.0"}
    assert store.read_config_yaml() == "profile: lite\n"
    store.record_shards(None, ["b", "a"])
    store.record_shards(2, ["c", "a"])
    assert store.known_shards() == ["a", "b", "c"]
    assert store.known_shards(2) == ["a", "c"]
    assert store.known_shards(1) == ["a", "b", "c"]
    assert [store.next_attempt() for _ in range(3)] == [1, 2, 3]
    assert Store(str(tmp_path)).next_attempt() == 4
    assert staging_files(tmp_path) == []


def test_status_two_levels(tmp_path):
    from grand_pipeline import schemas

    store = Store(str(tmp_path))
    store.record_shards(None, ["s1", "s2", "s3"])
    store.commit(1, "s1", make_table("s1", n=4, errors={0: "tagger"}), {**STATS, "seconds": 1.0}, attempt=1)
    store.commit(
        1, "s2", make_table("s2", n=6, errors={1: "depth", 2: "tagger"}), {**STATS, "seconds": 4.0}, 1
    )
    # A second level with the same columns, declared just for this test.
    schemas._LEVEL_FIELDS[97] = schemas.LEVEL1_FIELDS
    try:
        store.commit(97, "s1", make_table("s1", n=2, level=97), {**STATS, "seconds": 0.0}, attempt=1)
        status = store.status(levels=[5])
    finally:
        schemas._LEVEL_FIELDS.pop(97)
    json.dumps(status)  # JSON-serialisable
    by_level = {s["level"]: s for s in status["levels"]}
    assert sorted(by_level) == [1, 5, 97]
    one = by_level[1]
    assert (one["shards_committed"], one["shards_total"]) == (2, 3)
    assert (one["images_ok"], one["images_failed"]) == (7, 3)
    assert one["failures_by_stage"] == {"depth": 1, "tagger": 2}
    assert one["seconds"] == pytest.approx(5.0)
    assert one["images_per_second"] == pytest.approx(2.0)
    assert by_level[97]["images_ok"] == 2 and by_level[97]["images_per_second"] == 0.0
    assert by_level[5]["shards_committed"] == 0
    assert status["shards"] == ["s1", "s2", "s3"]
    assert status["matrix"]["s1"] == {"1": "committed", "5": "missing", "97": "committed"}
    assert status["matrix"]["s3"]["1"] == "missing"
