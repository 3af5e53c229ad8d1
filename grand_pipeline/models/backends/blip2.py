"""Captioner ``blip2``: BLIP-2 (``Blip2ForConditionalGeneration``) short captions, batched.

The paper's Level-2 short captions come from BLIP-2 (OPT-2.7B) and LLaVA-1.5. Weights are a
Hugging Face folder (``hf:Salesforce/blip2-opt-2.7b@<rev>``, an S3 copy, or a local path),
loaded with ``from_pretrained(local_files_only=True)``: a missing file fails at start-up, never
turns into a download inside an actor.

The model is loaded once per model hub and weights folder (``hf_common.shared``), so the
``blip2_region`` region captioner of the same actor reuses it instead of loading a second copy.

``tiny:<seed>`` saves a random BLIP-2 (ViT 32 px, 2-layer Q-Former with 4 queries, 2-layer
OPT) plus a word-level tokenizer and a 32 px ``BlipImageProcessor`` built offline, and loads
them back through the same ``from_pretrained`` calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from grand_pipeline.config import check_ranges
from grand_pipeline.models import hf_common
from grand_pipeline.models.roles import Captioner, register_backend

logger = logging.getLogger(__name__)

TINY_QUERIES = 4


def build_tiny(folder: Path, seed: int) -> None:
    """A seeded random BLIP-2 with an offline tokenizer and processor, in transformers layout."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = hf_common.tiny_tokenizer(extra_special=("<image>",))
    vocab = len(tokenizer)
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={"vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "intermediate_size": 64, "encoder_hidden_size": 32,
                        "max_position_embeddings": 64},
        text_config={"model_type": "opt", "vocab_size": vocab, "hidden_size": 32, "num_hidden_layers": 2,
                     "ffn_dim": 64, "num_attention_heads": 2, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        num_query_tokens=TINY_QUERIES,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    model = hf_common.seeded(seed, lambda: Blip2ForConditionalGeneration(config))
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=TINY_QUERIES,
    )
    with hf_common.quiet():
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))


@dataclass
class Blip2Model:
    """A loaded BLIP-2: model in eval mode, its processor, device and dtype."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    weights_id: str
    source: str

    def generate(self, images: list[np.ndarray], prompt: str, max_new_tokens: int, batch_size: int) -> list[str]:
        """One decoded text per image (greedy); ``prompt`` "" means unconditional captioning."""
        tokenizer = self.processor.tokenizer
        # At least one real word: special tokens (pad, unk, <image>) decode to nothing.
        suppress = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
        out: list[str] = []
        for lo in range(0, len(images), batch_size):
            batch = [Image.fromarray(np.ascontiguousarray(img)) for img in images[lo : lo + batch_size]]
            kwargs: dict[str, Any] = {"images": batch, "return_tensors": "pt"}
            if prompt:
                kwargs.update(text=[prompt] * len(batch), padding=True)
            inputs = self.processor(**kwargs).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False,
                    suppress_tokens=suppress,
                )  # fmt: skip
            if prompt and ids.shape[1] > inputs["input_ids"].shape[1]:
                # Decoder-only generate echoes the prompt ids first; keep only the new tokens.
                ids = ids[:, inputs["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out


def load_blip2(spec: Any, name: str, hub: Any) -> Blip2Model:
    """``hub``'s shared BLIP-2 of ``spec.model`` (one copy per weights folder)."""
    resolved = hf_common.load_folder(spec, name="blip2", tiny_builder=build_tiny)
    device = hf_common.device_of(spec)
    dtype = hf_common.torch_dtype(spec, device)

    def factory() -> Blip2Model:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        with hf_common.quiet():
            processor = Blip2Processor.from_pretrained(str(resolved.path), local_files_only=True)
            model = Blip2ForConditionalGeneration.from_pretrained(
                str(resolved.path), dtype=dtype, local_files_only=True
            )
        logger.info("%s: BLIP-2 loaded from %s on %s (%s)", name, resolved.path, device, dtype)
        return Blip2Model(model.eval().to(device), processor, device, dtype, resolved.sha256, resolved.source)

    return hf_common.shared(hub, f"blip2:{device}:{dtype}", resolved.path, factory)


def model_name(loaded: Blip2Model, spec: Any) -> str:
    source = loaded.source
    return f"blip2-random({source})" if source.startswith("tiny:") else str(getattr(spec, "model", "") or source)


@dataclass(frozen=True)
class Blip2Options:
    prompt: str = ""
    """"": unconditional; e.g. "a photo of" for OPT."""
    max_new_tokens: int = 30

    def validate(self) -> None:
        check_ranges(self, at_least_one=("max_new_tokens",))


@register_backend("captioner", "blip2", options=Blip2Options)
class Blip2Captioner(Captioner):
    """One BLIP-2 caption per image; the images of a micro-batch go through ``generate`` together.

    Options: :class:`Blip2Options`. ``spec.batch_size`` images per forward pass.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        self.prompt = self.opts.prompt
        self.max_new_tokens = self.opts.max_new_tokens
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.blip2 = load_blip2(spec, "blip2", hub)
        self.weights_id = self.blip2.weights_id
        self.model_id = model_name(self.blip2, spec)

    def caption(self, images: list[np.ndarray], context: list[dict[str, Any]]) -> list[list[str]]:
        """``[caption]`` per image, or ``[]`` when the model produced no words (nothing invented)."""
        if len(context) != len(images):
            raise ValueError(f"{len(context)} contexts for {len(images)} images")
        texts = self.blip2.generate(list(images), self.prompt, self.max_new_tokens, self.batch_size)
        if self.prompt:
            texts = [f"{self.prompt} {t}".strip() for t in texts]
        return [[t] if t else [] for t in texts]
