"""/fhir/notify: every notification shape a server sends is understood and answered 200 with an
empty body; only rater MASI Observations are queued (no feedback loop on our own writes)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from fhir_adapter.domain import MasiRating, RecordContext
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping import common
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.scoring import score_visits
from fhir_adapter.sync.inbox import Inbox
from fhir_adapter.sync.notify import (
    RaterKey,
    is_rater_masi,
    normalize_reference,
    parse_rater_value,
    rating_record,
)
from server.notify import bundle_events
from server.state import EXTENSION
from tests.webhook_helpers import FHIR_JSON, bearer_headers, masi, medplum_headers

AUTH = bearer_headers()
BASE = "http://fhir.example/fhir/R4"


@pytest.fixture
def ctx(webhook_app: Flask) -> MappingContext:
    context: MappingContext = webhook_app.extensions[EXTENSION].ctx
    return context


def rater_observation(ctx: MappingContext, rid: str = "obs-1", **over: Any) -> dict[str, Any]:
    rating = MasiRating.model_validate(masi("S001", "m3", "R1"), context=RecordContext(ctx.trial))
    resource = common.to_rater_masi_observation(rating, ctx)
    resource.update({"id": rid, "subject": {"reference": "Patient/p-1"}}, **over)
    return dict(orjson.loads(dumpb(resource)))


def consensus_observation(ctx: MappingContext) -> dict[str, Any]:
    rating = MasiRating.model_validate(masi("S001", "m3", "R1"), context=RecordContext(ctx.trial))
    [vs] = score_visits([rating], Decimal(3), ctx.trial.visit_order, ctx.trial.baseline_visit)
    masi_obs, _ = common.to_consensus_observations(vs, ctx)
    masi_obs["id"] = "consensus-1"
    return dict(orjson.loads(dumpb(masi_obs)))


def status(kind: str, *events: dict[str, Any], reverse: bool = False) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "subscription", "valueReference": {"reference": f"{BASE}/Subscription/s1"}},
        {"name": "topic", "valueCanonical": "http://example.org/topic/masi"},
        {"name": "status", "valueCode": "active"},
        {"name": "type", "valueCode": kind},
        {"name": "events-since-subscription-start", "valueString": "7"},
    ]
    for event in events:
        params.append(
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": "7"},
                    {"name": "timestamp", "valueDate": "2026-11-01"},
                    *(
                        [{"name": "focus", "valueReference": {"reference": event["focus"]}}]
                        if "focus" in event
                        else []
                    ),
                ],
            }
        )
    if reverse:
        params.reverse()
    return {"resourceType": "Parameters", "parameter": params}


def notification(
    kind: str,
    *entries: dict[str, Any],
    events: tuple[dict[str, Any], ...] = (),
    reverse: bool = False,
) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": "2026-11-01T10:00:00Z",
        "entry": [
            {"fullUrl": "urn:uuid:status-1", "resource": status(kind, *events, reverse=reverse)},
            *entries,
        ],
    }


def post(client: FlaskClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/fhir/notify", data=data, headers={**FHIR_JSON, **(headers or AUTH)})


def queued(inbox: Inbox) -> list[tuple[str, str | None]]:
    return [(what, ref) for _, what, ref, _ in inbox.events()]


def assert_empty_200(response: Any) -> None:
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.data == b""


# -- the Subscriptions Backport IG ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["handshake", "heartbeat"])
def test_handshake_and_heartbeat_are_acknowledged(
    webhook: FlaskClient, inbox: Inbox, kind: str
) -> None:
    assert_empty_200(post(webhook, notification(kind)))
    assert queued(inbox) == []


def test_full_resource_event(webhook: FlaskClient, inbox: Inbox, ctx: MappingContext) -> None:
    resource = rater_observation(ctx)
    body = notification(
        "event-notification",
        {
            "fullUrl": f"{BASE}/Observation/obs-1",
            "resource": resource,
            "request": {"method": "PUT", "url": "Observation/obs-1"},
        },
        events=({"focus": f"{BASE}/Observation/obs-1"},),
    )
    assert_empty_200(post(webhook, body))
    assert queued(inbox) == [("resource", "Observation/obs-1")]


def test_id_only_event_reads_each_focus_back(webhook: FlaskClient, inbox: Inbox) -> None:
    body = notification(
        "event-notification",
        {
            "fullUrl": f"{BASE}/Observation/obs-2/_history/3",
            "request": {"method": "PUT", "url": "Observation/obs-2"},
        },
        events=({"focus": "Observation/obs-1"}, {"focus": f"{BASE}/Observation/obs-2"}),
    )
    assert_empty_200(post(webhook, body))
    assert sorted(queued(inbox)) == [("ref", "Observation/obs-1"), ("ref", "Observation/obs-2")]


def test_empty_event_queries_back(webhook: FlaskClient, inbox: Inbox) -> None:
    assert_empty_200(post(webhook, notification("event-notification", events=({},))))
    assert queued(inbox) == [("query", None)]


def test_parameters_in_any_order(webhook: FlaskClient, inbox: Inbox) -> None:
    body = notification(
        "event-notification", events=({"focus": "Observation/obs-9"},), reverse=True
    )
    assert_empty_200(post(webhook, body))
    assert queued(inbox) == [("ref", "Observation/obs-9")]


def test_r4b_subscription_status(webhook: FlaskClient, inbox: Inbox) -> None:
    body = {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": "3",
                    "notificationEvent": [
                        {"eventNumber": "3", "focus": {"reference": "Observation/o7"}}
                    ],
                }
            }
        ],
    }
    assert_empty_200(post(webhook, body))
    assert queued(inbox) == [("ref", "Observation/o7")]


def test_the_adapters_own_consensus_is_ignored(
    webhook: FlaskClient, inbox: Inbox, ctx: MappingContext
) -> None:
    resource = consensus_observation(ctx)
    body = notification(
        "event-notification", {"fullUrl": f"{BASE}/Observation/consensus-1", "resource": resource}
    )
    assert_empty_200(post(webhook, body))
    assert queued(inbox) == []
    assert_empty_200(post(webhook, resource))
    assert queued(inbox) == []


def test_other_resource_types_are_ignored(webhook: FlaskClient, inbox: Inbox) -> None:
    body = notification("event-notification", events=({"focus": "Patient/p-1"},))
    assert_empty_200(post(webhook, body))
    assert_empty_200(post(webhook, {"resourceType": "Patient", "id": "p-1"}))
    assert_empty_200(
        webhook.put(
            "/fhir/notify/Patient/p-1",
            data=b'{"resourceType": "Patient"}',
            headers={**FHIR_JSON, **AUTH},
        )
    )
    assert queued(inbox) == []


# -- classic rest-hook (HAPI) and Medplum ---------------------------------------------------------
def test_hapi_put_with_the_resource(
    webhook: FlaskClient, inbox: Inbox, ctx: MappingContext
) -> None:
    response = webhook.put(
        "/fhir/notify/Observation/obs-1",
        data=orjson.dumps(rater_observation(ctx)),
        headers={**FHIR_JSON, **AUTH, "If-Match": 'W/"2"'},
    )
    assert_empty_200(response)
    assert queued(inbox) == [("resource", "Observation/obs-1")]


def test_hapi_put_without_body_and_delete(webhook: FlaskClient, inbox: Inbox) -> None:
    assert_empty_200(webhook.put("/fhir/notify/Observation/obs-1", headers=AUTH))
    assert_empty_200(webhook.delete("/fhir/notify/Observation/obs-2", headers=AUTH))
    assert queued(inbox) == [("ref", "Observation/obs-1"), ("deleted", "Observation/obs-2")]


def test_hapi_empty_post_queries_back(webhook: FlaskClient, inbox: Inbox) -> None:
    assert_empty_200(webhook.post("/fhir/notify", headers=AUTH))
    assert queued(inbox) == [("query", None)]


def test_medplum_bare_resource(webhook: FlaskClient, inbox: Inbox, ctx: MappingContext) -> None:
    body = orjson.dumps(rater_observation(ctx))
    assert_empty_200(post(webhook, body, medplum_headers(body)))
    assert queued(inbox) == [("resource", "Observation/obs-1")]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/fhir/notify", b"{broken", 400),
        ("POST", "/fhir/notify", b'{"no": "resourceType"}', 400),
        ("POST", "/fhir/notify", b"[]", 400),
        ("PUT", "/fhir/notify/Observation/1", b'{"resourceType": "Patient"}', 400),
    ],
)
def test_malformed_notifications(
    webhook: FlaskClient, method: str, path: str, body: bytes, status: int
) -> None:
    response = webhook.open(path, method=method, data=body, headers={**FHIR_JSON, **AUTH})
    assert response.status_code == status
    assert "Traceback" not in response.get_data(as_text=True)


def test_xml_is_415(webhook: FlaskClient) -> None:
    response = webhook.post(
        "/fhir/notify", data=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml", **AUTH}
    )
    assert response.status_code == 415


# -- reading rater Observations back ------------------------------------------------------------
def test_bundle_events_are_lenient() -> None:
    kind, events = bundle_events(
        {
            "resourceType": "Bundle",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Parameters",
                        "parameter": [
                            {
                                "name": "notification-event",
                                "part": [
                                    {
                                        "name": "focus",
                                        "valueReference": {"reference": "Observation/a"},
                                    },
                                    {"name": "event-number", "valueInteger": 12},
                                    {"name": "timestamp", "valueInstant": "2026-11-01T10:00:00Z"},
                                ],
                            },
                            {"name": "type", "valueString": "event-notification"},
                        ],
                    }
                },
                "not an entry",
            ],
        }
    )
    assert kind == "event-notification"
    assert events == [("ref", "Observation/a", None)]


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Observation/1", "Observation/1"),
        ("http://h/fhir/R4/Observation/ab-c.1/_history/2", "Observation/ab-c.1"),
        ("https://h/Observation/1?x=y", "Observation/1"),
        ("urn:uuid:1234", None),
        ("", None),
    ],
)
def test_normalize_reference(reference: str, expected: str | None) -> None:
    assert normalize_reference(reference) == expected


def test_parse_rater_value(ctx: MappingContext) -> None:
    visits = ctx.trial.visit_ids
    assert parse_rater_value("S001-m3-masi-R1", visits) == RaterKey("S001", "m3", "R1")
    assert parse_rater_value("S-01-baseline-masi-R-2", visits) == RaterKey(
        "S-01", "baseline", "R-2"
    )
    assert parse_rater_value("S001-m3-masi", visits) is None
    assert parse_rater_value("S001-m99-masi-R1", visits) is None


def test_is_rater_masi(ctx: MappingContext) -> None:
    assert is_rater_masi(rater_observation(ctx), ctx) == RaterKey("S001", "m3", "R1")
    assert is_rater_masi(consensus_observation(ctx), ctx) is None
    no_performer = rater_observation(ctx)
    del no_performer["performer"]
    assert is_rater_masi(no_performer, ctx) is None
    assert is_rater_masi({"resourceType": "Patient"}, ctx) is None


def test_rating_read_back_from_the_components(ctx: MappingContext) -> None:
    resource = rater_observation(ctx)
    record, warnings = rating_record(resource, is_rater_masi(resource, ctx), ctx)  # type: ignore[arg-type]
    assert record == {**masi("S001", "m3", "R1")}
    assert warnings == []


def test_a_disagreeing_value_quantity_is_a_warning_not_a_source(ctx: MappingContext) -> None:
    resource = rater_observation(ctx)
    resource["valueQuantity"]["value"] = 47.5
    record, warnings = rating_record(resource, is_rater_masi(resource, ctx), ctx)  # type: ignore[arg-type]
    assert record == masi("S001", "m3", "R1")
    assert warnings
    assert "disagrees" in warnings[0]


def test_a_rating_with_missing_or_bad_components_is_skipped(ctx: MappingContext) -> None:
    resource = rater_observation(ctx)
    resource["component"] = resource["component"][:11]
    record, warnings = rating_record(resource, is_rater_masi(resource, ctx), ctx)  # type: ignore[arg-type]
    assert record is None
    assert "missing" in warnings[0]
    resource = rater_observation(ctx)
    resource["component"][0]["valueInteger"] = 9
    record, warnings = rating_record(resource, is_rater_masi(resource, ctx), ctx)  # type: ignore[arg-type]
    assert record is None
    assert "forehead_d" in warnings[0]


def test_effective_date_time_is_read_as_the_site_date(ctx: MappingContext) -> None:
    resource = rater_observation(ctx, effectiveDateTime="2025-01-09T20:30:00Z")
    record, _ = rating_record(resource, is_rater_masi(resource, ctx), ctx)  # type: ignore[arg-type]
    assert record is not None
    assert record["assessed_on"] == dt.date(2025, 1, 10).isoformat()  # Asia/Shanghai, UTC+8
