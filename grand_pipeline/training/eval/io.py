"""GCG evaluation records and the prediction reader.

Predictions follow the authors' inference output: one ``<image_id>.json`` per image holding
``{"image_id", "caption", "phrases", "pred_masks"}`` (COCO RLE masks) and, optionally, per-mask
``"scores"``. A file that cannot be used is a counted, reported skip, never a crash. Image ids
are strings (the authors' ids are file-name stems). Ground truth readers live in ``gt.py``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from grand_pipeline.geometry import rle as rle_ops
from grand_pipeline.sources.base import SourceError

logger = logging.getLogger(__name__)

RLE = dict[str, Any]

#: Skipped files listed by name in a report; the counts always cover every skip.
MAX_LISTED = 50

PRED_KEYS = ("image_id", "caption", "phrases", "pred_masks")


class EvalInputError(SourceError, ValueError):
    """An evaluation input a user can fix (missing folder, no readable file, broken GT)."""


@dataclass(frozen=True)
class GTImage:
    """One image's GCG ground truth; ``phrases[k]`` is grounded by ``masks[k]`` when counts agree."""

    image_id: str
    height: int
    width: int
    captions: tuple[str, ...]
    """Reference captions (GranD-f and our dense caption: one); the first carries ``phrases``."""
    phrases: tuple[str, ...]
    masks: tuple[RLE, ...]


@dataclass(frozen=True)
class Prediction:
    """One image's prediction; ``scores`` (one per mask) is None when the file has none."""

    image_id: str
    caption: str
    phrases: tuple[str, ...]
    masks: tuple[RLE, ...]
    scores: tuple[float, ...] | None


@dataclass
class Loaded:
    """What a reader kept, keyed by image id, what it skipped (counts + the first files), and
    what it kept with a warning (counts)."""

    items: dict[str, Any] = field(default_factory=dict)
    skips: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, name: str, reason: str, detail: str = "") -> None:
        self.skips[reason] += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append({"file": name, "reason": reason, "detail": detail[:200]})


def normalise_rle(obj: Any) -> RLE:
    """A COCO RLE dict (compressed string, or uncompressed ``counts`` list) -> compressed str RLE.

    Validation is the project's RLE parser (sizes, run lengths summing to h*w); raises
    ``ValueError`` (``InvalidRLE``) when ``obj`` is not a decodable RLE.
    """
    rle_ops.area([obj])
    h, w = (int(v) for v in obj["size"])
    counts = obj["counts"]
    if not isinstance(counts, str | bytes):
        counts = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": counts}


def _parse_prediction(doc: Any) -> tuple[Prediction, str | None]:
    """One prediction document -> (Prediction, warning or None); ``ValueError`` when unusable."""
    if not isinstance(doc, dict):
        raise ValueError("top level is not an object")
    missing = [k for k in PRED_KEYS if k not in doc]
    if missing:
        raise ValueError(f"missing keys: {', '.join(missing)}")
    image_id, caption, phrases, masks = (doc[k] for k in PRED_KEYS)
    if not isinstance(image_id, str | int) or isinstance(image_id, bool) or str(image_id) == "":
        raise ValueError("image_id must be a non-empty string or an int")
    if not isinstance(caption, str):
        raise ValueError("caption must be a string")
    if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
        raise ValueError("phrases must be a list of strings")
    if not isinstance(masks, list):
        raise ValueError("pred_masks must be a list")
    rles = tuple(normalise_rle(m) for m in masks)
    scores, warning = doc.get("scores"), None
    if scores is not None:
        ok = isinstance(scores, list) and len(scores) == len(rles) and all(
            isinstance(s, int | float) and not isinstance(s, bool) for s in scores
        )
        if not ok:
            scores, warning = None, "bad_scores"
    parsed = tuple(float(s) for s in scores) if scores is not None else None
    return Prediction(str(image_id), caption, tuple(phrases), rles, parsed), warning


def read_predictions(pred_dir: str | Path) -> Loaded:
    """Every ``*.json`` in ``pred_dir`` -> ``Loaded`` of :class:`Prediction` by image id.

    Skip reasons: ``not_json``, ``bad_format`` (missing keys, bad types or masks),
    ``duplicate_image_id``. Warning ``bad_scores`` counts files whose ``scores`` were dropped (not
    one number per mask); the prediction itself is kept. Raises :class:`EvalInputError` when the folder is missing or
    empty, or when no file is readable.
    """
    folder = Path(pred_dir)
    if not folder.is_dir():
        raise EvalInputError(f"--pred {folder}: not a folder")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise EvalInputError(f"--pred {folder}: no *.json prediction files")
    out = Loaded()
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            out.skip(path.name, "not_json", str(exc))
            continue
        try:
            pred, warning = _parse_prediction(doc)
        except ValueError as exc:
            out.skip(path.name, "bad_format", str(exc))
            continue
        if pred.image_id in out.items:
            out.skip(path.name, "duplicate_image_id", pred.image_id)
            continue
        if warning:
            out.warnings[warning] += 1
        out.items[pred.image_id] = pred
    if not out.items:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(out.skips.items()))
        raise EvalInputError(f"--pred {folder}: no readable prediction among {len(files)} files ({reasons})")
    if out.skips or out.warnings:
        logger.warning("predictions: skipped %s, warnings %s", dict(out.skips), dict(out.warnings))
    return out
