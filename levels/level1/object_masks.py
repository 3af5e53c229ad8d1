"""Each mask of an image, made once and shared by the Level-1 stages on the actor's device.

MaskStage decodes the SA-1B masks it considers and keeps the segmenter's masks as they come; the
attribute and depth stages read them here instead of decoding every RLE again. Masks are
``geometry.boxed.BoxedMasks``: the crop of each mask's tight box, on a torch device (the one the
segmenter works on, so SAM's masks never leave the GPU).

The store is a per-image cache from an RLE dict to its decoded mask, kept in ``record.fields``
under a private key: ``to_row`` builds its columns by name and never reads it, so nothing of it
reaches the Parquet. An entry is keyed by the identity of the RLE dict and holds a reference to
it, so a stage (or a test) that puts another mask on an object gets that mask decoded, never a
stale one. No process-wide state: the cache dies with the record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from grand_pipeline.geometry import boxed
from grand_pipeline.geometry.boxed import BoxedMasks
from grand_pipeline.stage import ImageRecord
from levels.objects import image_size

logger = logging.getLogger(__name__)

#: Private ``record.fields`` key of the store (``to_row`` reads only the level's columns).
MASKS_FIELD = "_object_masks"


def device_of(backend: Any) -> torch.device:
    """The device a backend computes on (its ``device`` attribute), else the CPU."""
    device = getattr(backend, "device", None)
    try:
        return torch.device(device) if device is not None else torch.device("cpu")
    except (TypeError, RuntimeError):
        return torch.device("cpu")


class ObjectMasks:
    """Decoded masks of one image, keyed by the RLE dict they came from or were encoded to."""

    def __init__(self, size: tuple[int, int], device: torch.device) -> None:
        self.size = size
        self.device = device
        self._entries: dict[int, tuple[dict[str, Any], BoxedMasks]] = {}

    @staticmethod
    def of(record: ImageRecord, device: torch.device) -> ObjectMasks:
        """The record's store; made on ``device`` by the first stage that asks."""
        store = record.fields.get(MASKS_FIELD)
        size = image_size(record)
        if not isinstance(store, ObjectMasks) or store.size != size:
            store = ObjectMasks(size, device)
            record.fields[MASKS_FIELD] = store
        return store

    def put(self, segmentation: dict[str, Any], mask: BoxedMasks) -> None:
        """Remember that ``segmentation`` (an RLE dict) is the single mask ``mask``."""
        if len(mask) != 1:
            raise ValueError(f"one mask per RLE, got {len(mask)}")
        self._entries[id(segmentation)] = (segmentation, mask.to(self.device))

    def alias(self, new: dict[str, Any], old: dict[str, Any]) -> None:
        """``new`` is a copy of ``old`` (e.g. ``plain_rle`` of an SA-1B RLE): share its mask."""
        entry = self._entries.get(id(old))
        if entry is not None and entry[0] is old:
            self._entries[id(new)] = (new, entry[1])

    def _cached(self, segmentation: Any) -> BoxedMasks | None:
        entry = self._entries.get(id(segmentation))
        return entry[1] if entry is not None and entry[0] is segmentation else None

    def masks(self, segmentations: Sequence[dict[str, Any] | None], boxes: Any) -> BoxedMasks:
        """One mask per item: its RLE's (cached or decoded now, once), else its box's pixels.

        Arguments:
          segmentations: N RLE dicts or None.
          boxes: (N, 4) float xyxy, used where an item has no RLE or one of another size.

        Returns:
          N masks on the store's device, in item order.
        """
        height, width = self.size
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        found: list[BoxedMasks | None] = [None] * len(segmentations)
        todo: dict[int, list[int]] = {}  # id(RLE) -> items that need it decoded
        first: dict[int, dict[str, Any]] = {}  # id(RLE) -> the RLE
        for i, seg in enumerate(segmentations):
            if seg is None:
                continue
            found[i] = self._cached(seg)
            if found[i] is not None:
                continue
            size = [int(v) for v in seg["size"]]
            if size == [height, width]:
                todo.setdefault(id(seg), []).append(i)
                first[id(seg)] = seg
            else:
                logger.warning("mask of size %s on a %dx%d image; using the box instead", size, height, width)
        if todo:
            decoded = boxed.decode([first[key] for key in todo], self.device)
            for k, (key, items) in enumerate(todo.items()):
                one = decoded.take([k])
                self.put(first[key], one)
                for i in items:
                    found[i] = one
        missing = [i for i, m in enumerate(found) if m is None]
        if missing:
            by_box = boxed.from_boxes(b[missing], self.size, self.device)
            for k, i in enumerate(missing):
                found[i] = by_box.take([k])
        return BoxedMasks.concat([m for m in found if m is not None], self.size, self.device)


def segment_masks(segmenter: Any, image: np.ndarray, boxes: np.ndarray) -> BoxedMasks:
    """Box prompts -> masks, kept on the segmenter's device when it can hand them over there.

    A backend with ``segment_boxed`` (SAM, LiteMedSAM) thresholds and crops on its device; any
    other ``Segmenter`` gives dense numpy masks, which are boxed here.
    """
    expected = (len(boxes), *image.shape[:2])
    if hasattr(segmenter, "segment_boxed"):
        out: BoxedMasks = segmenter.segment_boxed(image, boxes)
    else:
        dense = np.asarray(segmenter.segment(image, boxes))
        if dense.shape != expected:
            raise ValueError(f"segmenter returned masks of shape {dense.shape}, expected {expected}")
        out = boxed.from_dense(dense, device_of(segmenter))
    if tuple(out.shape) != expected:
        raise ValueError(f"segmenter returned masks of shape {tuple(out.shape)}, expected {expected}")
    return out
