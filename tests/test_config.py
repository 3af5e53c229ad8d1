"""Typed config: every shipped profile validates; overrides and errors name the dotted key."""

from __future__ import annotations

import pytest

from grand_pipeline.config import ConfigError, GrandConfig, load_config, parse_override, profiles


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
