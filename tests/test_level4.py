"""Level 4 (additional context) and the shared verify/regenerate loop of ``levels.verify``."""

from __future__ import annotations

import pyarrow as pa
import pytest

from grand_pipeline.config import GrandConfig
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.models.roles import ChatPrompt, Generation
from grand_pipeline.schemas import level_schema
from grand_pipeline.stage import ImageRecord
from levels.base import LEVELS
from levels.level4.context import AdditionalContextStage, context_issues, simple_graph
from levels.verify import Issue, Outcome, best_attempt, run_verified
from tests.test_level3 import full_row, make_cfg, make_obj, make_record

CONTEXT = (
    "Coffee has been brewed for more than five centuries, starting in Yemen. "
    "Cafes became meeting places for merchants and writers across Europe. "
    "A saucer once served to cool hot coffee before it was sipped. "
    "Hot drinks cause many kitchen burns, especially among small children. "
    "Ceramic cups keep heat well and are easy to clean. "
    "Today coffee is one of the most traded farm products in the world."
)
SCENIC = CONTEXT.replace("Cafes became", "This scene shows how cafes became")


def run_level4(records: list[ImageRecord], cfg: GrandConfig):
    hub = ModelHub(cfg.models, cfg.plugins)
    AdditionalContextStage(cfg, hub)(records)
    return hub.get("llm")


def test_simple_graph_reuses_the_entries_and_landmark_of_level3():
    objects = [
        make_obj(1, [0, 0, 5, 5], "cup", None, ("white cup",)),
        make_obj(2, [0, 0, 5, 5], "saucer", 1.0),
    ]
    objects.append(make_obj(3, [0, 0, 5, 5], "cup", 2.0, ("white cup",)))
    rec = make_record(objects=objects)
    # Depth is not needed here; duplicates are listed once; attributed entries come first.
    assert simple_graph(rec.fields, 30) == "cup/white cup, saucer\nLandmark: Indoor, Living space"
    assert simple_graph(rec.fields, 1) == "cup/white cup\nLandmark: Indoor, Living space"
    assert simple_graph(make_record(objects=[], landmark=None).fields, 30) == ""


def test_context_issues():
    assert context_issues(CONTEXT, 5, 7) == []
    assert context_issues(SCENIC, 5, 7) == [Issue("wording", "uses a forbidden word ('scene')")]
    two = CONTEXT.replace("Cafes", "\n\nCafes")
    assert context_issues(two, 5, 7) == [Issue("paragraphs", "is more than one paragraph")]
    assert context_issues("Short. Very short.", 5, 7) == [Issue("sentences", "has 2 sentences; it needs 5 to 7")]
    assert context_issues(CONTEXT + " These objects", 5, 7) == [
        Issue("ending", "does not end with '.', '!' or '?'"),
        Issue("wording", "uses a forbidden word ('objects')"),
    ]
    # Small models echo the regeneration prompt back (the lite demo's astronaut did).
    echo = "The previous answer had these problems: is more than one paragraph. " + CONTEXT
    assert Issue("wording", "uses a forbidden word ('previous answer')") in context_issues(echo, 5, 8)


def test_answer_using_a_forbidden_word_is_regenerated():
    script = {"additional_context": [SCENIC], "additional_context_regenerate": [CONTEXT]}
    rec = make_record()
    llm = run_level4([rec], make_cfg({"script": script}))
    context = rec.fields["additional_context"]
    assert context["text"] == CONTEXT and context["verified"] is True
    assert [(a["attempt"], a["passed"]) for a in context["attempts"]] == [(1, False), (2, True)]
    assert context["attempts"][0]["issues"] == ["uses a forbidden word ('scene')"]
    assert [call[0].prefix_key for call in llm.calls] == [
        "additional_context@1",
        "additional_context_regenerate@1",
    ]
    assert llm.calls[0][0].max_new_tokens == 320
    assert "Landmark: Indoor, Living space" in llm.calls[0][0].messages[-1]["content"]
    assert [s["prompt"] for s in rec.fields["prompt_versions"]] == [
        "additional_context",
        "additional_context_regenerate",
    ]


def test_always_failing_llm_gives_unverified_rows_that_match_the_schema():
    recs = [make_record("a"), make_record("b"), make_record("c", objects=[], landmark=None)]
    llm = run_level4(recs, make_cfg({"always_fail": True}))
    assert [len(call) for call in llm.calls] == [2, 2, 2]  # "c" has nothing to write about
    for rec in recs[:2]:
        context = rec.fields["additional_context"]
        assert context["verified"] is False and len(context["attempts"]) == 3
    assert recs[2].fields["additional_context"] == {"text": "", "verified": False, "attempts": []}
    for rec in recs:  # level-3 columns as the runner would carry them
        rec.fields.update(scene_graph="g", dense_caption=None, short_captions_grounded=[])
    recs[2].fail("additional_context", "boom")
    rows = pa.Table.from_pylist([full_row(r, 4) for r in recs], schema=level_schema(4)).to_pylist()
    assert rows[0]["additional_context"]["attempts"][2]["attempt"] == 3
    assert rows[2]["additional_context"] is None
    assert LEVELS.get("4").needs_pixels is False


def test_a_failed_generation_makes_an_error_row_not_an_empty_context():
    failed = {"text": "", "finish_reason": "error", "error": "prompt could not be tokenised: no template"}
    script = {
        "additional_context": {"spoon": [failed], "lamp": [CONTEXT]},
        "additional_context_regenerate": {"spoon": [failed]},
    }
    broken = make_record("broken")
    fine = make_record("fine", objects=[make_obj(1, [0, 0, 5, 5], "lamp", 1.0)])
    run_level4([broken, fine], make_cfg({"script": script}))
    assert (broken.ok, broken.error_stage) == (False, "additional_context")
    assert broken.error == (
        "generation failed: prompt could not be tokenised: no template (no answer after 3 attempts)"
    )
    assert fine.ok and fine.fields["additional_context"]["text"] == CONTEXT
    for rec in (broken, fine):  # level-3 columns as the runner would carry them
        rec.fields.update(scene_graph="g", dense_caption=None, short_captions_grounded=[])
    rows = [full_row(r, 4) for r in (broken, fine)]
    table = pa.Table.from_pylist(rows, schema=level_schema(4)).to_pylist()
    assert table[0]["status"] == "error" and table[0]["additional_context"] is None
    assert table[1]["status"] == "ok" and table[1]["additional_context"]["verified"] is True


def test_outcome_generation_error_only_when_no_text_came_out():
    def attempt(n: int, text: str, finish: str, issues: list[str]) -> dict:
        return {"attempt": n, "text": text, "passed": not issues, "issues": issues, "finish_reason": finish}

    boom = attempt(1, "", "error", ["generation failed: boom"])
    assert Outcome("", False, [boom]).generation_error == "generation failed: boom"
    assert Outcome("ok.", False, [boom, attempt(2, "ok.", "stop", ["x"])]).generation_error is None
    assert Outcome("", False, [attempt(1, "", "stop", ["the answer was empty"])]).generation_error is None
    assert Outcome("", False, []).generation_error is None


# ----------------------------------------------------------------------------- levels.verify


def gen(text: str, finish: str = "stop") -> Generation:
    return Generation(text=text, finish_reason=finish, prompt_tokens=3, completion_tokens=1)


def test_loop_batches_only_the_failing_items_and_passes_their_problems_on():
    answers = {0: ["good"], 1: ["bad", "bad", "good"], 2: ["bad", "worse", "worse"]}
    seen: list[tuple[int, list[str] | None]] = []
    batches: list[list[int]] = []

    def prompt(i: int, issues: list[str] | None) -> ChatPrompt:
        seen.append((i, issues))
        return ChatPrompt(messages=[{"role": "user", "content": str(i)}])

    def generate(prompts: list[ChatPrompt], attempt: int) -> list[Generation]:
        batches.append([int(p.messages[0]["content"]) for p in prompts])
        return [gen(answers[int(p.messages[0]["content"])][attempt - 1]) for p in prompts]

    bad, worse = Issue("ending", "b"), [Issue("wording", "w1"), Issue("wording", "w2")]

    def verify(items: list[int], gens: list[Generation]) -> list[list[Issue]]:
        return [{"good": [], "bad": [bad], "worse": worse}[g.text] for g in gens]

    out = run_verified(3, prompt, generate, verify, max_attempts=3)
    assert batches == [[0, 1, 2], [1, 2], [1, 2]]
    assert seen[3:5] == [(1, ["b"]), (2, ["b"])]  # the prompt gets the messages
    assert [(o.text, o.verified, len(o.attempts)) for o in out] == [
        ("good", True, 1),
        ("good", True, 3),
        ("bad", False, 3),
    ]
    assert out[2].attempts[2]["issues"] == ["w1", "w2"]  # stored as strings: the schema is unchanged
    assert out[2].failed_checks == [["ending"], ["wording"], ["wording"]]


def test_best_attempt_prefers_fewest_issues_then_latest_and_any_text_over_none():
    def attempt(n: int, text: str, issues: list[str]) -> dict:
        return {"attempt": n, "text": text, "passed": not issues, "issues": issues}

    assert best_attempt([attempt(1, "a", ["x"]), attempt(2, "b", ["x", "y"])])["attempt"] == 1
    assert best_attempt([attempt(1, "a", ["x"]), attempt(2, "b", ["y"])])["attempt"] == 2
    assert best_attempt([attempt(1, "a", ["x", "y"]), attempt(2, "", ["empty"])])["attempt"] == 1
    with pytest.raises(ValueError):
        run_verified(1, lambda i, issues: ChatPrompt([]), lambda p, a: [], lambda i, g: [], max_attempts=0)
