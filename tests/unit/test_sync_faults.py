"""Fault injection against the sync engine (SPEC §7, issue 8) with pytest-httpserver.

`FakeFhir` is a small in-memory FHIR server (create, update by id with If-Match, delete,
search by identifier or ``_tag``, transaction / batch Bundles processed entry by entry like
the test server, single requests). A test scripts what goes wrong — before or after the server
applied a Bundle, for the whole Bundle or one entry — and checks what the fake holds afterwards
(one resource per business key) and what the outbox recorded.
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
from fhir_adapter.errors import ConfigurationError
from fhir_adapter.jsonout import dumpb
from fhir_adapter.settings import Settings
from fhir_adapter.sync.engine import Sender, SendSummary
from fhir_adapter.sync.outbox import Outbox

pytestmark = pytest.mark.usefixtures("no_jitter")

BASE = "/fhir/R4"
FHIR_JSON = "application/fhir+json"
SYSTEM = "urn:nct06677931:patient"
OBS = "urn:nct06677931:observation"
BAD = "S003"
BAD_TEXT = "Patient.gender: value 'bogus' is not in the value set AdministrativeGender"
KEYS = ["S001", "S002", "S003", "S004"]


def patient(key: str, gender: str = "female") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": key,
        "meta": {"tag": [{"system": SYSTEM, "code": key}]},
        "identifier": [{"system": SYSTEM, "value": key}],
        "gender": "bogus" if key == BAD else gender,
    }


def observation(key: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": key,
        "meta": {"tag": [{"system": OBS, "code": key}]},
        "identifier": [{"system": OBS, "value": key}],
        "status": "final",
        "code": {"text": "MASI"},
        "subject": {"reference": f"Patient/{subject}"},
        "valueQuantity": {"value": 12.0},
    }


def fhir(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status=status, headers=headers, content_type=FHIR_JSON)


def outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": text}],
    }


def capabilities(interactions: tuple[str, ...] = ("transaction", "batch")) -> dict[str, Any]:
    params = [{"name": "identifier", "type": "token"}, {"name": "_tag", "type": "token"}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": c} for c in interactions],
                "resource": [
                    {"type": t, "searchParam": params, "updateCreate": False}
                    for t in ("Patient", "Observation")
                ],
            }
        ],
    }


Entry = dict[str, Any]
Answer = dict[str, Any]


class FakeFhir:
    """An in-memory FHIR server. Hooks:

    - ``before(bundle, n)``: a Response to answer *without applying* the n-th Bundle;
    - ``after(bundle, n, answer)``: a Response to answer *after applying* it;
    - ``entry(entry, n)``: an answer for one entry *without applying* it;
    - ``answer(entry, n, answer)``: the answer of an applied entry, changed.
    """

    def __init__(
        self, server: HTTPServer, interactions: tuple[str, ...] = ("transaction", "batch")
    ):
        self.store: dict[str, dict[str, dict[str, Any]]] = {}
        self.bundles: list[dict[str, Any]] = []
        self.singles: list[tuple[str, str]] = []
        self.searches: list[str] = []
        self.before: Callable[[dict[str, Any], int], Response | None] = lambda _b, _n: None
        self.after: Callable[[dict[str, Any], int, dict[str, Any]], Response | None] = (
            lambda _b, _n, _a: None
        )
        self.entry: Callable[[Entry, int], Answer | None] = lambda _e, _n: None
        self.answer: Callable[[Entry, int, Answer], Answer] = lambda _e, _n, a: a
        self._lock = threading.Lock()
        self._ids = 0
        server.expect_request(f"{BASE}/metadata").respond_with_response(
            fhir(capabilities(interactions))
        )
        server.expect_request(f"{BASE}/", method="POST").respond_with_handler(self.post_bundle)
        for rtype in ("Patient", "Observation"):
            server.expect_request(f"{BASE}/{rtype}", method="GET").respond_with_handler(self.search)
            server.expect_request(f"{BASE}/{rtype}", method="POST").respond_with_handler(
                self.single
            )
        import re

        server.expect_request(re.compile(rf"{BASE}/(Patient|Observation)/.+")).respond_with_handler(
            self.single
        )

    # -- the data ------------------------------------------------------------------------
    def held(self, rtype: str = "Patient") -> dict[str, list[dict[str, Any]]]:
        """Business value -> resources holding it."""
        out: dict[str, list[dict[str, Any]]] = {}
        for resource in self.store.get(rtype, {}).values():
            out.setdefault(resource["identifier"][0]["value"], []).append(resource)
        return out

    def apply(self, entry: Entry) -> Answer:
        request = entry["request"]
        method, url = request["method"], request["url"]
        rtype, _, rid = url.partition("/")
        table = self.store.setdefault(rtype, {})
        if method == "POST":
            self._ids += 1
            rid = f"srv{self._ids}"
            table[rid] = {**entry["resource"], "id": rid, "meta": {**entry["resource"].get("meta", {}), "versionId": "1"}}  # fmt: skip
            return {"response": {"status": "201 Created", "location": f"{rtype}/{rid}/_history/1", "etag": 'W/"1"'}}  # fmt: skip
        if method == "DELETE":
            table.pop(rid, None)
            return {"response": {"status": "204 No Content"}}
        if rid not in table:
            return {"response": {"status": "405", "outcome": outcome("no update as create")}}
        version = str(int(table[rid]["meta"]["versionId"]) + 1)
        if request.get("ifMatch") and request["ifMatch"] != f'W/"{int(version) - 1}"':
            return {"response": {"status": "412", "outcome": outcome("version mismatch")}}
        table[rid] = {**entry["resource"], "id": rid, "meta": {**entry["resource"].get("meta", {}), "versionId": version}}  # fmt: skip
        return {"response": {"status": "200 OK", "location": f"{rtype}/{rid}/_history/{version}", "etag": f'W/"{version}"'}}  # fmt: skip

    # -- handlers ------------------------------------------------------------------------
    def search(self, request: Request) -> Response:
        with self._lock:
            self.searches.append(request.query_string.decode())
            rtype = request.path.rsplit("/", 1)[1]
            value = request.args.get("identifier") or request.args.get("_tag") or ""
            system = value.split("|", 1)[0]
            found = [
                {"resource": r, "search": {"mode": "match"}}
                for r in self.store.get(rtype, {}).values()
                if any(t["system"] == system for t in r["meta"].get("tag", []))
            ]
        return fhir({"resourceType": "Bundle", "type": "searchset", "total": len(found), "entry": found})  # fmt: skip

    def post_bundle(self, request: Request) -> Response:
        bundle = json.loads(request.get_data())
        with self._lock:
            self.bundles.append(bundle)
            n = len(self.bundles)
            early = self.before(bundle, n)
            if early is not None:
                return early
            answers = []
            for entry in bundle["entry"]:
                scripted = self.entry(entry, n)
                if scripted is not None:
                    answers.append(scripted)
                    continue
                answers.append(self.answer(entry, n, self.apply(entry)))
            kind = "batch-response" if bundle["type"] == "batch" else "transaction-response"
            response = {"resourceType": "Bundle", "type": kind, "entry": answers}
            late = self.after(bundle, n, response)
        return late if late is not None else fhir(response)

    def single(self, request: Request) -> Response:
        url = request.path.removeprefix(f"{BASE}/")
        entry: Entry = {"request": {"method": request.method, "url": url}}
        if request.headers.get("If-Match"):
            entry["request"]["ifMatch"] = request.headers["If-Match"]
        if request.get_data():
            entry["resource"] = json.loads(request.get_data())
        with self._lock:
            self.singles.append((request.method, url))
            scripted = self.entry(entry, len(self.singles))
            answer = scripted or self.apply(entry)
        response = answer["response"]
        status = int(response["status"].split()[0])
        headers = {"Location": response["location"]} if "location" in response else {}
        return fhir(response.get("outcome") or entry.get("resource") or {}, status, headers)


@pytest.fixture
def fake(httpserver: HTTPServer) -> FakeFhir:
    return FakeFhir(httpserver)


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


Staged = list[tuple[str, dict[str, Any], bytes]]


def items(resources: list[dict[str, Any]]) -> Staged:
    return [("participants.csv", r, dumpb(r)) for r in resources]


def staged_outbox(path: Path, keys: list[str] = KEYS) -> Outbox:
    outbox = Outbox(path)
    result = outbox.stage(items([patient(k) for k in keys]), set)
    assert result.new == len(keys)
    return outbox


def sync(cfg: Settings, outbox: Outbox, bundle_size: int = 100, **kw: Any) -> SendSummary:
    with FhirClient(cfg) as client:
        return Sender(client, outbox, fhir_version="R4", bundle_size=bundle_size, **kw).run()


def states(outbox: Outbox, keys: list[str] = KEYS) -> dict[str, tuple[str, str | None]]:
    out = {}
    for key in keys:
        row = outbox.row("Patient", f"{SYSTEM}|{key}")
        assert row is not None
        out[key] = (row.state, row.server_id)
    return out


def assert_once_each(fake: FakeFhir, keys: list[str], rtype: str = "Patient") -> None:
    held = fake.held(rtype)
    assert {k: len(v) for k, v in held.items()} == dict.fromkeys(keys, 1)


def recorded_ids_match(fake: FakeFhir, outbox: Outbox, keys: list[str]) -> bool:
    held = fake.held()
    return {k: held[k][0]["id"] for k in keys} == {k: sid for k, (_, sid) in states(outbox, keys).items()}  # fmt: skip


# -- refused ----------------------------------------------------------------------------------
def refuse_bad(entry: Entry, _n: int) -> Answer | None:
    if entry.get("resource", {}).get("gender") == "bogus":
        return {"response": {"status": "400 Bad Request", "outcome": outcome(BAD_TEXT)}}
    return None


def test_refused_entry_is_dead_lettered_and_the_rest_land(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake.entry = refuse_bad
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        summary = sync(cfg, outbox)
        assert {k: s for k, (s, _) in states(outbox).items()} == {
            "S001": "sent", "S002": "sent", "S003": "dead", "S004": "sent"
        }  # fmt: skip
        (letter,) = outbox.dead_letters()
        assert (letter["resourceType"], letter["key"]) == ("Patient", f"{SYSTEM}|{BAD}")
        assert (letter["status"], letter["operation"]) == (400, "POST")
        assert BAD_TEXT in letter["message"]  # the dead letter keeps the server's words
        assert letter["outcome"] == outcome(BAD_TEXT)
    assert (summary.created, summary.dead_lettered, summary.dead_letters) == (3, 1, 1)
    (bundle,) = fake.bundles  # one transaction, no bisection for a per-entry refusal
    assert bundle["type"] == "transaction"
    assert all(e["request"] == {"method": "POST", "url": "Patient"} for e in bundle["entry"])
    assert "urn:uuid" not in json.dumps(bundle)  # not atomic: nothing refers inside a Bundle
    assert all("id" not in e["resource"] for e in bundle["entry"])
    assert fake.searches == [f"identifier={SYSTEM.replace(':', '%3A')}%7C&_count=1000"]
    assert_once_each(fake, ["S001", "S002", "S004"])


def test_refusal_is_not_logged_verbatim(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.entry = refuse_bad
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        sync(cfg, outbox)
    assert "dead-lettered Patient" in caplog.text
    assert "bogus" not in caplog.text
    assert "AdministrativeGender" not in caplog.text


def test_whole_bundle_rejection_is_bisected(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    """An atomic server refuses the whole Bundle: halves are sent until the bad entry is alone."""

    def atomic(bundle: dict[str, Any], _n: int) -> Response | None:
        if any(e["resource"]["gender"] == "bogus" for e in bundle["entry"]):
            return fhir(outcome(BAD_TEXT), 400)
        return None

    fake.before = atomic
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        summary = sync(cfg, outbox)
        assert [s for s, _ in states(outbox).values()] == ["sent", "sent", "dead", "sent"]
    keys = [[e["resource"]["identifier"][0]["value"] for e in b["entry"]] for b in fake.bundles]
    assert keys == [KEYS, ["S001", "S002"], ["S003", "S004"], ["S003"], ["S004"]]
    assert (summary.created, summary.dead_lettered, summary.bundles) == (3, 1, 2)
    assert_once_each(fake, ["S001", "S002", "S004"])


def test_every_entry_bad_dead_letters_each(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake.before = lambda _b, _n: fhir(outcome("nothing goes"), 400)
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert [d["key"] for d in outbox.dead_letters()] == [f"{SYSTEM}|S001", f"{SYSTEM}|S002"]
    assert [len(b["entry"]) for b in fake.bundles] == [2, 1, 1]
    assert summary.dead_lettered == 2


# -- uncertain: maybe applied -----------------------------------------------------------------
@pytest.mark.parametrize(
    "late",
    [
        lambda: fhir(outcome("internal error"), 500),
        lambda: fhir(outcome("bad gateway"), 502),
        lambda: fhir(outcome("gateway timeout"), 504),
        lambda: Response("<html>proxy</html>", status=200, content_type="text/html"),
        lambda: fhir({"resourceType": "OperationOutcome", "issue": []}, 200),
        lambda: fhir({"resourceType": "Bundle", "type": "transaction-response", "entry": []}),
    ],
    ids=["500", "502", "504", "200-html", "200-not-a-bundle", "200-too-few-entries"],
)
def test_applied_then_uncertain_answer_is_looked_up_not_resent(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path, late: Callable[[], Response]
) -> None:
    fake.after = lambda _b, n, _a: late() if n == 1 else None
    cfg = settings(httpserver, tmp_path)
    keys = ["S001", "S002"]
    with staged_outbox(cfg.outbox_path, keys) as outbox:
        summary = sync(cfg, outbox)
        assert [s for s, _ in states(outbox, keys).values()] == ["sent", "sent"]
        assert recorded_ids_match(fake, outbox, keys)
    assert len(fake.bundles) == 1  # found on the server: nothing sent again
    assert len(fake.searches) == 2  # the first learn, then the look-up
    assert (summary.created, summary.undelivered) == (2, 0)
    assert_once_each(fake, keys)


def test_timed_out_transaction_that_landed_late_is_found(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path, release: threading.Event
) -> None:
    """The first POST times out while the server applies it: the look-up finds it."""

    def slow(_b: dict[str, Any], n: int, _a: dict[str, Any]) -> None:
        if n == 1:
            release.wait(1.0)  # past read_timeout_s; the look-up waits for the server

    fake.after = slow
    cfg = settings(httpserver, tmp_path)
    keys = ["S001", "S002"]
    with staged_outbox(cfg.outbox_path, keys) as outbox:
        summary = sync(cfg, outbox)
        assert recorded_ids_match(fake, outbox, keys)
    assert len(fake.bundles) == 1
    assert summary.undelivered == 0
    assert_once_each(fake, keys)


def test_entry_500_not_applied_is_looked_up_and_created_once(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    def first_try_of_s002_fails(entry: Entry, n: int) -> Answer | None:
        if n == 1 and entry["resource"]["identifier"][0]["value"] == "S002":
            return {"response": {"status": "500", "outcome": outcome("disk full")}}
        return None

    fake.entry = first_try_of_s002_fails
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002", "S003x"]) as outbox:
        sync(cfg, outbox)
        assert {s for s, _ in states(outbox, ["S001", "S002"]).values()} == {"sent"}
    assert [
        [e["resource"]["identifier"][0]["value"] for e in b["entry"]] for b in fake.bundles
    ] == [
        ["S001", "S002", "S003x"],
        ["S002"],  # missing after the look-up: created, once
    ]
    assert_once_each(fake, ["S001", "S002", "S003x"])


def test_2xx_entry_without_location_is_looked_up(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    def no_location(_e: Entry, _n: int, answer: Answer) -> Answer:
        answer["response"].pop("location", None)
        return answer

    fake.answer = no_location
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert recorded_ids_match(fake, outbox, ["S001", "S002"])
    assert (len(fake.bundles), len(fake.searches), summary.undelivered) == (1, 2, 0)


def test_uncertain_for_as_long_as_it_lasts_is_left_pending(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    """500 without applying, every time: after the retry budget the rows stay undelivered."""
    fake.before = lambda _b, _n: fhir(outcome("down"), 500)
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert [s for s, _ in states(outbox, ["S001", "S002"]).values()] == ["pending"] * 2
    assert (summary.undelivered, summary.created, summary.dead_lettered) == (2, 0, 0)
    assert summary.undelivered_reason is not None
    assert "HTTP 500" in summary.undelivered_reason
    assert "down" not in summary.undelivered_reason  # no server diagnostics in messages
    assert len(fake.bundles) == cfg.max_attempts
    assert fake.held() == {}


# -- not applied ------------------------------------------------------------------------------
def test_503_then_success_sends_the_same_bundle_again_without_look_up(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake.before = lambda _b, n: fhir(outcome("busy"), 503, {"Retry-After": "0"}) if n < 3 else None
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
    assert len(fake.bundles) == 3
    assert fake.bundles[0] == fake.bundles[2]  # the same POSTs: nothing was applied
    assert len(fake.searches) == 1
    assert (summary.created, summary.undelivered) == (2, 0)
    assert_once_each(fake, ["S001", "S002"])


def test_entry_503_resends_only_that_entry(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    def busy(entry: Entry, n: int) -> Answer | None:
        if n == 1 and entry["resource"]["identifier"][0]["value"] == "S002":
            return {"response": {"status": "503"}}
        return None

    fake.entry = busy
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        sync(cfg, outbox)
    assert [len(b["entry"]) for b in fake.bundles] == [2, 1]
    assert len(fake.searches) == 1
    assert_once_each(fake, ["S001", "S002"])


@pytest.mark.parametrize("status", ["503", "500"])
def test_entry_answer_that_outlasts_the_retries_is_undelivered_not_success(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path, status: str
) -> None:
    """One entry answered 503 (not applied) or 500 (not applied, uncertain) on every try: the
    others land once, that one stays pending and the sync says so (exit 69, never 0)."""

    def always(entry: Entry, _n: int) -> Answer | None:
        if entry["resource"]["identifier"][0]["value"] == "S002":
            return {"response": {"status": status}}
        return None

    fake.entry = always
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert [s for s, _ in states(outbox, ["S001", "S002"]).values()] == ["sent", "pending"]
    assert (summary.created, summary.undelivered, summary.dead_lettered) == (1, 1, 0)
    assert summary.undelivered_reason is not None
    assert f"HTTP {status}" in summary.undelivered_reason
    assert set(fake.held()) == {"S001"}  # S002 never applied
    assert_once_each(fake, ["S001"])
    assert len(fake.bundles) <= cfg.max_attempts + 1  # bounded: the retry budget, no loop


def test_503_forever_reports_undelivered_and_resumes_later(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    down = True
    fake.before = lambda _b, _n: fhir(outcome("maintenance"), 503, {"Retry-After": "0"}) if down else None  # fmt: skip
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert summary.undelivered == 2
        assert summary.undelivered_reason is not None
        assert "HTTP 503" in summary.undelivered_reason
        assert [s for s, _ in states(outbox, ["S001", "S002"]).values()] == ["pending"] * 2
        down = False
        again = sync(cfg, outbox)
        assert (again.created, again.undelivered, again.undelivered_reason) == (2, 0, None)
    assert len(fake.bundles) == cfg.max_attempts + 1
    assert_once_each(fake, ["S001", "S002"])


def test_unreachable_at_the_start_reports_undelivered(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = Settings(fhir_base_url=f"http://127.0.0.1:{port}{BASE}", max_attempts=2,
                   outbox_path=tmp_path / "o.sqlite")  # fmt: skip
    with staged_outbox(cfg.outbox_path, ["S001"]) as outbox:
        summary = sync(cfg, outbox)
    assert summary.undelivered == 1
    assert summary.undelivered_reason is not None
    assert "cannot connect" in summary.undelivered_reason


# -- what the server already holds ------------------------------------------------------------
def test_lost_outbox_matches_what_the_server_holds_without_writing(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        sync(cfg, outbox)
    cfg.outbox_path.unlink()
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
        assert recorded_ids_match(fake, outbox, ["S001", "S002"])
    assert (summary.matched, summary.created, summary.updated, summary.bundles) == (2, 0, 0, 0)
    assert len(fake.bundles) == 1  # the first run's only
    assert {r[0]["meta"]["versionId"] for r in fake.held().values()} == {"1"}


def test_fhir_5_server_is_refused_and_nothing_written(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    statement = {**capabilities(), "fhirVersion": "5.0.0"}
    httpserver.expect_request(f"{BASE}/metadata").respond_with_response(fhir(statement))
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path) as outbox:
        with pytest.raises(ConfigurationError) as info:
            sync(cfg, outbox)
        assert {s for s, _ in states(outbox).values()} == {"pending"}
    assert info.value.exit_code == 66
    assert "FHIR 5.0.0" in str(info.value)
    assert "refusing to write" in str(info.value)
    assert [(r.method, r.path) for r, _ in httpserver.log] == [("GET", f"{BASE}/metadata")]


# -- references: dependency layers ------------------------------------------------------------
def with_observations(path: Path, subjects: list[str]) -> Outbox:
    outbox = Outbox(path)
    resources = [patient(s) for s in subjects] + [observation(f"{s}-masi", s) for s in subjects]
    outbox.stage(items(resources), set)
    return outbox


def test_referrers_go_in_a_later_bundle_with_the_server_id(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    cfg = settings(httpserver, tmp_path)
    with with_observations(cfg.outbox_path, ["S001", "S002"]) as outbox:
        summary = sync(cfg, outbox)
    assert [[e["resource"]["resourceType"] for e in b["entry"]] for b in fake.bundles] == [
        ["Patient", "Patient"],
        ["Observation", "Observation"],
    ]
    ids = {v: r[0]["id"] for v, r in fake.held().items()}
    assert [e["resource"]["subject"] for e in fake.bundles[1]["entry"]] == [
        {"reference": f"Patient/{ids['S001']}"},
        {"reference": f"Patient/{ids['S002']}"},
    ]
    assert summary.created == 4


def test_referrer_of_a_refused_target_is_held_back_until_it_lands(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake.entry = refuse_bad
    cfg = settings(httpserver, tmp_path)
    with with_observations(cfg.outbox_path, ["S001", BAD]) as outbox:
        first = sync(cfg, outbox)
        assert (first.dead_lettered, first.blocked, first.undelivered) == (1, 1, 0)
        held_back = outbox.row("Observation", f"{OBS}|{BAD}-masi")
        assert held_back is not None
        assert held_back.state == "pending"
        assert f"{BAD}-masi" not in fake.held("Observation")
        # the source is fixed: the Patient changes, lands; the Observation follows it
        fixed = {**patient(BAD), "gender": "male"}
        outbox.stage(items([patient("S001"), fixed, observation("S001-masi", "S001"), observation(f"{BAD}-masi", BAD)]), set)  # fmt: skip
        second = sync(cfg, outbox)
        assert (second.created, second.blocked, second.dead_letters) == (2, 0, 0)
    ids = {v: r[0]["id"] for v, r in fake.held().items()}
    (obs,) = fake.held("Observation")[f"{BAD}-masi"]
    assert obs["subject"] == {"reference": f"Patient/{ids[BAD]}"}


def test_atomic_server_gets_one_transaction_with_urn_uuid(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    cfg = settings(httpserver, tmp_path, atomic_transactions=True)
    with with_observations(cfg.outbox_path, ["S001"]) as outbox:
        sync(cfg, outbox)
    (bundle,) = fake.bundles
    patient_entry, obs_entry = bundle["entry"]
    assert patient_entry["fullUrl"].startswith("urn:uuid:")
    assert obs_entry["resource"]["subject"] == {"reference": patient_entry["fullUrl"]}


# -- capabilities -----------------------------------------------------------------------------
def test_batch_when_the_server_offers_no_transaction(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake = FakeFhir(httpserver, ("batch",))
    cfg = settings(httpserver, tmp_path)
    with with_observations(cfg.outbox_path, ["S001"]) as outbox:
        sync(cfg, outbox)
    assert [b["type"] for b in fake.bundles] == ["batch", "batch"]
    assert_once_each(fake, ["S001"])


def test_single_requests_when_the_server_offers_no_bundles(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    fake = FakeFhir(httpserver, ())
    fake.entry = refuse_bad
    cfg = settings(httpserver, tmp_path)
    with with_observations(cfg.outbox_path, ["S001", BAD]) as outbox:
        summary = sync(cfg, outbox)
    assert fake.bundles == []
    assert fake.singles == [("POST", "Patient"), ("POST", "Patient"), ("POST", "Observation")]
    assert (summary.created, summary.dead_lettered, summary.blocked) == (2, 1, 1)
    (obs,) = fake.held("Observation")["S001-masi"]
    assert obs["subject"] == {"reference": f"Patient/{fake.held()['S001'][0]['id']}"}


# -- deletions --------------------------------------------------------------------------------
def test_a_refused_delete_stays_dead_lettered_until_dropped(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    """A server that refuses to delete (e.g. HAPI's referential integrity, 409) keeps the
    resource: the removal is dead-lettered with the server's reason, is not attempted again on
    every run, is retried as a DELETE (never a PUT), and leaves the list when dropped."""
    cfg = settings(httpserver, tmp_path)
    outbox = staged_outbox(cfg.outbox_path, ["S001", "S002"])
    sync(cfg, outbox)

    def refuse_delete(entry: Entry, _n: int) -> Answer | None:
        if entry["request"]["method"] == "DELETE":
            return {"response": {"status": "409 Conflict", "outcome": outcome("referenced by Observation")}}  # fmt: skip
        return None

    fake.entry = refuse_delete
    only_s001 = items([patient("S001")])
    staged = outbox.stage(only_s001, lambda: {"participants.csv"})
    assert (staged.deleted, staged.removed_keys) == (1, [("Patient", f"{SYSTEM}|S002")])
    summary = sync(cfg, outbox)
    assert (summary.dead_lettered, summary.dead_letters) == (1, 1)
    (letter,) = outbox.dead_letters()
    assert letter["operation"] == "DELETE"
    assert "referenced by Observation" in letter["message"]
    methods = [e["request"]["method"] for b in fake.bundles[1:] for e in b["entry"]]
    assert methods == ["DELETE"]

    # the next runs do not try again, and never turn it into a PUT
    again = outbox.stage(only_s001, lambda: {"participants.csv"})
    assert again.removed_keys == []
    sync(cfg, outbox)
    assert len(fake.bundles) == 2
    assert outbox.retry_dead() == 1
    sync(cfg, outbox)
    assert [e["request"]["method"] for e in fake.bundles[-1]["entry"]] == ["DELETE"]
    (letter,) = outbox.dead_letters()

    dropped = outbox.drop_dead_letter(letter["id"])
    assert dropped is not None
    assert outbox.dead_letters() == []
    row = outbox.row("Patient", f"{SYSTEM}|S002")
    assert row is not None
    assert row.state == "tombstone"
    outbox.stage(only_s001, lambda: {"participants.csv"})
    assert sync(cfg, outbox).bundles == 0
    assert len(fake.bundles) == 3
    assert sorted(fake.held()) == ["S001", "S002"]  # the server kept it, as it insisted
    outbox.close()


def test_a_record_back_in_the_source_cancels_its_refused_delete(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    cfg = settings(httpserver, tmp_path)
    with staged_outbox(cfg.outbox_path, ["S001", "S002"]) as outbox:
        sync(cfg, outbox)
        fake.entry = lambda e, _n: {"response": {"status": "409"}} if e["request"]["method"] == "DELETE" else None  # fmt: skip
        outbox.stage(items([patient("S001")]), lambda: {"participants.csv"})
        sync(cfg, outbox)
        assert outbox.dead_letter_count() == 1
        back = outbox.stage(items([patient("S001"), patient("S002")]), lambda: {"participants.csv"})
        assert back.unchanged == 2
        assert outbox.dead_letter_count() == 0
        assert states(outbox, ["S002"])["S002"][0] == "sent"
        assert sync(cfg, outbox).bundles == 0
