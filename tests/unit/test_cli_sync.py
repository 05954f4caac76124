"""The server-facing commands end to end against a scripted server: sync → a dead letter →
`dead-letters list` → fix → `dead-letters retry` / `drop`; `outbox status`; exit codes 65 / 0 /
69; and every user error (issue 8 item 7) by exit status and its one-line message."""

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
                "interaction": [{"code": "transaction"}],
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
    summary = json.loads(first.stdout)
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
    assert json.loads(retry.stdout)["requeued"] == 1
    status = runner.invoke(cli, ["outbox", "status", "--outbox", str(outbox), "--json"])
    counts = json.loads(status.output)["counts"]
    assert all(set(states) == {"sent"} for states in counts.values()), counts

    again = runner.invoke(cli, ["sync", str(data), *common, "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
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


@pytest.mark.parametrize(
    "command", [["outbox", "status"], ["outbox", "status", "--json"], ["dead-letters", "list"]]
)
def test_read_only_commands_create_no_outbox(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "state" / "none.sqlite"
    result = CliRunner().invoke(cli, [*command, "--outbox", str(missing)])
    assert result.exit_code == 0, result.output
    assert "no outbox" in result.output
    assert list(tmp_path.iterdir()) == []  # not the file, not its directory, no lock


def _serve(httpserver: HTTPServer, server: ScriptedServer) -> str:
    httpserver.expect_request("/fhir/R4", method="POST").respond_with_handler(server)
    httpserver.expect_request(re.compile(r"/fhir/R4/.*")).respond_with_handler(server)
    return httpserver.url_for("/fhir/R4")


def test_dead_letter_drop_acknowledges_it(
    httpserver: HTTPServer, data: Path, tmp_path: Path
) -> None:
    url = _serve(httpserver, ScriptedServer())
    outbox = tmp_path / "outbox.sqlite"
    common = ["--server", url, "--outbox", str(outbox)]
    runner = CliRunner()
    assert runner.invoke(cli, ["sync", str(data), *common, "--json"]).exit_code == 65
    (letter,) = [json.loads(x) for x in runner.invoke(cli, ["dead-letters", "list", "--outbox", str(outbox)]).output.splitlines()]  # fmt: skip
    assert letter["operation"] == "POST"

    unknown = runner.invoke(cli, ["dead-letters", "drop", "999", "--outbox", str(outbox)])
    assert unknown.exit_code == 2
    assert "no dead letter 999" in unknown.output

    dropped = runner.invoke(
        cli, ["dead-letters", "drop", str(letter["id"]), "--outbox", str(outbox)]
    )
    assert dropped.exit_code == 0, dropped.output
    assert f"dropped {letter['id']}: Patient urn:nct06677931:patient|S002" in dropped.output
    listed = runner.invoke(cli, ["dead-letters", "list", "--outbox", str(outbox)])
    assert listed.output.strip() == ""
    # still held back: what refers to the refused Patient waits (exit 65), nothing is resent
    again = runner.invoke(cli, ["sync", str(data), *common, "--json"])
    assert again.exit_code == 65, again.output
    summary = json.loads(again.stdout)
    assert (summary["dead_letters"], summary["created"]) == (0, 0)
    assert summary["blocked"] > 0
    assert "held back" in again.output


# -- user errors: one line, the documented status, never 70 ------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _isolated(extra: dict[str, str] | None = None) -> dict[str, str | None]:
    """CliRunner's environment: every FHIR_ADAPTER_* variable of the caller unset."""
    import os

    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FHIR_ADAPTER_")}
    env.update(extra or {})
    return env


SMART = {
    "FHIR_ADAPTER_FHIR_AUTH": "smart",
    "FHIR_ADAPTER_SMART_TOKEN_URL": "http://127.0.0.1:1/token",
    "FHIR_ADAPTER_SMART_CLIENT_ID": "adapter",
}


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--server", "localhost:9"], {}, 2, "Invalid value for '--server': 'localhost:9' is not an http(s) URL"),
        (["--server", "ftp://h/fhir"], {}, 2, "is not an http(s) URL"),
        ([], {"FHIR_ADAPTER_FHIR_BASE_URL": "localhost:9"}, 66, "FHIR_ADAPTER_FHIR_BASE_URL 'localhost:9' is not an http(s) URL"),
        (["--auth", "bearer"], {}, 66, "FHIR_ADAPTER_FHIR_AUTH=bearer needs FHIR_ADAPTER_FHIR_TOKEN"),
        (["--auth", "smart"], {}, 66, "needs FHIR_ADAPTER_SMART_TOKEN_URL and FHIR_ADAPTER_SMART_CLIENT_ID"),
        ([], {**SMART}, 66, "needs FHIR_ADAPTER_SMART_PRIVATE_KEY or FHIR_ADAPTER_SMART_PRIVATE_KEY_PATH"),
        ([], {**SMART, "FHIR_ADAPTER_SMART_PRIVATE_KEY": "not-a-key"}, 66, "not a PEM private key usable with RS384"),
        ([], {**SMART, "FHIR_ADAPTER_SMART_PRIVATE_KEY_PATH": "/nonexistent/key.pem"}, 66, "SMART_PRIVATE_KEY_PATH cannot be read"),
        (["--server", "http://fhir.hospital.example/fhir/R4", "--auth", "bearer"], {"FHIR_ADAPTER_FHIR_TOKEN": "t"}, 66, "refusing to send credentials unencrypted"),
        ([], {"FHIR_ADAPTER_MAX_ATTEMPTS": "many"}, 66, "FHIR_ADAPTER_MAX_ATTEMPTS"),
        ([], {"FHIR_ADAPTER_MAX_REMOVAL_SHARE": "2"}, 66, "FHIR_ADAPTER_MAX_REMOVAL_SHARE"),
        (["--bundle-size", "0"], {}, 2, "Invalid value for '--bundle-size'"),
        (["--server", "http://127.0.0.1:{closed}/fhir/R4"], {"FHIR_ADAPTER_MAX_ATTEMPTS": "1"}, 69, "cannot connect to the FHIR server"),
    ],
    ids=[
        "server-without-scheme", "server-ftp", "base-url-setting", "bearer-without-token",
        "smart-incomplete", "smart-without-key", "smart-bad-key", "smart-key-file-missing",
        "credentials-over-http", "bad-setting", "bad-removal-share", "bundle-size-0",
        "connection-refused",
    ],
)  # fmt: skip
def test_user_errors_of_sync(
    data: Path,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    code: int,
    message: str,
) -> None:
    args = [a.replace("{closed}", str(_closed_port())) for a in args]
    outbox = tmp_path / "o.sqlite"
    result = CliRunner(env=_isolated(env)).invoke(
        cli, ["sync", str(data), "--outbox", str(outbox), *args]
    )
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert "internal error" not in result.output
    if code == 66:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("directory", "cannot open the outbox"),
        ("text-file", "cannot use"),
        ("under-a-file", "cannot open the outbox"),
    ],
)
def test_unusable_outbox_path_is_a_configuration_error(
    data: Path, tmp_path: Path, setup: str, message: str
) -> None:
    if setup == "directory":
        outbox = tmp_path / "a-directory"
        outbox.mkdir()
    elif setup == "text-file":
        outbox = tmp_path / "notes.txt"
        outbox.write_text("not a database\n" * 100, encoding="utf-8")
    else:
        (tmp_path / "file").write_text("x", encoding="utf-8")
        outbox = tmp_path / "file" / "outbox.sqlite"
    result = CliRunner(env=_isolated()).invoke(
        cli, ["sync", str(data), "--server", f"http://127.0.0.1:{_closed_port()}/fhir/R4",
              "--outbox", str(outbox)],
    )  # fmt: skip
    assert result.exit_code == 66, result.output
    assert message in result.output
    assert "internal error" not in result.output


def test_missing_directory_is_unreadable_input(tmp_path: Path) -> None:
    result = CliRunner(env=_isolated()).invoke(
        cli, ["sync", str(tmp_path / "nowhere"), "--outbox", str(tmp_path / "o.sqlite")]
    )
    assert result.exit_code == 66, result.output
    assert "participants.csv is required" in result.output


def test_reconcile_and_retry_without_an_outbox(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sqlite")
    for command in (["reconcile"], ["dead-letters", "retry"], ["dead-letters", "drop", "1"]):
        result = CliRunner(env=_isolated()).invoke(cli, [*command, "--outbox", missing])
        assert result.exit_code == 66, (command, result.output)
        assert "no outbox at" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_waits_then_gives_up_with_69(
    httpserver: HTTPServer, data: Path, tmp_path: Path
) -> None:
    from fhir_adapter.sync.outbox import writer_lock

    url = _serve(httpserver, ScriptedServer())
    outbox = tmp_path / "outbox.sqlite"
    runner = CliRunner(env=_isolated({"FHIR_ADAPTER_LOCK_TIMEOUT_S": "0.3"}))
    with writer_lock(outbox, 1):  # another sync (or the webhook's worker) is writing
        busy = runner.invoke(cli, ["sync", str(data), "--server", url, "--outbox", str(outbox)])
    assert busy.exit_code == 69, busy.output
    assert f"the outbox {outbox} is in use by another writer (process " in busy.output
    assert "FHIR_ADAPTER_LOCK_TIMEOUT_S" in busy.output
    assert not any(r.method == "POST" for r, _ in httpserver.log)  # nothing sent
    free = runner.invoke(cli, ["sync", str(data), "--server", url, "--outbox", str(outbox)])
    assert free.exit_code == 65, free.output  # the scripted server refuses S002


@pytest.mark.parametrize(
    "command",
    [
        ["report", "--out", "{tmp}/r"],
        ["query", "--out", "{tmp}/q"],
        ["export", "--out", "{tmp}/e"],
        ["view", "{views}/subjects.json"],
        ["reconcile"],
        ["subscribe", "--endpoint", "http://127.0.0.1:1/fhir/notify"],
    ],
    ids=lambda c: c[0],
)
def test_every_server_option_refuses_a_url_without_scheme_as_usage(
    tmp_path: Path, command: list[str]
) -> None:
    """The same --server check everywhere: exit 2 naming the option, not 66 naming a setting."""
    from fhir_adapter.trial import default_mappings_dir

    views = default_mappings_dir() / "views"
    args = [a.replace("{tmp}", str(tmp_path)).replace("{views}", str(views)) for a in command]
    result = CliRunner(env=_isolated({})).invoke(cli, [*args, "--server", "localhost:9"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--server': 'localhost:9' is not an http(s) URL" in result.output
    assert "FHIR_ADAPTER_FHIR_BASE_URL" not in result.output
