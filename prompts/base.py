"""Versioned prompt templates. A prompt is data plus a version; its rendering is golden-tested.

Bump ``version`` whenever the wording changes: rows record (prompt, version), so outputs made with
different wordings can always be told apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

from grand_pipeline.models.roles import ChatPrompt
from grand_pipeline.registry import Registry


@cache
def load_examples(filename: str) -> tuple[dict[str, Any], ...]:
    """In-context examples from ``prompts/examples/<filename>``, read once, on first use."""
    text = (resources.files("prompts") / "examples" / filename).read_text()
    return tuple(json.loads(text))


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    system: str
    user_template: str
    """``str.format`` template over the fields given to ``render``."""
    examples_file: str | None = None
    """JSON list of {"input": ..., "output": ...} turned into prior user/assistant turns."""
    max_new_tokens: int = 256
    answer_prefix: str = ""
    """``str.format`` template for the first words of the answer, which the model continues (an
    "opener"). Small models follow a started sentence far better than an instruction to mention
    something. Empty: the model starts the answer itself. See :func:`with_prefix`."""

    def render(self, max_new_tokens: int | None = None, **fields: Any) -> ChatPrompt:
        messages = [{"role": "system", "content": self.system}]
        if self.examples_file:
            for example in load_examples(self.examples_file):
                messages.append({"role": "user", "content": self.user_template.format(**example["input"])})
                messages.append({"role": "assistant", "content": example["output"]})
        messages.append({"role": "user", "content": self.user_template.format(**fields)})
        prefix = self.answer_prefix.format(**fields).strip() if self.answer_prefix else ""
        if prefix:
            # A final assistant turn is continued, not answered (see llm_common.render_messages).
            messages.append({"role": "assistant", "content": prefix})
        # The system turn and examples are identical for every image: that shared prefix is what
        # batching and vLLM's prefix caching exploit, so it is keyed by name and version.
        return ChatPrompt(
            messages=messages,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            prefix_key=f"{self.name}@{self.version}",
        )

    def prefix_of(self, prompt: ChatPrompt) -> str:
        """The opener ``render`` put at the start of the answer ("" without one)."""
        last = prompt.messages[-1] if prompt.messages else {}
        return str(last.get("content", "")) if self.answer_prefix and last.get("role") == "assistant" else ""

    def stamp(self) -> dict[str, str]:
        return {"prompt": self.name, "version": self.version}


PROMPTS: Registry[PromptTemplate] = Registry("prompt")


def register(template: PromptTemplate) -> PromptTemplate:
    PROMPTS.register(template.name)(template)
    return template


def get_prompt(name: str) -> PromptTemplate:
    import prompts.library  # noqa: F401 - registers the built-in prompts

    return PROMPTS.get(name)


def with_prefix(template: PromptTemplate, name: str, answer_prefix: str) -> PromptTemplate:
    """A registered variant of ``template`` whose answers start with ``answer_prefix``; rows stamp
    the variant's own name, so captions written with an opener are always told apart."""
    return register(replace(template, name=name, answer_prefix=answer_prefix))


def join_answer(prefix: str, continuation: str) -> str:
    """``prefix`` followed by the model's continuation of it, with one space where words meet."""
    continuation = continuation.strip()
    if not prefix:
        return continuation
    if not continuation or continuation[0] in ".,;:!?'\")":
        return prefix + continuation
    return f"{prefix} {continuation}"
