"""GLaMM's special tokens and the ``llava_v1`` conversation template, as data.

GLaMM (like LLaVA-1.5, which it extends) adds ``<im_start> <im_end> <bbox> <point> [SEG] <p> </p>``
to a Vicuna tokenizer, in that order. ``<image>`` is *not* a vocabulary token: the tokeniser puts
``IMAGE_TOKEN_INDEX`` in its place and the model swaps that one id for the CLIP patch embeddings.

The ``llava_v1`` template renders rounds as::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

i.e. ``sep=" "`` after the system line and after each user message, ``sep2="</s>"`` after each
answer. A round whose answer is ``None`` ends the prompt at ``ASSISTANT:`` (an inference prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The placeholder id of ``<image>`` in ``input_ids``; expanded to N patch embeddings by the model.
IMAGE_TOKEN_INDEX = -200
#: The label of positions that do not count in the cross-entropy (Hugging Face's convention).
IGNORE_INDEX = -100

IMAGE_TOKEN = "<image>"
IM_START = "<im_start>"
IM_END = "<im_end>"
BBOX_TOKEN = "<bbox>"
POINT_TOKEN = "<point>"
SEG_TOKEN = "[SEG]"
P_START = "<p>"
P_END = "</p>"

#: Tokens added to the tokenizer, in the reference's order (with Vicuna's 32,000 words they get
#: ids 32000..32006, so ``<bbox>`` = 32002 as the released checkpoints expect).
SPECIAL_TOKENS = (IM_START, IM_END, BBOX_TOKEN, POINT_TOKEN, SEG_TOKEN, P_START, P_END)

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP = " "
SEP2 = "</s>"


class TokenizerError(ValueError):
    """The injected tokenizer lacks a special token (or a pad id) the data needs."""


@dataclass(frozen=True)
class Conversation:
    """A ``llava_v1`` conversation: ``rounds`` of (user message, assistant answer or ``None``).

    Only the last round may have a ``None`` answer (the prompt a model completes at inference).
    """

    rounds: tuple[tuple[str, str | None], ...]
    system: str = SYSTEM

    def __post_init__(self) -> None:
        if not self.rounds:
            raise ValueError("a conversation needs at least one round")
        if any(answer is None for _, answer in self.rounds[:-1]):
            raise ValueError("only the last round may be unanswered")

    def instruction(self, index: int) -> str:
        """Round ``index``'s text up to and including ``ASSISTANT:`` (the part never learnt)."""
        user, _ = self.rounds[index]
        head = self.system + SEP if index == 0 else ""
        return f"{head}{ROLES[0]}: {user}{SEP}{ROLES[1]}:"

    def answer(self, index: int) -> str | None:
        """Round ``index``'s learnt text: the answer and its ``</s>``; ``None`` when unanswered."""
        answer = self.rounds[index][1]
        return None if answer is None else answer + SEP2

    def prompt(self) -> str:
        """The whole conversation as one string (what ``conversation_list`` carries)."""
        parts = []
        for i in range(len(self.rounds)):
            answer = self.answer(i)
            parts.append(self.instruction(i) + ("" if answer is None else " " + answer))
        return "".join(parts)


def add_special_tokens(tokenizer: Any) -> int:
    """Add ``SPECIAL_TOKENS`` to ``tokenizer`` (as the reference does); returns how many were new.

    The caller resizes the model's embeddings by that many rows.
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return int(tokenizer.add_tokens(missing, special_tokens=True))


@dataclass(frozen=True)
class SpecialIds:
    """The ids the data pipeline looks for in ``input_ids``."""

    seg: int
    bbox: int
    im_start: int
    im_end: int
    pad: int
    bos: int | None

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialIds:
        """Read the ids from ``tokenizer``; raises :class:`TokenizerError` naming what is missing,
        because a ``[SEG]`` that tokenises to several pieces would never be matched to its mask."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in (SEG_TOKEN, BBOX_TOKEN, IM_START, IM_END) if t not in vocab]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks {', '.join(missing)}: call tokens.add_special_tokens(tokenizer) first"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
        if pad is None:
            raise TokenizerError("tokenizer has neither a pad nor an unk token to pad with")
        return cls(
            seg=vocab[SEG_TOKEN],
            bbox=vocab[BBOX_TOKEN],
            im_start=vocab[IM_START],
            im_end=vocab[IM_END],
            pad=int(pad),
            bos=tokenizer.bos_token_id,
        )


def count(ids: Sequence[int], token_id: int) -> int:
    return sum(1 for i in ids if i == token_id)
