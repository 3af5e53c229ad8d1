"""Pure GCG metric kernels: mask IoU, greedy mIoU (reference and penalised), AP50, caption scores.

AP50 goes through ``pycocotools``' COCOeval and the caption metrics through ``pycocoevalcap``'s
scorers, so the numbers are those of the published protocol; both libraries print progress to
stdout, which is captured here and logged at debug level (only the CLI prints).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pycocotools import mask as mask_utils

logger = logging.getLogger(__name__)

RLE = dict[str, Any]
T = TypeVar("T")

#: Report keys of the caption metrics, in print order.
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")


def quietly(fn: Callable[[], T]) -> T:
    """Run ``fn`` with stdout captured (COCOeval and BLEU print); the text goes to the debug log."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn()
    if buffer.getvalue().strip():
        logger.debug("%s", buffer.getvalue().rstrip())
    return result


def mask_iou(gt: Sequence[RLE], pred: Sequence[RLE], size: tuple[int, int]) -> np.ndarray:
    """Pairwise IoU (G, P) of GT and predicted masks of one image of ``size`` (h, w).

    A predicted mask of another size cannot overlap the image's masks: its column is 0 (the
    caller reports it). Equal to ``pycocotools.mask.iou(pred, gt, [0] * G).T`` otherwise.
    """
    out = np.zeros((len(gt), len(pred)), dtype=np.float64)
    ok = [j for j, m in enumerate(pred) if tuple(m["size"]) == tuple(size)]
    if gt and ok:
        ious = mask_utils.iou([pred[j] for j in ok], list(gt), [0] * len(gt))  # (P_ok, G)
        out[:, ok] = np.asarray(ious, dtype=np.float64).reshape(len(ok), len(gt)).T
    return out


def greedy_pairs(ious: np.ndarray) -> list[tuple[int, int]]:
    """The reference's one-to-one pairing of an IoU matrix (G, P) -> [(gt, pred), ...].

    Repeatedly take the maximum-IoU pair and remove its row and column, until the maximum is 0.
    The reference scans a (pred, gt) matrix, so ties are broken in that row-major order here too.
    """
    work = np.array(ious, dtype=np.float64).T.copy()  # (P, G), the reference's orientation
    pairs: list[tuple[int, int]] = []
    while work.size and work.max() > 0:
        p, g = np.unravel_index(int(np.argmax(work)), work.shape)
        pairs.append((int(g), int(p)))
        work[p, :] = -1.0
        work[:, g] = -1.0
    return pairs


@dataclass(frozen=True)
class ImageIoU:
    """One image's mask agreement: ``miou`` ignores unmatched masks (the reference's number),
    ``miou_penalised`` counts every unmatched GT and predicted mask as IoU 0."""

    miou: float
    miou_penalised: float
    pairs: int
    unmatched_gt: int
    unmatched_pred: int


def image_miou(ious: np.ndarray) -> ImageIoU:
    """Both mIoU variants of one image from its (G, P) IoU matrix; no pair at all gives 0.0."""
    g, p = ious.shape
    pairs = greedy_pairs(ious)
    paired = [float(ious[i, j]) for i, j in pairs]
    total = g + p - len(pairs)  # |paired| + unmatched GT + unmatched predictions
    return ImageIoU(
        miou=float(np.mean(paired)) if paired else 0.0,
        miou_penalised=float(sum(paired) / total) if paired else 0.0,
        pairs=len(pairs),
        unmatched_gt=g - len(pairs),
        unmatched_pred=p - len(pairs),
    )


@dataclass(frozen=True)
class Detection:
    """One predicted mask for AP: its image, RLE and confidence."""

    image_id: str
    mask: RLE
    score: float


def _coco(dataset: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    quietly(coco.createIndex)
    return coco


def ap50(gt: Mapping[str, tuple[tuple[int, int], Sequence[RLE]]], detections: Sequence[Detection]) -> float | None:
    """Mask AP at IoU 0.5 over one category, as COCOeval's ``summarize()`` reports it (stats[1]).

    Arguments:
      gt: image id -> ((h, w), GT masks); every image listed is evaluated, so an image without
        detections counts its GT masks as misses.
      detections: predicted masks; COCOeval ranks them by ``score`` with stable sorts, so equal
        scores are ranked by image id (sorted) and then by their order here, which decides AP.

    Returns:
      AP50 in [0, 1]; 0.0 without detections; None when the GT holds no mask (undefined).
    """
    from pycocotools.cocoeval import COCOeval

    # Int ids numbered in the order COCOeval would sort the original ids (numeric when all are
    # digits, else as strings): with equal scores that order ranks detections across images.
    ordered = sorted(gt, key=int) if all(i.isdigit() for i in gt) else sorted(gt)
    index = {image_id: k + 1 for k, image_id in enumerate(ordered)}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for image_id in ordered:
        (h, w), masks = gt[image_id]
        images.append({"id": index[image_id], "height": h, "width": w})
        for m in masks:
            anns.append({
                "id": len(anns) + 1, "image_id": index[image_id], "category_id": 1, "segmentation": m,
                "area": float(mask_utils.area(m)), "bbox": mask_utils.toBbox(m).tolist(), "iscrowd": 0,
            })
    if not anns:
        return None
    dets = [
        {"image_id": index[d.image_id], "category_id": 1, "segmentation": d.mask, "score": float(d.score)}
        for d in detections
        if d.image_id in index
    ]
    if not dets:
        return 0.0
    coco_gt = _coco({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]})
    coco_dt = quietly(lambda: coco_gt.loadRes(dets))
    evaluator = COCOeval(coco_gt, coco_dt, "segm")
    evaluator.params.catIds = [1]
    quietly(evaluator.evaluate)
    quietly(evaluator.accumulate)
    quietly(evaluator.summarize)
    value = float(evaluator.stats[1])
    return None if value < 0 else value


def caption_scores(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of one hypothesis per image against its references.

    Both sides go through pycocoevalcap's PTBTokenizer (Java) first, as ``COCOEvalCap`` does;
    CIDEr's idf comes from the references of exactly these images, so it is not comparable across
    subsets. SPICE is left out: it downloads CoreNLP on first use. Raises ``FileNotFoundError``
    when Java is missing.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = [i for i in hypotheses if i in references]
    if not ids:
        return dict.fromkeys(CAPTION_METRICS, 0.0)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": hypotheses[i]}] for i in ids})
    # The tokenizer keeps one line per caption; guard against a dropped trailing empty one.
    gts = {i: gts.get(i) or [""] for i in ids}
    res = {i: res.get(i) or [""] for i in ids}
    bleu, _ = quietly(lambda: Bleu(4).compute_score(gts, res))
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        del meteor  # its __del__ stops the Java process
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{k + 1}": float(bleu[k]) for k in range(4)}
    out.update(METEOR=float(meteor_score), ROUGE_L=float(rouge), CIDEr=float(cider))
    return out
