"""Fixtures for tests that talk to the real in-memory FHIR R4 server (fhir_adapter/fhir_server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from fhir_adapter.testserver import FhirTestServer


@pytest.fixture(scope="session")
def fhir_test_server() -> Iterator[FhirTestServer]:
    """The running server process (session-wide; started once, stopped at the end)."""
    server = FhirTestServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fhir_server(fhir_test_server: FhirTestServer) -> str:
    """Base URL of the session's FHIR server, e.g. ``http://127.0.0.1:PORT/fhir/R4``."""
    return fhir_test_server.base_url


@pytest.fixture
def fhir_reset(fhir_test_server: FhirTestServer) -> str:
    """Empty the server's repository (``POST /$reset``) before the test; returns the base URL."""
    response = requests.post(f"{fhir_test_server.root_url}/$reset", timeout=30)
    response.raise_for_status()
    return fhir_test_server.base_url


@pytest.fixture(scope="session")
def httpserver_listen_address() -> tuple[str, int]:
    """pytest-httpserver on 127.0.0.1 (not "localhost"), on a free port."""
    return ("127.0.0.1", 0)


# -- sync tests (test_sync.py, test_sync_crash.py) ----------------------------------------------
# Appended for the sync integration tests: the CLI as a subprocess, a read-only view of what the
# server holds (plain `requests`, paging followed) and of what the outbox recorded.

import json  # noqa: E402
import os  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

FHIR_ADAPTER = Path(sys.executable).with_name("fhir-adapter")
IDENTIFIER_BASE = "urn:nct06677931:"
FHIR_HEADERS = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
#: every resource type the adapter writes to a server (R4), and the Subscription of `subscribe`
WRITTEN_TYPES = [
    "AdverseEvent", "CodeSystem", "Consent", "Device", "Encounter", "Group", "Location",
    "Measure", "MeasureReport", "Observation", "Organization", "Patient", "Practitioner",
    "Provenance", "ResearchStudy", "ResearchSubject", "Subscription", "Substance",
]  # fmt: skip
HTTP_TIMEOUT = 60


@dataclass
class CliResult:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:  # shown by failing asserts
        return (
            f"$ {' '.join(self.args)}\nexit {self.code}\n--- stdout\n{self.stdout[-3000:]}\n"
            f"--- stderr\n{self.stderr[-3000:]}"
        )


def adapter_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without the caller's FHIR_ADAPTER_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_ADAPTER_")}
    env.update(extra or {})
    return env


class AdapterCli:
    """``fhir-adapter`` of this venv as a subprocess, bound to one server and one outbox file."""

    def __init__(self, server: str, outbox: Path, env: Mapping[str, str] | None = None) -> None:
        self.server = server
        self.outbox = outbox
        self.env = dict(env or {})  # FHIR_ADAPTER_* settings of every run (e.g. atomic)

    def argv(self, *args: str) -> list[str]:
        return [str(FHIR_ADAPTER), *args]

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300
    ) -> CliResult:
        argv = self.argv(*args)
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=adapter_env({**self.env, **(env or {})}),
            timeout=timeout,
            check=False,
        )
        return CliResult(argv, done.returncode, done.stdout, done.stderr)

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``fhir-adapter ARGS`` without waiting (output discarded); the caller ends it."""
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=adapter_env(self.env),
        )

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``fhir-adapter ARGS`` with stdout and stderr piped (text); the caller waits."""
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=adapter_env({**self.env, **(env or {})}),
        )

    def sync_args(self, directory: Path, *extra: str, server: str | None = None) -> list[str]:
        return [
            "sync",
            str(directory),
            "--server",
            server or self.server,
            "--outbox",
            str(self.outbox),
            *extra,
        ]

    def sync(
        self,
        directory: Path,
        *extra: str,
        server: str | None = None,
        env: Mapping[str, str] | None = None,
        as_json: bool = True,
        timeout: float = 300,
    ) -> CliResult:
        flags = ("--json",) if as_json else ()
        argv = self.sync_args(directory, *flags, *extra, server=server)
        return self.run(*argv, env=env, timeout=timeout)

    def reconcile(self, *extra: str) -> CliResult:
        return self.run(
            "reconcile", "--server", self.server, "--outbox", str(self.outbox), "--json", *extra
        )

    def outbox_rows(self) -> dict[tuple[str, str], tuple[str, str | None]]:
        return outbox_rows(self.outbox)

    def outbox_counts(self) -> dict[str, dict[str, int]]:
        """{type: {state: n}}, what ``fhir-adapter outbox status --json`` shows (read straight
        from the file: a process start per check cost ~1 s; the command has tests of its own)."""
        db = sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=30)
        try:
            counts: dict[str, dict[str, int]] = {}
            for rtype, state, n in db.execute(
                "SELECT rtype, state, COUNT(*) FROM resources GROUP BY rtype, state"
            ):
                counts.setdefault(str(rtype), {})[str(state)] = int(n)
            return counts
        finally:
            db.close()


def outbox_rows(path: Path) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(type, business key) -> (state, server id), read straight from the outbox file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {
            (str(t), str(k)): (str(s), sid)
            for t, k, s, sid in db.execute("SELECT rtype, bkey, state, server_id FROM resources")
        }
    finally:
        db.close()


def business_key(resource: Mapping[str, Any]) -> str:
    """``system|code`` of the resource's one business-identifier tag (SPEC §6)."""
    tags = [
        t
        for t in resource.get("meta", {}).get("tag", [])
        if str(t.get("system", "")).startswith(IDENTIFIER_BASE)
    ]
    assert len(tags) == 1, f"{resource['resourceType']}/{resource['id']}: tags {tags}"
    return f"{tags[0]['system']}|{tags[0]['code']}"


class FhirView:
    """What the FHIR server holds, read with plain HTTP (independent of the adapter's client)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = path if path.startswith("http") else f"{self.base_url}/{path}"
        response = requests.get(url, params=params, headers=FHIR_HEADERS, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, f"GET {response.url}: {response.text[:500]}"
        return response.json()

    def types(self) -> list[str]:
        """Every resource type the server's CapabilityStatement lists."""
        statement = self.get("metadata")
        return sorted({r["type"] for rest in statement["rest"] for r in rest["resource"]})

    def count(self, rtype: str, params: Mapping[str, str] | None = None) -> int:
        total = self.get(rtype, {**(params or {}), "_summary": "count"})["total"]
        return int(total)

    def counts(self, rtypes: list[str] | None = None) -> dict[str, int]:
        """Non-zero counts per type (by default every type the adapter writes: the ~146 of a
        HAPI CapabilityStatement cost a second per call and hold nothing the adapter sends)."""
        found = {t: self.count(t) for t in (rtypes or WRITTEN_TYPES)}
        return {t: n for t, n in found.items() if n}

    def search(self, rtype: str, params: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """Every match, following ``next`` links page by page."""
        bundle = self.get(rtype, {"_count": "1000", **(params or {})})
        out: list[dict[str, Any]] = []
        for _ in range(10_000):
            out += [
                e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"
            ]
            links = {link["relation"]: link["url"] for link in bundle.get("link", [])}
            if "next" not in links:
                return out
            bundle = self.get(links["next"])
        raise AssertionError(f"{rtype}: paging does not end")

    def held(self, rtypes: list[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """(type, business key) -> the resources holding it (more than one is a duplicate)."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rtype in rtypes:
            for resource in self.search(rtype):
                out.setdefault((rtype, business_key(resource)), []).append(resource)
        return out

    def versions(self, rtypes: list[str]) -> dict[tuple[str, str], tuple[str, str]]:
        """(type, business key) -> (server id, versionId); asserts one resource per key."""
        held = self.held(rtypes)
        duplicated = {k: len(v) for k, v in held.items() if len(v) > 1}
        assert not duplicated, f"business keys held more than once: {duplicated}"
        return {k: (v[0]["id"], v[0]["meta"]["versionId"]) for k, v in held.items()}

    def problems(self, rtypes: list[str]) -> dict[str, Any]:
        """What must never be stored (see `stored_problems`); empty when all is well."""
        return stored_problems(self, rtypes)

    def dangling_references(self, rtypes: list[str]) -> list[str]:
        """``Type/id`` references (anywhere in the resources) that the server does not hold."""
        resources = [r for t in rtypes for r in self.search(t)]
        ids = {f"{r['resourceType']}/{r['id']}" for r in resources}
        missing: list[str] = []

        def walk(node: Any, owner: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "reference" and isinstance(value, str):
                        if value not in ids:
                            missing.append(f"{owner} -> {value}")
                    else:
                        walk(value, owner)
            elif isinstance(node, list):
                for value in node:
                    walk(value, owner)

        for r in resources:
            walk(r, f"{r['resourceType']} {business_key(r)}")
        return missing


def duplicates(held: Mapping[tuple[str, str], list[Any]]) -> dict[tuple[str, str], int]:
    """Business keys the server holds more than once, with how often."""
    return {k: len(v) for k, v in held.items() if len(v) > 1}


@pytest.fixture
def fhir_view(fhir_reset: str) -> FhirView:
    """A read-only view of the (emptied) session server."""
    return FhirView(fhir_reset)


@pytest.fixture
def adapter_cli(fhir_reset: str, tmp_path: Path) -> AdapterCli:
    """The CLI bound to the emptied session server and a fresh outbox in ``tmp_path``."""
    return AdapterCli(fhir_reset, tmp_path / "outbox.sqlite")


@pytest.fixture(scope="session")
def make_cli() -> type[AdapterCli]:
    """``make_cli(server_url, outbox_path)``: the CLI bound to another server or outbox."""
    return AdapterCli


@pytest.fixture(scope="session")
def make_view() -> type[FhirView]:
    """``make_view(base_url)``: a read-only view of another server."""
    return FhirView


# -- fault injection (test_sync_fault_proxy.py) -------------------------------------------------
# Appended for issue 8: the fault-injecting proxy (tests/faultproxy.py) in front of a real server,
# and the checks every fault test ends with. `fault_upstream` is the one fixture naming the
# server: parametrize it to run the same fault tests against another FHIR server (HAPI).

from tests.faultproxy import FaultProxy  # noqa: E402


@pytest.fixture
def fault_upstream(fhir_reset: str) -> str:
    """Base URL of the (emptied) real FHIR server behind the fault proxy."""
    return fhir_reset


@pytest.fixture
def fault_proxy(fault_upstream: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of ``fault_upstream``; no fault armed yet."""
    with FaultProxy(fault_upstream) as proxy:
        yield proxy


def stored_problems(view: FhirView, rtypes: list[str]) -> dict[str, Any]:
    """What must never be on the server: a business key held twice, a reference to nothing,
    a reference that is not a literal ``Type/id`` (``urn:uuid:…``, ``Type?identifier=…``)."""
    held = view.held(rtypes)
    not_literal: list[str] = []

    def walk(node: Any, owner: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    if value.startswith("urn:") or "?" in value:
                        not_literal.append(f"{owner} -> {value}")
                else:
                    walk(value, owner)
        elif isinstance(node, list):
            for value in node:
                walk(value, owner)

    for (rtype, bkey), resources in held.items():
        for resource in resources:
            walk(resource, f"{rtype} {bkey}")
    problems = {
        "duplicated": duplicates(held),
        "dangling": view.dangling_references(rtypes),
        "not_literal": not_literal,
    }
    return {k: v for k, v in problems.items() if v}


# -- HAPI FHIR JPA (tests/hapi.py, tests/hapi_server; issue 14) ---------------------------------
# The second, independent server. `hapi_server` / `hapi_reset` mirror `fhir_server` /
# `fhir_reset`; `target_server` runs a test once per server (Medplum, HAPI), each emptied first.
# Without Java 17+, Maven or Maven Central the HAPI tests skip with one reason (set
# FHIR_ADAPTER_TEST_REQUIRE_HAPI=1 to make that a failure instead, e.g. in CI).

from tests.hapi import HapiServer, HapiUnavailable  # noqa: E402
from tests.session_summary import HAPI_SUMMARY  # noqa: E402

# HAPI answers an identical search from its cache for 60 s (JpaStorageSettings
# reuseCachedSearchResultsForMillis), even after writes: the read-only views must see fresh data.
FHIR_HEADERS["Cache-Control"] = "no-cache"

SERVER_KINDS = ("medplum", "hapi")
_HAPI_SUMMARY = HAPI_SUMMARY  # printed by tests/conftest.py (also under pytest-xdist)
_HAPI_UNAVAILABLE: list[str] = []  # the one reason the HAPI tests skip, if they do


def in_ci() -> bool:
    """CI (``CI=true``, as CI services set it): a test that would skip for a missing server or
    toolchain fails instead — no integration test is skipped in CI."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.fixture(scope="session")
def hapi_test_server() -> Iterator[HapiServer]:
    """The HAPI FHIR JPA server process (session-wide; built if needed, started once)."""
    server = HapiServer()
    try:
        server.start()
    except HapiUnavailable as exc:
        server.close()
        if os.environ.get("FHIR_ADAPTER_TEST_REQUIRE_HAPI") or in_ci():
            pytest.fail(str(exc))
        _HAPI_UNAVAILABLE.append(str(exc))
        pytest.skip(str(exc))
    version = requests.get(f"{server.base_url}/metadata", timeout=60).json()["software"]
    _HAPI_SUMMARY.append(
        f"{version['name']} {version['version']}: build {server.timings.build_s:.1f} s "
        f"({'cached' if server.timings.build_s == 0 else 'rebuilt'}), "
        f"start to /metadata {server.timings.start_s:.1f} s"
    )
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def hapi_server(hapi_test_server: HapiServer) -> str:
    """Base URL of the session's HAPI server, e.g. ``http://127.0.0.1:PORT/fhir``."""
    return hapi_test_server.base_url


@pytest.fixture
def hapi_reset(hapi_test_server: HapiServer) -> str:
    """Empty the HAPI server (Subscriptions deleted, then ``$expunge`` everything)."""
    hapi_test_server.reset()
    return hapi_test_server.base_url


@pytest.fixture(scope="session")
def hapi_summary() -> list[str]:
    """Lines printed in the terminal summary under "HAPI FHIR" (timings, validator warnings)."""
    return _HAPI_SUMMARY


@dataclass(frozen=True)
class TargetServer:
    """One of the servers the adapter is proven against, emptied for the test."""

    kind: str  # "medplum" | "hapi"
    base_url: str


@pytest.fixture(params=SERVER_KINDS)
def target_server(request: pytest.FixtureRequest) -> TargetServer:
    """Runs the test once per server kind, against that server emptied."""
    reset = {"medplum": "fhir_reset", "hapi": "hapi_reset"}[request.param]
    return TargetServer(request.param, request.getfixturevalue(reset))


# The sync suites (test_sync.py, test_sync_crash.py, test_sync_fault_proxy.py) run once per
# sync target: Medplum (not atomic: dependency layers), HAPI in dependency layers, and HAPI with
# FHIR_ADAPTER_ATOMIC_TRANSACTIONS=true (whole chunks in one transaction; HAPI applies a
# transaction atomically). One HAPI process serves the session, emptied before each test.
SYNC_TARGETS = ("medplum", "hapi", "hapi-atomic")
ATOMIC_ENV = {"FHIR_ADAPTER_ATOMIC_TRANSACTIONS": "true"}


@dataclass(frozen=True)
class SyncTarget:
    """A server the sync suites run against, emptied, with the settings of that run."""

    kind: str  # "medplum" | "hapi" | "hapi-atomic"
    base_url: str

    @property
    def server(self) -> str:
        """The implementation: "medplum" or "hapi"."""
        return self.kind.split("-", 1)[0]

    @property
    def hapi(self) -> bool:
        return self.server == "hapi"

    @property
    def atomic(self) -> bool:
        return self.kind == "hapi-atomic"

    @property
    def env(self) -> dict[str, str]:
        return dict(ATOMIC_ENV) if self.atomic else {}

    def cli(self, outbox: Path, server: str | None = None) -> AdapterCli:
        """The CLI bound to this target (or to ``server``, e.g. a proxy in front of it)."""
        return AdapterCli(server or self.base_url, outbox, env=self.env)

    def view(self) -> FhirView:
        return FhirView(self.base_url)


def emptied_target(request: pytest.FixtureRequest, kind: str) -> SyncTarget:
    """``kind``'s server emptied (session servers only: usable from any fixture scope)."""
    if kind == "medplum":
        medplum: FhirTestServer = request.getfixturevalue("fhir_test_server")
        medplum.reset()
        return SyncTarget(kind, medplum.base_url)
    hapi: HapiServer = request.getfixturevalue("hapi_test_server")
    hapi.reset()
    return SyncTarget(kind, hapi.base_url)


@pytest.fixture(params=SYNC_TARGETS)
def sync_target(request: pytest.FixtureRequest) -> SyncTarget:
    """Runs the test once per sync target, against that server emptied."""
    return emptied_target(request, request.param)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Every HAPI skip at one location, so `-ra` shows the reason once (with the count)."""
    outcome: Any = yield
    report = outcome.get_result()
    if report.skipped and _HAPI_UNAVAILABLE and isinstance(report.longrepr, tuple):
        _, _, message = report.longrepr
        if message.endswith(_HAPI_UNAVAILABLE[0]):
            report.longrepr = (str(Path(__file__)), _HAPI_SKIP_LINE, message)


# the line of the `hapi_test_server` fixture (pytest keeps the function as __wrapped__)
_HAPI_SKIP_LINE = getattr(getattr(hapi_test_server, "__wrapped__", None), "__code__", None)
_HAPI_SKIP_LINE = _HAPI_SKIP_LINE.co_firstlineno if _HAPI_SKIP_LINE else 0


# -- webhook tests (test_webhook_*.py) -----------------------------------------------------------
# Appended for the webhook layer: the Flask app through its test client with a delivery worker
# cycled in-process against the session's server, and `fhir-adapter serve` as a real process.

import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from fhir_adapter.settings import Settings  # noqa: E402
from fhir_adapter.sync.delivery import DeliveryWorker, webhook_context  # noqa: E402
from fhir_adapter.sync.inbox import Inbox  # noqa: E402
from tests.webhook_helpers import CREDENTIALS_ENV, JSON, bearer_headers, body_of  # noqa: E402


class WebhookStack:
    """The webhook app (test client) and its delivery worker, on one outbox and one server."""

    def __init__(self, base_url: str, outbox: Path) -> None:
        from server import create_app

        self.settings = Settings(
            fhir_base_url=base_url,
            outbox_path=outbox,
            webhook_secret=CREDENTIALS_ENV["FHIR_ADAPTER_WEBHOOK_SECRET"],
            webhook_token=CREDENTIALS_ENV["FHIR_ADAPTER_WEBHOOK_TOKEN"],
            webhook_standard_secret=CREDENTIALS_ENV["FHIR_ADAPTER_WEBHOOK_STANDARD_SECRET"],
            max_attempts=2,
            max_retry_seconds=5,
        )
        self.client = create_app(self.settings).test_client()
        ctx, threshold = webhook_context(self.settings)
        self.ctx = ctx
        self.worker = DeliveryWorker(self.settings, ctx, threshold=threshold)
        self.view = FhirView(base_url)

    def post(self, kind: str, records: Any) -> Any:
        response = self.client.post(
            f"/ingest/{kind}", data=body_of(records), headers={**JSON, **bearer_headers()}
        )
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()

    def delete(self, kind: str, key: str) -> Any:
        response = self.client.delete(f"/ingest/{kind}/{key}", headers=bearer_headers())
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()

    def deliver(self, cycles: int = 10) -> None:
        """Cycle the worker until it has nothing left to do."""
        for _ in range(cycles):
            report = self.worker.cycle()
            assert not report.unavailable
            if not report.worked:
                return
        raise AssertionError("the delivery worker did not settle")

    def inbox_states(self) -> dict[str, str]:
        with Inbox(self.settings.outbox_path) as inbox:
            return {f"{r.kind}/{r.key}": r.state for r in inbox.rows()}

    def observation(self, value: str) -> dict[str, Any]:
        found = self.view.search(
            "Observation", {"identifier": f"{IDENTIFIER_BASE}observation|{value}"}
        )
        assert len(found) == 1, f"{value}: {len(found)} on the server"
        return found[0]

    def close(self) -> None:
        self.worker.close()


@pytest.fixture
def webhook_stack(fhir_reset: str, tmp_path: Path) -> Iterator[WebhookStack]:
    stack = WebhookStack(fhir_reset, tmp_path / "outbox.sqlite")
    try:
        yield stack
    finally:
        stack.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``fhir-adapter serve`` as a real process (its own process group), logs to a file."""

    def __init__(
        self,
        server: str,
        outbox: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
        *extra: str,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.argv = [
            str(FHIR_ADAPTER),
            "serve",
            "--bind",
            f"127.0.0.1:{self.port}",
            "--server",
            server,
            "--outbox",
            str(outbox),
            *extra,
        ]
        self.env = adapter_env(
            {
                **CREDENTIALS_ENV,
                "FHIR_ADAPTER_DELIVERY_INTERVAL_S": "0.1",
                "FHIR_ADAPTER_DELIVERY_RETRY_S": "0.5",
                "FHIR_ADAPTER_MAX_ATTEMPTS": "2",
                "FHIR_ADAPTER_MAX_RETRY_SECONDS": "3",
                "FHIR_ADAPTER_CONNECT_TIMEOUT_S": "2",
                **(env or {}),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                self.argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            # bound but its workers still booting (seconds on a loaded machine): try again
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: master, web workers and delivery worker at once."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=30)

    def post(self, kind: str, records: Any, session: requests.Session | None = None) -> Any:
        http = session or requests
        return http.post(
            f"{self.url}/ingest/{kind}",
            data=body_of(records),
            headers={**JSON, **bearer_headers()},
            timeout=30,
        )


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``serve_process(server_url, outbox, env=None, *extra)``: started; stopped at the end."""
    started: list[ServeProcess] = []

    def start(
        server: str, outbox: Path, env: Mapping[str, str] | None = None, *extra: str
    ) -> ServeProcess:
        proc = ServeProcess(server, outbox, tmp_path / f"serve-{len(started)}.log", env, *extra)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def wait_for(check: Callable[[], Any], timeout: float = 60, interval: float = 0.25) -> Any:
    """Poll ``check`` until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
