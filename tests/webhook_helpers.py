"""What the webhook tests share: credentials, signing as each scheme's sender does, JSON records.

Signatures are computed here from the schemes' definitions (SPEC §13, Standard Webhooks,
Medplum), independently of server/auth.py, so a test fails when the server's check is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from tests import helpers

SECRET = "test-hmac-secret-0123456789"  # noqa: S105 - test credentials
TOKEN = "test-bearer-token-0123456789"  # noqa: S105 - test credentials
STANDARD_KEY = bytes(range(32))
STANDARD_SECRET = "whsec_" + base64.b64encode(STANDARD_KEY).decode()

#: FHIR_ADAPTER_* variables of a webhook with every scheme enabled
CREDENTIALS_ENV = {
    "FHIR_ADAPTER_WEBHOOK_SECRET": SECRET,
    "FHIR_ADAPTER_WEBHOOK_TOKEN": TOKEN,
    "FHIR_ADAPTER_WEBHOOK_STANDARD_SECRET": STANDARD_SECRET,
}

_INTEGER_FIELDS = {
    f"{region}_{part}"
    for region in ("forehead", "right_malar", "left_malar", "chin")
    for part in ("d", "h", "a")
} | {"pga", "grade"}


def as_json_record(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV-style test row as the EHR posts it: scores as integers, empty fields absent."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value in ("", None):
            continue
        out[key] = int(value) if key in _INTEGER_FIELDS and isinstance(value, str) else value
    return out


def participant(subject_id: str = "S001", **over: Any) -> dict[str, Any]:
    return as_json_record(helpers.participant(subject_id, **over))


def masi(
    subject_id: str = "S001",
    visit: str = "baseline",
    rater_id: str = "R1",
    scores: Iterable[int] = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2),
    **over: Any,
) -> dict[str, Any]:
    return as_json_record(helpers.masi(subject_id, visit, rater_id, scores, **over))


def pga(subject_id: str = "S001", visit: str = "m1", **over: Any) -> dict[str, Any]:
    return as_json_record(helpers.pga(subject_id, visit, **over))


def body_of(records: Any) -> bytes:
    return json.dumps(records).encode()


def hmac_headers(
    body: bytes, *, timestamp: int | None = None, secret: str = SECRET
) -> dict[str, str]:
    """SPEC §13: X-Timestamp + X-Signature: sha256=<hex HMAC(secret, "<ts>." + body)>."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Timestamp": ts, "X-Signature": f"sha256={digest}"}


def standard_headers(
    body: bytes,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
    key: bytes = STANDARD_KEY,
) -> dict[str, str]:
    """Standard Webhooks: sign "<id>.<timestamp>.<body>" with the base64-decoded whsec_ key."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


def bearer_headers(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def medplum_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    """Medplum's rest-hook: X-Signature: <hex HMAC-SHA256(secret, body)>."""
    return {"X-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()}


JSON = {"Content-Type": "application/json"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}
