"""``OUT/glamm/train_log.jsonl``: one JSON line per optimiser step, written by rank 0.

Keys: ``step`` (1-based optimiser steps done), ``loss``, ``ce``, ``bce``, ``dice`` (means over the
step's micro-batches and ranks), ``lr`` (the step's learning rate), ``samples_per_s`` (global items
over the step's wall time, data loading included).

On resume the log is cut back to the checkpoint's step before the first new line, so after any
number of kills and reruns it reads exactly as an uninterrupted run's (``samples_per_s`` aside).
Locally lines are appended; object stores cannot append, so there the whole file is republished.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .storage import Location

logger = logging.getLogger(__name__)

LOG_DIR = "glamm"
LOG_NAME = "train_log.jsonl"
KEYS = ("step", "loss", "ce", "bce", "dice", "lr", "samples_per_s")


def _parse(raw: bytes | None) -> list[dict[str, Any]]:
    records = []
    for line in (raw or b"").decode(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def read_log(output: str) -> list[dict[str, Any]]:
    """The log's complete records, in step order (empty when there is none yet)."""
    return _parse(Location.of(output).child(LOG_DIR).read(LOG_NAME))


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=False, separators=(",", ":")) + "\n"


class TrainLog:
    """Rank 0's writer; starts by cutting the log back to ``resume_step``."""

    def __init__(self, output: str, resume_step: int) -> None:
        self.folder = Location.of(output).child(LOG_DIR)
        self.records = [r for r in read_log(output) if r["step"] <= resume_step]
        self._publish()

    @property
    def uri(self) -> str:
        return f"{self.folder.uri}/{LOG_NAME}"

    def _publish(self) -> None:
        self.folder.write_atomic(LOG_NAME, "".join(map(_line, self.records)).encode())

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.folder.local:
            with self.folder.fs.open(self.folder.path(LOG_NAME), "a") as handle:
                handle.write(_line(record))
        else:
            self._publish()
