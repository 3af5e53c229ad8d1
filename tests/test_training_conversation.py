"""GCG tagging, conversations, tokenisation, labels, [SEG] positions and round-boundary truncation."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

import pytest

from grand_pipeline.models.hf_common import tiny_tokenizer
from grand_pipeline.training.data.conversation import (
    GCG_EVAL_INSTRUCTION,
    GCG_QUESTIONS,
    SEG_ANSWERS,
    SpanError,
    build_conversation,
    gcg_conversation,
    tag_caption,
)
from grand_pipeline.training.data.samples import (
    CaptionSample,
    GCGSample,
    ImageRef,
    Phrase,
    RefSegSample,
    Region,
    RegionCapSample,
)
from grand_pipeline.training.data.tokenize import seg_positions, tokenize_conversation
from grand_pipeline.training.data.tokens import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SEG_TOKEN,
    SPECIAL_TOKENS,
    Conversation,
    SpecialIds,
    TokenizerError,
    add_special_tokens,
)


@dataclass(frozen=True)
class Span:
    start: int
    end: int


IMAGE = ImageRef("sa_1", "sa_000000", "sa_1.jpg", 6, 4)


def phrase(caption: str, text: str, start: int | None = None, mask_id: int = 0) -> Phrase:
    start = caption.index(text) if start is None else start
    return Phrase(
        text, start, start + len(text), (mask_id,), {"size": [4, 6], "counts": str(mask_id)}, "exact"
    )


def untag(text: str) -> str:
    return re.sub(r"<p> | </p> \[SEG\]", "", text)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(extra_special=SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def ids(tok) -> SpecialIds:
    return SpecialIds.of(tok)


# ----------------------------------------------------------------------------- tagging


def test_disjoint_spans_are_tagged_in_place_in_start_order() -> None:
    caption = "A man rides a horse on the beach."
    spans = [phrase(caption, "A man"), phrase(caption, "a horse"), phrase(caption, "the beach")]
    tagged, order = tag_caption(caption, spans)
    assert tagged == "<p> A man </p> [SEG] rides <p> a horse </p> [SEG] on <p> the beach </p> [SEG]."
    assert order == (0, 1, 2)
    assert untag(tagged) == caption


def test_adjacent_spans_close_before_the_next_opens() -> None:
    caption = "redblue car"
    tagged, order = tag_caption(caption, [phrase(caption, "red", 0), phrase(caption, "blue", 3)])
    assert tagged == "<p> red </p> [SEG]<p> blue </p> [SEG] car"
    assert order == (0, 1) and untag(tagged) == caption


def test_nested_spans_nest_and_the_inner_seg_comes_first() -> None:
    caption = "a man riding a horse on the beach"
    outer, inner = phrase(caption, "a man riding a horse"), phrase(caption, "a horse")
    tagged, order = tag_caption(caption, [outer, inner])
    # The reference writes "<p> a man riding <p> a h </p> [SEG]orse </p> [SEG] on the beach".
    assert tagged == "<p> a man riding <p> a horse </p> [SEG] </p> [SEG] on the beach"
    assert order == (1, 0)
    assert untag(tagged) == caption
    # Same start and same end nest too.
    caption = "big red ball"
    spans = [phrase(caption, "big red ball"), phrase(caption, "big red"), phrase(caption, "ball")]
    tagged, order = tag_caption(caption, spans)
    assert tagged == "<p> <p> big red </p> [SEG] <p> ball </p> [SEG] </p> [SEG]"
    assert order == (1, 2, 0) and untag(tagged) == caption


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([(0, 5), (3, 8)], "partly overlaps"),
        ([(0, 5), (0, 5)], "share the span"),
        ([(2, 2)], "empty"),
        ([(0, 99)], "outside"),
    ],
)
def test_untaggable_spans_raise(spans, message) -> None:
    with pytest.raises(SpanError, match=message):
        tag_caption("a man riding a horse", [Span(s, e) for s, e in spans])


def test_gcg_conversation_emits_masks_in_seg_order() -> None:
    caption = "a man riding a horse on the beach"
    phrases = (
        phrase(caption, "a man riding a horse", mask_id=1),
        phrase(caption, "a horse", mask_id=2),
        phrase(caption, "the beach", mask_id=3),
    )
    built = gcg_conversation(GCGSample(IMAGE, caption, phrases, "dense"), random.Random(0))
    ((user, answer),) = built.conversation.rounds
    assert user.startswith("The <image> provides an overview of the picture.\n")
    assert user.split("\n", 1)[1] in GCG_QUESTIONS and GCG_EVAL_INSTRUCTION in GCG_QUESTIONS
    assert answer.count(SEG_TOKEN) == len(built.masks) == 3
    assert [m["counts"] for m in built.masks] == ["2", "1", "3"]
    assert built.classes == ("a horse", "a man riding a horse", "the beach")


def test_refseg_region_and_caption_conversations() -> None:
    rng = random.Random(1)
    refs = [RefSegSample(IMAGE, i, f"the dog {i}", (0, 0, 1, 1), {"counts": str(i)}) for i in range(3)]
    built = build_conversation("refseg", refs, rng)
    assert len(built.conversation.rounds) == 3 and built.masks == tuple(r.mask for r in refs)
    assert "<image>" in built.conversation.rounds[0][0]
    assert all("<image>" not in u for u, _ in built.conversation.rounds[1:])
    assert all(a in SEG_ANSWERS and a.count(SEG_TOKEN) == 1 for _, a in built.conversation.rounds)
    assert "the dog 1" in built.questions[1]

    regions = RegionCapSample(IMAGE, (Region(1, (0, 0, 2, 2), "a cup"), Region(2, (1, 1, 3, 3), "a table")))
    built = build_conversation("region", [regions], rng)
    assert "region1 <bbox>" in built.questions[0] and "region2 <bbox>" in built.questions[1]
    assert built.boxes == ((0, 0, 2, 2), (1, 1, 3, 3)) and not built.masks
    assert [a for _, a in built.conversation.rounds] == ["a cup", "a table"]

    built = build_conversation("caption", [CaptionSample(IMAGE, "A cup.", "short:0")], rng)
    assert built.conversation.rounds[0][1] == "A cup." and not built.masks and not built.boxes


def test_llava_v1_template() -> None:
    conv = Conversation((("q1", "a1"), ("q2", "a2")), system="SYS")
    assert conv.prompt() == "SYS USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>"
    assert Conversation((("q1", None),), system="SYS").prompt() == "SYS USER: q1 ASSISTANT:"


# ----------------------------------------------------------------------------- tokens and labels


def test_labels_placeholder_and_seg_position_by_hand(tok, ids) -> None:
    conv = Conversation((("<image>\nsegment the cat", "it is [SEG] ."),), system="a chat")
    out = tokenize_conversation(conv, tok, ids, num_image_tokens=4)
    words = [
        "<s>",
        "a",
        "<unk>",
        "user",
        ":",
        "<im_start>",
        None,
        "<im_end>",
        "<unk>",
        "the",
        "cat",
        "assistant",
        ":",
        "it",
        "is",
        "[SEG]",
        ".",
        "</s>",
    ]
    expected = [IMAGE_TOKEN_INDEX if w is None else tok.convert_tokens_to_ids(w) for w in words]
    assert out.input_ids.tolist() == expected
    assert out.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 1
    # BOS, system line and user turn (up to and including "assistant :") are ignored; the answer
    # and its </s> are learnt.
    assert out.labels.tolist() == [IGNORE_INDEX] * 13 + expected[13:]
    # [SEG] is input_ids[15]; "is" (index 14) predicts it. The image (index 6) becomes 4 patches,
    # i.e. 3 extra positions, so "is" sits at 14 + 3 = 17 in the expanded sequence.
    assert out.seg_positions.tolist() == [17]
    expanded = []
    for t in out.input_ids.tolist():
        expanded += ["patch"] * 4 if t == IMAGE_TOKEN_INDEX else [t]
    assert expanded[17 + 1] == ids.seg


def test_seg_right_after_the_image_is_predicted_by_the_last_patch() -> None:
    # [x, <image>, [SEG]] -> [x, p0, p1, p2, p3, [SEG]]: p3 (index 4) predicts [SEG].
    assert seg_positions([5, IMAGE_TOKEN_INDEX, 9], 9, 4) == [4]
    assert seg_positions([5, 9, IMAGE_TOKEN_INDEX], 9, 4) == [0]  # before the image: no shift


def test_multi_round_labels_ignore_every_user_turn(tok, ids) -> None:
    conv = Conversation(
        (("<image>\nwhere is the cat", "it is [SEG] ."), ("where is the dog", "sure , [SEG] ."))
    )
    out = tokenize_conversation(conv, tok, ids, num_image_tokens=4)
    input_ids, labels = out.input_ids.tolist(), out.labels.tolist()
    learnt = [t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(learnt) == tok.decode(
        tok("it is [SEG] .</s>sure , [SEG] .</s>", add_special_tokens=False)["input_ids"]
    )
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(input_ids, labels, strict=True))
    assert labels[-1] == tok.convert_tokens_to_ids("</s>")  # nothing follows the last </s>
    assert len(out.seg_positions) == 2 and out.rounds == 2
    second_user = input_ids.index(tok.convert_tokens_to_ids("dog"))
    assert labels[second_user] == IGNORE_INDEX


def test_truncation_that_would_drop_a_seg_drops_the_sample(tok, ids) -> None:
    conv = Conversation(
        tuple((("<image>\n" if i == 0 else "") + f"where is the cat {i}", "it is [SEG] .") for i in range(3))
    )
    full = tokenize_conversation(conv, tok, ids, num_image_tokens=4)
    n = len(full.input_ids) + 3
    counts: Counter = Counter()
    assert tokenize_conversation(conv, tok, ids, num_image_tokens=4, max_length=n, counts=counts) is not None
    assert tokenize_conversation(conv, tok, ids, num_image_tokens=4, max_length=n - 1, counts=counts) is None
    assert counts["tokens:truncated_seg"] == 1
    assert tokenize_conversation(conv, tok, ids, num_image_tokens=4, max_length=8, counts=counts) is None
    assert counts["tokens:too_long"] == 1


def test_truncation_without_seg_keeps_whole_rounds_and_their_boxes(tok, ids) -> None:
    conv = Conversation(
        tuple((("<image>\n" if i == 0 else "") + f"what is in region{i} <bbox> ?", "a cup") for i in range(3))
    )
    full = tokenize_conversation(conv, tok, ids, num_image_tokens=4)
    counts: Counter = Counter()
    cut = tokenize_conversation(
        conv, tok, ids, num_image_tokens=4, max_length=len(full.input_ids) + 2, counts=counts
    )
    assert cut is not None and cut.rounds == 2 and cut.n_bbox == 2 and full.n_bbox == 3
    assert counts["tokens:truncated_rounds"] == 1
    assert cut.input_ids.tolist() == full.input_ids.tolist()[: len(cut.input_ids)]
    assert cut.labels[-1].item() == tok.convert_tokens_to_ids("</s>")


def test_tokenizer_without_special_tokens_is_refused_until_they_are_added() -> None:
    bare = tiny_tokenizer()
    with pytest.raises(TokenizerError, match=r"\[SEG\]"):
        SpecialIds.of(bare)
    assert add_special_tokens(bare) == len(SPECIAL_TOKENS)
    assert add_special_tokens(bare) == 0
    got = SpecialIds.of(bare)
    assert bare(" x [SEG] y", add_special_tokens=False)["input_ids"][1] == got.seg
