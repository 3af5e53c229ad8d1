"""``grand export``: committed rows -> files in a published layout.

``grand-json`` writes one JSON per ok image in the reference GranD's final layout (DESIGN.md §3),
read from the highest level that has committed shards (level 4 when the run is complete; every
row is cumulative, so that one level holds everything). Error rows are not exported; they are
listed, with their errors, in ``_export_summary.json``, which is written last so that its
presence means the export finished.

Every document is validated before it is written: ``caption[s:e] == phrase`` for every detail
and every id names an object. A violation is a pipeline bug, so it raises instead of being
skipped. Files are written to a temporary name and renamed, so a reader never sees half a file.
``--to`` is a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from grand_pipeline.registry import Registry
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.store import Store, StoreError

logger = logging.getLogger(__name__)

SUMMARY_NAME = "_export_summary.json"

Document = dict[str, Any]
#: A format turns one ok row (plus its level) into the JSON document of that image.
FORMATS: Registry[Callable[[dict[str, Any], int], Document]] = Registry("export format")

OBJECT_KEYS = (
    "id",
    "bbox",
    "labels",
    "label",
    "score",
    "attributes",
    "depth",
    "segmentation",
    "segmentation_source",
)


class ExportValidationError(AssertionError):
    """A document broke an invariant the pipeline guarantees (offsets, ids): a bug, not bad input."""


def _details(details: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [
        {
            "phrase": d["phrase"],
            "tokens_positive": list(d["tokens_positive"]),
            "ids": list(d["ids"]),
            "method": d.get("method"),
        }
        for d in details or []
    ]


@FORMATS.register("grand-json")
def grand_json(row: dict[str, Any], level: int) -> Document:
    """The reference's ``level-4-processed`` entry of one image; a column the level does not
    have yet (e.g. ``additional_context`` below level 4) is None."""
    landmark = row.get("landmark")
    dense = row.get("dense_caption")
    context = row.get("additional_context")
    return {
        "image": {k: row.get(k) for k in ("image_id", "file_name", "width", "height")},
        "objects": [{k: obj.get(k) for k in OBJECT_KEYS} for obj in row.get("objects") or []],
        "floating_objects": [
            {k: obj.get(k) for k in OBJECT_KEYS} for obj in row.get("floating_objects") or []
        ],
        "floating_attributes": list(row.get("floating_attributes") or []),
        "landmark": None if landmark is None else {k: landmark.get(k) for k in ("category", "fine_category")},
        "relationships": {
            "grounding": [
                {"phrase": g["phrase"], "object_ids": list(g["object_ids"] or [])}
                for g in ((row.get("relationships") or {}).get("grounding") or [])
            ]
        },
        "short_captions": [
            {"caption": item["caption"], "details": _details(item["details"])}
            for item in row.get("short_captions_grounded") or []
        ],
        "dense_caption": None
        if dense is None
        else {"caption": dense["caption"], "details": _details(dense["details"])},
        "additional_context": None if context is None else context.get("text"),
        "provenance": {**(row.get("provenance") or {}), "level": level, "shard_id": row.get("shard_id")},
    }


def validate(doc: Document) -> None:
    """Raise :class:`ExportValidationError` unless every offset slices its phrase and every id exists."""
    image_id = (doc.get("image") or {}).get("image_id")
    ids = {obj["id"] for key in ("objects", "floating_objects") for obj in doc.get(key) or []}

    def fail(why: str) -> None:
        raise ExportValidationError(f"image {image_id}: {why}")

    for group in (doc.get("relationships") or {}).get("grounding") or []:
        if not set(group["object_ids"]) <= ids:
            fail(
                f"relationship {group['phrase']!r} names unknown ids {sorted(set(group['object_ids']) - ids)}"
            )
    captions = list(doc.get("short_captions") or [])
    if doc.get("dense_caption"):
        captions.append(doc["dense_caption"])
    for item in captions:
        caption = item["caption"] or ""
        for detail in item["details"]:
            span = detail["tokens_positive"]
            if len(span) != 2 or not 0 <= span[0] < span[1] <= len(caption):
                fail(
                    f"detail {detail['phrase']!r} has bad tokens_positive {span} for a caption of {len(caption)}"
                )
            if caption[span[0] : span[1]] != detail["phrase"]:
                fail(
                    f"caption[{span[0]}:{span[1]}] is {caption[span[0] : span[1]]!r}, not {detail['phrase']!r}"
                )
            if not detail["ids"]:
                fail(f"detail {detail['phrase']!r} has no ids")
            if not set(detail["ids"]) <= ids:
                fail(f"detail {detail['phrase']!r} names unknown ids {sorted(set(detail['ids']) - ids)}")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a hidden temporary name in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def highest_committed_level(store: Store) -> int:
    """The highest level with at least one committed shard; StoreError when there is none."""
    for level in sorted(store.levels_present(), reverse=True):
        if store.committed(level):
            return level
    raise StoreError(f"nothing is committed in {store.uri}: run `grand run` first")


def iter_rows(store: Store, level: int) -> Iterator[dict[str, Any]]:
    """Rows of every committed shard of ``level``, one record batch in memory at a time."""
    for shard in sorted(store.committed(level)):
        for batch in store.read(level, shard).to_batches():
            yield from batch.to_pylist()


def export(output_uri: str, fmt: str, to_dir: str) -> int:
    """Export the committed output at ``output_uri`` as ``fmt`` into ``to_dir``; returns files written."""
    convert = FORMATS.get(fmt)  # unknown format: UnknownNameError listing the known ones
    store = Store(output_uri)
    level = highest_committed_level(store)
    if level < 4:
        logger.warning("exporting level %d of %s: level 4 is not committed yet", level, output_uri)
    missing = set().union(*(store.committed(lvl) for lvl in range(1, level))) - set(store.committed(level))
    if missing:
        logger.warning(
            "%d shard(s) are committed below level %d only and are not exported", len(missing), level
        )
    target = Path(to_dir)
    target.mkdir(parents=True, exist_ok=True)
    # The summary marks a finished export; a previous one must not vouch for this one meanwhile.
    (target / SUMMARY_NAME).unlink(missing_ok=True)
    exported, skipped = 0, []
    for row in iter_rows(store, level):
        if row["status"] != STATUS_OK:
            skipped.append({k: row.get(k) for k in ("image_id", "shard_id", "error_stage", "error")})
            continue
        name = f"{row['image_id']}.json"
        if Path(name).name != name or name.startswith("."):
            raise StoreError(f"image id {row['image_id']!r} cannot be used as a file name")
        doc = convert(row, level)
        validate(doc)
        write_json_atomic(target / name, doc)
        exported += 1
    summary = {
        "format": fmt,
        "output": output_uri,
        "level": level,
        "exported": exported,
        "skipped": len(skipped),
        "skipped_images": skipped,
    }
    write_json_atomic(target / SUMMARY_NAME, summary)
    logger.info(
        "exported %d image(s) of level %d to %s; %d error row(s) skipped",
        exported,
        level,
        to_dir,
        len(skipped),
    )
    return exported
