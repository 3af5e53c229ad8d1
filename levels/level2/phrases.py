"""PhraseStage: noun phrases of the short captions, the queries that grounding will answer.

Phrases of all captions of a micro-batch go to the extractor in one call. Per image they are
kept in caption order, a phrase already seen (case-insensitively) in an earlier caption is
skipped, as the reference skips phrases covered by earlier ones, and at most
``level2.max_phrases`` are kept. Phrases about the picture itself ("the photo", "this image")
or a vague "object" are dropped: there is nothing in the image to ground them to, and a box
grounder would answer with the whole frame, which would become a floating object. Each phrase
keeps its character offsets in its caption and, in memory only, its root noun, which grounding
uses as a label.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import Phrase, PhraseExtractor
from grand_pipeline.schemas import LEVEL2_FIELDS
from grand_pipeline.stage import ImageRecord, Stage
from levels.level2.common import caption_texts

logger = logging.getLogger(__name__)

PHRASES = next(f.type for f in LEVEL2_FIELDS if f.name == "phrases")

#: Root nouns that name the picture (or a vague "object"), not something in it.
META_ROOTS = frozenset(
    {"photo", "photograph", "image", "picture", "pic", "scene", "view", "shot", "snapshot", "object", "thing"}
)


def select_phrases(captions: list[str], found: list[list[Phrase]], limit: int) -> list[dict[str, Any]]:
    """Phrase dicts {phrase, caption_index, start, end, root}: distinct, caption order, <= limit.

    Raises ValueError when a phrase's offsets do not select its text in its caption: offsets are
    what every later grounding relies on, so a bad one is an extractor bug, not data.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, (caption, phrases) in enumerate(zip(captions, found, strict=True)):
        for p in phrases:
            if caption[p.start : p.end] != p.text:
                raise ValueError(f"phrase {p.text!r} is not caption[{p.start}:{p.end}] of {caption!r}")
            key = p.text.strip().lower()
            if not key or key in seen or p.root.strip().lower() in META_ROOTS:
                continue
            if len(out) >= limit:
                return out
            seen.add(key)
            out.append(
                {"phrase": p.text, "caption_index": index, "start": p.start, "end": p.end, "root": p.root}
            )
    return out


class PhraseStage(Stage):
    """short_captions -> ``phrases`` [{phrase, caption_index, start, end}] (+ ``root`` in memory)."""

    name: ClassVar[str] = "phrases"
    requires: ClassVar[dict[str, str]] = {"short_captions": "short captions of the image"}
    provides: ClassVar[dict[str, pa.DataType | None]] = {"phrases": PHRASES}
    models: ClassVar[tuple[str, ...]] = ("phrase_extractor",)

    def process(self, records: list[ImageRecord]) -> None:
        extractor = self.backend("phrase_extractor", PhraseExtractor)
        captions = [caption_texts(r) for r in records]
        flat = [c for per_image in captions for c in per_image]
        found = extractor.phrases(flat) if flat else []
        if len(found) != len(flat):
            raise ValueError(f"phrase extractor returned {len(found)} results for {len(flat)} texts")
        limit = self.cfg.level2.max_phrases
        start = 0
        for record, texts in zip(records, captions, strict=True):
            per_caption = found[start : start + len(texts)]
            start += len(texts)
            record.fields["phrases"] = select_phrases(texts, per_caption, limit)
            logger.debug("%s: %d phrases", record.image_id, len(record.fields["phrases"]))
