"""The pure converters: one committed row -> GLaMM samples, with every drop counted."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from grand_pipeline.geometry import rle
from grand_pipeline.schemas import STATUS_ERROR, STATUS_OK
from grand_pipeline.training.data.convert import (
    ConvertConfigError,
    ConvertOptions,
    convert_row,
    expression,
)
from grand_pipeline.training.data.samples import SPECIAL_STRINGS

H, W = 40, 60
CAPTION = "A man riding a horse on the beach next to a dog and a dog."


def box_mask(box: tuple[int, int, int, int]) -> dict[str, Any]:
    m = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = True
    return rle.encode(m)[0]


BOXES = {1: (0, 0, 20, 30), 2: (10, 10, 40, 40), 3: (30, 0, 60, 20), 4: (5, 25, 15, 35), 5: (45, 30, 60, 40)}


def obj(oid: int, label: str = "thing", attributes: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": oid,
        "bbox": [float(v) for v in BOXES[oid]],
        "labels": [label],
        "label": label,
        "attributes": attributes if attributes is not None else [f"brown {label}"],
        "segmentation": box_mask(BOXES[oid]),
    }


def detail(caption: str, phrase: str, ids: list[int], method: str = "exact", nth: int = 0) -> dict[str, Any]:
    start = -1
    for _ in range(nth + 1):
        start = caption.index(phrase, start + 1)
    return {"phrase": phrase, "tokens_positive": [start, start + len(phrase)], "ids": ids, "method": method}


def row(details: list[dict[str, Any]], caption: str = CAPTION, verified: bool = True, **extra: Any) -> dict[str, Any]:
    base = {
        "image_id": "sa_1",
        "shard_id": "sa_000000",
        "file_name": "sa_1.jpg",
        "width": W,
        "height": H,
        "status": STATUS_OK,
        "objects": [obj(1, "man"), obj(2, "horse"), obj(3, "beach", ["sandy shore"])],
        "floating_objects": [obj(4, "dog"), obj(5, "dog")],
        "short_captions": [{"caption": "A man on a horse.", "source": "llm"}],
        "short_captions_grounded": [
            {"caption": "A man on a horse.", "details": [detail("A man on a horse.", "A man", [1])]}
        ],
        "dense_caption": {"caption": caption, "details": details, "verified": verified, "attempts": []},
    }
    base.update(extra)
    return base


def dense(samples: Any) -> Any:
    (sample,) = [s for s in samples.gcg if s.source == "dense"]
    return sample


def decoded(mask: dict[str, Any]) -> np.ndarray:
    return mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)


def test_phrases_in_start_order_with_or_masks() -> None:
    details = [
        detail(CAPTION, "the beach", [3]),
        detail(CAPTION, "A man", [1]),
        detail(CAPTION, "a horse", [2, 1]),  # one phrase, two objects whose masks overlap
    ]
    counts: Counter = Counter()
    sample = dense(convert_row(row(details), ConvertOptions(), counts))
    assert [p.text for p in sample.phrases] == ["A man", "a horse", "the beach"]
    assert [p.start for p in sample.phrases] == sorted(p.start for p in sample.phrases)
    for p in sample.phrases:
        assert sample.caption[p.start : p.end] == p.text
        want = np.zeros((H, W), bool)
        for oid in p.ids:
            want |= decoded(box_mask(BOXES[oid]))
        got = mask_utils.decode({"size": p.mask["size"], "counts": p.mask["counts"].encode()})
        assert got.max() == 1  # binary: the OR, not the sum
        np.testing.assert_array_equal(got.astype(bool), want)
    assert counts["gcg:ok"] == 2  # dense + the grounded short caption


def test_nested_overlapping_and_same_span_rule_is_deterministic() -> None:
    details = [
        detail(CAPTION, "A man riding a horse", [1]),
        detail(CAPTION, "a horse", [2]),  # nested inside the outer span: dropped
        detail(CAPTION, "horse on the", [2]),  # starts inside the outer span: dropped
        detail(CAPTION, "the beach", [3]),
        detail(CAPTION, "the beach", [1]),  # the same characters: merged into one phrase
        detail(CAPTION, "a dog", [4]),
        detail(CAPTION, "a dog", [5], nth=1),  # the same text elsewhere: a phrase of its own
    ]
    outputs = []
    for seed in range(5):
        shuffled = details[:]
        random.Random(seed).shuffle(shuffled)
        counts: Counter = Counter()
        sample = dense(convert_row(row(shuffled), ConvertOptions(), counts))
        outputs.append(sample)
        assert counts["phrase:overlap"] == 2 and counts["phrase:merged_same_span"] == 1
    assert all(o == outputs[0] for o in outputs)
    phrases = outputs[0].phrases
    assert [(p.text, p.ids) for p in phrases] == [
        ("A man riding a horse", (1,)),
        ("the beach", (1, 3)),
        ("a dog", (4,)),
        ("a dog", (5,)),
    ]
    assert all(a.end <= b.start for a, b in zip(phrases, phrases[1:], strict=False))
    np.testing.assert_array_equal(
        decoded(phrases[1].mask), decoded(box_mask(BOXES[3])) | decoded(box_mask(BOXES[1]))
    )


@pytest.mark.parametrize("token", SPECIAL_STRINGS)
def test_special_token_captions_are_refused(token: str) -> None:
    caption = f"A man {token} riding a horse."
    r = row([detail(caption, "A man", [1])], caption=caption)
    r["short_captions"] = [{"caption": f"x {token}", "source": "llm"}]
    counts: Counter = Counter()
    samples = convert_row(r, ConvertOptions(), counts)
    assert not [s for s in samples.gcg if s.source == "dense"]
    assert counts["gcg:special_token"] == 1
    assert counts["caption:special_token"] == 2  # the short caption and the dense caption
    assert all(token not in s.caption for s in samples.caption)


def test_filters_count_what_they_drop() -> None:
    broken = obj(3, "beach")
    broken["segmentation"] = {"size": [H, W], "counts": "not an rle!"}
    wrong_size = obj(2, "horse")
    wrong_size["segmentation"] = rle.encode(np.ones((H + 1, W), bool))[0]
    details = [
        detail(CAPTION, "A man", [1], method="noun"),
        detail(CAPTION, "a horse", [2]),
        detail(CAPTION, "the beach", [3]),
        detail(CAPTION, "a dog", [4], method="embedding"),
        detail(CAPTION, "a dog", [9], nth=1),
        {"phrase": "next", "tokens_positive": [0, 4], "ids": [1], "method": "exact"},  # caption[0:4] != "next"
    ]
    r = row(details, objects=[obj(1, "man"), wrong_size, broken])
    counts: Counter = Counter()
    sample = dense(convert_row(r, ConvertOptions(), counts))
    assert [p.text for p in sample.phrases] == ["a dog"]
    assert counts["phrase:method_noun"] == 1
    assert counts["phrase:bad_mask"] == 2
    assert counts["phrase:unknown_id"] == 1
    assert counts["phrase:bad_offsets"] == 1
    assert counts["refseg:bad_mask"] == 2  # the two objects with unusable masks

    counts = Counter()
    opts = ConvertOptions(methods=("exact", "embedding", "noun"), floating=False)
    sample = dense(convert_row(r, opts, counts))
    assert [p.text for p in sample.phrases] == ["A man"]
    assert counts["phrase:floating"] == 1


def test_unverified_and_error_rows() -> None:
    r = row([detail(CAPTION, "A man", [1])], verified=False)
    counts: Counter = Counter()
    samples = convert_row(r, ConvertOptions(), counts)
    assert [s.source for s in samples.gcg] == ["short:0"]
    assert counts["gcg:unverified"] == 1 and counts["caption:unverified"] == 1
    assert [s.source for s in samples.caption] == ["short:0"]
    samples = convert_row(r, ConvertOptions(only_verified=False), Counter())
    assert [s.source for s in samples.gcg] == ["dense", "short:0"]
    assert dense(samples).verified is False
    assert [s.source for s in samples.caption] == ["short:0", "dense"]

    counts = Counter()
    bad = {**r, "status": STATUS_ERROR, "error": "boom"}
    assert len(convert_row(bad, ConvertOptions(), counts)) == 0
    assert counts == Counter({"rows:error": 1})

    counts = Counter()
    convert_row(row([detail(CAPTION, "A man", [1], method="noun")]), ConvertOptions(), counts)
    assert counts["gcg:no_phrases"] == 1


def test_referring_expression_rule_and_region_chunks() -> None:
    assert expression({"labels": ["cup"], "label": "cup", "attributes": ["white", "a white cup"]}) == "a white cup"
    assert expression({"labels": ["cup"], "label": "cup", "attributes": ["white", "round"]}) == "white"
    assert expression({"labels": ["cup"], "label": "cup", "attributes": []}) == "cup"

    many = [dict(obj(1 + (i % 5), f"thing{i}"), id=i) for i in range(12)]
    counts: Counter = Counter()
    samples = convert_row(row([], objects=many), ConvertOptions(max_regions=10), counts)
    assert [len(s.regions) for s in samples.region] == [10, 2]
    assert [r.object_id for s in samples.region for r in s.regions] == list(range(12))
    assert [s.expression for s in samples.refseg] == [f"brown thing{i}" for i in range(12)]
    assert samples.refseg[0].mask == many[0]["segmentation"]
    assert counts["gcg:no_phrases"] == 1


def test_options_are_validated() -> None:
    with pytest.raises(ConvertConfigError, match="methods"):
        ConvertOptions(methods=("exact", "fuzzy"))
    with pytest.raises(ConvertConfigError, match="max_regions"):
        ConvertOptions(max_regions=0)
