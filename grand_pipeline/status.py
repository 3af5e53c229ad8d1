"""A run's progress, read from the store alone: ``grand status``, ``grand run``'s closing table
and ``grand dashboard`` all show these numbers.

:func:`run_status` counts committed units per level (from the commit markers and the unit counts
in ``_run/shards.json``); :func:`level_extras` adds what needs the markers' timestamps: wall-clock
throughput, the ETA and the images/s time series. Nothing here talks to Ray, so it works during a
run, after it, and on a laptop pointed at an ``s3://`` output.
"""

from __future__ import annotations

import math
from typing import Any

from grand_pipeline.run_meta import RunMeta
from grand_pipeline.store import Store
from grand_pipeline.units import split_unit_id

TIMELINE_BINS = 40
#: Committed units whose pace the ETA extrapolates.
ETA_WINDOW = 50


def run_status(store: Store, levels: list[int] | None = None) -> dict:
    """JSON-ready progress summary. Matrix keys are level numbers as strings (JSON keys).

    Progress is counted in units (the unit of commit); a shard whose index is not stored yet
    counts as one unit. ``matrix`` is per shard: committed (every unit), partial or missing.
    """
    meta = RunMeta(store)
    known = meta.known_shards()
    unit_counts = meta.unit_counts()
    wanted = sorted(set(levels or []) | set(store.levels_present()))
    summaries, per_shard = [], {}
    for level in wanted:
        markers = store.committed(level)
        if not markers and level not in (levels or []):
            continue
        done: dict[str, int] = {}
        for unit in markers:
            shard = split_unit_id(unit)[0]
            done[shard] = done.get(shard, 0) + 1
        shards = set(meta.known_shards(level)) | set(done)
        rows = sum(m["rows"] for m in markers.values())
        seconds = sum(float(m.get("seconds") or 0.0) for m in markers.values())
        by_stage: dict[str, int] = {}
        for m in markers.values():
            for stage, n in (m.get("failures_by_stage") or {}).items():
                by_stage[stage] = by_stage.get(stage, 0) + int(n)
        totals = {shard: max(unit_counts.get(shard, 1), done.get(shard, 0)) for shard in shards}
        summaries.append(
            {
                "level": level,
                "units_committed": len(markers),
                "units_total": sum(totals.values()),
                "shards_committed": sum(1 for s in shards if done.get(s, 0) >= totals[s]),
                "shards_total": len(shards),
                "images_ok": sum(int(m.get("ok", 0)) for m in markers.values()),
                "images_failed": sum(int(m.get("failed", 0)) for m in markers.values()),
                "failures_by_stage": dict(sorted(by_stage.items())),
                "seconds": seconds,
                "images_per_second": rows / seconds if seconds > 0 else 0.0,
            }
        )
        per_shard[level] = (done, totals)
    all_shards = sorted(set(known).union(*(set(t) for _, t in per_shard.values())))
    matrix = {
        shard: {str(lv): _shard_state(done.get(shard, 0), totals.get(shard, 1)) for lv, (done, totals) in per_shard.items()}
        for shard in all_shards
    }
    return {"shards": known, "levels": summaries, "matrix": matrix}


def _shard_state(done: int, total: int) -> str:
    return "committed" if done >= total else ("partial" if done else "missing")


def _timestamp(value: Any) -> float | None:
    """Epoch seconds from a marker field (markers write unix seconds); None when absent or bad."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def shard_span(marker: dict) -> tuple[float, float] | None:
    """(started, finished) of one committed unit; None for a marker without both times."""
    started, finished = _timestamp(marker.get("started")), _timestamp(marker.get("finished"))
    if started is None or finished is None:
        return None
    return min(started, finished), finished


def timeline(markers: dict[str, dict], bins: int = TIMELINE_BINS) -> list[dict[str, float]]:
    """Images/s over time: each unit's rows spread evenly over its (started, finished) span."""
    spans = [(span, int(m.get("rows", 0))) for m in markers.values() if (span := shard_span(m))]
    if not spans:
        return []
    t0 = min(start for (start, _), _ in spans)
    t1 = max(end for (_, end), _ in spans)
    width = max((t1 - t0) / bins, 1e-6)
    totals = [0.0] * bins
    for (start, end), rows in spans:
        if end - start <= 0:
            totals[min(int((end - t0) / width), bins - 1)] += rows
            continue
        for i in range(bins):
            lo, hi = t0 + i * width, t0 + (i + 1) * width
            overlap = min(hi, end) - max(lo, start)
            if overlap > 0:
                totals[i] += rows * overlap / (end - start)
    return [{"t": round(t0 + (i + 0.5) * width, 3), "images_per_second": round(total / width, 4)}
            for i, total in enumerate(totals)]


def format_eta(seconds: float | None) -> str:
    """``done``, ``unknown`` (nothing timed yet) or ``1h 5m`` / ``4m 10s`` / ``12s``."""
    if seconds is None:
        return "unknown"
    if seconds <= 0:
        return "done"
    whole = round(seconds)
    hours, minutes, rest = whole // 3600, whole % 3600 // 60, whole % 60
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {rest}s" if minutes else f"{rest}s"


def level_extras(entry: dict, markers: dict[str, dict], now: float) -> dict[str, Any]:
    """Wall-clock throughput, ETA, LLM counters and the time series of one level."""
    spans = [span for m in markers.values() if (span := shard_span(m))]
    # Units are what commits: the ETA is remaining units at the pace of the latest units.
    remaining = max(int(entry["units_total"]) - int(entry["units_committed"]), 0)
    extras: dict[str, Any] = {"units_remaining": remaining, "eta_seconds": 0.0 if remaining == 0 else None,
                              "wall_images_per_second": None, "first_started": None, "last_finished": None}
    if spans:
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        extras.update(first_started=start, last_finished=end)
        wall = end - start
        if wall > 0:
            timed_rows = sum(int(m.get("rows", 0)) for m in markers.values() if shard_span(m))
            extras["wall_images_per_second"] = timed_rows / wall
        if remaining and end > start:
            # The pace of the latest units only: a run resumed a day later must not count the
            # idle day. Whole-run pace (all workers together), not one actor's.
            recent = sorted(spans, key=lambda span: span[1])[-ETA_WINDOW:]
            window = end - min(s for s, _ in recent)
            extras["eta_seconds"] = remaining * window / len(recent) if window > 0 else None
    llm: dict[str, int] = {}
    checks: dict[str, int] = {}
    for m in markers.values():
        for key, n in (m.get("llm_attempts") or {}).items():
            llm[key] = llm.get(key, 0) + int(n)
        for key, n in (m.get("verify_failures") or {}).items():
            checks[key] = checks.get(key, 0) + int(n)
    extras.update(llm_attempts=dict(sorted(llm.items())), verify_failures=dict(sorted(checks.items())),
                  timeline=timeline(markers), age_seconds=(now - extras["last_finished"])
                  if extras["last_finished"] is not None else None)
    return extras
