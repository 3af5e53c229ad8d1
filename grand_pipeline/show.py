"""``grand show``: draw one image's masks, boxes and labels from committed output to a PNG."""

from __future__ import annotations

import colorsys
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from grand_pipeline.engine.inputs import record_from_source
from grand_pipeline.geometry import rle as rle_ops
from grand_pipeline.sources import list_shards, read_images
from grand_pipeline.store import Store, StoreError

logger = logging.getLogger(__name__)


def palette(index: int) -> tuple[int, int, int]:
    """Distinct, stable colours: golden-ratio steps around the hue circle."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def find_row(store: Store, image_id: str, level: int | None) -> tuple[int, dict[str, Any]]:
    levels = [level] if level is not None else sorted(store.levels_present(), reverse=True)
    for lvl in levels:
        for shard in sorted(store.committed(lvl)):
            table = store.read(lvl, shard)
            hit = table.filter(pc.equal(table["image_id"], image_id))
            if hit.num_rows:
                return lvl, hit.to_pylist()[0]
    raise StoreError(f"image {image_id!r} not found in committed level(s) {levels} of {store.uri}")


def load_pixels(store: Store, row: dict[str, Any]) -> np.ndarray:
    meta = store.read_run_meta() or {}
    if "input" not in meta:
        raise StoreError("the output has no _run/run.json naming its input; cannot re-read pixels")
    refs = [r for r in list_shards(meta["input"]) if r.shard_id == row["shard_id"]]
    if not refs:
        raise StoreError(f"shard {row['shard_id']} is no longer under {meta['input']}")
    items = read_images(refs[0], {row["image_id"]})
    if row["image_id"] not in items:
        raise StoreError(f"image {row['image_id']} is no longer in shard {row['shard_id']}")
    record = record_from_source(items[row["image_id"]], max_pixels=10**9)
    if record.image is None:
        raise StoreError(f"image {row['image_id']} cannot be decoded: {record.error}")
    return record.image


def _draw_objects(canvas: Image.Image, objects: list[dict[str, Any]], floating: bool) -> None:
    overlay = np.asarray(canvas).astype(np.float32)
    for obj in objects:
        seg = obj.get("segmentation")
        if seg and seg.get("counts"):
            mask = rle_ops.decode_one(seg)
            colour = np.asarray(palette(obj["id"]), np.float32)
            alpha = 0.3 if floating else 0.5
            overlay[mask] = overlay[mask] * (1 - alpha) + colour * alpha
    canvas.paste(Image.fromarray(overlay.clip(0, 255).astype(np.uint8)))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for obj in objects:
        colour = palette(obj["id"])
        x1, y1, x2, y2 = obj["bbox"]
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=1 if floating else 3)
        attrs = obj.get("attributes") or []
        text = f"{obj['id']}: {obj.get('label') or '?'}" + (f" ({attrs[0]})" if attrs else "")
        if floating:
            text += " [floating]"
        box = draw.textbbox((x1 + 3, y1 + 2), text, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((x1 + 3, y1 + 2), text, fill=colour, font=font)


def render(output: str, image_id: str, to: str, level: int | None = None) -> str:
    store = Store(output)
    lvl, row = find_row(store, image_id, level)
    if row["status"] != "ok":
        raise StoreError(f"image {image_id} is an error row at level {lvl}: {row['error']}")
    canvas = Image.fromarray(load_pixels(store, row)).convert("RGB")
    _draw_objects(canvas, row.get("floating_objects") or [], floating=True)
    _draw_objects(canvas, row.get("objects") or [], floating=False)
    footer = [f"{image_id}  level {lvl}  tags: " + ", ".join(t["name"] for t in (row.get("tags") or [])[:6])]
    footer.append(f"depth: {row.get('depth_source') or '-'}")
    font = ImageFont.load_default()
    line_h = 14
    framed = Image.new("RGB", (canvas.width, canvas.height + line_h * len(footer) + 6), (20, 20, 20))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    for i, line in enumerate(footer):
        draw.text((4, canvas.height + 3 + i * line_h), line, fill=(230, 230, 230), font=font)
    Path(to).parent.mkdir(parents=True, exist_ok=True)
    framed.save(to)
    return to
