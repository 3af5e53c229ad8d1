"""The Ray executor: same bytes as the local executor, and a dead actor is replaced."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grand_pipeline.config import load_config
from grand_pipeline.engine.driver import RunRequest, run
from grand_pipeline.sample import make_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_cfg) -> Path:
    folder = tmp_path_factory.mktemp("ray-input")
    make_sample(str(folder), tiny_cfg, images=2, shard_id="sa_000010", start=1)
    make_sample(str(folder), tiny_cfg, images=2, shard_id="sa_000011", start=3)
    make_sample(str(folder), tiny_cfg, images=2, shard_id="sa_000012", start=5)
    return folder


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # Workers must import the test plugin, and find the same tiny-weights cache.
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "level1").glob("*.parquet"))}


def test_ray_and_local_executors_write_identical_parquet(shards, tmp_path, ray_session) -> None:
    cfg = load_config("tiny-lite", overrides=["pools.level1.num_actors=2", "engine.max_in_flight_per_actor=1"])
    local = run(cfg, RunRequest(str(shards), str(tmp_path / "local"), [1]), executor="local")
    remote = run(cfg, RunRequest(str(shards), str(tmp_path / "ray"), [1]), executor="ray")
    assert local.committed == remote.committed == {1: 3}
    assert _bytes(tmp_path / "local") == _bytes(tmp_path / "ray")
    assert len(_bytes(tmp_path / "ray")) == 3


def test_dead_actor_is_replaced_and_its_shard_retried(shards, tmp_path, ray_session) -> None:
    flag = tmp_path / "died.flag"
    cfg = load_config(
        "tiny-lite",
        overrides=[
            "plugins=[tests.fault_plugin]",
            f"models.detectors.flaky={{backend: die_once, options: {{flag: '{flag}'}}}}",
            "engine.max_shard_retries=1",
        ],
    )
    events = []
    summary = run(cfg, RunRequest(str(shards), str(tmp_path / "out"), [1], limit=1), "ray", events.append)
    assert flag.exists(), "the fault never fired"
    errors = [e for e in events if e["type"] == "unit_error"]
    assert len(errors) == 1 and "actor died" in errors[0]["error"]
    assert summary.committed == {1: 1} and not summary.failed
    assert (tmp_path / "out" / "level1" / "sa_000010@00000.success.json").exists()


def test_retry_budget_is_bounded(shards, tmp_path, ray_session) -> None:
    cfg = load_config("tiny-lite", overrides=["engine.max_shard_retries=0", "plugins=[tests.fault_plugin]",
                                         f"models.detectors.flaky={{backend: die_once, options: {{flag: '{tmp_path / 'f'}'}}}}"])
    summary = run(cfg, RunRequest(str(shards), str(tmp_path / "out"), [1], limit=1), "ray")
    assert summary.failed and "level1/sa_000010@00000" in summary.failed
    assert not (tmp_path / "out" / "level1" / "sa_000010@00000.success.json").exists()


def test_pools_that_cannot_coexist_still_finish(shards, tmp_path, ray_session) -> None:
    # Each pool wants both CPUs of this 2-CPU cluster: level 2's actor can only start once the
    # drained level-1 pool has been given back.
    cfg = load_config("tiny-lite", overrides=["pools.level1.num_cpus=2", "pools.level2.num_cpus=2"])
    summary = run(cfg, RunRequest(str(shards), str(tmp_path / "out"), [1, 2], limit=1), "ray")
    assert summary.committed == {1: 1, 2: 1} and not summary.failed
