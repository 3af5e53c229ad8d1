"""``grand dashboard``: a read-only local web page of per-level progress, throughput and ETA.

Everything shown comes from the store (commit markers and run metadata), never from Ray, so the
page works during a run, after it, and on a laptop pointed at an ``s3://`` output. The server is
the standard library's: GET only, a fixed set of paths, bound to 127.0.0.1 unless told otherwise.

The numbers are :mod:`grand_pipeline.status`'s, the same ``grand status`` prints.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from grand_pipeline.run_meta import RunMeta
from grand_pipeline.status import level_extras, run_status
from grand_pipeline.store import Store

logger = logging.getLogger(__name__)

#: URL path -> (asset file, content type). Nothing outside this table is ever served.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
API_PATH = "/api/status"

# Scripts and styles come from this server only: no inline code, no third-party origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


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
    """:func:`run_status` unchanged (the CLI's numbers), plus per-level extras and run metadata."""
    now = time.time()
    status = run_status(store)
    for entry in status["levels"]:
        entry.update(level_extras(entry, store.committed(entry["level"]), now))
    meta = RunMeta(store).read_run_meta() or {}
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
