"""FHIR REST client (SPEC §7): one Session per server, timeouts always set, FHIR JSON headers,
auth, the CapabilityStatement check, retries of exactly the retryable failures, and the one
place where an HTTP answer becomes a typed exception.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from fhir_adapter import __version__
from fhir_adapter.client.auth import auth_from_settings
from fhir_adapter.errors import (
    AuthError,
    Conflict,
    ServerError,
    ServerRejected,
    ServerUnavailable,
)
from fhir_adapter.jsonout import dumpb
from fhir_adapter.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

FHIR_JSON = "application/fhir+json"
RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
_FHIR_VERSIONS = {"R4": ("4.0.",), "R5": ("5.0.",)}


def _issues(outcome: Any) -> list[str]:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    texts = []
    for issue in outcome.get("issue", []):
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        where = ",".join(issue.get("expression", []) or issue.get("location", []))
        texts.append(
            f"{issue.get('severity', '?')} {issue.get('code', '?')}"
            + (f" at {where}" if where else "")
            + (f": {text}" if text else "")
        )
    return texts


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_for_status(
    status: int, outcome: Any = None, *, retry_after: float | None = None, what: str = ""
) -> ServerError | None:
    """The single mapping of HTTP status + OperationOutcome to the exception hierarchy."""
    if status < 400:
        return None
    issues = _issues(outcome)
    detail = f"HTTP {status}" + (f" {what}" if what else "")
    if issues:
        detail += ": " + "; ".join(issues[:5])
    kind: type[ServerError]
    if status in (401, 403):
        kind = AuthError
    elif status in RETRYABLE_STATUS:
        kind = ServerUnavailable
    elif status in (409, 412):
        kind = Conflict
    else:
        kind = ServerRejected
    return kind(detail, status=status, outcome=outcome, issues=issues, retry_after=retry_after)


def _wait(settings: Settings) -> Callable[[RetryCallState], float]:
    jitter = wait_random_exponential(multiplier=0.5, max=30)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return float(min(hinted, settings.max_retry_seconds))
        return float(jitter(state))

    return wait


def retrying(settings: Settings, fn: Callable[[], T]) -> T:
    """Call ``fn`` again on ServerUnavailable only: backoff with jitter, Retry-After honoured,
    bounded attempts and total time. Nothing else is retried."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("server unavailable (%s); retry %d", exc, state.attempt_number)

    for attempt in Retrying(
        retry=retry_if_exception_type(ServerUnavailable),
        wait=_wait(settings),
        stop=stop_after_attempt(settings.max_attempts)
        | stop_after_delay(settings.max_retry_seconds),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class Capabilities:
    fhir_version: str
    search_params: dict[str, frozenset[str]] = field(default_factory=dict)
    interactions: dict[str, frozenset[str]] = field(default_factory=dict)
    update_create: dict[str, bool] = field(default_factory=dict)

    def supports_search(self, resource_type: str, param: str) -> bool:
        return param in self.search_params.get(resource_type, frozenset())

    @classmethod
    def parse(cls, statement: dict[str, Any]) -> Capabilities:
        caps = cls(str(statement.get("fhirVersion", "")))
        for rest in statement.get("rest", []):
            if rest.get("mode", "server") != "server":
                continue
            common = {p.get("name") for p in rest.get("searchParam", [])}
            for res in rest.get("resource", []):
                rtype = res.get("type")
                params = {p.get("name") for p in res.get("searchParam", [])} | common
                caps.search_params[rtype] = frozenset(p for p in params if p)
                caps.interactions[rtype] = frozenset(
                    i.get("code") for i in res.get("interaction", []) if i.get("code")
                )
                caps.update_create[rtype] = bool(res.get("updateCreate", False))
        return caps


class FhirClient:
    """A FHIR server at ``base_url``."""

    def __init__(self, settings: Settings, base_url: str | None = None) -> None:
        self.settings = settings
        self.base_url = (base_url or settings.fhir_base_url).rstrip("/")
        self.session = requests.Session()
        self.session.headers.update(
            {
                "Accept": FHIR_JSON,
                "Content-Type": FHIR_JSON,
                "User-Agent": f"fhir-adapter/{__version__}",
                # HAPI FHIR answers a repeated search from its cache for 60 s, writes made since
                # unseen: a stale "not held" would duplicate (and proxies may cache too)
                "Cache-Control": "no-cache",
            }
        )
        if settings.ca_bundle:
            self.session.verify = str(settings.ca_bundle)
        if settings.client_cert:
            self.session.cert = (
                (str(settings.client_cert), str(settings.client_key))
                if settings.client_key
                else str(settings.client_cert)
            )
        if settings.proxy:
            self.session.proxies = {"http": settings.proxy, "https": settings.proxy}
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.auth = auth_from_settings(settings, self.session)
        self.timeout = (settings.connect_timeout_s, settings.read_timeout_s)
        self._capabilities: Capabilities | None = None
        self.requests_sent = 0

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ---------------------------------------------------------------------
    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.base_url}/{path.lstrip('/')}"

    def request_once(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[requests.Response, Any]:
        """One exchange (plus one token refresh on 401); errors mapped, no retry."""
        data = dumpb(body) if body is not None else None
        for refreshed in (False, True):
            try:
                self.requests_sent += 1
                response = self.session.request(
                    method,
                    self.url(path),
                    data=data,
                    params=params,
                    headers=headers,
                    auth=self.auth,
                    timeout=self.timeout,
                )
            except requests.Timeout:
                raise ServerUnavailable(f"{method} {path}: timed out") from None
            except requests.ConnectionError:
                raise ServerUnavailable(
                    f"{method} {self.base_url}: cannot connect to the FHIR server"
                ) from None
            if response.status_code == 401 and not refreshed and self._can_refresh():
                log.info("401 from the server: refreshing the access token once")
                continue
            break
        payload = self._payload(response)
        error = error_for_status(
            response.status_code,
            payload,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            what=f"for {method} {path.split('?')[0] or 'transaction'}",
        )
        if error is not None:
            raise error
        return response, payload

    def _can_refresh(self) -> bool:
        invalidate = getattr(self.auth, "invalidate", None)
        return bool(invalidate and invalidate())

    @staticmethod
    def _payload(response: requests.Response) -> Any:
        if not response.content:
            return None
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            if response.status_code < 400:
                raise ServerRejected(
                    f"HTTP {response.status_code}: the server answered with a body that is not JSON"
                ) from None
            return None

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[requests.Response, Any]:
        """A request retried on ServerUnavailable (use only for idempotent requests)."""
        return retrying(self.settings, lambda: self.request_once(method, path, **kwargs))

    # -- capability statement ------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            _, statement = self.request("GET", "metadata")
            if (
                not isinstance(statement, dict)
                or statement.get("resourceType") != "CapabilityStatement"
            ):
                raise ServerRejected(f"{self.base_url}/metadata is not a CapabilityStatement")
            self._capabilities = Capabilities.parse(statement)
        return self._capabilities

    def check_version(self, expected: str) -> Capabilities:
        """Refuse a server whose FHIR version is not the configured one."""
        caps = self.capabilities()
        if not caps.fhir_version.startswith(_FHIR_VERSIONS[expected]):
            raise ServerRejected(
                f"the server at {self.base_url} speaks FHIR {caps.fhir_version or '(unknown)'}, "
                f"but FHIR_ADAPTER_FHIR_VERSION is {expected}: refusing to write "
                f"(set --fhir-version or point --server at a {expected} endpoint)"
            )
        return caps

    # -- reads ---------------------------------------------------------------------------
    def search_all(self, resource_type: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Every match of a search, following ``next`` links page by page."""
        _, bundle = self.request("GET", resource_type, params=params)
        while True:
            for entry in (bundle or {}).get("entry", []):
                resource = entry.get("resource")
                if resource is not None and entry.get("search", {}).get("mode", "match") == "match":
                    yield resource
            next_url = next(
                (
                    link["url"]
                    for link in (bundle or {}).get("link", [])
                    if link.get("relation") == "next"
                ),
                None,
            )
            if not next_url:
                return
            _, bundle = self.request("GET", next_url)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        _, body = self.request("GET", f"{resource_type}/{resource_id}")
        return dict(body)

    # -- writes --------------------------------------------------------------------------
    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle once (the caller decides whether a retry is safe)."""
        _, response = self.request_once("POST", "", body=bundle)
        if not isinstance(response, dict) or response.get("resourceType") != "Bundle":
            raise ServerRejected("the server answered a transaction without a Bundle")
        return response


__all__ = [
    "Capabilities",
    "FhirClient",
    "error_for_status",
    "retry_after_seconds",
    "retrying",
]
