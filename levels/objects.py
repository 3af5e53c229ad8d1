"""The object, shared by every level: its keys, plain-value rounding, copies, ids and labels.

Objects travel between stages as plain dicts with exactly the keys of ``schemas.OBJECT``. Values
are kept as plain Python numbers, rounded once (boxes to 2 decimals, scores to 4) so that rows
are stable across runs and pyarrow never sees numpy scalars. Level 1 makes objects; level 2 adds,
promotes and renumbers them; every level writes them through ``object_row``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grand_pipeline.geometry import rle
from grand_pipeline.geometry.boxes import as_boxes
from grand_pipeline.models.roles import Backend, Region
from grand_pipeline.schemas import OBJECT
from grand_pipeline.stage import ImageRecord

#: Keys of one object dict, in schema order.
OBJECT_KEYS: tuple[str, ...] = tuple(OBJECT.field(i).name for i in range(OBJECT.num_fields))

#: The two record fields that hold object dicts.
OBJECT_FIELDS = ("objects", "floating_objects")

BOX_DECIMALS = 2
SCORE_DECIMALS = 4


def round_box(box: Any) -> list[float]:
    """Four plain floats rounded to ``BOX_DECIMALS``."""
    return [round(float(v), BOX_DECIMALS) for v in np.asarray(box, dtype=np.float64).reshape(4)]


def round_score(value: Any) -> float | None:
    """A plain float rounded to ``SCORE_DECIMALS``; None and NaN become None."""
    if value is None:
        return None
    value = float(value)
    if np.isnan(value):
        return None
    return round(value, SCORE_DECIMALS)


def plain_rle(mask_rle: dict[str, Any] | None) -> dict[str, Any] | None:
    """A COCO RLE as ``{"size": [h, w], "counts": str}`` (SA-1B JSON may hold bytes counts)."""
    if mask_rle is None:
        return None
    counts = mask_rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    elif not isinstance(counts, str):
        # Uncompressed (list) counts: re-encode so every stored mask has one representation.
        return rle.encode(rle.decode_one(mask_rle))[0]
    return {"size": [int(v) for v in mask_rle["size"]], "counts": counts}


def new_object(box: Any, labels: list[str], label: str, score: float, models: list[str]) -> dict[str, Any]:
    """An object dict with every ``schemas.OBJECT`` key; later stages fill the empty ones."""
    obj: dict[str, Any] = {key: None for key in OBJECT_KEYS}
    obj.update(
        bbox=round_box(box),
        labels=labels,
        label=label,
        score=round_score(score),
        attributes=[],
        models=models,
    )
    return obj


def object_row(obj: dict[str, Any]) -> dict[str, Any]:
    """One object dict as plain Arrow-ready values (numpy scalars and bytes converted)."""
    return {
        "id": int(obj["id"]),
        "bbox": round_box(obj["bbox"]),
        "labels": [str(v) for v in obj.get("labels") or []],
        "label": None if obj.get("label") is None else str(obj["label"]),
        "score": round_score(obj.get("score")),
        "attributes": [str(v) for v in obj.get("attributes") or []],
        "depth": round_score(obj.get("depth")),
        "segmentation": plain_rle(obj.get("segmentation")),
        "segmentation_source": obj.get("segmentation_source"),
        "models": [str(v) for v in obj.get("models") or []],
    }


def all_objects(record: ImageRecord) -> list[dict[str, Any]]:
    """Objects then floating objects of a record (the same dicts, so stages fill them in place)."""
    return [obj for key in OBJECT_FIELDS for obj in record.fields.get(key, [])]


def object_boxes(objects: list[dict[str, Any]]) -> np.ndarray:
    """(N, 4) float64 xyxy boxes of object dicts."""
    return as_boxes([obj["bbox"] for obj in objects])


def region_boxes(regions: list[Region]) -> np.ndarray:
    """(N, 4) float64 xyxy boxes of region proposals."""
    return as_boxes([np.asarray(r.bbox, dtype=np.float64).reshape(4) for r in regions])


def image_size(record: ImageRecord) -> tuple[int, int]:
    """(H, W) of the decoded image; the record's declared size only if no pixels are loaded."""
    if record.image is not None:
        return int(record.image.shape[0]), int(record.image.shape[1])
    return int(record.height), int(record.width)


def backend_source(backend: Backend) -> str:
    """How an output names the model behind it; heuristic stand-ins say so."""
    name = backend.model_id or backend.backend
    return f"{name} (heuristic)" if backend.heuristic else name


def copy_object(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy whose lists can be changed without touching the original.

    Stages work on copies and swap them in at the end, so a stage that fails half-way leaves
    the record's objects as the previous stage wrote them, never half-updated.
    """
    out = dict(obj)
    for key in ("labels", "attributes", "models", "bbox"):
        if out.get(key) is not None:
            out[key] = list(out[key])
    return out


def copy_objects(record: ImageRecord) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Copies of the record's (objects, floating objects)."""
    objects = [copy_object(o) for o in record.fields.get("objects") or []]
    floating = [copy_object(o) for o in record.fields.get("floating_objects") or []]
    return objects, floating


def renumber(objects: list[dict[str, Any]], floating: list[dict[str, Any]]) -> dict[int, int]:
    """Give objects then floating objects ids 0..N-1 in list order; returns old id -> new id.

    Old ids must be unique (level-1 ids are; level 2 gives new objects ids above them), so the
    returned map can remap every id that points at an object, e.g. in ``relationships``.
    """
    mapping: dict[int, int] = {}
    for new_id, obj in enumerate(objects + floating):
        old = int(obj["id"])
        if old in mapping:
            raise ValueError(f"object id {old} is used twice")
        mapping[old] = new_id
        obj["id"] = new_id
    return mapping


def next_free_id(objects: list[dict[str, Any]], floating: list[dict[str, Any]]) -> int:
    """An id above every id in use, for objects made before the final renumbering."""
    return max((int(o["id"]) for o in objects + floating), default=-1) + 1


def distinct(items: list[Any]) -> list[str]:
    """Non-empty stripped strings of ``items``, duplicates removed, first-seen order."""
    return list(dict.fromkeys(str(i).strip() for i in items if i is not None and str(i).strip()))


def object_label(obj: dict[str, Any]) -> str | None:
    """An object's label, or its first candidate label when none was chosen."""
    if obj.get("label"):
        return str(obj["label"])
    labels = obj.get("labels") or []
    return str(labels[0]) if labels else None


def object_labels(record: ImageRecord, keys: tuple[str, ...] = OBJECT_FIELDS) -> list[str]:
    """Distinct labels of the objects under ``keys`` (objects, then floating objects by default)."""
    return distinct([object_label(obj) for key in keys for obj in record.fields.get(key) or []])
