"""Authentication to the FHIR server: none, a static bearer token, or SMART Backend Services.

SMART Backend Services: a client-credentials grant with a signed JWT client assertion
(RFC 7523), the token cached until shortly before it expires and refreshed once on a 401.
Secrets never appear in logs, messages or exceptions.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import jwt
import requests
from requests.auth import AuthBase

from fhir_adapter.errors import AuthError, ConfigurationError
from fhir_adapter.settings import Settings

_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class BearerAuth(AuthBase):
    """A static bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def invalidate(self) -> bool:
        """A static token cannot be refreshed."""
        return False

    def __repr__(self) -> str:  # never show the token
        return "BearerAuth(***)"


class SmartBackendAuth(AuthBase):
    """SMART Backend Services (client_credentials + private_key_jwt), token cached."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key: str,
        *,
        algorithm: str = "RS384",
        key_id: str | None = None,
        scope: str = "system/*.rs",
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._key = private_key
        self.algorithm = algorithm
        self.key_id = key_id
        self.scope = scope
        self._session = session or requests.Session()
        self._timeout = timeout
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.token_requests = 0

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self.client_id!r}, token_url={self.token_url!r})"

    def _assertion(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "exp": now + 300,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self.key_id} if self.key_id else None
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def check_key(self) -> None:
        """Sign one assertion now, so an unusable key is a configuration error at start-up
        rather than a failure in the middle of a sync. The key never appears in the message."""
        try:
            self._assertion()
        except Exception:  # PyJWT / cryptography raise ValueError, TypeError, InvalidKeyError…
            raise ConfigurationError(
                f"the SMART private key is not a PEM private key usable with {self.algorithm} "
                "(FHIR_ADAPTER_SMART_PRIVATE_KEY / _PATH, FHIR_ADAPTER_SMART_ALGORITHM)"
            ) from None

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            assert self._token is not None  # noqa: S101 - set by _fetch
            return self._token

    def _fetch(self) -> None:
        self.token_requests += 1
        try:
            response = self._session.post(
                self.token_url,
                data={
                    "grant_type": "client_credentials",
                    "scope": self.scope,
                    "client_assertion_type": _ASSERTION_TYPE,
                    "client_assertion": self._assertion(),
                },
                # explicit: the FHIR session's Content-Type (application/fhir+json) must not
                # label this form-encoded body
                headers={
                    "Accept": "application/json",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise AuthError(f"token endpoint unreachable ({exc.__class__.__name__})") from None
        if response.status_code != 200:
            raise AuthError(
                f"token endpoint refused the client assertion (HTTP {response.status_code})"
            )
        try:
            body: dict[str, Any] = response.json()
            token = str(body["access_token"])
        except (ValueError, KeyError):
            raise AuthError("token endpoint answered without an access_token") from None
        expires_in = float(body.get("expires_in", 300))
        self._token = token
        # refresh a little early so a token never expires in flight
        self._expires_at = time.monotonic() + max(expires_in - 30, expires_in / 2)

    def invalidate(self) -> bool:
        """Forget the cached token (after a 401); the next request fetches a new one."""
        with self._lock:
            self._token = None
            self._expires_at = 0.0
        return True

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token()}"
        return r


def auth_from_settings(settings: Settings, session: requests.Session) -> AuthBase | None:
    """The configured auth; an incomplete or unusable setting is a ConfigurationError (66)."""
    if settings.fhir_auth == "none":
        return None
    if settings.fhir_auth == "bearer":
        if settings.fhir_token is None or not settings.fhir_token.get_secret_value().strip():
            raise ConfigurationError("FHIR_ADAPTER_FHIR_AUTH=bearer needs FHIR_ADAPTER_FHIR_TOKEN")
        return BearerAuth(settings.fhir_token.get_secret_value().strip())
    token_url, client_id = settings.smart_token_url, settings.smart_client_id
    if not token_url or not client_id:
        missing = [
            name
            for name, value in (
                ("FHIR_ADAPTER_SMART_TOKEN_URL", token_url),
                ("FHIR_ADAPTER_SMART_CLIENT_ID", client_id),
            )
            if not value
        ]
        raise ConfigurationError(f"FHIR_ADAPTER_FHIR_AUTH=smart needs {' and '.join(missing)}")
    if settings.smart_private_key is not None:
        key = settings.smart_private_key.get_secret_value()
    elif settings.smart_private_key_path is not None:
        try:
            key = settings.smart_private_key_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ConfigurationError(
                "FHIR_ADAPTER_SMART_PRIVATE_KEY_PATH cannot be read as a PEM text file"
            ) from None
    else:
        raise ConfigurationError(
            "FHIR_ADAPTER_FHIR_AUTH=smart needs FHIR_ADAPTER_SMART_PRIVATE_KEY or "
            "FHIR_ADAPTER_SMART_PRIVATE_KEY_PATH"
        )
    auth = SmartBackendAuth(
        token_url,
        client_id,
        key,
        algorithm=settings.smart_algorithm,
        key_id=settings.smart_key_id,
        scope=settings.smart_scope,
        session=session,
        timeout=(settings.connect_timeout_s, settings.read_timeout_s),
    )
    auth.check_key()
    return auth
