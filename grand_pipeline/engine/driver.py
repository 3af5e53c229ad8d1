"""The driver: decides which (level, shard) pairs to run, streams them through the executor with
bounded in-flight work, commits each result, and retries failed shards a bounded number of times.

Level L of a shard becomes ready once level L-1 of that shard is committed, either before this
run or during it; so with ``--levels 1-4`` shards flow through the pools without a barrier.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from grand_pipeline.config import GrandConfig
from grand_pipeline.engine.executors import EXECUTORS, Outcome
from grand_pipeline.models.weights import check_sources
from grand_pipeline.sources import list_shards
from grand_pipeline.sources.base import ShardRef
from grand_pipeline.store import Store

logger = logging.getLogger(__name__)

Event = dict[str, Any]


class NothingToRun(RuntimeError):
    """The prerequisites of the requested level are not committed for any shard."""


@dataclass
class RunRequest:
    input_uri: str
    output_uri: str
    levels: list[int]
    mode: Literal["resume", "overwrite"] = "resume"
    shards_glob: str | None = None
    limit: int | None = None


@dataclass
class RunSummary:
    planned: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)
    blocked: dict[int, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    fenced: dict[int, int] = field(default_factory=dict)
    """(level, shard)s finished here but committed by another attempt of the same run."""
    seconds: float = 0.0


def code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("grand")
    except PackageNotFoundError:
        return "unknown"


def model_specs(models: Any) -> list[tuple[str, Any]]:
    """(hub key, ModelSpec) of every configured model: ``tagger``, ``detectors.owlv2``, ..."""
    out = [(f"detectors.{name}", spec) for name, spec in models.detectors.items()]
    # The roles are ModelsConfig's fields, so a role added there is checked without a list here.
    for f in fields(models):
        spec = getattr(models, f.name)
        if f.name != "detectors" and spec is not None:
            out.append((f.name, spec))
    return out


def plan(store: Store, shards: list[ShardRef], levels: list[int]) -> tuple[deque, RunSummary]:
    """Initial ready queue: for each shard, its first requested level that is not yet committed."""
    summary = RunSummary(planned={lvl: 0 for lvl in levels})
    ready: deque[tuple[int, ShardRef]] = deque()
    committed = {lvl: set(store.committed(lvl)) for lvl in set(levels) | {min(levels) - 1} if lvl >= 1}
    for ref in shards:
        for lvl in levels:
            if ref.shard_id in committed[lvl]:
                summary.skipped[lvl] = summary.skipped.get(lvl, 0) + 1
                continue
            summary.planned[lvl] += 1
        for lvl in levels:
            if ref.shard_id in committed[lvl]:
                continue
            if lvl == 1 or ref.shard_id in committed.get(lvl - 1, set()):
                ready.append((lvl, ref))
            else:
                summary.blocked.setdefault(lvl, []).append(ref.shard_id)
            break
    return ready, summary


def run(
    cfg: GrandConfig,
    request: RunRequest,
    executor: str | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> RunSummary:
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    store = Store(request.output_uri)
    shards = list_shards(request.input_uri, request.shards_glob)
    if request.limit is not None:
        shards = shards[: request.limit]
    store.record_shards(None, [ref.shard_id for ref in shards])
    if request.mode == "overwrite":
        for lvl in request.levels:
            for ref in shards:
                store.clear(lvl, ref.shard_id)
    for lvl in request.levels:
        store.clear_staging(lvl)

    ready, summary = plan(store, shards, request.levels)
    first = min(request.levels)
    if not ready and summary.blocked.get(first):
        raise NothingToRun(
            f"level {first} needs level {first - 1} committed, and no selected shard has it; "
            f"run `grand run --level {first - 1}` first"
        )
    if ready:
        # Every configured model must be cached or fetchable before any actor starts: an offline
        # cluster fails here in seconds, naming the model, instead of in every actor's retry loop.
        check_sources(model_specs(cfg.models))
    emit({"type": "plan", "planned": dict(summary.planned), "skipped": dict(summary.skipped)})
    if not ready:
        summary.seconds = time.perf_counter() - started
        return summary

    attempt = store.next_attempt()
    store.write_run_meta(cfg.to_yaml(), _run_info(cfg, request, attempt, {}))
    exec_name = executor or cfg.engine.executor
    backend = EXECUTORS.get(exec_name)(cfg, request.output_uri)
    backend.metrics.shards_planned(summary.planned)  # ETA = (planned - committed) / commit rate
    retries: dict[tuple[int, str], int] = {}
    models: dict[str, Any] = {}
    waiting: dict[int, int] = {lvl: 0 for lvl in request.levels}
    try:
        while ready or any(waiting.values()):
            ready = _fill(backend, ready, waiting)
            for outcome in backend.wait():
                waiting[outcome.level] -= 1
                follow = _finish(cfg, store, outcome, attempt, retries, summary, emit, models, backend.metrics)
                if follow is not None:
                    ready.append(follow)
                elif (
                    outcome.level + 1 in request.levels
                    and store.marker(outcome.level, outcome.ref.shard_id) is not None
                ):
                    ready.append((outcome.level + 1, outcome.ref))
            _release_drained(backend, request.levels, ready, waiting)
    finally:
        backend.shutdown()
    store.write_run_meta(cfg.to_yaml(), _run_info(cfg, request, attempt, models))
    summary.seconds = time.perf_counter() - started
    return summary


def _release_drained(backend, levels: list[int], ready: deque, waiting: dict[int, int]) -> None:
    """Give back the actors of every level that can receive no more work in this run.

    Work only flows upwards, so a level is drained once it and every level below it have nothing
    queued or in flight. Releasing matters where pools cannot all fit at once (one small machine
    running levels 1-4): the next level's actors get the freed CPUs/GPUs instead of waiting forever.
    """
    queued = {level for level, _ in ready}
    for level in sorted(levels):
        if level in queued or waiting[level]:
            return
        backend.release(level)


def _fill(backend, ready: deque, waiting: dict[int, int]) -> deque:
    """Submit ready work while each level's pool has room; the rest waits (backpressure)."""
    held: deque = deque()
    while ready:
        level, ref = ready.popleft()
        if waiting[level] < backend.capacity(level):
            backend.submit(level, ref)
            waiting[level] += 1
        else:
            held.append((level, ref))
    return held


def _finish(cfg, store, outcome: Outcome, attempt, retries, summary, emit, models, metrics):
    """Commit a finished shard, or return it for a retry while the retry budget lasts."""
    key = (outcome.level, outcome.ref.shard_id)
    committed = False
    if outcome.table is not None:
        stats = dict(outcome.stats)
        stats["attempt_retries"] = retries.get(key, 0)
        try:
            committed = store.commit(outcome.level, outcome.ref.shard_id, outcome.table, stats, attempt)
        except OSError as exc:
            # A failed upload (network, throttling, a full disk) costs one retry of the shard; the
            # staging it left is removed by the next run's clear_staging.
            outcome = Outcome(outcome.level, outcome.ref, error=f"commit failed: {exc!r}")
    if outcome.table is None:
        retries[key] = retries.get(key, 0) + 1
        emit({"type": "shard_error", "level": outcome.level, "shard": outcome.ref.shard_id,
              "error": outcome.error, "retry": retries[key]})
        metrics.shard_failed(outcome.level)
        if retries[key] <= cfg.engine.max_shard_retries:
            logger.warning("level %d shard %s failed (%s); retry %d",
                           outcome.level, outcome.ref.shard_id, outcome.error, retries[key])
            return (outcome.level, outcome.ref)
        summary.failed[f"level{outcome.level}/{outcome.ref.shard_id}"] = outcome.error or "failed"
        return None
    models.update(stats.get("models", {}))
    marker = store.marker(outcome.level, outcome.ref.shard_id) or {}
    if committed:
        metrics.shard_committed(outcome.level)
    else:
        summary.fenced[outcome.level] = summary.fenced.get(outcome.level, 0) + 1
        logger.warning("level %d shard %s was committed by attempt %s, not by this attempt %d",
                       outcome.level, outcome.ref.shard_id, marker.get("attempt"), attempt)
    summary.committed[outcome.level] = summary.committed.get(outcome.level, 0) + int(committed)
    emit({"type": "committed", "level": outcome.level, "shard": outcome.ref.shard_id,
          "rows": marker.get("rows", outcome.table.num_rows), "ok": marker.get("ok"),
          "failed": marker.get("failed"), "seconds": stats.get("seconds"),
          "attempt": marker.get("attempt"), "by_this_attempt": committed})
    return None


def _run_info(cfg: GrandConfig, request: RunRequest, attempt: int, models: dict) -> dict[str, Any]:
    return {
        "config_hash": cfg.content_hash(),
        "profile": cfg.profile,
        "code_version": code_version(),
        "python": platform.python_version(),
        "input": request.input_uri,
        "levels": request.levels,
        "attempt": attempt,
        "models": models,
        "model_specs": cfg.to_dict()["models"],
    }
