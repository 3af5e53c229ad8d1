"""A test-only plugin backend: an LLM whose answers are scripted in its spec's options.

Loaded through ``plugins: [tests.scripted_llm]``. Options:

- ``script``: prompt name -> answers. The prompt name is read from ``ChatPrompt.prefix_key``
  (``name@version``). Answers are a list (the same script for every image) or a dict
  ``{substring: list}``: the first key found in the prompt's last user message picks the list, so
  images (or captions, for the checklist prompt) get their own scripts. The n-th call for the same
  (prompt name, key) gets the n-th answer, the last one repeating; for a plain list the key is the
  whole last user message. An answer is a string (a normal, stopped answer) or a dict with
  ``text``, ``finish_reason`` and ``error``.
- ``always_fail``: every answer is cut off (``finish_reason="length"``), so nothing ever passes.
- ``context_length``: prompts whose tokens (characters / 4) plus ``max_new_tokens`` exceed it get
  an ``error`` Generation without an answer, like the real backends.

Every ``generate`` call's prompts are kept in ``calls``, so tests can count batched calls.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from grand_pipeline.models.roles import LLM, ChatPrompt, Generation, register_backend


@dataclass(frozen=True)
class ScriptedOptions:
    script: dict[str, Any] = field(default_factory=dict)
    always_fail: bool = False
    context_length: int = 1_000_000


@register_backend("llm", "scripted", options=ScriptedOptions)
class ScriptedLLM(LLM):
    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        options = spec.options
        self.script: dict[str, Any] = dict(options.get("script") or {})
        self.always_fail = bool(options.get("always_fail", False))
        self.context_length = int(options.get("context_length", 1_000_000))
        self.calls: list[list[ChatPrompt]] = []
        self.temperatures: list[float] = []
        self._served: Counter[tuple[str, str]] = Counter()

    def count_tokens(self, prompt: ChatPrompt) -> int:
        return sum(len(m["content"]) for m in prompt.messages) // 4

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        self.calls.append(list(prompts))
        self.temperatures.append(temperature)
        return [self._answer(p) for p in prompts]

    def _answer(self, prompt: ChatPrompt) -> Generation:
        tokens = self.count_tokens(prompt)
        if tokens + prompt.max_new_tokens > self.context_length:
            message = f"prompt of {tokens} tokens + {prompt.max_new_tokens} new exceeds context {self.context_length}"
            return Generation(text="", finish_reason="error", prompt_tokens=tokens, error=message)
        if self.always_fail:
            return Generation("A cup stands on", "length", tokens, prompt.max_new_tokens)
        name = prompt.prefix_key.partition("@")[0]
        if name not in self.script:
            return Generation("", "error", tokens, 0, error=f"no script for prompt {name!r}")
        question = prompt.messages[-1]["content"]
        answers = self.script[name]
        key = question
        if isinstance(answers, dict):
            key = next((k for k in answers if k in question), "")
            if not key:
                return Generation("", "error", tokens, 0, error=f"no scripted answer of {name!r} matches")
            answers = answers[key]
        served = self._served[(name, key)]
        self._served[(name, key)] += 1
        answer = answers[min(served, len(answers) - 1)]
        if isinstance(answer, str):
            answer = {"text": answer}
        text = answer.get("text", "")
        return Generation(
            text=text,
            finish_reason=answer.get("finish_reason", "stop"),
            prompt_tokens=tokens,
            completion_tokens=len(text.split()),
            error=answer.get("error"),
        )
