"""CLIP / SigLIP zero-shot tagger over a packaged tag vocabulary (LVIS + Objects365 names).

The text side runs once per actor: every vocabulary name, wrapped in ``prompt`` ("a photo of a
{}."), is embedded when the backend loads; ``tag`` and ``classify_crops`` then cost one image-
encoder pass per image plus a matrix product. Scores follow each family's training objective:
CLIP's softmax over the whole vocabulary (so scores are small and sum to 1 per image), SigLIP's
independent sigmoid ``sigmoid(scale * cos + bias)`` (a multi-label probability per name).

The family is read from the checkpoint's config (``clip`` / ``siglip`` / ``siglip2``); option
``family`` only chooses which tiny random model ``tiny:<seed>`` builds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grand_pipeline.models.hf_common import load_folder, load_pretrained, shared_pretrained
from grand_pipeline.models.roles import Tag, Tagger, register_backend
from grand_pipeline.models.vision_common import (
    batch_to_device,
    check_images,
    family_tiny_builder,
    runtime,
    tag_vocabulary,
    word_tokenizer,
)

logger = logging.getLogger(__name__)

SIGMOID_TYPES = ("siglip", "siglip2")
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_VISION = {**TINY_TEXT, "image_size": 32, "patch_size": 8}


def features(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tiny_clip(projection_dim: int = 16) -> tuple[Any, Any]:
    """A random CLIP and its processor (word-level tokenizer, 32x32 images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    # CLIP pools the text at the eos token; eos takes the last id, as in the real BPE vocabulary.
    tok = word_tokenizer(
        {"<|pad|>": 0, "<|unk|>": 1, "<|startoftext|>": 2, "<|endoftext|>": -1},
        pad="<|pad|>", unk="<|unk|>", bos="<|startoftext|>", eos="<|endoftext|>",
    )  # fmt: skip
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": len(tok) - 1}
    text = {**TINY_TEXT, "vocab_size": len(tok), "max_position_embeddings": 32, **ids}
    config = CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=projection_dim)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config), CLIPProcessor(image_processor=image, tokenizer=tok)


def _tiny_siglip() -> tuple[Any, Any]:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tok = word_tokenizer({"<pad>": 0, "<unk>": 1, "</s>": 2}, pad="<pad>", unk="<unk>", bos=None, eos="</s>")
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
    text = {**TINY_TEXT, "vocab_size": len(tok), "max_position_embeddings": 16, **ids}
    config = SiglipConfig(text_config=text, vision_config=TINY_VISION)
    image = SiglipImageProcessor(size={"height": 32, "width": 32})
    return SiglipModel(config), SiglipProcessor(image_processor=image, tokenizer=tok)


TINY_FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {"clip": tiny_clip, "siglip": _tiny_siglip}


def tiny_builder(family: str) -> Callable[[Path, int], None]:
    return family_tiny_builder("clip_tagger", TINY_FAMILIES, family)


def load_clip(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModel, AutoProcessor

    return load_pretrained(AutoModel, AutoProcessor, path, dtype)


@dataclass(frozen=True)
class ClipTaggerOptions:
    """No ``top_k`` / ``threshold``: ``tag`` returns every name, best first, and
    ``level1.tag_top_k`` / ``level1.tag_threshold`` make the one cut."""

    family: str = "clip"
    """clip | siglip: the architecture of ``tiny:`` builds."""
    prompt: str = "a photo of a {}."
    vocabulary: str | None = None
    """A text file, one name a line; None: the packaged LVIS + Objects365 list."""


@register_backend("tagger", "clip_tagger", options=ClipTaggerOptions)
class ClipTagger(Tagger):
    """Zero-shot tags and crop labels over the vocabulary.

    Options: :class:`ClipTaggerOptions`.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: ClipTaggerOptions = self.opts
        family = opts.family
        resolved = load_folder(spec, f"clip_tagger-{family}", tiny_builder(family))
        self.device, self.dtype = runtime(spec)
        # Kind "clip", as clip_labels says: the tagger and the label assigner share one CLIP.
        self.model, self.processor = shared_pretrained(
            self.hub, "clip", resolved.path, self.device, self.dtype, load_clip
        )
        self.sigmoid = self.model.config.model_type in SIGMOID_TYPES
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.prompt = opts.prompt
        if opts.vocabulary:
            lines = Path(opts.vocabulary).read_text(encoding="utf-8").splitlines()
            self.names = list(dict.fromkeys(n.strip() for n in lines if n.strip() and not n.startswith("#")))
        else:
            self.names = list(tag_vocabulary())
        self.text_emb = self._embed_texts([self.prompt.format(n) for n in self.names])  # (V, D), once
        self.weights_id = resolved.sha256
        is_tiny = resolved.source.startswith("tiny:")
        self.model_id = f"{family}-random({resolved.source})" if is_tiny else str(spec.model)
        logger.info("clip_tagger: %s, %d names, sigmoid=%s", self.model_id, len(self.names), self.sigmoid)

    def _embed_texts(self, texts: list[str]) -> torch.Tensor:
        # SigLIP pools the last position and was trained on max_length padding; CLIP pools eos.
        padding: Any = "max_length" if self.sigmoid else True
        out = []
        with torch.inference_mode():
            for lo in range(0, len(texts), 256):
                tokens = self.processor.tokenizer(
                    texts[lo : lo + 256], padding=padding, truncation=True, return_tensors="pt",
                    max_length=self.model.config.text_config.max_position_embeddings,
                )  # fmt: skip
                emb = features(self.model.get_text_features(**batch_to_device(tokens, self.device)))
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1))
        return torch.cat(out)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """float32 (N, V) scores over ``self.names``; ``spec.batch_size`` images per pass."""
        images = check_images(images, "clip_tagger")
        if not images:
            return np.zeros((0, len(self.names)), np.float32)
        scale = self.model.logit_scale.detach().float().exp().item()
        bias = self.model.logit_bias.detach().float().item() if self.sigmoid else 0.0
        out = []
        with torch.inference_mode():
            for lo in range(0, len(images), self.batch_size):
                # All processor outputs: SigLIP2's naflex variant adds a patch mask and shapes.
                pixels = self.processor.image_processor(
                    images=images[lo : lo + self.batch_size], return_tensors="pt"
                )
                x = batch_to_device(pixels, self.device, self.dtype)
                emb = torch.nn.functional.normalize(
                    features(self.model.get_image_features(**x)).float(), dim=-1
                )
                logits = emb @ self.text_emb.T * scale + bias
                out.append((logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def _top(self, probs: np.ndarray, k: int, threshold: float) -> list[list[Tag]]:
        k = max(1, min(int(k), probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [Tag(self.names[i], float(row[i])) for i in idx if row[i] >= threshold]
            for row, idx in zip(probs, order, strict=True)
        ]

    def tag(self, images: list[np.ndarray]) -> list[list[Tag]]:
        """Every name per image with its score, best first (level 1 cuts)."""
        probs = self.probabilities(images)
        return self._top(probs, probs.shape[1], 0.0)

    def classify_crops(self, crops: list[np.ndarray], top_k: int = 1) -> list[list[Tag]]:
        """The ``top_k`` best names per crop (no threshold), best first."""
        return self._top(self.probabilities(crops), top_k, 0.0)
