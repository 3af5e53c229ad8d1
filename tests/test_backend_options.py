"""Typed backend options: every backend declares a dataclass, profiles build into it, one owner per cut."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from grand_pipeline.config import ConfigError, ModelSpec, load_config, profiles
from grand_pipeline.models.hub import import_backends, model_specs
from grand_pipeline.models.roles import BACKENDS, build_options

import_backends()
REGISTERED = [(role, name) for role, registry in BACKENDS.items() for name in registry]


@pytest.mark.parametrize("role, name", REGISTERED)
def test_every_registered_backend_has_an_options_dataclass(role: str, name: str) -> None:
    cls = BACKENDS[role].get(name)
    assert dataclasses.is_dataclass(cls.Options), f"{role}/{name} has no options dataclass"
    # Every option has its default in the dataclass: an empty options mapping always builds.
    assert build_options(cls, {}) == cls.Options()
    with pytest.raises(ConfigError, match=r"^x\.options\.no_such_option: unknown key"):
        build_options(cls, {"no_such_option": 1}, "x.options")


@pytest.mark.parametrize("profile", profiles())
def test_every_shipped_profiles_options_build_into_their_dataclass(profile: str) -> None:
    cfg = load_config(profile)
    for key, role, spec in model_specs(cfg.models):
        opts = build_options(BACKENDS[role].get(spec.backend), spec.options, f"models.{key}.options")
        for name, value in spec.options.items():
            assert getattr(opts, name) == value, f"{profile}: models.{key}.options.{name}"


def test_backend_reads_its_typed_options_and_code_built_specs_are_checked_too() -> None:
    cls = BACKENDS["depth"].get("ground_plane")
    depth = cls(ModelSpec("ground_plane", options={"horizon": 0.5}))
    assert type(depth.opts).__name__ == "GroundPlaneOptions"
    assert (depth.horizon, depth.far, depth.cue_weight) == (0.5, 0.0, 0.2)  # defaults from the dataclass
    with pytest.raises(ConfigError, match=r"^ground_plane\.options\.horzion: unknown key"):
        cls(ModelSpec("ground_plane", options={"horzion": 0.5}))
    with pytest.raises(ConfigError, match=r"^ground_plane\.options\.horizon: must be below 1"):
        cls(ModelSpec("ground_plane", options={"horizon": 1.0}))


@pytest.mark.parametrize(
    "backend, options, key",
    [
        ("openai", {"concurrency": 0}, "concurrency"),
        ("openai", {"chat_template": "server", "timeout_s": 0}, "timeout_s"),
        ("vllm", {"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ("gguf_transformers", {"context_length": 0}, "context_length"),
    ],
)
def test_llm_option_ranges(backend: str, options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^models\.llm\.options\.{key}:"):
        build_options(BACKENDS["llm"].get(backend), options, "models.llm.options")


def test_openai_accepts_server_templates_the_others_do_not() -> None:
    assert build_options(BACKENDS["llm"].get("openai"), {"chat_template": "server"}).chat_template == "server"
    with pytest.raises(ConfigError, match="unknown chat template 'server'"):
        build_options(BACKENDS["llm"].get("gguf_transformers"), {"chat_template": "server"})


def test_tagger_leaves_the_cut_to_level1_and_tags_are_unchanged() -> None:
    """The tag cut has one owner (``level1.tag_top_k`` / ``tag_threshold``). The tagger returns
    every class, best first; the level's cut then keeps exactly what the old double cut kept
    (tagger top_k/threshold, then the level's) for the lite values."""
    from levels.level1.tags import select_tags

    tagger = BACKENDS["tagger"].get("efficientnet_lite")(ModelSpec("efficientnet_lite", "tiny:0"))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    tags = tagger.tag(images)
    probs = tagger.probabilities(images)
    assert [len(t) for t in tags] == [probs.shape[1]] * 2
    lite = load_config("lite").level1
    for per_image, row in zip(tags, probs, strict=True):
        scores = [t.score for t in per_image]
        assert scores == sorted(scores, reverse=True)
        old = tagger._top(row[None], lite.tag_top_k, lite.tag_threshold)[0]  # the removed backend cut
        assert select_tags(per_image, lite.tag_top_k, lite.tag_threshold) == select_tags(
            old, lite.tag_top_k, lite.tag_threshold
        )


@pytest.mark.parametrize("profile", profiles())
def test_member_floors_never_cut_above_the_ensembles_prefilter(profile: str) -> None:
    """Each detector's own candidate floor (an option of the model's post-processing) is at or
    below ``level1.score_thresholds`` of its member, so the level's pre-filter is the one cut
    that decides; a stricter floor would silently own it."""
    cfg = load_config(profile)
    floors = {"nanodet_onnx": "score_threshold", "region_tagger": "min_score", "owlv2": "score_threshold",
              "ultralytics": "score_threshold", "grounding_dino": "box_threshold"}
    for member, spec in cfg.models.detectors.items():
        field = floors[spec.backend]
        floor = getattr(build_options(BACKENDS["detector"].get(spec.backend), spec.options), field)
        level = cfg.level1.score_thresholds.get(member, 0.1)  # 0.1: the documented default
        assert floor <= level, f"{profile}: {member} options.{field}={floor} > level1 {level}"
