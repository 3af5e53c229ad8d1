"""Helpers shared by the torch vision backends of the ``full`` profile (SAM, CLIP, OWLv2, ...).

- ``runtime``: a spec's (device, dtype); device ``auto`` picks CUDA when present, half precision
  on a CPU falls back to float32 (see ``hf_common``). Options are each backend's typed
  ``self.opts`` (``roles.build_options``), not read here.
- ``to_device``: host -> device copies from pinned memory with ``non_blocking``, so the copy of
  one micro-batch overlaps the GPU work still queued from the previous one.
- ``check_images``: one clear error for a non-RGB input instead of a shape error deep in a model.
- ``family_tiny_builder``: the ``tiny:<seed>`` builder of a backend with several model families.
- ``detect_in_batches``: the micro-batch loop of the text-queried detectors (OWLv2, GroundingDINO,
  YOLO-World), each image queried with its own tags (``image_queries``).
- ``word_tokenizer``: a word-level fast tokenizer over the tag vocabulary with the special tokens
  at the ids a model family hard-codes (CLIP pools at the largest id, GroundingDINO masks BERT's
  [CLS]/[SEP]/"." ids), for the tiny random-initialised variants.
- ``tag_vocabulary``: the packaged LVIS + Objects365 class names (``assets/tag_vocabulary.txt``).
- ``crop_window`` / ``region_crops``: padded object crops with the pixels outside the object's
  mask greyed, cut where the image and masks are (the actor's device) rather than on the host.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from grand_pipeline.geometry import boxed
from grand_pipeline.geometry.boxed import BoxedMasks
from grand_pipeline.models.hf_common import device_of, save_pretrained, seeded, torch_dtype

logger = logging.getLogger(__name__)

VOCABULARY_FILE = "tag_vocabulary.txt"
T = TypeVar("T")


def runtime(spec: Any) -> tuple[torch.device, torch.dtype]:
    device = device_of(spec)
    return device, torch_dtype(spec, device)


def seeded_build(seed: int, build: Callable[[], T]) -> T:
    """``build()`` (a model, or a (model, processor) pair) under a private RNG seeded with ``seed``."""
    return seeded(seed, build)


def family_tiny_builder(
    owner: str, families: dict[str, Callable[[], tuple[Any, Any]]], family: str
) -> Callable[[Path, int], None]:
    """The ``tiny:<seed>`` builder of a backend whose option ``family`` picks one of ``families``
    (each a (random model, processor) factory); an unknown family fails when the backend starts."""
    if family not in families:
        raise ValueError(f"{owner}: unknown family {family!r}; known: {', '.join(families)}")

    def build(folder: Path, seed: int) -> None:
        model, processor = seeded_build(seed, families[family])
        save_pretrained(folder, model, processor)

    return build


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy ``x`` to ``device`` (pinned + non_blocking from the host to CUDA), then cast floating
    tensors to ``dtype``. A tensor already there (e.g. made by a processor on the device) stays."""
    if x.device != device:
        if device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
        else:
            x = x.to(device)
    if dtype is not None and x.is_floating_point():
        x = x.to(dtype)
    return x


def batch_to_device(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """A processor's output (a mapping of tensors) on ``device``; only pixel-like floats take ``dtype``."""
    return {
        key: to_device(value, device, dtype) if isinstance(value, torch.Tensor) else value
        for key, value in dict(batch).items()
    }


#: Outside-the-mask fill of region crops: mid grey, what CLIP/BLIP normalisation maps close to zero.
CROP_FILL = 127


def crop_window(box: Any, pad: float, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer (left, top, right, bottom) of a float xyxy ``box`` grown by ``pad`` x its side.

    A margin keeps the context that tells a mug from a bucket. A degenerate box (under 2 px
    after clipping) becomes a patch of up to 8 x 8 px around its centre.
    """
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    mx, my = pad * max(x2 - x1, 1.0), pad * max(y2 - y1, 1.0)
    left, top = int(max(0, np.floor(x1 - mx))), int(max(0, np.floor(y1 - my)))
    right, bottom = int(min(width, np.ceil(x2 + mx))), int(min(height, np.ceil(y2 + my)))
    if right - left < 2 or bottom - top < 2:
        cx, cy = int(np.clip((x1 + x2) / 2, 0, width - 1)), int(np.clip((y1 + y2) / 2, 0, height - 1))
        left, right = max(0, cx - 4), min(width, cx + 4)
        top, bottom = max(0, cy - 4), min(height, cy + 4)
    return left, top, right, bottom


def _masked_crop_on_host(
    image: np.ndarray, window: tuple[int, int, int, int], masks: Any, i: int
) -> np.ndarray:
    """``region_crops`` of one item on the CPU, in numpy: (h, w, 3) uint8."""
    left, top, right, bottom = window
    crop = image[top:bottom, left:right]
    if isinstance(masks, BoxedMasks):
        # Only the part of the mask's tight box inside the window is read; the rest is grey.
        bx1, by1, bx2, by2 = (int(v) for v in masks.boxes[i])
        x1, y1, x2, y2 = max(left, bx1), max(top, by1), min(right, bx2), min(bottom, by2)
        keep = (
            masks.crops[i].numpy()[y1 - by1 : y2 - by1, x1 - bx1 : x2 - bx1] if x1 < x2 and y1 < y2 else None
        )
    else:
        x1, y1 = left, top
        m = masks[i]
        keep = (m.cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m))[
            top:bottom, left:right
        ] != 0
    if keep is None or not keep.any():
        return crop.copy()
    out = np.full(crop.shape, CROP_FILL, dtype=np.uint8)
    rows, cols = keep.shape
    oy, ox = y1 - top, x1 - left
    # The mask is widened to one entry per byte (rows, cols * 3): a (rows, cols, 1) mask broadcast
    # over the channels runs 3-element inner loops, several times slower.
    np.copyto(
        out[oy : oy + rows, ox : ox + cols].reshape(rows, cols * 3),
        crop[oy : oy + rows, ox : ox + cols].reshape(rows, cols * 3),
        where=np.repeat(keep, 3, axis=1),
    )
    return out


def region_crops(
    image: np.ndarray | torch.Tensor,
    boxes: np.ndarray,
    masks: Any,
    pad: float,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Padded crops of ``boxes``; where an item's mask has pixels in its crop, the rest is greyed.

    Arguments:
      image: (H, W, 3) uint8, numpy or a tensor.
      boxes: (N, 4) float xyxy.
      masks: None, a ``geometry.boxed.BoxedMasks`` (only each crop's window is read) or dense
        (N, H, W) masks (numpy or tensor).
      pad: margin as a fraction of the box side (``crop_window``).
      device: where to cut; default the masks' device (BoxedMasks), else the image's.

    Returns:
      N (h, w, 3) uint8 tensors on ``device``. On a GPU the image is uploaded once and the
      greying needs no host sync per crop; on the CPU the work is numpy's.
    """
    if device is None:
        on_image = image.device if isinstance(image, torch.Tensor) else torch.device("cpu")
        device = masks.device if isinstance(masks, BoxedMasks) else on_image
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = int(image.shape[0]), int(image.shape[1])
    windows = [crop_window(box, pad, height, width) for box in b]
    if boxed.host_kernels(device):
        host = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if masks is None:
            return [torch.from_numpy(host[t:btm, lft:rgt].copy()) for lft, t, rgt, btm in windows]
        if isinstance(masks, BoxedMasks):
            masks = masks.to("cpu")
        return [torch.from_numpy(_masked_crop_on_host(host, w, masks, i)) for i, w in enumerate(windows)]
    if isinstance(image, torch.Tensor):
        img = image
    else:
        arr = np.asarray(image)  # torch.from_numpy warns on a read-only array (PIL's): copied once
        img = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())
    img = to_device(img, device)
    crops = []
    for i, (left, top, right, bottom) in enumerate(windows):
        crop = img[top:bottom, left:right]
        if masks is None:
            crops.append(crop.clone())
            continue
        if isinstance(masks, BoxedMasks):
            inside = masks.window(i, (left, top, right, bottom)).to(device)
        else:
            m = masks[i]
            inside = (m if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m)))[
                top:bottom, left:right
            ]
            inside = inside.to(device) != 0
        # No .any() on the host: a mask with no pixel in its crop leaves the crop as it is.
        grey = ~inside & inside.any()
        crops.append(torch.where(grey[..., None], torch.full_like(crop, CROP_FILL), crop))
    return crops


def check_images(images: list[np.ndarray], owner: str) -> list[np.ndarray]:
    out = []
    for image in images:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1 or arr.dtype != np.uint8:
            raise ValueError(f"{owner}: expected RGB uint8 images (H, W, 3), got {arr.dtype} {arr.shape}")
        # torch.from_numpy warns on read-only arrays (e.g. decoded by PIL); those are copied once.
        out.append(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy())
    return out


@functools.lru_cache(maxsize=1)
def tag_vocabulary() -> tuple[str, ...]:
    """LVIS + Objects365 names: lowercased, underscores as spaces, deduplicated, file order."""
    text = (resources.files("grand_pipeline") / "assets" / VOCABULARY_FILE).read_text(encoding="utf-8")
    names = (line.strip().lower().replace("_", " ") for line in text.splitlines())
    return tuple(dict.fromkeys(n for n in names if n and not n.startswith("#")))


def vocabulary_words() -> list[str]:
    """Every word of the tag vocabulary, for the tiny tokenizers (tags map to real ids)."""
    words = (w for name in tag_vocabulary() for w in name.replace("/", " ").replace("-", " ").split())
    return list(dict.fromkeys([*words, "a", "an", "the", "photo", "of", "and", "on", "with", ".", ",", "?"]))


def word_tokenizer(
    specials: dict[str, int], *, pad: str, unk: str, bos: str | None, eos: str | None, size: int = 0
) -> Any:
    """A word-level ``PreTrainedTokenizerFast``; ``specials`` pins tokens to ids (-1 = last id).

    Free ids are filled with vocabulary words, then ``[unusedN]`` up to ``size`` tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in vocabulary_words() if w not in specials]
    total = max(size, len(specials) + len(words))
    fixed = {(total - 1 if i < 0 else i): tok for tok, i in specials.items()}
    vocab: dict[str, int] = {}
    pending = iter(words)
    for i in range(total):
        token = fixed.get(i) or next(pending, None) or f"[unused{i}]"
        vocab[token] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##")
    if eos:
        # The real tokenizers wrap a text as [bos] words eos; models pool at or mask by these ids.
        template = f"{bos} $A {eos}" if bos else f"$A {eos}"
        marks = [(t, vocab[t]) for t in (bos, eos) if t]
        core.post_processor = processors.TemplateProcessing(single=template, special_tokens=marks)
    named = {"pad_token": pad, "unk_token": unk}
    if bos:
        named["bos_token"] = bos
    if eos:
        named["eos_token"] = eos
    return PreTrainedTokenizerFast(tokenizer_object=core, **named)


@functools.lru_cache(maxsize=1)
def fallback_queries() -> tuple[str, ...]:
    """COCO-80 names: what an open-vocabulary detector looks for in an image without tags."""
    import json

    text = (resources.files("grand_pipeline") / "assets" / "coco80_labels.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


def detect_in_batches(
    owner: str,
    images: list[np.ndarray],
    context: list[dict[str, Any]] | None,
    max_queries: int,
    batch_size: int,
    detect_batch: Callable[[list[np.ndarray], list[list[str]]], list[T]],
) -> list[T]:
    """The text-queried detectors' ``detect``: checked images, their queries (``image_queries``),
    then ``detect_batch(images, queries)`` on micro-batches of ``batch_size`` images, in order."""
    images = check_images(images, owner)
    queries = image_queries(context, len(images), max_queries)
    out: list[T] = []
    for lo in range(0, len(images), batch_size):
        out.extend(detect_batch(images[lo : lo + batch_size], queries[lo : lo + batch_size]))
    return out


def image_queries(context: list[dict[str, Any]] | None, n: int, limit: int) -> list[list[str]]:
    """Per image, its tag names (``Tag`` or str, best first, at most ``limit``), else the fallback."""
    out = []
    for i in range(n):
        tags = (context[i].get("tags") if context and i < len(context) else None) or []
        names = [str(getattr(t, "name", t)).strip().lower() for t in tags]
        names = list(dict.fromkeys(x for x in names if x))[:limit]
        out.append(names or list(fallback_queries())[:limit])
    return out
