"""A check shared by the end-to-end tests: every object a caption detail points at has a mask.

GLaMM pairs each ``[SEG]`` with a mask, so a grounded phrase whose object has none is useless as
training data. The masks are decoded with pycocotools, not our codec, so the check is independent.
"""

from __future__ import annotations

from typing import Any

from pycocotools import mask as mask_utils


def detail_ids(row: dict[str, Any]) -> set[int]:
    """Every object id referenced by the dense caption's and the short captions' details."""
    details = list((row.get("dense_caption") or {}).get("details") or [])
    for item in row.get("short_captions_grounded") or []:
        details.extend(item.get("details") or [])
    return {int(i) for detail in details for i in detail.get("ids") or []}


def assert_grounded_ids_have_masks(row: dict[str, Any]) -> int:
    """Assert each referenced id is an object with a mask of (height, width); returns how many."""
    objects = {int(o["id"]): o for o in (row.get("objects") or []) + (row.get("floating_objects") or [])}
    ids = detail_ids(row)
    for oid in sorted(ids):
        assert oid in objects, f"{row['image_id']}: detail id {oid} is not an object"
        segmentation = objects[oid]["segmentation"]
        assert segmentation is not None, f"{row['image_id']}: object {oid} has no mask"
        coco = {"size": list(segmentation["size"]), "counts": segmentation["counts"].encode("ascii")}
        mask = mask_utils.decode(coco)
        assert mask.shape == (row["height"], row["width"]), (row["image_id"], oid, mask.shape)
        assert objects[oid]["segmentation_source"], f"{row['image_id']}: object {oid} mask has no source"
    return len(ids)
