"""The ``llm`` role: shared budget/batching helpers and the three backends.

``gguf_transformers`` runs for real: ``tiny:0`` (random 2-layer Llama + the real SmolLM2 tokenizer,
stripped of its chat template like Vicuna-13B-v1.5's, so prompts take the ``vicuna_v1.1``
fallback) everywhere, the real SmolLM2 GGUF (its own template) under ``-m slow``. Building ``tiny:0`` needs the SmolLM2
tokenizer, so the session fixture converts the packaged GGUF once (~1 min) into the test cache.
``openai`` talks to a real HTTP server on 127.0.0.1 started here (``FakeChatServer``). ``vllm`` is not
installed here: only its clear failure is checked, plus its bookkeeping against a stand-in module.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import grand_pipeline.models.backends  # noqa: F401  (registers the backends)
from grand_pipeline.config import ConfigError, ModelSpec
from grand_pipeline.models import chat_templates, llm_common, weights
from grand_pipeline.models.backends import llm_gguf
from grand_pipeline.models.roles import BACKENDS, ChatPrompt, Generation


def chat(text: str, max_new_tokens: int = 8, prefix_key: str = "", system: str = "Be brief.") -> ChatPrompt:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return ChatPrompt(messages=messages, max_new_tokens=max_new_tokens, prefix_key=prefix_key)


PROMPTS = [
    chat("Describe a cup of coffee on a saucer.", 6, "dense"),
    chat("hi", 9, "short"),
    chat("A kitchen with a table, two chairs and a window that looks onto a garden.", 4, "dense"),
    chat("List three fruits.", 7, "short"),
    chat("What colour is the sky on a clear day?", 5, "dense"),
]


@pytest.fixture(scope="session")
def tiny_llm() -> llm_gguf.GGUFTransformersLLM:
    """tiny:0, built once per session (converts the packaged GGUF for its tokenizer first)."""
    return BACKENDS["llm"].get("gguf_transformers")(ModelSpec(backend="gguf_transformers", model="tiny:0"))


# ----------------------------------------------------------------------------- llm_common


def test_budget_error_wording() -> None:
    assert llm_common.budget_error(10, 5, 15) is None
    assert llm_common.budget_error(11, 5, 15) == "prompt of 11 tokens + 5 new exceeds context 15"
    assert "max_new_tokens" in (llm_common.budget_error(1, 0, 15) or "")


def test_plan_batches_groups_prefixes_and_sorts_by_length() -> None:
    prompts = [chat("x", prefix_key=k) for k in ("a", "b", "a", "b", "a")]
    counts = [30, 10, 20, 40, 25]
    batches = llm_common.plan_batches(range(5), prompts, counts, batch_size=2)
    assert batches == [[2, 4], [0, 1], [3]]  # group a by length (20, 25, 30), then group b
    assert llm_common.plan_batches([], prompts, counts, 4) == []


def test_admit_turns_bad_prompts_into_errors() -> None:
    prompts = [chat("ok"), chat("too long"), ChatPrompt(messages="not a list")]  # type: ignore[arg-type]

    def count(prompt: ChatPrompt) -> int:
        return {"ok": 5, "too long": 50}[prompt.messages[1]["content"]]

    admitted = llm_common.admit(prompts, count, context_length=20)
    assert admitted.runnable == [0]
    assert admitted.pending.results[1].error == "prompt of 50 tokens + 8 new exceeds context 20"
    assert admitted.pending.results[1].prompt_tokens == 50
    assert admitted.pending.results[2].finish_reason == "error"
    with pytest.raises(RuntimeError, match=r"\[0\]"):
        admitted.pending.done()


# ----------------------------------------------------------------------------- gguf_transformers, tiny


def test_conversion_is_cached_once(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    folder = llm_gguf.package_folder()
    assert folder.parent == weights.cache_dir() / "converted" and folder.name.startswith("llm-")
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert llm_gguf.package_folder() == folder


def test_tiny_identity(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    info = tiny_llm.describe()
    assert info["role"] == "llm" and info["backend"] == "gguf_transformers"
    assert info["model_id"] == "llama-tiny-random" and len(info["weights"]) == 64
    assert tiny_llm.context_length == 2048
    assert tiny_llm.tokenizer.padding_side == "left"
    # tiny:0 has no chat template (like Vicuna-13B-v1.5): ``auto`` fell back to Vicuna v1.1.
    assert tiny_llm.tokenizer.chat_template is None
    assert tiny_llm.chat_template == info["chat_template"] == "vicuna_v1.1"
    folder = weights.cache_dir() / "tiny" / "gguf_transformers-seed0"
    assert not (folder / "chat_template.jinja").exists()
    assert json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template") is None


def test_count_tokens_is_the_vicuna_rendering_length(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    for prompt in PROMPTS:
        text = chat_templates.VICUNA_V1_1.render(prompt.messages)
        assert text.endswith(" ASSISTANT:") and text.startswith(prompt.messages[0]["content"] + " USER: ")
        ids = tiny_llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tiny_llm.count_tokens(prompt) == len(ids)  # SmolLM2's tokenizer adds no BOS


def test_the_models_own_template_is_used_when_named(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    """``chat_template: model`` on a tokenizer without one is a clear configuration error; on the
    packaged SmolLM2 (which has one) the count is ``apply_chat_template``'s, as before."""
    with pytest.raises(weights.ModelSourceError, match="has no chat template"):
        BACKENDS["llm"].get("gguf_transformers")(
            ModelSpec(backend="gguf_transformers", model="tiny:0", options={"chat_template": "model"})
        )
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(str(llm_gguf.package_folder()), local_files_only=True)
    fmt = llm_common.PromptFormat.build(own, None)
    assert fmt.name == "model"
    for prompt in PROMPTS:
        ids = own.apply_chat_template(
            prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert fmt.token_ids(prompt) == list(ids)


def test_startup_probe_passes_on_the_tiny_model(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    assert tiny_llm.startup_problem() is None


def test_batch_returns_one_generation_each_in_order(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    out = tiny_llm.generate(PROMPTS)
    assert len(out) == len(PROMPTS) and all(isinstance(g, Generation) for g in out)
    for prompt, gen in zip(PROMPTS, out, strict=True):
        assert gen.finish_reason in ("stop", "length") and gen.error is None
        assert gen.prompt_tokens == tiny_llm.count_tokens(prompt)
        assert 1 <= gen.completion_tokens <= prompt.max_new_tokens
        assert gen.text == gen.text.strip()
    assert tiny_llm.generate([]) == []


def test_batched_equals_one_at_a_time_when_greedy(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    batched = tiny_llm.generate(PROMPTS, temperature=0.0)
    single = [tiny_llm.generate([p], temperature=0.0)[0] for p in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert batched == single
    assert any(g.text for g in batched)  # the random model does emit visible text


def test_over_budget_prompt_errors_and_others_run() -> None:
    spec = ModelSpec(backend="gguf_transformers", model="tiny:0", options={"context_length": 40})
    llm = BACKENDS["llm"].get("gguf_transformers")(spec)
    assert llm.context_length == 40
    long_prompt = chat("word " * 60, 4)
    out = llm.generate([PROMPTS[1], long_prompt, PROMPTS[3]])
    assert [g.finish_reason != "error" for g in out] == [True, False, True]
    n = llm.count_tokens(long_prompt)
    assert out[1].text == "" and out[1].prompt_tokens == n
    assert out[1].error == f"prompt of {n} tokens + 4 new exceeds context 40"


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    state = torch.get_rng_state()
    first = tiny_llm.generate(PROMPTS[:3], temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert tiny_llm.generate(PROMPTS[:3], temperature=1.0, seed=7) == first
    assert tiny_llm.generate(PROMPTS[:3], temperature=1.0, seed=8) != first


# ----------------------------------------------------------------------------- gguf_transformers, real


@pytest.mark.slow
def test_real_smollm2_answers_one_sentence(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:  # noqa: ARG001
    llm = BACKENDS["llm"].get("gguf_transformers")(ModelSpec(backend="gguf_transformers", model="package:"))
    assert llm.model_id == "SmolLM2-135M-Instruct-Q4_1" and llm.context_length == 8192
    assert llm.weights_id == weights.sha256_of(llm_gguf._package_gguf())
    prompt = chat("Describe a red apple in one sentence.", 40)
    (gen,) = llm.generate([prompt])
    assert gen.text and gen.finish_reason in ("stop", "length")
    assert gen.prompt_tokens == llm.count_tokens(prompt) and gen.completion_tokens <= 40


# ----------------------------------------------------------------------------- vllm


def test_vllm_without_the_package_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(weights.ModelSourceError) as info:
        BACKENDS["llm"].get("vllm")(ModelSpec(backend="vllm", model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert str(info.value) == "vllm backend needs the vllm package (pip install vllm) on a GPU node"


def test_vllm_bookkeeping_with_a_stand_in_engine(
    monkeypatch: pytest.MonkeyPatch, tiny_llm: llm_gguf.GGUFTransformersLLM
) -> None:
    """Not vLLM itself: a stand-in module with the same surface checks order, budget and mapping."""
    seen: dict[str, object] = {}

    class SamplingParams:
        def __init__(self, **kwargs: object) -> None:
            self.__dict__.update(kwargs)

    class FakeLLM:
        def __init__(self, **kwargs: object) -> None:
            seen["engine"] = kwargs
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=60))

        def get_tokenizer(self) -> object:
            return tiny_llm.tokenizer

        def generate(self, requests: list[dict], sampling_params: list, use_tqdm: bool) -> list:
            seen["params"] = sampling_params
            return [
                types.SimpleNamespace(
                    prompt_token_ids=r["prompt_token_ids"],
                    outputs=[
                        types.SimpleNamespace(
                            text=f" {len(r['prompt_token_ids'])} ",
                            finish_reason="length",
                            token_ids=[1] * p.max_tokens,
                        )
                    ],
                )
                for r, p in zip(requests, sampling_params, strict=True)
            ]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, SamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", fake)
    llm = BACKENDS["llm"].get("vllm")(
        ModelSpec(backend="vllm", model="some/model", options={"load_format": "dummy"})
    )
    assert seen["engine"]["enable_prefix_caching"] is True and seen["engine"]["load_format"] == "dummy"
    # The engine's tokenizer (tiny:0's) has no chat template: prompts use Vicuna v1.1, not
    # vLLM's chat path, which would refuse it (vllm#17977).
    assert llm.chat_template == "vicuna_v1.1" and llm.startup_problem() is None
    prompts = [PROMPTS[0], chat("word " * 60, 4), PROMPTS[1]]
    out = llm.generate(prompts, temperature=0.5, seed=3)
    counts = [llm.count_tokens(p) for p in prompts]
    assert [g.finish_reason for g in out] == ["length", "error", "length"]
    assert [out[0].text, out[2].text] == [str(counts[0]), str(counts[2])]
    assert out[0].prompt_tokens == counts[0] and out[0].completion_tokens == 6
    assert all(p.seed == 3 and p.temperature == 0.5 for p in seen["params"])  # type: ignore[attr-defined]


def test_local_folder_source_uses_the_same_loader(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    """A local transformers folder is a valid source too; it loads through ``load_folder``."""
    folder = weights.cache_dir() / "tiny" / "gguf_transformers-seed0"
    llm = BACKENDS["llm"].get("gguf_transformers")(ModelSpec(backend="gguf_transformers", model=str(folder)))
    assert llm.model_id == folder.name and llm.weights_id == tiny_llm.weights_id
    assert llm.generate(PROMPTS[:2]) == tiny_llm.generate(PROMPTS[:2])


# ----------------------------------------------------------------------------- openai (real HTTP)


class FakeChatServer:
    """An OpenAI-compatible ``/v1/chat/completions`` on 127.0.0.1, in a thread.

    The answer is the user message's words, upper-cased, cut to ``max_tokens`` words (then
    ``finish_reason`` is ``length``), usage counts words. ``fail_first`` answers the first N
    requests with 503; a user message containing ``BAD`` gets a 400. Each request sleeps
    ``delay_s`` while ``max_in_flight`` records the most requests served at once.
    """

    def __init__(self, fail_first: int = 0, delay_s: float = 0.05) -> None:
        self.fail_first, self.delay_s = fail_first, delay_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    failing = len(server.requests) <= server.fail_first
                try:
                    time.sleep(server.delay_s)
                    status, answer = server.answer(body, failing, self.path)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                        server.statuses.append(status)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict, failing: bool, path: str) -> tuple[int, dict]:
        """Chat requests answer the last user message; plain completions (``/v1/completions``)
        answer the text after the last ``USER: `` of a Vicuna-formatted prompt."""
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, {"error": {"message": f"no route {path}"}}
        if failing:
            return 503, {"error": {"message": "overloaded"}}
        chat = path == "/v1/chat/completions"
        if chat:
            user = body["messages"][-1]["content"]
            prompt_words = sum(len(m["content"].split()) for m in body["messages"])
        else:
            user = body["prompt"].rsplit("USER: ", 1)[-1].removesuffix(" ASSISTANT:")
            prompt_words = len(body["prompt"].split())
        if "BAD" in user:
            return 400, {"error": {"message": "bad request"}}
        words = user.upper().split()
        kept = words[: body["max_tokens"]]
        text = " " + " ".join(kept) + " "
        choice = {"index": 0, "finish_reason": "length" if len(words) > len(kept) else "stop"}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return 200, {
            "model": body["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_words, "completion_tokens": len(kept)},
        }

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def openai_llm(base_url: str, **options: object) -> object:
    spec = ModelSpec(backend="openai", model="served-model", options={"base_url": base_url, **options})
    return BACKENDS["llm"].get("openai")(spec)


def test_openai_concurrent_requests_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAND_TEST_KEY", "sk-test")
    prompts = [
        chat(f"item {i} " + "word " * (i % 5), max_new_tokens=3, prefix_key=str(i % 2)) for i in range(24)
    ]
    with FakeChatServer() as server:
        llm = openai_llm(server.base_url, concurrency=8, api_key_env="GRAND_TEST_KEY")
        out = llm.generate(prompts, temperature=0.3, seed=5)
    assert len(out) == len(prompts) == len(server.requests)
    for prompt, gen in zip(prompts, out, strict=True):
        words = prompt.messages[-1]["content"].upper().split()
        assert gen.text == " ".join(words[:3])
        assert gen.finish_reason == ("length" if len(words) > 3 else "stop")
        assert gen.prompt_tokens == len(words) + 2 and gen.completion_tokens == min(3, len(words))
    assert 1 < server.max_in_flight <= 8
    body = server.requests[0]
    assert body["model"] == "served-model" and body["max_tokens"] == 3
    assert body["temperature"] == 0.3 and body["seed"] == 5 and body["messages"][0]["role"] == "system"
    assert all(h.get("Authorization") == "Bearer sk-test" for h in server.headers)


def test_openai_retries_503_then_succeeds() -> None:
    with FakeChatServer(fail_first=3, delay_s=0.0) as server:
        llm = openai_llm(server.base_url, concurrency=1, max_retries=3, backoff_s=0.01)
        out = llm.generate([chat("one two"), chat("three")])
    assert [g.text for g in out] == ["ONE TWO", "THREE"]
    assert server.statuses.count(503) == 3 and server.statuses.count(200) == 2
    assert "Authorization" not in server.headers[0]  # no key configured, none sent


def test_openai_failures_become_error_generations() -> None:
    with FakeChatServer(fail_first=100, delay_s=0.0) as server:
        llm = openai_llm(server.base_url, max_retries=1, backoff_s=0.01)
        (gen,) = llm.generate([chat("hello")])
        assert gen.finish_reason == "error" and "HTTP 503" in (gen.error or "")
        assert len(server.requests) == 2 and gen.prompt_tokens == llm.count_tokens(chat("hello"))
    with FakeChatServer(delay_s=0.0) as server:
        llm = openai_llm(server.base_url, max_retries=3, backoff_s=0.01)
        out = llm.generate([chat("BAD one"), chat("fine")])
        assert out[0].finish_reason == "error" and "HTTP 400" in (out[0].error or "")
        assert out[1].text == "FINE" and len(server.requests) == 2  # a 400 is not retried
    closed = openai_llm(server.base_url, max_retries=1, backoff_s=0.01, timeout_s=2)
    (gen,) = closed.generate([chat("anyone there?")])
    assert gen.finish_reason == "error" and "connection failed" in (gen.error or "")


def test_openai_budget_check_skips_the_request() -> None:
    with FakeChatServer(delay_s=0.0) as server:
        llm = openai_llm(server.base_url, context_length=64)
        out = llm.generate([chat("short"), chat("word " * 200)])
    assert out[0].text == "SHORT" and out[1].finish_reason == "error"
    assert "exceeds context 64" in (out[1].error or "") and len(server.requests) == 1


def test_openai_token_counting(tiny_llm: llm_gguf.GGUFTransformersLLM) -> None:
    prompt = PROMPTS[2]
    chars = sum(len(m["content"]) for m in prompt.messages)
    estimate = openai_llm("http://127.0.0.1:9/v1").count_tokens(prompt)
    assert estimate == math.ceil(chars / 3.5) + 4 * 2 + 3
    exact = openai_llm("http://127.0.0.1:9/v1", tokenizer=str(llm_gguf.package_folder()))
    # Server mode counts with the local tokenizer's own template (SmolLM2's ChatML-like one).
    assert exact.chat_template == "server" and exact.format.name == "model"
    assert estimate >= exact.count_tokens(prompt)  # the estimate errs high
    assert exact.count_tokens(prompt) == len(
        llm_common.PromptFormat.build(exact.tokenizer, None).token_ids(prompt)
    )
    # A tokenizer without a template counts through the Vicuna fallback, as the local backends do.
    vicuna = openai_llm(
        "http://127.0.0.1:9/v1", tokenizer=str(weights.cache_dir() / "tiny" / "gguf_transformers-seed0")
    )
    assert vicuna.count_tokens(prompt) == tiny_llm.count_tokens(prompt)


def test_openai_renders_a_named_template_here_and_sends_text_to_completions() -> None:
    """For a served model without a template (Vicuna on a vLLM server refuses chat requests),
    a named template is rendered here and the text goes to ``/v1/completions``."""
    opener = ChatPrompt(
        messages=[*chat("Describe the cup").messages, {"role": "assistant", "content": "A cup"}],
        max_new_tokens=4,
    )
    with FakeChatServer(delay_s=0.0) as server:
        llm = openai_llm(server.base_url, chat_template="vicuna_v1.1")
        out = llm.generate([chat("red apple", 5), opener])
        assert llm.startup_problem() is None
    assert llm.chat_template == "vicuna_v1.1" and llm.url == f"{server.base_url}/completions"
    body = server.requests[0]
    assert "messages" not in body and body["prompt"] == "Be brief. USER: red apple ASSISTANT:"
    assert server.requests[1]["prompt"].endswith("USER: Describe the cup ASSISTANT: A cup")
    assert (out[0].text, out[0].finish_reason, out[0].prompt_tokens) == ("RED APPLE", "stop", 6)
    assert out[1].finish_reason == "length" and out[1].error is None


def test_openai_chat_template_option_is_checked() -> None:
    with pytest.raises(ConfigError) as info:  # refused with the options, before anything loads
        openai_llm("http://127.0.0.1:9/v1", chat_template="vicuna")
    assert str(info.value) == (
        "openai.options.chat_template: unknown chat template 'vicuna'; "
        "known: server, auto, chatml, llama-2, model, vicuna_v1.1"
    )
    with pytest.raises(weights.ModelSourceError, match="needs options.tokenizer"):
        openai_llm("http://127.0.0.1:9/v1", chat_template="model")
    assert openai_llm("http://127.0.0.1:9/v1", chat_template="auto").chat_template == "vicuna_v1.1"


def test_openai_startup_probe_names_an_unreachable_server() -> None:
    llm = openai_llm("http://127.0.0.1:9/v1", max_retries=0, timeout_s=2)
    problem = llm.startup_problem()
    assert problem is not None and problem.model == "openai/served-model"
    assert problem.reason.startswith("gave up after 1 attempts: connection failed")
