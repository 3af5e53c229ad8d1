"""GCG evaluation: predictions vs ground truth -> one report dict (AP50, mIoU, recall, captions).

The evaluated images are the GT images (all of them, as the reference does, or only those with a
prediction when ``only_predicted``). A GT image without a prediction scores like an empty
prediction: its masks are AP misses, its mIoU is 0 and its phrases stay in the recall
denominator; caption metrics cover the images that have a prediction. Predictions of images the
GT does not know are counted and ignored.

AP50 ranks predicted masks by score. ``ap_score="file"`` uses the file's per-mask ``scores``
(e.g. the predicted IoU or the mean mask probability), falling back to 1.0 with a counted
warning where a file has none; ``"constant"`` gives every mask 1.0 like the reference, and AP
then depends on the order of the predictions: COCOeval ranks ties by image id (sorted), then by
mask order within the file, which reproduces the reference's number on the same inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from grand_pipeline.training.eval import metrics, recall
from grand_pipeline.training.eval.embed import DEFAULT_EMBEDDER, Embed, build_embedder
from grand_pipeline.training.eval.gt import read_gt
from grand_pipeline.training.eval.io import MAX_LISTED, EvalInputError, GTImage, Prediction, read_predictions

logger = logging.getLogger(__name__)

#: Headline keys, in the order the CLI table prints them.
HEADLINE = ("AP50", "mIoU", "mIoU_penalised", "recall", "recall_legacy", *metrics.CAPTION_METRICS)


@dataclass(frozen=True)
class EvalOptions:
    """How predictions are scored; recorded under ``settings`` in the report."""

    ap_score: Literal["file", "constant"] = "file"
    iou_threshold: float = 0.5
    sim_threshold: float = 0.5
    only_predicted: bool = False

    def __post_init__(self) -> None:
        if self.ap_score not in ("file", "constant"):
            raise EvalInputError(f"--ap-score {self.ap_score!r}: expected 'file' or 'constant'")


def _detections(
    image: GTImage, pred: Prediction, wrong_size: set[int], options: EvalOptions
) -> list[metrics.Detection]:
    """One image's predicted masks for AP; masks of another frame size cannot match and are left out."""
    use_file = options.ap_score == "file" and pred.scores is not None
    return [
        metrics.Detection(image.image_id, m, pred.scores[j] if use_file else 1.0)  # type: ignore[index]
        for j, m in enumerate(pred.masks)
        if j not in wrong_size
    ]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def evaluate_gcg(
    gt: Mapping[str, GTImage],
    preds: Mapping[str, Prediction],
    embed: Embed,
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """Score ``preds`` against ``gt`` -> the report dict (headline metrics, counts, per-image issues).

    ``embed`` is the phrase embedder (``list[str] -> (N, D)``); each distinct phrase is embedded
    once. Raises :class:`EvalInputError` when no prediction belongs to a GT image.
    """
    options = options or EvalOptions()
    matched = [i for i in gt if i in preds]
    if not matched:
        sample = ", ".join(list(preds)[:3])
        raise EvalInputError(f"no prediction matches a GT image id (prediction ids such as: {sample})")
    images = matched if options.only_predicted else list(gt)
    warnings: Counter[str] = Counter()
    size_issues: list[dict[str, Any]] = []
    ious_by_image: dict[str, np.ndarray] = {}
    mious: list[metrics.ImageIoU] = []
    detections: list[metrics.Detection] = []
    for image_id in images:
        image, pred = gt[image_id], preds.get(image_id)
        masks = pred.masks if pred else ()
        wrong = {j for j, m in enumerate(masks) if tuple(m["size"]) != (image.height, image.width)}
        if wrong:
            warnings["pred_mask_wrong_size"] += len(wrong)
            size_issues.append({"image_id": image_id, "masks": sorted(wrong)})
        ious = metrics.mask_iou(image.masks, masks, (image.height, image.width))
        ious_by_image[image_id] = ious
        mious.append(metrics.image_miou(ious))
        if pred is not None:
            if options.ap_score == "file" and pred.scores is None and pred.masks:
                warnings["scores_missing_used_1.0"] += 1
            detections.extend(_detections(image, pred, wrong, options))

    cache = recall.EmbeddingCache(embed)
    cache.add([t for i in matched for t in (*gt[i].phrases, *preds[i].phrases)])
    recalls = [
        recall.image_recall(
            i, gt[i].phrases, preds[i].phrases if i in preds else (), ious_by_image[i], cache,
            options.iou_threshold, options.sim_threshold,
        )
        for i in images
    ]
    n_phrases = sum(r.gt_phrases for r in recalls)
    tp_assign = sum(r.tp_assignment for r in recalls)
    tp_legacy = sum(r.tp_legacy for r in recalls)
    mismatches = [m for r in recalls for m in r.mismatches]

    try:
        captions = metrics.caption_scores(
            {i: gt[i].captions for i in matched}, {i: preds[i].caption for i in matched}
        )
    except FileNotFoundError as exc:
        raise EvalInputError(f"caption metrics need a Java runtime on PATH ({exc})") from None

    missing = [i for i in images if i not in preds]
    unknown = [i for i in preds if i not in gt]
    report: dict[str, Any] = {
        "AP50": metrics.ap50({i: ((gt[i].height, gt[i].width), gt[i].masks) for i in images}, detections),
        "mIoU": _mean([m.miou for m in mious]),
        "mIoU_penalised": _mean([m.miou_penalised for m in mious]),
        "recall": tp_assign / n_phrases if n_phrases else 0.0,
        "recall_legacy": tp_legacy / n_phrases if n_phrases else 0.0,
        **captions,
        "images": len(images),
        "phrases": n_phrases,
        "predicted_images": len(matched),
        "true_positives": {"assignment": tp_assign, "legacy": tp_legacy},
        "masks": {
            "gt": sum(len(gt[i].masks) for i in images),
            "pred": sum(len(preds[i].masks) for i in matched),
            "unmatched_gt": sum(m.unmatched_gt for m in mious),
            "unmatched_pred": sum(m.unmatched_pred for m in mious),
        },
        "missing_predictions": len(missing),
        "unknown_predictions": len(unknown),
        "mismatch_images": len({m["image_id"] for m in mismatches}),
        "mismatches": mismatches,
        "wrong_size_masks": size_issues,
        "warnings": dict(sorted(warnings.items())),
        "examples": {"missing_predictions": missing[:MAX_LISTED], "unknown_predictions": unknown[:MAX_LISTED]},
        "settings": {
            **asdict(options),
            "recall": "assignment (max summed IoU, then IoU and similarity thresholds)",
            "recall_legacy": "reference loop (stops at the first failing max-IoU pair)",
            "distinct_phrases_embedded": len(cache),
        },
    }
    return report


def run_eval_gcg(
    pred_dir: str | Path,
    gt: str,
    *,
    options: EvalOptions | None = None,
    split: str | None = None,
    embedder: str = DEFAULT_EMBEDDER,
    profile: str = "lite",
    embed: Embed | None = None,
    convert: Any = None,
) -> dict[str, Any]:
    """``grand glamm eval-gcg``: read predictions and GT, build the embedder, evaluate.

    ``embed`` overrides ``embedder``/``profile`` (tests inject a deterministic one); ``convert``
    (``ConvertOptions``) filters the GT of a committed output as the exports do. The report
    gains the reader's skips (``skips``, ``skipped_files``) and the GT converter's counts.
    """
    loaded = read_predictions(pred_dir)
    truth, gt_counts = read_gt(gt, split, convert)
    name = embedder if embedder != DEFAULT_EMBEDDER else f"{embedder} (profile {profile})"
    if embed is not None:
        name = "injected"
    if embed is None:
        embed = build_embedder(embedder, profile)
    report = evaluate_gcg(truth, loaded.items, embed, options)
    report["skips"] = dict(sorted(loaded.skips.items()))
    report["skipped_files"] = loaded.skipped
    report["warnings"] = dict(sorted((Counter(report["warnings"]) + loaded.warnings).items()))
    report["gt_counts"] = dict(sorted(gt_counts.items()))
    report["settings"]["embedder"] = name
    logger.info("gcg eval: %d images, %d phrases", report["images"], report["phrases"])
    return report
