"""Who gets in (SPEC §8, §13): each scheme as its sender signs, and every way of failing it.

Every failure is a 401 OperationOutcome that names no submitted value and carries no stack
trace; nothing of a refused request is kept.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhir_adapter.settings import Settings
from fhir_adapter.sync.inbox import Inbox
from tests.webhook_helpers import (
    JSON,
    SECRET,
    bearer_headers,
    body_of,
    hmac_headers,
    medplum_headers,
    participant,
    standard_headers,
)

BODY = body_of(participant("S001"))
INGEST = "/ingest/participants"


def post(
    client: FlaskClient, headers: dict[str, str], body: bytes = BODY, path: str = INGEST
) -> Any:
    return client.post(path, data=body, headers={**JSON, **headers})


def assert_refused(response: Any, inbox: Inbox | None = None) -> None:
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.mimetype == "application/fhir+json"
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "security"
    text = response.get_data(as_text=True)
    for leaked in ("Traceback", "S001", "1990-05-17"):
        assert leaked not in text
    if inbox is not None:
        assert inbox.rows() == []


# -- the SPEC §13 HMAC scheme --------------------------------------------------------------
def test_hmac_signed_request_is_accepted(webhook: FlaskClient) -> None:
    assert post(webhook, hmac_headers(BODY)).status_code == 202


def test_unsigned_request_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    assert_refused(post(webhook, {}), inbox)


def test_wrongly_signed_request_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    headers = hmac_headers(BODY, secret="not-the-secret")  # noqa: S106
    assert_refused(post(webhook, headers), inbox)


def test_tampered_body_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    headers = hmac_headers(BODY)
    tampered = body_of(participant("S002"))
    assert_refused(post(webhook, headers, tampered), inbox)


@pytest.mark.parametrize("skew", [-301, 301, -86400])
def test_timestamp_outside_five_minutes_is_refused(
    webhook: FlaskClient, inbox: Inbox, skew: int
) -> None:
    headers = hmac_headers(BODY, timestamp=int(time.time()) + skew)
    assert_refused(post(webhook, headers), inbox)


def test_timestamp_inside_the_window_is_accepted(webhook: FlaskClient) -> None:
    headers = hmac_headers(BODY, timestamp=int(time.time()) - 240)
    assert post(webhook, headers).status_code == 202


def test_replayed_signature_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    headers = hmac_headers(BODY)
    assert post(webhook, headers).status_code == 202
    before = inbox.rows()
    assert_refused(post(webhook, headers))
    assert inbox.rows() == before


def test_replay_is_refused_by_another_app_instance(
    webhook_settings: Settings, webhook: FlaskClient
) -> None:
    """The replay cache lives in the outbox database: another worker process refuses it too."""
    from server import create_app

    headers = hmac_headers(BODY)
    assert post(webhook, headers).status_code == 202
    other = create_app(webhook_settings).test_client()
    assert_refused(post(other, headers))


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Signature": "sha256=zz", "X-Timestamp": "1"},
        {"X-Signature": "sha256=" + "a" * 63, "X-Timestamp": str(int(time.time()))},
        {"X-Signature": "md5=" + "a" * 64, "X-Timestamp": str(int(time.time()))},
        {"X-Signature": "sha256=" + "a" * 64},
        {"X-Signature": "sha256=" + "a" * 64, "X-Timestamp": "yesterday"},
        {"X-Signature": "sha256=" + "a" * 64, "X-Timestamp": "1e9"},
        {"X-Signature": "", "X-Timestamp": str(int(time.time()))},
        {"X-Signature": "a" * 64},  # Medplum's form is for /fhir/notify only
    ],
)
def test_malformed_signature_headers_are_refused(
    webhook: FlaskClient, inbox: Inbox, headers: dict[str, str]
) -> None:
    assert_refused(post(webhook, headers), inbox)


# -- Standard Webhooks ----------------------------------------------------------------------
def test_standard_webhooks_signed_request_is_accepted(webhook: FlaskClient) -> None:
    assert post(webhook, standard_headers(BODY)).status_code == 202


def test_standard_webhooks_wrong_key_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    assert_refused(post(webhook, standard_headers(BODY, key=b"\x01" * 32)), inbox)


@pytest.mark.parametrize("skew", [-301, 301])
def test_standard_webhooks_expired_is_refused(
    webhook: FlaskClient, inbox: Inbox, skew: int
) -> None:
    headers = standard_headers(BODY, timestamp=int(time.time()) + skew)
    assert_refused(post(webhook, headers), inbox)


def test_standard_webhooks_replay_is_refused(webhook: FlaskClient) -> None:
    headers = standard_headers(BODY)
    assert post(webhook, headers).status_code == 202
    assert_refused(post(webhook, headers))


def test_standard_webhooks_redelivery_is_deduplicated_on_webhook_id(
    webhook: FlaskClient, inbox: Inbox
) -> None:
    """A sender's retry re-signs the same message id: acknowledged, not processed again."""
    first = standard_headers(BODY, msg_id="msg_fixed")
    assert post(webhook, first).status_code == 202
    seq = inbox.last_seq()
    again = standard_headers(
        body_of(participant("S001", sex="male")),
        msg_id="msg_fixed",
        timestamp=int(time.time()) + 1,
    )
    response = post(webhook, again, body_of(participant("S001", sex="male")))
    assert response.status_code == 200
    assert response.get_json() == {"duplicate": True, "webhook_id": "msg_fixed"}
    assert inbox.last_seq() == seq
    assert inbox.rows()[0].record["sex"] == "female"


def test_a_refused_message_id_is_not_remembered(webhook: FlaskClient) -> None:
    """Only a processed message counts for deduplication: a 422 may be sent again."""
    bad = body_of(participant("S001", sex="robot"))
    assert post(webhook, standard_headers(bad, msg_id="msg_bad"), bad).status_code == 422
    retry = standard_headers(bad, msg_id="msg_bad", timestamp=int(time.time()) + 1)
    assert post(webhook, retry, bad).status_code == 422


@pytest.mark.parametrize(
    "override",
    [
        {"webhook-signature": "v1"},
        {"webhook-signature": "v1,!!!not-base64!!!"},
        {"webhook-signature": "v1,abc,def"},
        {"webhook-signature": ""},
        {"webhook-signature": "x" * 5000},
        {"webhook-timestamp": "soon"},
        {"webhook-timestamp": "nan"},
        {"webhook-timestamp": "1e400"},
        {"webhook-id": ""},
        {"webhook-id": "has spaces in it"},
    ],
)
def test_standard_webhooks_malformed_headers_are_401_not_500(
    webhook: FlaskClient, inbox: Inbox, override: dict[str, str]
) -> None:
    headers = {**standard_headers(BODY), **override}
    assert_refused(post(webhook, headers), inbox)


def test_standard_webhooks_missing_header_is_refused(webhook: FlaskClient) -> None:
    headers = standard_headers(BODY)
    del headers["webhook-timestamp"]
    assert_refused(post(webhook, headers))


def test_standard_webhooks_non_utf8_body_is_refused_not_500(webhook: FlaskClient) -> None:
    """Signed over its raw bytes, a non-UTF-8 body gets in and is refused as malformed (400);
    signed with another key, it is refused at the door (401). Never a 500."""
    body = b"\xff\xfe not utf-8"
    malformed = post(webhook, standard_headers(body), body)
    assert malformed.status_code == 400, malformed.get_data(as_text=True)
    assert malformed.get_json()["issue"][0]["code"] == "structure"
    assert_refused(post(webhook, standard_headers(body, key=b"another key"), body))


# -- bearer token -----------------------------------------------------------------------------
def test_bearer_token_is_accepted(webhook: FlaskClient) -> None:
    assert post(webhook, bearer_headers()).status_code == 202


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {SECRET}", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "test-bearer-token-0123456789"],
)
def test_wrong_bearer_token_is_refused(
    webhook: FlaskClient, inbox: Inbox, authorization: str
) -> None:
    assert_refused(post(webhook, {"Authorization": authorization}), inbox)


def test_a_scheme_without_its_secret_is_refused(tmp_path: Any) -> None:
    from server import create_app

    settings = Settings(outbox_path=tmp_path / "o.sqlite", webhook_token="only-a-token")  # noqa: S106
    client = create_app(settings).test_client()
    assert_refused(post(client, hmac_headers(BODY)))
    assert_refused(post(client, standard_headers(BODY)))
    assert post(client, bearer_headers("only-a-token")).status_code == 202


# -- Medplum (notifications only) ---------------------------------------------------------------
def test_medplum_signature_on_notify(webhook: FlaskClient) -> None:
    body = b'{"resourceType": "Patient", "id": "1"}'
    response = webhook.post(
        "/fhir/notify",
        data=body,
        headers={"Content-Type": "application/fhir+json", **medplum_headers(body)},
    )
    assert response.status_code == 200
    assert response.data == b""


def test_medplum_wrong_signature_is_refused(webhook: FlaskClient) -> None:
    body = b'{"resourceType": "Patient", "id": "1"}'
    response = webhook.post(
        "/fhir/notify",
        data=body,
        headers={"Content-Type": "application/fhir+json", **medplum_headers(body, "wrong")},
    )
    assert_refused(response)


# -- every route but the probes ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("POST", "/fhir/notify"),
        ("PUT", "/fhir/notify/Observation/1"),
        ("DELETE", "/fhir/notify/Observation/1"),
        ("DELETE", "/ingest/masi/S001/m3/R1"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_route_but_the_probes_needs_authentication(
    webhook: FlaskClient, method: str, path: str
) -> None:
    assert_refused(webhook.open(path, method=method))


def test_probes_need_no_authentication(webhook: FlaskClient) -> None:
    assert webhook.get("/healthz").status_code == 200
    assert webhook.get("/readyz").status_code == 503  # the test's FHIR server is unreachable


def test_get_requests_can_be_signed(webhook: FlaskClient) -> None:
    assert webhook.get("/metrics", headers=hmac_headers(b"")).status_code == 200
    assert webhook.get("/openapi.json", headers=standard_headers(b"")).status_code == 200
