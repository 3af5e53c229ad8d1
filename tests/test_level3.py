"""Level 3: scene graph, caption checks, the verify/regenerate loop and the level-3 row.

The LLM is the scripted plugin backend of ``tests/scripted_llm.py``, loaded through a real
``ModelHub`` exactly as a profile's ``plugins`` would load it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from grand_pipeline.config import GrandConfig, Level3Config, Level4Config, ModelsConfig, ModelSpec
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.schemas import COMMON_FIELDS, level_schema
from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS
from levels.level3.checks import caption_issues, names_match, object_issues, parse_checklist
from levels.level3.dense_caption import DenseCaptionStage
from levels.level3.scene_graph import SceneGraphStage
from levels.verify import Issue, count_sentences

H = W = 1000
GOOD = "A white cup stands on a saucer. The saucer rests on a wooden table."
DRAGON = "A dragon sleeps next to a white cup. The cup stands on a wooden table."
CHECKLISTS = {
    "dragon": ["- dragon\n- white cup\n- wooden table"],
    "saucer": ["- white cup\n- saucer\n- wooden table"],
}


def make_obj(
    oid: int, box: list[float], label: str, depth: float | None, attrs: tuple[str, ...] = ()
) -> dict:
    return {
        "id": oid, "bbox": [float(v) for v in box], "labels": [label, f"{label}_alt"], "label": label,
        "score": 0.9, "attributes": list(attrs), "depth": depth, "segmentation": None,
        "segmentation_source": None, "models": ["a"],
    }  # fmt: skip


def table_objects(scale: float = 1.0) -> list[dict]:
    """Depths (inverse, larger = nearer) normalise to 0, 0.005, 0, 0.4, 0.8, 1.0 and None."""
    rows = [
        (1, [100, 100, 200, 200], "cup", 10.0, ("white ceramic cup",)),
        (2, [150, 150, 260, 260], "saucer", 9.95, ()),
        (3, [850, 850, 950, 950], "spoon", 10.0, ()),
        (4, [0, 300, 1000, 1000], "dining_table", 6.0, ("wooden table",)),
        (5, [400, 0, 500, 100], "lamp", 2.0, ()),
        (6, [0, 0, 1000, 300], "wall", 0.0, ()),
        (7, [600, 600, 700, 700], "vase", None, ()),
    ]
    return [make_obj(i, [v * scale for v in box], lab, d, a) for i, box, lab, d, a in rows]


def level2_fields(objects: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    fields = {
        "tags": [{"name": "cup", "score": 0.9}],
        "objects": table_objects() if objects is None else objects,
        "floating_objects": [],
        "floating_attributes": [],
        "depth_source": "fake",
        "short_captions": [{"caption": "a cup of coffee on a table", "source": "fake"}],
        "phrases": [{"phrase": "a cup", "caption_index": 0, "start": 0, "end": 5}],
        "relationships": {"grounding": [{"phrase": "a cup on a saucer", "object_ids": [1, 2]}]},
        "landmark": {"category": "Indoor scene", "fine_category": "Living space", "score": 0.8},
        "prompt_versions": [],
    }
    fields.update(extra)
    return fields


def make_record(image_id: str = "sa_1", size: int = H, **fields: Any) -> ImageRecord:
    return ImageRecord(
        image_id=image_id, shard_id="sa_000000", width=size, height=size, fields=level2_fields(**fields)
    )


def make_cfg(llm_options: dict[str, Any] | None = None, **level3: Any) -> GrandConfig:
    fake = ModelSpec("fake")
    models = ModelsConfig(
        tagger=fake, detectors={}, segmenter=fake, depth=fake, region_captioner=fake,
        llm=ModelSpec("scripted", model="scripted-llm", options=llm_options or {}),
    )  # fmt: skip
    return GrandConfig(
        profile="tiny-lite", models=models, plugins=["tests.scripted_llm"],
        level3=Level3Config(**level3), level4=Level4Config(),
    )  # fmt: skip


def caption_stage(cfg: GrandConfig) -> tuple[DenseCaptionStage, Any]:
    hub = ModelHub(cfg.models, cfg.plugins)
    return DenseCaptionStage(cfg, hub), hub.get("llm")


def run_level3(records: list[ImageRecord], cfg: GrandConfig) -> Any:
    """Scene graph then dense caption, through the stages' ``__call__`` (as the runner does)."""
    SceneGraphStage(cfg, None)(records)
    stage, llm = caption_stage(cfg)
    stage(records)
    return llm


# ----------------------------------------------------------------------------- scene graph

EXPECTED_GRAPH = """\
Immediate foreground:
Group 1: cup/white ceramic cup, saucer
Group 2: spoon
Foreground:
Group 3: dining table/wooden table
Midground:
Group 4: lamp
Background:
Group 5: wall
Short captions:
- a cup of coffee on a table
Relationships:
- a cup on a saucer -> cup (group 1), saucer (group 1)
Landmark: Indoor, Living space"""


def test_scene_graph_layers_groups_and_sections():
    rec = make_record()
    SceneGraphStage(make_cfg(), None)([rec])
    assert rec.fields["scene_graph"] == EXPECTED_GRAPH
    names = rec.fields["scene_objects"]
    assert {
        "cup",
        "cup alt",
        "white ceramic cup",
        "dining table",
        "a cup on a saucer",
        "living space",
    } <= set(names)
    assert "vase" not in names  # no depth: not in the graph, so not allowed in a caption
    assert "a cup of coffee on a table" not in names  # short captions are not grounded evidence


def test_group_radius_is_relative_to_the_image_diagonal():
    big = make_record(size=4 * H, objects=table_objects(scale=4.0))
    SceneGraphStage(make_cfg(), None)([big])
    assert big.fields["scene_graph"] == EXPECTED_GRAPH  # 4x the pixels, the same groups
    tight = make_record()
    SceneGraphStage(make_cfg(group_radius=0.01), None)([tight])
    assert "Group 1: cup/white ceramic cup\nGroup 2: saucer\nGroup 3: spoon" in tight.fields["scene_graph"]


def test_scene_graph_caps_attributed_first_and_falls_back_to_floating_objects():
    rec = make_record()
    SceneGraphStage(make_cfg(max_objects=2), None)([rec])
    assert rec.fields["scene_graph"].startswith(
        "Immediate foreground:\nGroup 1: cup/white ceramic cup\nBackground:\nGroup 2: dining table/wooden table"
    )  # two objects only: n = 0 and 1 after normalising their own depths
    assert "saucer (group" not in rec.fields["scene_graph"]  # target not shown: label only
    assert "-> cup (group 1), saucer" in rec.fields["scene_graph"]
    kite = make_obj(9, [0, 0, 10, 10], "kite", 1.0)
    floating = make_record(
        objects=[], floating_objects=[kite], short_captions=[], relationships=None, landmark=None
    )
    SceneGraphStage(make_cfg(), None)([floating])
    assert floating.fields["scene_graph"] == "Foreground:\nGroup 1: kite"  # one depth: n = 0.5


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("mentioned", "name", "expected"),
    [
        ("red tomatoes", "tomato", True), ("woman", "person", True), ("the men", "person", True),
        ("glasses", "glass", True), ("table", "dining table", True), ("wooden table", "table", True),
        ("berries", "berry", True), ("buses", "bus", True), ("dragon", "table", False), ("the", "table", False),
    ],
)  # fmt: skip
def test_names_match(mentioned: str, name: str, expected: bool):
    assert names_match(mentioned, name) is expected


def test_checklist_parsing_and_object_issues():
    assert parse_checklist("Objects:\n- a cup\n* saucer.\n2. spoon\nnot a bullet") == [
        "a cup",
        "saucer",
        "spoon",
    ]
    assert parse_checklist("- cup\n- sau", complete=False) == ["cup"]
    assert object_issues(["cups", "Dragon", "dragon"], ["cup", "table"]) == [
        Issue("objects", "mentions 'Dragon', which is not in the scene graph")
    ]


def test_caption_issues():
    assert caption_issues(GOOD) == []
    assert count_sentences("It costs 3.5 euros. Really! Is it?") == 3
    assert caption_issues("One sentence only.") == [Issue("sentences", "has 1 sentence; it needs 2 to 4")]
    assert caption_issues("A cup. A saucer. A table. A lamp. A wall.") == [
        Issue("sentences", "has 5 sentences; it needs 2 to 4")
    ]
    assert caption_issues("A cup sits on a table. The saucer is") == [
        Issue("ending", "does not end with '.', '!' or '?'")
    ]
    meta = caption_issues("The scene graph shows a cup. Group 2 holds a table.")
    assert meta == [
        Issue("wording", "talks about the input instead of the photo ('scene graph')"),
        Issue("wording", "talks about the input instead of the photo ('Group 2')"),
    ]
    echo = caption_issues("The previous answer had these problems. A cup sits on a table.")
    assert Issue("wording", "talks about the input instead of the photo ('previous answer')") in echo


# ----------------------------------------------------------------------------- the loop


def test_caption_naming_an_absent_object_is_regenerated():
    script = {
        "dense_caption": [DRAGON],
        "dense_caption_regenerate": [GOOD],
        "dense_caption_verify": CHECKLISTS,
    }
    rec = make_record()
    llm = run_level3([rec], make_cfg({"script": script}))
    dense = rec.fields["dense_caption"]
    assert dense["caption"] == GOOD and dense["verified"] is True and dense["details"] == []
    first, second = dense["attempts"]
    assert (first["attempt"], first["passed"], first["text"]) == (1, False, DRAGON)
    assert first["issues"] == ["mentions 'dragon', which is not in the scene graph"]
    assert (second["attempt"], second["passed"], second["issues"]) == (2, True, [])
    assert first["finish_reason"] == "stop" and first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    # generate, check, regenerate (with the problem spelled out), check again.
    names = [call[0].prefix_key for call in llm.calls]
    assert names == [
        "dense_caption@2",
        "dense_caption_verify@1",
        "dense_caption_regenerate@2",
        "dense_caption_verify@1",
    ]
    assert "mentions 'dragon'" in llm.calls[2][0].messages[-1]["content"]
    assert llm.temperatures == [0.7, 0.0, 0.7, 0.0]
    assert [s["prompt"] for s in rec.fields["prompt_versions"]] == [
        "dense_caption", "dense_caption_verify", "dense_caption_regenerate",
    ]  # fmt: skip


def test_bad_generations_are_recorded_failures_and_each_round_is_one_batched_call():
    huge = [
        make_obj(100 + k, [k, k, k + 5, k + 5], f"thing{k}", float(k), (f"a long description {k}",))
        for k in range(300)
    ]
    recs = [
        make_record("ok", objects=table_objects()),
        make_record("empty", objects=[table_objects()[k] for k in (0, 2, 3)]),
        make_record("cut", objects=table_objects()[:2] + table_objects()[3:4]),
        make_record("huge", objects=huge),
    ]
    script = {
        "dense_caption": {
            "spoon\nForeground": [GOOD],  # "ok" only: the others lack the spoon or the table layer
            "Group 2: spoon": [""],
            "dining table": [{"text": "A white cup stands on", "finish_reason": "length"}],
        },
        "dense_caption_regenerate": [GOOD],
        "dense_caption_verify": {**CHECKLISTS, "stands on\n": ["- white cup"]},
    }
    llm = run_level3(recs, make_cfg({"script": script, "context_length": 2000}, max_objects=400))
    assert [len(call) for call in llm.calls] == [4, 2, 3, 2, 1]  # gen, check, regen, check, regen
    ok, empty, cut, huge_rec = (r.fields["dense_caption"] for r in recs)
    assert (ok["verified"], len(ok["attempts"])) == (True, 1)
    assert empty["attempts"][0]["issues"] == ["the answer was empty"] and empty["verified"]
    assert (
        cut["attempts"][0]["issues"][0]
        == "the answer was cut off before it finished (finish_reason 'length')"
    )
    assert "does not end with '.', '!' or '?'" in cut["attempts"][0]["issues"] and cut["verified"]
    assert huge_rec["verified"] is False and huge_rec["caption"] == ""
    assert [a["finish_reason"] for a in huge_rec["attempts"]] == ["error"] * 3
    assert "exceeds context 2000" in huge_rec["attempts"][0]["issues"][0]
    # Answers that were empty or cut off keep their rows; one that never generated is an error row.
    assert [r.ok for r in recs] == [True, True, True, False]
    assert recs[3].error_stage == "dense_caption"
    assert recs[3].error == (
        "generation failed: prompt of "
        f"{huge_rec['attempts'][2]['prompt_tokens']} tokens + 200 new exceeds context 2000"
        " (no answer after 3 attempts)"
    )


def test_a_generation_error_is_never_an_ok_row_with_an_empty_caption():
    """Errors on every attempt -> error row naming the error; an error then an answer -> ok with
    that answer; an empty answer the model did write (no error) stays an ok, unverified row."""
    failed = {"text": "", "finish_reason": "error", "error": "engine crashed"}
    script = {
        "dense_caption": {"Group 2: spoon": [failed], "dining table": [failed], "saucer": [""]},
        "dense_caption_regenerate": {"Group 2: spoon": [failed], "dining table": [GOOD], "saucer": [""]},
        "dense_caption_verify": CHECKLISTS,
    }
    broken = make_record("broken")  # has the spoon group
    recovers = make_record("recovers", objects=table_objects()[:2] + table_objects()[3:4])
    silent = make_record("silent", objects=table_objects()[:2])
    run_level3([broken, recovers, silent], make_cfg({"script": script}, max_attempts=2))
    assert (broken.ok, broken.error_stage) == (False, "dense_caption")
    assert broken.error == "generation failed: engine crashed (no answer after 2 attempts)"
    assert [a["issues"] for a in broken.fields["dense_caption"]["attempts"]] == [
        ["generation failed: engine crashed"]
    ] * 2
    assert broken.backends == []  # a failed record is not stamped with the stage's models
    dense = recovers.fields["dense_caption"]
    assert recovers.ok and dense["caption"] == GOOD and dense["verified"] is True
    assert dense["attempts"][0]["finish_reason"] == "error"
    assert silent.ok and silent.fields["dense_caption"]["caption"] == ""
    assert silent.fields["dense_caption"]["attempts"][0]["issues"] == ["the answer was empty"]


def test_always_failing_llm_keeps_every_row_unverified():
    recs = [make_record("a"), make_record("b")]
    llm = run_level3(recs, make_cfg({"always_fail": True}, max_attempts=3))
    for rec in recs:
        dense = rec.fields["dense_caption"]
        assert rec.ok and dense["verified"] is False
        assert [a["attempt"] for a in dense["attempts"]] == [1, 2, 3]
        assert not any(a["passed"] for a in dense["attempts"])
        assert dense["caption"] == "A cup stands on"  # the best attempt: ties go to the latest
    assert [len(call) for call in llm.calls] == [2] * 6


def test_empty_scene_graph_skips_the_llm():
    rec = make_record(objects=[], short_captions=[], relationships=None, landmark=None)
    llm = run_level3([rec], make_cfg({"always_fail": True}))
    assert rec.fields["scene_graph"] == "" and llm.calls == []
    assert rec.fields["dense_caption"] == {"caption": "", "details": [], "verified": False, "attempts": []}


# ----------------------------------------------------------------------------- the row


def full_row(rec: ImageRecord, level: int) -> dict[str, Any]:
    """Common columns + every earlier level's columns (as the runner carries them) + this level's."""
    spec = LEVELS.get(str(level))
    common = {f.name for f in COMMON_FIELDS}
    row = {
        "image_id": rec.image_id, "shard_id": rec.shard_id, "file_name": "x.jpg", "width": rec.width,
        "height": rec.height, "status": rec.status, "error": rec.error, "error_stage": rec.error_stage,
        "provenance": {"config_hash": "t", "backends": rec.backends, "prompt_versions": rec.fields.get("prompt_versions", [])},
    }  # fmt: skip
    row.update({f.name: rec.fields.get(f.name) for f in level_schema(level - 1) if f.name not in common})
    row.update(spec.to_row(rec))
    return row


def test_level3_rows_match_the_schema():
    script = {"dense_caption": [GOOD], "dense_caption_verify": CHECKLISTS}
    good, bad = make_record("good"), make_record("bad")
    run_level3([good, bad], make_cfg({"script": script}))
    good.fields["dense_caption"]["details"] = [
        {"phrase": "A white cup", "tokens_positive": [0, 11], "ids": [1], "method": "exact"}
    ]
    good.fields["short_captions_grounded"] = [{"caption": "a cup of coffee on a table", "details": []}]
    bad.fail("dense_caption", "boom")
    table = pa.Table.from_pylist([full_row(good, 3), full_row(bad, 3)], schema=level_schema(3))
    rows = table.to_pylist()
    assert rows[0]["dense_caption"]["verified"] is True
    assert rows[0]["dense_caption"]["details"][0]["tokens_positive"] == [0, 11]
    assert rows[0]["provenance"]["prompt_versions"][0] == {"prompt": "dense_caption", "version": "2"}
    assert (rows[1]["scene_graph"], rows[1]["dense_caption"], rows[1]["short_captions_grounded"]) == (
        "",
        None,
        [],
    )
    spec = LEVELS.get("3")
    assert spec.needs_pixels is False and [s.name for s in spec.stages][:2] == [
        "scene_graph",
        "dense_caption",
    ]


# ----------------------------------------------------------------------------- opener (lite)


def test_lead_is_a_person_when_one_is_shown_else_the_most_confident_object():
    from levels.level3.scene_graph import lead_phrase

    cup, table, man = (make_obj(1, [0, 0, 9, 9], "cup", 1.0), make_obj(2, [0, 0, 9, 9], "table", 1.0),
                       make_obj(3, [0, 0, 9, 9], "man", 1.0))  # fmt: skip
    cup["score"], table["score"], man["score"] = 0.5, 0.8, 0.3
    people = ["person", "man", "woman"]
    assert lead_phrase([cup, table], people) == "A table"
    assert lead_phrase([cup, table, man], people) == "A man"
    assert lead_phrase([make_obj(4, [0, 0, 9, 9], "apple", 1.0)], people) == "An apple"
    assert lead_phrase([], people) == ""


def test_opener_starts_the_answer_and_is_kept_in_the_caption_and_attempts():
    script = {
        "dense_caption_opener": ["with white ceramic sides stands on a saucer. The saucer rests on a wooden table."],
        "dense_caption_verify": CHECKLISTS,
    }
    rec = make_record()
    llm = run_level3([rec], make_cfg({"script": script}, opener=True, first_temperature=0.0))
    dense = rec.fields["dense_caption"]
    # table_objects() all score 0.9 and none is a person: the lowest id wins the tie (the cup).
    expected = "A cup with white ceramic sides stands on a saucer. The saucer rests on a wooden table."
    assert dense["caption"] == expected and dense["attempts"][0]["text"] == expected
    first = llm.calls[0][0]
    assert first.prefix_key.startswith("dense_caption_opener@")
    assert first.messages[-1] == {"role": "assistant", "content": "A cup"}
    assert llm.temperatures[0] == 0.0  # greedy first attempt
    assert {"prompt": "dense_caption_opener", "version": "2"} in rec.fields["prompt_versions"]
