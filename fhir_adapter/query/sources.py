"""Where the resources of a view come from (SPEC §9): NDJSON files, or a FHIR server.

Every source streams: one line, one search page or one export file at a time, so memory does
not grow with the number of resources. ``resources(types)`` yields only resources of ``types``.

- :class:`NdjsonSource`: NDJSON files and directories (every ``*.ndjson`` in them: the Bulk Data
  layout ``<Type>.ndjson`` as well as the single file of ``map --format ndjson``); resources are
  filtered on ``resourceType`` (a Bulk file named after another type is not even opened).
- :class:`ServerSource`: a FHIR server. Bulk Data ``$export`` where the CapabilityStatement
  offers it (kick-off, polling with ``Retry-After``, manifest, download), else a search per type
  with ``_count``, following ``next`` links page by page: never assuming one page, only to the
  server's own origin, never the same page twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import orjson
import requests

from fhir_adapter.client import FhirClient, is_loopback, retry_after_seconds
from fhir_adapter.errors import AdapterError, ExitCode, InputUnreadable, ServerRejected
from fhir_adapter.query.fhirpath import model_for, resource_types

log = logging.getLogger(__name__)
Resource = dict[str, Any]

DEFAULT_PAGE_SIZE = 200
_RESOURCE_TYPES = resource_types(model_for(None))
_MAX_PAGES = 1_000_000


class SourceUnreadable(InputUnreadable):
    """A source file or directory cannot be read (exit 66)."""


class ServerAnswerError(AdapterError):
    """The server answered a read in a way the adapter refuses to follow (exit 69)."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class Source(Protocol):
    def resources(self, types: Iterable[str] | None = None) -> Iterator[Resource]: ...

    def describe(self) -> str: ...


# -- NDJSON --------------------------------------------------------------------------------------
class NdjsonSource:
    """NDJSON files and directories of them."""

    def __init__(self, paths: Iterable[Path | str]) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise SourceUnreadable("no source given")
        self.files = [f for p in self.paths for f in _ndjson_files(p)]

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths)

    def resources(self, types: Iterable[str] | None = None) -> Iterator[Resource]:
        wanted = None if types is None else frozenset(types)
        for path in self.files:
            if wanted is not None and _named_for_other_type(path, wanted):
                continue
            yield from _read_ndjson(path, wanted)


def _ndjson_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.ndjson") if p.is_file())
        if not files:
            raise SourceUnreadable(f"{path}: no *.ndjson file in this directory")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise SourceUnreadable(f"{path}: not a regular file or directory")
    raise SourceUnreadable(f"{path}: no such file or directory")


def _named_for_other_type(path: Path, wanted: frozenset[str]) -> bool:
    """A Bulk Data file ``Observation.ndjson`` (or ``Observation.000.ndjson``) of another type,
    which by the Bulk Data IG holds resources of that one type: skipped unread. Its first
    resource must be of that type, though — a file that only borrows the name is read whole."""
    stem = path.name.split(".")[0]
    if not (stem[:1].isupper() and stem.isalpha() and stem not in wanted and _looks_bulk(stem)):
        return False
    return _first_type(path) == stem


def _first_type(path: Path) -> str | None:
    """The resourceType of a file's first resource (None when it cannot tell)."""
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    return str(_parse_line(line, path, number)["resourceType"])
    except (OSError, SourceUnreadable):
        return None  # read whole: the reader then says what is wrong
    return None


def _looks_bulk(stem: str) -> bool:
    return stem in _RESOURCE_TYPES


def _read_ndjson(path: Path, wanted: frozenset[str] | None) -> Iterator[Resource]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise SourceUnreadable(f"{path}: cannot be read ({exc.strerror})") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            resource = _parse_line(line, path, number)
            if wanted is None or resource.get("resourceType") in wanted:
                yield resource


def _parse_line(line: bytes, where: Path | str, number: int) -> Resource:
    try:
        resource = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise SourceUnreadable(f"{where}:{number}: not a JSON object (NDJSON line)") from None
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise SourceUnreadable(f"{where}:{number}: not a FHIR resource (no resourceType)")
    return resource


# -- FHIR server ---------------------------------------------------------------------------------
class ServerSource:
    """A FHIR server read through :class:`FhirClient`.

    ``bulk``: ``"auto"`` uses ``$export`` when the CapabilityStatement offers it, ``"never"``
    always searches, ``"always"`` refuses a server without it.
    """

    def __init__(
        self,
        client: FhirClient,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        bulk: str = "auto",
        poll_limit_s: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.page_size = page_size
        self.bulk = bulk
        self.poll_limit_s = poll_limit_s
        self.sleep = sleep
        self.pages_read = 0

    def describe(self) -> str:
        return self.client.base_url

    def resources(self, types: Iterable[str] | None = None) -> Iterator[Resource]:
        if types is None:
            raise ValueError("a server source needs the resource types to read")
        wanted = sorted(set(types))
        if self.bulk != "never" and self._offers_export():
            export = BulkExport(self)
            try:
                files = export.prepare(wanted)
            except BulkUnusable as exc:  # nothing read yet: searching instead loses nothing
                if self.bulk == "always":
                    raise
                log.warning("%s; reading the server by search instead", exc)
            else:
                yield from export.read(files, wanted)
                return
        if self.bulk == "always":
            raise ServerRejected(f"{self.client.base_url} does not offer Bulk Data $export")
        for rtype in wanted:
            yield from self.search(rtype)

    # -- search with paging ---------------------------------------------------------------
    def search(self, rtype: str, params: Mapping[str, str] | None = None) -> Iterator[Resource]:
        """Every match of ``rtype`` (``_count`` per page), page after page via ``next``."""
        query = {"_count": str(self.page_size), **(params or {})}
        _, bundle = self.client.request("GET", rtype, params=query)
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            self.pages_read += 1
            if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
                raise ServerAnswerError(f"{rtype} search: the server answered without a Bundle")
            for entry in bundle.get("entry", []) or []:
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if (
                    isinstance(resource, dict)
                    and mode == "match"
                    and resource.get("resourceType") == rtype
                ):
                    yield resource
            next_url = self._next_link(bundle, rtype, seen)
            if next_url is None:
                return
            _, bundle = self.client.request("GET", next_url)
        raise ServerAnswerError(f"{rtype} search: paging does not end")  # pragma: no cover

    def _next_link(self, bundle: Mapping[str, Any], rtype: str, seen: set[str]) -> str | None:
        links = [lk for lk in bundle.get("link", []) or [] if lk.get("relation") == "next"]
        if not links or not isinstance(links[0].get("url"), str):
            return None
        url = urljoin(self.client.base_url + "/", str(links[0]["url"]))
        if not same_origin(url, self.client.base_url):
            raise ServerAnswerError(
                f"{rtype} search: the server's next link leads to another origin "
                f"({urlsplit(url).netloc}); refusing to follow it"
            )
        if url in seen:
            raise ServerAnswerError(f"{rtype} search: the server sent the same next link twice")
        seen.add(url)
        return url

    # -- Bulk Data ------------------------------------------------------------------------
    def _offers_export(self) -> bool:
        _, statement = self.client.request("GET", "metadata")
        if not isinstance(statement, dict):
            return False
        for rest in statement.get("rest", []) or []:
            if rest.get("mode", "server") != "server":
                continue
            for op in rest.get("operation", []) or []:
                name = str(op.get("name", "")).lstrip("$")
                definition = str(op.get("definition", ""))
                if name == "export" or definition.endswith("/OperationDefinition/export"):
                    return True
        return False


class BulkUnusable(ServerAnswerError):
    """The export's files cannot be read as offered (another origin that wants the token)."""


def _private_channel(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname))


def same_origin(url: str, base: str) -> bool:
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port or _port(a.scheme)) == (
        b.scheme,
        b.hostname,
        b.port or _port(b.scheme),
    )


def _port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class BulkExport:
    """One system-level ``$export``: kick-off, polling, manifest, download (Bulk Data IG)."""

    def __init__(self, source: ServerSource) -> None:
        self.source = source
        self.client = source.client

    def resources(self, types: list[str]) -> Iterator[Resource]:
        yield from self.read(self.prepare(types), types)

    def prepare(self, types: list[str]) -> list[tuple[str, bool]]:
        """Kick-off, polling and the manifest: the files to read, each with whether the
        server's credentials go with it. Files on another origin (cloud storage) are read only
        when the manifest says no token is needed (``requiresAccessToken: false``), over https
        or on this machine, and then without credentials: the token never leaves the server's
        origin. Otherwise :class:`BulkUnusable`, before anything is read."""
        manifest = self._wait(self._kick_off(types))
        wanted = frozenset(types)
        needs_token = manifest.get("requiresAccessToken") is not False
        files = []
        for item in manifest.get("output", []) or []:
            url = item.get("url")
            if item.get("type") not in wanted or not isinstance(url, str):
                continue
            url = urljoin(self.client.base_url + "/", url)
            if same_origin(url, self.client.base_url):
                files.append((url, True))
            elif not needs_token and _private_channel(url):
                files.append((url, False))
            else:
                raise BulkUnusable(
                    f"$export: a file lies on another origin ({urlsplit(url).netloc})"
                    + (" and needs the server's token" if needs_token else " over plain http")
                )
        errors = manifest.get("error", []) or []
        if errors:
            log.warning("$export reported %d error file(s); not read", len(errors))
        return files

    def read(self, files: list[tuple[str, bool]], types: Iterable[str]) -> Iterator[Resource]:
        wanted = frozenset(types)
        for url, credentials in files:
            yield from self._download(url, wanted, credentials)

    def _kick_off(self, types: list[str]) -> str:
        response, _ = self.client.request(
            "GET",
            "$export",
            params={"_type": ",".join(types), "_outputFormat": "application/fhir+ndjson"},
            headers={"Accept": "application/fhir+json", "Prefer": "respond-async"},
        )
        location = response.headers.get("Content-Location")
        if response.status_code != 202 or not location:
            raise ServerAnswerError("$export kick-off: expected 202 Accepted with Content-Location")
        return self._checked(location, "status")

    def _checked(self, url: str, what: str) -> str:
        url = urljoin(self.client.base_url + "/", url)
        if not same_origin(url, self.client.base_url):
            raise ServerAnswerError(f"$export: the {what} URL leads to another origin; refused")
        return url

    def _wait(self, status_url: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.source.poll_limit_s
        while True:
            response, payload = self.client.request("GET", status_url)
            if response.status_code == 200:
                if not isinstance(payload, dict) or "output" not in payload:
                    raise ServerAnswerError("$export: the completed status is not a manifest")
                return payload
            if response.status_code != 202:
                raise ServerAnswerError(f"$export status: unexpected HTTP {response.status_code}")
            delay = retry_after_seconds(response.headers.get("Retry-After"))
            if time.monotonic() + (delay or 1.0) > deadline:
                raise ServerAnswerError("$export: still not complete after the polling limit")
            self.source.sleep(1.0 if delay is None else min(delay, 60.0))

    def _download(self, url: str, wanted: frozenset[str], credentials: bool) -> Iterator[Resource]:
        client = self.client
        if credentials:
            response = client.session.get(
                url,
                headers={"Accept": "application/fhir+ndjson"},
                auth=client.auth,
                timeout=client.timeout,
                stream=True,
            )
        else:  # another origin: a session of its own, nothing of the server's but its TLS setup
            with requests.Session() as plain:
                plain.verify = client.session.verify
                plain.proxies = client.session.proxies
                response = plain.get(
                    url, headers={"Accept": "application/fhir+ndjson"}, timeout=client.timeout,
                    stream=True,
                )  # fmt: skip
        with response:
            if response.status_code != 200:
                raise ServerAnswerError(f"$export download: HTTP {response.status_code}")
            for number, line in enumerate(response.iter_lines(), start=1):
                if line.strip():
                    resource = _parse_line(line, urlsplit(url).path, number)
                    if resource["resourceType"] in wanted:
                        yield resource


__all__ = [
    "DEFAULT_PAGE_SIZE",
    "BulkExport",
    "BulkUnusable",
    "NdjsonSource",
    "Resource",
    "ServerAnswerError",
    "ServerSource",
    "Source",
    "SourceUnreadable",
    "same_origin",
]
