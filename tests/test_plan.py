"""The planner's GPU allocation on measured numbers (the real-output check is in test_retry_failed)."""

from __future__ import annotations

import pytest

from grand_pipeline.plan import LevelPlan, Plan, allocate


def _level(level: int, seconds: float, gpus: float, remaining: int = 0) -> LevelPlan:
    return LevelPlan(level, 10, 100, seconds, {"stage": seconds}, gpus, 4.0, units_remaining=remaining)


def test_gpus_go_to_the_slowest_level_until_levels_balance() -> None:
    # Level 3 (LLM) is 4x slower per image than level 1 and needs a whole GPU per actor.
    levels = [_level(1, 0.5, 0.5), _level(2, 0.25, 0.25), _level(3, 2.0, 1.0)]
    allocate(levels, gpus=8)
    by = {lv.level: lv for lv in levels}
    assert sum(lv.gpus for lv in levels) <= 8
    assert by[3].actors > by[1].actors
    rates = [lv.images_per_s for lv in levels]
    assert by[3].images_per_s == pytest.approx(min(rates)) == pytest.approx(3.0)
    # Balanced: one actor fewer anywhere would make that level the bottleneck (no waste)...
    assert all((lv.actors - 1) / lv.seconds_per_image < min(rates) for lv in levels)
    # ...and the GPUs left cannot buy the bottleneck another actor.
    assert 8 - sum(lv.gpus for lv in levels) < by[3].gpus_per_actor


def test_cpu_levels_get_actors_to_keep_up_and_eta() -> None:
    levels = [_level(1, 1.0, 1.0, remaining=4), _level(2, 3.0, 0.0, remaining=6)]
    allocate(levels, gpus=2)
    assert (levels[0].actors, levels[1].actors) == (2, 6)  # 2 img/s needs six 3-s actors
    plan = Plan(gpus=2, levels=levels, images_per_unit=10.0)
    assert plan.images_per_s == pytest.approx(2.0)
    assert plan.eta_s() == pytest.approx(max(4 * 10 / 2.0, 6 * 10 / 2.0))


def test_a_budget_below_one_actor_leaves_the_level_unplanned() -> None:
    levels = [_level(1, 1.0, 2.0)]
    allocate(levels, gpus=1)
    assert levels[0].actors == 0
    assert Plan(gpus=1, levels=levels).images_per_s == 0.0


def test_a_missing_output_or_a_negative_budget_is_a_user_error(tmp_path) -> None:
    from grand_pipeline.config import ConfigError, load_config
    from grand_pipeline.plan import make_plan
    from grand_pipeline.store import StoreError

    cfg = load_config("tiny-lite")
    with pytest.raises(StoreError, match=f"output {tmp_path / 'nope'} does not exist"):
        make_plan(cfg, str(tmp_path / "nope"), 1.0)
    with pytest.raises(ConfigError, match="--gpus -1.0: expected a GPU budget >= 0"):
        make_plan(cfg, str(tmp_path), -1.0)
    assert make_plan(cfg, str(tmp_path), 0.0).levels == []  # an empty run: nothing to plan, no error
