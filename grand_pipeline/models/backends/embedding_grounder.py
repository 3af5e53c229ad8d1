"""Grounder ``embedding_match``: a phrase grounds to the detected object whose text it resembles.

The lite stand-in for GroundingDINO/MDETR (``heuristic = True``): no offline phrase grounder
exists, so a phrase is compared, with the shared sentence embedder (MiniLM), to the texts of each
object: each of its labels alone, and "label, other labels, first attribute" together. An
object's similarity is the best over its texts, because a noisy attribute ("white space suit")
dilutes the combined text: "person" vs "person, white space suit" is only 0.43 with MiniLM, while
"the cup" vs "cup, white cup" (0.76) shows what the attribute adds when it fits. The most similar
object at cosine >= ``threshold`` grounds the phrase, with that object's box and score = the
cosine. It can only point at boxes that level 1 found; it never proposes a new box.

``shared_text_embedder`` is also used by the other embedding backends of levels 2 and 3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.config import check_ranges
from grand_pipeline.models.roles import Grounder, Grounding, TextEmbedder, register_backend

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5


def shared_text_embedder(hub: Any, key: str, owner: str) -> TextEmbedder:
    """The hub's text embedder under ``key`` (the backend's ``text_embedder`` option)."""
    if hub is None:
        raise ValueError(f"{owner} needs the ModelHub to reach the text embedder it shares")
    embedder = hub.get(key)
    if not isinstance(embedder, TextEmbedder):
        raise TypeError(f"{owner}: hub key {key!r} is not a text embedder")
    return embedder


def _distinct(items: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(i).strip() for i in items if i is not None and str(i).strip()))


def object_text(obj: dict[str, Any]) -> str:
    """An object's full text: label, other labels, first attribute (no duplicates)."""
    return ", ".join(
        _distinct([obj.get("label"), *(obj.get("labels") or []), *(obj.get("attributes") or [])[:1]])
    )


def object_texts(obj: dict[str, Any]) -> list[str]:
    """Every text an object is matched by: each label alone, then the full text ([] if none)."""
    return _distinct([obj.get("label"), *(obj.get("labels") or []), object_text(obj)])


@dataclass(frozen=True)
class EmbeddingGrounderOptions:
    threshold: float = DEFAULT_THRESHOLD
    """Cosine similarity a phrase needs to its best object (phrase -> box, level 2); not
    ``level3.embedding_match``, which grounds caption phrases to object ids in level 3."""
    text_embedder: str = "text_embedder"
    """Hub key of the shared text embedder."""

    def validate(self) -> None:
        check_ranges(self, unit=("threshold",))


@register_backend("grounder", "embedding_match", options=EmbeddingGrounderOptions)
class EmbeddingGrounder(Grounder):
    """Phrase -> the most similar object's box, when the cosine similarity is high enough.

    Options: :class:`EmbeddingGrounderOptions`.
    """

    heuristic = True

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.embedder = shared_text_embedder(hub, self.opts.text_embedder, "embedding_match")
        self.threshold = self.opts.threshold
        self.model_id = f"embedding_match({self.embedder.model_id})"
        self.weights_id = getattr(self.embedder, "weights_id", "")

    def ground(
        self, image: np.ndarray | None, phrases: list[str], objects: list[dict[str, Any]]
    ) -> list[Grounding | None]:
        """One Grounding (box (4,) float64 xyxy of the chosen object) or None per phrase.

        The image is not looked at. Ties go to the first object (objects come before floating
        objects in the caller's list, so a voted object wins over a floating one).
        """
        if not phrases:
            return []
        per_object = [object_texts(obj) for obj in objects]
        unique = _distinct([t for texts in per_object for t in texts])
        if not unique:
            return [None] * len(phrases)
        emb = self.embedder.embed([str(p) for p in phrases] + unique)
        # Unit vectors: the dot product is the cosine similarity. (P, T) -> (P, objects) by max.
        sims = emb[: len(phrases)] @ emb[len(phrases) :].T
        column = {text: j for j, text in enumerate(unique)}
        scores = np.full((len(phrases), len(objects)), -np.inf)
        for k, texts in enumerate(per_object):
            if texts:
                scores[:, k] = sims[:, [column[t] for t in texts]].max(axis=1)
        out: list[Grounding | None] = []
        for phrase, row in zip(phrases, scores, strict=True):
            best = int(np.argmax(row))  # first maximum on ties
            score = float(row[best])
            if score < self.threshold:
                out.append(None)
                continue
            box = np.asarray(objects[best]["bbox"], dtype=np.float64).reshape(4)
            out.append(Grounding(phrase=str(phrase), box=box, score=score))
        return out
