"""The inbox: source records pushed to the webhook, kept in the outbox database (SPEC §8).

One row per record **business key** (a participant's ``subject_id``; a rater MASI row's
``subject_id/visit/rater_id``; …): a record sent again is an update, never a duplicate. A row is
committed (WAL, ``synchronous=FULL``) before the webhook answers ``202``, so an accepted record
survives a killed process and an unreachable FHIR server; the delivery worker maps the rows
and hands the resources to the outbox. Concurrent requests of one process share a commit
(:class:`GroupCommit`: one fsync per batch, each request still all or none).

The same database holds what every web worker process must share: the caches that refuse a
replayed signature or an already seen ``webhook-id``, the request counters behind ``/metrics``
and the queue of FHIR Subscription notifications. This module owns that SQL.

Row states: ``pending`` (new or changed, not delivered yet), ``waiting`` (its participant has not
arrived), ``delivered`` (its resource landed on the server), ``rejected`` (invalid when mapped,
e.g. after a change of the trial definition; ``reason`` says why), ``retracted`` (removed by the
EHR and the removal landed). ``retracted = 1`` with another state: the removal is on its way.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fhir_adapter.intake import Intake, Issue
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping import common

#: Fields of each kind's business key, in the order of the key's path segments.
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "participants": ("subject_id",),
    "eligibility": ("subject_id",),
    "masi": ("subject_id", "visit", "rater_id"),
    "pga": ("subject_id", "visit"),
    "satisfaction": ("subject_id", "visit"),
    "adverse_events": ("ae_id",),
}
#: The FHIR type of each kind's primary resource (the one whose landing means "delivered").
PRIMARY_TYPE: dict[str, str] = {
    "participants": "Patient",
    "eligibility": "Observation",
    "masi": "Observation",
    "pga": "Observation",
    "satisfaction": "Observation",
    "adverse_events": "AdverseEvent",
}
MAX_RATERS = 3
ORIGIN_WEBHOOK = "webhook"
ORIGIN_SERVER = "fhir-server"  # a rater row read back from the FHIR server (/fhir/notify)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inbox (
    kind         TEXT NOT NULL,
    rkey         TEXT NOT NULL,
    ident        TEXT NOT NULL,
    subject      TEXT,
    record       BLOB NOT NULL,
    origin       TEXT NOT NULL,
    state        TEXT NOT NULL,
    retracted    INTEGER NOT NULL DEFAULT 0,
    seq          INTEGER NOT NULL,
    received_at  REAL NOT NULL,
    delivered_at REAL,
    reason       TEXT,
    PRIMARY KEY (kind, rkey)
);
CREATE INDEX IF NOT EXISTS inbox_seq ON inbox (seq);
CREATE INDEX IF NOT EXISTS inbox_subject ON inbox (subject);
CREATE TABLE IF NOT EXISTS inbox_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS webhook_seen (
    scheme  TEXT NOT NULL,
    token   TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (scheme, token)
);
CREATE INDEX IF NOT EXISTS webhook_seen_expires ON webhook_seen (expires);
CREATE TABLE IF NOT EXISTS notify_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    what        TEXT NOT NULL,
    ref         TEXT,
    body        BLOB,
    received_at REAL NOT NULL
);
"""

SWEEP_EVERY_S = 60.0  # expired replay-cache entries are deleted at most this often
#: Upper bounds (seconds) of the delivery latency histogram of /metrics.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def record_key(kind: str, record: Mapping[str, Any]) -> str:
    """``S001/m3/R1``: the business key of a record as path segments."""
    return "/".join(str(record.get(f) or "") for f in KEY_FIELDS[kind])


def record_ident(kind: str, record: Mapping[str, Any]) -> str:
    """The pinned business identifier value of the record's primary resource (SPEC §6)."""
    subject = str(record.get("subject_id") or "")
    visit = str(record.get("visit") or "")
    if kind == "participants":
        return subject
    if kind == "eligibility":
        return common.eligibility_value(subject)
    if kind == "masi":
        return common.rater_masi_value(subject, visit, str(record.get("rater_id") or ""))
    if kind == "pga":
        return common.pga_value(subject, visit)
    if kind == "satisfaction":
        return common.satisfaction_value(subject, visit)
    return str(record.get("ae_id") or "")


@dataclass(frozen=True)
class Accepted:
    kind: str
    key: str
    ident: str
    changed: bool  # False: the same record again (nothing to deliver)


def cross_record_issues(
    inbox: Inbox, intake: Intake, kind: str, records: Sequence[Mapping[str, Any]]
) -> list[Issue]:
    """The rules across records (SPEC §3: the participant's arm and enrolment, raters per
    subject x visit, duplicates) for the records whose participant the inbox already holds,
    judged with what it holds of theirs — so that a record the delivery would reject is refused
    at the door (422), not accepted (202) and dropped later. A record whose participant has not
    arrived yet is not judged here: it waits in the inbox. ``intake`` must be cross-file.
    Returns the issues of ``records`` (their ``line`` is the index in ``records``)."""
    if kind == "participants":
        return []
    subjects = sorted({str(r["subject_id"]) for r in records if r.get("subject_id")})
    held = [row for s in subjects for row in inbox.rows_of_subject(s) if not row.retracted]
    for row in held:
        if row.kind == "participants":
            intake.accept("participants", row.record, "inbox", None)
    if not intake.participants:  # every record waits for its participant: nothing to judge
        return []
    incoming = {record_key(kind, r) for r in records}
    for row in held:
        if row.kind == kind and row.key not in incoming and row.subject in intake.participants:
            intake.accept(kind, row.record, "inbox", None)  # a repeated key is an update
    start = len(intake.issues)
    for index, record in enumerate(records):
        if str(record.get("subject_id") or "") in intake.participants:
            intake.accept(kind, record, kind, index)
    return [issue for issue in intake.issues[start:] if issue.file == kind]


@dataclass(frozen=True)
class InboxRow:
    kind: str
    key: str
    ident: str
    subject: str | None
    record: dict[str, Any]
    origin: str
    state: str
    retracted: bool
    seq: int
    received_at: float


@dataclass(frozen=True)
class Problem:
    """A record refused by a rule across records of the inbox (reported as a 422)."""

    index: int
    field: str
    reason: str


class InboxConflict(Exception):
    """A request refused whole by the inbox's own rules; nothing of it was kept."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__("; ".join(f"record {p.index}: {p.field}: {p.reason}" for p in problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Claim:
    """A value a request may use once: a signature (replay cache), a message id (dedup)."""

    scheme: str
    token: str
    ttl_s: float


class Replayed(Exception):
    """A claim was already remembered: the request is a replay."""


class RetractRefused(Exception):
    """A retraction that would leave other records pointing at nothing."""


class InboxUnavailable(Exception):
    """The commit holding a request's records failed: nothing of it was kept (retry later)."""


@dataclass
class _Request:
    """One request's records waiting for the commit that holds them."""

    kind: str
    records: Sequence[Mapping[str, Any]]
    origin: str
    claims: tuple[Claim, ...]
    result: list[Accepted] | None = None
    error: Exception | None = None
    done: bool = False
    lead: bool = False  # woken to commit the next batch, not because its own is done
    wake: threading.Event = field(default_factory=threading.Event)


class GroupCommit:
    """Group commit of the inbox across the threads of one process.

    A request joins the queue; if no commit is under way its thread becomes the leader: it
    takes the write lock, then the whole queue (everything that arrived meanwhile), writes it
    in one transaction and commits (one fsync for the batch), then wakes every request of the
    batch and hands the lead to the first request that queued during the commit. No request
    returns before the commit holding its records; a failed commit fails the whole batch.
    Worker processes each have their own group; SQLite (and the inbox's flock) serialize them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Request] = []
        self._busy = False  # a leader is committing
        self.batches = 0  # commits made (for tests and the benchmark's figures)
        self.requests = 0  # requests they held

    def submit(self, inbox: Inbox, request: _Request) -> None:
        with self._lock:
            self._queue.append(request)
            request.lead = not self._busy
            self._busy = True
        while not request.lead:
            request.wake.wait()
            request.wake.clear()
            if request.done:
                return
        self._lead(inbox)

    def waiting(self) -> int:
        """Requests queued for a commit (the one under way or the next)."""
        with self._lock:
            return len(self._queue)

    def _take(self) -> list[_Request]:
        with self._lock:
            batch, self._queue = self._queue, []
        return batch

    def _lead(self, inbox: Inbox) -> None:
        taken: list[_Request] = []  # every request this leader took, whatever happens

        def take() -> list[_Request]:
            batch = self._take()
            taken.extend(batch)
            return batch

        try:
            inbox._commit_batch(take)
        except BaseException as exc:  # not a database error (those fail the batch): a bug
            if not taken:
                take()
            failure = exc if isinstance(exc, Exception) else InboxUnavailable(type(exc).__name__)
            for request in taken:
                request.result, request.error = None, failure
            raise
        finally:
            with self._lock:
                self.batches += 1
                self.requests += len(taken)
                for request in taken:
                    request.done = True
                    request.wake.set()
                if self._queue:  # arrived during the commit: the next batch, led by its first
                    self._queue[0].lead = True
                    self._queue[0].wake.set()
                else:
                    self._busy = False


_ROW_COLUMNS = "kind, rkey, ident, subject, record, origin, state, retracted, seq, received_at"


def _row(r: Sequence[Any]) -> InboxRow:
    return InboxRow(
        str(r[0]),
        str(r[1]),
        str(r[2]),
        None if r[3] is None else str(r[3]),
        dict(orjson.loads(r[4])),
        str(r[5]),
        str(r[6]),
        bool(r[7]),
        int(r[8]),
        float(r[9]),
    )


class Inbox:
    """The inbox tables of one outbox database (one connection; one per thread)."""

    def __init__(
        self, path: Path, *, timeout_s: float = 30.0, group: GroupCommit | None = None
    ) -> None:
        self.path = path
        # the connections of one process share a group; alone, a request is its own batch
        self._group = group or GroupCommit()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            str(path), isolation_level=None, timeout=timeout_s, check_same_thread=False
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        # a 202 promises the record survives a power cut, not only a killed process
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self.db.executescript(_SCHEMA)
        self._swept = 0.0  # when this connection last swept expired replay-cache entries
        queue = path.with_name(path.name + ".inbox-queue")
        self._queue = os.open(queue, os.O_RDWR | os.O_CREAT, 0o600)

    def close(self) -> None:
        self.db.close()
        os.close(self._queue)

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        # Writers of the inbox queue on an flock first: the kernel wakes the next one the
        # moment the lock is free, where SQLite's busy handler would sleep 25-100 ms between
        # tries (what made the p99 of concurrent ingest across worker processes).
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # a failed COMMIT may have rolled back already
                    self.db.execute("ROLLBACK")
                raise
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def writable(self) -> bool:
        """The database takes a write lock (what /readyz asks)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True

    # -- counters --------------------------------------------------------------------------
    def _bump(self, name: str, n: int = 1) -> None:
        self.db.execute(
            "INSERT INTO inbox_counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def bump(self, name: str, n: int = 1) -> None:
        with self.transaction():
            self._bump(name, n)

    def set_counter(self, name: str, value: int) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO inbox_counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    def counters(self) -> dict[str, int]:
        return {
            str(n): int(v) for n, v in self.db.execute("SELECT name, value FROM inbox_counters")
        }

    def _next_seq(self) -> int:
        row = self.db.execute(
            "INSERT INTO inbox_counters (name, value) VALUES ('seq', 1) "
            "ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value"
        ).fetchone()
        return int(row[0])

    # -- records ---------------------------------------------------------------------------
    def accept(
        self,
        kind: str,
        records: Sequence[Mapping[str, Any]],
        origin: str = ORIGIN_WEBHOOK,
        *,
        claims: Sequence[Claim] = (),
    ) -> list[Accepted]:
        """Commit validated records of one request, all or none; returns their keys.

        Returns only once the transaction holding the records is committed (durably: WAL,
        ``synchronous=FULL``). Concurrent requests of this process share one commit (see
        :class:`GroupCommit`); each keeps its own all-or-none rule.

        ``claims`` (the request's signature, its message id) are remembered in the same
        transaction, so a replay racing its original on another worker keeps nothing
        (:class:`Replayed`). Raises :class:`InboxConflict` (nothing kept) when a subject x visit
        would get more raters than the trial allows, counting the raters the inbox already
        holds; :class:`InboxUnavailable` when the commit failed (nothing of the request kept).
        """
        request = _Request(kind, records, origin, tuple(claims))
        self._group.submit(self, request)
        if request.error is not None:
            raise request.error
        assert request.result is not None  # noqa: S101 - set by the commit that succeeded
        return request.result

    def _commit_batch(self, take: Callable[[], list[_Request]]) -> list[_Request]:
        """One transaction for the requests ``take()`` hands over once the write lock is held
        (those that queued while an earlier batch committed): each in a savepoint of its own,
        so a refused request keeps nothing and fails nothing else. Any database error fails
        the whole batch (:class:`InboxUnavailable` for every request of it)."""
        batch: list[_Request] = []
        try:
            with self.transaction():
                batch = take()
                now = time.time()
                accepted: Counter[str] = Counter()
                for request in batch:
                    if self._apply(request, now):
                        accepted[request.kind] += len(request.records)
                for kind, n in accepted.items():  # one counter update per kind and batch
                    self._bump(f"accepted:{kind}", n)
        except sqlite3.Error as exc:
            batch = batch or take()
            failure = InboxUnavailable(f"the inbox could not commit ({exc.__class__.__name__})")
            for request in batch:
                request.result, request.error = None, failure
        return batch

    def _apply(self, request: _Request, now: float) -> bool:
        """Write one request of a batch in a savepoint; False: refused (it kept nothing)."""
        self.db.execute("SAVEPOINT request")
        try:
            self._claim(request.claims)
            if request.kind == "masi":
                self._check_raters(request.records)
            out = [self._upsert(request.kind, r, request.origin, now) for r in request.records]
        except sqlite3.Error:
            raise  # the transaction itself is in doubt: the whole batch fails
        except Exception as exc:  # this request's own refusal (or bug): only it fails
            self.db.execute("ROLLBACK TO request")
            self.db.execute("RELEASE request")
            request.error = exc
            return False
        self.db.execute("RELEASE request")
        request.result = out
        return True

    def _check_raters(self, records: Sequence[Mapping[str, Any]]) -> None:
        wanted: dict[tuple[str, str], dict[str, int]] = {}
        for index, r in enumerate(records):
            key = (str(r.get("subject_id")), str(r.get("visit")))
            wanted.setdefault(key, {}).setdefault(str(r.get("rater_id")), index)
        problems = []
        for (subject, visit), raters in wanted.items():
            held = {
                str(k).rsplit("/", 1)[-1]
                for (k,) in self.db.execute(
                    "SELECT rkey FROM inbox WHERE kind = 'masi' AND subject = ? AND rkey LIKE ? "
                    "ESCAPE '!' AND retracted = 0",
                    (subject, _like_prefix(f"{subject}/{visit}/")),
                )
            }
            new = [r for r in raters if r not in held]
            if len(held) + len(new) > MAX_RATERS:
                index = raters[new[-1]]
                problems.append(
                    Problem(
                        index,
                        "rater_id",
                        f"more than {MAX_RATERS} raters for this subject and visit "
                        f"(the inbox holds {len(held)}; retract one first)",
                    )
                )
        if problems:
            raise InboxConflict(problems)

    def _upsert(self, kind: str, record: Mapping[str, Any], origin: str, now: float) -> Accepted:
        key = record_key(kind, record)
        ident = record_ident(kind, record)
        body = dumpb(dict(record), sort_keys=True)
        old = self.db.execute(
            "SELECT record, retracted, state FROM inbox WHERE kind = ? AND rkey = ?", (kind, key)
        ).fetchone()
        if old is not None and bytes(old[0]) == body and not old[1] and old[2] != "rejected":
            return Accepted(kind, key, ident, changed=False)
        seq = self._next_seq()
        subject = record.get("subject_id")
        self.db.execute(
            "INSERT INTO inbox (kind, rkey, ident, subject, record, origin, state, retracted, seq, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?) "
            "ON CONFLICT (kind, rkey) DO UPDATE SET record = excluded.record, "
            "origin = excluded.origin, state = 'pending', retracted = 0, seq = excluded.seq, "
            "received_at = excluded.received_at, delivered_at = NULL, reason = NULL",
            (kind, key, ident, None if subject is None else str(subject), body, origin, seq, now),
        )
        return Accepted(kind, key, ident, changed=True)

    def find(self, kind: str, key_or_ident: str) -> InboxRow | None:
        """A record by its key path (``S001/m3/R1``) or its identifier (``S001-m3-masi-R1``)."""
        r = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM inbox WHERE kind = ? AND (rkey = ? OR ident = ?) "  # noqa: S608
            "ORDER BY rkey = ? DESC LIMIT 1",
            (kind, key_or_ident, key_or_ident, key_or_ident),
        ).fetchone()
        return None if r is None else _row(r)

    def retract(self, kind: str, key_or_ident: str) -> InboxRow | None:
        """Mark a record removed by the EHR; the worker retracts its resources on the server.

        Returns None when the inbox has no such (live) record. A participant whose other records
        are still in the inbox is refused (:class:`RetractRefused`): they would refer to nothing.
        """
        with self.transaction():
            row = self.find(kind, key_or_ident)
            if row is None or row.retracted:
                return None
            if kind == "participants":
                dependents = self.db.execute(
                    "SELECT COUNT(*) FROM inbox WHERE subject = ? AND kind != 'participants' "
                    "AND retracted = 0",
                    (row.subject,),
                ).fetchone()[0]
                if dependents:
                    raise RetractRefused(
                        f"{dependents} other record(s) of this subject are still in the inbox; "
                        "retract them first"
                    )
            seq = self._next_seq()
            self.db.execute(
                "UPDATE inbox SET retracted = 1, state = 'pending', seq = ?, received_at = ?, "
                "delivered_at = NULL WHERE kind = ? AND rkey = ?",
                (seq, time.time(), kind, row.key),
            )
            self._bump(f"retracted:{kind}")
        return row

    def rows(self) -> list[InboxRow]:
        return [
            _row(r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM inbox ORDER BY seq"  # noqa: S608 - constant
            )
        ]

    def rows_of_subject(self, subject: str) -> list[InboxRow]:
        return [
            _row(r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM inbox WHERE subject = ? ORDER BY seq",  # noqa: S608
                (subject,),
            )
        ]

    def has_participant(self, subject: str) -> bool:
        """The subject's participant record came through the webhook (and is not retracted)."""
        r = self.db.execute(
            "SELECT 1 FROM inbox WHERE kind = 'participants' AND rkey = ? AND retracted = 0",
            (subject,),
        ).fetchone()
        return r is not None

    def last_seq(self) -> int:
        return self.counters().get("seq", 0)

    def settle(self, outcomes: Iterable[tuple[InboxRow, str, str | None]]) -> None:
        """Record each row's outcome (state, reason), unless it changed again meanwhile."""
        now = time.time()
        with self.transaction():
            for row, state, reason in outcomes:
                delivered = now if state in ("delivered", "retracted") else None
                self.db.execute(
                    "UPDATE inbox SET state = ?, reason = ?, "
                    "delivered_at = COALESCE(delivered_at, ?) "
                    "WHERE kind = ? AND rkey = ? AND seq = ?",
                    (state, reason, delivered, row.kind, row.key, row.seq),
                )

    def states(self) -> dict[str, int]:
        return {
            str(s): int(n)
            for s, n in self.db.execute("SELECT state, COUNT(*) FROM inbox GROUP BY state")
        }

    def latencies(self) -> tuple[list[int], float, int]:
        """Delivery latency (received -> landed): cumulative bucket counts, sum, count."""
        cases = ", ".join(f"SUM(delivered_at - received_at <= {b})" for b in LATENCY_BUCKETS)
        r = self.db.execute(
            f"SELECT {cases}, SUM(delivered_at - received_at), COUNT(*) FROM inbox "  # noqa: S608
            "WHERE delivered_at IS NOT NULL"
        ).fetchone()
        n = len(LATENCY_BUCKETS)
        return [int(v or 0) for v in r[:n]], float(r[n] or 0.0), int(r[n + 1] or 0)

    # -- replay and webhook-id caches ------------------------------------------------------
    def first_use(self, scheme: str, token: str, ttl_s: float) -> bool:
        """True the first time ``token`` is seen for ``scheme`` within ``ttl_s``; else False.

        Shared by every worker process through the database (a replay on another worker is
        refused too). Expired entries are swept now and then.
        """
        try:
            with self.transaction():
                self._claim([Claim(scheme, token, ttl_s)])
        except Replayed:
            return False
        return True

    def _claim(self, claims: Iterable[Claim]) -> None:
        """Inside a transaction: remember each claim; raises :class:`Replayed` (the caller's
        transaction then rolls back) when one is already remembered."""
        now = time.time()
        if now - self._swept > SWEEP_EVERY_S:
            self.db.execute("DELETE FROM webhook_seen WHERE expires < ?", (now,))
            self._swept = now
        for claim in claims:
            inserted = self.db.execute(
                "INSERT OR IGNORE INTO webhook_seen (scheme, token, expires) VALUES (?, ?, ?)",
                (claim.scheme, claim.token, now + claim.ttl_s),
            ).rowcount
            if not inserted:
                raise Replayed(claim.scheme)

    def seen(self, scheme: str, token: str) -> bool:
        """``token`` is remembered for ``scheme`` (and has not expired)."""
        r = self.db.execute(
            "SELECT 1 FROM webhook_seen WHERE scheme = ? AND token = ? AND expires >= ?",
            (scheme, token, time.time()),
        ).fetchone()
        return r is not None

    # -- FHIR Subscription notifications -----------------------------------------------------
    def add_events(self, events: Iterable[tuple[str, str | None, bytes | None]]) -> int:
        """Queue notifications: (what, reference, resource body) with what = ``resource``
        (a full resource), ``ref`` (an id to read back), ``deleted`` or ``query``."""
        now = time.time()
        n = 0
        with self.transaction():
            for what, ref, body in events:
                self.db.execute(
                    "INSERT INTO notify_events (what, ref, body, received_at) VALUES (?, ?, ?, ?)",
                    (what, ref, body, now),
                )
                n += 1
            self._bump("notifications", n)
        return n

    def events(self, limit: int = 500) -> list[tuple[int, str, str | None, bytes | None]]:
        return [
            (int(i), str(w), None if r is None else str(r), None if b is None else bytes(b))
            for i, w, r, b in self.db.execute(
                "SELECT id, what, ref, body FROM notify_events ORDER BY id LIMIT ?", (limit,)
            )
        ]

    def done_events(self, ids: Iterable[int]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM notify_events WHERE id = ?", [(i,) for i in ids])

    def pending_events(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM notify_events").fetchone()[0])


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped + "%"


class ThreadInboxes:
    """One :class:`Inbox` connection per thread (web workers are threaded)."""

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.group = GroupCommit()  # the connections of this process commit together
        self._local = threading.local()

    def get(self) -> Inbox:
        inbox: Inbox | None = getattr(self._local, "inbox", None)
        if inbox is None:
            inbox = Inbox(self.path, timeout_s=self.timeout_s, group=self.group)
            self._local.inbox = inbox
        return inbox


__all__ = [
    "KEY_FIELDS",
    "MAX_RATERS",
    "ORIGIN_SERVER",
    "ORIGIN_WEBHOOK",
    "PRIMARY_TYPE",
    "Accepted",
    "Claim",
    "GroupCommit",
    "Inbox",
    "InboxConflict",
    "InboxRow",
    "InboxUnavailable",
    "Problem",
    "Replayed",
    "RetractRefused",
    "ThreadInboxes",
    "record_ident",
    "record_key",
]
