"""GLaMM inference: GCG predictions for the evaluator, region captions, referring segmentation.

``run_infer`` writes one ``<image_id>.json`` per image in the evaluator's format (``eval/io.py``):
``{"image_id", "caption", "phrases", "pred_masks": [COCO RLE], "scores"}``, each written atomically
(temp file + rename), so ``grand glamm eval-gcg --pred DIR`` reads them as they are. ``scores`` is
each mask's mean probability inside the mask (an AP ranking that depends on the mask, unlike the
reference's constant 1.0). Images come from a committed output (the rows name the source shard
and file; pixels stream from the run's input, one pass per shard) or from a folder of images.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grand_pipeline.geometry import rle
from grand_pipeline.schemas import STATUS_OK
from grand_pipeline.store import Store, StoreError
from grand_pipeline.training.data.conversation import GCG_EVAL_INSTRUCTION, REGION_QUESTIONS, SEG_QUESTIONS
from grand_pipeline.training.data.convert import image_ref
from grand_pipeline.training.data.images import ImageSource, input_uri
from grand_pipeline.training.data.rows import iter_committed_rows
from grand_pipeline.training.data.tokens import BBOX_TOKEN
from grand_pipeline.training.model.generation import answer, gcg, parse_gcg

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: The reference's GCG evaluation budget (``eval/gcg/infer.py``).
DEFAULT_MAX_NEW_TOKENS = 512


def gcg_prediction(
    model: Any, image_id: str, image: np.ndarray, max_new_tokens: int, tokenizer: Any = None
) -> dict[str, Any]:
    """One image's prediction document (module docstring)."""
    out = gcg(model, image, GCG_EVAL_INSTRUCTION, max_new_tokens=max_new_tokens, tokenizer=tokenizer)
    return {
        "image_id": image_id,
        "caption": out["caption"],
        "phrases": out["phrases"],
        "pred_masks": rle.encode(out["masks"]) if len(out["masks"]) else [],
        "scores": out["scores"],
    }


def _write_json(folder: Path, name: str, doc: dict[str, Any]) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, folder / name)


def run_infer(
    model: Any,
    tokenizer: Any,
    cfg: Any,
    images: Iterable[tuple[str, np.ndarray]],
    to_dir: str | Path,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> int:
    """GCG predictions of ``images`` ((image_id, H x W x 3 uint8) pairs) into ``to_dir``.

    ``cfg`` is the model's ``ModelConfig`` (its preprocessing must be the one ``model`` was built
    with); returns the number of files written.
    """
    if cfg is not None and cfg != model.cfg:
        raise ValueError("run_infer: cfg differs from the model's own config")
    folder = Path(to_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for image_id, pixels in images:
        doc = gcg_prediction(model, str(image_id), pixels, max_new_tokens, tokenizer)
        _write_json(folder, f"{image_id}.json", doc)
        written += 1
        logger.info("gcg %s: %d phrase(s), %d mask(s)", image_id, len(doc["phrases"]), len(doc["pred_masks"]))
    return written


# ----------------------------------------------------------------------------- image sources


def images_from_output(
    output: str, image_ids: Iterable[str] = (), images_uri: str | None = None, counts: Counter | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Pixels of the committed output's ok rows (all, or only ``image_ids``), shard by shard.

    Unusable images are counted in ``counts`` (``images:*``) and skipped; wanted ids the output
    does not have raise ``StoreError`` before any pixel is read.
    """
    counts = counts if counts is not None else Counter()
    wanted = set(image_ids)
    store = Store(output)
    refs = [
        image_ref(row)
        for row in iter_committed_rows(store)
        if row.get("status") == STATUS_OK and (not wanted or str(row["image_id"]) in wanted)
    ]
    unknown = sorted(wanted - {r.image_id for r in refs})
    if unknown:
        raise StoreError(f"{output}: no ok row for image(s) {', '.join(unknown[:5])}")
    source = ImageSource(input_uri(store, images_uri))
    for ref, pixels in source.iter_images(refs, counts):
        yield ref.image_id, pixels


def images_from_folder(folder: str | Path, image_ids: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
    """``<image_id>.{jpg,jpeg,png}`` files of ``folder`` (all, or only ``image_ids``) as RGB arrays."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise StoreError(f"--images {root}: not a folder")
    files = {p.stem: p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    wanted = list(image_ids) or sorted(files)
    unknown = [i for i in wanted if i not in files]
    if unknown:
        raise StoreError(f"--images {root}: no image file for {', '.join(unknown[:5])}")
    for image_id in wanted:
        with Image.open(files[image_id]) as img:
            yield image_id, np.asarray(img.convert("RGB"))


# ----------------------------------------------------------------------------- other tasks


def caption_region(model: Any, image: np.ndarray, boxes: np.ndarray, max_new_tokens: int = 64) -> list[str]:
    """A short description of each box (N x 4 xyxy, original pixels), one prompt per box."""
    question = REGION_QUESTIONS[0].replace("<region>", f"region1 {BBOX_TOKEN}")
    out = []
    for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        result = answer(model, image, question, boxes_px=box[None], max_new_tokens=max_new_tokens)
        out.append(parse_gcg(result["text"])[0])
    return out


def segment_expression(model: Any, image: np.ndarray, text: str, max_new_tokens: int = 32) -> dict[str, Any]:
    """Referring segmentation: ``{answer, masks [k, H, W] bool, scores}`` for the expression ``text``
    (normally one mask, the answer's ``[SEG]``)."""
    result = answer(model, image, SEG_QUESTIONS[0].format(expression=text), max_new_tokens=max_new_tokens)
    return {"answer": parse_gcg(result["text"])[0], "masks": result["masks"], "scores": result["scores"]}


# ----------------------------------------------------------------------------- CLI entry


def load_model(checkpoint: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a training checkpoint (``.../step_N``) or a merged
    export (``grand glamm export-weights``), rebuilt from the config stored with it."""
    import torch

    from grand_pipeline.training.model.builder import build_model
    from grand_pipeline.training.train import checkpoint as ckpt_io
    from grand_pipeline.training.train import export
    from grand_pipeline.training.train.loop import seed_everything
    from grand_pipeline.training.train.storage import Location

    if Location.of(checkpoint).read_marker(export.MARKER) is not None:
        merged, cfg = export.load_exported(checkpoint)
        seed_everything(cfg.seed)
        model, tokenizer = build_model(cfg.model, dtype=torch.float32)
        model.load_merged_state_dict(merged)
        return model.eval(), tokenizer
    restored, _ = export.restore(ckpt_io.load(checkpoint))
    return restored, getattr(restored, "tokenizer", None)


def infer_command(
    checkpoint: str | None,
    output: str | None,
    images_dir: str | None,
    image_ids: list[str],
    to: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> int:
    """``grand glamm infer``: GCG predictions of a checkpoint (default: the newest under ``output``)
    for the images of ``images_dir`` or of the committed ``output``; returns the files written."""
    from grand_pipeline.training.train import checkpoint as ckpt_io

    if checkpoint is None:
        if output is None:
            raise StoreError("--checkpoint or --output (whose newest checkpoint is used) is required")
        checkpoint = ckpt_io.latest(output)
        if checkpoint is None:
            raise ckpt_io.CheckpointError(f"no complete checkpoint under {output}/glamm/checkpoints")
    if images_dir is None and output is None:
        raise StoreError("--images DIR or --output URI (a committed run) is required")
    model, tokenizer = load_model(checkpoint)
    images = (
        images_from_folder(images_dir, image_ids)
        if images_dir
        else images_from_output(str(output), image_ids)
    )
    return run_infer(model, tokenizer, model.cfg, images, to, max_new_tokens)
