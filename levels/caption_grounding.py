"""Caption grounding: phrases of a caption -> object ids, with character offsets into the caption.

The reference's post-processing (``ground_dense_caption.py``) in three passes, with its bugs fixed:

1. **exact**: each object's first attribute and each relationship phrase, found as a whole-word,
   case-insensitive match in the caption. Matching runs on the original caption with
   ``re.IGNORECASE`` instead of on a lower-cased copy, so offsets can never drift (lower-casing
   may change a string's length) and nothing is stripped afterwards: ``caption[s:e] == phrase``.
2. **embedding**: the caption's noun chunks that pass 1 left untouched are embedded and compared
   with each object's text (attribute + label) and each relationship phrase; the best target at
   cosine >= threshold wins. Replaces the reference's lemma-substring score.
3. **noun**: chunks still ungrounded are matched by their nouns against object ``labels``
   (exactly, or as a plural in "s"/"es"). One hit grounds; two hits where one box contains the
   other ground the outer one; anything else is left ungrounded rather than guessed.

A detail is ``{"phrase", "tokens_positive": [s, e], "ids", "method"}`` (``schemas.DETAIL``). This
module is pure logic: it gets the phrase extractor and text embedder instances from its caller.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.geometry.boxes import box_contains
from grand_pipeline.models.roles import Phrase, PhraseExtractor, TextEmbedder

logger = logging.getLogger(__name__)

EXACT, EMBEDDING, NOUN = "exact", "embedding", "noun"

Span = tuple[int, int]


@dataclass(frozen=True)
class Target:
    """Something a caption phrase can be grounded to: a text and the object ids it stands for."""

    text: str
    ids: tuple[int, ...]


def word_pattern(phrase: str) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive pattern of ``phrase``; any run of whitespace matches any other."""
    words = phrase.split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def object_label(obj: Mapping[str, Any]) -> str:
    """The chosen label, else the first vote (level-1 objects have no chosen label yet)."""
    return str(obj.get("label") or next(iter(obj.get("labels") or []), "") or "")


def first_attribute(obj: Mapping[str, Any]) -> str:
    attributes = obj.get("attributes") or []
    return str(attributes[0]).strip() if attributes else ""


def object_text(obj: Mapping[str, Any]) -> str:
    """ "attribute label", without repeating a label the attribute already names ("white cup")."""
    label, attribute = object_label(obj), first_attribute(obj)
    pattern = word_pattern(label)
    if attribute and (pattern is None or pattern.search(attribute)):
        return attribute
    return " ".join(part for part in (attribute, label) if part)


def relationship_list(relationships: Any) -> list[Mapping[str, Any]]:
    """The level-2 ``relationships`` column ({"grounding": [...]}) or its list, as a list."""
    if relationships is None:
        return []
    if isinstance(relationships, Mapping):
        return list(relationships.get("grounding") or [])
    return list(relationships)


def label_matches(word: str, label: str) -> bool:
    """``word`` is ``label`` or its plural by "s"/"es" (case-insensitive)."""
    word, label = word.lower(), label.lower()
    return bool(label) and word in (label, label + "s", label + "es")


def _labels(obj: Mapping[str, Any]) -> set[str]:
    return {str(v) for v in [*(obj.get("labels") or []), obj.get("label")] if v}


def _overlaps(span: Span, spans: Sequence[Span]) -> bool:
    return any(span[0] < e and s < span[1] for s, e in spans)


def _checked(caption: str, phrases: Sequence[Phrase]) -> list[Phrase]:
    """Phrases whose offsets really slice the caption; a backend that breaks that contract is
    logged and its phrase ignored, so a bad offset can never reach a detail."""
    good = []
    for phrase in phrases:
        if (
            0 <= phrase.start < phrase.end <= len(caption)
            and caption[phrase.start : phrase.end] == phrase.text
        ):
            good.append(phrase)
        else:
            logger.warning(
                "ignoring phrase %r at [%d, %d): not a slice of the caption",
                phrase.text,
                phrase.start,
                phrase.end,
            )
    return good


class CaptionGrounder:
    """Grounds any number of captions of one image; target embeddings are computed once, lazily."""

    def __init__(
        self,
        objects: Sequence[Mapping[str, Any]],
        relationships: Any,
        extractor: PhraseExtractor,
        embedder: TextEmbedder,
        embedding_threshold: float,
    ) -> None:
        self.objects = {int(obj["id"]): obj for obj in objects}
        self.extractor = extractor
        self.embedder = embedder
        self.threshold = float(embedding_threshold)
        self.attribute_targets = [
            Target(first_attribute(obj), (oid,)) for oid, obj in self.objects.items() if first_attribute(obj)
        ]
        self.relationship_targets: list[Target] = []
        for rel in relationship_list(relationships):
            # Relationship ids that name no object (an upstream bug) are dropped, never exported.
            ids = tuple(sorted({int(i) for i in rel.get("object_ids") or []} & self.objects.keys()))
            if ids and str(rel.get("phrase") or "").strip():
                self.relationship_targets.append(Target(str(rel["phrase"]).strip(), ids))
        self.embedding_targets = [
            Target(text, (oid,)) for oid, obj in self.objects.items() if (text := object_text(obj))
        ] + self.relationship_targets
        self._target_vectors: np.ndarray | None = None

    def ground(self, caption: str, phrases: Sequence[Phrase] | None = None) -> list[dict[str, Any]]:
        """Details of ``caption``; ``phrases`` are its noun chunks when the caller batched them."""
        if not caption or not self.objects:
            return []
        if phrases is None:
            phrases = self.extractor.phrases([caption])[0]
        chunks = _checked(caption, phrases)
        found = self._exact(caption)
        left = [p for p in chunks if not _overlaps((p.start, p.end), list(found))]
        found.update(self._embedding(left))
        left = [p for p in left if (p.start, p.end) not in found]
        if left:
            found.update(self._noun(caption, left))
        return clean_details(caption, found)

    def _exact(self, caption: str) -> dict[Span, tuple[set[int], str]]:
        found: dict[Span, tuple[set[int], str]] = {}
        for target in self.attribute_targets + self.relationship_targets:
            pattern = word_pattern(target.text)
            for match in pattern.finditer(caption) if pattern else ():
                # Several objects with the same attribute make one ambiguous mention: union the ids.
                found.setdefault(match.span(), (set(), EXACT))[0].update(target.ids)
        return found

    def _embedding(self, chunks: Sequence[Phrase]) -> dict[Span, tuple[set[int], str]]:
        if not chunks or not self.embedding_targets:
            return {}
        if self._target_vectors is None:
            self._target_vectors = np.asarray(self.embedder.embed([t.text for t in self.embedding_targets]))
        vectors = np.asarray(self.embedder.embed([p.text for p in chunks]))
        scores = vectors @ self._target_vectors.T  # both L2-normalised: cosine similarity
        best = scores.argmax(axis=1)
        return {
            (p.start, p.end): (set(self.embedding_targets[j].ids), EMBEDDING)
            for p, j, row in zip(chunks, best, scores, strict=True)
            if row[j] >= self.threshold
        }

    def _noun(self, caption: str, chunks: Sequence[Phrase]) -> dict[Span, tuple[set[int], str]]:
        nouns = _checked(caption, self.extractor.nouns(caption))
        found: dict[Span, tuple[set[int], str]] = {}
        for chunk in chunks:
            inside = [n for n in nouns if chunk.start <= n.start and n.end <= chunk.end]
            # The head noun decides first: in "a cup of coffee" the phrase is about the cup.
            inside.sort(key=lambda n: n.root.lower() != chunk.root.lower())
            for noun in inside:
                oid = self._noun_object({noun.text, noun.root})
                if oid is not None:
                    found[(chunk.start, chunk.end)] = ({oid}, NOUN)
                    break
        return found

    def _noun_object(self, words: set[str]) -> int | None:
        hits = [
            oid
            for oid, obj in self.objects.items()
            if any(label_matches(w, label) for w in words for label in _labels(obj))
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) == 2:
            a, b = (self.objects[h]["bbox"] for h in hits)
            if box_contains(a, b):
                return hits[0]
            if box_contains(b, a):
                return hits[1]
        return None


def clean_details(caption: str, found: Mapping[Span, tuple[set[int], str]]) -> list[dict[str, Any]]:
    """Drop spans inside a longer span grounded to the same ids; sort by start.

    ``found`` is keyed by span, so every (span, ids) is unique already.
    """
    items = [(span, tuple(sorted(ids)), method) for span, (ids, method) in found.items() if ids]
    kept = [
        (span, ids, method)
        for span, ids, method in items
        if not any(
            o_ids == ids and o_span != span and o_span[0] <= span[0] and span[1] <= o_span[1]
            for o_span, o_ids, _ in items
        )
    ]
    kept.sort(key=lambda item: (item[0][0], item[0][1], item[1]))
    return [
        {"phrase": caption[s:e], "tokens_positive": [s, e], "ids": list(ids), "method": method}
        for (s, e), ids, method in kept
    ]


def ground_caption(
    caption: str,
    objects: Sequence[Mapping[str, Any]],
    relationships: Any,
    extractor: PhraseExtractor,
    embedder: TextEmbedder,
    embedding_threshold: float,
) -> list[dict[str, Any]]:
    """Details grounding ``caption`` to ``objects`` (objects and floating objects together)."""
    return CaptionGrounder(objects, relationships, extractor, embedder, embedding_threshold).ground(caption)
