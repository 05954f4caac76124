"""``/fhir/notify``: a FHIR Subscription receiver for the shapes real servers send (SPEC §8).

- R4 Subscriptions Backport IG: a ``history`` Bundle whose first entry is a ``Parameters``
  status (R4B/R5: a ``SubscriptionStatus``) of type ``handshake``, ``heartbeat`` or
  ``event-notification``, with empty, id-only (each ``focus`` is read back) or full-resource
  content; read leniently (parameters in any order, ``event-number`` as a string, any date type
  for ``timestamp``, relative or absolute focus references);
- classic rest-hook as HAPI FHIR sends it: ``PUT /fhir/notify/{Type}/{id}`` with the resource,
  ``DELETE /fhir/notify/{Type}/{id}``, or an empty ``POST /fhir/notify`` (query back);
- Medplum: ``POST`` of the bare resource.

Every answer to a notification is ``200`` with an empty body (HAPI treats ``{}`` as a failure).
Only rater MASI Observations are queued for the delivery worker; anything else, the adapter's own
consensus writes included, is acknowledged and ignored, so there is no feedback loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
from flask import Blueprint, Response, request

from fhir_adapter.jsonout import dumpb
from fhir_adapter.sync.notify import is_rater_masi, normalize_reference
from server.outcome import empty_response, error_response
from server.state import AppState, state

log = logging.getLogger(__name__)

bp = Blueprint("notify", __name__)

Event = tuple[str, str | None, bytes | None]
_WATCHED_TYPE = "Observation"
_STATUS_TYPES = ("Parameters", "SubscriptionStatus")


def _json_body(body: bytes) -> Any | Response:
    mimetype = request.mimetype
    if mimetype and not (
        mimetype == "application/json"
        or (mimetype.startswith("application/") and mimetype.endswith("+json"))
    ):
        return error_response(415, "notifications must be FHIR JSON", "not-supported")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_response(400, "malformed body: not JSON", "structure")


def _params(parameters: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for p in parameters if isinstance(parameters, list) else []:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            yield p["name"], p


def _value(p: dict[str, Any]) -> Any:
    return next((v for k, v in p.items() if k.startswith("value")), None)


def _status(resource: dict[str, Any]) -> tuple[str, list[str]]:
    """(notification type, focus references) of a Parameters or SubscriptionStatus."""
    if resource.get("resourceType") == "SubscriptionStatus":
        kind = str(resource.get("type") or "event-notification")
        found = [
            (e.get("focus") or {}).get("reference")
            for e in resource.get("notificationEvent") or []
            if isinstance(e, dict)
        ]
        return kind, [f for f in found if isinstance(f, str)]
    kind = "event-notification"
    foci: list[str] = []
    for name, p in _params(resource.get("parameter")):
        if name == "type":
            kind = str(_value(p) or kind)
        elif name == "notification-event":
            for part_name, part in _params(p.get("part")):
                value = _value(part)
                if part_name == "focus" and isinstance(value, dict):
                    ref = value.get("reference")
                    if isinstance(ref, str):
                        foci.append(ref)
    return kind, foci


def bundle_events(bundle: dict[str, Any]) -> tuple[str, list[Event]]:
    """(notification type, events) of a notification Bundle."""
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    kind, foci = "event-notification", list[str]()
    first = entries[0].get("resource") if entries else None
    if isinstance(first, dict) and first.get("resourceType") in _STATUS_TYPES:
        kind, foci = _status(first)
        entries = entries[1:]
    if kind in ("handshake", "heartbeat", "query-status"):
        return kind, []
    events: list[Event] = []
    carried: set[str] = set()
    for entry in entries:
        resource = entry.get("resource")
        ref = normalize_reference(str(entry.get("fullUrl") or ""))
        if isinstance(resource, dict):
            rid = resource.get("id")
            rtype = resource.get("resourceType")
            ref = f"{rtype}/{rid}" if rtype and rid else ref
            if ref:
                carried.add(ref)
            events.append(("resource", ref, dumpb(resource)))
        elif ref:
            foci.append(ref)
    for focus in foci:
        ref = normalize_reference(focus)
        if ref and ref not in carried:
            carried.add(ref)
            events.append(("ref", ref, None))
    if not events:  # "empty" content: something matching changed, ask the server
        events.append(("query", None, None))
    return kind, events


def _watched(event: Event, st: AppState) -> bool:
    what, ref, body = event
    if what == "query":
        return True
    if ref is not None and not ref.startswith(f"{_WATCHED_TYPE}/"):
        return False
    if what == "resource" and body is not None:
        return is_rater_masi(orjson.loads(body), st.ctx) is not None
    return ref is not None


def _queue(events: list[Event], st: AppState, shape: str) -> Response:
    kept = [e for e in events if _watched(e, st)]
    if kept:
        st.inbox.add_events(kept)
    log.info(
        "notification (%s): %d events, %d queued, %d ignored",
        shape,
        len(events),
        len(kept),
        len(events) - len(kept),
    )
    return empty_response(200)


@bp.post("/fhir/notify")
def notify_post() -> Response:
    st = state()
    body = request.get_data(cache=True)
    if not body.strip():
        return _queue([("query", None, None)], st, "empty")
    data = _json_body(body)
    if isinstance(data, Response):
        return data
    if not isinstance(data, dict) or not isinstance(data.get("resourceType"), str):
        return error_response(400, "malformed body: not a FHIR resource", "structure")
    if data["resourceType"] == "Bundle":
        kind, events = bundle_events(data)
        return _queue(events, st, kind)
    ref = normalize_reference(f"{data['resourceType']}/{data.get('id', '')}")
    return _queue([("resource", ref, body)], st, "resource")


@bp.put("/fhir/notify/<rtype>/<rid>")
def notify_put(rtype: str, rid: str) -> Response:
    st = state()
    ref = normalize_reference(f"{rtype}/{rid}")
    body = request.get_data(cache=True)
    if not body.strip():
        return _queue([("ref", ref, None)], st, "rest-hook")
    data = _json_body(body)
    if isinstance(data, Response):
        return data
    if not isinstance(data, dict) or data.get("resourceType") != rtype:
        return error_response(400, "the body is not the resource the URL names", "structure")
    return _queue([("resource", ref, body)], st, "rest-hook")


@bp.delete("/fhir/notify/<rtype>/<rid>")
def notify_delete(rtype: str, rid: str) -> Response:
    return _queue([("deleted", normalize_reference(f"{rtype}/{rid}"), None)], state(), "delete")
