"""A rater Observation changed directly on the FHIR server, then a notification in each shape a
server sends it: the consensus on the server follows, and a repeat writes no new version.

The server is the session's real one; the notifications are posted to the app as HAPI FHIR,
a Subscriptions Backport IG server and Medplum send them; the delivery worker runs in-process.
The last test lets the test server's own rest-hook Subscription (made by `fhir-adapter
subscribe`) call a running `fhir-adapter serve`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from fhir_adapter.domain import MasiRating, RecordContext
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping import common
from tests.faultproxy import FaultProxy
from tests.integration.conftest import (
    FHIR_HEADERS,
    IDENTIFIER_BASE,
    AdapterCli,
    ServeProcess,
    WebhookStack,
    wait_for,
)
from tests.webhook_helpers import CREDENTIALS_ENV, FHIR_JSON, bearer_headers, masi, medplum_headers
from tests.webhook_helpers import participant as participant_record

TYPES = [
    "Patient", "ResearchSubject", "Consent", "Encounter", "Observation", "Practitioner",
    "Provenance", "ResearchStudy", "Group", "Organization", "Location", "Substance", "Device",
    "CodeSystem", "Measure", "MeasureReport",
]  # fmt: skip
CLOSE = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2)  # MASI 18.4
FAR = (2, 2, 1, 3, 3, 2, 3, 3, 2, 1, 1, 1)  # MASI 8.6
LEFT_MALAR_AREA = "left-malar-area"


def put(base: str, resource: dict[str, Any]) -> dict[str, Any]:
    response = requests.put(
        f"{base}/{resource['resourceType']}/{resource['id']}",
        data=orjson.dumps(resource),
        headers=FHIR_HEADERS,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def change_left_malar_area(stack: WebhookStack, value: str, area: int) -> dict[str, Any]:
    """The EHR edits a rater's item on the server: left malar area -> ``area`` (MASI follows)."""
    resource = copy.deepcopy(stack.observation(value))
    for component in resource["component"]:
        if component["code"]["coding"][0]["code"] == LEFT_MALAR_AREA:
            old = component["valueInteger"]
            component["valueInteger"] = area
    resource["valueQuantity"]["value"] = round(
        resource["valueQuantity"]["value"] + 0.3 * 6 * (area - old), 2
    )
    return put(stack.view.base_url, resource)


def consensus(stack: WebhookStack, visit: str = "m3") -> dict[str, Any]:
    return stack.observation(f"S001-{visit}-masi")


def versions(stack: WebhookStack) -> dict[tuple[str, str], tuple[str, str]]:
    return stack.view.versions(["Observation", "Provenance"])


def notify(
    stack: WebhookStack,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    response = stack.client.open(
        path, method=method, data=body, headers={**FHIR_JSON, **(headers or bearer_headers())}
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.data == b""


def backport(kind: str, content: str, changed: dict[str, Any], base: str) -> bytes:
    """A Backport IG notification Bundle (R4), parameters shuffled, event-number a string."""
    focus = f"{base}/Observation/{changed['id']}"
    event = {"name": "notification-event", "part": [
        {"name": "timestamp", "valueDate": "2026-11-01"},
        {"name": "event-number", "valueString": "12"},
        *([{"name": "focus", "valueReference": {"reference": focus}}] if content != "empty" else []),
    ]}  # fmt: skip
    status = {"resourceType": "Parameters", "parameter": [
        {"name": "type", "valueCode": kind},
        event,
        {"name": "subscription", "valueReference": {"reference": "Subscription/s1"}},
        {"name": "status", "valueCode": "active"},
        {"name": "topic", "valueCanonical": "http://example.org/SubscriptionTopic/masi"},
    ]}  # fmt: skip
    entries: list[dict[str, Any]] = [{"fullUrl": "urn:uuid:0b1d", "resource": status}]
    if content == "full-resource":
        entries.append(
            {
                "fullUrl": focus,
                "resource": changed,
                "request": {"method": "PUT", "url": f"Observation/{changed['id']}"},
            }
        )
    elif content == "id-only":
        entries.append(
            {"fullUrl": focus, "request": {"method": "PUT", "url": f"Observation/{changed['id']}"}}
        )
    return orjson.dumps({"resourceType": "Bundle", "type": "history", "entry": entries})


def send_shape(stack: WebhookStack, shape: str, changed: dict[str, Any]) -> None:
    base = stack.view.base_url
    body = orjson.dumps(changed)
    if shape in ("full-resource", "id-only", "empty"):
        notify(stack, "POST", "/fhir/notify", backport("event-notification", shape, changed, base))
    elif shape == "hapi-put":
        notify(
            stack,
            "PUT",
            f"/fhir/notify/Observation/{changed['id']}",
            body,
            {**bearer_headers(), "If-Match": f'W/"{changed["meta"]["versionId"]}"'},
        )
    elif shape == "hapi-empty-post":
        notify(stack, "POST", "/fhir/notify")
    elif shape == "medplum":
        notify(stack, "POST", "/fhir/notify", body, medplum_headers(body))
    else:  # pragma: no cover
        raise AssertionError(shape)


def two_raters(stack: WebhookStack) -> None:
    stack.post("participants", participant_record("S001"))
    stack.post("masi", [masi("S001", "m3", "R1", CLOSE), masi("S001", "m3", "R2", FAR)])
    stack.deliver()
    assert consensus(stack)["valueQuantity"]["value"] == 13.5


SHAPES = ["full-resource", "id-only", "empty", "hapi-put", "hapi-empty-post", "medplum"]


@pytest.mark.parametrize("shape", SHAPES)
def test_consensus_follows_a_rater_changed_on_the_server(
    webhook_stack: WebhookStack, shape: str
) -> None:
    stack = webhook_stack
    two_raters(stack)
    changed = change_left_malar_area(stack, "S001-m3-masi-R1", 2)  # R1: 18.4 -> 14.8
    assert changed["valueQuantity"]["value"] == 14.8

    send_shape(stack, shape, changed)
    stack.deliver()
    after = consensus(stack)
    assert after["valueQuantity"]["value"] == 11.7  # (14.8 + 8.6) / 2
    assert after["status"] == "preliminary"
    assert stack.observation("S001-m3-mmasi")["valueQuantity"]["value"] == 5.85  # (7.4 + 4.3) / 2
    rater = stack.observation("S001-m3-masi-R1")
    assert rater["meta"]["versionId"] == changed["meta"]["versionId"]  # not overwritten back
    before = versions(stack)

    send_shape(stack, shape, changed)  # repeated
    send_shape(stack, shape, changed)  # and duplicated
    stack.deliver()
    assert versions(stack) == before  # no new version of anything
    assert stack.view.dangling_references(TYPES) == []


def test_handshake_and_heartbeat_change_nothing(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    two_raters(stack)
    before = versions(stack)
    rater = stack.observation("S001-m3-masi-R1")
    for kind in ("handshake", "heartbeat"):
        notify(stack, "POST", "/fhir/notify", backport(kind, "empty", rater, stack.view.base_url))
    stack.deliver()
    assert versions(stack) == before


def test_our_own_writes_coming_back_change_nothing(webhook_stack: WebhookStack) -> None:
    """Notifications of the adapter's own rater and consensus writes: no feedback loop."""
    stack = webhook_stack
    two_raters(stack)
    before = versions(stack)
    for value in ("S001-m3-masi-R1", "S001-m3-masi-R2", "S001-m3-masi", "S001-m3-mmasi"):
        resource = stack.observation(value)
        send_shape(stack, "hapi-put", resource)
        send_shape(stack, "full-resource", resource)
    stack.deliver()
    assert versions(stack) == before


def test_out_of_order_notifications_end_on_the_servers_state(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    two_raters(stack)
    first = change_left_malar_area(stack, "S001-m3-masi-R1", 2)  # 14.8
    second = change_left_malar_area(stack, "S001-m3-masi-R1", 3)  # 16.6
    send_shape(stack, "full-resource", second)
    stack.deliver()
    send_shape(stack, "hapi-put", first)  # the older notification arrives last
    stack.deliver()
    assert consensus(stack)["valueQuantity"]["value"] == 12.6  # (16.6 + 8.6) / 2, re-read


def test_a_deleted_rater(webhook_stack: WebhookStack) -> None:
    """HAPI's DELETE notification: the consensus follows the raters the server still holds."""
    stack = webhook_stack
    two_raters(stack)
    rater = stack.observation("S001-m3-masi-R2")
    response = requests.delete(
        f"{stack.view.base_url}/Observation/{rater['id']}", headers=FHIR_HEADERS, timeout=30
    )
    assert response.status_code in (200, 204)
    notify(stack, "DELETE", f"/fhir/notify/Observation/{rater['id']}")
    stack.deliver()
    # The subject is the inbox's: its rows follow the server only for ratings it still holds;
    # a rating deleted on the server stays in the inbox until the EHR retracts it.
    stack.delete("masi", "S001/m3/R2")
    stack.deliver()
    after = consensus(stack)
    assert (after["valueQuantity"]["value"], after["status"]) == (18.4, "preliminary")


def test_a_subject_the_webhook_never_saw(
    webhook_stack: WebhookStack, adapter_cli: AdapterCli, tmp_path: Path
) -> None:
    """Raters written by `sync DIR`, then changed on the server: derived from the server alone."""
    from tests.helpers import masi as masi_row
    from tests.helpers import participant as participant_row
    from tests.helpers import write_csv

    stack = webhook_stack
    data = tmp_path / "data"
    write_csv(data / "participants.csv", [participant_row("S001")])
    write_csv(
        data / "masi.csv", [masi_row("S001", "m3", "R1", CLOSE), masi_row("S001", "m3", "R2", FAR)]
    )
    cli = AdapterCli(stack.view.base_url, stack.settings.outbox_path)
    result = cli.sync(data)
    assert result.code == 0, result
    assert consensus(stack)["valueQuantity"]["value"] == 13.5

    changed = change_left_malar_area(stack, "S001-m3-masi-R1", 2)
    send_shape(stack, "full-resource", changed)
    stack.deliver()
    assert consensus(stack)["valueQuantity"]["value"] == 11.7
    before = versions(stack)
    send_shape(stack, "hapi-put", changed)
    stack.deliver()
    assert versions(stack) == before
    assert stack.view.dangling_references(TYPES) == []


def test_raters_written_by_the_ehr_directly(webhook_stack: WebhookStack) -> None:
    """Nothing in the outbox: the consensus refers to the server's own Patient, Encounter and
    rater Observations (their ids are learned), and every reference resolves."""
    stack = webhook_stack
    base = stack.view.base_url
    ctx = stack.ctx

    def create(resource: dict[str, Any]) -> dict[str, Any]:
        resource = {k: v for k, v in resource.items() if k != "id"}
        response = requests.post(
            f"{base}/{resource['resourceType']}",
            data=dumpb(resource),
            headers=FHIR_HEADERS,
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    from fhir_adapter.domain import Participant

    person = Participant.model_validate(
        participant_record("S009"), context=RecordContext(ctx.trial)
    )
    patient = create(common.to_patient(person, ctx))
    encounter = common.encounter_value("S009", "m3")
    enc = create(
        {
            **ctx.base("Encounter", encounter),
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": {"reference": f"Patient/{patient['id']}"},
        }
    )
    raters = []
    for rater_id, scores in (("R1", CLOSE), ("R2", FAR)):
        doctor = create(common.to_practitioner(rater_id, ctx))
        rating = MasiRating.model_validate(
            masi("S009", "m3", rater_id, scores), context=RecordContext(ctx.trial)
        )
        obs = common.to_rater_masi_observation(rating, ctx)
        obs["subject"] = {"reference": f"Patient/{patient['id']}"}
        obs["encounter"] = {"reference": f"Encounter/{enc['id']}"}
        obs["performer"] = [{"reference": f"Practitioner/{doctor['id']}"}]
        obs.pop("extension")  # the EHR knows nothing of the study resources
        raters.append(create(obs))

    send_shape(stack, "full-resource", raters[0])
    stack.deliver()
    derived = stack.observation("S009-m3-masi")
    assert derived["valueQuantity"]["value"] == 13.5
    assert sorted(r["reference"] for r in derived["derivedFrom"]) == sorted(
        f"Observation/{r['id']}" for r in raters
    )
    assert derived["subject"]["reference"] == f"Patient/{patient['id']}"
    assert stack.view.dangling_references(TYPES) == []
    assert len(stack.view.search("Patient", {"identifier": f"{IDENTIFIER_BASE}patient|S009"})) == 1


def test_a_real_subscription_drives_serve(
    fhir_reset: str,
    tmp_path: Path,
    serve_process: Callable[..., ServeProcess],
) -> None:
    """`fhir-adapter subscribe` creates the rest-hook Subscription; the test server then calls
    the running `serve` itself, and the consensus follows a rater changed on the server."""
    outbox = tmp_path / "outbox.sqlite"
    serve = serve_process(fhir_reset, outbox)
    cli = AdapterCli(fhir_reset, outbox)
    result = cli.run(
        "subscribe",
        "--server",
        fhir_reset,
        "--endpoint",
        f"{serve.url}/fhir/notify",
        env=CREDENTIALS_ENV,
    )
    assert result.code == 0, result
    subscription = result.json["subscription"]
    again = cli.run(
        "subscribe",
        "--server",
        fhir_reset,
        "--endpoint",
        f"{serve.url}/fhir/notify",
        env=CREDENTIALS_ENV,
    )
    assert again.json["subscription"] == subscription  # updated, not a second one
    held = requests.get(f"{fhir_reset}/{subscription}", headers=FHIR_HEADERS, timeout=30).json()
    assert held["status"] == "active"
    assert held["channel"]["header"] == [
        f"Authorization: Bearer {CREDENTIALS_ENV['FHIR_ADAPTER_WEBHOOK_TOKEN']}"
    ]
    assert held["criteria"] == f"Observation?code={IDENTIFIER_BASE}codes|masi"

    assert serve.post("participants", participant_record("S001")).status_code == 202
    records = [masi("S001", "m3", "R1", CLOSE), masi("S001", "m3", "R2", FAR)]
    assert serve.post("masi", records).status_code == 202
    stack_view = WebhookStackView(fhir_reset)
    wait_for(lambda: stack_view.value("S001-m3-masi") == 13.5, timeout=60)

    rater = stack_view.get("S001-m3-masi-R1")
    for component in rater["component"]:
        if component["code"]["coding"][0]["code"] == LEFT_MALAR_AREA:
            component["valueInteger"] = 2
    rater["valueQuantity"]["value"] = 14.8
    put(fhir_reset, rater)  # the test server notifies serve, which recomputes
    wait_for(lambda: stack_view.value("S001-m3-masi") == 11.7, timeout=60)
    settled = stack_view.get("S001-m3-masi")["meta"]["versionId"]
    # our own consensus write is not a rater Observation: nothing loops, no further version
    time.sleep(2)
    assert stack_view.get("S001-m3-masi")["meta"]["versionId"] == settled
    assert "Traceback" not in serve.log.read_text()


class WebhookStackView:
    """Observations by business value, read with plain HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, value: str) -> dict[str, Any]:
        bundle = requests.get(
            f"{self.base}/Observation",
            params={"identifier": f"{IDENTIFIER_BASE}observation|{value}"},
            headers=FHIR_HEADERS,
            timeout=30,
        ).json()
        entries = bundle.get("entry", [])
        return dict(entries[0]["resource"]) if len(entries) == 1 else {}

    def value(self, value: str) -> float | None:
        return self.get(value).get("valueQuantity", {}).get("value")


def test_a_derived_resource_changed_on_the_server_is_re_read_never_overwritten(
    fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    """The EHR edits the consensus on the server; a third rater then changes it here. The PUT
    on the version the outbox knew is refused (412, If-Match): the worker re-reads the server's
    copy and re-derives, and its write replaces the version it has seen — never a write
    without If-Match over a version nobody read."""
    stack = WebhookStack(fault_proxy.base_url, tmp_path / "outbox.sqlite")  # proxy: a recorder
    try:
        two_raters(stack)
        mine = consensus(stack)
        edited = put(stack.view.base_url, {**mine, "note": [{"text": "checked by the EHR"}]})
        assert edited["meta"]["versionId"] != mine["meta"]["versionId"]

        stack.post("masi", masi("S001", "m3", "R3", CLOSE))
        stack.deliver()
        after = consensus(stack)
        assert (after["valueQuantity"]["value"], after["status"]) == (18.4, "final")
        assert "EHR" not in str(after["note"])  # re-derived from the ratings, after reading the EHR's copy
        puts = [
            e["request"]
            for b in fault_proxy.bundles()
            for e in b["entry"]
            if e["request"]["method"] == "PUT"
            and e["request"]["url"] == f"Observation/{mine['id']}"
        ]
        assert [p.get("ifMatch") for p in puts] == [
            f'W/"{mine["meta"]["versionId"]}"',  # refused: the EHR had changed it
            f'W/"{edited["meta"]["versionId"]}"',  # after the re-read
        ]
        history = stack.view.get(f"Observation/{mine['id']}/_history")
        assert len(history["entry"]) == 3  # ours, the EHR's, ours again: nothing lost between
        assert stack.view.dangling_references(TYPES) == []
    finally:
        stack.close()
