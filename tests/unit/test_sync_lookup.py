"""The look-up by business identity where the server refuses a search by system alone.

HAPI FHIR answers ``_tag=system|`` with 400 (HAPI-1218: a token search on ``_tag`` needs a
code). The engine then asks for the exact keys, ``_tag=system|a,system|b,…``, a chunk at a time;
a refused exact look-up leaves the records undelivered — never taken for "not held", which
would create them a second time. `HapiLikeFake` is the unit tests' in-memory FHIR server
(tests/unit/test_sync_faults.py) with HAPI's rule for ``_tag`` searches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.errors import LookupRefused
from fhir_adapter.sync import engine
from fhir_adapter.sync.outbox import Outbox
from tests.unit.test_sync_faults import (
    KEYS,
    SYSTEM,
    FakeFhir,
    assert_once_each,
    fhir,
    outcome,
    patient,
    recorded_ids_match,
    settings,
    states,
    sync,
)

pytestmark = pytest.mark.usefixtures("no_jitter")

HAPI_1218 = "HAPI-1218: Missing _tag parameter (must supply a value/code and not just a system)"
GOOD = [k for k in KEYS if k != "S003"]  # S003 is the fake's "bogus" patient: keep it out


class HapiLikeFake(FakeFhir):
    """Refuses ``_tag=system|`` like HAPI; answers exact ``_tag`` keys (comma = or)."""

    refuse_exact = False

    def search(self, request: Request) -> Response:
        query = parse_qs(request.query_string.decode())
        wanted = query.get("_tag", [""])[0]
        self.searches.append(wanted)
        if wanted.endswith("|"):
            return fhir(outcome(HAPI_1218), 400)
        if self.refuse_exact:
            return fhir(outcome("HAPI-0000: search refused"), 400)
        keys = set(wanted.split(","))
        rtype = request.path.rsplit("/", 1)[1]
        found = [
            {"resource": r, "search": {"mode": "match"}}
            for r in self.store.get(rtype, {}).values()
            if any(f"{t['system']}|{t['code']}" in keys for t in r["meta"].get("tag", []))
        ]
        return fhir({"resourceType": "Bundle", "type": "searchset", "entry": found})


@pytest.fixture
def hapi_like(httpserver: HTTPServer) -> HapiLikeFake:
    return HapiLikeFake(httpserver)


def stage(path: Path, keys: list[str]) -> Outbox:
    outbox = Outbox(path)
    outbox.stage([("participants.csv", patient(k), json.dumps(patient(k)).encode()) for k in keys],
                 set)  # fmt: skip
    return outbox


def hold(server: FakeFhir, key: str) -> str:
    """Put ``patient(key)`` on the fake as if an earlier sync (another outbox) had sent it."""
    answer = server.apply(
        {"resource": patient(key), "request": {"method": "POST", "url": "Patient"}}
    )
    return str(answer["response"]["location"].split("/")[1])


def test_refused_system_search_falls_back_to_exact_keys_in_chunks(
    hapi_like: HapiLikeFake,
    httpserver: HTTPServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine, "LOOKUP_KEYS", 2)
    held = {k: hold(hapi_like, k) for k in GOOD[:2]}  # S001, S002 already on the server
    cfg = settings(httpserver, tmp_path)
    with stage(cfg.outbox_path, GOOD) as outbox:
        summary = sync(cfg, outbox, identity="tag")
        assert {k: s for k, (s, _) in states(outbox, GOOD).items()} == dict.fromkeys(GOOD, "sent")
        assert recorded_ids_match(hapi_like, outbox, GOOD)
        assert {k: states(outbox, GOOD)[k][1] for k in held} == held
    # the system search once, then the three keys two at a time
    assert hapi_like.searches == [
        f"{SYSTEM}|",
        f"{SYSTEM}|S001,{SYSTEM}|S002",
        f"{SYSTEM}|S004",
    ]
    assert (summary.matched, summary.created, summary.updated) == (2, 1, 0)
    assert summary.undelivered == 0
    assert_once_each(hapi_like, GOOD)  # nothing created twice


def test_uncertain_answer_resolved_by_exact_keys_without_asking_the_system_again(
    hapi_like: HapiLikeFake, httpserver: HTTPServer, tmp_path: Path
) -> None:
    """Applied, then answered 500: the look-up (exact keys; the refused system search is not
    repeated within the run) finds every entry, so nothing is sent again."""

    def applied_then_500(_b: dict[str, Any], n: int, _a: dict[str, Any]) -> Response | None:
        return fhir(outcome("boom"), 500) if n == 1 else None

    hapi_like.after = applied_then_500
    cfg = settings(httpserver, tmp_path)
    with stage(cfg.outbox_path, GOOD) as outbox:
        summary = sync(cfg, outbox, identity="tag")
        assert recorded_ids_match(hapi_like, outbox, GOOD)
    keys = ",".join(f"{SYSTEM}|{k}" for k in GOOD)
    assert hapi_like.searches == [f"{SYSTEM}|", keys, keys]  # learn, then the uncertain Bundle
    assert len(hapi_like.bundles) == 1
    assert summary.undelivered == 0
    assert_once_each(hapi_like, GOOD)


def test_refused_exact_look_up_leaves_records_undelivered_never_created(
    hapi_like: HapiLikeFake, httpserver: HTTPServer, tmp_path: Path
) -> None:
    hold(hapi_like, "S001")
    hapi_like.refuse_exact = True
    cfg = settings(httpserver, tmp_path)
    with stage(cfg.outbox_path, GOOD) as outbox:
        summary = sync(cfg, outbox, identity="tag")
        assert {k: s for k, (s, _) in states(outbox, GOOD).items()} == dict.fromkeys(
            GOOD, "pending"
        )
        assert not outbox.learned("Patient")
    assert hapi_like.bundles == []  # "not found" would have created S001 a second time
    assert summary.undelivered == len(GOOD)
    assert summary.created == summary.dead_lettered == 0
    assert summary.undelivered_reason is not None
    assert "refused the look-up of Patient by _tag (HTTP 400)" in summary.undelivered_reason
    assert LookupRefused.exit_code == 69

    hapi_like.refuse_exact = False  # the server accepts it again: the next run completes
    with Outbox(cfg.outbox_path) as outbox:
        again = sync(cfg, outbox, identity="tag")
    assert (again.matched, again.created, again.undelivered) == (1, 2, 0)
    assert_once_each(hapi_like, GOOD)


def test_identifier_searches_are_unchanged(httpserver: HTTPServer, tmp_path: Path) -> None:
    """A server that answers ``identifier=system|`` is asked that, once per system."""
    fake = FakeFhir(httpserver)
    cfg = settings(httpserver, tmp_path)
    with stage(cfg.outbox_path, GOOD) as outbox:
        summary = sync(cfg, outbox)
    assert fake.searches == [f"identifier={SYSTEM.replace(':', '%3A')}%7C&_count=1000"]
    assert summary.created == len(GOOD)
