"""LandmarkStage: the image's landmark (category, fine category) over the paper's 4x14 taxonomy.

The classifier gets the pixels and one text per image (captions, then tags and object labels).
An image with no text at all and no pixels-based classifier would get a made-up answer from a
text-only backend, so an image without any text gets ``landmark`` None instead; a backend that
looks at pixels is still asked (its ``heuristic`` flag tells which kind it is).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import LandmarkClassifier
from grand_pipeline.schemas import LEVEL2_FIELDS
from grand_pipeline.stage import ImageRecord, Stage
from grand_pipeline.taxonomy import fine_categories
from levels.level2.common import scene_text
from levels.objects import round_score

logger = logging.getLogger(__name__)

LANDMARK = next(f.type for f in LEVEL2_FIELDS if f.name == "landmark")


class LandmarkStage(Stage):
    """One classifier call per micro-batch -> ``landmark`` {category, fine_category, score}."""

    name: ClassVar[str] = "landmark"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "tags": "level-1 tags",
        "short_captions": "short captions",
        "objects": "objects",
        "floating_objects": "floating objects",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"landmark": LANDMARK}
    models: ClassVar[tuple[str, ...]] = ("landmark_classifier",)

    def process(self, records: list[ImageRecord]) -> None:
        classifier = self.backend("landmark_classifier", LandmarkClassifier)
        texts = [scene_text(r) for r in records]
        # Text-only (heuristic) classifiers cannot say anything about an image with no text.
        asked = [i for i, text in enumerate(texts) if text or not classifier.heuristic]
        for record in records:
            record.fields["landmark"] = None
        if not asked:
            return
        results = classifier.classify([records[i].pixels for i in asked], [texts[i] for i in asked])
        if len(results) != len(asked):
            raise ValueError(f"landmark classifier returned {len(results)} results for {len(asked)} images")
        known = set(fine_categories())
        for i, (category, fine, score) in zip(asked, results, strict=True):
            if (category, fine) not in known:
                raise ValueError(f"landmark ({category!r}, {fine!r}) is not in the taxonomy")
            records[i].fields["landmark"] = {
                "category": category,
                "fine_category": fine,
                "score": round_score(score),
            }
            logger.debug("%s: landmark %s / %s", records[i].image_id, category, fine)
