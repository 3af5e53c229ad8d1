"""Level 2: each stage driven directly with scripted fake backends; the lite backends on fakes and
(marked slow) on their real models.

Object ids, labels and relationships in the grounding tests are worked out by hand in comments,
so a change in matching, promotion or renumbering shows up as a readable diff.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from grand_pipeline.config import GrandConfig, Level2Config, ModelsConfig, ModelSpec, load_config
from grand_pipeline.geometry import rle
from grand_pipeline.models.backends.captioner_llm import LLMFromTagsCaptioner, clean_caption
from grand_pipeline.models.backends.embedding_grounder import EmbeddingGrounder, object_text, object_texts
from grand_pipeline.models.backends.embedding_labels import EmbeddingContextLabeller
from grand_pipeline.models.backends.embedding_landmark import DESCRIPTIONS, EmbeddingLandmarkClassifier
from grand_pipeline.models.roles import (
    LLM,
    Captioner,
    ChatPrompt,
    Generation,
    Grounder,
    Grounding,
    LabelAssigner,
    LandmarkClassifier,
    Phrase,
    PhraseExtractor,
    Segmenter,
    TextEmbedder,
)
from grand_pipeline.schemas import LEVEL1_FIELDS, level_schema
from grand_pipeline.stage import ImageRecord
from grand_pipeline.taxonomy import fine_categories
from levels.base import LEVELS
from levels.level2 import (
    LEVEL2,
    STAGES,
    CaptionStage,
    GroundingStage,
    LabelStage,
    LandmarkStage,
    ObjectMaskStage,
    PhraseStage,
    to_row,
)
from levels.level2.phrases import select_phrases
from levels.objects import OBJECT_KEYS, new_object
from prompts.base import get_prompt

H, W = 400, 600
IMAGE = np.zeros((H, W, 3), np.uint8)

# ----------------------------------------------------------------------------- fakes


class FakeHub:
    def __init__(self, **backends: Any) -> None:
        self.backends = backends

    def get(self, key: str) -> Any:
        return self.backends[key]


class FakeLLM(LLM):
    """Answers from a script (one Generation per prompt, in order); remembers every call."""

    role, backend = "llm", "fake_llm"

    def __init__(self, answers: list[Generation]) -> None:
        super().__init__(ModelSpec("fake_llm", model="fake-llm"))
        self.answers = answers
        self.calls: list[list[ChatPrompt]] = []

    def count_tokens(self, prompt: ChatPrompt) -> int:
        return sum(len(m["content"].split()) for m in prompt.messages)

    def generate(self, prompts, *, temperature=0.0, seed=0):
        self.calls.append(list(prompts))
        return self.answers[: len(prompts)]


class FakeCaptioner(Captioner):
    role, backend = "captioner", "fake_captioner"

    def __init__(self, captions: list[list[str]]) -> None:
        super().__init__(ModelSpec("fake_captioner"))
        self.captions = captions
        self.contexts: list[list[dict[str, Any]]] = []

    def caption(self, images, context):
        self.contexts.append(context)
        return self.captions[: len(images)]


class FakePhrases(PhraseExtractor):
    """Every occurrence of a known phrase is a Phrase; root = its last word."""

    role, backend = "phrase_extractor", "fake_phrases"

    def __init__(self, vocabulary: list[str], shift: int = 0) -> None:
        super().__init__(ModelSpec("fake_phrases"))
        self.vocabulary = vocabulary
        self.shift = shift  # a non-zero shift makes the offsets wrong on purpose

    def phrases(self, texts):
        out = []
        for text in texts:
            found = [
                Phrase(m.group(0), m.start() + self.shift, m.end() + self.shift, m.group(0).split()[-1])
                for v in self.vocabulary
                for m in re.finditer(re.escape(v), text)
            ]
            out.append(sorted(found, key=lambda p: p.start))
        return out


class FakeGrounder(Grounder):
    """Phrase -> scripted box (or None); remembers the objects it was shown."""

    role, backend = "grounder", "fake_grounder"

    def __init__(self, boxes: dict[str, list[float] | None]) -> None:
        super().__init__(ModelSpec("fake_grounder"))
        self.boxes = boxes
        self.seen: list[list[dict[str, Any]]] = []

    def ground(self, image, phrases, objects):
        self.seen.append([dict(o) for o in objects])  # as shown: the stage renumbers them later
        return [
            None if self.boxes.get(p) is None else Grounding(p, np.asarray(self.boxes[p], float), 0.8)
            for p in phrases
        ]


class FakeSegmenter(Segmenter):
    """Masks = the box interiors (or nothing, with ``empty``); remembers every call's boxes."""

    role, backend = "segmenter", "fake_segmenter"

    def __init__(self, empty: bool = False) -> None:
        super().__init__(ModelSpec("fake_segmenter"))
        self.empty = empty
        self.calls: list[np.ndarray] = []

    def segment(self, image, boxes):
        self.calls.append(np.asarray(boxes))
        masks = np.zeros((len(boxes), *image.shape[:2]), bool)
        if not self.empty:
            for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, int)):
                masks[k, y1:y2, x1:x2] = True
        return masks


class FakeAssigner(LabelAssigner):
    """Picks the candidate that occurs in the context, else the last one; or a scripted label."""

    role, backend = "label_assigner", "fake_assigner"

    def __init__(self, forced: str | None = None) -> None:
        super().__init__(ModelSpec("fake_assigner"))
        self.calls: list[tuple[np.ndarray, list[list[str]], str]] = []
        self.forced = forced

    def assign(self, image, boxes, candidates, context):
        self.calls.append((boxes, candidates, context))
        if self.forced:
            return [self.forced for _ in candidates]
        return [next((c for c in cands if c in context), cands[-1]) for cands in candidates]


class FakeLandmark(LandmarkClassifier):
    role, backend, heuristic = "landmark_classifier", "fake_landmark", True

    def __init__(self, answer: tuple[str, str, float]) -> None:
        super().__init__(ModelSpec("fake_landmark"))
        self.answer = answer
        self.texts: list[list[str]] = []

    def classify(self, images, texts):
        self.texts.append(list(texts))
        return [self.answer for _ in texts]


class BagOfWords(TextEmbedder):
    """Counts of known words (plus a constant "other" dimension), L2-normalised: cosine = overlap."""

    role, backend = "text_embedder", "bag_of_words"

    def __init__(self, vocabulary: list[str]) -> None:
        super().__init__(ModelSpec("bag_of_words", model="bow"))
        self.vocabulary = vocabulary
        self.calls = 0

    def embed(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), len(self.vocabulary) + 1), np.float32)
        for i, text in enumerate(texts):
            words = re.findall(r"[a-z]+", text.lower())
            for j, v in enumerate(self.vocabulary):
                out[i, j] = words.count(v)
            out[i, -1] = 0.1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- helpers


def make_cfg(**level2: Any) -> GrandConfig:
    spec = ModelSpec("fake")
    models = ModelsConfig(tagger=spec, detectors={}, segmenter=spec, depth=spec, region_captioner=spec)
    return GrandConfig(profile="tiny-lite", models=models, level2=Level2Config(**level2))


def obj(
    oid: int, box: list[float], labels: list[str], score: float = 0.9, models: tuple[str, ...] = ("det",)
) -> dict[str, Any]:
    out = new_object(box, list(labels), labels[0], score, list(models))
    out["id"] = oid
    return out


def record(image_id: str = "sa_1", **fields: Any) -> ImageRecord:
    base: dict[str, Any] = {
        "tags": [], "objects": [], "floating_objects": [], "prompt_versions": [], "depth_lowres": None,
    }  # fmt: skip
    base.update(fields)
    return ImageRecord(image_id=image_id, shard_id="sa_000000", width=W, height=H, image=IMAGE, fields=base)


def tags(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "score": 0.5} for n in names]


def captions(*texts: str) -> list[dict[str, str]]:
    return [{"caption": t, "source": "fake_captioner"} for t in texts]


def common_columns(rec: ImageRecord) -> dict[str, Any]:
    """The columns the engine writes around ``to_row`` (identity, status, provenance, level 1)."""
    return {
        "image_id": rec.image_id, "shard_id": rec.shard_id, "file_name": rec.file_name,
        "width": rec.width, "height": rec.height, "status": rec.status, "error": rec.error,
        "error_stage": rec.error_stage,
        "provenance": {"config_hash": "test", "backends": rec.backends,
                       "prompt_versions": rec.fields.get("prompt_versions", [])},
        "tags": rec.fields.get("tags", []), "floating_attributes": [], "depth_source": None,
        "depth_lowres": rec.fields.get("depth_lowres"),
    }  # fmt: skip


# ----------------------------------------------------------------------------- captions


def test_short_caption_prompt_lists_tags_and_objects():
    prompt = get_prompt("short_caption")
    assert prompt.stamp() == {"prompt": "short_caption", "version": "3"}
    chat = prompt.render(tags="street, car", objects="person")
    # system, two worked examples (user + assistant each), then this image's turn
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Use only the objects and tags" in chat.messages[0]["content"]
    assert chat.messages[-1]["content"] == "Tags: street, car\nObjects: person"
    assert chat.prefix_key == "short_caption@3"


def test_clean_caption_keeps_the_first_sentence_only():
    assert clean_caption('Caption: "A cup on a table." It is nice.\nMore') == "A cup on a table."
    assert clean_caption("  \n\n") == "" and clean_caption("a dog on grass") == "a dog on grass"


def test_llm_captioner_one_batched_call_and_no_caption_for_failures():
    llm = FakeLLM(
        [
            Generation("A cup of coffee on a table.\n", "stop"),
            Generation("", "error", error="prompt of 9000 tokens + 48 new exceeds context 2048"),
            Generation("   ", "stop"),
        ]
    )
    captioner = LLMFromTagsCaptioner(ModelSpec("llm_from_tags"), hub=FakeHub(llm=llm))
    context = [
        {"tags": ["cup", "table"], "objects": ["cup", "cup"]},
        {"tags": ["street"], "objects": []},
        {"tags": [], "objects": []},  # nothing to write from: the LLM is not asked
        {"tags": ["dog"], "objects": ["dog"]},
    ]
    out = captioner.caption([IMAGE] * 4, context)
    assert out == [["A cup of coffee on a table."], [], [], []]
    assert len(llm.calls) == 1 and len(llm.calls[0]) == 3
    assert llm.calls[0][0].messages[-1]["content"] == "Tags: cup, table\nObjects: cup"
    assert llm.calls[0][1].messages[-1]["content"] == "Tags: street\nObjects: none"
    assert captioner.heuristic and captioner.model_id == "llm_from_tags(fake-llm)"
    assert captioner.prompt_stamp() == {"prompt": "short_caption", "version": "3"}


def test_caption_stage_gives_voted_labels_and_stamps_the_prompt_once():
    llm = FakeLLM([Generation("A man holds a cup.", "stop"), Generation("", "error", error="boom")])
    captioner = LLMFromTagsCaptioner(ModelSpec("llm_from_tags"), hub=FakeHub(llm=llm))
    earlier = {"prompt": "other", "version": "3"}
    recs = [
        record(
            tags=tags("cup"),
            objects=[obj(0, [0, 0, 10, 10], ["person"]), obj(1, [5, 5, 20, 20], ["cup"])],
            floating_objects=[obj(2, [0, 0, 5, 5], ["vase"])],
            prompt_versions=[earlier],
        ),
        record("sa_2", tags=tags("street")),
    ]
    stage = CaptionStage(make_cfg(), FakeHub(captioner=captioner))
    stage(recs)
    assert all(r.ok for r in recs), [r.error for r in recs]
    assert recs[0].fields["short_captions"] == [{"caption": "A man holds a cup.", "source": "llm_from_tags"}]
    assert recs[1].fields["short_captions"] == []  # the failed generation left no caption
    # Floating objects are not offered to the captioner (single-model guesses).
    assert "vase" not in llm.calls[0][0].messages[-1]["content"]
    stamp = {"prompt": "short_caption", "version": "3"}
    assert recs[0].fields["prompt_versions"] == [earlier, stamp]
    assert recs[1].fields["prompt_versions"] == [stamp]
    assert recs[0].backends[0] == {
        "stage": "captions", "role": "captioner", "backend": "llm_from_tags",
        "model_id": "llm_from_tags(fake-llm)", "heuristic": True, "weights": "",
    }  # fmt: skip


# ----------------------------------------------------------------------------- phrases


def test_select_phrases_skips_repeats_and_stops_at_the_limit():
    texts = ["a cup and a man in a photo", "the Cup near a dog"]
    found = FakePhrases(["cup", "Cup", "man", "dog", "photo"]).phrases(texts)
    out = select_phrases(texts, found, limit=3)
    assert [(p["phrase"], p["caption_index"], p["start"], p["end"]) for p in out] == [
        ("cup", 0, 2, 5), ("man", 0, 12, 15), ("dog", 1, 15, 18),
    ]  # fmt: skip
    assert [p["phrase"] for p in select_phrases(texts, found, limit=1)] == ["cup"]


def test_phrase_stage_batches_captions_and_keeps_offsets_exact():
    extractor = FakePhrases(["red helmet", "cup", "coffee", "dog"])
    recs = [
        record(short_captions=captions("A man in a red helmet holds a cup of coffee.", "A cup.")),
        record("sa_2", short_captions=[]),
        record("sa_3", short_captions=captions("A dog.")),
    ]
    PhraseStage(make_cfg(max_phrases=16), FakeHub(phrase_extractor=extractor))(recs)
    assert all(r.ok for r in recs)
    first = recs[0].fields["phrases"]
    assert [p["phrase"] for p in first] == ["red helmet", "cup", "coffee"]
    caps = [c["caption"] for c in recs[0].fields["short_captions"]]
    for p in first:
        assert caps[p["caption_index"]][p["start"] : p["end"]] == p["phrase"]
    assert first[0]["root"] == "helmet"
    assert recs[1].fields["phrases"] == []
    assert recs[2].fields["phrases"] == [
        {"phrase": "dog", "caption_index": 0, "start": 2, "end": 5, "root": "dog"}
    ]


def test_phrase_stage_fails_the_image_on_wrong_offsets():
    rec = record(short_captions=captions("A cup."))
    PhraseStage(make_cfg(), FakeHub(phrase_extractor=FakePhrases(["cup"], shift=1)))([rec])
    assert not rec.ok and rec.error_stage == "phrases" and "is not caption[3:6]" in rec.error


# ----------------------------------------------------------------------------- grounding


def phrase(text: str, root: str | None = None) -> dict[str, Any]:
    return {
        "phrase": text,
        "caption_index": 0,
        "start": 0,
        "end": len(text),
        "root": root or text.split()[-1],
    }


def grounding_record() -> ImageRecord:
    return record(
        objects=[
            obj(0, [10, 10, 110, 210], ["person"]),  # A
            obj(1, [200, 200, 300, 300], ["cup"]),  # B
        ],
        floating_objects=[
            obj(2, [400, 50, 500, 150], ["bowl"]),  # C
            obj(3, [50, 300, 150, 390], ["plant"]),  # D
            obj(4, [500, 300, 590, 390], ["chair"]),  # F
        ],
        phrases=[
            phrase("cup"),
            phrase("red helmet"),
            phrase("sky"),
            phrase("hat"),
            phrase("vase"),
            phrase("bowl"),
        ],
    )


def test_grounding_links_votes_adds_promotes_and_renumbers_by_hand():
    grounder = FakeGrounder(
        {
            "cup": [202, 201, 300, 300],  # B (IoU 0.97)
            "red helmet": [20, 10, 60, 50],  # inside A but IoU 0.08 -> new floating E (id 5)
            "sky": None,
            "hat": [21, 11, 60, 50],  # E (IoU 0.95): E's labels become [helmet, hat]
            "vase": [52, 302, 150, 390],  # D (IoU 0.96): D's labels become [plant, vase]
            "bowl": [400, 52, 500, 150],  # C: "bowl" is already a label, but the grounder votes
        }
    )
    rec = grounding_record()
    originals = [dict(o, labels=list(o["labels"])) for o in rec.fields["floating_objects"]]
    GroundingStage(make_cfg(), FakeHub(grounder=grounder))([rec])
    assert rec.ok, rec.error
    # D and E have two distinct labels, C two distinct models (detector + grounder); they are
    # promoted in floating order (C, D, E): objects A0 B1 C2 D3 E4; floating F5.
    # Old -> new: 0->0 1->1 2->2 3->3 5->4 4->5.
    objects, floating = rec.fields["objects"], rec.fields["floating_objects"]
    assert [(o["id"], o["labels"]) for o in objects] == [
        (0, ["person"]), (1, ["cup"]), (2, ["bowl"]), (3, ["plant", "vase"]), (4, ["helmet", "hat"]),
    ]  # fmt: skip
    assert objects[2]["models"] == ["det", "grounder:fake_grounder"]
    assert [(o["id"], o["labels"]) for o in floating] == [(5, ["chair"])]
    assert rec.fields["relationships"] == {
        "grounding": [
            {"phrase": "cup", "object_ids": [1]},
            {"phrase": "red helmet", "object_ids": [4]},
            {"phrase": "sky", "object_ids": []},
            {"phrase": "hat", "object_ids": [4]},
            {"phrase": "vase", "object_ids": [3]},
            {"phrase": "bowl", "object_ids": [2]},
        ]
    }
    helmet = objects[4]
    assert set(helmet) == set(OBJECT_KEYS)
    assert helmet["label"] == "helmet" and helmet["bbox"] == [20.0, 10.0, 60.0, 50.0]
    assert helmet["attributes"] == ["red helmet"] and helmet["models"] == ["grounder:fake_grounder"]
    assert helmet["score"] == 0.8 and helmet["depth"] is None
    assert helmet["segmentation"] is None and helmet["segmentation_source"] is None
    # The grounder saw objects then floating objects; the input dicts were not changed.
    assert [o["labels"][0] for o in grounder.seen[0]] == ["person", "cup", "bowl", "plant", "chair"]
    assert [o["id"] for o in grounder.seen[0]] == [0, 1, 2, 3, 4]
    assert originals[1]["labels"] == ["plant"] and originals[1]["id"] == 3


def test_grounding_iou_is_strict_and_objects_win_over_floating():
    rec = record(
        objects=[obj(0, [0, 0, 100, 100], ["table"])],
        floating_objects=[obj(1, [0, 0, 90, 100], ["desk"])],
        phrases=[phrase("edge"), phrase("top"), phrase("board")],
    )
    grounder = FakeGrounder(
        {
            "edge": [0, 0, 75, 100],  # IoU 0.75 with the table: not > 0.75; 0.833 with the desk
            "top": [0, 0, 76, 100],  # 0.76 with the table, 0.84 with the desk: objects first
            "board": [0, 0, 60, 100],  # 0.6 and 0.667: matches nothing -> new floating object
        }
    )
    GroundingStage(make_cfg(grounding_iou=0.75), FakeHub(grounder=grounder))([rec])
    assert rec.ok, rec.error
    # The desk got "edge" as a vote -> [desk, edge] -> promoted: objects table0 desk1; floating board2.
    assert [(o["id"], o["labels"]) for o in rec.fields["objects"]] == [(0, ["table"]), (1, ["desk", "edge"])]
    assert [(o["id"], o["label"]) for o in rec.fields["floating_objects"]] == [(2, "board")]
    links = [g["object_ids"] for g in rec.fields["relationships"]["grounding"]]
    assert links == [[1], [0], [2]]


def test_grounding_without_phrases_still_promotes_and_renumbers():
    rec = record(
        objects=[obj(7, [0, 0, 10, 10], ["cup"])],
        floating_objects=[obj(3, [0, 0, 5, 5], ["a"]), obj(5, [5, 5, 9, 9], ["b", "c", "b"])],
        phrases=[],
    )
    grounder = FakeGrounder({})
    GroundingStage(make_cfg(promote_min_labels=2), FakeHub(grounder=grounder))([rec])
    assert grounder.seen == []  # no phrases: the grounder is not called
    assert [(o["id"], o["labels"][0]) for o in rec.fields["objects"]] == [(0, "cup"), (1, "b")]
    assert [(o["id"], o["labels"][0]) for o in rec.fields["floating_objects"]] == [(2, "a")]
    assert rec.fields["relationships"] == {"grounding": []}


def test_grounding_boxes_are_clipped_and_empty_ones_ignored():
    rec = record(phrases=[phrase("sun"), phrase("void"), phrase("nan")])
    grounder = FakeGrounder(
        {"sun": [500, -20, 700, 80], "void": [700, 10, 800, 50], "nan": [0, 0, np.nan, 5]}
    )
    GroundingStage(make_cfg(), FakeHub(grounder=grounder))([rec])
    assert rec.ok, rec.error
    ((sun_id,), (), ()) = [g["object_ids"] for g in rec.fields["relationships"]["grounding"]]
    (sun,) = rec.fields["floating_objects"]
    assert sun_id == sun["id"] == 0 and sun["bbox"] == [500.0, 0.0, 600.0, 80.0]  # W = 600


# ----------------------------------------------------------------------------- masks for new objects


def sa1b_mask(box: list[int]) -> dict[str, Any]:
    mask = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return rle.encode(mask)[0]


def lowres(values: list[list[float]]) -> dict[str, Any]:
    grid = np.asarray(values, np.float32)
    return {"height": grid.shape[0], "width": grid.shape[1], "values": grid.reshape(-1).tolist()}


def masks_record(**fields: Any) -> ImageRecord:
    """A 400x600 image whose low-res depth is 2x3 cells of 200x200 px: 1 2 3 / 4 5 6."""
    kept = obj(0, [200, 0, 400, 200], ["cup"])
    kept.update(segmentation=sa1b_mask([210, 10, 390, 190]), segmentation_source="sa1b", depth=0.25)
    base: dict[str, Any] = {
        "objects": [kept, obj(1, [0, 0, 200, 200], ["man", "person"], models=("grounder:g",))],
        "floating_objects": [obj(2, [400, 200, 600, 400], ["dog"], models=("grounder:g",))],
        "depth_lowres": lowres([[1, 2, 3], [4, 5, 6]]),
    }
    base.update(fields)
    return record(**base)


def test_object_masks_segment_only_objects_without_one_in_one_call():
    from pycocotools import mask as mask_utils

    rec = masks_record()
    before = [dict(o) for o in rec.fields["objects"] + rec.fields["floating_objects"]]
    segmenter = FakeSegmenter()
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=segmenter))([rec])
    assert rec.ok, rec.error
    (boxes,) = segmenter.calls  # one call for the image, the masked cup left out
    np.testing.assert_array_equal(boxes, [[0, 0, 200, 200], [400, 200, 600, 400]])
    kept, man = rec.fields["objects"]
    (dog,) = rec.fields["floating_objects"]
    assert kept == before[0]  # an existing mask and depth are not touched
    for new, box, depth in ((man, [0, 0, 200, 200], 1.0), (dog, [400, 200, 600, 400], 6.0)):
        assert new["segmentation_source"] == "segmenter:fake_segmenter"
        coco = {**new["segmentation"], "counts": new["segmentation"]["counts"].encode()}
        assert mask_utils.decode(coco).shape == (H, W) and mask_utils.area(coco) == 200 * 200
        assert mask_utils.toBbox(coco).tolist() == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
        assert new["depth"] == depth  # the median of the low-res cells under the mask
    # The record's old dicts were not changed: the stage works on copies.
    assert before[1]["segmentation"] is None and before[2]["depth"] is None
    assert rec.backends[-1]["stage"] == "object_masks" and rec.backends[-1]["role"] == "segmenter"


def test_object_masks_weigh_cells_by_mask_pixels_and_fall_back_to_the_box():
    # The man's box spans cells 1 and 2 of the top row (x 100..500, half of each outer cell).
    rec = masks_record(objects=[obj(1, [100, 0, 500, 200], ["man"])], floating_objects=[])
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=FakeSegmenter()))([rec])
    # Pixels: 100 x 200 on 1, 200 x 200 on 2, 100 x 200 on 3 -> median 2.
    assert rec.fields["objects"][0]["depth"] == 2.0
    # An empty mask is still stored (the segmenter's answer) and the depth comes from the box.
    empty = masks_record(objects=[], floating_objects=[obj(0, [400, 0, 600, 400], ["tree"])])
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=FakeSegmenter(empty=True)))([empty])
    (tree,) = empty.fields["floating_objects"]
    assert rle.decode_one(tree["segmentation"]).shape == (H, W) and not rle.decode_one(tree["segmentation"]).any()
    assert tree["depth"] == 3.0  # box cells 3 and 6, equal areas -> lower median


def test_object_masks_without_a_depth_map_or_work():
    rec = masks_record(depth_lowres=None)
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=FakeSegmenter()))([rec])
    assert rec.ok and rec.fields["objects"][1]["segmentation"] is not None
    assert rec.fields["objects"][1]["depth"] is None
    done = record(objects=[masks_record().fields["objects"][0]])
    idle = FakeSegmenter()
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=idle))([done])
    assert done.ok and idle.calls == []


@pytest.mark.parametrize(
    ("output", "lowres_map", "message"),
    [
        (np.zeros((1, 4, 4), bool), None, "shape"),
        (None, {"height": 2, "width": 3, "values": [1.0, 2.0]}, "holds 2 values"),
    ],
)
def test_object_masks_bad_inputs_become_error_rows(output, lowres_map, message):
    class Broken(FakeSegmenter):
        def segment(self, image, boxes):
            return super().segment(image, boxes) if output is None else output

    rec = masks_record(depth_lowres=lowres_map)
    ObjectMaskStage(make_cfg(), FakeHub(segmenter=Broken()))([rec])
    assert not rec.ok and rec.error_stage == "object_masks" and message in rec.error
    assert rec.fields["objects"][1]["segmentation"] is None  # untouched: lists are swapped on success


@pytest.mark.parametrize("profile", ["lite", "tiny-lite", "full", "tiny"])
def test_every_profile_configures_the_models_of_every_level2_stage(profile):
    from grand_pipeline.models.hub import ModelHub

    cfg = load_config(profile)
    hub = ModelHub(cfg.models, cfg.plugins)  # resolves keys only; nothing is loaded
    keys = {key for stage in STAGES for key in stage.models}
    assert "segmenter" in keys
    for key in keys:
        role, spec = hub.spec(key)
        assert spec.backend, (profile, key)
    assert hub.spec("segmenter")[1].backend == {"lite": "litemedsam", "tiny-lite": "litemedsam"}.get(profile, "sam")


# ----------------------------------------------------------------------------- labels and landmark


def test_label_stage_only_asks_about_ambiguous_objects_with_captions_as_context():
    rec = record(
        tags=tags("kitchen"),
        short_captions=captions("A mug of tea."),
        objects=[obj(0, [0, 0, 10, 10], ["cup", "mug"]), obj(1, [1, 1, 5, 5], ["table"])],
        floating_objects=[obj(2, [2, 2, 8, 8], ["bowl", "pot", "bowl"])],
    )
    assigner = FakeAssigner()
    LabelStage(make_cfg(), FakeHub(label_assigner=assigner))([rec])
    assert rec.ok, rec.error
    ((boxes, candidates, context),) = assigner.calls
    assert candidates == [["cup", "mug"], ["bowl", "pot"]] and context == "A mug of tea. kitchen"
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 10], [2, 2, 8, 8]])
    assert [o["label"] for o in rec.fields["objects"]] == ["mug", "table"]
    assert rec.fields["floating_objects"][0]["label"] == "pot"

    plain = record(short_captions=[], objects=[obj(0, [0, 0, 10, 10], ["cup"])])
    quiet = FakeAssigner()
    LabelStage(make_cfg(), FakeHub(label_assigner=quiet))([plain])
    assert quiet.calls == [] and plain.fields["objects"][0]["label"] == "cup"


def test_label_stage_rejects_a_label_outside_the_candidates():
    rec = record(short_captions=[], objects=[obj(0, [0, 0, 10, 10], ["cup", "mug"])])
    LabelStage(make_cfg(), FakeHub(label_assigner=FakeAssigner(forced="plate")))([rec])
    assert not rec.ok and rec.error_stage == "labels" and "'plate'" in rec.error
    assert rec.fields["objects"][0]["label"] == "cup"  # untouched: the stage swaps lists on success only


def test_landmark_stage_reads_captions_tags_and_labels_and_skips_textless_images():
    classifier = FakeLandmark(("Outdoor scene", "Urban landscape", 0.61237))
    recs = [
        record(
            tags=tags("street", "car"),
            short_captions=captions("A car on a street."),
            objects=[obj(0, [0, 0, 1, 1], ["car"]), obj(1, [0, 0, 1, 1], ["traffic light"])],
        ),
        record("sa_2", short_captions=[]),
    ]
    LandmarkStage(make_cfg(), FakeHub(landmark_classifier=classifier))(recs)
    assert all(r.ok for r in recs)
    assert classifier.texts == [["A car on a street. street, car, traffic light"]]
    assert recs[0].fields["landmark"] == {
        "category": "Outdoor scene", "fine_category": "Urban landscape", "score": 0.6124,
    }  # fmt: skip
    assert recs[1].fields["landmark"] is None


def test_landmark_stage_rejects_categories_outside_the_taxonomy():
    rec = record(tags=tags("street"), short_captions=[])
    LandmarkStage(make_cfg(), FakeHub(landmark_classifier=FakeLandmark(("Outdoor scene", "Moon", 0.5))))(
        [rec]
    )
    assert not rec.ok and rec.error_stage == "landmark"


# ----------------------------------------------------------------------------- lite backends on fakes

WORDS = ["cup", "coffee", "person", "man", "helmet", "street", "car", "traffic", "light", "mug", "tea"]


def test_embedding_grounder_picks_the_most_similar_object_above_threshold():
    embedder = BagOfWords(WORDS)
    grounder = EmbeddingGrounder(
        ModelSpec("embedding_match", options={"threshold": 0.5}), FakeHub(text_embedder=embedder)
    )
    objects = [
        {"id": 0, "bbox": [0, 0, 10, 10], "label": "person", "labels": ["person", "man"], "attributes": []},
        {"id": 1, "bbox": [5, 5, 20, 20], "label": "cup", "labels": ["cup"], "attributes": ["coffee cup"]},
        {"id": 2, "bbox": [1, 1, 2, 2], "label": None, "labels": [], "attributes": []},  # nothing to match
    ]
    assert object_text(objects[1]) == "cup, coffee cup" and object_text(objects[2]) == ""
    assert object_texts(objects[1]) == ["cup", "cup, coffee cup"] and object_texts(objects[2]) == []
    out = grounder.ground(None, ["the cup", "a man", "the street"], objects)
    assert out[0] is not None and out[0].box.tolist() == [5.0, 5.0, 20.0, 20.0] and 0.5 <= out[0].score <= 1
    assert out[1] is not None and out[1].box.tolist() == [0.0, 0.0, 10.0, 10.0]
    assert out[2] is None
    assert grounder.ground(None, [], objects) == [] and grounder.ground(None, ["cup"], []) == [None]
    # A noisy attribute does not hide a label: "person" alone matches the label text exactly.
    noisy = [dict(objects[0], attributes=["street car traffic light"])]
    (person,) = grounder.ground(None, ["person"], noisy)
    assert person is not None and person.score == pytest.approx(1.0)
    assert grounder.heuristic and grounder.model_id == "embedding_match(bow)"


def test_embedding_labeller_uses_context_and_skips_single_candidates():
    embedder = BagOfWords(WORDS)
    labeller = EmbeddingContextLabeller(ModelSpec("embedding_context"), FakeHub(text_embedder=embedder))
    boxes = np.zeros((2, 4), np.float32)
    assert labeller.assign(None, boxes, [["cup", "mug"], ["car"]], "A mug of tea.") == ["mug", "car"]
    calls = embedder.calls
    assert labeller.assign(None, boxes, [["cup"], ["car"]], "A mug of tea.") == ["cup", "car"]
    assert embedder.calls == calls  # no choice to make: nothing embedded
    with pytest.raises(ValueError):
        labeller.assign(None, boxes, [["cup"]], "x")


def test_embedding_landmark_covers_the_taxonomy_and_returns_probabilities():
    assert set(DESCRIPTIONS) == set(fine_categories()) and len(DESCRIPTIONS) == 14
    classifier = EmbeddingLandmarkClassifier(
        ModelSpec("embedding_zero_shot"), FakeHub(text_embedder=BagOfWords(WORDS))
    )
    out = classifier.classify([None, None], ["street, car, traffic light", "a cup of coffee"])
    assert out[0][:2] in {("Outdoor scene", "Urban landscape"), ("Transportation scene", "Road")}
    assert out[1][:2] == ("Indoor scene", "Living space")
    assert all(0 < score <= 1 for _, _, score in out) and classifier.classify([], []) == []


# ----------------------------------------------------------------------------- the whole level


def test_level2_rows_validate_against_the_level_schema():
    cfg = make_cfg()
    hub = FakeHub(
        captioner=FakeCaptioner([["A man holds a cup.", "A cup."], ["A dog."]]),
        phrase_extractor=FakePhrases(["man", "cup", "dog"]),
        grounder=FakeGrounder(
            {"man": [10, 10, 110, 210], "cup": [200, 200, 300, 300], "dog": [0, 0, 50, 50]}
        ),
        segmenter=FakeSegmenter(),
        label_assigner=FakeAssigner(),
        landmark_classifier=FakeLandmark(("Indoor scene", "Living space", 0.9)),
    )
    recs = [
        record(tags=tags("cup"), objects=[obj(0, [200, 200, 300, 300], ["cup", "mug"])],
               floating_objects=[obj(1, [10, 10, 110, 210], ["person"])]),
        record("sa_2", tags=tags("dog")),
    ]  # fmt: skip
    for stage_cls in STAGES:
        stage_cls(cfg, hub)(recs)
    assert all(r.ok for r in recs), [r.error for r in recs]
    failed = record("sa_3")
    failed.fail("grounding", "boom")
    rows = [{**common_columns(r), **to_row(r)} for r in [*recs, failed]]
    table = pa.Table.from_pylist(rows, schema=level_schema(2))
    first, second, third = table.to_pylist()
    assert first["short_captions"][0] == {"caption": "A man holds a cup.", "source": "fake_captioner"}
    assert [p["phrase"] for p in first["phrases"]] == ["man", "cup"]
    # "man" votes on the floating person -> [person, man] -> promoted after the cup.
    assert [(o["id"], o["label"]) for o in first["objects"]] == [(0, "cup"), (1, "man")]
    assert first["relationships"]["grounding"] == [
        {"phrase": "man", "object_ids": [1]}, {"phrase": "cup", "object_ids": [0]},
    ]  # fmt: skip
    assert first["landmark"]["fine_category"] == "Living space"
    # sa_2 had no objects: "dog" became a floating object made by the grounder, then got a mask.
    assert [(o["id"], o["label"], o["models"]) for o in second["floating_objects"]] == [
        (0, "dog", ["grounder:fake_grounder"])
    ]
    dog = second["floating_objects"][0]
    assert dog["segmentation"]["size"] == [H, W] and dog["segmentation_source"] == "segmenter:fake_segmenter"
    assert {u["stage"] for u in first["provenance"]["backends"]} == {s.name for s in STAGES}
    assert third["short_captions"] == [] and third["relationships"] is None and third["landmark"] is None


def test_level2_is_registered_and_extends_level1():
    # Outputs against the schema: tests/test_stage_contracts.py, for every level.
    assert {f.name for f in LEVEL1_FIELDS} <= set(level_schema(2).names)
    assert LEVELS.get("2") is LEVEL2 and LEVEL2.stages == STAGES and LEVEL2.needs_pixels


# ----------------------------------------------------------------------------- real lite models


@pytest.fixture(scope="module")
def lite_hub() -> Any:
    from grand_pipeline.models.hub import ModelHub

    spec = ModelSpec("unused")
    models = ModelsConfig(
        tagger=spec, detectors={}, segmenter=spec, depth=spec, region_captioner=spec,
        text_embedder=ModelSpec("minilm", "package:"),
        phrase_extractor=ModelSpec("spacy", "package:"),
        grounder=ModelSpec("embedding_match"),
        landmark_classifier=ModelSpec("embedding_zero_shot"),
        label_assigner=ModelSpec("embedding_context"),
    )  # fmt: skip
    return ModelHub(models)


@pytest.mark.slow
def test_spacy_phrases_drop_determiners_and_keep_offsets(lite_hub):
    extractor = lite_hub.get("phrase_extractor")
    texts = [
        "A man in a red helmet holds a cup of coffee.",
        "Two dogs play on the grassy field near his old car.",
        "It is a sunny day; all the people walk.",
    ]
    found = extractor.phrases(texts)
    for text, phrases in zip(texts, found, strict=True):
        for p in phrases:
            assert text[p.start : p.end] == p.text
    assert [(p.text, p.root) for p in found[0]] == [
        ("man", "man"), ("red helmet", "helmet"), ("cup", "cup"), ("coffee", "coffee"),
    ]  # fmt: skip
    assert [p.text for p in found[1]] == ["Two dogs", "grassy field", "old car"] and found[1][0].root == "dog"
    assert "It" not in [p.text for p in found[2]] and "people" in [p.text for p in found[2]]
    nouns = extractor.nouns(texts[0])
    assert [(p.text, p.start) for p in nouns] == [("man", 2), ("helmet", 15), ("cup", 30), ("coffee", 37)]


@pytest.mark.slow
def test_minilm_grounder_sends_the_cup_to_the_cup(lite_hub):
    grounder = lite_hub.get("grounder")
    objects = [
        {
            "id": 0,
            "bbox": [0, 0, 100, 200],
            "label": "person",
            "labels": ["person"],
            "attributes": ["man in red"],
        },
        {
            "id": 1,
            "bbox": [150, 150, 200, 200],
            "label": "cup",
            "labels": ["cup"],
            "attributes": ["white cup"],
        },
    ]
    cup, person, woman, tree = grounder.ground(None, ["the cup", "person", "a woman", "a tree"], objects)
    assert cup is not None and cup.box.tolist() == [150.0, 150.0, 200.0, 200.0]
    assert person is not None and person.box.tolist() == [0.0, 0.0, 100.0, 200.0]
    assert woman is not None and woman.box.tolist() == [0.0, 0.0, 100.0, 200.0]
    assert tree is None


@pytest.mark.slow
def test_minilm_landmark_and_labels(lite_hub):
    landmark = lite_hub.get("landmark_classifier")
    (street,) = landmark.classify([None], ["street, car, traffic light"])
    assert street[:2] in {("Outdoor scene", "Urban landscape"), ("Transportation scene", "Road")}
    (office,) = landmark.classify([None], ["laptop, keyboard, monitor, desk"])
    assert office[:2] == ("Indoor scene", "Work space")
    labeller = lite_hub.get("label_assigner")
    boxes = np.zeros((1, 4), np.float32)
    assert labeller.assign(None, boxes, [["dog", "cat"]], "A cat sleeps on the sofa.") == ["cat"]
