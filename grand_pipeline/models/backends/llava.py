"""Captioner ``llava``: LLaVA-1.5 (``LlavaForConditionalGeneration``) short captions, batched.

The paper pairs BLIP-2 captions with LLaVA-1.5 ones. The prompt is LLaVA-1.5's conversation
format, ``"USER: <image>\\n{question} ASSISTANT:"``, built here rather than from a chat template
so that a checkpoint without one (and the tiny variant) behaves the same. The question asks for
one short sentence; the answer's first sentence is kept (``clean_caption``).

Weights: ``hf:llava-hf/llava-1.5-7b-hf@<rev>``, an S3 copy or a local folder, loaded with
``from_pretrained(local_files_only=True)``. Prompts are left-padded so the new tokens of every
image in a batch start at the same position and can be sliced off together.

``tiny:<seed>`` saves a random LLaVA (CLIP ViT 32 px / patch 8, 2-layer Llama) with an offline
word-level tokenizer and processor, and loads them back through the same calls.
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
from grand_pipeline.models.backends.captioner_llm import clean_caption
from grand_pipeline.models.roles import Captioner, register_backend

logger = logging.getLogger(__name__)

QUESTION = "Describe the image in one short sentence."
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def build_tiny(folder: Path, seed: int) -> None:
    """A seeded random LLaVA with an offline tokenizer and CLIP image processor."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = hf_common.tiny_tokenizer(extra_special=("<image>",))
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32,
                       "patch_size": 8, "projection_dim": 32},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "max_position_embeddings": 256,
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    model = hf_common.seeded(seed, lambda: LlavaForConditionalGeneration(config))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
    )
    with hf_common.quiet():
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))


@dataclass(frozen=True)
class LlavaOptions:
    question: str = QUESTION
    max_new_tokens: int = 40

    def validate(self) -> None:
        check_ranges(self, at_least_one=("max_new_tokens",))


@register_backend("captioner", "llava", options=LlavaOptions)
class LlavaCaptioner(Captioner):
    """One LLaVA-1.5 caption per image; ``spec.batch_size`` images per ``generate`` call.

    Options: :class:`LlavaOptions`.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.prompt = TEMPLATE.format(question=self.opts.question)
        self.max_new_tokens = self.opts.max_new_tokens
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        resolved = hf_common.load_folder(spec, name="llava", tiny_builder=build_tiny)
        self.device = hf_common.device_of(spec)
        self.dtype = hf_common.torch_dtype(spec, self.device)
        with hf_common.quiet():
            self.processor = AutoProcessor.from_pretrained(str(resolved.path), local_files_only=True)
            model = LlavaForConditionalGeneration.from_pretrained(
                str(resolved.path), dtype=self.dtype, local_files_only=True
            )
        self.model = model.eval().to(self.device)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Special tokens (pad, unk, <image>) decode to nothing; the eos may still end the answer.
        self.suppress = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
        self.weights_id = resolved.sha256
        tiny = resolved.source.startswith("tiny:")
        self.model_id = f"llava-random({resolved.source})" if tiny else str(spec.model)

    def caption(self, images: list[np.ndarray], context: list[dict[str, Any]]) -> list[list[str]]:
        """``[caption]`` per image, or ``[]`` when the answer holds no words (nothing invented)."""
        if len(context) != len(images):
            raise ValueError(f"{len(context)} contexts for {len(images)} images")
        out: list[list[str]] = []
        for lo in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(np.ascontiguousarray(img)) for img in images[lo : lo + self.batch_size]]
            inputs = self.processor(
                images=batch, text=[self.prompt] * len(batch), padding=True, return_tensors="pt"
            ).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=1, do_sample=False,
                    suppress_tokens=self.suppress,
                )  # fmt: skip
            new = ids[:, inputs["input_ids"].shape[1] :]
            for text in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True):
                caption = clean_caption(text)
                out.append([caption] if caption else [])
        return out
