"""Fault injection against the FHIR client (SPEC §7) with pytest-httpserver.

Every case counts what the server received. For reads, not-applied failures (refused
connections, 408, 429, 503) and uncertain ones (500, 502, 504, timeouts, dropped connections, a
2xx that is not JSON) are retried within the bounds; everything else is tried once and becomes
the typed exception the status maps to. Messages name the status and the OperationOutcome's
codes and locations; the server's diagnostics stay in ``issues`` / ``full_message``.
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.client import (
    Capabilities,
    FhirClient,
    entry_outcome,
    error_for_status,
    retry_after_seconds,
)
from fhir_adapter.errors import (
    AuthError,
    ConfigurationError,
    Conflict,
    OutcomeUncertain,
    ServerRejected,
    ServerUnavailable,
)
from fhir_adapter.settings import Settings
from tests.fakes import capability_statement

BASE = "/fhir/R4"
FHIR_JSON = "application/fhir+json"


def outcome(text: str, code: str = "invalid") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": code,
                "details": {"text": text},
                "expression": ["Patient.gender"],
            }
        ],
    }


def fhir(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers, content_type=FHIR_JSON)


def settings(server: HTTPServer, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_base_url": server.url_for(BASE),
        "max_attempts": 3,
        "max_retry_seconds": 10,
        "connect_timeout_s": 0.5,
        "read_timeout_s": 0.5,
    }
    values.update(over)
    return Settings(**values)


PATIENT = {"resourceType": "Patient", "id": "p1"}


def patient_requests(server: HTTPServer) -> int:
    return sum(1 for request, _ in server.log if request.path == f"{BASE}/Patient/p1")


# -- Retry-After and the retryable statuses ---------------------------------------------------


def test_429_retry_after_seconds_is_honoured(httpserver: HTTPServer) -> None:
    path = f"{BASE}/Patient/p1"
    httpserver.expect_ordered_request(path).respond_with_response(
        fhir(outcome("slow down", "throttled"), 429, {"Retry-After": "1"})
    )
    httpserver.expect_ordered_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client:
        start = time.monotonic()
        assert client.read("Patient", "p1") == PATIENT
        elapsed = time.monotonic() - start
    assert elapsed >= 0.95
    assert elapsed < 2.5
    assert patient_requests(httpserver) == 2
    httpserver.check_assertions()


def test_429_retry_after_http_date_is_honoured(httpserver: HTTPServer) -> None:
    calls: list[float] = []

    def handler(_request: Request) -> Response:
        calls.append(time.time())
        if len(calls) == 1:
            # whole seconds only: the client waits between 1 and 2 s
            when = email.utils.formatdate(time.time() + 2, usegmt=True)
            return fhir(outcome("slow down", "throttled"), 429, {"Retry-After": when})
        return fhir(PATIENT)

    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_handler(handler)
    with FhirClient(settings(httpserver)) as client:
        assert client.read("Patient", "p1") == PATIENT
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.95


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("0") == 0.0
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    future = retry_after_seconds(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert future is not None
    assert 28 <= future <= 30
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_retry_after_is_capped_by_max_retry_seconds(httpserver: HTTPServer) -> None:
    path = f"{BASE}/Patient/p1"
    httpserver.expect_ordered_request(path).respond_with_response(
        fhir({}, 503, {"Retry-After": "3600"})
    )
    httpserver.expect_ordered_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver, max_retry_seconds=0.3)) as client:
        start = time.monotonic()
        # a one-hour hint is cut to the total retry budget (0.3 s)
        assert client.read("Patient", "p1") == PATIENT
        elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 1.5
    assert patient_requests(httpserver) == 2


def test_503_then_success_is_retried(httpserver: HTTPServer) -> None:
    path = f"{BASE}/Patient/p1"
    httpserver.expect_ordered_request(path).respond_with_response(
        fhir(outcome("maintenance", "transient"), 503, {"Retry-After": "0"})
    )
    httpserver.expect_ordered_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client:
        assert client.read("Patient", "p1") == PATIENT
        assert client.requests_sent == 2
    assert patient_requests(httpserver) == 2


def test_503_without_retry_after_backs_off_with_bounded_jitter(httpserver: HTTPServer) -> None:
    path = f"{BASE}/Patient/p1"
    httpserver.expect_ordered_request(path).respond_with_response(fhir({}, 503))
    httpserver.expect_ordered_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client:
        start = time.monotonic()
        assert client.read("Patient", "p1") == PATIENT
        # first backoff: random in [0, 0.5 s]
        assert time.monotonic() - start < 1.5
    assert patient_requests(httpserver) == 2


@pytest.mark.parametrize("max_attempts", [1, 3, 4])
def test_503_forever_gives_up_after_max_attempts(httpserver: HTTPServer, max_attempts: int) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(
        fhir(outcome("down", "transient"), 503, {"Retry-After": "0"})
    )
    with (
        FhirClient(settings(httpserver, max_attempts=max_attempts)) as client,
        pytest.raises(ServerUnavailable) as info,
    ):
        client.read("Patient", "p1")
    assert patient_requests(httpserver) == max_attempts
    assert info.value.status == 503
    assert "HTTP 503" in str(info.value)
    assert "down" not in str(info.value)  # diagnostics are not for messages and logs
    assert "down" in info.value.full_message


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_each_retryable_status_is_retried(httpserver: HTTPServer, status: int) -> None:
    path = f"{BASE}/Patient/p1"
    httpserver.expect_ordered_request(path).respond_with_response(
        fhir({}, status, {"Retry-After": "0"})
    )
    httpserver.expect_ordered_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client:
        assert client.read("Patient", "p1") == PATIENT
    assert patient_requests(httpserver) == 2


def test_transaction_is_never_retried_by_the_client(httpserver: HTTPServer) -> None:
    """A transaction POST may have landed: the sync engine, not the client, decides a retry."""
    httpserver.expect_request(f"{BASE}/", method="POST").respond_with_response(
        fhir({}, 503, {"Retry-After": "0"})
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(ServerUnavailable):
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    assert len(httpserver.log) == 1


# -- timeouts and connection errors -------------------------------------------------------------


def test_read_timeout_is_retried_then_succeeds(
    httpserver: HTTPServer, no_jitter: None, release: threading.Event
) -> None:
    calls: list[float] = []
    lock = threading.Lock()

    def handler(_request: Request) -> Response:
        with lock:
            calls.append(time.monotonic())
            first = len(calls) == 1
        if first:
            release.wait(2.0)  # longer than read_timeout_s
        return fhir(PATIENT)

    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_handler(handler)
    with FhirClient(settings(httpserver)) as client:
        start = time.monotonic()
        assert client.read("Patient", "p1") == PATIENT
        elapsed = time.monotonic() - start
    assert len(calls) == 2
    assert 0.45 <= elapsed < 1.5


def test_read_timeout_forever_is_uncertain(
    httpserver: HTTPServer, no_jitter: None, release: threading.Event
) -> None:
    """A timeout after the request was sent: maybe applied (reads are simply retried)."""
    calls: list[float] = []

    def handler(_request: Request) -> Response:
        calls.append(time.monotonic())
        release.wait(2.0)
        return fhir(PATIENT)

    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_handler(handler)
    with (
        FhirClient(settings(httpserver, max_attempts=2)) as client,
        pytest.raises(OutcomeUncertain, match="timed out") as info,
    ):
        client.read("Patient", "p1")
    assert len(calls) == 2
    assert info.value.status is None
    assert info.value.exit_code == 69
    assert "Traceback" not in str(info.value)


def test_connection_dropped_after_sending_is_uncertain(no_jitter: None) -> None:
    """The server reads the request and closes the connection without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.recv(65536))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    cfg = Settings(fhir_base_url=f"http://127.0.0.1:{port}{BASE}", max_attempts=2,
                   connect_timeout_s=1, read_timeout_s=2)  # fmt: skip
    try:
        with FhirClient(cfg) as client, pytest.raises(OutcomeUncertain) as info:
            client.request_once("POST", "", body={"resourceType": "Bundle"})
    finally:
        thread.join(5)
        listener.close()
    assert "connection dropped" in str(info.value)
    assert seen
    assert seen[0].startswith(b"POST /fhir/R4")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_connection_refused_is_server_unavailable_and_retried(no_jitter: None) -> None:
    url = f"http://127.0.0.1:{_closed_port()}{BASE}"
    cfg = Settings(fhir_base_url=url, max_attempts=3, connect_timeout_s=0.5, read_timeout_s=0.5)
    with FhirClient(cfg) as client:
        with pytest.raises(ServerUnavailable, match="cannot connect") as info:
            client.read("Patient", "p1")
        assert client.requests_sent == 3
    assert info.value.exit_code == 69
    assert info.value.__cause__ is None


# -- statuses that are never retried ------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 422, 501])
def test_rejections_are_never_retried(httpserver: HTTPServer, status: int) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(
        fhir(outcome(f"gender code not in value set ({status})"), status, {"Retry-After": "0"})
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(ServerRejected) as info:
        client.read("Patient", "p1")
    assert type(info.value) is ServerRejected
    assert patient_requests(httpserver) == 1
    err = info.value
    assert err.status == status
    assert err.issues == [
        f"error invalid at Patient.gender: gender code not in value set ({status})"
    ]
    assert str(err) == f"HTTP {status} for GET Patient/p1: error invalid at Patient.gender"
    assert f"gender code not in value set ({status})" in err.full_message
    assert err.outcome["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize("status", [409, 412])
def test_conflicts_are_not_retried(httpserver: HTTPServer, status: int) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(
        fhir(outcome("version mismatch", "conflict"), status)
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(Conflict) as info:
        client.read("Patient", "p1")
    assert patient_requests(httpserver) == 1
    assert info.value.status == status
    assert "error conflict" in str(info.value)
    assert "version mismatch" in info.value.full_message


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_are_not_retried(httpserver: HTTPServer, status: int) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(
        fhir(outcome("not allowed", "forbidden"), status)
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(AuthError) as info:
        client.read("Patient", "p1")
    assert patient_requests(httpserver) == 1
    assert info.value.status == status
    assert info.value.exit_code == 69


@pytest.mark.parametrize("status", [500, 502, 504])
def test_5xx_on_a_read_is_uncertain_and_retried(
    httpserver: HTTPServer, no_jitter: None, status: int
) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_data(
        "<html>Internal Server Error</html>", status=status, content_type="text/html"
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(OutcomeUncertain) as info:
        client.read("Patient", "p1")
    assert patient_requests(httpserver) == 3
    assert str(info.value) == f"HTTP {status} for GET Patient/p1"
    assert info.value.issues == []
    assert info.value.exit_code == 69


def test_2xx_that_is_not_json_is_uncertain(httpserver: HTTPServer, no_jitter: None) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_data(
        "<html><body>proxy login</body></html>", status=200, content_type="text/html"
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(OutcomeUncertain) as info:
        client.read("Patient", "p1")
    message = str(info.value)
    assert message == "HTTP 200: the server answered with a body that is not JSON (text/html)"
    for noise in ("Traceback", "orjson", "JSONDecodeError", "line 1", "char 0", "proxy login"):
        assert noise not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert patient_requests(httpserver) == 3  # a read: retried


def test_metadata_that_is_not_a_capability_statement(httpserver: HTTPServer) -> None:
    httpserver.expect_request(f"{BASE}/metadata").respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client, pytest.raises(ServerRejected) as info:
        client.check_version("R4")
    assert "is not a CapabilityStatement" in str(info.value)


# -- the CapabilityStatement check ------------------------------------------------------------


def test_r4_server_is_accepted_and_its_search_params_read(httpserver: HTTPServer) -> None:
    httpserver.expect_request(f"{BASE}/metadata").respond_with_response(
        fhir(capability_statement("4.0.1"))
    )
    with FhirClient(settings(httpserver)) as client:
        caps = client.check_version("R4")
        client.check_version("R4")  # cached: one /metadata request
    assert caps.fhir_version == "4.0.1"
    assert caps.supports_search("Patient", "identifier")
    assert caps.supports_search("Observation", "_tag")
    assert not caps.supports_search("AdverseEvent", "identifier")
    assert len(httpserver.log) == 1


def test_fhir_5_server_is_refused_when_r4_is_configured(httpserver: HTTPServer) -> None:
    httpserver.expect_request(f"{BASE}/metadata").respond_with_response(
        fhir(capability_statement("5.0.0"))
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(ConfigurationError) as info:
        client.check_version("R4")
    message = str(info.value)
    assert info.value.exit_code == 66
    assert "5.0.0" in message
    assert "R4" in message
    assert "refusing to write" in message
    assert [r.method for r, _ in httpserver.log] == ["GET"]


def test_request_headers(httpserver: HTTPServer) -> None:
    httpserver.expect_request(
        f"{BASE}/Patient/p1",
        headers={"Accept": FHIR_JSON},
    ).respond_with_response(fhir(PATIENT))
    with FhirClient(settings(httpserver)) as client:
        client.read("Patient", "p1")
    request = httpserver.log[0][0]
    assert request.headers["User-Agent"].startswith("fhir-adapter/")
    assert "Authorization" not in request.headers


# -- the one mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ServerRejected),
        (404, ServerRejected),
        (405, ServerRejected),
        (410, ServerRejected),
        (422, ServerRejected),
        (501, ServerRejected),
        (401, AuthError),
        (403, AuthError),
        (409, Conflict),
        (412, Conflict),
        (408, ServerUnavailable),
        (429, ServerUnavailable),
        (503, ServerUnavailable),
        (500, OutcomeUncertain),
        (502, OutcomeUncertain),
        (504, OutcomeUncertain),
        (599, OutcomeUncertain),
    ],
)
def test_every_status_has_one_class(status: int, kind: type[Exception]) -> None:
    error = error_for_status(status, outcome("x"))
    assert type(error) is kind
    assert error_for_status(200) is None
    assert error_for_status(304) is None


@pytest.mark.parametrize(
    ("method", "response", "known_id", "expected"),
    [
        (
            "POST",
            {"status": "201 Created", "location": "Patient/a/_history/2"},
            None,
            ("landed", "a", "2"),
        ),
        (
            "POST",
            {"status": "201", "location": "http://x/fhir/Patient/a"},
            None,
            ("landed", "a", None),
        ),
        ("POST", {"status": "201 Created"}, None, ("uncertain", None, None)),
        ("PUT", {"status": "200 OK", "etag": 'W/"7"'}, "a", ("landed", "a", "7")),
        ("PUT", {"status": "200 OK"}, None, ("uncertain", None, None)),
        ("DELETE", {"status": "204"}, None, ("landed", None, None)),
        ("DELETE", {"status": "404 Not Found"}, None, ("landed", None, None)),
        ("DELETE", {"status": "409 Conflict"}, None, ("conflict", None, None)),
        ("POST", {"status": "400 Bad Request"}, None, ("refused", None, None)),
        ("PUT", {"status": "412"}, "a", ("conflict", None, None)),
        ("POST", {"status": "503"}, None, ("unavailable", None, None)),
        ("POST", {"status": "429 Too Many Requests"}, None, ("unavailable", None, None)),
        ("POST", {"status": "500"}, None, ("uncertain", None, None)),
        ("POST", {"status": "302 Found"}, None, ("uncertain", None, None)),
        ("POST", {}, None, ("uncertain", None, None)),
    ],
)
def test_entry_answers_are_classified(
    method: str,
    response: dict[str, Any],
    known_id: str | None,
    expected: tuple[str, str | None, str | None],
) -> None:
    got = entry_outcome({"method": method, "url": "Patient"}, {"response": response},
                        known_id=known_id)  # fmt: skip
    assert (got.kind, got.server_id, got.version) == expected
    assert entry_outcome({"method": "POST"}, None).kind == "uncertain"


def test_bundle_modes_follow_the_capability_statement() -> None:
    def mode(*codes: str) -> str:
        statement = {"fhirVersion": "4.0.1", "rest": [{"mode": "server",
                     "interaction": [{"code": c} for c in codes]}]}  # fmt: skip
        return Capabilities.parse(statement).bundle_mode()

    assert mode("transaction", "batch") == "transaction"
    assert mode("batch") == "batch"
    assert mode("search-system") == "single"
    assert mode() == "single"


def _searchset(entries: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    links = [{"relation": "next", "url": next_url}] if next_url else []
    return {"resourceType": "Bundle", "type": "searchset", "link": links,
            "entry": [{"resource": e, "search": {"mode": "match"}} for e in entries]}  # fmt: skip


def test_paging_follows_next_links_on_the_same_origin(httpserver: HTTPServer) -> None:
    page2 = httpserver.url_for(f"{BASE}/Patient") + "?page=2"
    httpserver.expect_ordered_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "a"}], page2))
    )
    httpserver.expect_ordered_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "b"}], "Patient?page=3"))
    )
    httpserver.expect_ordered_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "c"}]))
    )
    with FhirClient(settings(httpserver)) as client:
        found = [r["id"] for r in client.search_all("Patient", {"_count": "1"})]
    assert found == ["a", "b", "c"]  # an absolute link, then a relative one


def test_paging_link_may_name_this_machine_either_way(httpserver: HTTPServer) -> None:
    page2 = f"http://localhost:{httpserver.port}{BASE}/Patient?page=2"
    httpserver.expect_ordered_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "a"}], page2))
    )
    httpserver.expect_ordered_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "b"}]))
    )
    with FhirClient(settings(httpserver)) as client:
        assert [r["id"] for r in client.search_all("Patient", {})] == ["a", "b"]


@pytest.mark.parametrize(
    "elsewhere",
    ["http://10.9.8.7:{port}/fhir/R4/Patient?page=2", "http://127.0.0.1:1/fhir/R4/Patient?p=2",
     "https://127.0.0.1:{port}/fhir/R4/Patient?page=2"],
    ids=["other-host", "other-port", "other-scheme"],
)  # fmt: skip
def test_paging_link_to_another_origin_is_not_followed(
    httpserver: HTTPServer, elsewhere: str
) -> None:
    link = elsewhere.format(port=httpserver.port)
    httpserver.expect_request(f"{BASE}/Patient").respond_with_response(
        fhir(_searchset([{"resourceType": "Patient", "id": "a"}], link))
    )
    with FhirClient(settings(httpserver)) as client, pytest.raises(ConfigurationError) as info:
        list(client.search_all("Patient", {}))
    assert "not followed" in str(info.value)
    assert len(httpserver.log) == 1


@pytest.mark.parametrize(
    "url", ["localhost:9", "127.0.0.1:8103/fhir/R4", "ftp://x/fhir", "http://", "http://h:port/"]
)
def test_invalid_base_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="FHIR_ADAPTER_FHIR_BASE_URL") as info:
        FhirClient(Settings(fhir_base_url=url))
    assert info.value.exit_code == 66
