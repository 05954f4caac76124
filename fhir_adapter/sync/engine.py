"""Sync: exactly-once in effect (SPEC §7).

1. **Stage** (outbox): map the directory, hash each resource (before any reference is
   rewritten) and record it; unchanged resources are left alone; records removed from a file
   that was present are retracted (entered-in-error) or deleted — never en masse by surprise.
2. **Learn**: for types whose resources the server may already hold, and for every resource
   whose last send had no certain answer, one paged search per type (by identifier system, or
   ``_tag`` where the server has no ``identifier`` search for the type) finds them by business
   identity; a resource the server already holds with the same content is recorded as landed.
   Where the server refuses a search by system alone (HAPI: ``_tag=system|``), the exact keys
   are searched instead, a chunk at a time; a refused look-up leaves the records undelivered.
3. **Send**, in dependency layers: a layer goes only once every resource it refers to has a
   server id, so no entry refers to another entry of its own Bundle and no reference ever
   points at nothing, whatever the server does with the rest of a Bundle. (With
   ``FHIR_ADAPTER_ATOMIC_TRANSACTIONS=true`` a whole chunk rides in one transaction with
   ``urn:uuid`` references inside it.) ``PUT Type/id`` with ``If-Match`` where the server id is
   known, plain ``POST`` where the server is known not to hold the resource. Transaction
   Bundles where the server offers them, else batch, else one request per resource.
4. **Answers** are classified by the client (one mapping): landed → recorded; refused →
   dead letter with the OperationOutcome (a referrer of a dead-lettered resource is held back);
   not applied → sent again within the retry budget; uncertain (500, 502, 504, a timeout, an
   HTML page, a 2xx without ``location``) → looked up by business identity, then created or
   updated only where missing or different, within the retry budget. A Bundle refused as a
   whole (4xx) is bisected to isolate the bad entries.

The outbox is written before every send and after every answer, so a process killed at any
point resumes where it stopped: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import sys
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import orjson

from fhir_adapter.client import (
    BundleMode,
    Capabilities,
    EntryOutcome,
    FhirClient,
    retrying,
)
from fhir_adapter.errors import (
    ConfigurationError,
    Conflict,
    LookupRefused,
    OutcomeUncertain,
    ServerError,
    ServerRejected,
    ServerUnavailable,
)
from fhir_adapter.sync.outbox import Outbox, Row

log = logging.getLogger(__name__)

Strategy = Literal["identifier", "tag", "client-id"]
LOCAL_REFERENCE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})$")
# a reference in an outbox body (canonical, compact orjson): rewritten on the bytes, which is
# several times faster than walking the parsed resource
_REFERENCE_BYTES = re.compile(rb'"reference":"([^"\\]*)"')
# the head of an outbox body: its type, then (where it has one) its id
_TOP_ID = re.compile(rb'^(\{"resourceType":"[A-Za-z]+")(?:,"id":"[^"\\]*")?(?=,"(?!id")|\})')
MAX_PASSES = 3
# The streamed send (a first sync): Bundles handed to the sending thread ahead of their answers
# (one in flight, one next: the server never waits on the adapter between two Bundles), staged
# rows waiting to be sent before staging waits for answers (bounds the memory), and the GIL's
# switch interval meanwhile (the sending thread gets its answer within half a millisecond of
# its arrival instead of the default 5 ms, with mapping running beside it)
WRITES_AHEAD = 2
STREAM_POOL_ROWS = 2000
STREAM_SWITCH_INTERVAL_S = 0.0005
# exact business keys per look-up where the server refuses ``system|`` searches: ~45 characters
# each once URL-encoded, 40 of them stay far below the 8 KB request line servers accept
LOOKUP_KEYS = 40


@dataclass
class SendSummary:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    matched: int = 0  # found on the server as they are: recorded without a write
    dead_lettered: int = 0  # refused in this run
    blocked: int = 0  # held back: they refer to a resource that has no server id
    conflicts: int = 0  # left to be re-read: changed on the server (defer_conflicts)
    bundles: int = 0
    undelivered: int = 0  # still to send (server unavailable, answers uncertain)
    undelivered_reason: str | None = None
    dead_letters: int = 0  # outstanding in the outbox (this run's and earlier ones)
    by_type: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "updated": self.updated,
            "deletes_sent": self.deleted,
            "matched": self.matched,
            "dead_lettered": self.dead_lettered,
            "dead_letters": self.dead_letters,
            "blocked": self.blocked,
            "undelivered": self.undelivered,
            "undelivered_reason": self.undelivered_reason,
            "bundles": self.bundles,
        }


class Held(NamedTuple):
    """One resource a look-up found on the server."""

    server_id: str
    version: str | None
    fingerprint: str
    references: tuple[str, ...]


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


def fingerprint(resource: dict[str, Any]) -> str:
    """What identifies a resource's content, whatever the server added: everything but
    ``id``, ``meta`` (except tags and profiles) and a generated ``text``."""
    meta = resource.get("meta") or {}
    comparable = {k: v for k, v in resource.items() if k not in ("id", "meta", "text")}
    comparable["meta"] = {
        "tag": sorted(f"{t.get('system')}|{t.get('code')}" for t in meta.get("tag", [])),
        "profile": sorted(meta.get("profile", [])),
    }
    canonical = orjson.dumps(_numbers_as_values(comparable), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _numbers_as_values(node: Any) -> Any:
    """12.0 and 12 are the same number (a JavaScript server writes 12.0 back as 12)."""
    if isinstance(node, float) and node.is_integer():
        return int(node)
    if isinstance(node, dict):
        return {k: _numbers_as_values(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers_as_values(v) for v in node]
    return node


def references(node: Any) -> Iterator[str]:
    """Every ``reference`` string anywhere in a resource."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for value in node:
            yield from references(value)


@dataclass
class _Write:
    """A Bundle handed to the sending thread (its rows are marked ``sending``)."""

    rows: list[Row]
    entries: list[dict[str, Any]]
    labels: list[str]
    future: Future[list[EntryOutcome]]


@dataclass
class _LookUp:
    """A look-up of staged rows of a type never searched on this server, in the sending thread."""

    rtype: str
    rows: list[Row]
    future: Future[dict[str, list[Held]]]


@dataclass
class _Stream:
    """What the streamed send keeps while staging goes on."""

    io: ThreadPoolExecutor
    jobs: deque[_Write | _LookUp] = field(default_factory=deque)  # in the order handed over
    ready: deque[Row] = field(default_factory=deque)  # every target has a server id
    waiting: dict[str, list[Row]] = field(default_factory=dict)  # target -> rows waiting for it
    missing: dict[str, int] = field(default_factory=dict)  # row -> how many targets it waits for
    learned: dict[str, bool] = field(default_factory=dict)  # the outbox searched the type before
    parked: dict[str, list[Row]] = field(default_factory=dict)  # type's first look-up under way
    listed: dict[tuple[str, str], dict[str, list[Held]]] = field(default_factory=dict)
    looked_up: set[str] = field(default_factory=set)
    unsearched: set[str] = field(default_factory=set)  # types with rows no look-up covered
    stopped: bool = False  # an answer other than "every entry landed": the passes take over

    @property
    def writes(self) -> int:
        return sum(isinstance(job, _Write) for job in self.jobs)

    @property
    def pooled(self) -> int:
        return len(self.ready) + len(self.missing)


class _Unresolved(Exception):
    pass


class _Stop(Exception):
    """Raised inside a retried attempt so that a failure already retried elsewhere (a look-up,
    a bisected half) ends the run instead of being retried again."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error


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
        atomic: bool | None = None,
        defer_conflicts: bool = False,
    ) -> None:
        self.client = client
        self.defer_conflicts = defer_conflicts
        self.outbox = outbox
        self.fhir_version = fhir_version
        self.bundle_size = bundle_size
        self.identity = identity
        self.on_progress = on_progress
        self.atomic = client.settings.atomic_transactions if atomic is None else atomic
        self.mode: BundleMode = "transaction"
        self.summary = SendSummary()
        self._strategies: dict[str, Strategy] = {}
        self._server_ids: dict[str, str] = {}
        self._exact_only: set[tuple[str, str]] = set()  # (type, param) refused as "system|"

    # -- identity ----------------------------------------------------------------------------
    def strategy(self, rtype: str) -> Strategy:
        if rtype not in self._strategies:
            caps = self.client.capabilities()
            self._strategies[rtype] = choose_strategy(caps, rtype, self.identity)
        return self._strategies[rtype]

    def _search_param(self, rtype: str) -> str:
        return "identifier" if self.strategy(rtype) == "identifier" else "_tag"

    def look_up(self, rtype: str, keys: Iterable[str]) -> dict[str, list[Held]]:
        """Business key -> what the server holds under it: one paged search per system
        (``system|``), or — where the server refuses that search (HAPI: a token search on
        ``_tag`` needs a code) — searches for the exact keys, a chunk at a time.

        A refused exact look-up raises :class:`LookupRefused`: the records stay undelivered,
        never taken for "not held" (that would create them twice)."""
        param = self._search_param(rtype)
        by_system: dict[str, set[str]] = {}
        for key in keys:
            by_system.setdefault(key.split("|", 1)[0], set()).add(key)
        found: dict[str, list[Held]] = {}
        for system, wanted in sorted(by_system.items()):
            for resource in self._search_keys(rtype, param, system, wanted):
                held = Held(
                    str(resource.get("id")),
                    resource.get("meta", {}).get("versionId"),
                    fingerprint(resource),
                    tuple(references(resource)),
                )
                for value in _business_values(resource, param, system):
                    found.setdefault(f"{system}|{value}", []).append(held)
        return found

    def _search_keys(
        self, rtype: str, param: str, system: str, keys: set[str]
    ) -> list[dict[str, Any]]:
        """What the server holds of ``system`` (at least every one of ``keys``)."""
        if (rtype, param) not in self._exact_only:
            try:
                return list(self.client.search_all(rtype, {param: f"{system}|", "_count": "1000"}))
            except ServerRejected as exc:
                # remembered for the run: one refused search per type, not one per look-up
                self._exact_only.add((rtype, param))
                log.info("the server refuses %s?%s=%s| (HTTP %s): looking up exact keys",
                         rtype, param, system, exc.status)  # fmt: skip
        found: list[dict[str, Any]] = []
        ordered = sorted(keys)
        for start in range(0, len(ordered), LOOKUP_KEYS):
            chunk = ",".join(ordered[start : start + LOOKUP_KEYS])
            try:
                found += self.client.search_all(rtype, {param: chunk, "_count": "1000"})
            except ServerRejected as exc:
                raise LookupRefused(
                    f"the server refused the look-up of {rtype} by {param} (HTTP {exc.status}): "
                    "what it holds is unknown, so nothing of it is sent",
                    status=exc.status,
                ) from None
        return found

    def _look_up_rows(self, rows: list[Row]) -> dict[str, dict[str, list[Held]]]:
        keys: dict[str, set[str]] = {}
        for row in rows:
            keys.setdefault(row.rtype, set()).add(row.bkey)
        return {rtype: self.look_up(rtype, k) for rtype, k in sorted(keys.items())}

    def learn(self, rows: list[Row]) -> None:
        """One paged search per type whose resources the server may already hold: types this
        outbox never searched, and resources whose last send had no certain answer."""
        learned: dict[str, bool] = {}
        wanted: list[Row] = []
        for row in rows:
            if row.state == "delete" or self.strategy(row.rtype) == "client-id":
                continue
            if row.rtype not in learned:
                learned[row.rtype] = self.outbox.learned(row.rtype)
            if row.state == "sending" or (row.server_id is None and not learned[row.rtype]):
                wanted.append(row)
        if wanted:
            found = self._look_up_rows(wanted)
            for rtype in found:
                self.outbox.learn(rtype, {})
            self._match(wanted, found, sent_now=False)

    def _match(
        self, rows: list[Row], found: dict[str, dict[str, list[Held]]], *, sent_now: bool
    ) -> list[Row]:
        """Compare ``rows`` with what a look-up found; returns the rows to send (again).

        Found with the same content → landed (no write). Found otherwise → updated by its
        server id. Not found → created. A deletion found gone → done.
        """
        picked: dict[str, Held] = {}
        for row in rows:
            hits = found.get(row.rtype, {}).get(row.bkey, [])
            if len(hits) > 1:
                log.warning("%s %s: the server holds it %d times", row.rtype, row.bkey, len(hits))
            if hits:
                picked[row.key] = hits[0]
                if row.state != "delete":
                    self._server_ids[row.key] = hits[0].server_id
        resend: list[Row] = []
        unknown: list[Row] = []
        with self.outbox.transaction():
            for row in rows:
                held = picked.get(row.key)
                if row.state == "delete":
                    if held is None:
                        self.outbox.mark_deleted(row)
                        self.summary.deleted += 1
                    else:
                        resend.append(row)
                elif held is None:
                    unknown.append(row)
                    self._server_ids.pop(row.key, None)
                    resend.append(row)
                elif self._fingerprint(row) == held.fingerprint:
                    created = row.server_id is None
                    self.outbox.mark_sent(row, held.server_id, held.version)
                    self._count_landed(row, created, counted=sent_now)
                else:
                    self.outbox.set_server(row, held.server_id, held.version)
                    resend.append(row)
            self.outbox.mark_unknown_to_server(unknown)
        return resend

    def _fingerprint(self, row: Row) -> str | None:
        try:
            return fingerprint(self._resolved(row, {}))
        except _Unresolved:
            return None

    def _count_landed(self, row: Row, created: bool, *, counted: bool = True) -> None:
        if not counted:
            self.summary.matched += 1
            return
        self.summary.created += created
        self.summary.updated += not created
        self.summary.by_type[row.rtype] += 1

    # -- bundles -----------------------------------------------------------------------------
    def _entries(self, rows: list[Row]) -> tuple[list[dict[str, Any]], list[Row], list[str]]:
        """Write entries for ``rows``: (entries, the rows they carry, labels for messages).

        A row whose reference target has no server id (and, in atomic mode, is not in this
        Bundle) is held back instead."""
        full_urls: dict[str, str] = {}
        if self.atomic:
            for row in rows:
                if row.state == "delete" or row.server_id is not None:
                    continue
                if self.strategy(row.rtype) != "client-id":
                    full_urls[row.key] = f"urn:uuid:{uuid.uuid4()}"
        entries: list[dict[str, Any]] = []
        carried: list[Row] = []
        labels: list[str] = []
        for row in rows:
            try:
                entry = self._entry(row, full_urls)
            except _Unresolved as exc:
                self._hold(row, str(exc))
                continue
            entries.append(entry)
            carried.append(row)
            labels.append(f"{row.rtype} {row.bkey}")
        return entries, carried, labels

    def _entry(self, row: Row, full_urls: dict[str, str]) -> dict[str, Any]:
        """One write entry; the resource rides as the outbox's bytes (an ``orjson.Fragment``,
        references and ``id`` rewritten on the bytes), never parsed and serialised again."""
        if row.state == "delete":
            return {"request": {"method": "DELETE", "url": f"{row.rtype}/{row.server_id}"}}
        body = self._resolved_bytes(row, full_urls)
        if self.strategy(row.rtype) == "client-id":
            resource = orjson.Fragment(_with_id(body, row.local_id))
            return {"resource": resource, "request": {"method": "PUT", "url": row.key}}
        if row.server_id is not None:
            request = {"method": "PUT", "url": f"{row.rtype}/{row.server_id}"}
            if row.version_id:
                request["ifMatch"] = f'W/"{row.version_id}"'
            return {
                "fullUrl": self.client.url(f"{row.rtype}/{row.server_id}"),
                "resource": orjson.Fragment(_with_id(body, row.server_id)),
                "request": request,
            }
        entry: dict[str, Any] = {
            "resource": orjson.Fragment(_with_id(body, None)),
            "request": {"method": "POST", "url": row.rtype},
        }
        if row.key in full_urls:
            entry = {"fullUrl": full_urls[row.key], **entry}
        return entry

    def _resolved(self, row: Row, full_urls: dict[str, str]) -> dict[str, Any]:
        """The row's resource with every local reference rewritten to the server's id (or to
        the ``urn:uuid`` of an entry of the same atomic Bundle); :class:`_Unresolved` when a
        target has no server id."""
        return dict(orjson.loads(self._resolved_bytes(row, full_urls)))

    def _resolved_bytes(self, row: Row, full_urls: dict[str, str]) -> bytes:
        def rewrite(match: re.Match[bytes]) -> bytes:
            target = self._target(match.group(1).decode(), full_urls)
            return b'"reference":"' + target.encode() + b'"'

        return _REFERENCE_BYTES.sub(rewrite, row.body)

    def _target(self, reference: str, full_urls: dict[str, str]) -> str:
        if reference in full_urls:
            return full_urls[reference]
        match = LOCAL_REFERENCE.match(reference)
        if not match:
            return reference
        server_id = self._server_ids.get(reference)
        if server_id is None:
            raise _Unresolved(reference)
        return f"{match.group(1)}/{server_id}"

    @staticmethod
    def targets(row: Row) -> set[str]:
        """``Type/local id`` of every resource ``row`` refers to (asked once per row and pass:
        not kept, it would hold a set per resource)."""
        key = row.key
        found = {m.decode() for m in _REFERENCE_BYTES.findall(row.body)}
        return {r for r in found if r != key and LOCAL_REFERENCE.match(r)}

    def _hold(self, row: Row, target: str) -> None:
        self.outbox.hold(row, target)
        # one line per record at INFO; the CLI says once how many are held back
        log.info("%s %s held back: it refers to %s, not on the server", row.rtype, row.bkey,
                 target)  # fmt: skip

    # -- sending -----------------------------------------------------------------------------
    def run(self, staged: Iterable[list[Row]] | None = None) -> SendSummary:
        """Send everything the outbox has to send; stop (and say why) when the server stays
        unavailable or its answers stay uncertain beyond the retry budget.

        ``staged``: the rows of a staging under way, batch by batch
        (:meth:`Outbox.stage_in_batches`), sent as they come (:meth:`_stream`); staging is
        carried to its end whatever the server does."""
        try:
            try:
                caps = self.client.check_version(self.fhir_version)
                self.outbox.bind_server(self.client.base_url)
                self.mode = caps.bundle_mode()
                if self.atomic and self.mode != "transaction":
                    log.warning("the server offers no transaction: sending in dependency layers")
                    self.atomic = False
                if staged is not None:
                    self._server_ids = self.outbox.server_ids()
                    self._stream(staged)
            except Exception:
                for _ in staged or ():
                    pass  # staging completes (without sending) whatever became of sending
                raise
            for _ in range(MAX_PASSES):
                rows = self.outbox.to_send()
                if not rows:
                    break
                self._server_ids = self.outbox.server_ids()
                self.learn(rows)
                rows = [r for r in rows if r.state != "sent"]
                if not rows or not self._send_pass(rows):
                    break
        except (ServerUnavailable, OutcomeUncertain) as exc:  # LookupRefused too
            self.summary.undelivered_reason = str(exc)
        self.summary.blocked = self.outbox.blocked()
        self.summary.undelivered = self.outbox.undelivered()
        self.summary.dead_letters = self.outbox.dead_letter_count()
        # rows left in conflict are the caller's to re-read (defer_conflicts), not a failure
        conflicted = len(self.outbox.conflicts()) if self.defer_conflicts else 0
        if self.summary.undelivered > conflicted and self.summary.undelivered_reason is None:
            self.summary.undelivered_reason = (
                f"still pending after {MAX_PASSES} passes (the server kept reporting conflicts)"
            )
        return self.summary

    # -- the streamed send ---------------------------------------------------------------------
    def _stream(self, staged: Iterable[list[Row]]) -> None:
        """Send staged rows while staging goes on: each batch's rows are looked up where their
        type was never searched (in the sending thread, like every request), then sent in full
        Bundles as soon as every resource they refer to has a server id — a dependency layer
        per row rather than per pass. The sending thread holds up to :data:`WRITES_AHEAD`
        Bundles, so the server works while this thread maps. Rows are marked ``sending``
        before they are handed over and recorded from the answer as in :meth:`_deliver`.

        The first answer that is not "every entry landed" (or a failed look-up) stops it: what
        is handed over is answered and handled by :meth:`_deliver` with the server to itself,
        and everything else waits in the outbox for the passes of :meth:`run`."""
        interval = sys.getswitchinterval()
        sys.setswitchinterval(STREAM_SWITCH_INTERVAL_S)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="fhir-adapter-send") as io:
                st = _Stream(io)
                for batch in staged:
                    self._admit(st, batch)
                    self._pump(st, final=False)
                    while st.pooled > STREAM_POOL_ROWS and st.jobs:
                        _wait([st.jobs[0].future])
                        self._pump(st, final=False)
                while st.jobs or (st.ready and not st.stopped):
                    self._pump(st, final=True)
                    if st.jobs:
                        _wait([st.jobs[0].future])
                # a type is learned once every row of it staged in this run was looked up
                for rtype in sorted(st.looked_up - st.unsearched):
                    self.outbox.learn(rtype, {})
        finally:
            sys.setswitchinterval(interval)

    def _admit(self, st: _Stream, rows: list[Row]) -> None:
        unlearned: dict[str, list[Row]] = {}
        for row in rows:
            rtype = row.rtype
            if rtype not in st.learned:
                st.learned[rtype] = self.outbox.learned(rtype)
            if row.server_id is None and not (
                st.learned[rtype] or self.strategy(rtype) == "client-id"
            ):
                unlearned.setdefault(rtype, []).append(row)
            else:
                self._enqueue(st, row)
        for rtype, waiting in unlearned.items():
            self._admit_unlearned(st, rtype, waiting)

    def _admit_unlearned(self, st: _Stream, rtype: str, rows: list[Row]) -> None:
        """Rows of a type this outbox never searched: matched against the type's listing once
        it is known, parked while the type's first look-up is under way, else looked up."""
        listing: dict[str, list[Held]] = {}
        for system in {row.bkey.split("|", 1)[0] for row in rows}:
            if (rtype, system) not in st.listed:
                break
            listing.update(st.listed[rtype, system])
        else:
            self._matched(st, rows, {rtype: listing})
            return
        if rtype in st.parked:
            st.parked[rtype] += rows
            return
        if st.stopped:  # no more requests: the passes look these up
            st.unsearched.add(rtype)
            return
        if (rtype, self._search_param(rtype)) not in self._exact_only:
            st.parked[rtype] = []  # the first look-up tries the whole listing
        keys = [row.bkey for row in rows]
        st.jobs.append(_LookUp(rtype, rows, st.io.submit(self.look_up, rtype, keys)))

    def _matched(
        self, st: _Stream, rows: list[Row], found: dict[str, dict[str, list[Held]]]
    ) -> None:
        resend = self._match(rows, found, sent_now=False)
        for row in rows:
            if row.state == "sent":
                self._release(st, row.key)
        if not st.stopped:
            for row in resend:
                self._enqueue(st, row)

    def _enqueue(self, st: _Stream, row: Row) -> None:
        if st.stopped:
            return  # it waits in the outbox for the passes
        missing = [t for t in self.targets(row) if t not in self._server_ids]
        if not missing:
            st.ready.append(row)
            return
        st.missing[row.key] = len(missing)
        for target in missing:
            st.waiting.setdefault(target, []).append(row)

    def _release(self, st: _Stream, key: str) -> None:
        """``key`` has a server id now: its referrers wait for one target less."""
        for row in st.waiting.pop(key, ()):
            st.missing[row.key] -= 1
            if st.missing[row.key] == 0:
                del st.missing[row.key]
                st.ready.append(row)

    def _pump(self, st: _Stream, *, final: bool) -> None:
        """Take in the answers that arrived; hand over full Bundles of ready rows (any ready
        rows once staging is done, or when the sending thread has nothing to do)."""
        while st.jobs and st.jobs[0].future.done():
            job = st.jobs.popleft()
            if isinstance(job, _Write):
                self._answered(st, job)
            else:
                self._listed(st, job)
        while not st.stopped and st.ready and st.writes < WRITES_AHEAD:
            if not final and st.writes and len(st.ready) < self.bundle_size:
                return
            rows = [st.ready.popleft() for _ in range(min(self.bundle_size, len(st.ready)))]
            entries, carried, labels = self._entries(rows)
            if carried:
                self.outbox.mark_sending(carried)
                future = st.io.submit(self.client.write, entries, self.mode, labels)
                st.jobs.append(_Write(carried, entries, labels, future))

    def _answered(self, st: _Stream, job: _Write) -> None:
        clean = job.future.exception() is None and all(
            o.kind == "landed" for o in job.future.result()
        )
        if not clean and not st.stopped:
            self._stop(st)
        self._deliver(job.rows, first=job)
        if self.on_progress:
            self.on_progress(len(job.rows))
        for row in job.rows:
            if row.state == "sent":
                self._release(st, row.key)

    def _listed(self, st: _Stream, job: _LookUp) -> None:
        try:
            found = job.future.result()
        except ServerError:
            # the rows stay unlearned: the passes look them up again, and say what failed
            st.parked.pop(job.rtype, None)
            st.unsearched.add(job.rtype)
            self._stop(st)
            return
        st.looked_up.add(job.rtype)
        if (job.rtype, self._search_param(job.rtype)) not in self._exact_only:
            for system in {row.bkey.split("|", 1)[0] for row in job.rows}:
                st.listed[job.rtype, system] = {
                    key: held for key, held in found.items() if key.startswith(f"{system}|")
                }
        self._matched(st, job.rows, {job.rtype: found})
        parked = st.parked.pop(job.rtype, [])
        if parked:
            self._admit_unlearned(st, job.rtype, parked)

    def _stop(self, st: _Stream) -> None:
        """Hand nothing more to the sending thread; take back what it has not started, and
        wait for what it has (so that :meth:`_deliver` has the server to itself)."""
        st.stopped = True
        for job in list(st.jobs):
            if job.future.cancel():
                st.jobs.remove(job)
                if isinstance(job, _Write):
                    self.outbox.mark_unsent(job.rows)
                else:
                    st.parked.pop(job.rtype, None)
                    st.unsearched.add(job.rtype)
        _wait([job.future for job in st.jobs])

    # -- passes over the outbox ---------------------------------------------------------------
    def _send_pass(self, rows: list[Row]) -> bool:
        writes = [r for r in rows if r.state != "delete"]
        deletes = [r for r in rows if r.state == "delete"]
        progressed = False
        # references inside a transaction ride as urn:uuid: one layer
        for layer in [writes] if self.atomic else self._layers(writes):
            progressed |= self._send_chunks(layer)
        return self._send_chunks(deletes) or progressed

    def _send_chunks(self, rows: list[Row]) -> bool:
        progressed = False
        for start in range(0, len(rows), self.bundle_size):
            chunk = rows[start : start + self.bundle_size]
            progressed |= self._deliver(chunk)
            if self.on_progress:
                self.on_progress(len(chunk))
        return progressed

    def _layers(self, rows: list[Row]) -> list[list[Row]]:
        """``rows`` by dependency depth: a row goes one layer after the last of the rows it
        refers to, so every target has a server id when its referrers are sent. A row that
        refers to a resource with no server id and not among ``rows`` (dead-lettered,
        unknown), or to one that waits for itself (a cycle), is held back, and so are its
        referrers. (A target refused while its layer is sent holds its referrers back when
        their entries are made.)"""
        in_play = {row.key: row for row in rows}
        depths: dict[str, int | None] = {}
        layers: list[list[Row]] = []
        with self.outbox.transaction():
            for row in rows:
                depth = self._depth(row, in_play, depths, set())
                if depth is not None:
                    layers += [[] for _ in range(depth + 1 - len(layers))]
                    layers[depth].append(row)
        return layers

    def _depth(
        self, row: Row, in_play: dict[str, Row], depths: dict[str, int | None], path: set[str]
    ) -> int | None:
        if row.key in depths:
            return depths[row.key]
        missing = [t for t in self.targets(row) if t not in self._server_ids]
        depth = 0
        path.add(row.key)
        for target in sorted(missing):
            below = in_play.get(target)
            # not to be sent, a cycle, or held back itself
            under = (
                None
                if below is None or target in path
                else self._depth(below, in_play, depths, path)
            )
            if under is None:
                self._hold(row, target)
                path.discard(row.key)
                depths[row.key] = None
                return None
            depth = max(depth, under + 1)
        path.discard(row.key)
        depths[row.key] = depth
        return depth

    def _deliver(self, rows: list[Row], first: _Write | None = None) -> bool:
        """Send ``rows`` (one Bundle), then again what is left of them — not applied, or
        uncertain and found missing or different by the look-up — within the retry budget.
        ``first``: the Bundle of ``rows`` already handed to the server (the streamed send);
        its answer is the first attempt's."""
        todo = rows
        progressed = False

        def attempt() -> None:
            nonlocal todo, progressed, first
            if first is not None:
                entries, carried, labels = first.entries, first.rows, first.labels
                write: Callable[[], list[EntryOutcome]] = first.future.result
                first, todo = None, []
            else:
                entries, carried, labels = self._entries(todo)
                todo = []
                if not carried:
                    return
                self.outbox.mark_sending(carried)
                write = functools.partial(self.client.write, entries, self.mode, labels)
            try:
                outcomes = write()
            except (ServerRejected, Conflict) as exc:
                try:
                    progressed |= self._rejected_whole(carried, exc)
                except (ServerUnavailable, OutcomeUncertain) as failed:
                    raise _Stop(failed) from None
                return
            except ServerUnavailable:
                self.outbox.mark_unsent(carried)
                todo = carried
                raise
            except OutcomeUncertain as exc:
                log.warning("uncertain answer (%s): looking the resources up", exc)
                outcomes = [EntryOutcome("uncertain", error=exc)] * len(carried)
            else:
                self.summary.bundles += 1
            retry, uncertain, last = self._record(carried, entries, outcomes)
            progressed |= len(retry) + len(uncertain) < len(carried)
            if uncertain:
                try:
                    retry += self._match(uncertain, self._look_up_rows(uncertain), sent_now=True)
                except (ServerUnavailable, OutcomeUncertain) as failed:
                    raise _Stop(failed) from None
            todo = retry
            if todo and last is not None:
                raise last  # retried: not applied, or uncertain and not (or not so) on the server

        try:
            retrying(self.client.settings, attempt)
        except _Stop as stop:
            raise stop.error from None
        return progressed

    def _record(
        self, rows: list[Row], entries: list[dict[str, Any]], outcomes: list[EntryOutcome]
    ) -> tuple[list[Row], list[Row], ServerError | None]:
        """Record each entry's outcome; returns (to send again, to look up, the last error)."""
        retry: list[Row] = []
        uncertain: list[Row] = []
        last: ServerError | None = None
        landed: list[tuple[Row, str, str | None]] = []
        with self.outbox.transaction():
            letters = self.outbox.dead_letter_count() > 0  # none: nothing to clear per row
            for row, entry, outcome in zip(rows, entries, outcomes, strict=True):
                method = entry["request"]["method"]
                if outcome.kind == "landed" and method != "DELETE":
                    assert outcome.server_id is not None  # noqa: S101 - entry_outcome's promise
                    landed.append((row, outcome.server_id, outcome.version))
                    self._server_ids[row.key] = outcome.server_id
                    self._count_landed(row, method == "POST" or outcome.created)
                elif outcome.kind == "landed":
                    self._deleted(row)
                elif outcome.kind == "refused" or (
                    outcome.kind == "conflict" and method == "DELETE"
                ):
                    self._dead(row, method, outcome.status, outcome.error)
                elif outcome.kind == "conflict":
                    self._conflict(row, outcome.status)
                elif outcome.kind == "unavailable":
                    if method != "DELETE":
                        self.outbox.mark_pending(row)
                    retry.append(row)
                    last = outcome.error
                else:
                    uncertain.append(row)
                    last = outcome.error
            self.outbox.mark_sent_many(landed, letters=letters)
        return retry, uncertain, last

    def _deleted(self, row: Row) -> None:
        self.outbox.mark_deleted(row)
        self._server_ids.pop(row.key, None)
        self.summary.deleted += 1

    def _conflict(self, row: Row, status: int | None) -> None:
        """The server's copy changed since the outbox saw it (409/412). ``sync DIR``: the
        source file is the record, sent again without If-Match next pass. A caller that
        re-reads and re-derives instead (``defer_conflicts``, the delivery worker) gets the row
        in state ``conflict``, never sent on a stale version."""
        error = f"HTTP {status}: version conflict"
        if self.defer_conflicts:
            self.outbox.mark_conflict(row, error)
            self.summary.conflicts += 1
        else:
            self.outbox.forget_version(row, error)

    def _dead(self, row: Row, method: str, status: int | None, error: ServerError | None) -> None:
        outcome = error.outcome if error is not None else None
        message = error.full_message if error is not None else f"HTTP {status}"
        self.outbox.mark_dead(row, status, message, outcome, method)
        self.summary.dead_lettered += 1
        log.warning("dead-lettered %s %s (%s): HTTP %s", row.rtype, row.bkey, method, status)

    def _rejected_whole(self, rows: list[Row], exc: ServerRejected | Conflict) -> bool:
        """A Bundle refused as a whole (4xx: nothing applied): bisect to isolate the bad
        entries."""
        if len(rows) == 1:
            (row,) = rows
            method = "DELETE" if row.state == "delete" else "PUT" if row.server_id else "POST"
            with self.outbox.transaction():
                if isinstance(exc, Conflict) and method != "DELETE":
                    self._conflict(row, exc.status)
                else:
                    self._dead(row, method, exc.status, exc)
            return True
        self.outbox.mark_unsent(rows)
        middle = len(rows) // 2
        left = self._deliver(rows[:middle])
        right = self._deliver(rows[middle:])
        return left or right


def _with_id(body: bytes, resource_id: str | None) -> bytes:
    """``body`` with its top-level ``id`` set to ``resource_id`` (removed for None). Outbox
    bodies open with ``{"resourceType":…,"id":…`` (the builders' order), so this is a splice;
    any other body is parsed and written again."""
    match = _TOP_ID.match(body)
    if match is None:
        resource = dict(orjson.loads(body))
        resource.pop("id", None)
        if resource_id is not None:
            resource = {"resourceType": resource.pop("resourceType"), "id": resource_id, **resource}
        return orjson.dumps(resource)
    new_id = b"" if resource_id is None else b',"id":' + orjson.dumps(resource_id)
    return match.group(1) + new_id + body[match.end() :]


def _wait(futures: list[Future[Any]]) -> None:
    wait_for(futures)


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


__all__ = [
    "LOCAL_REFERENCE",
    "Held",
    "SendSummary",
    "Sender",
    "ServerUnavailable",
    "choose_strategy",
    "fingerprint",
    "references",
]
