"""Sync: exactly-once in effect (SPEC §7).

1. **Stage**: map the directory, hash each resource (before any reference is rewritten) and
   record it in the outbox; unchanged resources are left alone; records removed from a file
   that was present are retracted (entered-in-error) or deleted.
2. **Learn**: for types with resources the server may already hold, one paged search per type
   (by identifier system, or ``_tag`` where the server has no ``identifier`` search for the type)
   learns their server ids.
3. **Send**: transaction Bundles in dependency order: ``PUT Type/id`` with ``If-Match`` where
   the server id is known, plain ``POST`` where the server is known not to hold the resource,
   conditional ``PUT Type?identifier=…`` only where the outcome of an earlier send is unknown.
   References inside a Bundle are ``urn:uuid``; to resources sent earlier, the server's
   ``Type/id`` from the outbox. Each answer is recorded per entry; rejected entries go to the
   dead-letter table with the server's OperationOutcome; a Bundle rejected as a whole is
   bisected until the bad entries are isolated.

The outbox is written before every send and after every answer, so a process killed at any
point resumes where it stopped: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fhir_adapter.client import Capabilities, FhirClient, error_for_status, retrying
from fhir_adapter.errors import ConfigurationError, Conflict, ServerRejected, ServerUnavailable
from fhir_adapter.sync.outbox import Outbox, Row

log = logging.getLogger(__name__)

Strategy = Literal["identifier", "tag", "client-id"]
_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
MAX_PASSES = 3


@dataclass
class SendSummary:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    dead_lettered: int = 0
    blocked: int = 0
    bundles: int = 0
    by_type: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "updated": self.updated,
            "deletes_sent": self.deleted,
            "dead_lettered": self.dead_lettered,
            "blocked": self.blocked,
            "bundles": self.bundles,
        }


def choose_strategy(caps: Capabilities, rtype: str, setting: str) -> Strategy:
    """How a type's resources are matched on this server (SPEC §7, from the CapabilityStatement)."""
    if setting == "client-id":
        return "client-id"
    if (
        setting in ("auto", "identifier")
        and rtype != "Provenance"
        and caps.supports_search(rtype, "identifier")
    ):
        return "identifier"
    if setting in ("auto", "identifier", "tag") and caps.supports_search(rtype, "_tag"):
        return "tag"
    if caps.update_create.get(rtype):
        return "client-id"
    raise ConfigurationError(
        f"the server offers no way to find {rtype} resources again (no identifier or _tag "
        "search, no update-as-create): re-runs could not avoid duplicates"
    )


def _status(entry_response: dict[str, Any]) -> int:
    text = str(entry_response.get("status", "0")).strip()
    match = re.match(r"\d{3}", text)
    return int(match.group()) if match else 0


def _location(entry_response: dict[str, Any]) -> tuple[str | None, str | None]:
    """(server id, version) from an entry response's location / etag."""
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


class Sender:
    """Sends what the outbox holds to one server."""

    def __init__(
        self,
        client: FhirClient,
        outbox: Outbox,
        *,
        fhir_version: str,
        bundle_size: int,
        identity: str = "auto",
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.outbox = outbox
        self.fhir_version = fhir_version
        self.bundle_size = bundle_size
        self.identity = identity
        self.on_progress = on_progress
        self.summary = SendSummary()
        self._strategies: dict[str, Strategy] = {}
        self._server_ids: dict[str, str] | None = None

    # -- identity ----------------------------------------------------------------------------
    def strategy(self, rtype: str) -> Strategy:
        if rtype not in self._strategies:
            caps = self.client.capabilities()
            self._strategies[rtype] = choose_strategy(caps, rtype, self.identity)
        return self._strategies[rtype]

    def _search_param(self, rtype: str) -> str:
        return "identifier" if self.strategy(rtype) == "identifier" else "_tag"

    def server_index(self, rtype: str, system: str) -> Iterator[tuple[str, str, str | None]]:
        """(business key, server id, version) of every resource the server holds in ``system``."""
        param = self._search_param(rtype)
        for resource in self.client.search_all(rtype, {param: f"{system}|", "_count": "1000"}):
            version = resource.get("meta", {}).get("versionId")
            for value in _business_values(resource, param, system):
                yield f"{system}|{value}", str(resource["id"]), version

    def learn(self, rows: list[Row]) -> None:
        """One paged search per type whose resources the server may already hold."""
        wanted: dict[str, set[str]] = {}
        learned: dict[str, bool] = {}
        for row in rows:
            if row.server_id is not None or row.state == "delete":
                continue
            if self.strategy(row.rtype) == "client-id":
                continue
            if row.rtype not in learned:
                learned[row.rtype] = self.outbox.learned(row.rtype)
            if row.state == "sending" or not learned[row.rtype]:
                wanted.setdefault(row.rtype, set()).add(row.bkey.split("|", 1)[0])
        for rtype, systems in sorted(wanted.items()):
            found: dict[str, tuple[str, str | None]] = {}
            for system in sorted(systems):
                for bkey, server_id, version in self.server_index(rtype, system):
                    if bkey in found:
                        log.warning("%s %s: the server holds it twice", rtype, bkey)
                        continue
                    found[bkey] = (server_id, version)
            self.outbox.learn(rtype, found)
            for row in rows:
                if row.rtype == rtype and row.server_id is None and row.bkey in found:
                    row.server_id, row.version_id = found[row.bkey]

    # -- bundles -----------------------------------------------------------------------------
    def _entry_url(self, row: Row) -> str:
        system, value = row.bkey.split("|", 1)
        param = self._search_param(row.rtype)
        return f"{row.rtype}?{param}={system}|{value}"

    def build(self, rows: list[Row], uncertain: set[str]) -> tuple[dict[str, Any], list[Row]]:
        """A transaction Bundle for ``rows``; returns it and the rows it carries (in order).

        A row whose reference target has no server id and is not in this Bundle waits (blocked).
        """
        full_urls: dict[str, str] = {}
        for row in rows:
            if row.state == "delete":
                continue
            if self.strategy(row.rtype) == "client-id" or row.server_id is not None:
                continue
            full_urls[f"{row.rtype}/{row.local_id}"] = f"urn:uuid:{uuid.uuid4()}"
        entries: list[dict[str, Any]] = []
        carried: list[Row] = []
        for row in rows:
            if row.state == "delete":
                entries.append(
                    {"request": {"method": "DELETE", "url": f"{row.rtype}/{row.server_id}"}}
                )
                carried.append(row)
                continue
            resource = row.resource
            try:
                resource = self._resolve(resource, full_urls)
            except _Unresolved as exc:
                self.summary.blocked += 1
                self.outbox.mark_pending(row, error=f"waits for {exc}")
                log.warning("%s %s waits for %s", row.rtype, row.bkey, exc)
                continue
            key = f"{row.rtype}/{row.local_id}"
            strategy = self.strategy(row.rtype)
            entry: dict[str, Any]
            if strategy == "client-id":
                resource["id"] = row.local_id
                entry = {"resource": resource, "request": {"method": "PUT", "url": key}}
            elif row.server_id is not None:
                resource["id"] = row.server_id
                request = {"method": "PUT", "url": f"{row.rtype}/{row.server_id}"}
                if row.version_id and row.bkey not in uncertain:
                    request["ifMatch"] = f'W/"{row.version_id}"'
                entry = {
                    "fullUrl": self.client.url(f"{row.rtype}/{row.server_id}"),
                    "resource": resource,
                    "request": request,
                }
            else:
                resource.pop("id", None)
                request = (
                    {"method": "PUT", "url": self._entry_url(row)}
                    if row.bkey in uncertain
                    else {"method": "POST", "url": row.rtype}
                )
                entry = {"fullUrl": full_urls[key], "resource": resource, "request": request}
            entries.append(entry)
            carried.append(row)
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, carried

    def _resolve(self, node: Any, full_urls: dict[str, str]) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    out[key] = self._target(value, full_urls)
                else:
                    out[key] = self._resolve(value, full_urls)
            return out
        if isinstance(node, list):
            return [self._resolve(v, full_urls) for v in node]
        return node

    def _target(self, reference: str, full_urls: dict[str, str]) -> str:
        if reference in full_urls:
            return full_urls[reference]
        match = _REFERENCE.match(reference)
        if not match:
            return reference
        rtype = match.group(1)
        if self.strategy(rtype) == "client-id":
            return reference
        if self._server_ids is None:
            self._server_ids = self.outbox.server_ids()
        server_id = self._server_ids.get(reference)
        if server_id is None:
            raise _Unresolved(reference)
        return f"{rtype}/{server_id}"

    # -- sending -----------------------------------------------------------------------------
    def run(self) -> SendSummary:
        """Send everything the outbox has to send (a few passes for conflicts and 5xx)."""
        self.client.check_version(self.fhir_version)
        self.outbox.bind_server(self.client.base_url)
        for _ in range(MAX_PASSES):
            rows = self.outbox.to_send()
            if not rows:
                break
            self.learn(rows)
            self._server_ids = None  # "Type/local id" -> server id, loaded once per pass
            blocked_before = self.summary.blocked
            progressed = False
            for start in range(0, len(rows), self.bundle_size):
                chunk = rows[start : start + self.bundle_size]
                progressed |= self._send_chunk(chunk)
                if self.on_progress:
                    self.on_progress(len(chunk))
            if not progressed and self.summary.blocked == blocked_before:
                break
        self.summary.blocked = self.outbox.blocked()
        return self.summary

    def _send_chunk(self, rows: list[Row]) -> bool:
        uncertain = {r.bkey for r in rows if r.state == "sending"}
        bundle, carried = self.build(rows, uncertain)
        if not carried:
            return False
        self.outbox.mark_sending(carried)
        attempts = 0

        def attempt() -> dict[str, Any]:
            nonlocal bundle, attempts
            attempts += 1
            if attempts > 1:  # the earlier try may have landed: match on the server first
                uncertain.update(r.bkey for r in carried)
                bundle, _ = self.build(carried, uncertain)
            return self.client.transaction(bundle)

        try:
            response = retrying(self.client.settings, attempt)
        except (ServerRejected, Conflict) as exc:
            return self._rejected_whole(carried, exc)
        self.summary.bundles += 1
        self._record(carried, bundle, response)
        return True

    def _rejected_whole(self, rows: list[Row], exc: ServerRejected | Conflict) -> bool:
        """A Bundle refused as a whole (atomic servers): bisect to isolate the bad entries."""
        if len(rows) == 1:
            with self.outbox.transaction():
                if isinstance(exc, Conflict):  # changed on the server: the source wins, next pass
                    self._conflict(rows[0], exc.status)
                else:
                    self.outbox.mark_dead(rows[0], exc.status, str(exc), exc.outcome)
                    self.summary.dead_lettered += 1
            return True
        with self.outbox.transaction():
            for row in rows:  # nothing of a refused Bundle was applied
                self.outbox.mark_pending(row)
                row.state = "pending"
        middle = len(rows) // 2
        left = self._send_chunk(rows[:middle])
        right = self._send_chunk(rows[middle:])
        return left or right

    def _conflict(self, row: Row, status: int | None) -> None:
        """Changed on the server since we last saw it: the source wins on the next pass."""
        self.outbox.mark_pending(row, error=f"HTTP {status}: version conflict")
        self.outbox.db.execute(
            "UPDATE resources SET version_id = NULL WHERE rtype = ? AND bkey = ?",
            (row.rtype, row.bkey),
        )

    def _record(self, rows: list[Row], bundle: dict[str, Any], response: dict[str, Any]) -> None:
        answers = response.get("entry", [])
        requests_sent = bundle["entry"]
        with self.outbox.transaction():
            for index, row in enumerate(rows):
                answer = (answers[index] if index < len(answers) else {}).get("response", {})
                method = requests_sent[index]["request"]["method"]
                status = _status(answer)
                if 200 <= status < 300 or (method == "DELETE" and status in (404, 410)):
                    if method == "DELETE":
                        self.outbox.mark_deleted(row)
                        if self._server_ids is not None:
                            self._server_ids.pop(f"{row.rtype}/{row.local_id}", None)
                        self.summary.deleted += 1
                        continue
                    server_id, version = _location(answer)
                    server_id = server_id or row.server_id
                    if server_id is None and self.strategy(row.rtype) == "client-id":
                        server_id = row.local_id
                    if server_id is None:
                        self.outbox.mark_pending(row, error="answer without a location")
                        continue
                    self.outbox.mark_sent(row, server_id, version)
                    if self._server_ids is not None:
                        self._server_ids[f"{row.rtype}/{row.local_id}"] = server_id
                    created = status == 201
                    self.summary.created += created
                    self.summary.updated += not created
                    self.summary.by_type[row.rtype] += 1
                elif status in (409, 412) and method != "DELETE":
                    self._conflict(row, status)
                elif status in (408, 429) or status >= 500 or status == 0:
                    pass  # stays 'sending': uncertain, retried with a match on the next pass
                else:
                    outcome = answer.get("outcome")
                    err = error_for_status(status, outcome, what=f"for {row.rtype} {row.bkey}")
                    self.outbox.mark_dead(row, status, str(err), outcome)
                    self.summary.dead_lettered += 1
                    log.warning("dead-lettered %s %s: HTTP %s", row.rtype, row.bkey, status)


class _Unresolved(Exception):
    pass


def _business_values(resource: dict[str, Any], param: str, system: str) -> list[str]:
    """The resource's business values in ``system``: from meta.tag or from its identifiers."""
    if param == "_tag":
        found = [
            t.get("code")
            for t in resource.get("meta", {}).get("tag", [])
            if t.get("system") == system
        ]
    else:
        identifiers = resource.get("identifier") or []
        if isinstance(identifiers, dict):  # R4 AdverseEvent.identifier is a single Identifier
            identifiers = [identifiers]
        found = [i.get("value") for i in identifiers if i.get("system") == system]
    return [str(v) for v in found if v]


__all__ = ["SendSummary", "Sender", "ServerUnavailable", "choose_strategy"]
