"""``vllm``: an in-process ``vllm.LLM`` engine, for GPU nodes.

vLLM is imported lazily in ``__init__``: it is not a dependency of the pipeline, and a profile
that names this backend on a machine without it fails with one clear ``ModelSourceError``.

Engine arguments: ``model=spec.model`` (Hugging Face id or local path), ``revision``, ``dtype``
(``float32`` in a spec means "engine default", i.e. ``auto``, since float32 is the CPU default
that would be wasteful on a GPU), ``enable_prefix_caching=True`` (prompts sharing ``prefix_key``
share their in-context examples, whose KV blocks are then computed once). Options:
``gpu_memory_utilization`` (0.9), ``max_model_len`` (the model's own when unset),
``tensor_parallel_size`` (1), ``load_format`` (e.g. ``"dummy"`` for random weights in a
benchmark), ``seed`` (engine seed, 0), ``json_schema`` (constrain every answer to a JSON schema),
``chat_template`` (``auto``: the tokenizer's own template, else Vicuna v1.1; the full profile
names ``vicuna_v1.1`` for Vicuna-13B-v1.5, whose tokenizer has none: vllm#17977).

Prompts are chat-templated (:mod:`grand_pipeline.models.chat_templates`) and tokenised HERE with
the engine's tokenizer and handed to the engine as token ids, so the count used by the budget
check is exactly what the engine reads, and vLLM's own chat path (which refuses a tokenizer
without a template) is never involved. Each request
carries ``SamplingParams(seed=seed)``, so a prompt's sample depends on the prompt and seed only,
not on what else runs in the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from grand_pipeline.config import check_ranges
from grand_pipeline.models import llm_common, weights
from grand_pipeline.models.roles import LLM, ChatPrompt, Generation, register_backend
from grand_pipeline.models.weights import ModelSourceError

logger = logging.getLogger(__name__)

MISSING = "vllm backend needs the vllm package (pip install vllm) on a GPU node"


@dataclass(frozen=True)
class VLLMOptions(llm_common.LLMOptions):
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    seed: int = 0
    max_model_len: int | None = None
    """The engine's context (None: the model's); ``context_length`` is unused here."""
    load_format: str | None = None
    json_schema: dict[str, Any] | None = None
    """Constrain answers to this JSON schema (structured outputs)."""

    def validate(self) -> None:
        super().validate()
        check_ranges(self, unit=("gpu_memory_utilization",),
                     at_least_one=("tensor_parallel_size", "max_model_len"))


@register_backend("llm", "vllm", options=VLLMOptions)
class VLLMEngineLLM(LLM):
    """All runnable prompts go to the engine in one call; it schedules and batches them itself."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        try:
            import vllm
            from vllm import SamplingParams
        except ImportError:
            raise ModelSourceError(MISSING) from None
        if not getattr(spec, "model", ""):
            raise ModelSourceError("vllm: set models.llm.model to a Hugging Face id or a local folder")
        opts: VLLMOptions = self.opts
        dtype = getattr(spec, "dtype", "") or "auto"
        model, revision = str(spec.model), getattr(spec, "revision", "") or None
        resolved = None
        if model.startswith("hf:") or "://" in model:
            # A pinned hub snapshot or an S3 copy: resolved (and cached) like every other model,
            # so the engine only ever reads a local folder and never downloads on its own.
            resolved = weights.resolve(model, name="vllm")
            model, revision = str(resolved.path), None
        engine_args: dict[str, Any] = {
            "model": model,
            "revision": revision,
            "dtype": "auto" if dtype == "float32" else dtype,
            "enable_prefix_caching": True,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "seed": opts.seed,
        }
        if opts.max_model_len:
            engine_args["max_model_len"] = opts.max_model_len
        if opts.load_format:
            engine_args["load_format"] = opts.load_format
        logger.info("starting vLLM engine: %s", engine_args)
        self.engine = vllm.LLM(**engine_args)
        self._sampling_params = SamplingParams
        self.tokenizer = self.engine.get_tokenizer()
        self.format = llm_common.PromptFormat.build(self.tokenizer, llm_common.chat_template_option(opts))
        self.chat_template = self.format.name
        self.context_length = int(self.engine.llm_engine.model_config.max_model_len)
        self.json_schema = opts.json_schema
        self._structured = None
        if self.json_schema is not None:
            # vLLM removed the ``guided_*`` SamplingParams fields (GuidedDecodingParams) in 2025
            # (v0.12); structured output is now ``SamplingParams(structured_outputs=
            # StructuredOutputsParams(json=schema))``.
            from vllm.sampling_params import StructuredOutputsParams

            self._structured = StructuredOutputsParams(json=self.json_schema)
        self.model_id = str(spec.model)
        self.weights_id = f"{spec.model}@{getattr(spec, 'revision', '') or 'default'}"
        if resolved is not None:
            self.weights_id = resolved.sha256
        if engine_args.get("load_format") == "dummy":
            self.weights_id += "+dummy"

    def count_tokens(self, prompt: ChatPrompt) -> int:
        """Tokens of the chat-templated prompt, with the engine's own tokenizer and template."""
        return len(self.format.token_ids(prompt))

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        admitted = llm_common.admit(prompts, self.count_tokens, self.context_length)
        # One engine call over everything: vLLM's scheduler does the batching. The prefix-grouped
        # order still helps, because requests that share a prefix then hit the cache while it is warm.
        order = [
            i for b in llm_common.plan_batches(admitted.runnable, prompts, admitted.counts, 1) for i in b
        ]
        if not order:
            return admitted.pending.done()
        requests = [{"prompt_token_ids": self.format.token_ids(prompts[i])} for i in order]
        params = [self._params(prompts[i].max_new_tokens, temperature, seed) for i in order]
        try:
            outputs = self.engine.generate(requests, sampling_params=params, use_tqdm=False)
        except Exception as exc:  # the engine failed the whole call: every prompt reports it
            logger.exception("vLLM generate failed for %d prompts", len(order))
            for i in order:
                admitted.pending.set(i, llm_common.error_generation(f"vllm: {exc}", admitted.counts[i]))
            return admitted.pending.done()
        for i, output in zip(order, outputs, strict=True):
            admitted.pending.set(i, self._to_generation(output, admitted.counts[i]))
        return admitted.pending.done()

    def _params(self, max_new_tokens: int, temperature: float, seed: int) -> Any:
        kwargs: dict[str, Any] = {
            "temperature": float(temperature),
            "max_tokens": int(max_new_tokens),
            "seed": int(seed),
        }
        if self._structured is not None:
            kwargs["structured_outputs"] = self._structured
        return self._sampling_params(**kwargs)

    @staticmethod
    def _to_generation(output: Any, prompt_tokens: int) -> Generation:
        completion = output.outputs[0]
        reason = completion.finish_reason
        finish = "length" if reason == "length" else "stop" if reason in (None, "stop") else "error"
        return Generation(
            text=str(completion.text).strip(),
            finish_reason=finish,
            prompt_tokens=len(output.prompt_token_ids or []) or prompt_tokens,
            completion_tokens=len(completion.token_ids),
            error=f"vllm finish_reason {reason!r}" if finish == "error" else None,
        )
