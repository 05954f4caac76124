"""`fhir-adapter subscribe` against a scripted FHIR server: the Subscription it writes, the
wait for the server to activate it (HAPI does so asynchronously), the errors when the server
does not, and the update of its own earlier Subscription whatever that one's criteria."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from click.testing import CliRunner
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.cli import cli

TOKEN = "unit-bearer-token-0123456789"  # noqa: S105 - test credentials
CRITERIA = "Observation?code=urn:nct06677931:codes|masi"
ENDPOINT = "https://adapter.example/fhir/notify"
FHIR_JSON = "application/fhir+json"


class SubscriptionServer:
    """Holds Subscriptions; a new one reads ``requested`` for ``requested_reads`` GETs, then
    ``final`` (``active``, ``error``…), as a server activating it in the background does."""

    def __init__(self, final: str = "active", requested_reads: int = 2) -> None:
        self.final = final
        self.requested_reads = requested_reads
        self.held: dict[str, dict[str, Any]] = {}
        self.writes: list[tuple[str, str, dict[str, Any]]] = []
        self.reads = 0

    def __call__(self, request: Request) -> Response:
        path = request.path.removeprefix("/fhir")
        if request.method == "GET" and path == "/Subscription":
            found = [
                s for s in self.held.values() if s["channel"]["endpoint"] == request.args["url"]
            ]
            return self._json({"resourceType": "Bundle", "type": "searchset",
                               "entry": [{"resource": s, "search": {"mode": "match"}}
                                         for s in found]})  # fmt: skip
        if request.method == "POST" and path == "/Subscription":
            body = json.loads(request.get_data())
            self.writes.append(("POST", path, body))
            body["id"] = f"s{len(self.held) + 1}"
            self.held[body["id"]] = body
            return self._json(body, 201)
        match = re.fullmatch(r"/Subscription/(\w+)", path)
        assert match, path
        sid = match.group(1)
        if request.method == "PUT":
            body = json.loads(request.get_data())
            self.writes.append(("PUT", path, body))
            self.held[sid] = body
            return self._json(body)
        self.reads += 1
        held = dict(self.held[sid])
        if held["status"] == "requested" and self.reads > self.requested_reads:
            held["status"] = self.final
            if self.final == "error":
                held["error"] = "HAPI-0000: the endpoint refused the handshake"
            self.held[sid] = held
        return self._json(held)

    @staticmethod
    def _json(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body), status=status, content_type=FHIR_JSON)


def subscribe(httpserver: HTTPServer, server: SubscriptionServer, *args: str) -> Any:
    httpserver.expect_request(re.compile(r"/fhir/.*")).respond_with_handler(server)
    return CliRunner().invoke(
        cli,
        ["subscribe", "--server", httpserver.url_for("/fhir"), "--endpoint", ENDPOINT, *args],
        env={"FHIR_ADAPTER_WEBHOOK_TOKEN": TOKEN},
    )


def test_creates_the_subscription_and_waits_until_it_is_active(httpserver: HTTPServer) -> None:
    server = SubscriptionServer()
    result = subscribe(httpserver, server)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "subscription": "Subscription/s1",
        "action": "created",
        "status": "active",
        "criteria": CRITERIA,
        "endpoint": ENDPOINT,
    }
    ((method, _, body),) = server.writes
    assert method == "POST"
    assert body["status"] == "requested"
    assert body["criteria"] == CRITERIA  # no `:missing`: HAPI cannot match it
    assert body["channel"] == {
        "type": "rest-hook",
        "endpoint": ENDPOINT,
        "payload": FHIR_JSON,
        "header": [f"Authorization: Bearer {TOKEN}"],
    }
    assert server.reads == 3  # read until active


def test_no_wait(httpserver: HTTPServer) -> None:
    server = SubscriptionServer()
    result = subscribe(httpserver, server, "--wait", "0", "--payload", "none")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["status"] == "requested"
    assert server.reads == 0
    assert "payload" not in server.writes[0][2]["channel"]


@pytest.mark.parametrize(
    ("final", "wait", "message"),
    [
        ("error", "5", "set Subscription/s1 to 'error': HAPI-0000: the endpoint refused"),
        ("requested", "0.5", "Subscription/s1 is still 'requested' after 0.5 s"),
    ],
)
def test_a_subscription_the_server_does_not_activate(
    httpserver: HTTPServer, final: str, wait: str, message: str
) -> None:
    server = SubscriptionServer(final=final, requested_reads=1)
    result = subscribe(httpserver, server, "--wait", wait)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_updates_its_own_subscription_whatever_its_criteria(httpserver: HTTPServer) -> None:
    """An earlier version's Subscription (criteria with `:missing`) is replaced, not doubled;
    someone else's Subscription for the same endpoint is left alone."""
    server = SubscriptionServer()
    old = subscribe(httpserver, server, "--criteria", f"{CRITERIA}&performer:missing=false")
    assert old.exit_code == 0, old.output
    server.held["s2"] = {
        **server.held["s1"],
        "id": "s2",
        "reason": "another application's",
        "criteria": "Observation?code=http://loinc.org|1234-5",
    }
    result = subscribe(httpserver, server)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["action"] == "updated"
    method, path, body = server.writes[-1]
    assert (method, path) == ("PUT", "/Subscription/s1")
    assert (body["id"], body["status"], body["criteria"]) == ("s1", "active", CRITERIA)
    assert server.held["s2"]["criteria"] == "Observation?code=http://loinc.org|1234-5"
    assert len(server.writes) == 2
