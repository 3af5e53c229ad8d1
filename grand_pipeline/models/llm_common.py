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
- ``PromptFormat`` renders prompts through the chat-template registry (``options.chat_template``)
  and tokenises them, so every backend counts and runs the same ids.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from grand_pipeline.config import ConfigError, check_ranges
from grand_pipeline.models import chat_templates
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


def continues_answer(prompt: ChatPrompt) -> bool:
    """True when the last message is a started assistant answer (an opener) to be continued."""
    return chat_templates.continues(prompt.messages)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts in front of any text by default (Llama's ``<s>``; none for most
    BPE tokenizers), found by encoding one word with and without special tokens.

    Only the leading ones are kept: a default suffix (an end-of-sequence some tokenizers append)
    would close the turn the model is meant to write.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


@dataclass(eq=False)
class PromptFormat:
    """One backend's road from a ``ChatPrompt`` to text and token ids: a chat template (see
    :mod:`grand_pipeline.models.chat_templates`) plus the tokenizer that reads its text.

    Every backend renders through this, so the count the budget check uses is exactly what the
    model reads, whichever template was chosen.
    """

    template: chat_templates.ChatTemplate
    tokenizer: Any = None
    prefix_ids: list[int] = field(default_factory=list)
    """Ids put before the text: the tokenizer's usual BOS for the templates written here; none
    when the template writes its special tokens itself (a tokenizer's own template does)."""

    @classmethod
    def build(cls, tokenizer: Any, name: str | None) -> PromptFormat:
        """``name`` (``options.chat_template``; None means ``auto``) resolved for ``tokenizer``."""
        template = chat_templates.resolve(name, tokenizer)
        prefix = [] if template.writes_special_tokens or tokenizer is None else leading_special_ids(tokenizer)
        return cls(template=template, tokenizer=tokenizer, prefix_ids=prefix)

    @property
    def name(self) -> str:
        return self.template.name

    def text(self, prompt: ChatPrompt) -> str:
        """The templated text, ending with the assistant header (or inside an opener)."""
        return self.template.render(prompt.messages)

    def token_ids(self, prompt: ChatPrompt) -> list[int]:
        """What the model reads: ``prefix_ids`` then the text's tokens, no other special tokens."""
        if self.tokenizer is None:
            raise RuntimeError(f"chat template {self.name!r} has no tokenizer to count with")
        ids = self.tokenizer(self.text(prompt), add_special_tokens=False)["input_ids"]
        return [*self.prefix_ids, *ids]


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


@dataclass(frozen=True)
class LLMOptions:
    """Options every LLM backend takes; a backend with more subclasses it."""

    chat_template: str | None = None
    """Conversation template prompts are rendered with (None: ``auto``); see ``chat_templates``."""
    context_length: int | None = None
    """Tokens of prompt + answer the backend allows (None: the model's own)."""

    #: Template names accepted besides the registry's (the openai backend adds ``server``).
    extra_templates: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        check_ranges(self, at_least_one=("context_length",))
        name = self.chat_template
        if name and name not in chat_templates.CHAT_TEMPLATES and name not in self.extra_templates:
            known = ", ".join([*self.extra_templates, *chat_templates.CHAT_TEMPLATES.names()])
            raise ConfigError(f"chat_template: unknown chat template {name!r}; known: {known}")


def chat_template_option(opts: LLMOptions) -> str | None:
    """``chat_template`` of a backend's options (None when unset: ``auto``)."""
    return opts.chat_template or None
