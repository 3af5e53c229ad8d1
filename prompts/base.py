"""Versioned prompt templates. A prompt is data plus a version; its rendering is golden-tested.

Bump ``version`` whenever the wording changes: rows record (prompt, version), so outputs made with
different wordings can always be told apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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

    def render(self, max_new_tokens: int | None = None, **fields: Any) -> ChatPrompt:
        messages = [{"role": "system", "content": self.system}]
        if self.examples_file:
            for example in load_examples(self.examples_file):
                messages.append({"role": "user", "content": self.user_template.format(**example["input"])})
                messages.append({"role": "assistant", "content": example["output"]})
        messages.append({"role": "user", "content": self.user_template.format(**fields)})
        # The system turn and examples are identical for every image: that shared prefix is what
        # batching and vLLM's prefix caching exploit, so it is keyed by name and version.
        return ChatPrompt(
            messages=messages,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            prefix_key=f"{self.name}@{self.version}",
        )

    def stamp(self) -> dict[str, str]:
        return {"prompt": self.name, "version": self.version}


PROMPTS: Registry[PromptTemplate] = Registry("prompt")


def register(template: PromptTemplate) -> PromptTemplate:
    PROMPTS.register(template.name)(template)
    return template


def get_prompt(name: str) -> PromptTemplate:
    import prompts.library  # noqa: F401 - registers the built-in prompts

    return PROMPTS.get(name)
