"""The reference GranD layouts: ``grand-json`` (our per-image document) and ``grand-ref`` (the
authors' own per-image layout, which their scripts read).

**grand-json** writes ``TO/<image_id>.json``: the reference's ``level-4-processed`` entry of one
image with an ``image`` block, caption details carrying ``ids`` (all objects) and ``method``, and
the verify loop's outcome (``verified``, ``attempts``) of the two LLM texts. Each document is
validated before it is written: ``caption[s:e] == phrase`` for every detail and every id names
an object; a violation is a pipeline bug, so it raises.

**grand-ref.** The authors' ``prepare_grand_caption_grounding.py`` and
``prepare_grand_referring_expression.py`` ``os.listdir`` a folder, and for each file take
``image = list(data.keys())[0]`` and read ``data[image]["objects"]``,
``["short_captions"][*]["details"][*]["id"]`` (and ``floating_objects`` for the masks). The
grand-json document differs in exactly what they trip on (glamm reference §7), so grand-ref
re-keys it:

- one file ``TO/annotations/<image_id>.json`` per ok image, holding ``{file_name: document}``
  (``file_name`` is ``"sa_N.jpg"``, the LMDB key and image path they use). ``annotations/``
  holds nothing else, so their ``os.listdir`` sees only documents (the summary is
  ``TO/_export/summary.json``);
- every caption detail gains ``id`` = ``min(ids)``, as the reference computes it (a multi-object
  phrase keeps only that id there, so our full ``ids`` list stays as an extra key) and ``bbox``:
  for short captions the box of ``id`` (the reference's single box; it takes ``object_ids[0]``,
  which can disagree with its own ``id``), for the dense caption the list of the ids' boxes (the
  reference's ``[[...]]``).

The rest is the grand-json document without its ``image`` block, whose ``image_id``, ``width``
and ``height`` ride along inside the value as extra keys.
"""

from __future__ import annotations

from typing import Any

from grand_pipeline.export import FORMATS, Document, PerImageJson, Row

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


def grand_json(row: Row, level: int) -> Document:
    """The reference's ``level-4-processed`` entry of one image, validated; a column the level does
    not have yet (e.g. ``additional_context`` below level 4) is None. The verify loop's outcome
    (``verified``, ``attempts`` = how many generations) rides along with both LLM texts;
    ``additional_context`` stays a string, as in the reference, so its two sit beside it."""
    landmark, dense, context = row.get("landmark"), row.get("dense_caption"), row.get("additional_context")
    doc = {
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
        else {"caption": dense["caption"], "details": _details(dense["details"]), **_checked(dense)},
        "additional_context": None if context is None else context.get("text"),
        **{f"additional_context_{k}": v for k, v in _checked(context).items()},
        "provenance": {**(row.get("provenance") or {}), "level": level, "shard_id": row.get("shard_id")},
    }
    validate(doc)
    return doc


def _checked(text: dict[str, Any] | None) -> dict[str, Any]:
    """``verified`` and ``attempts`` (the number of generations) of a verified LLM text."""
    text = text or {}
    return {"verified": text.get("verified"), "attempts": len(text.get("attempts") or [])}


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
    captions = list(doc.get("short_captions") or []) + (
        [doc["dense_caption"]] if doc.get("dense_caption") else []
    )
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


FOLDER = "annotations"


def _with_ids(
    details: list[dict[str, Any]], boxes: dict[int, list[float]], one_box: bool
) -> list[dict[str, Any]]:
    out = []
    for detail in details:
        first = min(detail["ids"])
        bbox = boxes[first] if one_box else [boxes[i] for i in detail["ids"]]
        out.append({**detail, "id": first, "bbox": bbox})
    return out


def grand_ref(row: Row, level: int) -> Document:
    """``{file_name: the image's GranD document}`` (see the module docstring)."""
    doc = grand_json(row, level)  # validated: every detail's ids name an object
    image = doc.pop("image")
    boxes = {obj["id"]: obj["bbox"] for key in ("objects", "floating_objects") for obj in doc[key]}
    doc["short_captions"] = [
        {**item, "details": _with_ids(item["details"], boxes, one_box=True)} for item in doc["short_captions"]
    ]
    if doc["dense_caption"] is not None:
        dense = doc["dense_caption"]
        doc["dense_caption"] = {**dense, "details": _with_ids(dense["details"], boxes, one_box=False)}
    doc.update({k: image[k] for k in ("image_id", "width", "height")})
    return {image["file_name"] or f"{image['image_id']}.jpg": doc}


FORMATS.register("grand-json")(PerImageJson(grand_json))
FORMATS.register("grand-ref")(PerImageJson(grand_ref, folder=FOLDER))
