"""The commit marker's record: counts from the table, timings from the runner, identity of the
commit. ``grand status``, the dashboard and ``grand plan`` read these fields (JSON):

- identity: ``level``, ``unit``, ``shard``, ``attempt`` (run attempt that committed), ``generation``
  (its claim), ``host``, ``config_hash``, ``models``, ``parquet_bytes``, ``parquet_sha256``;
- counts, from the table: ``images`` (= ``rows``), ``ok``, ``errors`` (= ``failed``),
  ``errors_by_stage`` (= ``failures_by_stage``, stage -> count);
- timing: ``started``, ``finished``, ``committed_at`` (unix seconds), ``duration_s``
  (= ``seconds``, compute time of the unit), ``images_per_s`` (= ``images_per_second``),
  ``stage_seconds`` (stage -> seconds spent in it for this unit), ``attempt_retries``.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Any

from grand_pipeline.units import split_unit_id

logger = logging.getLogger(__name__)


def marker_record(
    level: int,
    unit: str,
    attempt: int,
    stats: dict[str, Any],
    counts: dict[str, Any],
    parquet_bytes: int,
    parquet_sha256: str,
    generation: int = 0,
) -> dict[str, Any]:
    """Build the marker of one commit. The table's own counts win over the caller's stats."""
    differ = {k: stats[k] for k in counts if k in stats and stats[k] != counts[k]}
    if differ:
        # The table is the truth; a caller's differing count is a bug worth seeing, not storing.
        logger.warning("level %d unit %s: stats %r differ from the table; kept %r", level, unit, differ, counts)
    seconds = float(stats.get("seconds", 0.0) or 0.0)
    rate = counts["rows"] / seconds if seconds > 0 else 0.0
    now = time.time()
    record = {k: v for k, v in stats.items() if k not in counts}
    record.update(counts)
    record.update(
        level=level,
        unit=unit,
        shard=split_unit_id(unit)[0],
        attempt=attempt,
        generation=generation,
        host=stats.get("host") or platform.node(),
        seconds=seconds,
        images_per_second=rate,
        # img2dataset-style names, kept next to the older ones that `status` already reads.
        images=counts["rows"],
        errors=counts["failed"],
        errors_by_stage=dict(counts["failures_by_stage"]),
        duration_s=seconds,
        images_per_s=rate,
        started=float(stats.get("started") or now - seconds),
        finished=float(stats.get("finished") or now),
        stage_seconds={k: float(v) for k, v in (stats.get("stage_seconds") or {}).items()},
        models=stats.get("models"),
        config_hash=stats.get("config_hash"),
        parquet_bytes=parquet_bytes,
        parquet_sha256=parquet_sha256,
        committed_at=now,
    )
    return record
