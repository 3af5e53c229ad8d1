"""``grand export --format grand-json|grand-ref`` and ``grand show --to x.html`` on hand-built committed rows.

The grand-ref checks follow the glamm reference (§3.6, §7): a schema written from it, and a small
re-typed reader that follows the authors' ``prepare_grand_*`` reading rules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata
from typer.testing import CliRunner

from grand_pipeline.cli import app
from grand_pipeline.commit import commit as commit_unit
from grand_pipeline.export import SUMMARY_PATH, export
from grand_pipeline.export_ref import ExportValidationError
from grand_pipeline.geometry import rle
from grand_pipeline.registry import UnknownNameError
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK, level_schema
from grand_pipeline.show import LINE_H, palette
from grand_pipeline.sources import list_shards
from grand_pipeline.store import Store, StoreError
from grand_pipeline.units import unit_id

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
        "depth_lowres": {"height": 1, "width": 2, "values": [0.25, 0.75]},
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
    """Commit ``rows`` as unit 0 of ``shard`` (one unit holds every row of these small shards)."""
    table = pa.Table.from_pylist(rows, schema=level_schema(level))
    assert commit_unit(Store(str(out)), level, unit_id(shard, 0), table, {"seconds": 1.0}, attempt=1)


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
    assert export(str(run_output), "grand-json", str(to))["exported"] == 2
    # No temp files left; the summary is out of the data files' glob.
    assert sorted(p.name for p in to.iterdir()) == ["_export", "sa_1.json", "sa_3.json"]
    assert sorted(p.name for p in to.glob("*.json")) == ["sa_1.json", "sa_3.json"]
    assert sorted(p.name for p in (to / "_export").iterdir()) == ["summary.json"]
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
    assert (doc["dense_caption"]["verified"], doc["dense_caption"]["attempts"]) == (True, 1)
    assert (doc["additional_context_verified"], doc["additional_context_attempts"]) == (True, 1)
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
    summary = json.loads((to / SUMMARY_PATH).read_text())
    assert (summary["exported"], summary["skipped"], summary["level"]) == (2, 1, 4)
    assert summary["counts"] == {"rows:error": 1, "rows:ok": 2}
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
    assert not (tmp_path / "export" / SUMMARY_PATH).exists()
    row = make_row("sa_1", "a")
    row["short_captions_grounded"][0]["details"][0]["ids"] = [1, 42]
    commit(out, 4, "b", [row])
    Store(str(out)).clear(4, unit_id("a", 0))
    with pytest.raises(ExportValidationError, match=r"unknown ids \[42\]"):
        export(str(out), "grand-json", str(tmp_path / "export"))


def test_unknown_format_and_empty_output_are_one_clear_error(run_output: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="known: .*grand-json, grand-ref"):
        export(str(run_output), "gcg-v9", str(tmp_path / "x"))
    with pytest.raises(StoreError, match="nothing is committed"):
        export(str(tmp_path / "empty"), "grand-json", str(tmp_path / "x"))
    runner = CliRunner()
    bad = runner.invoke(
        app, ["export", "-o", str(run_output), "--format", "gcg-v9", "--to", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2
    [line] = bad.output.strip().splitlines()
    assert line.startswith("grand: error: unknown export format 'gcg-v9'; known: ") and "grand-ref" in line
    ok = runner.invoke(app, ["export", "-o", str(run_output), "--to", str(tmp_path / "y")])
    assert ok.exit_code == 0, ok.output
    assert "exported 2 image(s)" in ok.output and "rows:error: 1" in ok.output
    assert f"summary: {tmp_path / 'y' / SUMMARY_PATH}" in ok.output
    unread = runner.invoke(
        app, ["export", "-o", str(run_output), "--methods", "exact", "--to", str(tmp_path / "z")]
    )
    assert unread.exit_code == 2
    assert unread.output.strip() == "grand: error: --methods: not an option of export format 'grand-json'"


@pytest.mark.parametrize(("fmt", "folder"), [("grand-json", ""), ("grand-ref", "annotations")])
def test_an_image_id_in_two_shards_is_exported_once_per_shard(tmp_path: Path, fmt: str, folder: str) -> None:
    out, to = tmp_path / "out", tmp_path / "export"
    commit(out, 4, "a", [make_row("sa_1", "a"), make_row("sa_2", "a")])
    commit(out, 4, "b", [make_row("sa_1", "b", caption="A white cup, seen again.")])
    commit(out, 4, "c", [make_row("sa_3", "c")])
    summary = export(str(out), fmt, str(to))
    # Before: 4 images reported, 3 files left (b's sa_1.json silently replaced a's).
    names = sorted(p.name for p in (to / folder).glob("*.json"))
    assert names == ["sa_1__a.json", "sa_1__b.json", "sa_2.json", "sa_3.json"]
    assert summary["exported"] == len(names) == 4
    assert summary["counts"]["images:duplicate_id"] == 2
    assert summary["duplicate_ids"] == {"sa_1": ["sa_1__a.json", "sa_1__b.json"]}
    assert json.loads((to / SUMMARY_PATH).read_text())["duplicate_ids"] == summary["duplicate_ids"]
    docs = [json.loads((to / folder / name).read_text()) for name in names[:2]]
    if fmt == "grand-ref":
        docs = [doc["sa_1.jpg"] for doc in docs]
    assert [doc["provenance"]["shard_id"] for doc in docs] == ["a", "b"]
    assert docs[1]["dense_caption"]["caption"] == "A white cup, seen again."


def test_to_that_is_a_file_or_cannot_be_created_is_one_line(run_output: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for to, reason in ((a_file, "is a file"), (Path("/proc/grand-export"), "cannot create")):
        result = CliRunner().invoke(app, ["export", "-o", str(run_output), "--to", str(to)])
        assert result.exit_code == 2, result.output
        [line] = result.output.strip().splitlines()
        assert "Traceback" not in result.output and str(to) in line and reason in line


def test_only_verified_skips_and_counts_unverified_dense_captions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    unverified = make_row("sa_2", "a")
    unverified["dense_caption"]["verified"] = False
    unverified["dense_caption"]["attempts"] *= 3
    commit(out, 4, "a", [make_row("sa_1", "a"), unverified])
    everything = export(str(out), "grand-json", str(tmp_path / "all"))
    assert everything["exported"] == 2
    doc = json.loads((tmp_path / "all" / "sa_2.json").read_text())
    assert (doc["dense_caption"]["verified"], doc["dense_caption"]["attempts"]) == (False, 3)
    result = CliRunner().invoke(
        app, ["export", "-o", str(out), "--only-verified", "--to", str(tmp_path / "verified")]
    )
    assert result.exit_code == 0, result.output
    assert "exported 1 image(s)" in result.output and "images:unverified: 1" in result.output
    assert sorted(p.name for p in (tmp_path / "verified").glob("*.json")) == ["sa_1.json"]
    summary = json.loads((tmp_path / "verified" / SUMMARY_PATH).read_text())
    assert summary["options"]["only_verified"] is True and summary["counts"]["images:unverified"] == 1


# ----------------------------------------------------------------------------- grand-ref


def check_rle(rle_obj: dict[str, Any], height: int, width: int) -> None:
    assert rle_obj.keys() == {"size", "counts"}
    assert mask_utils.decode(rle_obj).shape == (height, width)


def check_grand_ref_schema(data: dict[str, Any]) -> None:
    """The authors' GranD layout (glamm reference §3.6 / §7, grand reference §5)."""
    assert len(data) == 1
    [(file_name, entry)] = data.items()
    assert file_name.endswith(".jpg")
    assert {
        "objects",
        "floating_objects",
        "short_captions",
        "dense_caption",
        "additional_context",
    } <= entry.keys()
    assert {"floating_attributes", "landmark", "relationships"} <= entry.keys()
    assert isinstance(entry["additional_context"], str)
    ids = set()
    for obj in entry["objects"] + entry["floating_objects"]:
        assert {"id", "bbox", "labels", "label", "attributes", "segmentation"} <= obj.keys()
        assert len(obj["bbox"]) == 4
        check_rle(obj["segmentation"], entry["height"], entry["width"])
        ids.add(obj["id"])
    captions = [(c, True) for c in entry["short_captions"]] + [(entry["dense_caption"], False)]
    for caption, short in captions:
        assert {"caption", "details"} <= caption.keys()
        for detail in caption["details"]:
            assert {"phrase", "tokens_positive", "id", "bbox"} <= detail.keys()
            s, e = detail["tokens_positive"]
            assert caption["caption"][s:e] == detail["phrase"]
            assert isinstance(detail["id"], int) and detail["id"] in ids
            boxes = [detail["bbox"]] if short else detail["bbox"]
            assert boxes and all(len(box) == 4 for box in boxes)


def read_grand_ref_like_the_authors(folder: Path) -> tuple[dict[str, list], dict[str, list]]:
    """Re-typed reading rules of ``prepare_grand_caption_grounding`` / ``_referring_expression``:
    ``os.listdir`` the folder, ``image = list(data.keys())[0]``, a short-caption detail's ``id``
    names the object whose segmentation it takes (floating objects: None), and objects with
    attributes become expressions (one containing a label, else the first)."""
    grounding: dict[str, list] = {}
    referring: dict[str, list] = {}
    for name in os.listdir(folder):
        data = json.loads((folder / name).read_text())
        image = list(data.keys())[0]
        entry = data[image]
        masks = {obj["id"]: obj["segmentation"] for obj in entry["objects"]}
        grounding[image] = [
            {
                "caption": item["caption"],
                "details": [
                    {
                        "phrase": d["phrase"],
                        "tokens_positive": d["tokens_positive"],
                        "id": d["id"],
                        "segmentation": masks.get(d["id"]),
                    }
                    for d in item["details"]
                ],
            }
            for item in entry["short_captions"]
        ]
        referring[image] = []
        for obj in entry["objects"]:
            if not obj["attributes"]:
                continue
            named = [a for a in obj["attributes"] if any(label in a for label in obj["labels"])]
            referring[image].append(
                {
                    "attribute": (named or obj["attributes"])[0],
                    "id": obj["id"],
                    "bbox": obj["bbox"],
                    "segmentation": obj["segmentation"],
                }
            )
    return grounding, referring


def test_grand_ref_round_trips_through_the_authors_reading_rules(tmp_path: Path) -> None:
    out, row = tmp_path / "out", make_row("sa_1", "a")
    row["short_captions_grounded"][0]["details"][0]["ids"] = [2, 1]  # a two-object phrase
    row["dense_caption"]["details"][0]["ids"] = [3, 1]
    commit(out, 4, "a", [row, make_row("sa_2", "a", error="boom")])
    to = tmp_path / "ref"
    summary = export(str(out), "grand-ref", str(to))
    assert (summary["exported"], summary["counts"]["rows:error"]) == (1, 1)
    assert sorted(os.listdir(to)) == ["_export", "annotations"]
    assert os.listdir(to / "annotations") == ["sa_1.json"]  # nothing else for their os.listdir
    data = json.loads((to / "annotations" / "sa_1.json").read_text())
    check_grand_ref_schema(data)
    entry = data["sa_1.jpg"]
    dense = entry["dense_caption"]["details"][0]
    assert (dense["id"], dense["ids"], dense["bbox"]) == (
        1,
        [3, 1],
        [[90.0, 180.0, 220.0, 220.0], [100.0, 100.0, 200.0, 200.0]],
    )
    grounding, referring = read_grand_ref_like_the_authors(to / "annotations")
    [item] = grounding["sa_1.jpg"]
    [detail] = item["details"]
    assert item["caption"] == SHORT
    assert (detail["phrase"], detail["tokens_positive"], detail["id"]) == ("White Cup", [2, 11], 1)
    assert entry["short_captions"][0]["details"][0]["bbox"] == [100.0, 100.0, 200.0, 200.0]  # the box of id 1
    cup = row["objects"][0]
    assert np.array_equal(mask_utils.decode(detail["segmentation"]), rle.decode_one(cup["segmentation"]))
    assert [r["attribute"] for r in referring["sa_1.jpg"]] == ["white cup", "wooden table"]
    for got, obj in zip(referring["sa_1.jpg"], row["objects"], strict=True):
        assert (got["id"], got["bbox"]) == (obj["id"], obj["bbox"])
        assert np.array_equal(mask_utils.decode(got["segmentation"]), rle.decode_one(obj["segmentation"]))


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
    RunMeta(Store(str(out))).write_run_meta("profile: lite\n", {"input": str(photos), "config_hash": "abc"})
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
