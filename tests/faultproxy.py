"""A fault-injecting HTTP proxy on 127.0.0.1 for tests: forwards to an S3 API server, fails a seeded share of requests.

Faults, chosen per request with a seeded generator:

- ``500``: an S3 ``InternalError`` answer, the request never reaches the server;
- ``503``: an S3 ``SlowDown`` answer, the request never reaches the server;
- ``reset``: the connection is reset (RST) before the request is forwarded;
- ``drop``: the request is forwarded and done by the server, then the connection is closed with no answer
  (the client cannot know whether a PUT or DELETE happened).

``delay`` seconds are waited before each request is handled (a slow server). Only loopback upstreams are accepted.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("500", "503", "reset", "drop")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERROR_BODY = {
    "500": (b"InternalError", b"We encountered an internal error. Please try again."),
    "503": (b"SlowDown", b"Please reduce your request rate."),
}


class FaultProxy:
    """``with FaultProxy(upstream, rate=0.15, seed=0) as url:`` -- clients talk to ``url``; ``counts`` says what happened."""

    def __init__(
        self, upstream: str, rate: float, seed: int = 0, faults: tuple[str, ...] = FAULTS, delay: float = 0.0
    ):
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"upstream must be an http:// loopback address, got {upstream!r}")
        if not 0.0 <= rate < 1.0 or not set(faults) <= set(FAULTS):
            raise ValueError(f"rate must be in [0, 1) and faults among {FAULTS}, got {rate!r}, {faults!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.rate, self.faults, self.delay = rate, tuple(faults), delay
        self.counts: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def _draw(self) -> str:
        """``ok`` or the fault for the next request (seeded), counted."""
        with self._lock:
            outcome = self._rng.choice(self.faults) if self._rng.random() < self.rate else "ok"
            self.counts[outcome] += 1
            return outcome

    def start(self) -> str:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                """Close the connection with a TCP reset, no answer."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                except OSError:
                    pass

            def _handle(self) -> None:
                body = self._body()
                if proxy.delay:
                    time.sleep(proxy.delay)
                outcome = proxy._draw()
                if outcome == "reset":
                    self._reset()
                    return
                if outcome in _ERROR_BODY:
                    code, message = _ERROR_BODY[outcome]
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>"
                        + message + b"</Message><RequestId>faultproxy</RequestId></Error>"
                    )
                    self.send_response(int(outcome))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if outcome == "drop":
                        self._reset()
                        return
                    self.send_response(resp.status, resp.reason)
                    for key, value in resp.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 - http.server's names

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                """A client that closes or resets its own connection is no error of the proxy's."""
                if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
