"""AdditionalContextStage: background knowledge (uses, history, dangers) about what a photo shows.

The LLM reads a simplified scene graph: up to ``max_objects`` entries (``label/attribute``, the
Level-3 renderer's) and the landmark. Answers go through the same generate / verify / regenerate
loop as the dense caption. The local checks: 5-7 sentences in one paragraph, a clean ending, none
of the words that would turn background knowledge into a photo description, and no repetition
loop. The content check: the paragraph must be about the photo, naming its landmark or one of its
objects or tags, by lemma or by synonym through the text embedder (:mod:`levels.level4.relevance`).
An image whose every answer failed to generate becomes an error row of this stage.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import Generation, TextEmbedder
from grand_pipeline.schemas import LEVEL4_FIELDS
from grand_pipeline.stage import ImageRecord
from levels.level4.relevance import relevance_issues, scene_terms
from levels.scene_text import landmark_line, object_entry, select_objects
from levels.text import repetition_issues
from levels.verified_stage import VerifiedLLMStage
from levels.verify import Issue, Outcome, compile_patterns, ending_issues, sentence_issues, wording_issues
from prompts.base import get_prompt

ADDITIONAL_CONTEXT: pa.DataType = next(f.type for f in LEVEL4_FIELDS if f.name == "additional_context")

#: Words the paper's prompt forbids ("scene" also covers "scene graph").
#: Meta-language, and the regeneration prompt echoed back ("The previous answer had these
#: problems: ..."), which small models do.
FORBIDDEN = compile_patterns(
    (r"\bobjects?\b", r"\bscenes?\b", r"\bas an ai\b", r"\bprevious answer\b", r"\bhad these problems\b")
)
_BLANK_LINE = re.compile(r"\n\s*\n")

#: The provenance entry of rows whose relevance check had no text embedder to ask.
LEMMA_ONLY = {
    "role": "text_embedder",
    "backend": "none",
    "model_id": "relevance checked by lemma only: no text_embedder configured",
    "heuristic": True,
    "weights": "",
}


def simple_graph(fields: dict[str, Any], max_objects: int) -> str:
    """``label/attribute, ...`` then the landmark line. Repeated entries are listed once: the
    list only hints at a theme, and repetition would just cost context."""
    objects = select_objects(fields, max_objects, need_depth=False)
    entries = ", ".join(dict.fromkeys(object_entry(obj) for obj in objects))
    landmark = landmark_line(fields.get("landmark"))
    return "\n".join(part for part in (entries, landmark) if part)


def context_issues(text: str, min_sentences: int, max_sentences: int) -> list[Issue]:
    """Problems of an additional-context paragraph that need no model."""
    paragraphs = _BLANK_LINE.search(text.strip())
    return (
        ([Issue("paragraphs", "is more than one paragraph")] if paragraphs else [])
        + ending_issues(text)
        + sentence_issues(text, min_sentences, max_sentences)
        + wording_issues(text, FORBIDDEN, "uses a forbidden word")
        + repetition_issues(text)
    )


class AdditionalContextStage(VerifiedLLMStage):
    """Provides ``additional_context`` {text, verified, attempts}."""

    name: ClassVar[str] = "additional_context"
    requires: ClassVar[dict[str, str]] = {
        "objects": "level-3 objects (labels, attributes)",
        "floating_objects": "level-3 floating objects",
        "landmark": "level-2 landmark category",
        "tags": "level-1 image tags (relevance)",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"additional_context": ADDITIONAL_CONTEXT}
    models: ClassVar[tuple[str, ...]] = ("llm", "text_embedder")
    # Synonyms only widen the relevance check: without an embedder it is lemma-only (and says so).
    optional_models: ClassVar[tuple[str, ...]] = ("text_embedder",)
    output: ClassVar[str] = "additional_context"
    section: ClassVar[str] = "level4"
    nothing_to_say: ClassVar[str] = "no objects and no landmark, no additional context"

    def __init__(self, cfg: Any, hub: Any) -> None:
        super().__init__(cfg, hub)
        self.first = get_prompt("additional_context")
        self.regenerate = get_prompt("additional_context_regenerate")

    def embedder(self) -> TextEmbedder | None:
        return self.backend("text_embedder", TextEmbedder) if "text_embedder" in self.backends else None

    def prompt_fields(self, record: ImageRecord) -> dict[str, Any] | None:
        # Nothing to build on: an empty, unverified answer rather than an invented one.
        graph = simple_graph(record.fields, self.settings.max_objects)
        return {"scene_graph": graph} if graph else None

    def empty_value(self) -> dict[str, Any]:
        return {"text": "", "verified": False, "attempts": []}

    def value(self, outcome: Outcome) -> dict[str, Any]:
        return {"text": outcome.text, "verified": outcome.verified, "attempts": outcome.attempts}

    def check(self, records: list[ImageRecord], answers: list[Generation]) -> list[list[Issue]]:
        cfg = self.settings
        texts = [g.text.strip() for g in answers]
        terms = [scene_terms(record.fields) for record in records]
        relevance = relevance_issues(texts, terms, self.embedder(), cfg.relevance_similarity)
        return [
            context_issues(text, cfg.min_sentences, cfg.max_sentences) + more
            for text, more in zip(texts, relevance, strict=True)
        ]

    def annotate(self, record: ImageRecord, outcome: Outcome) -> None:
        if self.embedder() is None and outcome.attempts:
            lemma_only = {"stage": self.name, **LEMMA_ONLY}
            if lemma_only not in record.backends:  # once, even when a failed batch is rerun
                record.backends.append(lemma_only)
