"""Pipeline metrics through ``ray.util.metrics`` (exported by Ray as ``ray_grand_*``).

Tags are level/stage/status only: per-image or per-shard labels would explode cardinality on a
1,000-shard run. Outside a Ray process the same calls only feed the in-process totals, which the
local executor and the shard markers use.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

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

#: Verification problems are free text ("has 9 sentences; it needs 4 to 6"); as metric tags they
#: are folded into these few check names so that the series count stays fixed. First match wins.
VERIFY_CHECKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("generation_error", re.compile(r"^generation failed")),
    ("empty", re.compile(r"^the answer was empty")),
    ("cut_off", re.compile(r"cut off")),
    ("ending", re.compile(r"does not end with")),
    ("sentences", re.compile(r"^has \d+ sentence")),
    ("paragraphs", re.compile(r"more than one paragraph")),
    ("wording", re.compile(r"talks about the input|forbidden word")),
    ("objects", re.compile(r"^mentions '|objects could not be checked")),
)

# The metrics object and level of the shard being processed in this thread. Levels record LLM
# attempts deep inside pure loops that know neither; the runner sets this around a shard.
_ACTIVE: ContextVar[tuple[PipelineMetrics, int] | None] = ContextVar("grand_metrics", default=None)


def issue_check(issue: str) -> str:
    """The check name a verification problem belongs to (``other`` when none matches)."""
    for check, pattern in VERIFY_CHECKS:
        if pattern.search(issue):
            return check
    return "other"


def record_llm_attempt(passed: bool, issues: list[str]) -> None:
    """Count one LLM attempt (and its failed checks) against the active level, if any."""
    active = _ACTIVE.get()
    if active is not None:
        metrics, level = active
        metrics.llm_attempt(level, passed, sorted({issue_check(i) for i in issues}))

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

    @contextmanager
    def active(self, level: int) -> Iterator[None]:
        """Make :func:`record_llm_attempt` count against ``level`` in this block."""
        token = _ACTIVE.set((self, level))
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def llm_attempt(self, level: int, passed: bool, failed_checks: list[str]) -> None:
        outcome = "passed" if passed else "failed"
        self.llm_attempts[(level, outcome)] += 1
        for check in failed_checks:
            self.verify_failures[(level, check)] += 1
        if self._ray:
            self._ray["llm_attempts"].inc(1, tags={"level": str(level), "outcome": outcome})
            for check in failed_checks:
                self._ray["verify_failures"].inc(1, tags={"level": str(level), "check": check})

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

    def stage_seconds_for(self, level: int) -> dict[str, float]:
        return {stage: round(s, 4) for (lvl, stage), s in self.stage_seconds.items() if lvl == level}


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
