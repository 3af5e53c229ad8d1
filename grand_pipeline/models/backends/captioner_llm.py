"""Captioner ``llm_from_tags``: the lite LLM writes one short caption from tags and object labels.

No offline image captioner exists for the lite profile, so this backend is a labelled heuristic
(``heuristic = True``): the configured LLM (shared through the ``ModelHub``) never sees the
pixels; it turns the image's tags and detected object labels into one sentence through the
``short_caption`` prompt. All images of a micro-batch go to the LLM in one ``generate`` call.

A generation that failed (``finish_reason == "error"``) or is empty after cleaning gives no
caption for that image: nothing is invented in its place.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.config import check_ranges
from grand_pipeline.models.roles import LLM, Captioner, StartupProblem, register_backend
from prompts.base import PromptTemplate, get_prompt

logger = logging.getLogger(__name__)

PROMPT = "short_caption"
#: A leading "Caption:"-style label some small models repeat from the prompt.
_LEADING_LABEL = re.compile(r"^\s*(caption|answer|sentence)\s*:\s*", re.IGNORECASE)
#: The end of the first sentence: terminal punctuation (and a closing quote) before whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'`]?\s")
_QUOTES = "\"'`"


def clean_caption(text: str) -> str:
    """The first sentence of a generation, without labels or wrapping quotes; "" if nothing is left."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    caption = _LEADING_LABEL.sub("", lines[0]).strip()
    caption = _SENTENCE_END.split(caption, maxsplit=1)[0]
    return caption.strip().strip(_QUOTES).strip()


def listing(items: list[str], limit: int) -> str:
    """Distinct items, first-seen order, at most ``limit``, comma-separated ("none" if empty)."""
    unique = list(dict.fromkeys(str(i).strip() for i in items if str(i).strip()))[:limit]
    return ", ".join(unique) if unique else "none"


@dataclass(frozen=True)
class LLMFromTagsOptions:
    llm: str = "llm"
    """Hub key of the LLM that writes the captions."""
    max_new_tokens: int | None = None
    """None: the prompt's own budget."""
    temperature: float = 0.0
    seed: int = 0
    max_items: int = 20
    """Tags and object labels listed in the prompt, at most."""

    def validate(self) -> None:
        check_ranges(self, at_least_one=("max_new_tokens", "max_items"), non_negative=("temperature",))


@register_backend("captioner", "llm_from_tags", options=LLMFromTagsOptions)
class LLMFromTagsCaptioner(Captioner):
    """One caption per image from ``context[i]["tags"]`` and ``context[i]["objects"]``.

    Options (``spec.options``): ``llm`` hub key ("llm"), ``max_new_tokens`` (the prompt's, 48),
    ``temperature`` (0.0: greedy, reproducible), ``seed`` (0), ``max_items`` (20 tags and 20
    object labels at most, so the prompt stays short for small context windows).
    """

    heuristic = True

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        if hub is None:
            raise ValueError("llm_from_tags needs the ModelHub to reach the LLM it shares")
        opts: LLMFromTagsOptions = self.opts
        llm = hub.get(opts.llm)
        if not isinstance(llm, LLM):
            raise TypeError(f"llm_from_tags: hub key {opts.llm!r} is not an LLM backend")
        self.llm: LLM = llm
        self.prompt: PromptTemplate = get_prompt(PROMPT)
        self.max_new_tokens = opts.max_new_tokens or self.prompt.max_new_tokens
        self.temperature = opts.temperature
        self.seed = opts.seed
        self.max_items = opts.max_items
        self.model_id = f"llm_from_tags({llm.model_id})"
        self.weights_id = getattr(llm, "weights_id", "")

    def startup_problem(self) -> StartupProblem | None:
        """The shared LLM's start-up probe: this captioner is only as good as its LLM."""
        return self.llm.startup_problem()

    def prompt_stamp(self) -> dict[str, str]:
        """(prompt, version) the captions were written with; the stage records it per row."""
        return self.prompt.stamp()

    def caption(self, images: list[np.ndarray], context: list[dict[str, Any]]) -> list[list[str]]:
        """One caption (or none) per image; images are not looked at (see module docstring)."""
        if len(context) != len(images):
            raise ValueError(f"{len(context)} contexts for {len(images)} images")
        results: list[list[str]] = [[] for _ in images]
        prompts, targets = [], []
        for i, ctx in enumerate(context):
            tags = [str(t) for t in ctx.get("tags") or []]
            objects = [str(o) for o in ctx.get("objects") or []]
            if not tags and not objects:
                continue  # nothing to write from: no caption rather than a made-up one
            prompts.append(
                self.prompt.render(
                    max_new_tokens=self.max_new_tokens,
                    tags=listing(tags, self.max_items),
                    objects=listing(objects, self.max_items),
                )
            )
            targets.append(i)
        if not prompts:
            return results
        generations = self.llm.generate(prompts, temperature=self.temperature, seed=self.seed)
        if len(generations) != len(prompts):
            raise ValueError(f"LLM returned {len(generations)} generations for {len(prompts)} prompts")
        for i, gen in zip(targets, generations, strict=True):
            if gen.finish_reason == "error":
                logger.warning("short caption of image %d failed: %s", i, gen.error)
                continue
            caption = clean_caption(gen.text)
            if caption:
                results[i] = [caption]
        return results
