"""Phrase/mask recall: a GT phrase is found when a prediction has its mask (IoU) and its words
(embedding similarity).

Two definitions, both reported:

* ``assignment`` (ours, the paper's App. A.1 reading): one-to-one assignment of GT to predicted
  masks maximising the summed IoU (``scipy.optimize.linear_sum_assignment`` when scipy is
  installed; otherwise the greedy max-IoU pairing, which can differ from the optimum when a
  greedy pick blocks two better pairs), then a pair is a true positive iff IoU >= 0.5 AND
  similarity >= 0.5. A failing pair is a false positive and the rest of the image still counts.
* ``legacy``: the reference's loop, ``break`` included: take the max-IoU pair; if it fails either
  threshold, stop scoring the image.

Phrases pair with masks by position (the k-th phrase is grounded by the k-th mask). When an
image's GT or prediction has more phrases than masks or the other way round, positions mean
nothing: the image is not scored in either mode (0 true positives), its GT phrases stay in the
denominator, and the mismatch is reported. The reference either raised and skipped such an image
after counting its phrases, or silently paired masks with the wrong phrases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]


def one_to_one(ious: np.ndarray) -> list[tuple[int, int]]:
    """(G, P) IoU -> min(G, P) (gt, pred) pairs of maximal summed IoU (see the module docstring)."""
    if ious.size == 0:
        return []
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy ships with the project's dependencies
        return _greedy_assignment(ious)
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def _greedy_assignment(ious: np.ndarray) -> list[tuple[int, int]]:
    """Fallback without scipy: repeatedly the max-IoU remaining pair, zero IoU pairs included."""
    work = np.array(ious, dtype=np.float64)
    pairs = []
    for _ in range(min(work.shape)):
        g, p = np.unravel_index(int(np.argmax(work)), work.shape)
        pairs.append((int(g), int(p)))
        work[g, :] = -np.inf
        work[:, p] = -np.inf
    return pairs


def assignment_matches(
    ious: np.ndarray, sims: np.ndarray, iou_threshold: float = 0.5, sim_threshold: float = 0.5
) -> list[tuple[int, int]]:
    """True-positive (gt, pred) pairs under the ``assignment`` definition."""
    return [
        (g, p)
        for g, p in one_to_one(ious)
        if ious[g, p] >= iou_threshold and sims[g, p] >= sim_threshold
    ]


def legacy_matches(
    ious: np.ndarray, sims: np.ndarray, iou_threshold: float = 0.5, sim_threshold: float = 0.5
) -> list[tuple[int, int]]:
    """True-positive (gt, pred) pairs exactly as the reference's loop finds them, ``break``
    included. Matrices must share one shape (the caller refuses mismatched images)."""
    if ious.shape != sims.shape:
        raise ValueError(f"IoU {ious.shape} and similarity {sims.shape} matrices differ")
    ious, sims = np.array(ious, dtype=np.float64), np.array(sims, dtype=np.float64)
    matches: list[tuple[int, int]] = []
    # The bound only stops a zero threshold from looping forever; with positive thresholds the
    # reference leaves the loop through its own test first.
    while ious.size and len(matches) < min(ious.shape):
        g, p = np.unravel_index(int(np.argmax(ious)), ious.shape)
        if ious[g, p] < iou_threshold or sims[g, p] < sim_threshold:
            break
        matches.append((int(g), int(p)))
        ious[g, :] = 0
        ious[:, p] = 0
        sims[g, :] = 0
        sims[:, p] = 0
    return matches


class EmbeddingCache:
    """Phrase -> unit vector, each distinct phrase embedded once per run.

    ``embed(list[str]) -> (N, D)`` is the injected text embedder; rows are re-normalised here so
    a cosine similarity is a dot product even for an embedder that forgets to normalise.
    """

    def __init__(self, embed: Embed) -> None:
        self.embed = embed
        self._vectors: dict[str, np.ndarray] = {}
        self.calls = 0

    def add(self, texts: Sequence[str]) -> None:
        """Embed the phrases not seen yet, in one call."""
        new = sorted({t for t in texts if t not in self._vectors})
        if not new:
            return
        vectors = np.asarray(self.embed(new), dtype=np.float64)
        self.calls += 1
        if vectors.ndim != 2 or vectors.shape[0] != len(new):
            raise ValueError(f"embedder returned shape {vectors.shape} for {len(new)} texts")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        self._vectors.update(zip(new, vectors, strict=True))

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity (len(a), len(b)) of two phrase lists."""
        self.add(list(a) + list(b))
        if not a or not b:
            return np.zeros((len(a), len(b)))
        left = np.stack([self._vectors[t] for t in a])
        right = np.stack([self._vectors[t] for t in b])
        return left @ right.T

    def __len__(self) -> int:
        return len(self._vectors)


def count_mismatches(image_id: str, sides: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Per side (``gt`` / ``pred``) with (phrases, masks) counts that differ -> report entries."""
    return [
        {"image_id": image_id, "side": side, "phrases": n_phrases, "masks": n_masks}
        for side, (n_phrases, n_masks) in sides.items()
        if n_phrases != n_masks
    ]


@dataclass
class ImageRecall:
    """One image's recall counts: ``gt_phrases`` is the denominator, TPs per definition."""

    image_id: str
    gt_phrases: int
    tp_assignment: int = 0
    tp_legacy: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)


def image_recall(
    image_id: str,
    gt_phrases: Sequence[str],
    pred_phrases: Sequence[str],
    ious: np.ndarray,
    cache: EmbeddingCache,
    iou_threshold: float = 0.5,
    sim_threshold: float = 0.5,
) -> ImageRecall:
    """Recall counts of one image from its phrases and (G masks, P masks) IoU matrix.

    A phrase/mask count mismatch on either side leaves the image unscored (see module docstring).
    """
    out = ImageRecall(image_id, len(gt_phrases))
    n_gt_masks, n_pred_masks = ious.shape
    out.mismatches = count_mismatches(
        image_id, {"gt": (len(gt_phrases), n_gt_masks), "pred": (len(pred_phrases), n_pred_masks)}
    )
    if out.mismatches or not gt_phrases or not pred_phrases:
        return out
    sims = cache.similarity(gt_phrases, pred_phrases)
    out.tp_assignment = len(assignment_matches(ious, sims, iou_threshold, sim_threshold))
    out.tp_legacy = len(legacy_matches(ious, sims, iou_threshold, sim_threshold))
    return out
