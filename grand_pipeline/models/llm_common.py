"""What every ``llm`` backend shares: the context budget check, batching order, result bookkeeping.

The three backends (``gguf_transformers``, ``openai``, ``vllm``) differ only in how they run the
prompts that fit. Everything around that lives here so that they behave the same:

- ``admit`` counts each prompt's tokens and turns every prompt that cannot run (its tokens plus
  ``max_new_tokens`` exceed the context, or it could not even be templated) into an ``error``
  ``Generation`` without running it; the rest are returned for the backend to run.
- ``plan_batches`` orders the runnable prompts so that prompts sharing a ``prefix_key`` (the same
  in-context examples) sit next to each other, shortest first within a prefix group, and cuts them
  into batches. Neighbours of similar length waste less left padding, and a shared prefix is what
  prefix caching (vLLM) reuses.
- ``Pending`` collects results by original index and refuses to hand back a list with holes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from grand_pipeline.models.roles import ChatPrompt, Generation

logger = logging.getLogger(__name__)

#: ``finish_reason`` values a Generation may carry.
FINISH_REASONS = ("stop", "length", "error")


def budget_error(prompt_tokens: int, max_new_tokens: int, context_length: int) -> str | None:
    """Why a prompt cannot run within ``context_length``, or None when it fits."""
    if max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {max_new_tokens}"
    if prompt_tokens + max_new_tokens > context_length:
        return f"prompt of {prompt_tokens} tokens + {max_new_tokens} new exceeds context {context_length}"
    return None


def error_generation(message: str, prompt_tokens: int = 0) -> Generation:
    """The Generation of a prompt that did not run (or whose run failed)."""
    return Generation(text="", finish_reason="error", prompt_tokens=prompt_tokens, error=message)


def estimate_tokens(prompt: ChatPrompt, chars_per_token: float = 3.5) -> int:
    """An upper-side token estimate for when no tokenizer is at hand.

    English BPE averages about 4 characters a token; dividing by 3.5 over-counts on purpose, so a
    budget check built on it errs towards refusing rather than overflowing the server's context.
    Each message also pays a few tokens of chat-template markup (role header, separators).
    """
    chars = sum(len(m.get("content", "")) for m in prompt.messages)
    return math.ceil(chars / chars_per_token) + 4 * len(prompt.messages) + 3


def render_messages(tokenizer: Any, prompt: ChatPrompt) -> str:
    """The chat-templated text of ``prompt``, ending with the assistant header.

    Templating to text and tokenising that text (without adding special tokens again) gives the
    same ids as ``apply_chat_template(tokenize=True)`` on both transformers 4 and 5, whose return
    types differ.
    """
    if continues_answer(prompt):
        # The prompt already holds the start of the answer: the model must go on from its last
        # word, so the assistant turn is left open instead of closed and re-opened.
        return tokenizer.apply_chat_template(
            prompt.messages, add_generation_prompt=False, continue_final_message=True, tokenize=False
        )
    return tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)


def continues_answer(prompt: ChatPrompt) -> bool:
    """True when the last message is a started assistant answer (an opener) to be continued."""
    return bool(prompt.messages) and prompt.messages[-1].get("role") == "assistant"


def template_token_ids(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """Token ids of the chat-templated prompt (what ``count_tokens`` counts and the model reads)."""
    return list(tokenizer(render_messages(tokenizer, prompt), add_special_tokens=False)["input_ids"])


@dataclass
class Pending:
    """Results of one ``generate`` call, filled by original prompt index."""

    size: int
    results: list[Generation | None] = field(init=False)

    def __post_init__(self) -> None:
        self.results = [None] * self.size

    def set(self, index: int, generation: Generation) -> None:
        if generation.finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason {generation.finish_reason!r}")
        self.results[index] = generation

    def done(self) -> list[Generation]:
        missing = [i for i, r in enumerate(self.results) if r is None]
        if missing:
            raise RuntimeError(f"llm backend left prompts {missing} without a Generation")
        return [r for r in self.results if r is not None]


@dataclass
class Admitted:
    """Outcome of the budget check: ``runnable`` indices to run, token counts for all prompts."""

    pending: Pending
    counts: list[int]
    runnable: list[int]


def admit(prompts: Sequence[ChatPrompt], count: Callable[[ChatPrompt], int], context_length: int) -> Admitted:
    """Count every prompt; over-budget or untemplatable prompts get their error Generation now."""
    pending = Pending(len(prompts))
    counts = [0] * len(prompts)
    runnable: list[int] = []
    for i, prompt in enumerate(prompts):
        try:
            counts[i] = int(count(prompt))
        except Exception as exc:  # one malformed prompt must not fail its neighbours
            logger.warning("prompt %d could not be tokenised: %s", i, exc)
            pending.set(i, error_generation(f"prompt could not be tokenised: {exc}"))
            continue
        problem = budget_error(counts[i], int(prompt.max_new_tokens), context_length)
        if problem is not None:
            logger.debug("prompt %d skipped: %s", i, problem)
            pending.set(i, error_generation(problem, prompt_tokens=counts[i]))
        else:
            runnable.append(i)
    return Admitted(pending=pending, counts=counts, runnable=runnable)


def plan_batches(
    indices: Sequence[int], prompts: Sequence[ChatPrompt], counts: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Cut ``indices`` into batches of at most ``batch_size``, grouped by prefix, short to long.

    Prefix groups keep the order in which their first prompt appears; within a group prompts go
    by token count (ties by index, so the plan is deterministic). A small group shares its batch
    with the start of the next group rather than running half-empty.
    """
    batch_size = max(1, int(batch_size))
    first_seen: dict[str, int] = {}
    for i in indices:
        first_seen.setdefault(prompts[i].prefix_key, len(first_seen))
    ordered = sorted(indices, key=lambda i: (first_seen[prompts[i].prefix_key], counts[i], i))
    return [ordered[lo : lo + batch_size] for lo in range(0, len(ordered), batch_size)]


def options_of(spec: Any) -> dict[str, Any]:
    """``spec.options`` as a plain dict (absent or None -> empty)."""
    return dict(getattr(spec, "options", None) or {})
