"""HAPI FHIR's own rest-hook Subscription drives the consensus recompute (issue 14, item 3).

A small synthetic set is synced to HAPI; `fhir-adapter serve` runs as a process and
`fhir-adapter subscribe` creates the Subscription on HAPI, which waits until HAPI has activated
it. A rater's MASI Observation is then changed directly on HAPI (the EHR editing a rating):
HAPI itself delivers the notification (`PUT <endpoint>/Observation/<id>` with the resource,
`If-Match`, the bearer token of `channel.header`), and HAPI soon holds the consensus MASI, mMASI
and improvement computed by hand from the changed ratings.

The notifications pass through a transparent recording proxy (tests/faultproxy.py) in front of
serve's `/fhir/notify`: it shows what HAPI sent, and it answers HAPI's first delivery of the
change with a 500 *after* serve has taken it, so HAPI retries the same notification and serve
receives it twice. The retry, an identical update on HAPI and a replay of HAPI's exact request
add no version to anything. Last, the other rating is marked entered-in-error on HAPI (which
refuses to delete it) and the consensus follows the one left. Every business key is held once
and every reference resolves.

Identity strategy `client-id`, as the README recommends for HAPI (see test_hapi_sync.py).
"""

from __future__ import annotations

import csv
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import pytest
import requests

from fhir_adapter.generate import generate
from fhir_adapter.trial import load_trial
from tests.faultproxy import FaultProxy, ProxyRequest
from tests.integration.conftest import FHIR_HEADERS, IDENTIFIER_BASE, ServeProcess, wait_for
from tests.webhook_helpers import CREDENTIALS_ENV, TOKEN

if TYPE_CHECKING:
    from conftest import AdapterCli, FhirView

pytestmark = pytest.mark.integration

CLIENT_IDS = {"FHIR_ADAPTER_IDENTITY_STRATEGY": "client-id"}
TRIAL = load_trial()
CODES = f"{IDENTIFIER_BASE}codes"
OBSERVATION = f"{IDENTIFIER_BASE}observation"
REGIONS = (("forehead", Decimal("0.3")), ("right_malar", Decimal("0.3")),
           ("left_malar", Decimal("0.3")), ("chin", Decimal("0.1")))  # fmt: skip
DELIVERY_TIMEOUT_S = 30.0


# -- the scores, by hand (SPEC §4) -------------------------------------------------------------
def masi_of(row: dict[str, str]) -> Decimal:
    """0.3(D+H)A forehead, right malar, left malar + 0.1(D+H)A chin."""
    return sum(
        (w * (int(row[f"{r}_d"]) + int(row[f"{r}_h"])) * int(row[f"{r}_a"]) for r, w in REGIONS),
        Decimal(0),
    )


def mmasi_of(row: dict[str, str]) -> Decimal:
    return sum((w * int(row[f"{r}_d"]) * int(row[f"{r}_a"]) for r, w in REGIONS), Decimal(0))


@dataclass
class Target:
    """A follow-up visit with two raters whose baseline has a consensus: the change is made to
    ``rows[0]``'s darkness of a region with a non-zero area (so MASI and mMASI both move)."""

    subject: str
    visit: str
    rows: list[dict[str, str]]
    field: str  # e.g. "left_malar_d"
    new: int

    @property
    def rater(self) -> str:
        return self.rows[0]["rater_id"]

    def changed(self) -> list[dict[str, str]]:
        return [{**self.rows[0], self.field: str(self.new)}, self.rows[1]]


def pick_target(data: Path) -> Target:
    with (data / "masi.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_visit: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        by_visit.setdefault((row["subject_id"], row["visit"]), []).append(row)
    baseline = TRIAL.baseline_visit
    for (subject, visit), raters in sorted(by_visit.items()):
        if visit == baseline or len(raters) != 2 or (subject, baseline) not in by_visit:
            continue
        first = raters[0]
        for region, _ in REGIONS:
            if int(first[f"{region}_a"]) > 0:
                darkness = int(first[f"{region}_d"])
                new = darkness + 1 if darkness < 4 else darkness - 1
                return Target(subject, visit, raters, f"{region}_d", new)
    raise AssertionError("no follow-up visit with two raters and a baseline in the data set")


def consensus_of(rows: list[dict[str, str]]) -> tuple[Decimal, Decimal, str]:
    """Two raters: the means; final when they differ by at most the adjudication threshold."""
    a, b = (masi_of(r) for r in rows)
    status = "final" if abs(a - b) <= TRIAL.adjudication_threshold else "preliminary"
    return (a + b) / 2, sum((mmasi_of(r) for r in rows), Decimal(0)) / 2, status


def improvement(baseline: Decimal, visit: Decimal) -> Decimal:
    pct = (baseline - visit) * 100 / baseline
    return pct.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


# -- what HAPI and serve hold -----------------------------------------------------------------
def observation(base: str, value: str) -> dict[str, Any]:
    """The one Observation with this business identifier (HAPI's search cache bypassed)."""
    response = requests.get(
        f"{base}/Observation",
        params={"identifier": f"{OBSERVATION}|{value}"},
        headers=FHIR_HEADERS,
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    entries = orjson.loads(response.content).get("entry", [])
    assert len(entries) == 1, f"{value}: {len(entries)} Observations"
    return dict(entries[0]["resource"])


def number(resource: dict[str, Any]) -> Decimal:
    """valueQuantity.value exactly as HAPI wrote it (no float in between)."""
    return Decimal(repr(resource["valueQuantity"]["value"]))


def settled(outbox: Path) -> bool:
    """serve has handled every queued notification and sent everything it staged."""
    db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=30)
    try:
        (events,) = db.execute("SELECT COUNT(*) FROM notify_events").fetchone()
        (unsent,) = db.execute(
            "SELECT COUNT(*) FROM resources WHERE state IN ('pending', 'sending', 'delete')"
        ).fetchone()
    finally:
        db.close()
    return events == 0 and unsent == 0


def deliveries(proxy: FaultProxy, rid: str) -> list[Any]:
    """HAPI's notifications of ``Observation/rid`` as the proxy saw them."""
    return [e for e in proxy.requests() if e.path.split("?")[0].endswith(f"/Observation/{rid}")]


def put_on_hapi(base: str, resource: dict[str, Any]) -> dict[str, Any]:
    response = requests.put(
        f"{base}/Observation/{resource['id']}",
        data=orjson.dumps(resource),
        headers=FHIR_HEADERS,
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    return dict(response.json())


def test_hapis_subscription_drives_the_consensus(
    hapi_reset: str,
    tmp_path: Path,
    make_cli: type[AdapterCli],
    make_view: type[FhirView],
    serve_process: Callable[..., ServeProcess],
    hapi_summary: list[str],
) -> None:
    base = hapi_reset
    data = tmp_path / "data"
    generate(data, n_participants=6, with_bad=False)
    outbox = tmp_path / "outbox.sqlite"
    cli = make_cli(base, outbox)
    started = time.monotonic()
    synced = cli.sync(data, env=CLIENT_IDS)
    sync_s = time.monotonic() - started
    assert synced.code == 0, synced
    types = sorted(cli.outbox_counts())
    view = make_view(base)

    target = pick_target(data)
    s, v, baseline = target.subject, target.visit, TRIAL.baseline_visit
    keys = {
        "masi": f"{s}-{v}-masi",
        "mmasi": f"{s}-{v}-mmasi",
        "improvement": f"{s}-{v}-masi-improvement",
        "rater": f"{s}-{v}-masi-{target.rater}",
    }
    # the synced values are the hand-computed ones (so the formulas here are the right ones)
    baseline_masi = number(observation(base, f"{s}-{baseline}-masi"))
    masi, mmasi, status = consensus_of(target.rows)
    synced_masi = observation(base, keys["masi"])
    assert (number(synced_masi), synced_masi["status"]) == (masi, status)
    assert number(observation(base, keys["mmasi"])) == mmasi
    assert number(observation(base, keys["improvement"])) == improvement(baseline_masi, masi)
    new_masi, new_mmasi, new_status = consensus_of(target.changed())
    assert (new_masi, new_mmasi) != (masi, mmasi)

    serve = serve_process(base, outbox, CLIENT_IDS)  # the outbox the sync used: one adapter
    with FaultProxy(f"{serve.url}/fhir/notify", rewrite_urls=False) as proxy:
        started = time.monotonic()
        made = cli.run(
            "subscribe", "--server", base, "--endpoint", proxy.base_url, env=CREDENTIALS_ENV
        )
        assert made.code == 0, made
        subscribe_s = time.monotonic() - started
        assert made.json["status"] == "active"  # subscribe waited for HAPI to activate it
        held = view.get(made.json["subscription"])
        assert held["status"] == "active"
        assert held["criteria"] == f"Observation?code={CODES}|masi"
        assert held["channel"] == {
            "type": "rest-hook",
            "endpoint": proxy.base_url,
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {TOKEN}"],
        }
        again = cli.run(
            "subscribe", "--server", base, "--endpoint", proxy.base_url, env=CREDENTIALS_ENV
        )
        assert again.code == 0, again
        assert (again.json["subscription"], again.json["action"], again.json["status"]) == (
            made.json["subscription"],
            "updated",
            "active",
        )
        assert view.count("Subscription") == 1

        before = view.versions(types)
        rater = observation(base, keys["rater"])
        # HAPI's first delivery of the change reaches serve, then HAPI sees a 500: it retries
        proxy.add(
            "applied-then-status",
            status=500,
            times=1,
            match=lambda r: r.method == "PUT" and r.path.endswith(f"/Observation/{rater['id']}"),
        )
        changed = dict(rater, component=[dict(c) for c in rater["component"]])
        code = target.field.removesuffix("_d").replace("_", "-") + "-darkness"
        (item,) = [c for c in changed["component"] if c["code"]["coding"][0]["code"] == code]
        item["valueInteger"] = target.new
        changed["valueQuantity"] = dict(rater["valueQuantity"], value=masi_of(target.changed()[0]))
        changed["valueQuantity"]["value"] = float(changed["valueQuantity"]["value"])
        changed.pop("meta")
        started = time.monotonic()
        stored = put_on_hapi(base, changed)
        assert stored["meta"]["versionId"] != rater["meta"]["versionId"]

        def followed() -> bool:
            return number(observation(base, keys["masi"])) == new_masi

        wait_for(followed, timeout=DELIVERY_TIMEOUT_S)
        follow_s = time.monotonic() - started
        wait_for(lambda: len(deliveries(proxy, rater["id"])) >= 2, timeout=DELIVERY_TIMEOUT_S)
        wait_for(lambda: settled(outbox), timeout=DELIVERY_TIMEOUT_S)
        time.sleep(2)  # HAPI's notifications of the consensus writes come back (ignored)
        wait_for(lambda: settled(outbox), timeout=DELIVERY_TIMEOUT_S)

        # what HAPI sent: the resource, PUT to <endpoint>/Observation/<id>, If-Match, the token
        first, retry = deliveries(proxy, rater["id"])[:2]
        assert (first.status, first.fault, retry.status) == (500, "applied-then-status", 200)
        for sent in (first, retry):
            assert sent.method == "PUT"
            assert sent.request.headers["Authorization"] == f"Bearer {TOKEN}"
            assert sent.request.headers["Content-Type"].startswith("application/fhir+json")
            assert sent.request.headers["If-Match"] == f'W/"{stored["meta"]["versionId"]}"'
            assert sent.request.json["meta"]["versionId"] == stored["meta"]["versionId"]
        assert retry.request.body == first.request.body  # the same notification, again

        after_masi = observation(base, keys["masi"])
        assert (number(after_masi), after_masi["status"]) == (new_masi, new_status)
        assert number(observation(base, keys["mmasi"])) == new_mmasi
        assert number(observation(base, keys["improvement"])) == improvement(
            baseline_masi, new_masi
        )
        # one new version of exactly what changed, whatever the number of deliveries
        after = view.versions(types)
        assert set(after) == set(before)
        bumped = {k: (before[k][1], after[k][1]) for k in after if after[k] != before[k]}
        derived = {(("Observation", f"{OBSERVATION}|{keys[k]}")) for k in keys}
        assert derived <= set(bumped), bumped
        for key, (old, new) in bumped.items():
            assert int(new) == int(old) + 1, f"{key}: version {old} -> {new}"
            assert key[1].split("|", 1)[1].startswith(f"{s}-{v}-"), f"{key} changed"

        # an identical update on HAPI (no new version there, no notification), then HAPI's
        # exact request replayed to serve (a duplicated delivery): nothing new anywhere
        delivered = len(deliveries(proxy, rater["id"]))
        assert put_on_hapi(base, stored)["meta"]["versionId"] == stored["meta"]["versionId"]
        replay: ProxyRequest = retry.request
        echoed = requests.request(
            replay.method,
            f"{serve.url}{replay.path}",
            data=replay.body,
            headers={k: v for k, v in replay.headers.items() if k.lower() != "host"},
            timeout=30,
        )
        assert (echoed.status_code, echoed.content) == (200, b"")
        time.sleep(2)
        wait_for(lambda: settled(outbox), timeout=DELIVERY_TIMEOUT_S)
        assert view.versions(types) == after
        assert len(deliveries(proxy, rater["id"])) == delivered  # the no-op update: not notified

        # HAPI refuses to delete a rating the consensus refers to (referential integrity); the
        # EHR marks it entered-in-error instead: the consensus follows the one rating left
        other = observation(base, f"{s}-{v}-masi-{target.rows[1]['rater_id']}")
        gone = requests.delete(
            f"{base}/Observation/{other['id']}", headers=FHIR_HEADERS, timeout=30
        )
        assert gone.status_code == 409, gone.text[:300]
        started = time.monotonic()
        put_on_hapi(base, {**other, "status": "entered-in-error"})
        single = masi_of(target.changed()[0])
        wait_for(lambda: number(observation(base, keys["masi"])) == single, DELIVERY_TIMEOUT_S)
        retract_s = time.monotonic() - started
        wait_for(lambda: settled(outbox), timeout=DELIVERY_TIMEOUT_S)
        alone = observation(base, keys["masi"])
        assert alone["status"] == "preliminary"  # one rater: preliminary, method single
        assert alone["derivedFrom"] == [{"reference": f"Observation/{stored['id']}"}]
        assert number(observation(base, keys["mmasi"])) == mmasi_of(target.changed()[0])
        assert number(observation(base, keys["improvement"])) == improvement(baseline_masi, single)

    assert view.problems(types) == {}
    assert "Traceback" not in serve.log.read_text()
    hapi_summary.append(  # the figures the note quotes, in the test summary
        f"Subscription end to end: sync {sync_s:.1f} s, subscribe (to active) {subscribe_s:.1f} s, "
        f"rater changed on HAPI to consensus on HAPI {follow_s:.1f} s "
        f"(entered-in-error: {retract_s:.1f} s)"
    )
