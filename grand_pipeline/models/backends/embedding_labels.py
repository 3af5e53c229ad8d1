"""Label assigner ``embedding_context``: pick the candidate label that fits the image's context.

The lite stand-in for the reference's EVA-CLIP crop scoring (``heuristic = True``): the box's
pixels are not looked at. Each candidate label of a box is embedded with the shared sentence
embedder and compared with the image's context text (captions and tags, built by the stage); the
most similar candidate wins. A box with a single candidate keeps it without any embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.models.backends.embedding_grounder import shared_text_embedder
from grand_pipeline.models.roles import LabelAssigner, register_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingLabelsOptions:
    text_embedder: str = "text_embedder"
    """Hub key of the shared text embedder."""


@register_backend("label_assigner", "embedding_context", options=EmbeddingLabelsOptions)
class EmbeddingContextLabeller(LabelAssigner):
    """argmax over a box's candidates of cos(candidate, context). Options: ``text_embedder`` hub key."""

    heuristic = True

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.embedder = shared_text_embedder(hub, self.opts.text_embedder, "embedding_context")
        self.model_id = f"embedding_context({self.embedder.model_id})"
        self.weights_id = getattr(self.embedder, "weights_id", "")

    def assign(
        self, image: np.ndarray | None, boxes: np.ndarray, candidates: list[list[str]], context: str
    ) -> list[str]:
        """One label per box. Ties (and an empty context) go to the first candidate."""
        if len(candidates) != len(np.asarray(boxes).reshape(-1, 4)):
            raise ValueError(f"{len(candidates)} candidate lists for {len(boxes)} boxes")
        if any(not c for c in candidates):
            raise ValueError("every box needs at least one candidate label")
        # Only boxes with a real choice and a context to choose by need the embedder.
        ambiguous = sorted({str(label) for c in candidates if len(c) > 1 for label in c})
        if not ambiguous or not context.strip():
            return [str(c[0]) for c in candidates]
        emb = self.embedder.embed([context, *ambiguous])
        similarity = dict(zip(ambiguous, (emb[1:] @ emb[0]).tolist(), strict=True))
        out = []
        for cands in candidates:
            if len(cands) == 1:
                out.append(str(cands[0]))
                continue
            scores = [similarity[str(c)] for c in cands]
            out.append(str(cands[int(np.argmax(scores))]))
        return out
