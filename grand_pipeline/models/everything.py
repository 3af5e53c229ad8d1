"""An "everything" mask generator on top of the box-prompted segmenter role.

SAM's automatic generator prompts a point grid and dedupes the masks by NMS. LiteMedSAM takes box
prompts only, so this prompts a multi-scale grid of boxes instead:

- at scale ``s`` the image is cut into s x s cells; at each cell centre one box per ``f`` in
  ``box_fracs`` reaches ``f`` cell widths/heights to every side (f = 0.5 is the cell itself,
  f = 0.25 its central half). Defaults give (1 + 4 + 16) x 2 = 42 prompts, one encoder pass.
- masks are dropped when smaller than ``min_area`` of the image, larger than 95% of it, or
  leaked: more than half of the mask lies outside its prompt box, or it covers more than half of
  the area outside the box.
- score (reported as ``predicted_iou``) = decoder IoU prediction (1 when the segmenter has none)
  x containment (share of the mask inside its prompt box) x sqrt(extent) (mask area over its tight
  box area: a compactness term that punishes speckled, fragmented masks). The fill of the prompt
  box is deliberately not rewarded: grid boxes are not object boxes, so an object is expected to
  fill only part of one.
- ``stability_score`` is SAM's: IoU of the masks at logit > +1 and > -1, when the segmenter
  exposes ``segment_with_scores``; otherwise a morphological proxy, IoU of the mask eroded and
  dilated by one pixel (low for thin or ragged masks whose pixels sit on the boundary).
- greedy NMS by mask IoU (``geometry.rle.mask_nms``, IoU from the RLE runs by pycocotools, no
  mask decoded) keeps the best-scored of near-duplicates,
  the ``max_masks`` best survive and are returned largest first as SA-1B annotation dicts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from grand_pipeline.geometry import rle

logger = logging.getLogger(__name__)

MAX_AREA = 0.95


def prompt_boxes(
    height: int, width: int, scales: tuple[int, ...], box_fracs: tuple[float, ...]
) -> np.ndarray:
    """Multi-scale grid of box prompts, float32 (B, 4) xyxy clipped to the image."""
    boxes = []
    for s in scales:
        cell_w, cell_h = width / s, height / s
        centres = np.arange(s, dtype=np.float32) + 0.5
        cx, cy = np.meshgrid(centres * cell_w, centres * cell_h)
        for f in box_fracs:
            half_w, half_h = f * cell_w, f * cell_h
            boxes.append(np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1).reshape(-1, 4))
    out = np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def _shift_or(m: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of (H, W) bool by shifted ORs."""
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    row = out.copy()
    out[:, 1:] |= row[:, :-1]
    out[:, :-1] |= row[:, 1:]
    return out


def morphological_stability(masks: np.ndarray) -> np.ndarray:
    """Proxy stability without logits: IoU(erode(m), dilate(m)) per mask. (N, H, W) -> (N,)."""
    out = np.zeros(len(masks), np.float32)
    for i, m in enumerate(masks):
        dilated = _shift_or(m)
        eroded = ~_shift_or(~m)
        union = dilated.sum()
        out[i] = eroded.sum() / union if union else 0.0
    return out


def _segment(
    segmenter: Any, image: np.ndarray, boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if hasattr(segmenter, "segment_with_scores"):
        masks, iou_pred, stability = segmenter.segment_with_scores(image, boxes)
        return np.asarray(masks, bool), np.clip(np.asarray(iou_pred, np.float32), 0, 1), stability
    masks = np.asarray(segmenter.segment(image, boxes), bool)
    return masks, np.ones(len(masks), np.float32), None


def generate_masks(
    segmenter: Any,
    image: np.ndarray,
    *,
    scales: tuple[int, ...] = (1, 2, 4),
    box_fracs: tuple[float, ...] = (0.25, 0.5),
    iou_dedupe: float = 0.7,
    min_area: float = 0.002,
    max_masks: int = 48,
) -> list[dict[str, Any]]:
    """Class-agnostic masks for one image, as SA-1B annotations sorted by area descending.

    segmenter: a ``Segmenter`` (box prompts -> bool (N, H, W) masks).
    image: uint8 (H, W, 3) RGB.
    Returns dicts ``{id, bbox [x, y, w, h], area, segmentation {size, counts}, predicted_iou,
    stability_score, point_coords [[cx, cy]], crop_box [0, 0, W, H]}``; ``point_coords`` is the
    centre of the prompt box that produced the mask.
    """
    start = time.perf_counter()
    height, width = image.shape[:2]
    image_area = float(height * width)
    boxes = prompt_boxes(height, width, tuple(scales), tuple(box_fracs))
    n_prompts = len(boxes)
    masks, iou_pred, stability = _segment(segmenter, image, boxes)
    if masks.shape != (len(boxes), height, width):
        raise ValueError(
            f"segmenter returned masks of shape {masks.shape}, expected {(len(boxes), height, width)}"
        )

    area = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
    inside = np.zeros(len(masks), np.float64)
    for i, (x1, y1, x2, y2) in enumerate(np.round(boxes).astype(np.int64)):
        inside[i] = masks[i, y1:y2, x1:x2].sum()
    box_area = np.round(boxes[:, 2] - boxes[:, 0]) * np.round(boxes[:, 3] - boxes[:, 1])
    exterior = image_area - box_area
    outside = area - inside
    leaked = (outside > 0.5 * area) | ((exterior > 0) & (outside > 0.5 * np.maximum(exterior, 1)))
    keep = (area >= min_area * image_area) & (area <= MAX_AREA * image_area) & ~leaked
    idx = np.flatnonzero(keep)
    logger.debug("everything: %d prompts -> %d masks after area/leak filters", n_prompts, len(idx))
    if len(idx) == 0:
        return []

    masks, boxes, area, inside = masks[idx], boxes[idx], area[idx], inside[idx]
    iou_pred = iou_pred[idx]
    stability = stability[idx] if stability is not None else morphological_stability(masks)
    tight = rle.masks_to_boxes(masks)  # (K, 4) xyxy, exclusive max
    tight_area = np.maximum((tight[:, 2] - tight[:, 0]) * (tight[:, 3] - tight[:, 1]), 1.0)
    score = iou_pred * (inside / area) * np.sqrt(area / tight_area)

    rles = rle.encode(masks)
    kept = rle.mask_nms(rles, score, iou_dedupe)[: max(0, int(max_masks))]
    kept = kept[np.argsort(-area[kept], kind="stable")]
    annotations = []
    for new_id, k in enumerate(kept):
        x1, y1, x2, y2 = (float(v) for v in tight[k])
        bx1, by1, bx2, by2 = (float(v) for v in boxes[k])
        annotations.append(
            {
                "id": new_id,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(area[k]),
                "segmentation": {"size": [height, width], "counts": rles[k]["counts"]},
                "predicted_iou": float(score[k]),
                "stability_score": float(stability[k]),
                "point_coords": [[(bx1 + bx2) / 2.0, (by1 + by2) / 2.0]],
                "crop_box": [0, 0, width, height],
            }
        )
    logger.info(
        "everything: %d prompts -> %d masks (%d after dedupe) in %.1fs",
        n_prompts,
        len(idx),
        len(annotations),
        time.perf_counter() - start,
    )
    return annotations
