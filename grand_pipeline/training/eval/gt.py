"""Ground truth for GCG evaluation, as :class:`GTImage` per image.

Either the authors' two GranD-f files in a folder (``<split>_gcg_coco_mask_gt.json`` +
``<split>_gcg_coco_caption_gt.json``) or our committed output, through the GLaMM converter's
dense-caption GCG sample of each image. A broken ground truth is a user error
(:class:`EvalInputError`), not a skip: scores against half a ground truth would look valid and be
wrong.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from grand_pipeline.training.eval.io import RLE, EvalInputError, GTImage, normalise_rle

logger = logging.getLogger(__name__)

MASK_GT_SUFFIX = "_gcg_coco_mask_gt.json"
CAPTION_GT_SUFFIX = "_gcg_coco_caption_gt.json"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalInputError(f"ground truth {path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise EvalInputError(f"ground truth {path}: not a COCO file (no 'images' list)")
    if not isinstance(doc.get("annotations", []), list):
        raise EvalInputError(f"ground truth {path}: 'annotations' is not a list")
    return doc


def find_gt_files(gt_dir: Path, split: str | None = None) -> tuple[Path, Path] | None:
    """The (mask GT, caption GT) pair in ``gt_dir``, or None when the folder holds neither.

    With several splits present, ``split`` (e.g. ``val``) picks one; otherwise it is an error.
    """
    masks = {p.name[: -len(MASK_GT_SUFFIX)]: p for p in gt_dir.glob(f"*{MASK_GT_SUFFIX}")}
    captions = {p.name[: -len(CAPTION_GT_SUFFIX)]: p for p in gt_dir.glob(f"*{CAPTION_GT_SUFFIX}")}
    if not masks and not captions:
        return None
    splits = sorted(set(masks) & set(captions))
    if split is not None:
        splits = [s for s in splits if s == split]
    if len(splits) != 1:
        found = ", ".join(sorted(set(masks) | set(captions))) or "none"
        want = f"split {split!r}" if split else "exactly one split (or give --split)"
        raise EvalInputError(f"--gt {gt_dir}: need {want} with both GT files; found prefixes: {found}")
    return masks[splits[0]], captions[splits[0]]


def read_gt_dir(gt_dir: str | Path, split: str | None = None) -> dict[str, GTImage]:
    """The authors' GranD-f GT files -> :class:`GTImage` per image, in caption-file order.

    A phrase list comes from the image's first caption annotation with ``labels``; masks are the
    image's mask annotations in file order (the order the reference pairs them by).
    """
    folder = Path(gt_dir)
    pair = find_gt_files(folder, split)
    if pair is None:
        raise EvalInputError(f"--gt {folder}: no *{MASK_GT_SUFFIX} / *{CAPTION_GT_SUFFIX} files")
    mask_doc, cap_doc = _load_json(pair[0]), _load_json(pair[1])
    sizes: dict[str, tuple[int, int]] = {}
    for img in mask_doc["images"] + cap_doc["images"]:
        try:
            sizes.setdefault(str(img["id"]), (int(img["height"]), int(img["width"])))
        except (KeyError, TypeError, ValueError):
            raise EvalInputError(f"--gt {folder}: an image entry lacks id/height/width: {img!r}") from None
    masks: dict[str, list[RLE]] = {}
    for ann in mask_doc.get("annotations", []):
        try:
            masks.setdefault(str(ann["image_id"]), []).append(normalise_rle(ann["segmentation"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EvalInputError(f"--gt {pair[0]}: bad annotation {ann.get('id')!r}: {exc}") from None
    captions: dict[str, list[str]] = {}
    phrases: dict[str, tuple[str, ...]] = {}
    for ann in cap_doc.get("annotations", []):
        key = str(ann.get("image_id"))
        if not isinstance(ann.get("caption"), str):
            raise EvalInputError(f"--gt {pair[1]}: caption annotation of {key!r} has no caption")
        captions.setdefault(key, []).append(ann["caption"])
        labels = ann.get("labels")
        if key not in phrases and isinstance(labels, list):
            phrases[key] = tuple(str(x) for x in labels)
    out: dict[str, GTImage] = {}
    for img in cap_doc["images"]:
        key = str(img["id"])
        if key not in captions:
            raise EvalInputError(f"--gt {pair[1]}: image {key!r} has no caption annotation")
        h, w = sizes[key]
        out[key] = GTImage(key, h, w, tuple(captions[key]), phrases.get(key, ()), tuple(masks.get(key, [])))
    if not out:
        raise EvalInputError(f"--gt {folder}: the caption GT lists no image")
    check_gt_sizes(out, str(folder))
    return out


def check_gt_sizes(gt: Mapping[str, GTImage], source: str) -> None:
    """Every GT mask must have its image's (h, w): IoU against predictions assumes one frame."""
    for image in gt.values():
        for k, m in enumerate(image.masks):
            if tuple(m["size"]) != (image.height, image.width):
                raise EvalInputError(
                    f"--gt {source}: mask {k} of image {image.image_id!r} has size {m['size']}, "
                    f"the image is {image.height}x{image.width}"
                )


def gt_from_samples(samples: Iterable[Any]) -> dict[str, GTImage]:
    """Dense-caption GCG samples of the converter -> :class:`GTImage` per image.

    Accepts ``GCGSample`` objects whose size and id sit either on ``sample.image`` (an
    ``ImageRef``) or on the sample itself; samples whose ``source`` is not ``"dense"`` are ignored,
    and the first dense sample of an image wins.
    """
    out: dict[str, GTImage] = {}
    for sample in samples:
        if getattr(sample, "source", None) != "dense":
            continue
        ref = getattr(sample, "image", sample)
        key = str(ref.image_id)
        if key in out:
            continue
        out[key] = GTImage(
            image_id=key,
            height=int(ref.height),
            width=int(ref.width),
            captions=(sample.caption,),
            phrases=tuple(p.text for p in sample.phrases),
            masks=tuple(normalise_rle(p.mask) for p in sample.phrases),
        )
    return out


def read_gt_store(uri: str, convert: Any = None) -> tuple[dict[str, GTImage], Counter[str]]:
    """Our committed output -> (GT by image, converter counts).

    The GT is ``rows.iter_gcg_ground_truth`` under ``convert`` (``ConvertOptions``; the
    converter's defaults when None, the same filters as the exports' defaults): each ok
    row's dense-caption GCG sample, the same stream the ``gcg-oracle`` export writes as
    predictions. Rows without one (unverified or missing dense caption, ...) are counted by the
    converter and left out.
    """
    try:
        from grand_pipeline.training.data.convert import ConvertOptions
        from grand_pipeline.training.data.rows import iter_gcg_ground_truth
    except ImportError as exc:  # pragma: no cover - the converter ships in the same package
        raise EvalInputError(f"--gt {uri}: the GLaMM converter is not available ({exc})") from None
    from grand_pipeline.store import Store

    counts: Counter[str] = Counter()
    gt = gt_from_samples(iter_gcg_ground_truth(Store(uri), convert or ConvertOptions(), counts))
    if not gt:
        raise EvalInputError(f"--gt {uri}: no committed image with a dense-caption GCG sample")
    check_gt_sizes(gt, uri)
    return gt, counts


def read_gt(gt: str, split: str | None = None, convert: Any = None) -> tuple[dict[str, GTImage], Counter[str]]:
    """``--gt``: a folder with the authors' GT files, else a store URI of our committed output."""
    path = Path(gt)
    if path.is_dir() and find_gt_files(path, split) is not None:
        return read_gt_dir(path, split), Counter()
    if "://" not in gt and not path.exists():
        raise EvalInputError(f"--gt {gt}: no such folder")
    return read_gt_store(gt, convert)
