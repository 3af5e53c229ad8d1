"""CaptionStage: short captions per image (the reference's BLIP-2 and LLaVA captions).

The captioner gets the pixels plus the image's tags and voted object labels; the full-profile
captioners look at the pixels, the lite one writes from the labels only (and says so in
provenance). A captioner that works through a prompt exposes ``prompt_stamp()``; the stage
records that (prompt, version) in the row's ``prompt_versions``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import Captioner
from grand_pipeline.schemas import LEVEL2_FIELDS
from grand_pipeline.stage import ImageRecord, Stage
from levels.level2.common import tag_names
from levels.objects import object_labels

logger = logging.getLogger(__name__)

SHORT_CAPTIONS = next(f.type for f in LEVEL2_FIELDS if f.name == "short_captions")


def add_prompt_version(record: ImageRecord, stamp: dict[str, str]) -> None:
    """Append ``stamp`` to the record's prompt versions once (earlier levels' stamps are kept)."""
    versions: list[dict[str, Any]] = list(record.fields.get("prompt_versions") or [])
    if stamp not in versions:
        versions.append(dict(stamp))
    record.fields["prompt_versions"] = versions


class CaptionStage(Stage):
    """One captioner call per micro-batch -> ``short_captions`` [{caption, source}]."""

    name: ClassVar[str] = "captions"
    requires: ClassVar[dict[str, str]] = {
        "image": "decoded RGB image",
        "tags": "level-1 tags",
        "objects": "level-1 objects",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"short_captions": SHORT_CAPTIONS}
    models: ClassVar[tuple[str, ...]] = ("captioner",)

    def process(self, records: list[ImageRecord]) -> None:
        captioner = self.backend("captioner", Captioner)
        # Only voted objects: floating ones are single-model guesses, and a caption that names
        # them would turn a guess into a "confirmed" phrase at grounding time.
        context = [{"tags": tag_names(r), "objects": object_labels(r, ("objects",))} for r in records]
        results = captioner.caption([r.pixels for r in records], context)
        if len(results) != len(records):
            raise ValueError(f"captioner returned {len(results)} results for {len(records)} images")
        stamp_of = getattr(captioner, "prompt_stamp", None)
        for record, captions in zip(records, results, strict=True):
            record.fields["short_captions"] = [
                {"caption": str(c).strip(), "source": captioner.backend} for c in captions if str(c).strip()
            ]
            if callable(stamp_of):
                add_prompt_version(record, stamp_of())
            logger.debug("%s: %d short captions", record.image_id, len(record.fields["short_captions"]))
