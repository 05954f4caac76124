"""The server-facing commands end to end against a scripted server: sync → a dead letter →
`dead-letters list` → fix → `dead-letters retry`; `outbox status`; exit codes 65 / 0 / 69."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.cli import cli
from fhir_adapter.generate import generate

FHIR_JSON = "application/fhir+json"
TYPES = [
    "AdverseEvent",
    "CodeSystem",
    "Consent",
    "Device",
    "Encounter",
    "Group",
    "Location",
    "Measure",
    "MeasureReport",
    "Observation",
    "Organization",
    "Patient",
    "Practitioner",
    "Provenance",
    "ResearchStudy",
    "ResearchSubject",
    "Substance",
]
REFUSED = "Patient.gender: value not accepted by this server"


class ScriptedServer:
    """Accepts every entry except the Patient of subject S002, until `fixed` is set."""

    def __init__(self) -> None:
        self.fixed = False
        self.transactions = 0

    def __call__(self, request: Request) -> Response:
        path = request.path.removeprefix("/fhir/R4").strip("/")
        if path == "metadata":
            return self._json(self._capabilities())
        if request.method == "GET":
            return self._json({"resourceType": "Bundle", "type": "searchset", "total": 0})
        self.transactions += 1
        bundle = json.loads(request.get_data())
        answers = [self._answer(entry) for entry in bundle["entry"]]
        return self._json(
            {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
        )

    def _answer(self, entry: dict[str, Any]) -> dict[str, Any]:
        resource = entry.get("resource", {})
        rtype = resource.get("resourceType")
        values = [i.get("value") for i in resource.get("identifier", []) if isinstance(i, dict)]
        if rtype == "Patient" and "S002" in values and not self.fixed:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": REFUSED}],
            }
            return {"response": {"status": "400 Bad Request", "outcome": outcome}}
        return {
            "response": {"status": "201 Created", "location": f"{rtype}/{uuid.uuid4()}/_history/1"}
        }

    @staticmethod
    def _capabilities() -> dict[str, Any]:
        params = [{"name": "identifier", "type": "token"}, {"name": "_tag", "type": "token"}]
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [{
                "mode": "server",
                "resource": [
                    {"type": t, "searchParam": params if t != "AdverseEvent" else params[1:]}
                    for t in TYPES
                ],
            }],
        }  # fmt: skip

    @staticmethod
    def _json(body: dict[str, Any]) -> Response:
        return Response(json.dumps(body), status=200, content_type=FHIR_JSON)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    generate(tmp_path / "data", n_participants=3, with_bad=False)
    return tmp_path / "data"


def test_dead_letter_round_trip(httpserver: HTTPServer, data: Path, tmp_path: Path) -> None:
    server = ScriptedServer()
    httpserver.expect_request("/fhir/R4", method="POST").respond_with_handler(server)
    httpserver.expect_request(re.compile(r"/fhir/R4/.*")).respond_with_handler(server)
    url = httpserver.url_for("/fhir/R4")
    outbox = tmp_path / "outbox.sqlite"
    runner = CliRunner()
    common = ["--server", url, "--outbox", str(outbox)]

    first = runner.invoke(cli, ["sync", str(data), *common, "--json"])
    assert first.exit_code == 65, first.output
    summary = json.loads(first.output.splitlines()[-1])
    assert summary["dead_lettered"] == 1
    assert summary["created"] > 100

    letters = runner.invoke(cli, ["dead-letters", "list", "--outbox", str(outbox)])
    (letter,) = [json.loads(line) for line in letters.output.splitlines()]
    assert letter["resourceType"] == "Patient"
    assert letter["key"] == "urn:nct06677931:patient|S002"
    assert letter["status"] == 400
    assert REFUSED in letter["message"]
    assert letter["outcome"]["issue"][0]["diagnostics"] == REFUSED

    status = runner.invoke(cli, ["outbox", "status", "--outbox", str(outbox), "--json"])
    counts = json.loads(status.output)["counts"]
    assert counts["Patient"]["dead"] == 1
    assert counts["Patient"]["sent"] >= 2
    # resources referring to the refused Patient wait for it rather than dangle
    assert sum(c.get("pending", 0) for c in counts.values()) > 0

    server.fixed = True
    retry = runner.invoke(cli, ["dead-letters", "retry", *common])
    assert retry.exit_code == 0, retry.output
    assert json.loads(retry.output)["requeued"] == 1
    status = runner.invoke(cli, ["outbox", "status", "--outbox", str(outbox), "--json"])
    counts = json.loads(status.output)["counts"]
    assert all(set(states) == {"sent"} for states in counts.values()), counts

    again = runner.invoke(cli, ["sync", str(data), *common, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.output.splitlines()[-1])
    assert (summary["created"], summary["updated"]) == (0, 0)
    text = runner.invoke(cli, ["outbox", "status", "--outbox", str(outbox)])
    assert "Patient" in text.output


def test_unreachable_server_exits_69_and_keeps_everything(data: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner(env={"FHIR_ADAPTER_MAX_ATTEMPTS": "2", "FHIR_ADAPTER_MAX_RETRY_SECONDS": "2"}).invoke(
        cli, ["sync", str(data), "--server", f"http://127.0.0.1:{port}/fhir/R4",
              "--outbox", str(tmp_path / "o.sqlite")],
    )  # fmt: skip
    assert result.exit_code == 69
    assert "cannot connect" in result.output
    assert "Traceback" not in result.output


def test_outbox_status_without_outbox(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["outbox", "status", "--outbox", str(tmp_path / "none.sqlite")]
    )
    assert result.exit_code == 0
    assert "no outbox" in result.output
