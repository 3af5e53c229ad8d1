"""``grand plan --gpus N``: pool sizes and an ETA from the throughput measured in committed markers.

Each marker records the unit's compute seconds (``seconds``), its images (``rows``) and the seconds of
every stage (``stage_seconds``). Summed over a level's shards that gives seconds per image per
actor, ``t``. A level of ``a`` actors then does ``a / t`` images/s, and the levels of a streamed
run (shards flow 1 -> 2 -> 3 -> 4 without a barrier) go as fast as the slowest one. So the GPUs
are handed out one actor at a time, always to the slowest GPU level whose actor still fits the
budget (each actor takes its pool's ``num_gpus``); CPU-only levels then get enough actors to keep
up with the result. This is the level-aware planner of ecosystem.md (e) 5.

The seconds are those of the hardware the measured run used: plan from a calibration shard run
on the pools you will deploy, not from a laptop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from grand_pipeline.config import ConfigError, GrandConfig
from grand_pipeline.locations import require_existing
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.store import Store


@dataclass
class LevelPlan:
    level: int
    units_measured: int
    images_measured: int
    seconds_per_image: float
    """Seconds one actor spends per image (sum of shard durations / images)."""
    stage_seconds_per_image: dict[str, float]
    gpus_per_actor: float
    cpus_per_actor: float
    actors: int = 0
    units_remaining: int = 0

    @property
    def images_per_s(self) -> float:
        return self.actors / self.seconds_per_image if self.seconds_per_image > 0 else math.inf

    @property
    def gpus(self) -> float:
        return self.actors * self.gpus_per_actor

    @property
    def bottleneck_stage(self) -> str | None:
        stages = self.stage_seconds_per_image
        return max(stages, key=stages.__getitem__) if stages else None


@dataclass
class Plan:
    gpus: float
    levels: list[LevelPlan]
    unmeasured: list[int] = field(default_factory=list)
    images_per_unit: float = 0.0

    @property
    def images_per_s(self) -> float:
        rates = [lv.images_per_s for lv in self.levels if lv.actors]
        return min(rates) if rates else 0.0

    @property
    def gpus_used(self) -> float:
        return sum(lv.gpus for lv in self.levels)

    def eta_s(self) -> float:
        """Levels run concurrently, so the remaining time is that of the slowest level's backlog."""
        times = [
            lv.units_remaining * self.images_per_unit / lv.images_per_s
            for lv in self.levels
            if lv.units_remaining and lv.images_per_s > 0
        ]
        return max(times, default=0.0)


def measure(store: Store, cfg: GrandConfig, level: int) -> LevelPlan | None:
    markers = store.committed(level)
    images = sum(int(m["rows"]) for m in markers.values())
    seconds = sum(float(m["seconds"]) for m in markers.values())
    if not images or seconds <= 0:
        return None
    stages: dict[str, float] = {}
    for m in markers.values():
        for stage, value in (m.get("stage_seconds") or {}).items():
            stages[stage] = stages.get(stage, 0.0) + float(value)
    pool = cfg.pool(level)
    meta = RunMeta(store)
    known = set(meta.known_shards(level)) | set(meta.known_shards())
    counts = meta.unit_counts()  # a shard not indexed yet counts as one unit
    total_units = sum(counts.get(shard, 1) for shard in known)
    return LevelPlan(
        level=level,
        units_measured=len(markers),
        images_measured=images,
        seconds_per_image=seconds / images,
        stage_seconds_per_image={k: v / images for k, v in sorted(stages.items())},
        gpus_per_actor=float(pool.num_gpus),
        cpus_per_actor=float(pool.num_cpus),
        units_remaining=max(total_units - len(markers), 0),
    )


def allocate(levels: list[LevelPlan], gpus: float) -> None:
    """Fill ``actors`` in place: GPUs to the slowest GPU level first, then CPU levels to match.

    Greedy filling can leave surplus actors on levels that are not the bottleneck; they are
    trimmed to what keeps up with it, and the freed GPUs go to the bottleneck while they buy it
    another actor.
    """
    gpu_levels = [lv for lv in levels if lv.gpus_per_actor > 0]
    for lv in gpu_levels:
        lv.actors = 0

    def rate() -> float:
        return min((lv.images_per_s if lv.actors else 0.0) for lv in gpu_levels)

    for _ in range(10_000):  # bounded: every round spends GPUs on the bottleneck or stops
        while True:
            spare = gpus - sum(lv.gpus for lv in gpu_levels)
            fits = [lv for lv in gpu_levels if lv.gpus_per_actor <= spare + 1e-9]
            if not fits:
                break
            slowest = min(fits, key=lambda lv: (lv.images_per_s if lv.actors else 0.0, lv.level))
            slowest.actors += 1
        if not gpu_levels:
            break
        target = rate()
        for lv in gpu_levels:
            if lv.actors:
                lv.actors = max(1, math.ceil(target * lv.seconds_per_image - 1e-9))
        spare = gpus - sum(lv.gpus for lv in gpu_levels)
        bottleneck = min(gpu_levels, key=lambda lv: lv.images_per_s if lv.actors else 0.0)
        if bottleneck.gpus_per_actor > spare + 1e-9:
            break
    target = rate() if gpu_levels else 0.0
    for lv in levels:
        if lv.gpus_per_actor > 0:
            continue
        # Without GPU levels there is nothing to keep up with: one actor per CPU level.
        lv.actors = max(1, math.ceil(target * lv.seconds_per_image - 1e-9)) if target else 1


def make_plan(cfg: GrandConfig, output_uri: str, gpus: float, levels: list[int] | None = None) -> Plan:
    if not gpus >= 0:  # also refuses NaN
        raise ConfigError(f"--gpus {gpus}: expected a GPU budget >= 0")
    store = Store(output_uri)
    require_existing(store)
    wanted = levels or store.levels_present()
    measured: list[LevelPlan] = []
    unmeasured: list[int] = []
    for level in wanted:
        lp = measure(store, cfg, level)
        if lp:
            measured.append(lp)
        else:
            unmeasured.append(level)
    allocate(measured, gpus)
    images = sum(lv.images_measured for lv in measured)
    shards = sum(lv.units_measured for lv in measured)
    return Plan(gpus=gpus, levels=measured, unmeasured=unmeasured,
                images_per_unit=images / shards if shards else 0.0)
