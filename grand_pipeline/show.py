"""``grand show``: draw one image's masks, boxes, labels and grounded caption to a PNG or HTML page.

Under the image, the dense caption (levels >= 3) is written with each grounded phrase in the
colour of its object's mask overlay (``palette(id)``), wrapped to the image width. A ``.html``
target embeds that PNG and repeats the captions as text with one coloured ``<span>`` per detail.
"""

from __future__ import annotations

import base64
import colorsys
import html
import io
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from grand_pipeline.engine.inputs import record_from_source
from grand_pipeline.geometry import rle as rle_ops
from grand_pipeline.run_meta import RunMeta
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
    meta = RunMeta(store).read_run_meta() or {}
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
            tint = np.asarray(palette(obj["id"]), np.float32)
            alpha = 0.3 if floating else 0.5
            overlay[mask] = overlay[mask] * (1 - alpha) + tint * alpha
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


Piece = tuple[str, int | None]
TEXT_COLOUR = (230, 230, 230)
LINE_H = 14


def caption_pieces(caption: str, details: list[dict[str, Any]]) -> list[Piece]:
    """``caption`` cut into (text, object id or None) pieces; of overlapping details the first wins."""
    pieces: list[Piece] = []
    pos = 0
    for detail in sorted(details, key=lambda d: tuple(d["tokens_positive"])):
        start, end = detail["tokens_positive"]
        if start < pos:
            continue
        if start > pos:
            pieces.append((caption[pos:start], None))
        pieces.append((caption[start:end], detail["ids"][0] if detail["ids"] else None))
        pos = end
    if pos < len(caption):
        pieces.append((caption[pos:], None))
    return pieces


def wrap_pieces(pieces: list[Piece], draw: ImageDraw.ImageDraw, font: Any, width: float) -> list[list[Piece]]:
    """Greedy word wrap to ``width`` pixels; a word keeps its piece's object id (its colour)."""
    lines: list[list[Piece]] = [[]]
    x = 0.0
    for text, oid in pieces:
        for word in re.findall(r"\S+|\s+", text):
            if word.isspace() and x == 0:
                continue  # no line starts with a space
            advance = draw.textlength(word, font=font)
            if not word.isspace() and x > 0 and x + advance > width:
                lines.append([])
                x = 0.0
            lines[-1].append((word, oid))
            x += advance
    return [line for line in lines if line]


def _dense_caption(row: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    dense = row.get("dense_caption") or {}
    return str(dense.get("caption") or ""), list(dense.get("details") or [])


def draw_image(store: Store, lvl: int, row: dict[str, Any]) -> Image.Image:
    """The image with masks and boxes, and the footer: id, tags, depth source, dense caption."""
    canvas = Image.fromarray(load_pixels(store, row)).convert("RGB")
    _draw_objects(canvas, row.get("floating_objects") or [], floating=True)
    _draw_objects(canvas, row.get("objects") or [], floating=False)
    tags = ", ".join(t["name"] for t in (row.get("tags") or [])[:6])
    footer: list[list[Piece]] = [[(f"{row['image_id']}  level {lvl}  tags: " + tags, None)]]
    footer.append([(f"depth: {row.get('depth_source') or '-'}", None)])
    font = ImageFont.load_default()
    caption, details = _dense_caption(row)
    if caption:
        measure = ImageDraw.Draw(canvas)
        footer += wrap_pieces(caption_pieces(caption, details), measure, font, canvas.width - 8)
    framed = Image.new("RGB", (canvas.width, canvas.height + LINE_H * len(footer) + 6), (20, 20, 20))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    for i, line in enumerate(footer):
        x = 4.0
        for text, oid in line:
            colour = TEXT_COLOUR if oid is None else palette(oid)
            draw.text((x, canvas.height + 3 + i * LINE_H), text, fill=colour, font=font)
            x += draw.textlength(text, font=font)
    return framed


def spans_html(caption: str, details: list[dict[str, Any]]) -> str:
    """The caption as escaped HTML, each grounded phrase in a span coloured like its mask."""
    out = []
    for text, oid in caption_pieces(caption, details):
        if oid is None:
            out.append(html.escape(text))
        else:
            r, g, b = palette(oid)
            out.append(f'<span style="color:#{r:02x}{g:02x}{b:02x}">{html.escape(text)}</span>')
    return "".join(out)


def page_html(image: Image.Image, lvl: int, row: dict[str, Any]) -> str:
    """A self-contained page: the PNG inline (base64) and the grounded captions as text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    title = html.escape(f"{row['image_id']} (level {lvl})")
    parts = [
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>',
        '<body style="background:#141414;color:#e6e6e6;font-family:sans-serif">',
        f"<h1>{title}</h1>",
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(str(row["image_id"]))}">',
    ]
    caption, details = _dense_caption(row)
    if caption:
        parts.append(f'<h2>Dense caption</h2>\n<p class="dense-caption">{spans_html(caption, details)}</p>')
    shorts = row.get("short_captions_grounded") or []
    if shorts:
        items = "".join(f"<li>{spans_html(s['caption'], s['details'] or [])}</li>" for s in shorts)
        parts.append(f"<h2>Short captions</h2>\n<ul>{items}</ul>")
    context = (row.get("additional_context") or {}).get("text")
    if context:
        parts.append(f"<h2>Additional context</h2>\n<p>{html.escape(context)}</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render(output: str, image_id: str, to: str, level: int | None = None) -> str:
    """Write ``to``: a PNG, or an HTML page when it ends in ``.html``/``.htm``."""
    store = Store(output)
    lvl, row = find_row(store, image_id, level)
    if row["status"] != "ok":
        raise StoreError(f"image {image_id} is an error row at level {lvl}: {row['error']}")
    image = draw_image(store, lvl, row)
    Path(to).parent.mkdir(parents=True, exist_ok=True)
    if Path(to).suffix.lower() in (".html", ".htm"):
        Path(to).write_text(page_html(image, lvl, row), encoding="utf-8")
    else:
        image.save(to)
    return to
