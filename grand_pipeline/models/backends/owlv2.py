"""OWLv2 open-vocabulary detector (transformers ``Owlv2ForObjectDetection`` + ``Owlv2Processor``).

Queries are the image's own tags (``context[i]["tags"]``, best first, at most ``max_queries``),
each wrapped in ``prompt`` ("a photo of a {}", OWL-ViT's training template); an image without tags
is queried with the COCO-80 names. A micro-batch runs as one forward pass: the processor pads every
image's query list to the longest with blank queries, and detections of those padding queries are
dropped. OWLv2 pads images to a square, so boxes come back in the padded frame; the processor's
post-processing scales them by max(H, W) and they are clipped to the image here.

No NMS: the level-1 per-model NMS (class-agnostic, IoU 0.9) follows every detector.
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
from grand_pipeline.models.roles import Detections, Detector, register_backend
from grand_pipeline.models.vision_common import (
    batch_to_device,
    detect_in_batches,
    runtime,
    seeded_build,
    word_tokenizer,
)

logger = logging.getLogger(__name__)

TINY_LAYERS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def build_tiny(folder: Path, seed: int) -> None:
    """Random OWLv2 at 32x32 input (a 4x4 patch grid), with a word-level tokenizer and processor."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    # OWL pools the text at argmax(input_ids): eos must be the largest id, as in CLIP's BPE vocabulary.
    tok = word_tokenizer(
        {"!": 0, "<|unk|>": 1, "<|startoftext|>": 2, "<|endoftext|>": -1},
        pad="!", unk="<|unk|>", bos="<|startoftext|>", eos="<|endoftext|>",
    )  # fmt: skip
    tok.model_max_length = 16
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": len(tok) - 1}
    text = {**TINY_LAYERS, "vocab_size": len(tok), "max_position_embeddings": 16, **ids}
    vision = {**TINY_LAYERS, "image_size": 32, "patch_size": 8}
    # The class head projects image features to the text hidden size, so projection_dim equals it.
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    model = seeded_build(seed, lambda: Owlv2ForObjectDetection(config))
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
    )
    save_pretrained(folder, model, processor)


def load_owlv2(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    return load_pretrained(Owlv2ForObjectDetection, Owlv2Processor, path, dtype)


@dataclass(frozen=True)
class OWLv2Options:
    """Boxes under ``score_threshold`` never leave the model: a candidate floor applied with the
    model's own post-processing (before ``max_detections``), not the ensemble's pre-filter
    ``level1.score_thresholds``, which is cut later on what comes out."""

    score_threshold: float = 0.1
    max_queries: int = 32
    """Tags queried per image, best first."""
    max_detections: int = 100
    prompt: str = "a photo of a {}"

    def validate(self) -> None:
        check_ranges(self, unit=("score_threshold",), at_least_one=("max_queries", "max_detections"))


@register_backend("detector", "owlv2", options=OWLv2Options)
class OWLv2Detector(Detector):
    """Text-queried boxes; labels are the query names (without the prompt template).

    Options: :class:`OWLv2Options`. ``spec.batch_size`` images per forward pass.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: OWLv2Options = self.opts
        resolved = load_folder(spec, "owlv2", build_tiny)
        self.device, self.dtype = runtime(spec)
        self.model, self.processor = shared_pretrained(
            self.hub, "owlv2", resolved.path, self.device, self.dtype, load_owlv2
        )
        self.score_threshold = opts.score_threshold
        self.max_queries = opts.max_queries
        self.max_detections = opts.max_detections
        self.prompt = opts.prompt
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.weights_id = resolved.sha256
        self.model_id = (
            f"owlv2-random({resolved.source})" if resolved.source.startswith("tiny:") else str(spec.model)
        )

    def detect(
        self, images: list[np.ndarray], context: list[dict[str, Any]] | None = None
    ) -> list[Detections]:
        """Per image: boxes (N, 4) float32 xyxy in pixels, scores, labels = the matched tag names."""
        return detect_in_batches("owlv2", images, context, self.max_queries, self.batch_size, self._detect)

    def _detect(self, images: list[np.ndarray], queries: list[list[str]]) -> list[Detections]:
        texts = [[self.prompt.format(q) for q in names] for names in queries]
        # device=: OWLv2's processor pads each image to a square and Gaussian-blurs it before the
        # resize (a convolution over the full image); on the host that was the detect stage's
        # CPU convolution. The torchvision-backed processor runs it where the model is.
        inputs = self.processor(text=texts, images=images, return_tensors="pt", device=self.device)
        with torch.inference_mode():
            outputs = self.model(**batch_to_device(inputs, self.device, self.dtype))
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.score_threshold, target_sizes=[img.shape[:2] for img in images]
        )
        return [
            self._to_detections(r, names, img.shape[:2])
            for r, names, img in zip(results, queries, images, strict=True)
        ]

    def _to_detections(self, result: dict[str, Any], names: list[str], size: tuple[int, ...]) -> Detections:
        height, width = size
        labels = result["labels"].cpu().numpy()
        scores = result["scores"].float().cpu().numpy()
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        keep = labels < len(names)  # the processor's blank padding queries are not labels
        order = np.argsort(-scores[keep], kind="stable")[: self.max_detections]
        boxes, scores, labels = boxes[keep][order], scores[keep][order], labels[keep][order]
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, float(width))
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, float(height))
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
        return Detections(
            boxes.astype(np.float32), scores.astype(np.float32), [names[int(i)] for i in labels], "owlv2"
        )
