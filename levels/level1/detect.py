"""DetectStage: runs every member of the detector ensemble on the micro-batch.

The ensemble is configuration (``models.detectors``), so the backends cannot be a static
``models`` tuple: ``__init__`` asks the hub for each member. ``self.backends`` is keyed by member
name, and the base class stamps each member into the row's provenance.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from grand_pipeline.models.roles import Backend, Detections, Detector
from grand_pipeline.stage import ImageRecord, Stage

logger = logging.getLogger(__name__)


def checked_detections(dets: Detections, member: str) -> Detections:
    """Detections with float32 (N, 4)/(N,) arrays and ``model`` set to the member name.

    The vote keys everything by member name, and a malformed output should fail here, naming
    the member, rather than deep inside the vote.
    """
    boxes = np.asarray(dets.boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(dets.scores, dtype=np.float32).reshape(-1)
    labels = [str(label) for label in dets.labels]
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"detector {member!r} returned {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
        )
    return Detections(boxes=boxes, scores=scores, labels=labels, model=member)


class DetectStage(Stage):
    """Calls ``detect(images, context)`` once per member; context = the image's tags and regions."""

    name: ClassVar[str] = "detect"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "regions": "SA-1B region proposals (may be empty)",
        "tags": "image tags from the tags stage",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"detections": None}

    def __init__(self, cfg: Any, hub: Any) -> None:
        self.cfg = cfg
        self.backends: dict[str, Backend] = {
            member: hub.get(f"detectors.{member}") for member in cfg.models.detectors
        }

    def process(self, records: list[ImageRecord]) -> None:
        images = [r.pixels for r in records]
        context = [{"tags": [t["name"] for t in r.fields["tags"]], "regions": r.regions} for r in records]
        per_record: list[dict[str, Detections]] = [{} for _ in records]
        for member in self.backends:
            results = self.backend(member, Detector).detect(images, context)
            if len(results) != len(records):
                raise ValueError(
                    f"detector {member!r} returned {len(results)} results for {len(records)} images"
                )
            for out, dets in zip(per_record, results, strict=True):
                out[member] = checked_detections(dets, member)
        for record, by_member in zip(records, per_record, strict=True):
            record.fields["detections"] = by_member
            logger.debug("%s: %s", record.image_id, {m: len(d) for m, d in by_member.items()})
