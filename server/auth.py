"""Who may call the webhook (SPEC §8, §13). Every route but /healthz and /readyz asks.

Accepted, whichever the caller sends:

- **the adapter's HMAC scheme** (SPEC §13): ``X-Timestamp: <unix seconds>`` and
  ``X-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + raw body)>``; the timestamp
  must lie within the tolerance (5 min); each signature is accepted once (a replay is refused);
- **Standard Webhooks**: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<b64>``
  with its own ``whsec_…`` secret, verified by the ``standardwebhooks`` package; the exact same
  signature twice is a replay (refused); a message id already processed is a duplicate
  (acknowledged, not processed again);
- a **bearer token** (``Authorization: Bearer <token>``), what a FHIR server's Subscription can
  send in ``channel.header``;
- on ``/fhir/notify`` only, **Medplum's** ``X-Signature: <hex HMAC-SHA256(secret, body)>``
  (no timestamp: notifications are idempotent, a replay changes nothing).

Comparisons are constant-time; the replay and message-id caches live in the outbox database, so
every worker process sees them. A refusal says why in general terms and never what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

from flask import Request
from standardwebhooks.webhooks import Webhook

from fhir_adapter.sync.inbox import Claim
from server.state import AppState

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_DIGITS = re.compile(r"^\d{1,12}$")
_WEBHOOK_ID = re.compile(r"^[\x21-\x7e]{1,256}$")
_MAX_SIGNATURE_HEADER = 2048
#: how long a processed webhook-id is remembered (senders retry for hours or days)
WEBHOOK_ID_TTL_S = 3 * 24 * 3600.0
WEBHOOK_ID = "standard-webhooks-id"


class Unauthorized(Exception):
    """Authentication failed; the message is safe to show (no submitted value)."""


@dataclass(frozen=True)
class Caller:
    scheme: str  # bearer | hmac | standard-webhooks | medplum
    webhook_id: str | None = None
    duplicate: bool = False  # a Standard Webhooks message id already processed
    #: values this request may use once (its signature); claimed with what it writes
    claims: tuple[Claim, ...] = ()

    def on_success(self) -> tuple[Claim, ...]:
        """What a processed request leaves behind: its message id (later ones: duplicates)."""
        if self.webhook_id is None:
            return ()
        return (Claim(WEBHOOK_ID, self.webhook_id, WEBHOOK_ID_TTL_S),)


def authenticate(
    request: Request, st: AppState, body: bytes, *, notify: bool, claimed_later: bool = False
) -> Caller:
    """Who is calling, or :class:`Unauthorized`. ``claimed_later``: an HMAC signature is
    claimed in the transaction of the request's write (ingest), which refuses a replay there;
    checking the replay cache first would cost a query per request and decide nothing more."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        return _bearer(authorization, st)
    if any(h in headers for h in ("webhook-id", "webhook-signature", "webhook-timestamp")):
        return _standard(request, st, body)
    signature = headers.get("X-Signature")
    if signature is not None:
        if signature.startswith("sha256=") or "X-Timestamp" in headers:
            return _hmac(signature, headers.get("X-Timestamp"), st, body, claimed_later)
        if notify:
            return _medplum(signature, st, body)
        raise Unauthorized("malformed X-Signature header (expected sha256=<hex> and X-Timestamp)")
    raise Unauthorized(
        "authentication required: X-Timestamp + X-Signature, Standard Webhooks headers, "
        "or Authorization: Bearer"
    )


def _bearer(authorization: str, st: AppState) -> Caller:
    token = st.settings.webhook_token
    if token is None:
        raise Unauthorized("bearer tokens are not enabled on this server")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("malformed Authorization header (expected Bearer <token>)")
    if not hmac.compare_digest(
        value.strip().encode("utf-8", "replace"), token.get_secret_value().encode()
    ):
        raise Unauthorized("invalid bearer token")
    return Caller("bearer")


def _secret(st: AppState) -> bytes:
    secret = st.settings.webhook_secret
    if secret is None:
        raise Unauthorized("HMAC signatures are not enabled on this server")
    return secret.get_secret_value().encode()


def _hmac(
    signature: str, timestamp: str | None, st: AppState, body: bytes, claimed_later: bool
) -> Caller:
    secret = _secret(st)
    if timestamp is None or not _DIGITS.match(timestamp.strip()):
        raise Unauthorized("missing or malformed X-Timestamp header (unix seconds)")
    digest = signature.removeprefix("sha256=")
    if not signature.startswith("sha256=") or not _HEX64.match(digest):
        raise Unauthorized("malformed X-Signature header (expected sha256=<64 hex digits>)")
    tolerance = st.settings.webhook_signature_tolerance_s
    if abs(time.time() - int(timestamp.strip())) > tolerance:
        raise Unauthorized(f"X-Timestamp is outside the accepted window (±{tolerance} s)")
    expected = hmac.new(secret, timestamp.strip().encode() + b"." + body, hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest(), digest.lower()):
        raise Unauthorized("signature does not match")
    claim = Claim("hmac", digest.lower(), 2.0 * tolerance + 60)
    if not claimed_later:
        _not_replayed(st, claim)
    return Caller("hmac", claims=(claim,))


def _medplum(signature: str, st: AppState, body: bytes) -> Caller:
    secret = _secret(st)
    if not _HEX64.match(signature.strip()):
        raise Unauthorized("malformed X-Signature header (expected 64 hex digits)")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.strip().lower()):
        raise Unauthorized("signature does not match")
    return Caller("medplum")


def _standard(request: Request, st: AppState, body: bytes) -> Caller:
    secret = st.settings.webhook_standard_secret
    if secret is None:
        raise Unauthorized("Standard Webhooks signatures are not enabled on this server")
    headers = request.headers
    msg_id = headers.get("webhook-id", "")
    signature = headers.get("webhook-signature", "")
    if not _WEBHOOK_ID.match(msg_id) or not signature or len(signature) > _MAX_SIGNATURE_HEADER:
        raise Unauthorized("malformed Standard Webhooks headers")
    try:
        Webhook(secret.get_secret_value()).verify(
            body,
            {
                "webhook-id": msg_id,
                "webhook-timestamp": headers.get("webhook-timestamp", ""),
                "webhook-signature": signature,
            },
            json_parse=False,
        )
    except Exception:  # the package raises ValueError, binascii.Error… on malformed input
        raise Unauthorized(
            "Standard Webhooks signature invalid, malformed or outside the 5-minute window"
        ) from None
    claim = Claim("standard-webhooks-signature", signature, 2.0 * 300 + 60)
    # checked first even on ingest: a replay is a 401, not the "duplicate" answer below
    _not_replayed(st, claim)
    return Caller(
        "standard-webhooks",
        webhook_id=msg_id,
        duplicate=st.inbox.seen(WEBHOOK_ID, msg_id),
        claims=(claim,),
    )


def _not_replayed(st: AppState, claim: Claim) -> None:
    if st.inbox.seen(claim.scheme, claim.token):
        raise Unauthorized("signature already used (replayed request)")


def claim(st: AppState, claims: tuple[Claim, ...]) -> None:
    """Use the request's one-time values now (requests that write nothing else)."""
    for one in claims:
        if not st.inbox.first_use(one.scheme, one.token, one.ttl_s):
            raise Unauthorized("signature already used (replayed request)")
