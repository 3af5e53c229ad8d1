"""Fencing between concurrent attempts of one run: atomic attempt numbers and commit claims.

A RayJob retry can start a second driver while the first still runs, so two attempts may finish
the same (level, shard) at once. Two rules keep the commit exactly-once:

* **Attempt numbers are taken atomically**: attempt ``n`` is the exclusive creation of
  ``_run/attempts/{n:06d}.json`` (which also records who holds it: host, pid, process start time).
* **Only the holder of a claim publishes**: before touching the final names of a (level, shard),
  an attempt creates ``level{N}/_claims/{shard}/{gen:06d}.json`` exclusively, one generation above
  the highest one present. Of two attempts racing for the same generation exactly one creates it;
  the other sees the winner's claim, waits for its marker, and discards its own staging.

A kill -9 can leave a claim without a marker. It never blocks later attempts: a claim whose
process is gone (same host: pid not alive or reused; another host: claim older than the lease)
is taken over by creating the next generation, again exclusively, so two attempts cannot both
take over. Claims are never deleted by the commit path, so the claim directory doubles as the
log of who committed what. Kill -9 at each step of a commit leaves:

* during staging, or before the claim: staging debris of a dead attempt (``clear_staging``);
* after the claim, before or during publishing: a dead claim (taken over) and maybe a Parquet
  without marker (not committed, overwritten by the taker);
* after the marker: a committed shard; its dead claim fences nobody, the marker does;
* while creating a claim or an attempt: only a ``*.tmp`` file, which no reader looks at.

Exclusive creation: locally a complete temporary file is hard-linked to the name (``link``
fails when the name exists, and a reader never sees a half-written claim). On S3 it is a
conditional ``PutObject`` with ``If-None-Match: *`` (s3fs ``mode="create"``); AWS S3, MinIO
and moto honour it. Other fsspec backends fall back to check-then-write, which is not atomic:
there, concurrent attempts of one run are not fenced (a warning says so once).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

CLAIMS = "_claims"
ATTEMPTS = "attempts"
#: A claim of another host older than this is presumed dead. A claim lives only for the
#: seconds a commit takes (publish Parquet, write marker), so ten minutes is very generous.
DEFAULT_LEASE_S = 600.0
_warned: set[str] = set()


def process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), to detect pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" ending the command name: state is field 3, starttime field 22.
    if fields[0] == b"Z":
        return "zombie"
    return fields[19].decode()


def holder() -> dict[str, Any]:
    """Who this process is, as written into attempt and claim records."""
    pid = os.getpid()
    return {"host": platform.node(), "pid": pid, "pid_start": process_start(pid)}


def is_live(record: dict[str, Any], lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Whether the process that wrote ``record`` may still be running (conservative)."""
    if record.get("host") != platform.node():
        return time.time() < float(record.get("claimed_at") or record.get("started") or 0) + lease_s
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = process_start(pid)
    if start == "zombie":
        return False
    return record.get("pid_start") is None or start is None or start == record.get("pid_start")


def create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists. True when this call created it."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    name = type(fs).__name__
    if name not in _warned:
        _warned.add(name)
        logger.warning("%s has no conditional create: concurrent attempts are not fenced", name)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return True


def _read_json(fs: Any, path: str) -> dict | None:
    try:
        data = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _numbered(fs: Any, directory: str) -> list[int]:
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def take_attempt(fs: Any, run_dir: str) -> int:
    """The next attempt number, unique among all writers of this output (exclusive create)."""
    directory = posixpath.join(run_dir, ATTEMPTS)
    number = max([0, *_numbered(fs, directory)]) + 1
    record = holder()
    while True:
        record.update(attempt=number, started=time.time())
        if create_exclusive(fs, posixpath.join(directory, f"{number:06d}.json"), json.dumps(record).encode()):
            return number
        number += 1  # another driver took it a moment ago


def attempt_record(fs: Any, run_dir: str, attempt: int) -> dict | None:
    return _read_json(fs, posixpath.join(run_dir, ATTEMPTS, f"{attempt:06d}.json"))


@dataclass
class ClaimResult:
    """Outcome of :func:`acquire`: ``own`` (publish now), ``committed`` (someone's marker is
    valid: discard), or ``busy`` (a live attempt holds the claim and did not finish in time)."""

    state: str
    generation: int
    record: dict | None


def claim_dir(level_dir: str, shard: str) -> str:
    return posixpath.join(level_dir, CLAIMS, shard)


def acquire(
    fs: Any,
    directory: str,
    attempt: int,
    is_committed: Any,
    wait_s: float = 120.0,
    lease_s: float = DEFAULT_LEASE_S,
    replace: bool = False,
) -> ClaimResult:
    """Claim the right to publish one (level, shard); see the module docstring.

    ``is_committed()`` tells whether a valid marker exists; with ``replace`` (retry-failed
    rewriting a committed shard) a valid marker does not end the attempt.
    """
    deadline = time.monotonic() + wait_s
    me = {**holder(), "attempt": attempt}
    while True:
        generations = _numbered(fs, directory)
        top = generations[-1] if generations else 0
        record = _read_json(fs, posixpath.join(directory, f"{top:06d}.json")) if top else None
        mine = record is not None and record.get("attempt") == attempt and record.get("pid") == me["pid"]
        if mine:
            return ClaimResult("own", top, record)  # a retry of our own commit
        if not replace and is_committed():
            return ClaimResult("committed", top, record)
        # A claim of this very process is finished: commits run one at a time in a process.
        ours = record is not None and record.get("pid") == me["pid"] and record.get("host") == me["host"]
        if record is not None and not ours and is_live(record, lease_s):
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            return ClaimResult("busy", top, record)
        if top and record is not None:
            logger.warning("claim %s/%06d of attempt %s is dead; attempt %d takes over",
                           directory, top, record.get("attempt"), attempt)
        mine_record = {**me, "generation": top + 1, "claimed_at": time.time(), "lease_s": lease_s}
        path = posixpath.join(directory, f"{top + 1:06d}.json")
        if create_exclusive(fs, path, json.dumps(mine_record, sort_keys=True).encode()):
            # The previous holder may have written its marker and exited between our check and
            # our claim: look once more, so that a finished commit is never redone.
            if not replace and is_committed():
                fs.rm_file(path)
                return ClaimResult("committed", top, record)
            return ClaimResult("own", top + 1, mine_record)
        # Lost the race for this generation: look again at who won.


def still_owner(fs: Any, directory: str, generation: int) -> bool:
    """True while no later generation exists (nobody took the claim over)."""
    generations = _numbered(fs, directory)
    return bool(generations) and generations[-1] == generation


def claims(fs: Any, directory: str) -> list[dict]:
    """Every claim record of one (level, shard), oldest first: the commit log."""
    return [r for g in _numbered(fs, directory) if (r := _read_json(fs, posixpath.join(directory, f"{g:06d}.json")))]
