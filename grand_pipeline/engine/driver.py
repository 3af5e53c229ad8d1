"""The driver: decides which (level, unit) pairs to run, streams them through the executor with
bounded in-flight work, commits each result, and retries failed units a bounded number of times.

Shards are split into sub-shard units (:mod:`grand_pipeline.units`). A shard's index is read from
the output when a Level-1 run stored it before; otherwise it is computed (a header-only pass)
a few shards ahead in threads while the pools work, stored, and its units are queued then.

Level L of a unit becomes ready once level L-1 of that unit is committed, either before this run
or during it; so with ``--levels 1-4`` units flow through the pools without a barrier.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from grand_pipeline.commit import clear_staging, commit, commit_staged
from grand_pipeline.config import ConfigError, GrandConfig
from grand_pipeline.engine.executors import EXECUTORS, Outcome
from grand_pipeline.locations import check_no_file_in_the_way, check_separate, check_writable
from grand_pipeline.models.hub import model_specs
from grand_pipeline.models.weights import check_sources
from grand_pipeline.run_meta import RunMeta
from grand_pipeline.sources import index_shard, list_shards
from grand_pipeline.sources.base import ShardRef
from grand_pipeline.store import Store, StoreError
from grand_pipeline.unit_writer import StagedUnit
from grand_pipeline.units import ShardIndex, UnitRef, split_unit_id

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

    def __post_init__(self) -> None:
        # A level range that runs backwards or a limit below 1 is a typo, not an empty run; and
        # shards[:-1] would silently drop the last shard.
        if not self.levels or any(isinstance(lv, bool) or lv < 1 for lv in self.levels):
            raise ConfigError(f"levels {self.levels}: expected one or more levels >= 1, e.g. --levels 1-4")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit}: expected a number of shards >= 1")


@dataclass
class RunSummary:
    planned: dict[int, int] = field(default_factory=dict)
    committed: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)
    blocked: dict[int, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    fenced: dict[int, int] = field(default_factory=dict)
    """(level, unit)s finished here but committed by another attempt of the same run."""
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


class UnitPlanner:
    """Shards -> units. Stored indexes are used as they are (their unit size must match the
    config); missing ones are computed ``LOOKAHEAD`` shards ahead in threads, then stored."""

    #: Shards indexed ahead: enough to keep Level 1 fed, few enough not to read tars for nothing.
    LOOKAHEAD = 2

    def __init__(self, store: Store, unit_images: int) -> None:
        self.store = store
        self.meta = RunMeta(store)
        self.unit_images = unit_images
        self.todo: deque[ShardRef] = deque()
        self._futures: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def stored(self, ref: ShardRef) -> ShardIndex | None:
        index = self.meta.read_index(ref.shard_id)
        if index is not None and index.unit_images != self.unit_images:
            raise StoreError(
                f"shard {ref.shard_id} of {self.store.uri} is split into units of {index.unit_images} images; "
                f"run with --set engine.unit_images={index.unit_images}, or write to a new --output"
            )
        return index

    def _start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.LOOKAHEAD, thread_name_prefix="grand-index")
        for ref in list(self.todo)[: self.LOOKAHEAD]:
            if ref.shard_id not in self._futures:
                self._futures[ref.shard_id] = self._pool.submit(index_shard, ref)

    def next(self) -> tuple[ShardRef, ShardIndex]:
        """Index the next shard of ``todo`` (its read was started ahead), store and return it."""
        self._start()
        ref = self.todo.popleft()
        ids, offsets = self._futures.pop(ref.shard_id).result()
        self._start()
        index = ShardIndex(ref.shard_id, self.unit_images, tuple(ids), None if offsets is None else tuple(offsets))
        self.meta.write_index(index)
        logger.info("shard %s: %d images in %d unit(s)", ref.shard_id, len(ids), index.num_units)
        return ref, index

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _expand(
    index: ShardIndex, ref: ShardRef, levels: list[int], committed: dict[int, set[str]],
    ready: deque, summary: RunSummary,
) -> dict[int, int]:
    """Queue each unit's first requested level that is not committed; count planned work."""
    planned: dict[int, int] = {}
    for unit in index.units(ref):
        uid = unit.unit_id
        for lvl in levels:
            if uid in committed.get(lvl, set()):
                summary.skipped[lvl] = summary.skipped.get(lvl, 0) + 1
            else:
                planned[lvl] = planned.get(lvl, 0) + 1
        for lvl in levels:
            if uid in committed.get(lvl, set()):
                continue
            if lvl == 1 or uid in committed.get(lvl - 1, set()):
                ready.append((lvl, unit))
            else:
                summary.blocked.setdefault(lvl, []).append(uid)
            break
    for lvl, n in planned.items():
        summary.planned[lvl] = summary.planned.get(lvl, 0) + n
    return planned


def plan(
    store: Store, shards: list[ShardRef], levels: list[int], planner: UnitPlanner
) -> tuple[deque, RunSummary]:
    """Initial ready queue from the stored indexes; shards without one go to ``planner.todo``
    when Level 1 is requested (they are indexed lazily), else they are blocked."""
    summary = RunSummary(planned={lvl: 0 for lvl in levels})
    ready: deque[tuple[int, UnitRef]] = deque()
    committed = {lvl: set(store.committed(lvl)) for lvl in set(levels) | {min(levels) - 1} if lvl >= 1}
    for ref in shards:
        index = planner.stored(ref)
        if index is not None:
            _expand(index, ref, levels, committed, ready, summary)
        elif 1 in levels:
            planner.todo.append(ref)
        else:
            summary.blocked.setdefault(min(levels), []).append(ref.shard_id)
    return ready, summary


def _require_previous_level(store: Store, shards: list[ShardRef], levels: list[int]) -> None:
    """NothingToRun unless Level 1 is requested or some selected shard has level N-1 committed."""
    first = min(levels)
    if first == 1:
        return
    selected = {ref.shard_id for ref in shards}
    if not any(split_unit_id(unit)[0] in selected for unit in store.committed(first - 1)):
        raise NothingToRun(
            f"level {first} needs level {first - 1} committed, and no selected shard has it; "
            f"run `grand run --level {first - 1}` first"
        )


def _overwrite(store: Store, shards: list[ShardRef], levels: list[int], unit_images: int) -> None:
    """``--mode overwrite``: uncommit the requested levels of the selected shards."""
    meta = RunMeta(store)
    for ref in shards:
        for lvl in levels:
            store.clear_shard(lvl, ref.shard_id)
        old = meta.read_index(ref.shard_id) if 1 in levels else None
        if old is not None:
            if old.unit_images != unit_images:
                # A new split renames every unit: rows of later levels cut the old way would
                # pass for the new units of the same ids. They go too.
                for lvl in store.levels_present():
                    store.clear_shard(lvl, ref.shard_id)
            meta.drop_index(ref.shard_id)  # a new unit size takes effect from Level 1


def run(
    cfg: GrandConfig,
    request: RunRequest,
    executor: str | None = None,
    on_event: Callable[[Event], None] | None = None,
    log_level: str = "WARNING",
) -> RunSummary:
    """Run ``request``; ``log_level`` is the logging level of the executor's workers (Ray actors
    configure their own logging)."""
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    # Everything a mistaken command can get wrong is checked before the first write: a refused
    # run leaves the output (and so `grand status`) exactly as it was.
    check_separate(request.input_uri, request.output_uri)
    store = Store(request.output_uri)
    check_no_file_in_the_way(store)
    shards = list_shards(request.input_uri, request.shards_glob)
    if request.limit is not None:
        shards = shards[: request.limit]
    _require_previous_level(store, shards, request.levels)
    if request.mode == "resume":
        # (Overwrite re-plans after clearing: a stored index of another unit size is dropped then.)
        planner = UnitPlanner(store, cfg.engine.unit_images)
        ready, summary = plan(store, shards, request.levels, planner)  # reads only
        if not ready and not planner.todo:
            emit({"type": "plan", "planned": dict(summary.planned), "skipped": dict(summary.skipped)})
            summary.seconds = time.perf_counter() - started
            return summary  # nothing runs, so nothing is recorded (not even the shard list)
    check_writable(store)
    # Every configured model must be cached or fetchable before any actor starts: an offline
    # cluster fails here in seconds, naming the model, instead of in every actor's retry loop.
    check_sources([(key, spec) for key, _, spec in model_specs(cfg.models)])

    # Committed to the plan: from here on the run writes to OUT.
    meta = RunMeta(store)
    meta.record_shards(None, [ref.shard_id for ref in shards])
    if request.mode == "overwrite":
        _overwrite(store, shards, request.levels, cfg.engine.unit_images)
        planner = UnitPlanner(store, cfg.engine.unit_images)
        ready, summary = plan(store, shards, request.levels, planner)
    for lvl in request.levels:
        clear_staging(store, lvl)
    emit({"type": "plan", "planned": dict(summary.planned), "skipped": dict(summary.skipped)})
    if not ready and not planner.todo:
        summary.seconds = time.perf_counter() - started
        return summary

    attempt = meta.next_attempt()
    meta.write_run_meta(cfg.to_yaml(), _run_info(cfg, request, attempt, {}))
    exec_name = executor or cfg.engine.executor
    # Actors stream each unit into a staging file of this attempt; the driver only publishes it.
    backend = EXECUTORS.get(exec_name)(cfg, request.output_uri, attempt, log_level)
    retries: dict[tuple[int, str], int] = {}
    models: dict[str, Any] = {}
    waiting: dict[int, int] = {lvl: 0 for lvl in request.levels}
    try:
        while ready or planner.todo or any(waiting.values()):
            _index_more(planner, backend, ready, waiting, request.levels, summary, emit)
            backend.metrics.shards_planned(summary.planned)  # ETA = (planned - committed) / rate
            ready = _fill(backend, ready, waiting)
            for outcome in backend.wait():
                waiting[outcome.level] -= 1
                follow = _finish(cfg, store, outcome, attempt, retries, summary, emit, models, backend.metrics)
                if follow is not None:
                    ready.append(follow)
                elif (
                    outcome.level + 1 in request.levels
                    and store.marker(outcome.level, outcome.unit.unit_id) is not None
                ):
                    ready.append((outcome.level + 1, outcome.unit))
            _release_drained(backend, request.levels, ready, waiting, bool(planner.todo))
    finally:
        planner.close()
        backend.shutdown()
    meta.write_run_meta(cfg.to_yaml(), _run_info(cfg, request, attempt, models))
    summary.seconds = time.perf_counter() - started
    return summary


def _index_more(planner, backend, ready: deque, waiting: dict[int, int], levels, summary, emit) -> None:
    """Queue the units of the next unindexed shard while Level 1 has room and nothing queued."""
    while planner.todo and waiting[1] + sum(1 for lvl, _ in ready if lvl == 1) < backend.capacity(1):
        ref, index = planner.next()
        added = _expand(index, ref, levels, {}, ready, summary)
        emit({"type": "units", "shard": ref.shard_id, "planned": added})


def _release_drained(backend, levels: list[int], ready: deque, waiting: dict[int, int], more: bool) -> None:
    """Give back the actors of every level that can receive no more work in this run.

    Work only flows upwards, so a level is drained once it and every level below it have nothing
    queued or in flight (and, for Level 1, no shard left to index). Releasing matters where pools
    cannot all fit at once (one small machine running levels 1-4): the next level's actors get the
    freed CPUs/GPUs instead of waiting forever.
    """
    queued = {level for level, _ in ready}
    for level in sorted(levels):
        if level in queued or waiting[level] or (level == 1 and more):
            return
        backend.release(level)


def _fill(backend, ready: deque, waiting: dict[int, int]) -> deque:
    """Submit ready work while each level's pool has room; the rest waits (backpressure)."""
    held: deque = deque()
    while ready:
        level, unit = ready.popleft()
        if waiting[level] < backend.capacity(level):
            backend.submit(level, unit)
            waiting[level] += 1
        else:
            held.append((level, unit))
    return held


def _finish(cfg, store, outcome: Outcome, attempt, retries, summary, emit, models, metrics):
    """Commit a finished unit, or return it for a retry while the retry budget lasts."""
    uid = outcome.unit.unit_id
    key = (outcome.level, uid)
    committed = False
    if outcome.result is not None:
        stats = dict(outcome.stats)
        stats["attempt_retries"] = retries.get(key, 0)
        try:
            if isinstance(outcome.result, StagedUnit):
                committed = commit_staged(store, outcome.result, stats, attempt)
            else:
                committed = commit(store, outcome.level, uid, outcome.result, stats, attempt)
        except OSError as exc:
            # A failed upload (network, throttling, a full disk) costs one retry of the unit; the
            # staging it left is removed by the next run's clear_staging.
            outcome = Outcome(outcome.level, outcome.unit, error=f"commit failed: {exc!r}")
    if outcome.result is None:
        retries[key] = retries.get(key, 0) + 1
        emit({"type": "unit_error", "level": outcome.level, "unit": uid,
              "error": outcome.error, "retry": retries[key]})
        metrics.shard_failed(outcome.level)
        if retries[key] <= cfg.engine.max_shard_retries:
            logger.warning("level %d unit %s failed (%s); retry %d", outcome.level, uid, outcome.error, retries[key])
            return (outcome.level, outcome.unit)
        summary.failed[f"level{outcome.level}/{uid}"] = outcome.error or "failed"
        return None
    models.update(stats.get("models", {}))
    marker = store.marker(outcome.level, uid) or {}
    if committed:
        metrics.shard_committed(outcome.level)
    else:
        summary.fenced[outcome.level] = summary.fenced.get(outcome.level, 0) + 1
        logger.warning("level %d unit %s was committed by attempt %s, not by this attempt %d",
                       outcome.level, uid, marker.get("attempt"), attempt)
    summary.committed[outcome.level] = summary.committed.get(outcome.level, 0) + int(committed)
    emit({"type": "committed", "level": outcome.level, "unit": uid,
          "rows": marker.get("rows"), "ok": marker.get("ok"),
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
