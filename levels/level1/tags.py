"""TagStage: image-level tags, which also steer the open-vocabulary detectors of the ensemble."""

from __future__ import annotations

import logging
from typing import ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import Tag, Tagger
from grand_pipeline.schemas import TAG
from grand_pipeline.stage import ImageRecord, Stage
from levels.objects import round_score

logger = logging.getLogger(__name__)


def select_tags(tags: list[Tag], top_k: int, threshold: float) -> list[dict[str, object]]:
    """The ``top_k`` best tags scoring at least ``threshold``, as ``{"name", "score"}`` dicts.

    Sorted here (stable, best first) rather than trusting the backend's order, so a backend that
    returns tags alphabetically cannot change which ones survive the cut.
    """
    kept = sorted((t for t in tags if float(t.score) >= threshold), key=lambda t: -float(t.score))
    return [{"name": str(t.name), "score": round_score(t.score)} for t in kept[:top_k]]


class TagStage(Stage):
    """Tags the micro-batch with one tagger call."""

    name: ClassVar[str] = "tags"
    requires: ClassVar[dict[str, str]] = {"image": "decoded RGB image"}
    provides: ClassVar[dict[str, pa.DataType | None]] = {"tags": pa.list_(TAG)}
    models: ClassVar[tuple[str, ...]] = ("tagger",)

    def process(self, records: list[ImageRecord]) -> None:
        level1 = self.cfg.level1
        results = self.backend("tagger", Tagger).tag([r.pixels for r in records])
        if len(results) != len(records):
            raise ValueError(f"tagger returned {len(results)} results for {len(records)} images")
        for record, tags in zip(records, results, strict=True):
            record.fields["tags"] = select_tags(tags, level1.tag_top_k, level1.tag_threshold)
            logger.debug("%s: %d tags", record.image_id, len(record.fields["tags"]))
