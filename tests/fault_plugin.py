"""A test-only plugin backend: a detector that kills its own process on first use.

Loaded through ``plugins: [tests.fault_plugin]``; the flag file makes it die exactly once, so the
engine's replacement actor succeeds on the retry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from grand_pipeline.models.roles import LLM, ChatPrompt, Detections, Detector, Generation, register_backend


@dataclass(frozen=True)
class DieOnceOptions:
    flag: str = ""


@dataclass(frozen=True)
class BrokenLLMOptions:
    after_probe: bool = False


@register_backend("detector", "die_once", options=DieOnceOptions)
class DieOnce(Detector):
    def detect(self, images, context=None):
        flag = Path(self.spec.options["flag"])
        if not flag.exists():
            flag.write_text("died")
            os._exit(1)  # no cleanup, like an OOM kill of the actor process
        return [Detections.empty("die_once") for _ in images]


@register_backend("llm", "broken_llm", options=BrokenLLMOptions)
class BrokenLLM(LLM):
    """An LLM engine that fails every call; with ``options.after_probe`` it first answers the
    start-up probe, so the run starts and every unit's generations fail (a node losing its GPU)."""

    def count_tokens(self, prompt: ChatPrompt) -> int:
        return sum(len(m["content"].split()) for m in prompt.messages)

    def generate(self, prompts, *, temperature: float = 0.0, seed: int = 0):
        if self.spec.options.get("after_probe") and all(p.prefix_key == "startup_check" for p in prompts):
            return [Generation(text="Blue.", finish_reason="stop") for _ in prompts]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
