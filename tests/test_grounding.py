"""Caption grounding (levels.caption_grounding) and its level-3 stage: the three passes, clean-up, offsets."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from grand_pipeline.config import ModelSpec
from grand_pipeline.models.roles import Phrase, PhraseExtractor, TextEmbedder
from grand_pipeline.schemas import DETAIL
from grand_pipeline.stage import ImageRecord
from levels.caption_grounding import CaptionGrounder, ground_caption, label_matches, object_text
from levels.level3.ground import SHORT_CAPTIONS_GROUNDED, GroundCaptionsStage

# ----------------------------------------------------------------------------- fakes


class FakeExtractor(PhraseExtractor):
    """Phrases are the given chunk strings wherever they occur (case-insensitive); the root is
    the last word minus a plural "s"; nouns are the given noun strings."""

    role, backend = "phrase_extractor", "fake_phrases"

    def __init__(self, chunks: list[str], nouns: list[str] | None = None) -> None:
        super().__init__(ModelSpec("fake_phrases"))
        self.chunks, self.noun_words = chunks, nouns or []
        self.calls: list[list[str]] = []

    @staticmethod
    def _find(text: str, words: list[str]) -> list[Phrase]:
        found = []
        for word in words:
            for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE):
                root = m.group().split()[-1].lower()
                found.append(Phrase(m.group(), m.start(), m.end(), root[:-1] if root.endswith("s") else root))
        return sorted(found, key=lambda p: p.start)

    def phrases(self, texts: list[str]) -> list[list[Phrase]]:
        self.calls.append(list(texts))
        return [self._find(t, self.chunks) for t in texts]

    def nouns(self, text: str) -> list[Phrase]:
        return self._find(text, self.noun_words)


class FakeEmbedder(TextEmbedder):
    """Texts of one synonym group share a unit vector; every other text gets its own axis."""

    role, backend = "text_embedder", "fake_embed"

    def __init__(self, groups: list[set[str]] | None = None, dim: int = 64) -> None:
        super().__init__(ModelSpec("fake_embed"))
        self.axis = {text: i for i, group in enumerate(groups or []) for text in group}
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            out[row, self.axis.setdefault(text, len(self.axis) + 32)] = 1.0
        return out


class FakeHub:
    def __init__(self, **backends: Any) -> None:
        self.backends = backends

    def get(self, key: str) -> Any:
        return self.backends[key]


def obj(
    oid: int, label: str, attribute: str = "", bbox=(0, 0, 10, 10), labels: list[str] | None = None
) -> dict:
    return {
        "id": oid,
        "bbox": list(bbox),
        "labels": labels or [label],
        "label": label,
        "attributes": [attribute] if attribute else [],
    }


def check(caption: str, details: list[dict], objects: list[dict]) -> None:
    """The invariants every detail must meet, whatever the pass."""
    ids = {o["id"] for o in objects}
    for d in details:
        s, e = d["tokens_positive"]
        assert caption[s:e] == d["phrase"], d
        assert d["ids"] and set(d["ids"]) <= ids, d
        assert d["method"] in ("exact", "embedding", "noun")
    starts = [tuple(d["tokens_positive"]) for d in details]
    assert starts == sorted(starts)


def spans(details: list[dict]) -> list[tuple[str, list[int], str]]:
    return [(d["phrase"], d["ids"], d["method"]) for d in details]


def ground(
    caption: str,
    objects: list[dict],
    relationships=None,
    chunks=(),
    nouns=(),
    groups=None,
    threshold: float = 0.75,
) -> list[dict]:
    details = ground_caption(
        caption,
        objects,
        relationships or [],
        FakeExtractor(list(chunks), list(nouns)),
        FakeEmbedder(groups),
        threshold,
    )
    check(caption, details, objects)
    return details


# ----------------------------------------------------------------------------- exact


def test_exact_match_keeps_original_case_and_every_occurrence():
    caption = "A White Cup sits next to a laptop. The white cup is full."
    objects = [obj(1, "cup", "white cup"), obj(2, "laptop", "silver laptop")]
    rels = {"grounding": [{"phrase": "a laptop", "object_ids": [2]}]}
    details = ground(caption, objects, rels)
    assert spans(details) == [
        ("White Cup", [1], "exact"),
        ("a laptop", [2], "exact"),
        ("white cup", [1], "exact"),
    ]
    assert details[0]["tokens_positive"] == [2, 11]


def test_exact_match_is_whole_word_cups_is_not_cup():
    caption = "Two cups in the cupboard; a cup."
    details = ground(caption, [obj(1, "cup", "cup")])
    assert spans(details) == [("cup", [1], "exact")]
    assert details[0]["tokens_positive"] == [caption.index("a cup") + 2, len(caption) - 1]


@pytest.mark.parametrize(
    "caption",
    [
        "İstanbul: a RED cup, a red cup; red cups!",  # "İ".lower() is two characters long
        "The red  cup (red cup) and 'red cup'.",  # double space, brackets, quotes
        "red cup",
        "Red Cup, red-cup, redcup, red cup's handle.",
    ],
)
def test_offsets_hold_on_tricky_captions(caption):
    details = ground(caption, [obj(1, "cup", "red cup")])
    assert details, caption
    assert all(d["phrase"].lower().split() == ["red", "cup"] for d in details)


def test_same_attribute_on_two_objects_is_one_ambiguous_mention():
    caption = "a blue chair and a sofa"
    details = ground(caption, [obj(3, "chair", "blue chair"), obj(5, "chair", "blue chair")])
    assert spans(details) == [("blue chair", [3, 5], "exact")]


def test_relationship_ids_that_name_no_object_are_dropped():
    objects = [obj(1, "dog", "brown dog")]
    rels = [{"phrase": "two dogs", "object_ids": [1, 99]}, {"phrase": "a cat", "object_ids": [42]}]
    details = ground("two dogs and a cat", objects, rels)
    assert spans(details) == [("two dogs", [1], "exact")]


# ----------------------------------------------------------------------------- embedding


def test_embedding_pass_grounds_synonyms_above_threshold_only():
    caption = "A coffee mug rests on the desk near a plant."
    objects = [obj(1, "cup", "white cup"), obj(2, "potted plant", "green potted plant")]
    details = ground(
        caption, objects, chunks=["coffee mug", "the desk", "a plant"], groups=[{"coffee mug", "white cup"}]
    )
    # "a plant" shares no vector with anything: below threshold, and no noun given either.
    assert spans(details) == [("coffee mug", [1], "embedding")]


def test_embedding_targets_include_relationship_phrases():
    objects = [obj(1, "person", "man"), obj(2, "person", "woman")]
    rels = [{"phrase": "a couple", "object_ids": [2, 1]}]
    details = ground(
        "Two people walk.", objects, rels, chunks=["Two people"], groups=[{"Two people", "a couple"}]
    )
    assert spans(details) == [("Two people", [1, 2], "embedding")]


def test_chunks_overlapping_an_exact_match_are_not_regrounded():
    extractor, embedder = FakeExtractor(["a red cup"]), FakeEmbedder([{"a red cup", "saucer"}])
    objects = [obj(1, "cup", "red cup"), obj(2, "saucer", "")]
    details = ground_caption("a red cup", objects, [], extractor, embedder, 0.75)
    assert spans(details) == [("red cup", [1], "exact")]


def test_object_text_joins_attribute_and_label_without_repeating():
    assert object_text(obj(1, "cup", "white cup")) == "white cup"
    assert object_text(obj(1, "cup", "white")) == "white cup"
    assert object_text({"id": 1, "labels": ["dog"], "label": None, "attributes": []}) == "dog"


# ----------------------------------------------------------------------------- noun fallback


def test_noun_fallback_plural_and_single_hit():
    objects = [obj(1, "glass", "", labels=["glass", "cup"]), obj(2, "table", "")]
    details = ground(
        "Two glasses stand here.", objects, chunks=["Two glasses"], nouns=["glasses"], threshold=0.99
    )
    assert spans(details) == [("Two glasses", [1], "noun")]
    assert (
        label_matches("Cups", "cup")
        and label_matches("boxes", "box")
        and not label_matches("cupboard", "cup")
    )


def test_noun_fallback_two_hits_takes_the_outer_box_or_skips():
    outer, inner, apart = (0, 0, 100, 100), (10, 10, 50, 50), (200, 200, 300, 300)
    nested = [obj(4, "person", "", inner), obj(7, "person", "", outer)]
    found = ground("A person waves.", nested, chunks=["A person"], nouns=["person"])
    assert spans(found) == [("A person", [7], "noun")]
    side_by_side = [obj(4, "person", "", inner), obj(7, "person", "", apart)]
    assert ground("A person waves.", side_by_side, chunks=["A person"], nouns=["person"]) == []
    three = nested + [obj(9, "person", "", apart)]
    assert ground("A person waves.", three, chunks=["A person"], nouns=["person"]) == []


# ----------------------------------------------------------------------------- clean-up and contract


def test_contained_span_with_same_ids_is_dropped_other_ids_kept():
    objects = [obj(1, "shirt", "red shirt"), obj(2, "person", "man")]
    rels = [
        {"phrase": "the red shirt", "object_ids": [1]},
        {"phrase": "a man in the red shirt", "object_ids": [2]},
    ]
    details = ground("He is a man in the red shirt.", objects, rels)
    assert spans(details) == [("a man in the red shirt", [2], "exact"), ("the red shirt", [1], "exact")]


def test_phrases_with_wrong_offsets_are_ignored():
    class Broken(FakeExtractor):
        def phrases(self, texts):
            return [[Phrase("coffee mug", 0, 10, "mug")] for _ in texts]  # offsets off by two

    details = ground_caption(
        "A coffee mug.",
        [obj(1, "cup", "white cup")],
        [],
        Broken([]),
        FakeEmbedder([{"coffee mug", "white cup"}]),
        0.75,
    )
    assert details == []


def test_no_objects_or_empty_caption_gives_no_details():
    assert ground("a red cup", []) == []
    assert ground("", [obj(1, "cup", "red cup")]) == []


def test_target_embeddings_are_computed_once_per_image():
    class Counting(FakeEmbedder):
        calls = 0

        def embed(self, texts):
            Counting.calls += 1
            return super().embed(texts)

    grounder = CaptionGrounder(
        [obj(1, "cup", "white cup")],
        [],
        FakeExtractor(["coffee mug"]),
        Counting([{"coffee mug", "white cup"}]),
        0.75,
    )
    for _ in range(3):
        assert spans(grounder.ground("a coffee mug")) == [("coffee mug", [1], "embedding")]
    assert Counting.calls == 1 + 3  # targets once, the caption's chunks once per caption


# ----------------------------------------------------------------------------- stage


def test_stage_fills_dense_details_and_short_captions_grounded(tiny_cfg):
    extractor = FakeExtractor(["coffee mug", "the dog"], nouns=["dog"])
    hub = FakeHub(phrase_extractor=extractor, text_embedder=FakeEmbedder([{"coffee mug", "white cup"}]))
    stage = GroundCaptionsStage(tiny_cfg, hub)

    def fields(objects: list[dict]) -> dict[str, Any]:
        return {
            "dense_caption": {
                "caption": "A coffee mug beside the dog.",
                "details": [],
                "verified": True,
                "attempts": [],
            },
            "short_captions": [{"caption": "a white cup", "source": "x"}, {"caption": "", "source": "y"}],
            "objects": objects,
            "floating_objects": [obj(2, "dog", "", labels=["dog"])],
            "relationships": {"grounding": []},
        }

    records = [
        ImageRecord("sa_1", "s", fields=fields([obj(1, "cup", "white cup")])),
        ImageRecord("sa_2", "s", fields=fields([])),
    ]
    stage(records)
    assert all(r.ok for r in records), [r.error for r in records]
    assert len(extractor.calls) == 1  # one batched phrases() call for the micro-batch
    first = records[0].fields
    assert spans(first["dense_caption"]["details"]) == [
        ("coffee mug", [1], "embedding"),
        ("the dog", [2], "noun"),
    ]
    assert [spans(s["details"]) for s in first["short_captions_grounded"]] == [
        [("white cup", [1], "exact")],
        [],
    ]
    assert spans(records[1].fields["dense_caption"]["details"]) == [("the dog", [2], "noun")]
    # The provided column and the filled details conform to their declared Arrow types.
    pa.array([r.fields["short_captions_grounded"] for r in records], type=SHORT_CAPTIONS_GROUNDED)
    pa.array(first["dense_caption"]["details"], type=DETAIL)
    assert GroundCaptionsStage.provides == {"short_captions_grounded": SHORT_CAPTIONS_GROUNDED}


# ----------------------------------------------------------------------------- real backends


@pytest.fixture(scope="module")
def lite_text_models():
    from grand_pipeline.config import load_config
    from grand_pipeline.models.hub import ModelHub

    hub = ModelHub(load_config("lite").models)
    return hub.get("phrase_extractor"), hub.get("text_embedder")


@pytest.mark.slow
def test_real_backends_ground_a_dense_caption(lite_text_models):
    extractor, embedder = lite_text_models
    caption = (
        "A White cup of coffee sits on a wooden dining table, next to several spoons. "
        "The cups, the table and the spoons: all in warm light."
    )
    objects = [
        obj(1, "cup", "white cup", (100, 100, 200, 200)),
        obj(2, "dining table", "brown dining table", (0, 150, 600, 400)),
        obj(3, "spoon", "silver spoon", (220, 180, 260, 200)),
    ]
    details = ground_caption(caption, objects, [], extractor, embedder, 0.75)
    check(caption, details, objects)
    by_phrase = {d["phrase"]: d for d in details}
    assert by_phrase["White cup"]["ids"] == [1] and by_phrase["White cup"]["method"] == "exact"
    table = [d for d in details if "table" in d["phrase"]]
    assert table and all(d["ids"] == [2] for d in table)
    assert any(d["ids"] == [3] for d in details if "spoons" in d["phrase"])


@pytest.mark.slow
def test_real_backends_noun_fallback_and_offsets(lite_text_models):
    extractor, embedder = lite_text_models
    caption = "Several mugs; one MUG (blue) — and mugs again!"
    objects = [obj(4, "mug", "", (0, 0, 50, 50))]
    # Threshold above any cosine: only the noun pass can ground, and it must match the plural.
    details = ground_caption(caption, objects, [], extractor, embedder, 1.01)
    check(caption, details, objects)
    assert details and {d["method"] for d in details} == {"noun"}
    assert any(d["phrase"].endswith("mugs") for d in details)
