"""GroundCaptionsStage: ground the dense caption and every short caption to object ids.

Runs after the dense caption is written (and verified). The grounding itself is
:mod:`levels.caption_grounding`; this stage only gathers each image's captions, extracts their noun
chunks in one batched call per micro-batch, and stores the details.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pyarrow as pa

from grand_pipeline.models.roles import PhraseExtractor, TextEmbedder
from grand_pipeline.schemas import LEVEL3_FIELDS
from grand_pipeline.stage import ImageRecord, Stage
from levels.caption_grounding import CaptionGrounder

logger = logging.getLogger(__name__)

SHORT_CAPTIONS_GROUNDED: pa.DataType = next(
    f.type for f in LEVEL3_FIELDS if f.name == "short_captions_grounded"
)


def _captions(record: ImageRecord) -> list[str]:
    """The dense caption (possibly "") first, then the short captions, in order."""
    dense = record.fields.get("dense_caption") or {}
    shorts = record.fields.get("short_captions") or []
    return [str(dense.get("caption") or "")] + [str(item.get("caption") or "") for item in shorts]


class GroundCaptionsStage(Stage):
    """Fills ``dense_caption["details"]``; provides ``short_captions_grounded``."""

    name: ClassVar[str] = "ground_captions"
    requires: ClassVar[dict[str, str]] = {
        "dense_caption": "dense caption dict (caption, details, verified, attempts)",
        "short_captions": "level-2 short captions [{caption, source}]",
        "objects": "objects with ids, labels, attributes, boxes",
        "floating_objects": "floating objects (also groundable)",
        "relationships": "level-2 relationships {grounding: [{phrase, object_ids}]}",
    }
    provides: ClassVar[dict[str, pa.DataType | None]] = {"short_captions_grounded": SHORT_CAPTIONS_GROUNDED}
    models: ClassVar[tuple[str, ...]] = ("phrase_extractor", "text_embedder")
    fills: ClassVar[tuple[str, ...]] = ("dense_caption.details",)

    def process(self, records: list[ImageRecord]) -> None:
        extractor = self.backend("phrase_extractor", PhraseExtractor)
        embedder = self.backend("text_embedder", TextEmbedder)
        threshold = self.cfg.level3.embedding_match
        captions = [_captions(record) for record in records]
        # One extractor call for the whole micro-batch: spaCy pipes a batch much faster.
        flat = [text for texts in captions for text in texts if text]
        extracted = extractor.phrases(flat) if flat else []
        if len(extracted) != len(flat):
            raise ValueError(f"phrase extractor returned {len(extracted)} lists for {len(flat)} captions")
        chunks = iter(extracted)
        for record, texts in zip(records, captions, strict=True):
            objects = list(record.fields["objects"] or []) + list(record.fields["floating_objects"] or [])
            grounder = CaptionGrounder(
                objects, record.fields["relationships"], extractor, embedder, threshold
            )
            details = [grounder.ground(text, next(chunks)) if text else [] for text in texts]
            dense: dict[str, Any] | None = record.fields["dense_caption"]
            if dense is not None:
                dense["details"] = details[0]
            record.fields["short_captions_grounded"] = [
                {"caption": text, "details": found}
                for text, found in zip(texts[1:], details[1:], strict=True)
            ]
            logger.debug(
                "%s: %d dense and %d short-caption details",
                record.image_id,
                len(details[0]),
                sum(len(d) for d in details[1:]),
            )
