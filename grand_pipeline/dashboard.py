"""``grand dashboard``: a read-only local web page of per-level progress, throughput and ETA.

Everything shown comes from the store (commit markers and run metadata), never from Ray, so the
page works during a run, after it, and on a laptop pointed at an ``s3://`` output. The server is
the standard library's: GET only, a fixed set of paths, bound to 127.0.0.1 unless told otherwise.

Markers written by older code lack per-shard timestamps; they still count towards progress and
totals, and only the time series and the ETA skip what they cannot place in time.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from grand_pipeline.store import Store

logger = logging.getLogger(__name__)

#: URL path -> (asset file, content type). Nothing outside this table is ever served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
API_PATH = "/api/status"
TIMELINE_BINS = 40
#: Committed shards whose pace the ETA extrapolates.
ETA_WINDOW = 50

# Scripts and styles come from this server only: no inline code, no third-party origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _timestamp(value: Any) -> float | None:
    """Epoch seconds from a marker field: a number or an ISO-8601 string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def shard_span(marker: dict) -> tuple[float, float] | None:
    """(started, finished) of one committed shard, from whatever the marker records."""
    finished = _timestamp(marker.get("finished"))
    if finished is None:
        finished = _timestamp(marker.get("committed_at"))
    if finished is None:
        return None
    started = _timestamp(marker.get("started"))
    if started is None:
        seconds = marker.get("duration_s", marker.get("seconds"))
        started = finished - float(seconds) if isinstance(seconds, int | float) else finished
    return min(started, finished), finished


def timeline(markers: dict[str, dict], bins: int = TIMELINE_BINS) -> list[dict[str, float]]:
    """Images/s over time: each shard's rows spread evenly over its (started, finished) span."""
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


#: GLaMM training's per-step log (``grand glamm train``), read as a file: the dashboard knows its
#: format (one JSON object per line: step, loss, ce, bce, dice, lr, samples_per_s), not its code.
TRAIN_LOG = ("glamm", "train_log.jsonl")
TRAIN_SERIES = 200


def training_summary(store: Store) -> dict[str, Any] | None:
    """The newest training step and the last ``TRAIN_SERIES`` losses, or None without a log."""
    raw = store.read_file(*TRAIN_LOG)
    if not raw:
        return None
    records = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written: the next refresh reads it whole
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not records:
        return None
    return {
        "last": records[-1],
        "series": [{"step": r["step"], "loss": r.get("loss")} for r in records[-TRAIN_SERIES:]],
    }


def snapshot(store: Store) -> dict[str, Any]:
    """``Store.status()`` unchanged (the CLI's numbers), plus per-level extras and run metadata."""
    now = time.time()
    status = store.status()
    for entry in status["levels"]:
        entry.update(level_extras(entry, store.committed(entry["level"]), now))
    meta = store.read_run_meta() or {}
    status["run"] = {k: meta.get(k) for k in ("config_hash", "profile", "code_version", "input", "levels",
                                              "attempt")}
    status["output"] = store.uri
    status["training"] = training_summary(store)
    status["generated_at"] = now
    return status


class _Handler(BaseHTTPRequestHandler):
    server_version = "grand-dashboard"
    # Set on the subclass made by make_server.
    store: Store
    min_interval: float
    lock: threading.Lock
    cache: tuple[float, bytes | None]

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == API_PATH:
            try:
                body = self._snapshot_body()
            except Exception as exc:  # noqa: BLE001 - shown on the page; the server keeps serving
                logger.exception("status snapshot failed")
                body = json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode()
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "application/json")
            return self._send(HTTPStatus.OK, body, "application/json")
        if path in STATIC:
            name, ctype = STATIC[path]
            asset = resources.files("grand_pipeline") / "assets" / "dashboard" / name
            return self._send(HTTPStatus.OK, asset.read_bytes(), ctype)
        self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    def _snapshot_body(self) -> bytes:
        # On an object store every snapshot lists and reads each level's markers; several open
        # tabs polling every few seconds must not multiply that, so one snapshot serves them all.
        with self.lock:
            made, body = self.cache
            if body is None or time.monotonic() - made >= self.min_interval:
                body = json.dumps(snapshot(self.store), sort_keys=True).encode()
                type(self).cache = (time.monotonic(), body)
            return body

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain")

    def _send(self, code: HTTPStatus, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if code == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET")
        for key, value in _SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        logger.info("%s %s", self.address_string(), format % args)


def make_server(
    output: str, host: str = "127.0.0.1", port: int = 0, min_interval: float = 2.0
) -> ThreadingHTTPServer:
    """A server for ``output`` (not yet serving); port 0 picks a free one (``server_port``).
    ``min_interval``: seconds a status snapshot is reused before the store is read again."""
    attrs = {"store": Store(output), "min_interval": min_interval, "lock": threading.Lock(),
             "cache": (0.0, None)}
    handler = type("DashboardHandler", (_Handler,), attrs)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("dashboard bound to %s: anyone who can reach it sees this run's progress", host)
    return server
