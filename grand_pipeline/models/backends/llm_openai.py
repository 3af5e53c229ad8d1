"""``openai``: any OpenAI-compatible endpoint (a vLLM server, TGI, OpenAI).

Only the standard library talks HTTP (``urllib.request``); prompts run as concurrent requests on
a thread pool, because a serving engine batches concurrent requests itself (continuous batching)
and that is where its throughput comes from.

``spec.model`` is the served model name sent in each request. Options (``spec.options``):

- ``base_url``: default ``http://127.0.0.1:8000/v1``.
- ``api_key_env``: name of the environment variable holding the API key (default
  ``OPENAI_API_KEY``); when unset or empty no ``Authorization`` header is sent (local servers).
- ``concurrency``: requests in flight at once (default 16).
- ``timeout_s`` (default 120), ``max_retries`` (default 3), ``backoff_s`` (default 0.5, doubled
  per retry, capped at 30 s; a ``Retry-After`` header wins): retries cover HTTP 429, 5xx and
  connection errors; other 4xx answers are final.
- ``context_length``: the served model's context (default 4096).
- ``tokenizer``: a local tokenizer folder of the served model. Then token counts are exact.
  Without it ``count_tokens`` is an ESTIMATE (``llm_common.estimate_tokens``: characters / 3.5
  plus chat markup), deliberately on the high side so that the budget check refuses rather than
  overflows; ``Generation.prompt_tokens`` always reports the server's count.
- ``chat_template``: who turns the messages into text.

  - ``server`` (the default): messages go to ``/chat/completions`` and the SERVER applies the
    served model's template (its tokenizer's, or the one it was started with, e.g. vLLM's
    ``--chat-template``). Counting with ``tokenizer`` uses that tokenizer's template (``auto``).
  - any name of :mod:`grand_pipeline.models.chat_templates` (``auto``, ``model``,
    ``vicuna_v1.1``, ``llama-2``, ``chatml``): the prompt is rendered HERE and sent as text to
    ``/completions``, whose server adds only the tokenizer's usual BOS. This is the way to serve
    a model whose tokenizer has no template (Vicuna-13B-v1.5: a vLLM server then refuses chat
    requests) without starting the server with a template file. ``model`` needs ``tokenizer``.

A request that still fails after its retries becomes an ``error`` Generation; ``generate`` never
raises for one prompt's failure.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from grand_pipeline.config import check_ranges
from grand_pipeline.models import chat_templates, llm_common
from grand_pipeline.models.roles import LLM, ChatPrompt, Generation, register_backend
from grand_pipeline.models.weights import ModelSourceError
from grand_pipeline.registry import UnknownNameError

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: ``options.chat_template`` value that leaves the template to the server (the default).
SERVER = "server"
MAX_BACKOFF_S = 30.0


class _Retryable(Exception):
    """A failure worth another try; ``wait_s`` is the server's Retry-After, when it sent one."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s


def _map_finish_reason(reason: Any) -> str:
    """OpenAI/vLLM finish reasons onto ours; ``abort``/``content_filter`` produced no usable answer."""
    if reason in (None, "stop", "eos", "stop_sequence", "end_turn"):
        return "stop"
    if reason in ("length", "max_tokens"):
        return "length"
    return "error"


@dataclass(frozen=True)
class OpenAIOptions(llm_common.LLMOptions):
    """``chat_template`` None (or ``server``) leaves the template to the server."""

    extra_templates: ClassVar[tuple[str, ...]] = (SERVER,)

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never the key itself in a config)."""
    concurrency: int = 16
    timeout_s: float = 120.0
    max_retries: int = 3
    backoff_s: float = 0.5
    context_length: int | None = 4096
    tokenizer: str | None = None
    """A local tokenizer folder: exact token counts (and the ``model`` chat template)."""

    def validate(self) -> None:
        super().validate()
        check_ranges(self, at_least_one=("concurrency",), non_negative=("max_retries", "backoff_s"),
                     positive=("timeout_s",))


@register_backend("llm", "openai", options=OpenAIOptions)
class OpenAICompatibleLLM(LLM):
    """Chat completions over HTTP, ``concurrency`` requests at a time."""

    def __init__(self, spec: Any, hub: Any = None) -> None:
        super().__init__(spec, hub)
        opts: OpenAIOptions = self.opts
        if not getattr(spec, "model", ""):
            raise ModelSourceError("openai: set models.llm.model to the served model name")
        self.base_url = opts.base_url.rstrip("/")
        self.api_key = os.environ.get(opts.api_key_env, "")
        self.concurrency = opts.concurrency
        self.timeout_s = opts.timeout_s
        self.max_retries = opts.max_retries
        self.backoff_s = opts.backoff_s
        self.context_length = opts.context_length or 4096
        self.tokenizer = None
        if opts.tokenizer:
            from transformers import AutoTokenizer

            path = Path(opts.tokenizer).expanduser()
            if not path.is_dir():
                raise ModelSourceError(f"openai: options.tokenizer {path} is not a local tokenizer folder")
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        option = opts.chat_template or SERVER
        self.format = self._prompt_format(option)
        #: Rendered text goes to /completions; messages to /chat/completions (server templates).
        self.render_here = option != SERVER
        self.chat_template = self.format.name if self.render_here and self.format else SERVER
        self.url = f"{self.base_url}/{'completions' if self.render_here else 'chat/completions'}"
        self.model_id = str(spec.model)
        # Served weights are not visible from here; the endpoint + revision is the best identity.
        self.weights_id = f"{self.base_url}#{getattr(spec, 'revision', '') or 'unversioned'}"

    def _prompt_format(self, name: str) -> llm_common.PromptFormat | None:
        """How prompts are rendered (and counted) here; None: estimated, rendered by the server."""
        if name != SERVER and name not in chat_templates.CHAT_TEMPLATES:
            known = ", ".join([SERVER, *chat_templates.CHAT_TEMPLATES.names()])
            raise UnknownNameError(f"unknown chat template {name!r}; known: {known}")
        if name == "model" and self.tokenizer is None:
            raise ModelSourceError(
                "openai: chat_template 'model' needs options.tokenizer (a local folder with the "
                "served model's tokenizer and its template)"
            )
        if self.tokenizer is None and name == SERVER:
            return None
        # Server mode with a tokenizer: count with the template the server will most likely use.
        return llm_common.PromptFormat.build(self.tokenizer, "auto" if name == SERVER else name)

    def count_tokens(self, prompt: ChatPrompt) -> int:
        """Exact with ``options.tokenizer``; otherwise a deliberately high estimate (see module doc)."""
        if self.format is not None and self.tokenizer is not None:
            return len(self.format.token_ids(prompt))
        return llm_common.estimate_tokens(prompt)

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        admitted = llm_common.admit(prompts, self.count_tokens, self.context_length)
        # Same order as the local backends: prefix groups together, so a server with prefix
        # caching sees requests sharing a prefix close in time.
        order = [
            i
            for batch in llm_common.plan_batches(admitted.runnable, prompts, admitted.counts, 1)
            for i in batch
        ]
        if order:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(order))) as pool:
                results = pool.map(lambda i: self._complete(prompts[i], temperature, seed), order)
                for i, generation in zip(order, results, strict=True):
                    if generation.finish_reason == "error" and not generation.prompt_tokens:
                        generation.prompt_tokens = admitted.counts[i]
                    admitted.pending.set(i, generation)
        return admitted.pending.done()

    # ------------------------------------------------------------------------- one request

    def _complete(self, prompt: ChatPrompt, temperature: float, seed: int) -> Generation:
        """One (chat) completion with bounded retries; failures become an error Generation."""
        request: dict[str, Any] = {
            "model": self.model_id,
            "max_tokens": int(prompt.max_new_tokens),
            "temperature": float(temperature),
            "seed": int(seed),
        }
        if self.render_here:
            assert self.format is not None  # set whenever the template is not the server's
            try:
                request["prompt"] = self.format.text(prompt)
            except Exception as exc:  # a malformed conversation: this prompt only
                return llm_common.error_generation(f"prompt could not be templated: {exc}")
        else:
            request["messages"] = prompt.messages
            if llm_common.continues_answer(prompt):
                # vLLM's OpenAI server continues a final assistant message with these two flags.
                request.update(continue_final_message=True, add_generation_prompt=False)
        body = json.dumps(request).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._parse(self._post(body))
            except _Retryable as exc:
                last_error = str(exc)
                if attempt == self.max_retries:
                    break
                wait = exc.wait_s if exc.wait_s is not None else self.backoff_s * 2**attempt
                logger.debug("retrying %s in %.2fs (%s)", self.url, wait, exc)
                time.sleep(min(wait, MAX_BACKOFF_S))
            except Exception as exc:  # final: bad request, unreadable answer
                return llm_common.error_generation(f"{type(exc).__name__}: {exc}")
        return llm_common.error_generation(f"gave up after {self.max_retries + 1} attempts: {last_error}")

    def _post(self, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if exc.code in RETRY_STATUS:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                wait = float(retry_after) if retry_after and retry_after.isdigit() else None
                raise _Retryable(f"HTTP {exc.code}: {detail}", wait) from None
            raise RuntimeError(f"HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise _Retryable(f"connection failed: {exc}") from None

    @staticmethod
    def _parse(answer: dict[str, Any]) -> Generation:
        """A chat answer carries ``message.content``; a plain completion carries ``text``."""
        choice = answer["choices"][0]
        usage = answer.get("usage") or {}
        reason = _map_finish_reason(choice.get("finish_reason"))
        text = (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")
        return Generation(
            text=str(text or "").strip(),
            finish_reason=reason,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            error=f"server finish_reason {choice.get('finish_reason')!r}" if reason == "error" else None,
        )
