"""From per-box full-resolution mask logits to what the segmenters return.

Both SAM-family segmenters (``backends/sam.py``, ``backends/litemedsam.py``) decode box prompts
into one (H, W) logit map per box, yielded one at a time so that full-resolution memory is a single
mask whatever the box count. This module turns that stream into the two outputs the ``Segmenter``
role declares: dense masks with SAM's scores, or tight-box crops kept on the device.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from grand_pipeline.geometry import boxed
from grand_pipeline.geometry.boxed import BoxedMasks

#: SAM's stability score: IoU of the mask thresholded at ``centre + offset`` and ``centre - offset``.
STABILITY_OFFSET = 1.0

#: (box index, logits (H, W) float on the device, predicted IoU ()) for one box.
Piece = tuple[int, torch.Tensor, torch.Tensor]


def dense_with_scores(
    pieces: Iterable[Piece], n: int, size: tuple[int, int], threshold: float, stability_centre: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks bool (N, H, W), predicted IoU float32 (N,), stability float32 (N,).

    ``threshold`` cuts the mask; the stability score compares cuts at ``stability_centre`` +/-
    ``STABILITY_OFFSET`` (SAM centres on its mask threshold, LiteMedSAM on logit 0). An empty
    outer cut scores 0. Only the host copy of the masks is (N, H, W); the device holds one mask.
    Iterate inside ``torch.inference_mode()``, as the producers require.
    """
    height, width = size
    masks = np.zeros((n, height, width), dtype=bool)
    iou_pred = np.zeros(n, np.float32)
    stability = np.zeros(n, np.float32)
    for i, logits, iou in pieces:
        masks[i] = (logits > threshold).cpu().numpy()
        inter = (logits > stability_centre + STABILITY_OFFSET).sum().float()
        union = (logits > stability_centre - STABILITY_OFFSET).sum().float()
        stability[i] = float(inter / union.clamp(min=1))  # inner cut within outer: 0 when both empty
        iou_pred[i] = float(iou)
    return masks, iou_pred, stability


def boxed_from_logits(
    pieces: Iterable[Piece], size: tuple[int, int], threshold: float, device: torch.device
) -> BoxedMasks:
    """The thresholded masks as tight-box crops on ``device``; no (N, H, W) stack is made."""
    parts = [boxed.from_dense((logits > threshold)[None]) for _, logits, _ in pieces]
    return BoxedMasks.concat(parts, size, device)
