"""A ``llava_v1`` conversation -> ``input_ids``, ``labels`` and the ``[SEG]`` hidden-state positions.

**Tokens.** The sequence is built piece by piece, each piece tokenised without special tokens:
``[BOS] instruction_0 answer_0 instruction_1 answer_1 ...``, where an instruction runs up to and
including ``ASSISTANT:`` and an answer is ``{text}</s>`` (see ``tokens.Conversation``). The pieces
are cut at spaces, so a SentencePiece tokenizer's dummy prefix stands for the space the rendered
prompt has there, and the labels are exact by construction: no re-tokenising of prefixes and no
"length - 2" arithmetic. ``<image>`` (wrapped as ``<im_start><image><im_end>`` by default) becomes
the single placeholder id ``IMAGE_TOKEN_INDEX``.

**Labels.** ``IGNORE_INDEX`` on BOS, on every instruction (system line and user turns) and on
anything after the last answer; the answers, ``</s>`` included, keep their ids.

**[SEG] positions.** GLaMM decodes the k-th mask from the last-layer hidden state of the token
*before* the k-th ``[SEG]`` (the state that predicts it), in the sequence the LLM sees, i.e. after
the image placeholder is expanded into ``num_image_tokens`` patch embeddings. For a ``[SEG]`` at
``j`` in ``input_ids`` that position is ``j - 1``, plus ``num_image_tokens - 1`` when the image
placeholder sits at or before ``j - 1`` (at ``j - 1`` itself the predicting state is the last patch).

**Truncation** (``max_length``, counted on the expanded sequence) keeps whole rounds only. A sample
whose kept rounds would lose a ``[SEG]`` is dropped (``tokens:truncated_seg``), so a mask is never
paired with another phrase's token; one whose first round does not fit is ``tokens:too_long``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from grand_pipeline.training.data.tokens import (
    IGNORE_INDEX,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    Conversation,
    SpecialIds,
    count,
)


@dataclass(frozen=True)
class Tokenized:
    """One tokenised conversation; ``input_ids`` holds at most one ``IMAGE_TOKEN_INDEX``."""

    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, IGNORE_INDEX where not learnt
    seg_positions: torch.Tensor  # [k] int64, one per [SEG], in the expanded sequence
    rounds: int  # rounds kept after truncation
    n_bbox: int  # <bbox> tokens kept (the first n boxes of the sample are the ones asked about)


def image_text(text: str, im_start_end: bool = True) -> str:
    """``text`` with ``<image>`` wrapped in ``<im_start>``/``<im_end>`` (GLaMM's setting)."""
    return text.replace(IMAGE_TOKEN, IM_START + IMAGE_TOKEN + IM_END) if im_start_end else text


def encode(text: str, tokenizer: Any) -> list[int]:
    """Token ids of ``text`` without special tokens, ``<image>`` becoming ``IMAGE_TOKEN_INDEX``."""
    out: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            out.append(IMAGE_TOKEN_INDEX)
        if chunk:
            out.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def expanded_length(input_ids: Sequence[int], num_image_tokens: int) -> int:
    """The length the LLM sees once each placeholder is ``num_image_tokens`` embeddings."""
    return len(input_ids) + (num_image_tokens - 1) * count(input_ids, IMAGE_TOKEN_INDEX)


def seg_positions(input_ids: Sequence[int], seg_id: int, num_image_tokens: int) -> list[int]:
    """Index, in the expanded sequence, of the token predicting each ``[SEG]`` (module docstring)."""
    ids = list(input_ids)
    images = [i for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX]
    if len(images) > 1:
        raise ValueError(f"{len(images)} image placeholders; one per conversation is supported")
    out = []
    for j, token in enumerate(ids):
        if token != seg_id:
            continue
        if j == 0:
            raise ValueError("[SEG] is the first token: nothing predicts it")
        shift = num_image_tokens - 1 if images and images[0] <= j - 1 else 0
        out.append(j - 1 + shift)
    return out


def tokenize_conversation(
    conv: Conversation,
    tokenizer: Any,
    ids: SpecialIds,
    *,
    num_image_tokens: int,
    max_length: int | None = None,
    im_start_end: bool = True,
    add_bos: bool = True,
    counts: Counter | None = None,
) -> Tokenized | None:
    """Tokenise ``conv`` (module docstring); ``None`` when truncation drops it (counted)."""
    counts = counts if counts is not None else Counter()
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    head = [ids.bos] if add_bos and ids.bos is not None else []
    rounds: list[tuple[list[int], list[int]]] = []
    for i in range(len(conv.rounds)):
        instruction = encode(image_text(conv.instruction(i), im_start_end), tokenizer)
        answer_text = conv.answer(i)
        answer = encode(answer_text, tokenizer) if answer_text is not None else []
        if IMAGE_TOKEN_INDEX in answer:
            raise ValueError("<image> inside an answer")
        rounds.append((instruction, answer))
    n_images = sum(count(instr, IMAGE_TOKEN_INDEX) for instr, _ in rounds)
    if n_images > 1:
        raise ValueError(f"{n_images} <image> tokens in one conversation; one is supported")

    kept = len(rounds)
    if max_length is not None:
        length = expanded_length(head, num_image_tokens)
        kept = 0
        for instruction, answer in rounds:
            length += expanded_length(instruction + answer, num_image_tokens)
            if length > max_length:
                break
            kept += 1
        if kept == 0:
            counts["tokens:too_long"] += 1
            return None
        dropped = rounds[kept:]
        if any(ids.seg in instr + answer for instr, answer in dropped):
            counts["tokens:truncated_seg"] += 1
            return None
        if dropped:
            counts["tokens:truncated_rounds"] += 1

    input_ids = list(head)
    labels = [IGNORE_INDEX] * len(head)
    for instruction, answer in rounds[:kept]:
        input_ids += instruction + answer
        labels += [IGNORE_INDEX] * len(instruction) + answer
    return Tokenized(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        seg_positions=torch.tensor(seg_positions(input_ids, ids.seg, num_image_tokens), dtype=torch.long),
        rounds=kept,
        n_bbox=count(input_ids, ids.bbox),
    )
