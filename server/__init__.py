"""The Flask webhook layer (SPEC §8): ``create_app(settings)`` and its blueprints, nothing else.

It calls the library's intake (validation), inbox/outbox (durable storage) and, through the
delivery worker (``fhir-adapter serve`` / ``worker``), its mapping, scoring and sync.

- ``POST /ingest/<kind>``, ``DELETE /ingest/<kind>/<key>`` (:mod:`server.ingest`)
- ``POST /fhir/notify``, ``PUT|DELETE /fhir/notify/<Type>/<id>`` (:mod:`server.notify`)
- ``GET /healthz``, ``/readyz``, ``/metrics`` (:mod:`server.ops`), ``/openapi.json``

Every route but ``/healthz`` and ``/readyz`` is authenticated (:mod:`server.auth`). Errors are
OperationOutcomes without stack traces or submitted values; logs carry identifiers and counts.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from fhir_adapter.settings import Settings
from fhir_adapter.sync.delivery import webhook_context
from fhir_adapter.sync.inbox import ThreadInboxes
from server import ingest, notify, openapi, ops
from server.auth import Caller, Unauthorized, authenticate, claim
from server.outcome import (
    Problem,
    empty_response,
    error_response,
    json_response,
    outcome_response,
)
from server.state import EXTENSION, AppState, state

log = logging.getLogger(__name__)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fhir-adapter"'}
_HTTP_CODES = {
    404: "not-found",
    405: "not-supported",
    413: "too-long",
    415: "not-supported",
}


def create_app(settings: Settings | None = None) -> Flask:
    """The webhook application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()
    app = Flask("fhir_adapter_webhook")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    ctx, threshold = webhook_context(settings)
    app.extensions[EXTENSION] = AppState(
        settings=settings,
        ctx=ctx,
        threshold=threshold,
        inboxes=ThreadInboxes(settings.outbox_path),
    )
    for blueprint in (ingest.bp, notify.bp, ops.bp, openapi.bp):
        app.register_blueprint(blueprint)
    app.before_request(_authenticate)
    app.after_request(_after)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    return app


def _authenticate() -> Response | None:
    if request.endpoint in openapi.PUBLIC_ENDPOINTS:
        return None
    st = state()
    body = request.get_data(cache=True)  # over the size limit: 413 before anything else
    # a chunked body is cut at the limit, not refused: refuse it when more was sent
    cut = request.content_length is None and len(body) >= st.settings.max_request_bytes
    if cut and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    is_notify = request.path.startswith("/fhir/notify")
    try:
        caller = authenticate(
            request, st, body, notify=is_notify, claimed_later=_claims_with_the_write()
        )
    except Unauthorized as exc:
        log.info("refused %s %s: %s", request.method, request.endpoint or "(no route)", exc)
        return outcome_response(401, [Problem(str(exc), "security")], _CHALLENGE)
    g.caller = caller
    if not _claims_with_the_write():
        try:
            claim(st, caller.claims)
        except Unauthorized as exc:
            return outcome_response(401, [Problem(str(exc), "security")], _CHALLENGE)
    if caller.duplicate:
        log.info("duplicate Standard Webhooks message acknowledged, not processed again")
        if is_notify:
            return empty_response(200)
        return json_response(200, {"duplicate": True, "webhook_id": caller.webhook_id})
    return None


def _claims_with_the_write() -> bool:
    """Ingest commits the request's one-time values with its records (one transaction)."""
    return request.method == "POST" and str(request.endpoint or "").startswith("ingest.")


def _after(response: Response) -> Response:
    caller: Caller | None = g.get("caller")
    ok = 200 <= response.status_code < 300
    if caller is not None and ok and not caller.duplicate and not _claims_with_the_write():
        for one in caller.on_success():
            state().inbox.first_use(one.scheme, one.token, one.ttl_s)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status == 413:
        text = f"the body is larger than the limit ({state().settings.max_request_bytes} bytes)"
    else:
        text = exc.name
    return error_response(status, text, _HTTP_CODES.get(status, "processing"))


def _internal_error(exc: Exception) -> Response:
    # the class only: an exception's message may quote data; the traceback only at DEBUG
    log.error(
        "internal error handling %s %s: %s",
        request.method,
        request.endpoint,
        exc.__class__.__name__,
    )
    if log.isEnabledFor(logging.DEBUG):  # where it happened, never the message
        frames = traceback.extract_tb(exc.__traceback__)
        log.debug(
            "at %s",
            " < ".join(f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in reversed(frames)),
        )
    return error_response(500, "internal error (this is a bug; see the server log)", "exception")


__all__ = ["create_app"]
