"""Typed config: every shipped profile validates; overrides and errors name the dotted key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from grand_pipeline.config import ConfigError, GrandConfig, load_config, parse_override, profiles

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", profiles())
def test_every_profile_file_validates(name: str) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, GrandConfig)
    assert cfg.profile == name
    assert cfg.models.detectors, "a profile needs at least one detector"
    members = set(cfg.models.detectors)
    assert set(cfg.level1.vote_order) <= members
    assert len(cfg.content_hash()) == 16


def test_shipped_profiles_include_lite_and_tiny() -> None:
    assert {"lite", "tiny"} <= set(profiles())


def test_set_override_reaches_nested_key() -> None:
    cfg = load_config("lite", overrides=["level1.vote_iou=0.7", "pools.level1.num_actors=3"])
    assert cfg.level1.vote_iou == 0.7
    assert cfg.pool(1).num_actors == 3


def test_override_of_member_option() -> None:
    cfg = load_config("lite", overrides=["models.detectors.nanodet.options.score_threshold=0.5"])
    assert cfg.models.detectors["nanodet"].options["score_threshold"] == 0.5


@pytest.mark.parametrize(
    "override, key",
    [
        ("level1.nms_iou=1.5", "level1.nms_iou"),
        ("level1.no_such_key=1", "level1.no_such_key"),
        ("pools.level1.num_actors=zero", "pools.level1.num_actors"),
        ("level1.box_fusion=median", "level1.box_fusion"),
        ("engine.executor=spark", "engine.executor"),
        ("models.segmenter.batch_size=0", "models.segmenter.batch_size"),
    ],
)
def test_errors_name_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("lite", overrides=[override])
    assert str(info.value).startswith(key + ":")


@pytest.mark.parametrize(
    "override, key",
    [
        # level 1: counts, fractions, and per-member score maps named entry by entry
        ("level1.max_image_pixels=-1", "level1.max_image_pixels"),
        ("level1.tag_top_k=0", "level1.tag_top_k"),
        ("level1.region_min_area=1.5", "level1.region_min_area"),
        ("level1.score_thresholds.nanodet=1.5", "level1.score_thresholds.nanodet"),
        ("level1.trusted.nanodet=-0.1", "level1.trusted.nanodet"),
        ("level1.person.floor=2", "level1.person.floor"),
        ("level1.person.promote.nanodet=3", "level1.person.promote.nanodet"),
        ("level1.person.drop_unmatched_from=[owlv2]", "level1.person.drop_unmatched_from"),
        # level 2
        ("level2.grounding_iou=7", "level2.grounding_iou"),
        ("level2.promote_min_labels=0", "level2.promote_min_labels"),
        ("level2.max_phrases=0", "level2.max_phrases"),
        # level 3: ordering of the layer bounds, ranges of each bound and of the LLM loop
        ("level3.layer_thresholds=[0.9, 0.1]", "level3.layer_thresholds"),
        ("level3.layer_thresholds=[0.1, 0.6, 0.6]", "level3.layer_thresholds"),
        ("level3.layer_thresholds=[0.1, 1.5, 2.0]", "level3.layer_thresholds[1]"),
        ("level3.max_attempts=0", "level3.max_attempts"),
        ("level3.group_radius=0", "level3.group_radius"),
        ("level3.temperature=-0.1", "level3.temperature"),
        ("level3.first_temperature=-1", "level3.first_temperature"),
        ("level3.max_new_tokens=0", "level3.max_new_tokens"),
        ("level3.embedding_match=1.2", "level3.embedding_match"),
        # level 4: min <= max sentences
        ("level4.min_sentences=9", "level4.min_sentences"),
        ("level4.min_sentences=0", "level4.min_sentences"),
        ("level4.max_attempts=0", "level4.max_attempts"),
        # engine: each field named on its own
        ("engine.max_shard_retries=-1", "engine.max_shard_retries"),
        ("engine.max_in_flight_per_actor=0", "engine.max_in_flight_per_actor"),
        ("engine.torch_threads=-2", "engine.torch_threads"),
        # pools
        ("pools.level2.num_cpus=-1", "pools.level2.num_cpus"),
        ("pools.level1.resources.GPU=1", "pools.level1.resources.GPU"),
        ("pools.level1.resources.tpu=-1", "pools.level1.resources.tpu"),
        # models: backend names, option keys, types and ranges
        ("models.segmenter.backend=nonexistent", "models.segmenter.backend"),
        ("models.detectors.nanodet.backend=owl", "models.detectors.nanodet.backend"),
        ("models.detectors.nanodet.options.score_treshold=0.4", "models.detectors.nanodet.options.score_treshold"),
        ("models.detectors.nanodet.options.score_threshold=high", "models.detectors.nanodet.options.score_threshold"),
        ("models.detectors.nanodet.options.score_threshold=1.5", "models.detectors.nanodet.options.score_threshold"),
        ("models.segmenter.options.threshold=1.0", "models.segmenter.options.threshold"),
        ("models.segmenter.options.normalize=zscore", "models.segmenter.options.normalize"),
        ("models.depth.options.horizon=1.0", "models.depth.options.horizon"),
        ("models.llm.options.chat_template=alpaca", "models.llm.options.chat_template"),
        ("models.tagger.options.top_k=5", "models.tagger.options.top_k"),
        ("plugins=[no_such_plugin_module]", "plugins"),
    ],
)
def test_every_key_family_refuses_what_cannot_work(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("lite", overrides=[override])
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert "\n" not in message


def test_unknown_backend_lists_the_known_ones_for_its_role() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("lite", overrides=["models.segmenter.backend=nonexistent"])
    assert str(info.value).endswith("known: litemedsam, sam")


@pytest.mark.parametrize(
    "override",
    [
        "level3.first_temperature=null",
        "level3.first_temperature=0.0",
        "level4.min_sentences=7",
        "level1.person.floor=0.0",
        "engine.max_shard_retries=0",
        "models.segmenter.backend=sam",
        "models.llm.options.chat_template=chatml",
    ],
)
def test_edge_values_that_can_work_are_accepted(override: str) -> None:
    load_config("lite", overrides=[override])


def test_engine_retries_and_in_flight_are_named_apart() -> None:
    with pytest.raises(ConfigError, match=r"^engine\.max_in_flight_per_actor: must be >= 1"):
        load_config("lite", overrides=["engine.max_in_flight_per_actor=0"])
    with pytest.raises(ConfigError, match=r"^engine\.max_shard_retries: must be >= 0"):
        load_config("lite", overrides=["engine.max_shard_retries=-1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("models.segmenter.backend=nonexistent", "models.segmenter.backend"),
        ("models.detectors.nanodet.options.score_treshold=0.4", "models.detectors.nanodet.options.score_treshold"),
        ("level3.layer_thresholds=[0.9, 0.1]", "level3.layer_thresholds"),
    ],
)
def test_cli_refuses_a_bad_config_in_one_line_before_anything_starts(tmp_path, override, key) -> None:
    # A real process: exit code, stderr and the time to refuse are what a user sees.
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "grand_pipeline.cli", "run", "-i", str(tmp_path / "in"), "-o", str(out),
           "--profile", "tiny-lite", "--executor", "local", "--set", override]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"grand: error: {key}:"), done.stderr[-2000:]
    assert not out.exists(), "nothing may be written (no _run) for a refused config"
    assert "loaded" not in done.stderr  # ModelHub logs every model it builds
    assert elapsed < 10, f"refusing took {elapsed:.1f}s"


def test_vote_order_must_name_members() -> None:
    with pytest.raises(ConfigError, match="not a detector member"):
        load_config("lite", overrides=["level1.vote_order=[nanodet, owlv2]"])


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ConfigError, match="known: .*lite"):
        load_config("huge")


def test_config_file_merges_and_bad_yaml_is_one_message(tmp_path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text("level1:\n  min_models: 3\n")
    assert load_config("lite", good).level1.min_models == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("level1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("lite", bad)
    with pytest.raises(ConfigError, match="config file"):
        load_config("lite", tmp_path / "missing.yaml")


def test_yaml_tags_are_not_executed(tmp_path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("level1: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config("lite", evil)


def test_hash_ignores_pools_but_not_thresholds() -> None:
    base = load_config("lite").content_hash()
    assert load_config("lite", overrides=["pools.level1.num_actors=4"]).content_hash() == base
    assert load_config("lite", overrides=["level1.vote_iou=0.5"]).content_hash() != base


def test_parse_override_values_are_yaml_scalars() -> None:
    assert parse_override("a.b=3") == {"a": {"b": 3}}
    assert parse_override("a=[x, y]") == {"a": ["x", "y"]}
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_pool_gpus_fractional_below_one_whole_above() -> None:
    assert load_config("full", overrides=["pools.level2.num_gpus=0.25"]).pool(2).num_gpus == 0.25
    with pytest.raises(ConfigError, match="pools.level1.num_gpus: above 1 must be a whole number"):
        load_config("full", overrides=["pools.level1.num_gpus=1.5"])
