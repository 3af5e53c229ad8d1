"""``grand export --format grand-json`` and ``grand show --to x.html`` on hand-built committed rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from skimage import data as skdata
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.export import SUMMARY_NAME, ExportValidationError, export
from grand_pipeline.geometry import rle
from grand_pipeline.registry import UnknownNameError
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema
from grand_pipeline.show import LINE_H, palette
from grand_pipeline.sources import list_shards
from grand_pipeline.store import Store, StoreError

H, W = 400, 600  # skimage's coffee photograph
CAPTION = 'The white cup <on> a wooden table & a "saucer".'
SHORT = "A White Cup on a table."
GROUNDED = [("white cup", [1], "exact"), ("a wooden table", [2], "exact"), ("saucer", [3], "noun")]


def span(caption: str, phrase: str, ids: list[int], method: str = "exact") -> dict[str, Any]:
    start = caption.index(phrase)
    return {"phrase": phrase, "tokens_positive": [start, start + len(phrase)], "ids": ids, "method": method}


def mask_rle(box: tuple[int, int, int, int]) -> dict[str, Any]:
    mask = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return rle.encode(mask)[0]


def an_object(oid: int, label: str, box: tuple[int, int, int, int], attribute: str) -> dict[str, Any]:
    return {
        "id": oid,
        "bbox": [float(v) for v in box],
        "labels": [label],
        "label": label,
        "score": 0.9,
        "attributes": [attribute],
        "depth": 0.5,
        "segmentation": mask_rle(box),
        "segmentation_source": "SAM",
        "models": ["nanodet", "region_tagger"],
    }


def make_row(
    image_id: str, shard: str, level: int = 4, error: str | None = None, caption: str = CAPTION
) -> dict:
    """One row with every column of ``level_schema(level)`` filled (error rows: empty values)."""
    attempt = {
        "attempt": 1,
        "text": caption,
        "passed": True,
        "issues": [],
        "finish_reason": "stop",
        "prompt_tokens": 100,
        "completion_tokens": 20,
    }
    full = {
        "image_id": image_id,
        "shard_id": shard,
        "file_name": f"{image_id}.jpg",
        "width": W,
        "height": H,
        "status": STATUS_ERROR if error else STATUS_OK,
        "error": error,
        "error_stage": "dense_caption" if error else None,
        "provenance": {
            "config_hash": "abc",
            "backends": [],
            "prompt_versions": [{"prompt": "dense_caption", "version": "1"}],
        },
        "tags": [{"name": "cup", "score": 0.8}],
        "objects": [
            an_object(1, "cup", (100, 100, 200, 200), "white cup"),
            an_object(2, "dining table", (0, 150, 600, 400), "wooden table"),
        ],
        "floating_objects": [an_object(3, "saucer", (90, 180, 220, 220), "white saucer")],
        "floating_attributes": [{"bbox": [1.0, 2.0, 3.0, 4.0], "description": "blue sky", "score": 0.3}],
        "depth_source": "ground_plane (heuristic)",
        "short_captions": [{"caption": SHORT, "source": "llm_from_tags"}],
        "phrases": [{"phrase": "White Cup", "caption_index": 0, "start": 2, "end": 11}],
        "relationships": {"grounding": [{"phrase": "a wooden table", "object_ids": [2]}]},
        "landmark": {"category": "Indoor scene", "fine_category": "kitchen", "score": 0.4},
        "scene_graph": "Foreground: cup (1)",
        "dense_caption": {
            "caption": caption,
            "details": [
                span(caption, phrase, ids, method) for phrase, ids, method in GROUNDED if phrase in caption
            ],
            "verified": True,
            "attempts": [attempt],
        },
        "short_captions_grounded": [{"caption": SHORT, "details": [span(SHORT, "White Cup", [1])]}],
        "additional_context": {"text": "Coffee <hot> & ready.", "verified": True, "attempts": [attempt]},
    }
    schema = level_schema(level)
    if error:
        full.update(
            {
                f.name: ([] if pa.types.is_list(f.type) else None)
                for f in schema
                if f.name in full
                and f.name
                not in (
                    "image_id",
                    "shard_id",
                    "file_name",
                    "width",
                    "height",
                    "status",
                    "error",
                    "error_stage",
                    "provenance",
                )
            }
        )
    return {f.name: full[f.name] for f in schema}


def commit(out: Path, level: int, shard: str, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=level_schema(level))
    assert Store(str(out)).commit(level, shard, table, {"seconds": 1.0}, attempt=1)


@pytest.fixture()
def run_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    # Level 3 of shard a carries an older caption: the export must read level 4, not it.
    commit(out, 3, "a", [make_row("sa_1", "a", level=3, caption="An older cup caption.")])
    commit(out, 4, "a", [make_row("sa_1", "a"), make_row("sa_2", "a", error="LLM failed 3 times")])
    commit(out, 4, "b", [make_row("sa_3", "b")])
    return out


def test_grand_json_has_every_reference_key_and_valid_offsets(run_output: Path, tmp_path: Path) -> None:
    to = tmp_path / "export"
    assert export(str(run_output), "grand-json", str(to)) == 2
    assert sorted(p.name for p in to.iterdir()) == [
        SUMMARY_NAME,
        "sa_1.json",
        "sa_3.json",
    ]  # no temp files left
    doc = json.loads((to / "sa_1.json").read_text())
    assert {
        "objects",
        "floating_objects",
        "landmark",
        "relationships",
        "short_captions",
        "dense_caption",
        "additional_context",
        "image",
        "provenance",
    } <= doc.keys()
    for entry in doc["objects"] + doc["floating_objects"]:
        assert {
            "id",
            "bbox",
            "labels",
            "label",
            "score",
            "attributes",
            "depth",
            "segmentation",
            "segmentation_source",
        } <= entry.keys()
        assert entry["segmentation"].keys() == {"size", "counts"} and entry["segmentation"]["size"] == [H, W]
    assert doc["landmark"] == {"category": "Indoor scene", "fine_category": "kitchen"}
    assert doc["relationships"] == {"grounding": [{"phrase": "a wooden table", "object_ids": [2]}]}
    assert doc["dense_caption"]["caption"] == CAPTION
    assert doc["additional_context"] == "Coffee <hot> & ready."
    assert doc["image"] == {"image_id": "sa_1", "file_name": "sa_1.jpg", "width": W, "height": H}
    assert doc["provenance"]["level"] == 4 and doc["provenance"]["config_hash"] == "abc"
    ids = {o["id"] for o in doc["objects"] + doc["floating_objects"]}
    for item in doc["short_captions"] + [doc["dense_caption"]]:
        assert item["details"]
        for detail in item["details"]:
            assert {"phrase", "tokens_positive", "ids"} <= detail.keys()
            s, e = detail["tokens_positive"]
            assert item["caption"][s:e] == detail["phrase"]
            assert set(detail["ids"]) <= ids


def test_error_rows_are_skipped_and_listed_in_the_summary(run_output: Path, tmp_path: Path) -> None:
    to = tmp_path / "export"
    export(str(run_output), "grand-json", str(to))
    summary = json.loads((to / SUMMARY_NAME).read_text())
    assert (summary["exported"], summary["skipped"], summary["level"]) == (2, 1, 4)
    assert summary["skipped_images"] == [
        {"image_id": "sa_2", "shard_id": "a", "error_stage": "dense_caption", "error": "LLM failed 3 times"}
    ]
    assert not (to / "sa_2.json").exists()


def test_an_offset_bug_raises_instead_of_being_exported(tmp_path: Path) -> None:
    out, row = tmp_path / "out", make_row("sa_1", "a")
    row["dense_caption"]["details"][0]["tokens_positive"] = [5, 14]  # "hite cup " is not "white cup"
    commit(out, 4, "a", [row])
    with pytest.raises(ExportValidationError, match="not 'white cup'"):
        export(str(out), "grand-json", str(tmp_path / "export"))
    assert not (tmp_path / "export" / SUMMARY_NAME).exists()
    row = make_row("sa_1", "a")
    row["short_captions_grounded"][0]["details"][0]["ids"] = [1, 42]
    commit(out, 4, "b", [row])
    Store(str(out)).clear(4, "a")
    with pytest.raises(ExportValidationError, match=r"unknown ids \[42\]"):
        export(str(out), "grand-json", str(tmp_path / "export"))


def test_unknown_format_and_empty_output_are_one_clear_error(run_output: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="known: grand-json"):
        export(str(run_output), "gcg-v9", str(tmp_path / "x"))
    with pytest.raises(StoreError, match="nothing is committed"):
        export(str(tmp_path / "empty"), "grand-json", str(tmp_path / "x"))
    runner = CliRunner()
    bad = runner.invoke(
        app, ["export", "-o", str(run_output), "--format", "gcg-v9", "--to", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "grand: error: unknown export format 'gcg-v9'; known: grand-json"
    ]
    ok = runner.invoke(app, ["export", "-o", str(run_output), "--to", str(tmp_path / "y")])
    assert ok.exit_code == 0, ok.output
    assert "exported 2 image(s)" in ok.output


# ----------------------------------------------------------------------------- grand show


@pytest.fixture()
def photo_output(tmp_path: Path) -> tuple[Path, str]:
    """A folder input holding the coffee photo, and a committed level-4 row for it."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skdata.coffee()).save(photos / "coffee.png")
    shard = list_shards(str(photos))[0].shard_id
    out = tmp_path / "out"
    commit(out, 4, shard, [make_row("coffee", shard)])
    Store(str(out)).write_run_meta("profile: lite\n", {"input": str(photos), "config_hash": "abc"})
    return out, shard


def test_show_html_embeds_the_png_and_colours_grounded_phrases(photo_output, tmp_path: Path) -> None:
    out, _ = photo_output
    target = tmp_path / "view" / "x.html"
    result = CliRunner().invoke(app, ["show", "-o", str(out), "--image", "coffee", "--to", str(target)])
    assert result.exit_code == 0, result.output
    page = target.read_text()
    assert '<img src="data:image/png;base64,' in page
    colour = "#{:02x}{:02x}{:02x}".format(*palette(1))
    assert f'<span style="color:{colour}">white cup</span>' in page
    assert f'<span style="color:{colour}">White Cup</span>' in page  # the short caption too
    assert "&lt;on&gt;" in page and "&amp;" in page and "&quot;saucer&quot;" not in page.split("<span")[0]
    assert "<on>" not in page and "Coffee &lt;hot&gt; &amp; ready." in page
    saucer = "#{:02x}{:02x}{:02x}".format(*palette(3))
    assert f'<span style="color:{saucer}">saucer</span>' in page


def test_show_png_writes_the_caption_in_mask_colours(photo_output, tmp_path: Path) -> None:
    out, _ = photo_output
    from grand_pipeline.show import render

    target = render(str(out), "coffee", str(tmp_path / "x.png"))
    image = np.asarray(Image.open(target).convert("RGB"))
    # Two footer lines (id/tags, depth) plus the wrapped caption, which fits on one 600-px line.
    assert image.shape == (H + LINE_H * 3 + 6, W, 3)
    footer = image[H:].reshape(-1, 3).astype(int)
    for oid in (1, 2, 3):
        # The default font is anti-aliased: glyph cores come within a few levels of the colour.
        assert (np.abs(footer - np.asarray(palette(oid))).max(axis=1) <= 12).any(), oid
