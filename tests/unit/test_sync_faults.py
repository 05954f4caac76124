"""Fault injection against the sync engine (SPEC §7) with pytest-httpserver.

A fake FHIR server answers /metadata, the one paged search per type, and the transaction
Bundles; each case inspects the Bundles it received and what the outbox recorded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import ServerRejected, ServerUnavailable
from fhir_adapter.jsonout import dumpb
from fhir_adapter.settings import Settings
from fhir_adapter.sync.engine import Sender
from fhir_adapter.sync.outbox import Outbox
from tests.fakes import capability_statement

pytestmark = pytest.mark.usefixtures("no_jitter")

BASE = "/fhir/R4"
FHIR_JSON = "application/fhir+json"
SYSTEM = "urn:nct06677931:patient"
BAD = "S003"
BAD_TEXT = "Patient.gender: value 'bogus' is not in the value set AdministrativeGender"


def patient(key: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": key,
        "meta": {"tag": [{"system": SYSTEM, "code": key}]},
        "identifier": [{"system": SYSTEM, "value": key}],
        "gender": "bogus" if key == BAD else "female",
    }


KEYS = ["S001", "S002", "S003", "S004"]


def fhir(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type=FHIR_JSON)


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
    }


def key_of(entry: dict[str, Any]) -> str:
    return str(entry["resource"]["identifier"][0]["value"])


def created(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "response": {
            "status": "201 Created",
            "location": f"Patient/srv-{key_of(entry)}/_history/1",
            "etag": 'W/"1"',
        }
    }


def bundle_response(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}


class FakeServer:
    """/metadata, an empty search per type, and a transaction endpoint given by the test."""

    def __init__(
        self, server: HTTPServer, transaction: Callable[[dict[str, Any], int], Response]
    ) -> None:
        self.bundles: list[dict[str, Any]] = []
        self.searches: list[str] = []
        self._lock = threading.Lock()
        self._transaction = transaction
        server.expect_request(f"{BASE}/metadata").respond_with_response(
            fhir(capability_statement())
        )
        server.expect_request(f"{BASE}/Patient", method="GET").respond_with_handler(self.search)
        server.expect_request(f"{BASE}/", method="POST").respond_with_handler(self.post)

    def search(self, request: Request) -> Response:
        self.searches.append(request.query_string.decode())
        return fhir({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})

    def post(self, request: Request) -> Response:
        bundle = json.loads(request.get_data())
        with self._lock:
            self.bundles.append(bundle)
            number = len(self.bundles)
        return self._transaction(bundle, number)


def settings(server: HTTPServer, tmp_path: Path, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_base_url": server.url_for(BASE),
        "max_attempts": 3,
        "max_retry_seconds": 10,
        "connect_timeout_s": 0.5,
        "read_timeout_s": 0.5,
        "outbox_path": tmp_path / "outbox.sqlite",
    }
    values.update(over)
    return Settings(**values)


def staged_outbox(path: Path, keys: list[str] = KEYS) -> Outbox:
    outbox = Outbox(path)
    result = outbox.stage(
        [("participants.csv", patient(k), dumpb(patient(k))) for k in keys], lambda: set()
    )
    assert result.new == len(keys)
    return outbox


def sync(cfg: Settings, outbox: Outbox, bundle_size: int = 100) -> Any:
    with FhirClient(cfg) as client:
        return Sender(client, outbox, fhir_version="R4", bundle_size=bundle_size).run()


def states(outbox: Outbox) -> dict[str, tuple[str, str | None, str | None]]:
    out = {}
    for key in KEYS:
        row = outbox.row("Patient", f"{SYSTEM}|{key}")
        assert row is not None
        out[key] = (row.state, row.server_id, row.version_id)
    return out


def assert_landed_except_bad(outbox: Outbox) -> None:
    assert states(outbox) == {
        "S001": ("sent", "srv-S001", "1"),
        "S002": ("sent", "srv-S002", "1"),
        "S003": ("dead", None, None),
        "S004": ("sent", "srv-S004", "1"),
    }
    (letter,) = outbox.dead_letters()
    assert letter["resourceType"] == "Patient"
    assert letter["key"] == f"{SYSTEM}|{BAD}"
    assert letter["status"] == 400
    assert BAD_TEXT in letter["message"]
    assert letter["outcome"] == outcome(BAD_TEXT)


# -- a rejected entry -------------------------------------------------------------------------


def test_failed_entry_is_dead_lettered_and_the_rest_land(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    def transaction(bundle: dict[str, Any], _n: int) -> Response:
        answers = []
        for entry in bundle["entry"]:
            if entry["resource"]["gender"] == "bogus":
                answers.append(
                    {"response": {"status": "400 Bad Request", "outcome": outcome(BAD_TEXT)}}
                )
            else:
                answers.append(created(entry))
        return fhir(bundle_response(answers))

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        summary = sync(cfg, outbox)
        assert_landed_except_bad(outbox)
        assert (summary.created, summary.updated, summary.dead_lettered) == (3, 0, 1)
    assert summary.bundles == 1
    (bundle,) = fake.bundles  # one transaction, no bisection for a per-entry failure
    assert bundle["type"] == "transaction"
    assert [key_of(e) for e in bundle["entry"]] == KEYS
    assert all(e["request"] == {"method": "POST", "url": "Patient"} for e in bundle["entry"])
    assert all(e["fullUrl"].startswith("urn:uuid:") for e in bundle["entry"])
    assert all("id" not in e["resource"] for e in bundle["entry"])
    # one paged search for the type, by identifier system
    assert fake.searches == [f"identifier={SYSTEM.replace(':', '%3A')}%7C&_count=1000"]


def test_whole_bundle_rejection_is_bisected(httpserver: HTTPServer, tmp_path: Path) -> None:
    """An atomic server refuses the whole Bundle: halves are sent until the bad entry is alone."""

    def transaction(bundle: dict[str, Any], _n: int) -> Response:
        if any(e["resource"]["gender"] == "bogus" for e in bundle["entry"]):
            return fhir(outcome(BAD_TEXT), 400)
        return fhir(bundle_response([created(e) for e in bundle["entry"]]))

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        summary = sync(cfg, outbox)
        assert_landed_except_bad(outbox)
    assert [[key_of(e) for e in b["entry"]] for b in fake.bundles] == [
        ["S001", "S002", "S003", "S004"],
        ["S001", "S002"],
        ["S003", "S004"],
        ["S003"],
        ["S004"],
    ]
    # bundles counts the accepted ones: [S001, S002] and [S004]
    assert (summary.created, summary.dead_lettered, summary.bundles) == (3, 1, 2)
    # a refused Bundle applied nothing: the retried halves still create with plain POST
    assert all(e["request"]["method"] == "POST" for b in fake.bundles for e in b["entry"])


def test_every_entry_bad_dead_letters_each(httpserver: HTTPServer, tmp_path: Path) -> None:
    def transaction(_bundle: dict[str, Any], _n: int) -> Response:
        return fhir(outcome("nothing goes"), 400)

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert [d["key"] for d in outbox.dead_letters()] == [f"{SYSTEM}|S001", f"{SYSTEM}|S002"]
    assert [len(b["entry"]) for b in fake.bundles] == [2, 1, 1]
    assert summary.dead_lettered == 2


# -- an uncertain send ------------------------------------------------------------------------


def test_timed_out_transaction_is_retried_with_conditional_puts(
    httpserver: HTTPServer, tmp_path: Path, release: threading.Event
) -> None:
    """The first POST may have landed: the retry must match on the server, never POST again."""

    def transaction(bundle: dict[str, Any], n: int) -> Response:
        if n == 1:
            release.wait(2.0)  # past read_timeout_s; the server applies it late
            return fhir(bundle_response([created(e) for e in bundle["entry"]]))
        return fhir(
            bundle_response(
                [
                    {
                        "response": {
                            "status": "200 OK",
                            "location": f"Patient/srv-{key_of(e)}/_history/2",
                        }
                    }
                    for e in bundle["entry"]
                ]
            )
        )

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path)
    keys = ["S001", "S002"]
    with staged_outbox(cfg.outbox_path, keys) as outbox:
        summary = sync(cfg, outbox)
        for key in keys:
            row = outbox.row("Patient", f"{SYSTEM}|{key}")
            assert row is not None
            assert (row.state, row.server_id, row.version_id) == ("sent", f"srv-{key}", "2")
        assert outbox.dead_letters() == []
    assert len(fake.bundles) == 2
    first, second = fake.bundles
    assert [e["request"]["method"] for e in first["entry"]] == ["POST", "POST"]
    assert [e["request"] for e in second["entry"]] == [
        {"method": "PUT", "url": f"Patient?identifier={SYSTEM}|{key}"} for key in keys
    ]
    assert all("id" not in e["resource"] for e in second["entry"])
    assert (summary.created, summary.updated, summary.bundles) == (0, 2, 1)


def test_server_unreachable_leaves_rows_uncertain_then_resumes(
    httpserver: HTTPServer, tmp_path: Path, release: threading.Event
) -> None:
    """Every try times out: the sync fails as unavailable (exit 69), rows stay 'sending'; the
    next run searches the server again and sends conditional PUTs for them."""
    down = True

    def transaction(bundle: dict[str, Any], _n: int) -> Response:
        if down:
            release.wait(2.0)
        return fhir(bundle_response([created(e) for e in bundle["entry"]]))

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path, max_attempts=2)
    with staged_outbox(cfg.outbox_path, ["S001"]) as outbox:
        with pytest.raises(ServerUnavailable) as info:
            sync(cfg, outbox)
        assert info.value.exit_code == 69
        row = outbox.row("Patient", f"{SYSTEM}|S001")
        assert row is not None
        assert row.state == "sending"
        down = False
        release.set()
        sync(cfg, outbox)
        row = outbox.row("Patient", f"{SYSTEM}|S001")
        assert row is not None
        assert (row.state, row.server_id) == ("sent", "srv-S001")
    methods = [[e["request"]["method"] for e in b["entry"]] for b in fake.bundles]
    assert methods == [["POST"], ["PUT"], ["PUT"]]
    assert fake.bundles[2]["entry"][0]["request"]["url"] == f"Patient?identifier={SYSTEM}|S001"
    assert len(fake.searches) == 2  # the uncertain row is looked up again on the next run


# -- the version check ------------------------------------------------------------------------


def test_fhir_5_server_is_refused_and_nothing_written(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    httpserver.expect_request(f"{BASE}/metadata").respond_with_response(
        fhir(capability_statement("5.0.0"))
    )
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        with pytest.raises(ServerRejected) as info:
            sync(cfg, outbox)
        assert {s for s in (states(outbox)[k][0] for k in KEYS)} == {"pending"}
    message = str(info.value)
    assert "FHIR 5.0.0" in message
    assert "is R4" in message
    assert "refusing to write" in message
    assert [(r.method, r.path) for r, _ in httpserver.log] == [("GET", f"{BASE}/metadata")]


def test_a_refused_delete_is_dead_lettered_not_resent(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    """A server that refuses to delete (e.g. HAPI's referential integrity, 409) keeps the
    resource: the removal is dead-lettered with the server's reason, never turned into a PUT."""
    keys = ["S001", "S002"]

    def transaction(bundle: dict[str, Any], number: int) -> Response:
        answers = []
        for entry in bundle["entry"]:
            if entry["request"]["method"] == "DELETE":
                body = {"status": "409 Conflict", "outcome": outcome("referenced by Observation")}
                answers.append({"response": body})
            else:
                answers.append(created(entry))
        return fhir(bundle_response(answers))

    fake = FakeServer(httpserver, transaction)
    cfg = settings(httpserver, tmp_path)
    outbox = staged_outbox(cfg.outbox_path, keys)
    sync(cfg, outbox)
    # S002 is no longer in participants.csv, which was read whole
    staged = outbox.stage(
        [("participants.csv", patient("S001"), dumpb(patient("S001")))],
        lambda: {"participants.csv"},
    )
    assert (staged.deleted, staged.removed_keys) == (1, [("Patient", f"{SYSTEM}|S002")])
    summary = sync(cfg, outbox)
    assert summary.dead_lettered == 1
    methods = [e["request"]["method"] for b in fake.bundles[1:] for e in b["entry"]]
    assert methods == ["DELETE"]  # one DELETE, no PUT of the removed resource
    row = outbox.row("Patient", f"{SYSTEM}|S002")
    assert row is not None
    assert row.state == "dead"
    (letter,) = outbox.dead_letters()
    assert "referenced by Observation" in letter["message"]
