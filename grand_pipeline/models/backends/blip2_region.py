"""Region captioner ``blip2_region``: BLIP-2 describes each object crop in a few words.

The reference describes regions with a captioning model run on crops. Each box is cut from the
image with a margin (``pad``, 10% of the box side: a tight crop loses the context that tells a
mug from a bucket); when the object's mask is given and not empty, pixels outside it are set to
grey, so the caption is about the object rather than whatever shares its box. The crops are cut
on the model's device (``vision_common.region_crops``), from the masks Level 1 keeps there.

The BLIP-2 is loaded by ``blip2.load_blip2``, which keeps one copy per model hub and weights
folder: with the captioner configured on the same weights, the actor holds BLIP-2 once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from grand_pipeline.config import check_ranges
from grand_pipeline.models.backends.blip2 import load_blip2, model_name
from grand_pipeline.models.roles import RegionCaptioner, register_backend
from grand_pipeline.models.vision_common import CROP_FILL, crop_window, region_crops

logger = logging.getLogger(__name__)

#: Outside-the-mask fill: mid grey, what BLIP's normalisation maps close to zero.
BACKGROUND = CROP_FILL


def crop_region(image: np.ndarray, box: np.ndarray, mask: np.ndarray | None, pad: float) -> np.ndarray:
    """The padded crop of ``box`` (xyxy) from ``image``; outside ``mask`` greyed when it has pixels."""
    height, width = image.shape[:2]
    left, top, right, bottom = crop_window(box, pad, height, width)
    crop = image[top:bottom, left:right].copy()
    if mask is not None:
        inside = np.asarray(mask)[top:bottom, left:right] != 0
        if inside.any():
            crop[~inside] = BACKGROUND
    return crop


@dataclass(frozen=True)
class Blip2RegionOptions:
    prompt: str = ""
    max_new_tokens: int = 12
    pad: float = 0.1
    """Crop padding, a fraction of the box side."""

    def validate(self) -> None:
        check_ranges(self, unit=("pad",), at_least_one=("max_new_tokens",))


@register_backend("region_captioner", "blip2_region", options=Blip2RegionOptions)
class Blip2RegionCaptioner(RegionCaptioner):
    """One short phrase per box. Options: :class:`Blip2RegionOptions`.

    ``spec.batch_size`` crops per forward pass.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.prompt = self.opts.prompt
        self.max_new_tokens = self.opts.max_new_tokens
        self.pad = self.opts.pad
        self.batch_size = max(1, int(getattr(spec, "batch_size", 16)))
        self.blip2 = load_blip2(spec, "blip2_region", hub)
        self.weights_id = self.blip2.weights_id
        self.model_id = model_name(self.blip2, spec)

    def describe_regions(self, image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None) -> list[str]:
        """A phrase per box, in box order; masks (N, H, W) bool may be None."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if masks is not None and len(masks) != len(boxes):
            raise ValueError(f"{len(masks)} masks for {len(boxes)} boxes")
        if not len(boxes):
            return []
        crops = region_crops(image, boxes, masks, self.pad, self.blip2.device)
        return self.blip2.generate(
            [c.cpu().numpy() for c in crops], self.prompt, self.max_new_tokens, self.batch_size
        )
