"""Landmark classifier ``embedding_zero_shot``: the image's text against the 4x14 taxonomy.

The lite stand-in for the reference's LLaVA questions (``heuristic = True``): the pixels are not
looked at. The stage hands over one text per image (tags, captions, object labels); it is
embedded with the shared sentence embedder and compared with one description per fine category
of ``grand_pipeline.taxonomy``. Descriptions list typical objects of each place because the
image texts are mostly lists of object names, and a sentence embedder matches like with like.

The chosen fine category is the most similar one; its primary category follows from the
taxonomy. ``score`` is the softmax probability of the winner over the 14 cosines divided by
``temperature`` (0.05 by default: MiniLM cosines of related texts differ by a few hundredths,
so a CLIP-like 1/100 scale would be too flat to tell a clear case from a coin toss).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.config import check_ranges
from grand_pipeline.models.backends.embedding_grounder import shared_text_embedder
from grand_pipeline.models.roles import LandmarkClassifier, register_backend
from grand_pipeline.taxonomy import fine_categories

logger = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.05

#: (category, fine category) -> a description in the words an image's tags would use.
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("Indoor scene", "Living space"): "a photo of a living space indoors: a home with a sofa, bed, "
    "kitchen, table, chairs, television, lamp and a cup of coffee",
    ("Indoor scene", "Work space"): "a photo of a work space indoors: an office with a desk, "
    "computer, laptop, keyboard, monitor, books and papers",
    ("Indoor scene", "Public space"): "a photo of a public space indoors: a shop, restaurant, "
    "museum, library, hall or shopping mall with people",
    ("Indoor scene", "Industrial space"): "a photo of an industrial space indoors: a factory, "
    "warehouse or workshop with machines, tools and shelves",
    ("Outdoor scene", "Urban landscape"): "a photo of an urban landscape outdoors: a city street "
    "with buildings, sidewalk, cars, traffic lights and people",
    ("Outdoor scene", "Rural landscape"): "a photo of a rural landscape outdoors: a farm, barn, "
    "fields, fences, cows, horses and a village",
    ("Outdoor scene", "Natural landscape"): "a photo of a natural landscape outdoors: mountains, "
    "forest, trees, river, lake, beach, sky and clouds",
    ("Transportation scene", "Road"): "a photo of a road: traffic with cars, trucks, buses, "
    "motorcycles, a highway, street signs and traffic lights",
    ("Transportation scene", "Airport"): "a photo of an airport: airplanes, a runway, a terminal and luggage",
    ("Transportation scene", "Train station"): "a photo of a train station: a train, railway "
    "tracks, a platform and passengers",
    ("Transportation scene", "Port and harbor"): "a photo of a port and harbor: boats, ships, a "
    "dock, a pier, water and containers",
    ("Sports and recreation scene", "Sporting venue"): "a photo of a sporting venue: a stadium, "
    "field or court with players, a ball and spectators",
    ("Sports and recreation scene", "Recreational area"): "a photo of a recreational area: a park, "
    "playground, swimming pool, picnic, bench or amusement park",
    ("Sports and recreation scene", "Gym and fitness center"): "a photo of a gym and fitness "
    "center: exercise machines, dumbbells, weights, treadmill and yoga mats",
}


def softmax_winners(logits: np.ndarray, classes: list[tuple[str, str]]) -> list[tuple[str, str, float]]:
    """Per row of ``logits`` (N, len(classes)): the best (category, fine category) and its softmax
    probability. Shared with ``clip_landmark``, which only computes its logits differently."""
    logits = logits - logits.max(axis=1, keepdims=True)  # exp() of large logits would overflow
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    out = []
    for row in probs:
        best = int(np.argmax(row))
        category, fine = classes[best]
        out.append((category, fine, float(row[best])))
    return out


@dataclass(frozen=True)
class EmbeddingLandmarkOptions:
    temperature: float = DEFAULT_TEMPERATURE
    """Softmax temperature over cosine similarities; > 0."""
    text_embedder: str = "text_embedder"
    """Hub key of the shared text embedder."""

    def validate(self) -> None:
        check_ranges(self, positive=("temperature",))


@register_backend("landmark_classifier", "embedding_zero_shot", options=EmbeddingLandmarkOptions)
class EmbeddingLandmarkClassifier(LandmarkClassifier):
    """Zero-shot (category, fine_category, score) per image text.

    Options: :class:`EmbeddingLandmarkOptions`.
    """

    heuristic = True

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.embedder = shared_text_embedder(hub, self.opts.text_embedder, "embedding_zero_shot")
        self.temperature = self.opts.temperature
        self.classes = fine_categories()
        missing = [pair for pair in self.classes if pair not in DESCRIPTIONS]
        if missing:
            raise ValueError(f"embedding_zero_shot: no description for {missing}")
        # The 14 descriptions are embedded once per backend, not once per batch.
        self.class_embeddings = self.embedder.embed([DESCRIPTIONS[pair] for pair in self.classes])
        self.model_id = f"embedding_zero_shot({self.embedder.model_id})"
        self.weights_id = getattr(self.embedder, "weights_id", "")

    def classify(self, images: list[np.ndarray | None], texts: list[str]) -> list[tuple[str, str, float]]:
        """(category, fine_category, softmax score in (0, 1]) per text; images are not used."""
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} texts for {len(images)} images")
        if not texts:
            return []
        cosines = self.embedder.embed([str(t) for t in texts]) @ self.class_embeddings.T  # (N, 14)
        return softmax_winners(cosines.astype(np.float64) / self.temperature, self.classes)
