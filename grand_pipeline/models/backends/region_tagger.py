"""Region tagger: class-agnostic region proposals classified by the tagger (the lite OV-SAM).

The reference pipeline runs OV-SAM over the SA-1B masks of an image so that every mask gets an
open-vocabulary label. Offline we have no such model, so this detector crops each sizeable
proposal and asks the configured tagger (shared through the ``ModelHub``, never loaded twice)
for its best class. The output is an ordinary ``Detections`` and takes part in the L1 vote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.config import check_ranges
from grand_pipeline.models.roles import Detections, Detector, Region, register_backend

logger = logging.getLogger(__name__)

MODEL_NAME = "region_tagger"


def padded_crop_box(bbox: np.ndarray, pad: float, height: int, width: int) -> tuple[int, int, int, int]:
    """xyxy float box grown by ``pad`` x its size on each side, clipped, as integer slice bounds.

    Always returns a non-empty (x1, y1, x2, y2) with x1 < x2 <= width and y1 < y2 <= height.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    pw, ph = pad * max(x2 - x1, 0.0), pad * max(y2 - y1, 0.0)
    left = int(np.clip(np.floor(x1 - pw), 0, width - 1))
    top = int(np.clip(np.floor(y1 - ph), 0, height - 1))
    right = int(np.clip(np.ceil(x2 + pw), left + 1, width))
    bottom = int(np.clip(np.ceil(y2 + ph), top + 1, height))
    return left, top, right, bottom


@dataclass(frozen=True)
class RegionTaggerOptions:
    tagger: str = "tagger"
    """Hub key of the tagger whose crop classifier labels the regions."""
    min_area: float = 0.01
    """Regions below this fraction of the image are not classified (cost: one crop each). Not
    ``level1.region_min_area``, which picks the regions that lend floating objects attributes."""
    min_score: float = 0.1
    """A region whose top-1 class scores below this gives no box. Left looser than (or equal
    to) ``level1.score_thresholds.region_tagger`` in the shipped profiles, so the ensemble's
    pre-filter is the cut that decides."""
    max_regions: int = 64
    """The largest regions first; bounds the crops per image."""
    context_pad: float = 0.1
    """Crop padding, a fraction of the box side, for the classifier's natural context."""

    def validate(self) -> None:
        check_ranges(self, unit=("min_area", "min_score"), at_least_one=("max_regions",),
                     non_negative=("context_pad",))


@register_backend("detector", "region_tagger", options=RegionTaggerOptions)
class RegionTagger(Detector):
    """Labels ``context[i]["regions"]`` with the tagger's top-1 class.

    Options: :class:`RegionTaggerOptions`.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: RegionTaggerOptions = self.opts
        if hub is None:
            raise ValueError("region_tagger needs the ModelHub to reach the tagger it shares")
        self.tagger = hub.get(opts.tagger)
        self.min_area = opts.min_area
        self.min_score = opts.min_score
        self.max_regions = opts.max_regions
        self.context_pad = opts.context_pad
        self.model_id = f"region-tagger({self.tagger.model_id})"
        self.weights_id = getattr(self.tagger, "weights_id", "")

    def select(self, regions: list[Region], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Regions worth classifying: area >= min_area * H * W, the ``max_regions`` largest.

        Returns (indices into ``regions`` sorted by area descending, (K, 4) float32 boxes).
        """
        if not regions:
            return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
        boxes = np.stack([np.asarray(r.bbox, np.float32).reshape(4) for r in regions])
        wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)
        area = wh[:, 0] * wh[:, 1]
        idx = np.flatnonzero(area >= self.min_area * height * width)
        idx = idx[np.argsort(-area[idx], kind="stable")][: self.max_regions]
        return idx.astype(np.int64), boxes[idx]

    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        """Per image: (K, 4) float32 region boxes as given, tagger scores and class names."""
        results = []
        for i, image in enumerate(images):
            regions = (context[i].get("regions") if context else None) or []
            results.append(self._detect_one(image, regions))
        return results

    def _detect_one(self, image: np.ndarray, regions: list[Region]) -> Detections:
        height, width = image.shape[:2]
        _, boxes = self.select(regions, height, width)
        if len(boxes) == 0:
            return Detections.empty(MODEL_NAME)
        # A padded rectangular crop, not the mask pixels on a blank background: ImageNet-style
        # classifiers were trained on natural context and misfire on cut-outs with flat fill.
        crops = []
        for box in boxes:
            x1, y1, x2, y2 = padded_crop_box(box, self.context_pad, height, width)
            crops.append(np.ascontiguousarray(image[y1:y2, x1:x2]))
        # One batched call per image: the tagger batches crops far better than one by one.
        tags = self.tagger.classify_crops(crops, top_k=1)
        keep, scores, labels = [], [], []
        for k, top in enumerate(tags):
            if top and top[0].score >= self.min_score:
                keep.append(k)
                scores.append(top[0].score)
                labels.append(top[0].name)
        logger.debug("region_tagger: %d regions -> %d crops -> %d kept", len(regions), len(crops), len(keep))
        if not keep:
            return Detections.empty(MODEL_NAME)
        return Detections(
            boxes=boxes[np.asarray(keep, np.int64)].astype(np.float32),
            scores=np.asarray(scores, np.float32),
            labels=labels,
            model=MODEL_NAME,
        )
