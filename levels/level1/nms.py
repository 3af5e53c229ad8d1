"""NmsStage: per-member score pre-filter and class-agnostic NMS, as the reference merge does.

Each member's boxes are filtered and deduplicated on their own (boxes of one model never vote for
each other later), so a detector that fires twice on one object under two class names counts once.
Person synonyms are rewritten to ``person`` first, so the person rules see one label.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.geometry.boxes import nms
from grand_pipeline.models.roles import Detections
from grand_pipeline.stage import ImageRecord, Stage

logger = logging.getLogger(__name__)

PERSON = "person"
DEFAULT_SCORE_THRESHOLD = 0.1
#: Until ``PersonRules.floor`` exists in config, the reference's "person passes at 0.2".
DEFAULT_PERSON_FLOOR = 0.2


def normalise_labels(labels: list[str], synonyms: set[str]) -> list[str]:
    """Rewrite every person synonym (case-insensitive) to ``person``; other labels are kept."""
    return [PERSON if label.strip().lower() in synonyms else label for label in labels]


def member_thresholds(labels: list[str], threshold: float, person_floor: float | None) -> np.ndarray:
    """(N,) per-box score threshold: ``threshold``, or min(threshold, floor) for person boxes.

    ``person_floor`` is None for members without the person exception.
    """
    out = np.full(len(labels), threshold, dtype=np.float64)
    if person_floor is not None:
        out[[label == PERSON for label in labels]] = min(threshold, person_floor)
    return out


def filter_member(
    dets: Detections, threshold: float, person_floor: float | None, iou: float, synonyms: set[str]
) -> Detections:
    """Score pre-filter then class-agnostic greedy NMS of one member's detections."""
    dets = Detections(dets.boxes, dets.scores, normalise_labels(dets.labels, synonyms), dets.model)
    if len(dets) == 0:
        return dets
    scores = np.asarray(dets.scores, dtype=np.float64)
    passed = np.flatnonzero(scores >= member_thresholds(dets.labels, threshold, person_floor))
    dets = dets.take(passed)
    # nms returns kept indices by descending score, which later stages rely on for stable order.
    return dets.take(nms(dets.boxes, dets.scores, iou))


class NmsStage(Stage):
    """detections -> candidates, member by member."""

    name: ClassVar[str] = "nms"
    requires: ClassVar[dict[str, str]] = {"detections": "member -> Detections"}
    provides: ClassVar[dict[str, pa.DataType | None]] = {"candidates": None}

    def __init__(self, cfg: Any, hub: Any) -> None:
        super().__init__(cfg, hub)
        level1 = cfg.level1
        self.synonyms = {s.strip().lower() for s in level1.person.labels} | {PERSON}
        floor = float(getattr(level1.person, "floor", DEFAULT_PERSON_FLOOR))
        # Only members trusted to promote persons get the lower person threshold (reference: the
        # strong closed-set detectors), so a noisy open-vocabulary "person" is not let through.
        self.person_floor = {member: floor for member in level1.person.promote}

    def process(self, records: list[ImageRecord]) -> None:
        level1 = self.cfg.level1
        for record in records:
            candidates = {}
            for member, dets in record.fields["detections"].items():
                threshold = float(level1.score_thresholds.get(member, DEFAULT_SCORE_THRESHOLD))
                candidates[member] = filter_member(
                    dets, threshold, self.person_floor.get(member), level1.nms_iou, self.synonyms
                )
            record.fields["candidates"] = candidates
            logger.debug("%s: %s", record.image_id, {m: len(d) for m, d in candidates.items()})
