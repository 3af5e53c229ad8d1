"""Pipeline metrics through ``ray.util.metrics`` (exported by Ray as ``ray_grand_*``).

Tags are level/stage/status only: per-image or per-shard labels would explode cardinality on a
1,000-shard run. Outside a Ray process the same calls only feed the in-process totals, which the
local executor and the shard markers use.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import MutableMapping
from typing import Any

from grand_pipeline.stage import LLM_ATTEMPTS_FIELD

logger = logging.getLogger(__name__)

METRIC_NAMES = {
    "images": "grand_images_total",
    "stage_seconds": "grand_stage_seconds",
    "shards_committed": "grand_shards_committed_total",
    "shards_in_flight": "grand_shards_in_flight",
    "shard_failures": "grand_shard_failures_total",
    "shards_planned": "grand_shards_planned",
    "llm_attempts": "grand_llm_attempts_total",
    "verify_failures": "grand_verify_failures_total",
}

_STAGE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class PipelineMetrics:
    """Counters for one process; use ``ray_enabled=True`` inside a Ray driver or actor."""

    def __init__(self, ray_enabled: bool = False) -> None:
        self.images: Counter[tuple[int, str, str]] = Counter()
        self.stage_seconds: defaultdict[tuple[int, str], float] = defaultdict(float)
        self.llm_attempts: Counter[tuple[int, str]] = Counter()
        self.verify_failures: Counter[tuple[int, str]] = Counter()
        self._ray: dict[str, Any] = {}
        if ray_enabled:
            self._ray = _ray_metrics()

    def stage_done(self, level: int, stage: str, ok: int, failed: int, seconds: float) -> None:
        self.images[(level, stage, "ok")] += ok
        self.images[(level, stage, "error")] += failed
        self.stage_seconds[(level, stage)] += seconds
        if self._ray:
            tags = {"level": str(level), "stage": stage}
            if ok:
                self._ray["images"].inc(ok, tags={**tags, "status": "ok"})
            if failed:
                self._ray["images"].inc(failed, tags={**tags, "status": "error"})
            self._ray["stage_seconds"].observe(seconds, tags=tags)

    def llm_attempt(self, level: int, passed: bool, failed_checks: list[str]) -> None:
        outcome = "passed" if passed else "failed"
        self.llm_attempts[(level, outcome)] += 1
        for check in failed_checks:
            self.verify_failures[(level, check)] += 1
        if self._ray:
            self._ray["llm_attempts"].inc(1, tags={"level": str(level), "outcome": outcome})
            for check in failed_checks:
                self._ray["verify_failures"].inc(1, tags={"level": str(level), "check": check})

    def count_attempts(self, level: int, fields: MutableMapping[str, Any]) -> None:
        """Count (and remove) the attempts an image's LLM stages left in ``LLM_ATTEMPTS_FIELD``."""
        for attempts in fields.pop(LLM_ATTEMPTS_FIELD, {}).values():
            for failed in attempts:
                self.llm_attempt(level, not failed, sorted(set(failed)))

    def shards_planned(self, planned: dict[int, int]) -> None:
        """Shards this run has to do per level; with shards committed it makes ETA computable."""
        if self._ray:
            for level, count in planned.items():
                self._ray["shards_planned"].set(count, tags={"level": str(level)})

    def llm_counts_for(self, level: int) -> dict[str, dict[str, int]]:
        return {
            "llm_attempts": {o: n for (lvl, o), n in sorted(self.llm_attempts.items()) if lvl == level},
            "verify_failures": {c: n for (lvl, c), n in sorted(self.verify_failures.items()) if lvl == level},
        }

    def shard_committed(self, level: int) -> None:
        if self._ray:
            self._ray["shards_committed"].inc(1, tags={"level": str(level)})

    def shard_failed(self, level: int) -> None:
        if self._ray:
            self._ray["shard_failures"].inc(1, tags={"level": str(level)})

    def in_flight(self, level: int, count: int) -> None:
        if self._ray:
            self._ray["shards_in_flight"].set(count, tags={"level": str(level)})


def _ray_metrics() -> dict[str, Any]:
    try:
        from ray.util import metrics
    except ImportError:  # pragma: no cover - ray is a core dependency
        return {}
    return {
        "images": metrics.Counter(
            METRIC_NAMES["images"], "Images finished, by level, stage and status.",
            tag_keys=("level", "stage", "status"),
        ),
        "stage_seconds": metrics.Histogram(
            METRIC_NAMES["stage_seconds"], "Seconds per micro-batch and stage.",
            boundaries=_STAGE_BUCKETS, tag_keys=("level", "stage"),
        ),
        "shards_committed": metrics.Counter(
            METRIC_NAMES["shards_committed"], "Shards committed, by level.", tag_keys=("level",)
        ),
        "shards_in_flight": metrics.Gauge(
            METRIC_NAMES["shards_in_flight"], "Shards being processed, by level.", tag_keys=("level",)
        ),
        "shard_failures": metrics.Counter(
            METRIC_NAMES["shard_failures"], "Shard attempts that failed, by level.", tag_keys=("level",)
        ),
        "shards_planned": metrics.Gauge(
            METRIC_NAMES["shards_planned"], "Shards this run has to do, by level (set at plan time).",
            tag_keys=("level",),
        ),
        "llm_attempts": metrics.Counter(
            METRIC_NAMES["llm_attempts"], "LLM generate attempts, by level and outcome (passed/failed).",
            tag_keys=("level", "outcome"),
        ),
        "verify_failures": metrics.Counter(
            METRIC_NAMES["verify_failures"], "Failed verification checks of LLM answers, by level and check.",
            tag_keys=("level", "check"),
        ),
    }
