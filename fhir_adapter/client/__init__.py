"""FHIR REST client (SPEC §7): one Session per server, timeouts always set, FHIR JSON headers,
auth, the CapabilityStatement check, retries of exactly the retryable failures, and the one
place where an HTTP answer — of a request or of one entry of a Bundle — becomes a typed outcome.

Every answer to a write falls in one of these classes (:func:`error_for_status`,
:func:`entry_outcome`, the transport errors of :meth:`FhirClient.request_once`):

- *landed*: 2xx (with a ``location`` where the server id is not known beforehand);
- *refused* (:class:`ServerRejected`, :class:`Conflict`, :class:`AuthError`): 4xx, nothing applied;
- *not applied* (:class:`ServerUnavailable`): connection refused, 408, 429, 503 — retried;
- *uncertain* (:class:`OutcomeUncertain`): 500, 502, 504, a timeout or a dropped connection after
  sending, a 2xx that is not the expected answer, a 2xx entry without ``location`` — maybe
  applied: the sync engine looks the resources up before sending anything again.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson
import requests
import urllib3.exceptions
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
    ConfigurationError,
    Conflict,
    OutcomeUncertain,
    ServerError,
    ServerRejected,
    ServerUnavailable,
)
from fhir_adapter.jsonout import dumpb
from fhir_adapter.settings import Settings, check_base_url

log = logging.getLogger(__name__)
T = TypeVar("T")

FHIR_JSON = "application/fhir+json"
NOT_APPLIED_STATUS = frozenset({408, 429, 503})
UNCERTAIN_STATUS = frozenset({500, 502, 504})
_FHIR_VERSIONS = {"R4": ("4.0.",), "R5": ("5.0.",)}
BundleMode = Literal["transaction", "batch", "single"]


def _issues(outcome: Any) -> list[str]:
    """Each issue of an OperationOutcome, diagnostics included (kept with the dead letter)."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    texts = []
    for issue in outcome.get("issue", []):
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
        texts.append(_issue_head(issue) + (f": {text}" if text else ""))
    return texts


def _issue_head(issue: Mapping[str, Any]) -> str:
    """Severity, code and where: what a message may show. Diagnostics and details text are
    left out: servers quote the offending values there, which may be personal data."""
    where = ",".join(str(w) for w in (issue.get("expression") or issue.get("location") or []))
    return f"{issue.get('severity', '?')} {issue.get('code', '?')}" + (
        f" at {where}" if where else ""
    )


def _issue_summary(outcome: Any) -> list[str]:
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return []
    return [_issue_head(issue) for issue in outcome.get("issue", []) if isinstance(issue, dict)]


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
    """The single mapping of HTTP status + OperationOutcome to the exception hierarchy.

    The message names the status and each issue's severity, code and location; the server's
    diagnostics stay in ``issues`` / ``outcome`` (dead letters keep them), never in messages.
    """
    if status < 400:
        return None
    summary, issues = _issue_summary(outcome), _issues(outcome)
    head = f"HTTP {status}" + (f" {what}" if what else "")
    detail = head + (": " + "; ".join(summary[:5]) if summary else "")
    full = head + (": " + "; ".join(issues[:5]) if issues else "")
    kind: type[ServerError]
    if status in (401, 403):
        kind = AuthError
    elif status in NOT_APPLIED_STATUS:
        kind = ServerUnavailable
    elif status in (409, 412):
        kind = Conflict
    elif status >= 500 and status != 501:
        kind = OutcomeUncertain
    else:
        kind = ServerRejected
    return kind(
        detail,
        status=status,
        outcome=outcome,
        issues=issues,
        retry_after=retry_after,
        full_message=full,
    )


def transport_error(exc: requests.RequestException, what: str) -> ServerError:
    """A request that got no HTTP answer: *not applied* when it never reached the server
    (refused, unresolvable host, connect timeout), *uncertain* when it may have been sent."""
    if isinstance(exc, requests.ConnectTimeout):
        return ServerUnavailable(f"{what}: connecting timed out")
    if isinstance(exc, requests.Timeout):
        return OutcomeUncertain(f"{what}: timed out waiting for the answer")
    reason: BaseException | None = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return ServerUnavailable(f"{what}: cannot connect to the FHIR server")
    if isinstance(exc, requests.exceptions.SSLError):
        return ServerUnavailable(f"{what}: TLS handshake with the FHIR server failed")
    return OutcomeUncertain(f"{what}: the connection dropped before the answer")


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
    """Call ``fn`` again on ServerUnavailable and OutcomeUncertain only: backoff with jitter,
    Retry-After honoured, bounded attempts and total time. Nothing else is retried.

    Use it for reads, and for writes only where ``fn`` itself resolved what an uncertain
    answer left open (the sync engine's look-up)."""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s; retry %d", exc, state.attempt_number)

    for attempt in Retrying(
        retry=retry_if_exception_type((ServerUnavailable, OutcomeUncertain)),
        wait=_wait(settings),
        stop=stop_after_attempt(settings.max_attempts)
        | stop_after_delay(settings.max_retry_seconds),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return fn()
    raise AssertionError("unreachable")  # pragma: no cover


# -- entries of a Bundle answer ------------------------------------------------------------------
EntryKind = Literal["landed", "refused", "conflict", "unavailable", "uncertain"]


@dataclass(frozen=True)
class EntryOutcome:
    """What one entry's answer means (the engine acts on ``kind`` only)."""

    kind: EntryKind
    status: int = 0
    server_id: str | None = None
    version: str | None = None
    created: bool = False
    error: ServerError | None = None


def _status(entry_response: Mapping[str, Any]) -> int:
    text = str(entry_response.get("status", "")).strip()
    match = re.match(r"\d{3}", text)
    return int(match.group()) if match else 0


def parse_location(entry_response: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(server id, version) from an entry response's ``location`` / ``etag``."""
    server_id = version = None
    location = entry_response.get("location")
    if location:
        parts = str(location).split("?")[0].rstrip("/").split("/")
        if "_history" in parts:
            h = parts.index("_history")
            server_id, version = parts[h - 1], parts[h + 1] if h + 1 < len(parts) else None
        elif len(parts) >= 2:
            server_id = parts[-1]
    etag = entry_response.get("etag")
    if etag:
        version = str(etag).removeprefix("W/").strip('"')
    return server_id, version


_KIND_OF: dict[type[ServerError], EntryKind] = {
    ServerRejected: "refused",
    AuthError: "refused",
    Conflict: "conflict",
    ServerUnavailable: "unavailable",
    OutcomeUncertain: "uncertain",
}


def entry_outcome(
    request: Mapping[str, Any], answer: Any, *, known_id: str | None = None, what: str = ""
) -> EntryOutcome:
    """Classify one entry's answer. ``known_id``: the server id the request addressed
    (``PUT Type/id``), so a 2xx without ``location`` still says where it landed."""
    response = answer.get("response") if isinstance(answer, dict) else None
    if not isinstance(response, dict):
        return EntryOutcome("uncertain", error=OutcomeUncertain(f"no answer for {what}"))
    status = _status(response)
    method = str(request.get("method", ""))
    if method == "DELETE" and (200 <= status < 300 or status in (404, 410)):
        return EntryOutcome("landed", status)
    if 200 <= status < 300:
        server_id, version = parse_location(response)
        if server_id is None and method == "PUT" and known_id is not None:
            server_id = known_id
        if server_id is None:
            return EntryOutcome(
                "uncertain", status, error=OutcomeUncertain(f"HTTP {status} without a location")
            )
        return EntryOutcome("landed", status, server_id, version, created=status == 201)
    error = error_for_status(status, response.get("outcome"), what=what) if status else None
    if error is None:  # no status, or 1xx/3xx: nothing a write can end with
        return EntryOutcome(
            "uncertain", status, error=OutcomeUncertain(f"{what}: entry answer without a status")
        )
    return EntryOutcome(_KIND_OF.get(type(error), "refused"), status, error=error)


def _same_origin(a: str, b: str) -> bool:
    """Same scheme, host and port (``localhost`` and ``127.0.0.1`` count as one host: a
    server on this machine may name itself either way)."""

    def origin(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        default = {"http": 80, "https": 443}.get(parts.scheme)
        host = (parts.hostname or "").lower()
        return parts.scheme, "loopback" if is_loopback(host) else host, parts.port or default

    return origin(a) == origin(b)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Capabilities:
    fhir_version: str
    search_params: dict[str, frozenset[str]] = field(default_factory=dict)
    interactions: dict[str, frozenset[str]] = field(default_factory=dict)
    update_create: dict[str, bool] = field(default_factory=dict)
    system_interactions: frozenset[str] = frozenset()

    def supports_search(self, resource_type: str, param: str) -> bool:
        return param in self.search_params.get(resource_type, frozenset())

    def bundle_mode(self) -> BundleMode:
        """How writes travel: transaction Bundles where offered, else batch, else one by one."""
        if "transaction" in self.system_interactions:
            return "transaction"
        if "batch" in self.system_interactions:
            return "batch"
        return "single"

    @classmethod
    def parse(cls, statement: dict[str, Any]) -> Capabilities:
        caps = cls(str(statement.get("fhirVersion", "")))
        system: set[str] = set()
        for rest in statement.get("rest", []):
            if rest.get("mode", "server") != "server":
                continue
            system |= {i.get("code") for i in rest.get("interaction", []) if i.get("code")}
            common = {p.get("name") for p in rest.get("searchParam", [])}
            for res in rest.get("resource", []):
                rtype = res.get("type")
                params = {p.get("name") for p in res.get("searchParam", [])} | common
                caps.search_params[rtype] = frozenset(p for p in params if p)
                caps.interactions[rtype] = frozenset(
                    i.get("code") for i in res.get("interaction", []) if i.get("code")
                )
                caps.update_create[rtype] = bool(res.get("updateCreate", False))
        caps.system_interactions = frozenset(system)
        return caps


class FhirClient:
    """A FHIR server at ``base_url``."""

    def __init__(self, settings: Settings, base_url: str | None = None) -> None:
        self.settings = settings
        self.base_url = check_base_url((base_url or settings.fhir_base_url).rstrip("/"))
        self._check_credentials_transport()
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

    def _check_credentials_transport(self) -> None:
        """Credentials travel over plain http only to this machine (loopback)."""
        if self.settings.fhir_auth == "none":
            return
        urls = [("FHIR_ADAPTER_FHIR_BASE_URL", self.base_url)]
        if self.settings.fhir_auth == "smart" and self.settings.smart_token_url:
            token_url = check_base_url(
                self.settings.smart_token_url, "FHIR_ADAPTER_SMART_TOKEN_URL"
            )
            urls.append(("FHIR_ADAPTER_SMART_TOKEN_URL", token_url))
        for name, url in urls:
            parts = urlsplit(url)
            if parts.scheme == "http" and not is_loopback(parts.hostname):
                raise ConfigurationError(
                    f"{name} is plain http to {parts.hostname}: refusing to send credentials "
                    "unencrypted (use https; plain http is allowed only to localhost)"
                )

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
        what = f"{method} {path.split('?')[0] or 'transaction'}"
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
            except requests.RequestException as exc:
                if path == "" or not path.startswith(("http://", "https://")):
                    where = f"{method} {self.base_url}"
                else:
                    where = what
                raise transport_error(exc, where) from None
            if response.status_code == 401 and not refreshed and self._can_refresh():
                log.info("401 from the server: refreshing the access token once")
                continue
            break
        payload = self._payload(response)
        error = error_for_status(
            response.status_code,
            payload,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            what=f"for {what}",
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
                kind = response.headers.get("Content-Type", "").split(";")[0] or "no type"
                raise OutcomeUncertain(
                    f"HTTP {response.status_code}: the server answered with a body that is "
                    f"not JSON ({kind})"
                ) from None
            return None

    def request(self, method: str, path: str, **kwargs: Any) -> tuple[requests.Response, Any]:
        """A request retried on not-applied and uncertain answers (idempotent requests only)."""
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
            raise ConfigurationError(
                f"the server at {self.base_url} speaks FHIR {caps.fhir_version or '(unknown)'}, "
                f"but FHIR_ADAPTER_FHIR_VERSION is {expected}: refusing to write "
                f"(set --fhir-version or point --server at a {expected} endpoint)"
            )
        return caps

    # -- reads ---------------------------------------------------------------------------
    def search_all(self, resource_type: str, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Every match of a search, following ``next`` links page by page.

        A ``next`` link is followed only when it keeps the base URL's scheme, host and port
        (credentials and session cookies must not travel elsewhere)."""
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
            next_url = str(next_url)
            if not next_url.startswith(("http://", "https://")):
                next_url = self.url(next_url)
            if not _same_origin(next_url, self.base_url):
                parts = urlsplit(next_url)
                raise ConfigurationError(
                    f"the server's paging link for {resource_type} leaves {self.base_url} "
                    f"(it points at {parts.scheme}://{parts.netloc}): not followed; set "
                    "FHIR_ADAPTER_FHIR_BASE_URL to the address the server calls itself"
                )
            _, bundle = self.request("GET", next_url)

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        _, body = self.request("GET", f"{resource_type}/{resource_id}")
        return dict(body)

    # -- writes --------------------------------------------------------------------------
    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction or batch Bundle once (the caller decides whether a retry is safe).

        A 2xx that is not a Bundle answering each entry is *uncertain*: the server may have
        applied it (a gateway's error page, a truncated body)."""
        _, response = self.request_once("POST", "", body=bundle)
        expected = len(bundle.get("entry", []))
        if (
            not isinstance(response, dict)
            or response.get("resourceType") != "Bundle"
            or not isinstance(response.get("entry", []), list)
            or len(response.get("entry", [])) != expected
        ):
            raise OutcomeUncertain(
                f"the server answered a {bundle.get('type', 'transaction')} of {expected} "
                "entries with something that is not its response Bundle"
            )
        return response

    def write(
        self, entries: list[dict[str, Any]], mode: BundleMode, labels: list[str] | None = None
    ) -> list[EntryOutcome]:
        """Send write entries as one transaction or batch Bundle, or one request each.

        Raises what the Bundle as a whole got (refused 4xx, not applied, uncertain); returns the
        outcome of each entry otherwise."""
        labels = labels or [e["request"]["url"] for e in entries]
        if mode == "single":
            return self._one_by_one(entries, labels)
        response = self.transaction({"resourceType": "Bundle", "type": mode, "entry": entries})
        return [
            entry_outcome(e["request"], answer, known_id=_addressed_id(e), what=f"for {label}")
            for e, answer, label in zip(entries, response["entry"], labels, strict=True)
        ]

    def _one_by_one(self, entries: list[dict[str, Any]], labels: list[str]) -> list[EntryOutcome]:
        """Servers without transaction or batch: one request per entry, the same outcomes.
        After an answer that is not about the entry (unavailable, uncertain transport) the
        remaining entries are not sent (reported as not applied)."""
        out: list[EntryOutcome] = []
        for index, (entry, label) in enumerate(zip(entries, labels, strict=True)):
            request = entry["request"]
            headers = {"If-Match": request["ifMatch"]} if request.get("ifMatch") else None
            try:
                response, _ = self.request_once(
                    request["method"], request["url"], body=entry.get("resource"), headers=headers
                )
            except AuthError:
                raise  # not about this entry: the credentials
            except ServerError as exc:
                if exc.status is None or isinstance(exc, ServerUnavailable):
                    kind: EntryKind = _KIND_OF.get(type(exc), "uncertain")
                    out.append(EntryOutcome(kind, exc.status or 0, error=exc))
                    skipped = ServerUnavailable(f"not sent after: {exc}")
                    out += [EntryOutcome("unavailable", error=skipped)] * (len(entries) - index - 1)
                    return out
                answer = {"response": {"status": str(exc.status), "outcome": exc.outcome}}
            else:
                answer = {
                    "response": {
                        "status": str(response.status_code),
                        "location": response.headers.get("Location")
                        or response.headers.get("Content-Location"),
                        "etag": response.headers.get("ETag"),
                    }
                }
            out.append(
                entry_outcome(request, answer, known_id=_addressed_id(entry), what=f"for {label}")
            )
        return out


def _addressed_id(entry: Mapping[str, Any]) -> str | None:
    """The id of ``PUT Type/id`` (None for POST and conditional URLs)."""
    url = str(entry.get("request", {}).get("url", ""))
    parts = url.split("?")[0].split("/")
    return parts[1] if len(parts) == 2 and "?" not in url and parts[1] else None


__all__ = [
    "BundleMode",
    "Capabilities",
    "EntryOutcome",
    "FhirClient",
    "check_base_url",
    "entry_outcome",
    "error_for_status",
    "is_loopback",
    "parse_location",
    "retry_after_seconds",
    "retrying",
    "transport_error",
]
