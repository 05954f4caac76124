"""A small fault-injecting HTTP proxy in front of a real FHIR server (tests only).

The proxy listens on 127.0.0.1 under the same base path as the server it fronts, forwards
every request, and rewrites the server's own absolute URLs (paging links, ``fullUrl``,
``Location``) to its own address, as a reverse proxy does. Tests arm faults that misbehave the
way hospital networks and gateways do:

==========================  ================================================================
action                      what the client sees (and whether the server applied it)
==========================  ================================================================
``applied-then-status``     forwarded and applied, answered with ``status`` (500, 502, 504…)
``applied-then-html``       forwarded and applied, answered ``200 text/html`` (a gateway page)
``applied-then-close``      forwarded and applied, the connection closed without an answer
``unavailable``             not forwarded, answered ``status`` (503, 429) with ``Retry-After``
``strip-location``          forwarded, ``location`` removed from every 2xx entry answer
``refuse-entry``            Bundle entries matching ``entry`` answered ``entry_status`` (400
                            with an OperationOutcome) without being forwarded; the rest of
                            the Bundle forwarded; answers merged in order
``entry-status``            like ``refuse-entry`` with any status; ``applied=True`` forwards
                            those entries and replaces their answer instead
``corrupt-entry``           entries matching ``entry`` changed by ``patch`` (default: an invalid
                            ``birthDate``), then forwarded: the *server* refuses them, as it
                            does (per entry, or — atomic — the whole transaction)
``offer-interactions``      ``/metadata`` with exactly the system interactions in
                            ``interactions`` (e.g. ``batch`` where a server lists only
                            ``transaction``, as HAPI does though it accepts batches)
==========================  ================================================================

A fault fires for requests its ``match`` accepts (default: a Bundle POSTed to the base), after
``skip`` such requests, ``times`` times (``None``: until :meth:`FaultProxy.heal`).
:meth:`FaultProxy.refuse_connections` closes the listening socket and every open connection
(connection refused) until healed, on the same port.

Generic on purpose: any FHIR server URL works upstream (the Medplum-engine test server, HAPI).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

ACTIONS = frozenset(
    {
        "applied-then-status",
        "applied-then-html",
        "applied-then-close",
        "unavailable",
        "strip-location",
        "refuse-entry",
        "entry-status",
        "corrupt-entry",
        "offer-interactions",
    }
)
# Cache-Control too: HAPI answers a repeated search from a 60 s cache unless told no-cache — a
# proxy that drops the header makes a look-up after an uncertain answer see the empty result of
# the search made before the write (seen: every record of that Bundle created twice)
_FORWARDED_HEADERS = ("Accept", "Content-Type", "If-Match", "If-None-Exist", "Prefer",
                      "Authorization", "Cache-Control")  # fmt: skip
_KEPT_HEADERS = ("Content-Type", "Location", "Content-Location", "ETag", "Last-Modified",
                 "Retry-After")  # fmt: skip
GATEWAY_PAGE = b"<html><head><title>Gateway</title></head><body>Please wait...</body></html>"


@dataclass
class ProxyRequest:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    @property
    def bundle(self) -> dict[str, Any] | None:
        body = self.json
        if isinstance(body, dict) and body.get("resourceType") == "Bundle":
            return body
        return None


@dataclass
class Exchange:
    """One request as the proxy handled it (``status`` None: connection closed)."""

    method: str
    path: str
    status: int | None
    fault: str | None
    request: ProxyRequest = field(repr=False)


def bundle_post(request: ProxyRequest) -> bool:
    """A transaction or batch Bundle POSTed to the base."""
    return request.method == "POST" and request.bundle is not None


def metadata(request: ProxyRequest) -> bool:
    return request.method == "GET" and request.path.split("?")[0].endswith("/metadata")


@dataclass
class Fault:
    action: str
    times: int | None = 1
    skip: int = 0
    match: Callable[[ProxyRequest], bool] = bundle_post
    status: int = 503
    retry_after: str | None = None
    entry: Callable[[dict[str, Any]], bool] | None = None  # for refuse-entry / entry-status
    entry_status: int = 400
    applied: bool = False  # entry-status: forward the entries, then replace their answers
    interactions: frozenset[str] = frozenset()  # offer-interactions
    patch: dict[str, Any] = field(default_factory=lambda: {"birthDate": "not-a-date"})
    seen: int = 0  # matching requests so far
    fired: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.action.endswith("-interactions") and self.match is bundle_post:
            self.match = metadata

    @property
    def active(self) -> bool:
        return self.times is None or self.fired < self.times


class FaultProxy:
    """``with FaultProxy(upstream_base_url) as proxy: proxy.base_url``."""

    def __init__(self, upstream: str, *, rewrite_urls: bool = True) -> None:
        parts = urlsplit(upstream.rstrip("/"))
        self.upstream_root = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path
        self.upstream = upstream.rstrip("/")
        self.rewrite_urls = rewrite_urls
        self.faults: list[Fault] = []
        self.log: list[Exchange] = []
        self.port = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._local = threading.local()

    # -- life cycle ------------------------------------------------------------------------
    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}{self.base_path}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._close_listener()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------------
    def add(self, action: str, **kw: Any) -> Fault:
        fault = Fault(action, **kw)
        with self._lock:
            self.faults.append(fault)
        return fault

    def refuse_connections(self) -> None:
        """Nothing listens on the port any more (and open connections are closed)."""
        self._close_listener()

    @property
    def refusing(self) -> bool:
        return self._server is None

    def heal(self) -> None:
        """No more faults; listening again (on the same port) if connections were refused."""
        with self._lock:
            self.faults.clear()
        if self._server is None:
            self.start()

    @contextmanager
    def faulty(self, action: str, **kw: Any) -> Iterator[Fault]:
        fault = self.add(action, **kw)
        try:
            yield fault
        finally:
            with self._lock:
                if fault in self.faults:
                    self.faults.remove(fault)

    def requests(self, method: str | None = None) -> list[Exchange]:
        with self._lock:
            return [e for e in self.log if method is None or e.method == method]

    def bundles(self) -> list[dict[str, Any]]:
        """Every Bundle the client POSTed, in order."""
        return [b for e in self.requests("POST") if (b := e.request.bundle) is not None]

    def _take(self, request: ProxyRequest) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if not fault.active or not fault.match(request):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                fault.fired += 1
                return fault
        return None

    def _record(self, request: ProxyRequest, status: int | None, fault: Fault | None) -> None:
        with self._lock:
            self.log.append(
                Exchange(request.method, request.path, status, fault and fault.action, request)
            )

    # -- forwarding ------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def forward(self, request: ProxyRequest, body: bytes | None = None) -> _Answer:
        headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_HEADERS}
        response = self._session().request(
            request.method,
            self.upstream_root + request.path,
            headers=headers,
            data=request.body if body is None else body,
            timeout=300,
            allow_redirects=False,
        )
        kept = {k: response.headers[k] for k in _KEPT_HEADERS if k in response.headers}
        content = response.content
        if self.rewrite_urls:
            old, new = self.upstream.encode(), self.base_url.encode()
            content = content.replace(old, new)
            kept = {k: v.replace(self.upstream, self.base_url) for k, v in kept.items()}
        return _Answer(response.status_code, kept, content)

    def handle(self, h: _Handler, request: ProxyRequest) -> None:
        fault = self._take(request)
        action = fault.action if fault else None
        if fault is None:
            answer = self.forward(request)
        elif action == "unavailable":
            headers = {"Content-Type": "application/fhir+json"}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            answer = _Answer(fault.status, headers, _outcome_bytes("transient", "unavailable"))
        elif action == "applied-then-close":
            self.forward(request)
            self._record(request, None, fault)
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        elif action == "applied-then-status":
            self.forward(request)
            answer = _Answer(fault.status, {"Content-Type": "text/html"}, GATEWAY_PAGE)
        elif action == "applied-then-html":
            self.forward(request)
            answer = _Answer(200, {"Content-Type": "text/html; charset=utf-8"}, GATEWAY_PAGE)
        elif action == "strip-location":
            answer = _strip_location(self.forward(request))
        elif action in ("refuse-entry", "entry-status"):
            answer = self._entries(request, fault)
        elif action == "corrupt-entry":
            answer = self.forward(request, _corrupted(request, fault))
        else:  # offer-interactions
            answer = _offer_interactions(self.forward(request), fault.interactions)
        self._record(request, answer.status, fault)
        h.reply(answer)

    def _entries(self, request: ProxyRequest, fault: Fault) -> _Answer:
        bundle = request.bundle
        pick = fault.entry or (lambda _e: True)
        if bundle is None:  # a single request: the resource is the body
            resource = request.json
            if isinstance(resource, dict) and pick({"resource": resource, "request": {}}):
                if not fault.applied:
                    return _Answer(
                        fault.entry_status,
                        {"Content-Type": "application/fhir+json"},
                        _outcome_bytes("invalid", "refused by the fault proxy"),
                    )
                self.forward(request)
                return _Answer(fault.entry_status, {"Content-Type": "text/html"}, GATEWAY_PAGE)
            return self.forward(request)
        entries = bundle.get("entry", [])
        chosen = [i for i, e in enumerate(entries) if pick(e)]
        forward = (
            entries if fault.applied else [e for i, e in enumerate(entries) if i not in chosen]
        )
        answers: list[Any] = [None] * len(entries)
        if forward:
            body = json.dumps({**bundle, "entry": forward}).encode()
            upstream = self.forward(request, body)
            if upstream.status >= 300:
                return upstream
            got = iter(json.loads(upstream.content).get("entry", []))
            for i in range(len(entries)):
                if fault.applied or i not in chosen:
                    answers[i] = next(got)
        outcome = json.loads(_outcome_bytes("invalid", "refused by the fault proxy"))
        for i in chosen:
            answers[i] = {"response": {"status": str(fault.entry_status), "outcome": outcome}}
        kind = "batch-response" if bundle.get("type") == "batch" else "transaction-response"
        content = json.dumps({"resourceType": "Bundle", "type": kind, "entry": answers}).encode()
        return _Answer(200, {"Content-Type": "application/fhir+json"}, content)


def _corrupted(request: ProxyRequest, fault: Fault) -> bytes:
    """The request body with ``fault.patch`` applied to the resources ``fault.entry`` picks."""
    pick = fault.entry or (lambda _e: True)
    bundle = request.bundle
    if bundle is None:
        resource = request.json
        if isinstance(resource, dict) and pick({"resource": resource, "request": {}}):
            resource = {**resource, **fault.patch}
        return json.dumps(resource).encode()
    entries = [
        {**e, "resource": {**e["resource"], **fault.patch}} if pick(e) and "resource" in e else e
        for e in bundle.get("entry", [])
    ]
    return json.dumps({**bundle, "entry": entries}).encode()


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    content: bytes


def _outcome_bytes(code: str, text: str) -> bytes:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return json.dumps(outcome).encode()


def _strip_location(answer: _Answer) -> _Answer:
    headers = {k: v for k, v in answer.headers.items() if k not in ("Location", "Content-Location")}
    try:
        body = json.loads(answer.content)
    except ValueError:
        return _Answer(answer.status, headers, answer.content)
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        for entry in body.get("entry", []):
            response = entry.get("response") or {}
            if str(response.get("status", "")).startswith("2"):
                response.pop("location", None)
    return _Answer(answer.status, headers, json.dumps(body).encode())


def _offer_interactions(answer: _Answer, offered: frozenset[str]) -> _Answer:
    body = json.loads(answer.content)
    for rest in body.get("rest", []):
        rest["interaction"] = [{"code": code} for code in sorted(offered)]
    return _Answer(answer.status, answer.headers, json.dumps(body).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.owner._lock:
                self.owner._connections.discard(self.connection)

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = ProxyRequest(self.command, self.path, dict(self.headers.items()), body)
        try:
            self.owner.handle(self, request)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    def reply(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the proxy's log is ``FaultProxy.log``."""
