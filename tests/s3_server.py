"""A real S3 endpoint for tests: moto's server on 127.0.0.1, behind a small forwarding proxy that
can refuse chosen PUTs (the injected upload failure). Nothing in the code under test is patched:
it reaches the endpoint through ``AWS_ENDPOINT_URL``, which botocore (and so s3fs) honours.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "expect"}
_DENIED = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>injected fault</Message></Error>"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forget_s3_clients() -> None:
    """Drop fsspec's cached S3 file systems. The endpoint comes from ``AWS_ENDPOINT_URL``, which
    is not part of fsspec's cache key, so an instance made for one test module's endpoint would
    otherwise be reused by the next module and dial a server that is gone."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


class S3Endpoint:
    """moto + proxy. ``fail_puts`` holds substrings: a PUT whose path contains one gets a 403."""

    def __init__(self) -> None:
        self.moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.fail_puts: set[str] = set()
        self.refused: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 answers botocore's "Expect: 100-continue" (HTTP/1.0 would leave it hanging).
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PUT" and any(s in self.path for s in endpoint.fail_puts):
                    endpoint.refused.append(self.path)
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_DENIED)))
                    self.end_headers()
                    self.wfile.write(_DENIED)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", endpoint.moto_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                                 else resp.getheader("Content-Length", "0"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.proxy = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def start(self) -> S3Endpoint:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        forget_s3_clients()
        self.moto.start()
        threading.Thread(target=self.proxy.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.proxy.shutdown()
        self.proxy.server_close()
        self.moto.stop()
        forget_s3_clients()

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
