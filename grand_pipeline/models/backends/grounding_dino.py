"""GroundingDINO (transformers ``GroundingDinoForObjectDetection``) as a detector and as a grounder.

Both roles share one loaded model per hub and weights folder (``hf_common.shared``), so a
profile that uses it for detection and for phrase grounding holds one copy on the GPU.

Text prompt: names or phrases joined as "a . b . c ." (GroundingDINO's training format; the
model masks attention between the "." separated parts by BERT's [CLS]/[SEP]/"." ids). Scoring is
done here per query rather than by decoding tokens back to text: a box's score for query j is the
largest sigmoid token logit over the tokens of j (found from the tokenizer's character offsets),
its label the best j. Boxes are normalised cxcywh relative to the unpadded image, as in the
processor's post-processing.

- detector ``grounding_dino``: queries = the image's tags (else COCO-80), boxes with score >=
  ``box_threshold`` (0.3, the reference's value), at most ``max_detections``.
- grounder ``grounding_dino``: each phrase -> the best box for that phrase if its score >=
  ``box_threshold``, else None. Phrases go in chunks of ``max_phrases`` per prompt, the chunks of
  one image as one batch. The objects list is not used: matching groundings to objects (IoU >
  0.75) is level 2's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grand_pipeline.config import check_ranges
from grand_pipeline.models.hf_common import load_folder, load_pretrained, save_pretrained, shared_pretrained
from grand_pipeline.models.roles import (
    Detections,
    Detector,
    Grounder,
    Grounding,
    register_backend,
)
from grand_pipeline.models.vision_common import (
    batch_to_device,
    check_images,
    detect_in_batches,
    runtime,
    seeded_build,
    to_device,
    word_tokenizer,
)

logger = logging.getLogger(__name__)

#: BERT ids that GroundingDINO hard-codes as separators (modeling_grounding_dino.SPECIAL_TOKENS).
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}


def bert_tokenizer(size: int, max_length: int) -> Any:
    """A word-level tokenizer of ``size`` ids with BERT's special tokens at the ids GroundingDINO
    hard-codes (a random model needs no real vocabulary, only those ids in their places)."""
    tok = word_tokenizer(BERT_SPECIALS, pad="[PAD]", unk="[UNK]", bos="[CLS]", eos="[SEP]", size=size)
    tok.model_max_length = max_length
    return tok


def make_config(backbone: dict[str, Any], text: dict[str, Any], **rest: Any) -> Any:
    """``GroundingDinoConfig`` from plain dicts: a Swin backbone, a BERT text encoder, the rest."""
    from transformers import BertConfig, GroundingDinoConfig, SwinConfig

    return GroundingDinoConfig(backbone_config=SwinConfig(**backbone), text_config=BertConfig(**text), **rest)


def make_processor(tok: Any, shortest_edge: int, longest_edge: int) -> Any:
    from transformers import GroundingDinoImageProcessor, GroundingDinoProcessor

    image = GroundingDinoImageProcessor(size={"shortest_edge": shortest_edge, "longest_edge": longest_edge})
    return GroundingDinoProcessor(image_processor=image, tokenizer=tok)


def build_tiny(folder: Path, seed: int) -> None:
    """Random GroundingDINO: 1-layer Swin stages, 1-layer BERT, d_model 32, 16 queries; 2 decoder layers
    because the per-layer box heads are tied to the first one, which needs a second."""
    from transformers import GroundingDinoForObjectDetection

    tok = bert_tokenizer(size=1536, max_length=64)
    backbone: dict[str, Any] = {  # out_features is a runtime kwarg the type stubs lack
        "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 4,
        "out_features": ["stage2", "stage3", "stage4"],
    }  # fmt: skip
    text = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip
    config = make_config(
        backbone, text, d_model=32, num_queries=16, max_text_len=64,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2,
    )  # fmt: skip
    model = seeded_build(seed, lambda: GroundingDinoForObjectDetection(config))
    # 128 px, not less: the extra feature level (stride 64) must keep more than 1x1 pixel, or
    # its GroupNorm has one value per group and fails on square photos.
    save_pretrained(folder, model, make_processor(tok, shortest_edge=128, longest_edge=192))


def load_grounding_dino(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    return load_pretrained(GroundingDinoForObjectDetection, GroundingDinoProcessor, path, dtype)


class GroundingDinoModel:
    """The loaded model plus prompt building and per-query scoring, shared by both roles."""

    def __init__(self, spec: Any, hub: Any, owner: str, box_threshold: float) -> None:
        resolved = load_folder(spec, "grounding_dino", build_tiny)
        self.device, self.dtype = runtime(spec)
        self.model, self.processor = shared_pretrained(
            hub, "grounding_dino", resolved.path, self.device, self.dtype, load_grounding_dino
        )
        self.box_threshold = box_threshold
        self.max_len = int(self.model.config.max_text_len)
        self.sha256 = resolved.sha256
        tiny = resolved.source.startswith("tiny:")
        self.model_id = f"grounding_dino-random({resolved.source})" if tiny else str(spec.model)
        logger.debug("%s: %s on %s", owner, self.model_id, self.device)

    def score(self, images: list[np.ndarray], queries: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Per (image, prompt) pair: boxes (B, Q, 4) xyxy pixels and scores (B, Q, J) per query j.

        J is the longest query list; a query cut off by the text limit scores 0.
        """
        texts, spans = [], []
        for names in queries:
            text, marks = "", []
            for name in names:
                marks.append((len(text), len(text) + len(name)))
                text += f"{name} . "
            texts.append(text.strip())
            spans.append(marks)
        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt",
            return_offsets_mapping=True,
        )  # fmt: skip
        offsets = tokens.pop("offset_mapping").numpy()
        pixels = self.processor.image_processor(images=images, return_tensors="pt")
        inputs = {**batch_to_device(tokens, self.device), **batch_to_device(pixels, self.device)}
        inputs["pixel_values"] = to_device(pixels["pixel_values"], self.device, self.dtype)
        with torch.inference_mode():
            out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu().numpy()  # (B, Q, max_text_len)
        cxcywh = out.pred_boxes.float().cpu().numpy()  # (B, Q, 4) normalised
        width_j = max(len(m) for m in spans)
        scores = np.zeros((len(images), probs.shape[1], width_j), np.float32)
        boxes = np.zeros((len(images), probs.shape[1], 4), np.float32)
        for b, (marks, img) in enumerate(zip(spans, images, strict=True)):
            height, width = img.shape[:2]
            cx, cy, w, h = np.moveaxis(cxcywh[b], -1, 0)
            xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * [
                width,
                height,
                width,
                height,
            ]
            xyxy[:, 0::2] = np.clip(xyxy[:, 0::2], 0, width)
            xyxy[:, 1::2] = np.clip(xyxy[:, 1::2], 0, height)
            boxes[b] = xyxy
            starts, ends = offsets[b, :, 0], offsets[b, :, 1]
            for j, (lo, hi) in enumerate(marks):
                token_ids = np.nonzero((ends > starts) & (starts >= lo) & (ends <= hi))[0]
                token_ids = token_ids[token_ids < probs.shape[2]]
                if token_ids.size:
                    scores[b, :, j] = probs[b][:, token_ids].max(axis=1)
        return boxes, scores


@dataclass(frozen=True)
class GroundingDinoDetectorOptions:
    """Boxes under ``box_threshold`` never leave the model: a candidate floor applied with the
    model's own post-processing (before ``max_detections``), not the ensemble's pre-filter
    ``level1.score_thresholds``, which is cut later on what comes out."""

    box_threshold: float = 0.3
    max_queries: int = 32
    """Tags queried per image, best first."""
    max_detections: int = 100

    def validate(self) -> None:
        check_ranges(self, unit=("box_threshold",), at_least_one=("max_queries", "max_detections"))


@register_backend("detector", "grounding_dino", options=GroundingDinoDetectorOptions)
class GroundingDinoDetector(Detector):
    """Boxes for the image's tags. Options: :class:`GroundingDinoDetectorOptions`;
    ``spec.batch_size`` images per pass."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: GroundingDinoDetectorOptions = self.opts
        self.net = GroundingDinoModel(spec, hub, "grounding_dino detector", opts.box_threshold)
        self.max_queries = opts.max_queries
        self.max_detections = opts.max_detections
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.model_id, self.weights_id = self.net.model_id, self.net.sha256

    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        return detect_in_batches(
            "grounding_dino", images, context, self.max_queries, self.batch_size, self._detect
        )

    def _detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[Detections]:
        boxes, scores = self.net.score(images, queries)
        out = []
        for b, names in enumerate(queries):
            best = scores[b, :, : len(names)].argmax(axis=1)
            top = scores[b, np.arange(len(best)), best]
            keep = np.nonzero(top >= self.net.box_threshold)[0]
            keep = keep[np.argsort(-top[keep], kind="stable")][: self.max_detections]
            out.append(
                Detections(
                    boxes[b, keep].astype(np.float32),
                    top[keep].astype(np.float32),
                    [names[int(j)] for j in best[keep]],
                    "grounding_dino",
                )  # fmt: skip
            )
        return out


@dataclass(frozen=True)
class GroundingDinoGrounderOptions:
    box_threshold: float = 0.3
    """A phrase whose best box scores below this is not grounded."""
    max_phrases: int = 8
    """Phrases per prompt (the text encoder's length is bounded)."""

    def validate(self) -> None:
        check_ranges(self, unit=("box_threshold",), at_least_one=("max_phrases",))


@register_backend("grounder", "grounding_dino", options=GroundingDinoGrounderOptions)
class GroundingDinoGrounder(Grounder):
    """Phrase -> best box. Options: :class:`GroundingDinoGrounderOptions`."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.net = GroundingDinoModel(spec, hub, "grounding_dino grounder", self.opts.box_threshold)
        self.max_phrases = self.opts.max_phrases
        self.model_id, self.weights_id = self.net.model_id, self.net.sha256

    def ground(
        self, image: np.ndarray | None, phrases: list[str], objects: list[dict[str, Any]]
    ) -> list[Grounding | None]:
        """One Grounding (box (4,) float64 xyxy pixels) or None per phrase; None for all without an image."""
        if image is None or not phrases:
            return [None] * len(phrases)
        (image,) = check_images([image], "grounding_dino")
        names = [str(p).strip() for p in phrases]
        chunks = [names[lo : lo + self.max_phrases] for lo in range(0, len(names), self.max_phrases)]
        boxes, scores = self.net.score([image] * len(chunks), chunks)
        out: list[Grounding | None] = []
        for b, chunk in enumerate(chunks):
            for j, phrase in enumerate(chunk):
                q = int(scores[b, :, j].argmax())
                score = float(scores[b, q, j])
                ok = score >= self.net.box_threshold and phrase
                out.append(Grounding(phrase, boxes[b, q].astype(np.float64), score) if ok else None)
        return out
