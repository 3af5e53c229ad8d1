"""Colour + class phrases for regions ("white cup"): a labelled stand-in for GRiT/BLIP-2 captions.

For each region the dominant colour is the most frequent palette name among the pixels inside
its mask (the box when the mask is missing or empty; Level 1's tight-box masks are read only
inside their boxes); every pixel is named from its HSV value by
fixed thresholds (see :func:`colour_indices`). The noun is the shared tagger's top-1 class on the
box crop, from one batched ``classify_crops`` call per image. The backend is ``heuristic = True``
so every phrase it writes is labelled as such in provenance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.geometry.boxed import BoxedMasks
from grand_pipeline.models.roles import RegionCaptioner, register_backend

logger = logging.getLogger(__name__)

PALETTE = ("black", "white", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
_IDX = {name: i for i, name in enumerate(PALETTE)}
#: Pixels sampled per region at most; a regular stride keeps the estimate deterministic.
MAX_PIXELS = 20_000
#: Chromatic hue bins in degrees: (upper bound, name), checked in order; red wraps around 360.
_HUE_BINS = (
    (15, "red"),
    (45, "orange"),
    (70, "yellow"),
    (165, "green"),
    (255, "blue"),
    (320, "purple"),
    (345, "pink"),
    (360, "red"),
)


def colour_indices(rgb: np.ndarray) -> np.ndarray:
    """Name each pixel. rgb: uint8 (P, 3) -> int64 (P,) indices into :data:`PALETTE`.

    Value v = max channel, saturation s = (max - min) / max, hue in degrees:
    v < 0.2 -> black; s < 0.15 -> white (v > 0.8) or gray; otherwise the hue bin, where dark
    orange/yellow (v < 0.6) or very dark red (v < 0.4) is brown and light, weakly saturated red
    (s < 0.5, v > 0.7) is pink.
    """
    x = np.asarray(rgb, np.float32).reshape(-1, 3) / 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = x.max(axis=1)
    chroma = v - x.min(axis=1)
    s = np.divide(chroma, v, out=np.zeros_like(v), where=v > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = (
        np.select(
            [v == r, v == g],
            [((g - b) / safe) % 6.0, (b - r) / safe + 2.0],
            (r - g) / safe + 4.0,
        )
        * 60.0
    )
    bounds = np.array([upper for upper, _ in _HUE_BINS], np.float32)
    names = np.array([_IDX[name] for _, name in _HUE_BINS], np.int64)
    out = names[np.minimum(np.searchsorted(bounds, hue, side="right"), len(bounds) - 1)]
    # Brown is dark orange/yellow; red needs to be darker still before it reads as brown.
    warm = (out == _IDX["orange"]) | (out == _IDX["yellow"])
    out = np.where((warm & (v < 0.6)) | ((out == _IDX["red"]) & (v < 0.4)), _IDX["brown"], out)
    out = np.where((out == _IDX["red"]) & (s < 0.5) & (v > 0.7), _IDX["pink"], out)
    grey = np.where(v > 0.8, _IDX["white"], _IDX["gray"])
    out = np.where(s < 0.15, grey, out)
    return np.where(v < 0.2, _IDX["black"], out).astype(np.int64)


def dominant_colour(pixels: np.ndarray) -> str:
    """uint8 (P, 3) -> the palette name that most pixels get ("gray" when P == 0)."""
    if len(pixels) == 0:
        return "gray"
    step = max(1, len(pixels) // MAX_PIXELS)
    counts = np.bincount(colour_indices(pixels[::step]), minlength=len(PALETTE))
    return PALETTE[int(counts.argmax())]


def mask_pixels(image: np.ndarray, masks: Any, i: int) -> np.ndarray:
    """uint8 (P, 3) pixels of mask ``i`` in row-major order; (0, 3) without a mask.

    A ``BoxedMasks`` mask is read inside its tight box only: the same pixels in the same order
    as ``image[dense_mask]``, without a full-image pass per region.
    """
    if masks is None:
        return np.zeros((0, 3), dtype=np.uint8)
    if isinstance(masks, BoxedMasks):
        x1, y1, x2, y2 = (int(v) for v in masks.boxes[i])
        return image[y1:y2, x1:x2][masks.crops[i].cpu().numpy()]
    return image[np.asarray(masks[i]).astype(bool)]


def _int_box(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Float xyxy -> integer slice bounds inside the image, never empty."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left = int(np.clip(np.floor(x1), 0, width - 1))
    top = int(np.clip(np.floor(y1), 0, height - 1))
    right = int(np.clip(np.ceil(x2), left + 1, width))
    bottom = int(np.clip(np.ceil(y2), top + 1, height))
    return left, top, right, bottom


@dataclass(frozen=True)
class ColourTaggerOptions:
    tagger: str = "tagger"
    """Hub key of the tagger whose top-1 crop class is the phrase's noun."""


@register_backend("region_captioner", "colour_tagger", options=ColourTaggerOptions)
class ColourTagger(RegionCaptioner):
    """Phrase "<colour> <tagger class>" per region. Options: ``tagger`` hub key (default "tagger")."""

    heuristic = True

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        if hub is None:
            raise ValueError("colour_tagger needs the ModelHub to reach the tagger it shares")
        self.tagger = hub.get(self.opts.tagger)
        self.model_id = f"colour-names+{self.tagger.model_id}"
        self.weights_id = getattr(self.tagger, "weights_id", "")

    def describe_regions(self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None) -> list[str]:
        """image uint8 (H, W, 3); boxes (N, 4) xyxy; masks bool (N, H, W) or None -> N phrases."""
        arr = np.asarray(image)
        height, width = arr.shape[:2]
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if masks is not None:
            # Tight-box masks (Level 1's) are read crop by crop; anything else as dense masks.
            masks = masks if isinstance(masks, BoxedMasks) else np.asarray(masks)
            if tuple(masks.shape) != (len(boxes), height, width):
                raise ValueError(
                    f"masks must be (N, H, W) = {(len(boxes), height, width)}, got {tuple(masks.shape)}"
                )
        if len(boxes) == 0:
            return []
        crops, colours = [], []
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = _int_box(box, height, width)
            crop = arr[y1:y2, x1:x2]
            # A view, not a copy: N box crops of a large photo held together for one batched
            # tagger call would be N copies of up to the whole image (the tagger resizes each).
            crops.append(crop)
            pixels = mask_pixels(arr, masks, i)
            colours.append(dominant_colour(pixels if len(pixels) else crop.reshape(-1, 3)))
        tags = self.tagger.classify_crops(crops, top_k=1)
        phrases = []
        for colour, top in zip(colours, tags, strict=True):
            phrases.append(f"{colour} {top[0].name}" if top else colour)
        return phrases
