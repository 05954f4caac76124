"""A small reverse proxy adding a fixed delay to every round trip (the benchmark's "network").

It listens on 127.0.0.1 under the upstream's base path, waits ``delay_s``, forwards the
request over a keep-alive Session (one per proxy thread) and answers with the upstream's
status, body and the headers a FHIR client reads, the upstream's own address rewritten to the
proxy's (paging links, ``Location``), as a reverse proxy does.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

_FORWARDED = ("Accept", "Content-Type", "If-Match", "If-None-Exist", "Prefer", "Cache-Control")
_KEPT = ("Content-Type", "Location", "Content-Location", "ETag", "Last-Modified")


class LatencyProxy:
    """``with LatencyProxy(upstream_base_url, 0.020) as proxy: proxy.base_url``."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        parts = urlsplit(upstream.rstrip("/"))
        self.upstream_root = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path
        self.delay_s = delay_s
        self.round_trips = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root_url + self.base_path

    def session(self) -> requests.Session:
        found: requests.Session | None = getattr(self._local, "session", None)
        if found is None:
            found = requests.Session()
            self._local.session = found
        return found

    def __enter__(self) -> LatencyProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    owner: LatencyProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects of a real server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _forward(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        time.sleep(owner.delay_s)
        with owner._lock:
            owner.round_trips += 1
        headers = {h: self.headers[h] for h in _FORWARDED if self.headers.get(h)}
        answer = owner.session().request(
            self.command, owner.upstream_root + self.path, data=body, headers=headers, timeout=120
        )
        content = answer.content.replace(owner.upstream_root.encode(), owner.root_url.encode())
        self.send_response(answer.status_code)
        for name in _KEPT:
            value = answer.headers.get(name)
            if value:
                self.send_header(name, value.replace(owner.upstream_root, owner.root_url))
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = _forward
