"""Task samples -> ``llava_v1`` conversations with their masks in ``[SEG]`` order and boxes in
``<bbox>`` order.

The question lists below are data (our own wording, in the spirit of GLaMM's lists); a
``random.Random`` picks from them, so the dataset's seeded RNG makes every choice reproducible.

**GCG tagging** (:func:`tag_caption`) writes each phrase as ``<p> {phrase} </p> [SEG]`` in place,
leaving every character outside the tags unchanged. Adjacent spans close before the next opens;
properly nested spans nest (``<p> a man riding <p> a horse </p> [SEG] </p> [SEG]``), where the
reference's right-to-left string surgery with stale offsets corrupts the text; a partial overlap
or a repeated span cannot be written unambiguously and raises ``SpanError``. The ``[SEG]`` tokens
come out in span-*end* order (inner before outer), which is the order the masks must follow, so
:func:`tag_caption` returns it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from grand_pipeline.training.data.samples import (
    RLE,
    CaptionSample,
    GCGSample,
    RefSegSample,
    RegionCapSample,
)
from grand_pipeline.training.data.tokens import (
    BBOX_TOKEN,
    IMAGE_TOKEN,
    P_END,
    P_START,
    SEG_TOKEN,
    Conversation,
)

Box = tuple[float, float, float, float]

#: The first user turn opens with the image (GLaMM's wording, so released checkpoints see it).
IMAGE_INTRO = f"The {IMAGE_TOKEN} provides an overview of the picture.\n"

#: The fixed instruction of GLaMM's GCG evaluation (single spaces; see glamm_reference.md §4).
GCG_EVAL_INSTRUCTION = (
    "Could you please give me a detailed description of the image? Please respond with interleaved "
    "segmentation masks for the corresponding parts of the answer."
)

GCG_QUESTIONS = (
    GCG_EVAL_INSTRUCTION,
    "Describe the image in detail and segment each thing you mention, with its mask right after "
    "the words that name it.",
    "Give a thorough description of this picture, with a segmentation mask for every part of the "
    "description that refers to something in it.",
    "Write a detailed caption of the image and ground each of its phrases with a segmentation mask.",
    "What is happening in this image? Answer in detail and mark every object you name with its mask.",
    "Please explain what the picture shows, interleaving segmentation masks with the phrases they belong to.",
)

#: ``{expression}`` is the referring expression.
SEG_QUESTIONS = (
    "Can you segment {expression} in this image?",
    "Please segment {expression} in this picture.",
    "Where is {expression} in the image? Answer with a segmentation mask.",
    "Show me {expression} in this image with a segmentation mask.",
    "Which part of the picture is {expression}? Please give its mask.",
)
#: Each holds exactly one ``[SEG]``.
SEG_ANSWERS = (
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Here it is: [SEG].",
    "The mask is [SEG].",
)

#: ``<region>`` becomes ``region{i} <bbox>``.
REGION_QUESTIONS = (
    "Can you briefly describe <region>?",
    "What is in <region>? Answer in a few words.",
    "Give a short description of <region>.",
    "Please describe what <region> shows in a short phrase.",
    "What does <region> contain?",
)

CAPTION_QUESTIONS = (
    "Describe the image briefly.",
    "Give a short caption of this picture.",
    "What does this image show? Answer in one sentence.",
    "Write a concise description of the photo.",
    "Summarise what the picture shows.",
)
#: For dense captions, which are several sentences long.
DETAILED_CAPTION_QUESTIONS = (
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What can you see in this image? Please answer in detail.",
)


class SpanError(ValueError):
    """Phrase spans that cannot be tagged: out of range, empty, repeated or partly overlapping."""


class Span(Protocol):
    """Anything with a character span, e.g. ``samples.Phrase``."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


@dataclass(frozen=True)
class TaskConversation:
    """A conversation plus what its special tokens refer to, in token order."""

    task: str
    conversation: Conversation
    masks: tuple[RLE, ...]  # the k-th [SEG]'s mask
    boxes: tuple[Box, ...]  # the k-th <bbox>'s box, original pixels xyxy
    questions: tuple[str, ...]  # one per round
    classes: tuple[str, ...]  # the phrase / expression of each mask or region (sampled_classes_list)


def tag_caption(caption: str, phrases: Sequence[Span]) -> tuple[str, tuple[int, ...]]:
    """Tag ``caption`` with ``<p> … </p> [SEG]`` around each ``caption[start:end]``.

    Returns ``(tagged_text, seg_order)``: ``seg_order[k]`` is the index into ``phrases`` of the
    k-th ``[SEG]`` of ``tagged_text``; emit masks in that order. Raises :class:`SpanError` (see the
    module docstring).
    """
    spans = [(int(p.start), int(p.end)) for p in phrases]
    for i, (start, end) in enumerate(spans):
        if not 0 <= start < end <= len(caption):
            raise SpanError(f"phrase {i}: span [{start}, {end}) is empty or outside the caption")
    stack: list[int] = []  # open spans while scanning in (start, -end) order
    for i in sorted(range(len(spans)), key=lambda k: (spans[k][0], -spans[k][1])):
        start, end = spans[i]
        while stack and spans[stack[-1]][1] <= start:
            stack.pop()
        if stack and spans[stack[-1]] == (start, end):
            raise SpanError(f"phrases {stack[-1]} and {i} share the span [{start}, {end})")
        if stack and end > spans[stack[-1]][1]:
            outer = spans[stack[-1]]
            raise SpanError(f"phrase {i} [{start}, {end}) partly overlaps phrase {stack[-1]} {list(outer)}")
        stack.append(i)
    # Markers at one position, left to right: spans ending there close (innermost first), then
    # spans starting there open (outermost first). Adjacent and nested spans both follow.
    opens = sorted(range(len(spans)), key=lambda k: (spans[k][0], -spans[k][1]))
    closes = sorted(range(len(spans)), key=lambda k: (spans[k][1], -spans[k][0]))
    events = [(spans[k][1], 0, rank, f" {P_END} {SEG_TOKEN}") for rank, k in enumerate(closes)]
    events += [(spans[k][0], 1, rank, f"{P_START} ") for rank, k in enumerate(opens)]
    pieces, cursor = [], 0
    for position, _, _, marker in sorted(events):
        pieces += [caption[cursor:position], marker]
        cursor = position
    pieces.append(caption[cursor:])
    return "".join(pieces), tuple(closes)


def _region_text(index: int) -> str:
    return f"region{index} {BBOX_TOKEN}"


def gcg_conversation(sample: GCGSample, rng: random.Random) -> TaskConversation:
    """One round: a GCG question, answered by the tagged caption; raises :class:`SpanError`."""
    tagged, order = tag_caption(sample.caption, sample.phrases)
    question = rng.choice(GCG_QUESTIONS)
    return TaskConversation(
        task="gcg",
        conversation=Conversation(((IMAGE_INTRO + question, tagged),)),
        masks=tuple(sample.phrases[k].mask for k in order),
        boxes=(),
        questions=(question,),
        classes=tuple(sample.phrases[k].text for k in order),
    )


def refseg_conversation(samples: Sequence[RefSegSample], rng: random.Random) -> TaskConversation:
    """One round per expression (the first one with the image), each answered with one ``[SEG]``."""
    if not samples:
        raise ValueError("refseg_conversation needs at least one sample")
    rounds, questions = [], []
    for i, sample in enumerate(samples):
        question = rng.choice(SEG_QUESTIONS).format(expression=sample.expression)
        questions.append(question)
        rounds.append(((IMAGE_INTRO if i == 0 else "") + question, rng.choice(SEG_ANSWERS)))
    return TaskConversation(
        task="refseg",
        conversation=Conversation(tuple(rounds)),
        masks=tuple(s.mask for s in samples),
        boxes=(),
        questions=tuple(questions),
        classes=tuple(s.expression for s in samples),
    )


def region_conversation(sample: RegionCapSample, rng: random.Random) -> TaskConversation:
    """One round per region: ``region{i} <bbox>`` asked about, its expression as the answer.
    Exactly the boxes asked about are returned, in ``<bbox>`` order."""
    if not sample.regions:
        raise ValueError("region_conversation needs at least one region")
    rounds, questions = [], []
    for i, region in enumerate(sample.regions, start=1):
        question = rng.choice(REGION_QUESTIONS).replace("<region>", _region_text(i))
        questions.append(question)
        rounds.append(((IMAGE_INTRO if i == 1 else "") + question, region.expression))
    return TaskConversation(
        task="region",
        conversation=Conversation(tuple(rounds)),
        masks=(),
        boxes=tuple(r.bbox for r in sample.regions),
        questions=tuple(questions),
        classes=tuple(r.expression for r in sample.regions),
    )


def caption_conversation(sample: CaptionSample, rng: random.Random) -> TaskConversation:
    """One round: a caption question (a detailed one for the dense caption), the caption."""
    pool = DETAILED_CAPTION_QUESTIONS if sample.source == "dense" else CAPTION_QUESTIONS
    question = rng.choice(pool)
    return TaskConversation(
        task="caption",
        conversation=Conversation(((IMAGE_INTRO + question, sample.caption),)),
        masks=(),
        boxes=(),
        questions=(question,),
        classes=(),
    )


#: task -> builder over the samples chosen for one item (a list: refseg takes several).
BUILDERS: dict[str, Callable[[Sequence[Any], random.Random], TaskConversation]] = {
    "gcg": lambda chosen, rng: gcg_conversation(chosen[0], rng),
    "refseg": refseg_conversation,
    "region": lambda chosen, rng: region_conversation(chosen[0], rng),
    "caption": lambda chosen, rng: caption_conversation(chosen[0], rng),
}


def build_conversation(task: str, chosen: Sequence[Any], rng: random.Random) -> TaskConversation:
    """The conversation of ``task`` over ``chosen`` samples (one, or up to N for refseg)."""
    if task not in BUILDERS:
        raise KeyError(f"unknown task {task!r}; tasks: {', '.join(BUILDERS)}")
    return BUILDERS[task](chosen, rng)
