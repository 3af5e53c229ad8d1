"""``grand retry-failed`` on a real run whose depth backend fails for two chosen images, and
``grand plan`` on the same output.

The failing images (one per shard) turn ok at level 1 and at level 2 after the retry; every
other row of both levels keeps its values and its serialized bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from grand_pipeline import fencing
from grand_pipeline.cli import app
from grand_pipeline.config import load_config
from grand_pipeline.plan import make_plan
from grand_pipeline.sample import make_sample
from grand_pipeline.store import Store
from grand_pipeline.units import unit_id

SHARDS = ["sa_000051", "sa_000052"]
UNITS = [unit_id(shard, 0) for shard in SHARDS]  # three images a shard: one unit each
VICTIMS = {"sa_2", "sa_4"}  # coffee (400x600) in the first shard, rocket (427x640) in the second


def _row_bytes(table: pa.Table, i: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table.slice(i, 1), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory, tiny_cfg):
    root = tmp_path_factory.mktemp("retry")
    inp, out = root / "input", root / "out"
    inp.mkdir()
    make_sample(str(inp), tiny_cfg, images=3, shard_id=SHARDS[0], start=1)
    make_sample(str(inp), tiny_cfg, images=3, shard_id=SHARDS[1], start=4)
    flag = root / "failing"
    flag.write_text("fail while this file exists")
    config = root / "flaky.yaml"
    config.write_text(yaml.safe_dump({
        "plugins": ["tests.flaky_plugin"],
        "models": {"depth": {"backend": "flaky_ground_plane",
                             "options": {"flag": str(flag), "fail_shapes": [[400, 600], [427, 640]]}}},
    }))
    args = ["--profile", "tiny-lite", "--config", str(config)]
    result = CliRunner().invoke(app, ["run", "-i", str(inp), "-o", str(out), "--levels", "1-2",
                                      "--executor", "local", *args])
    assert result.exit_code == 0, result.output
    return {"out": out, "flag": flag, "args": args}


def test_retry_failed_recomputes_only_the_failed_rows(failed_run) -> None:
    out = failed_run["out"]
    store = Store(str(out))
    assert {lv: set(store.committed(lv)) for lv in (1, 2)} == {1: set(UNITS), 2: set(UNITS)}
    before = {(lv, u): store.read(lv, u) for lv in (1, 2) for u in UNITS}
    markers_before = {(lv, u): store.marker(lv, u) for lv in (1, 2) for u in UNITS}
    for (lv, _), table in before.items():
        errors = {r["image_id"]: r for r in table.to_pylist() if r["status"] == "error"}
        if lv == 1:
            assert set(errors) <= VICTIMS
            assert all(r["error_stage"] == "depth" for r in errors.values())
    assert {r for (lv, _), t in before.items() if lv == 1
            for r in t.column("image_id").to_pylist()} >= VICTIMS
    assert sum(m["errors"] for (lv, _), m in markers_before.items() if lv == 1) == 2

    failed_run["flag"].unlink()
    result = CliRunner().invoke(app, ["retry-failed", "-o", str(out), "--level", "1", *failed_run["args"]])
    assert result.exit_code == 0, result.output
    assert "2 fixed, 0 still failed" in result.output

    for (lv, unit), old in before.items():
        new = store.read(lv, unit)
        assert new.schema == old.schema
        assert new.column("image_id").to_pylist() == old.column("image_id").to_pylist()
        for i, (was, now) in enumerate(zip(old.to_pylist(), new.to_pylist(), strict=True)):
            if was["image_id"] in VICTIMS:
                assert (was["status"], now["status"]) == ("error", "ok"), (lv, unit, now["error"])
            else:
                assert now == was, (lv, unit, was["image_id"])
                assert _row_bytes(new, i) == _row_bytes(old, i)
        marker = store.marker(lv, unit)
        assert store.is_committed(lv, unit)
        assert (marker["unit"], marker["shard"]) == (unit, unit.split("@")[0])
        assert marker["errors"] == 0 and marker["ok"] == old.num_rows
        assert marker["attempt"] > markers_before[(lv, unit)]["attempt"]
        assert marker["retried_images"] == 1
        # The original timing stays (the retry does not redo the unit); the claim log grew.
        assert marker["duration_s"] == markers_before[(lv, unit)]["duration_s"]
        log = fencing.claims(store.fs, store.claim_dir(lv, unit))
        assert [c["attempt"] for c in log][-1] == marker["attempt"] and len(log) == 2

    again = CliRunner().invoke(app, ["retry-failed", "-o", str(out), "--level", "1", *failed_run["args"]])
    assert again.exit_code == 0 and "no failed images" in again.output


def test_markers_carry_shard_stats(failed_run) -> None:
    marker = json.loads((Path(failed_run["out"]) / "level1" / f"{UNITS[0]}.success.json").read_text())
    assert (marker["level"], marker["unit"], marker["shard"]) == (1, UNITS[0], SHARDS[0])
    for key in ("images", "ok", "errors", "errors_by_stage", "duration_s", "images_per_s", "started",
                "finished", "attempt", "host", "stage_seconds"):
        assert key in marker, key
    assert marker["images"] == 3 and marker["started"] <= marker["finished"]
    assert {"tags", "detect", "depth"} <= set(marker["stage_seconds"])
    assert all(v >= 0 for v in marker["stage_seconds"].values())


def test_plan_on_a_real_output(failed_run) -> None:
    cfg = load_config("tiny-lite", overrides=["pools.level1.num_gpus=1", "pools.level2.num_gpus=0.5"])
    result = make_plan(cfg, str(failed_run["out"]), gpus=4)
    assert [lv.level for lv in result.levels] == [1, 2]
    assert all(lv.actors >= 1 and lv.seconds_per_image > 0 for lv in result.levels)
    assert result.gpus_used <= 4
    # No GPU left that could buy the bottleneck level another actor.
    slowest = min(result.levels, key=lambda lv: lv.images_per_s)
    assert result.gpus_used + slowest.gpus_per_actor > 4
    assert result.eta_s() == 0.0  # every unit of every known shard is committed
    assert all((lv.units_measured, lv.units_remaining) == (len(UNITS), 0) for lv in result.levels)
    assert result.images_per_unit == pytest.approx(3.0)

    printed = CliRunner().invoke(app, ["plan", "-o", str(failed_run["out"]), "--gpus", "4", "--profile",
                                       "tiny-lite", "--set", "pools.level1.num_gpus=1",
                                       "--set", "pools.level2.num_gpus=0.5"])
    assert printed.exit_code == 0, printed.output
    assert "pipeline:" in printed.output and "ETA" in printed.output
