"""The LLM start-up check (``Stage.startup_check`` -> ``StartupCheckFailed``) and the tiny
profile's LLM path through the chat-template fallback.

The check runs one tiny generation per LLM-using stage before any shard is taken, so a model that
cannot template or answer stops the run with one line instead of committing rows whose attempts
all say "generation failed". The tiny profile's LLM tokenizer has no chat template (like the
paper's Vicuna-13B-v1.5), so the last test drives Levels 3 and 4 through the ``vicuna_v1.1``
fallback with real (random) weights on the CPU.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from grand_pipeline.config import GrandConfig, ModelSpec, load_config
from grand_pipeline.models.backends.captioner_llm import LLMFromTagsCaptioner
from grand_pipeline.models.hub import ModelHub
from grand_pipeline.models.roles import LLM, ChatPrompt, Generation
from grand_pipeline.stage import StartupCheckFailed
from levels.level2.captions import CaptionStage
from levels.level3.dense_caption import DenseCaptionStage
from levels.level3.scene_graph import SceneGraphStage
from levels.level4.context import AdditionalContextStage
from tests.test_level3 import make_cfg, make_record, table_objects


class RaisingLLM(LLM):
    """An LLM whose engine dies on every call (not registered: ``FakeHub`` hands it over)."""

    backend = "raising"

    def count_tokens(self, prompt: ChatPrompt) -> int:
        return 1

    def generate(
        self, prompts: list[ChatPrompt], *, temperature: float = 0.0, seed: int = 0
    ) -> list[Generation]:
        raise RuntimeError("CUDA error: out of memory")


class FakeHub:
    """Hands stages ready-made backends, as ``ModelHub.get`` would."""

    def __init__(self, **backends: Any) -> None:
        self.backends = backends

    def get(self, key: str) -> Any:
        return self.backends[key]


def test_startup_check_failed_names_the_model_and_reason_and_pickles() -> None:
    exc = StartupCheckFailed("vllm/lmsys/vicuna-13b-v1.5", "prompt could not be tokenised: no template")
    assert str(exc) == (
        "LLM vllm/lmsys/vicuna-13b-v1.5 failed its start-up generation: "
        "prompt could not be tokenised: no template"
    )
    again = pickle.loads(pickle.dumps(exc))  # raised in a Ray actor, re-raised in the driver
    assert isinstance(again, StartupCheckFailed) and str(again) == str(exc)
    assert (again.model, again.reason) == (exc.model, exc.reason)


def test_an_llm_stage_whose_llm_errors_fails_its_startup_check() -> None:
    # The scripted LLM has no script for the probe prompt: an error Generation, as a model that
    # cannot template would give.
    cfg = make_cfg({"script": {}})
    stage = DenseCaptionStage(cfg, ModelHub(cfg.models, cfg.plugins))
    with pytest.raises(StartupCheckFailed) as info:
        stage.startup_check()
    assert str(info.value) == (
        "LLM scripted/scripted-llm failed its start-up generation: no script for prompt 'startup_check'"
    )
    fine = make_cfg({"script": {"startup_check": ["Blue."]}})
    DenseCaptionStage(fine, ModelHub(fine.models, fine.plugins)).startup_check()  # no exception


def test_an_exception_in_the_engine_is_the_reason() -> None:
    stage = AdditionalContextStage(
        make_cfg(), FakeHub(llm=RaisingLLM(ModelSpec("raising", model="big-model")))
    )
    with pytest.raises(StartupCheckFailed) as info:
        stage.startup_check()
    assert info.value.model == "raising/big-model"
    assert info.value.reason == "RuntimeError: CUDA error: out of memory"


def test_stages_without_an_llm_check_nothing_and_the_lite_captioner_checks_its_llm() -> None:
    SceneGraphStage(make_cfg(), None).startup_check()  # no backends: nothing to probe
    llm = RaisingLLM(ModelSpec("raising", model="small-model"))
    captioner = LLMFromTagsCaptioner(ModelSpec("llm_from_tags"), hub=FakeHub(llm=llm))
    stage = CaptionStage(make_cfg(), FakeHub(captioner=captioner))
    with pytest.raises(StartupCheckFailed, match="^LLM raising/small-model failed its start-up generation"):
        stage.startup_check()


@pytest.fixture(scope="module")
def tiny_levels() -> tuple[GrandConfig, ModelHub]:
    cfg = load_config("tiny")
    return cfg, ModelHub(cfg.models, cfg.plugins)


def test_tiny_profile_llm_path_takes_the_vicuna_fallback_and_answers(tiny_levels) -> None:
    """Levels 3 and 4 with the tiny profile's real (random) LLM: the tokenizer has no chat
    template, the probe passes, and every dense caption and context has text and no
    "generation failed" issue (before the fallback, every attempt failed to template)."""
    cfg, hub = tiny_levels
    assert cfg.models.llm is not None and cfg.models.llm.backend == "gguf_transformers"
    records = [make_record("sa_1"), make_record("sa_2", objects=table_objects()[3:6])]
    SceneGraphStage(cfg, hub)(records)
    dense, context = DenseCaptionStage(cfg, hub), AdditionalContextStage(cfg, hub)
    llm = hub.get("llm")
    assert llm.tokenizer.chat_template is None and llm.describe()["chat_template"] == "vicuna_v1.1"
    for stage in (dense, context):
        stage.startup_check()
        stage(records)
    for record in records:
        assert record.ok, record.error
        for key, text_key in (("dense_caption", "caption"), ("additional_context", "text")):
            value = record.fields[key]
            assert value[text_key].strip(), (record.image_id, key, value)
            issues = [issue for attempt in value["attempts"] for issue in attempt["issues"]]
            assert not any(issue.startswith("generation failed") for issue in issues), issues
