"""Landmark classifier ``clip_landmark``: CLIP zero-shot over the 4x14 taxonomy (paper Tab. 7).

The whole image is scored against one prompt per fine category ("a photo of a train station,
a transportation scene"); the primary category follows from the taxonomy. ``score`` is CLIP's
softmax probability of the winner, with CLIP's own learned logit scale.

The CLIP is ``clip_labels.ClipScorer``, shared per model hub and weights folder, so the label
assigner and this classifier on the same weights load CLIP once. An image given as ``None``
(the stage had no pixels) is classified from its text through CLIP's text tower instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.models.backends.clip_labels import load_clip
from grand_pipeline.models.backends.embedding_landmark import softmax_winners
from grand_pipeline.models.roles import LandmarkClassifier, register_backend
from grand_pipeline.taxonomy import fine_categories

logger = logging.getLogger(__name__)

TEMPLATE = "a photo of a {fine}, {category}."


@dataclass(frozen=True)
class ClipLandmarkOptions:
    template: str = TEMPLATE
    """Formatted with ``fine`` and ``category``."""


@register_backend("landmark_classifier", "clip_landmark", options=ClipLandmarkOptions)
class ClipLandmarkClassifier(LandmarkClassifier):
    """(category, fine_category, softmax score) per image. Options: :class:`ClipLandmarkOptions`."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        template = self.opts.template
        self.clip, self.weights_id, self.model_id = load_clip(spec, "clip_landmark", hub)
        self.classes = fine_categories()
        prompts = [template.format(fine=fine.lower(), category=cat.lower()) for cat, fine in self.classes]
        self.class_embeddings = self.clip.texts(prompts)  # (14, D), once per backend

    def classify(self, images: list[np.ndarray | None], texts: list[str]) -> list[tuple[str, str, float]]:
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        if not images:
            return []
        queries = np.zeros((len(images), self.class_embeddings.shape[1]), np.float32)
        pixels = {i: img for i, img in enumerate(images) if img is not None}
        without = [i for i, img in enumerate(images) if img is None]
        if pixels:
            queries[list(pixels)] = self.clip.images(list(pixels.values()))
        if without:
            queries[without] = self.clip.texts([str(texts[i]) for i in without])
        logits = (queries @ self.class_embeddings.T).astype(np.float64) * self.clip.logit_scale
        return softmax_winners(logits, self.classes)
