"""Levels 1-4 end to end with the tiny profile, level by level, then the GranD JSON export."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.sample import make_sample
from grand_pipeline.schemas import level_schema
from tests.grounded_masks import assert_grounded_ids_have_masks

runner = CliRunner()

EXPORT_KEYS = {
    "objects", "floating_objects", "landmark", "relationships", "short_captions", "dense_caption",
    "additional_context",
}
OBJECT_KEYS = {
    "id", "bbox", "labels", "label", "score", "attributes", "depth", "segmentation", "segmentation_source",
}


def grand(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_cfg) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("levels")
    make_sample(str(root / "in"), tiny_cfg, images=2, shard_id="sa_000030", start=1)
    return root / "in", root / "out"


def _run(inp: Path, out: Path, *extra: str):
    return grand("run", "-i", str(inp), "-o", str(out), "--profile", "tiny-lite", "--executor", "local", *extra)


def test_level_by_level_then_export(staged, tmp_path) -> None:
    inp, out = staged
    premature = _run(inp, out, "--level", "3")
    assert premature.exit_code == 2 and "needs level 2" in premature.output

    assert _run(inp, out, "--levels", "1-2").exit_code == 0
    assert not (out / "level3").exists()

    third = _run(inp, out, "--level", "3")
    assert third.exit_code == 0, third.output
    assert (out / "level3" / "sa_000030@00000.success.json").exists()
    assert not (out / "level4").exists(), "--level 3 must run level 3 only"
    again = _run(inp, out, "--level", "3")
    assert again.exit_code == 0 and "nothing to do" in again.output

    assert _run(inp, out, "--level", "4").exit_code == 0
    for level in (2, 3, 4):
        table = pq.read_table(out / f"level{level}" / "sa_000030@00000.parquet", use_threads=False)
        assert table.schema.equals(level_schema(level), check_metadata=False)
        assert table.num_rows == 2
    rows = pq.read_table(out / "level4" / "sa_000030@00000.parquet", use_threads=False).to_pylist()
    for row in rows:
        assert row["status"] == "ok", row["error"]
        dense = row["dense_caption"]
        assert dense["attempts"], "every attempt must be recorded"
        assert isinstance(dense["verified"], bool)
        versions = {p["prompt"] for p in row["provenance"]["prompt_versions"]}
        assert {"short_caption", "dense_caption", "additional_context"} <= versions
        stages = {b["stage"] for b in row["provenance"]["backends"]}
        assert {"detect", "captions", "object_masks", "dense_caption", "additional_context"} <= stages
        # Level 2 leaves no object without a mask, so every grounded phrase has one.
        assert all(o["segmentation"] is not None for o in row["objects"] + row["floating_objects"])
        assert_grounded_ids_have_masks(row)

    dest = tmp_path / "export"
    result = grand("export", "-o", str(out), "--format", "grand-json", "--to", str(dest))
    assert result.exit_code == 0, result.output
    for image_id in ("sa_1", "sa_2"):
        doc = json.loads((dest / f"{image_id}.json").read_text())
        assert EXPORT_KEYS <= set(doc)
        ids = {o["id"] for o in doc["objects"] + doc["floating_objects"]}
        for obj in doc["objects"] + doc["floating_objects"]:
            assert OBJECT_KEYS <= set(obj)
        for caption in doc["short_captions"] + [doc["dense_caption"]]:
            for detail in caption["details"]:
                s, e = detail["tokens_positive"]
                assert caption["caption"][s:e] == detail["phrase"]
                assert set(detail["ids"]) <= ids
    summary = json.loads((dest / "_export" / "summary.json").read_text())
    assert summary["exported"] == 2
