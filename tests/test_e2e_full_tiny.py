"""Levels 1-4 end to end through the FULL profile's backends (profile ``tiny``: tiny:0 weights).

Every model is a random-initialised small network saved with ``save_pretrained`` (or a state
dict) and loaded back through the loader that reads the real checkpoints, so this covers the
GPU profile's code paths on a CPU. Outputs are noise; the test checks plumbing: commits,
row status, and provenance down to the weights' identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.config import load_config
from grand_pipeline.sample import make_sample
from grand_pipeline.schemas import level_schema
from tests.grounded_masks import assert_grounded_ids_have_masks

pytestmark = pytest.mark.slow

runner = CliRunner()

#: Backends of the full profile that each level must record (the rest of tiny.yaml may change).
EXPECTED = {
    1: {"clip_tagger", "ultralytics", "owlv2", "grounding_dino", "sam", "hf_depth", "blip2_region"},
    2: {"blip2", "clip_landmark", "spacy", "grounding_dino", "sam"},
    3: {"gguf_transformers"},
    4: {"gguf_transformers"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cfg) -> Path:
    root = tmp_path_factory.mktemp("full-tiny")
    make_sample(str(root / "in"), tiny_cfg, images=2, shard_id="sa_000040", start=1)
    result = runner.invoke(
        app,
        ["run", "-i", str(root / "in"), "-o", str(root / "out"), "--profile", "tiny",
         "--levels", "1-4", "--executor", "local"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "out"


def test_tiny_profile_uses_the_full_profile_backends() -> None:
    full, tiny = load_config("full"), load_config("tiny")
    assert tiny.models.tagger.backend == full.models.tagger.backend
    assert {m: s.backend for m, s in tiny.models.detectors.items()} == {
        m: s.backend for m, s in full.models.detectors.items()
    }
    assert tiny.models.grounder.backend == full.models.grounder.backend
    assert tiny.models.segmenter.backend == full.models.segmenter.backend
    assert tiny.models.depth.backend == full.models.depth.backend
    for role in ("region_captioner", "captioner", "landmark_classifier", "label_assigner"):
        assert getattr(tiny.models, role).backend == getattr(full.models, role).backend, role
        assert getattr(tiny.models, role).model == "tiny:0"


def test_levels_1_to_4_commit_and_every_row_is_ok(run_dir: Path) -> None:
    for level in (1, 2, 3, 4):
        marker = json.loads((run_dir / f"level{level}" / "sa_000040@00000.success.json").read_text())
        table = pq.read_table(run_dir / f"level{level}" / "sa_000040@00000.parquet", use_threads=False)
        assert table.schema.equals(level_schema(level), check_metadata=False)
        rows = table.to_pylist()
        assert len(rows) == 2 == marker["rows"]
        # Random weights give noise, never crashes: every stage of every backend ran.
        assert [(r["status"], r["error"]) for r in rows] == [("ok", None)] * 2
        assert marker["ok"] == 2


def test_provenance_names_full_backends_and_their_weights(run_dir: Path) -> None:
    for level, expected in EXPECTED.items():
        rows = pq.read_table(run_dir / f"level{level}" / "sa_000040@00000.parquet", use_threads=False).to_pylist()
        used = {b["backend"]: b for row in rows if row["status"] == "ok" for b in row["provenance"]["backends"]}
        assert expected <= set(used), f"level {level}: {sorted(used)}"
        for name in expected - {"spacy"}:
            assert used[name]["weights"], f"level {level}: {name} recorded no weights identity"
            assert not used[name]["heuristic"]
    meta = json.loads((run_dir / "_run" / "run.json").read_text())
    recorded = {info["backend"]: info["weights"] for info in meta["models"].values()}
    for name in ("blip2", "blip2_region", "clip_landmark", "sam", "hf_depth", "clip_tagger"):
        assert len(recorded.get(name, "")) == 64, f"run.json: {name} -> {recorded.get(name)!r}"
    # captioner and region captioner share one tiny BLIP-2: the same weights identity.
    assert recorded["blip2"] == recorded["blip2_region"]


def test_every_grounded_phrase_points_at_a_mask(run_dir: Path) -> None:
    # The random grounder's boxes match nothing, so level 2 makes new objects: each gets a mask.
    for level in (2, 3, 4):
        rows = pq.read_table(run_dir / f"level{level}" / "sa_000040@00000.parquet", use_threads=False).to_pylist()
        for row in rows:
            objects = row["objects"] + row["floating_objects"]
            assert all(o["segmentation"] is not None for o in objects), (level, row["image_id"])
            if level >= 3:
                assert_grounded_ids_have_masks(row)
