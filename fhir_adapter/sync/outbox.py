"""The durable outbox (SQLite, WAL): what was mapped, what the server holds, what failed.

Keyed by resource type and business key (``system|value``), never by source file path. A row
remembers the canonical body and its hash, the server's id and version once a send landed, and
its state:

- ``pending``: new or changed, to be sent (``last_error`` "waits for …": held back until the
  resource it refers to has a server id);
- ``sending``: handed to the server, answer not recorded yet (a crash, a timeout or an uncertain
  answer leaves it here: the next send looks it up on the server first);
- ``sent``: landed; ``sent_hash`` is the hash of what the server holds;
- ``delete``: to be deleted on the server (removed from the source; no entered-in-error status);
- ``tombstone``: deleted on the server (or a refused deletion acknowledged), kept so the removal
  is remembered;
- ``dead``: refused by the server; the OperationOutcome and the refused operation are in
  ``dead_letters`` until the record lands or the letter is dropped.

All SQL on the outbox lives in this module. One writer at a time: :meth:`Outbox.writer_lock`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from fhir_adapter.errors import ConfigurationError, OutboxBusy

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    rtype      TEXT NOT NULL,
    bkey       TEXT NOT NULL,
    local_id   TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    source     TEXT NOT NULL,
    body       BLOB NOT NULL,
    hash       TEXT NOT NULL,
    state      TEXT NOT NULL,
    server_id  TEXT,
    version_id TEXT,
    sent_hash  TEXT,
    retracted  INTEGER NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (rtype, bkey)
);
CREATE INDEX IF NOT EXISTS resources_state ON resources (state, seq);
CREATE UNIQUE INDEX IF NOT EXISTS resources_local ON resources (rtype, local_id);
CREATE TABLE IF NOT EXISTS dead_letters (
    rtype     TEXT NOT NULL,
    bkey      TEXT NOT NULL,
    status    INTEGER,
    message   TEXT NOT NULL,
    outcome   TEXT,
    operation TEXT,
    PRIMARY KEY (rtype, bkey)
);
CREATE TABLE IF NOT EXISTS learned_types (rtype TEXT PRIMARY KEY);
"""

# The record of the last clean sync (meta ``clean_stage``, the unchanged re-sync's shortcut)
# holds only while the outbox is exactly as that sync left it: every write to a row or a dead
# letter, by whatever process or version of the adapter, deletes it. (Where there is no record,
# which is the case during a sync, a trigger costs one index look-up, no write.)
_FORGET = "DELETE FROM meta WHERE key = 'clean_stage';"
_TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS resources_insert_forgets AFTER INSERT ON resources
    BEGIN {_FORGET} END;
CREATE TRIGGER IF NOT EXISTS resources_update_forgets AFTER UPDATE ON resources
    BEGIN {_FORGET} END;
CREATE TRIGGER IF NOT EXISTS resources_delete_forgets AFTER DELETE ON resources
    BEGIN {_FORGET} END;
CREATE TRIGGER IF NOT EXISTS dead_letters_insert_forgets AFTER INSERT ON dead_letters
    BEGIN {_FORGET} END;
CREATE TRIGGER IF NOT EXISTS dead_letters_update_forgets AFTER UPDATE ON dead_letters
    BEGIN {_FORGET} END;
CREATE TRIGGER IF NOT EXISTS dead_letters_delete_forgets AFTER DELETE ON dead_letters
    BEGIN {_FORGET} END;
"""

# Types whose status has entered-in-error: a removed record is retracted, not deleted.
RETRACTABLE = {
    "R4": frozenset({"Observation", "Encounter", "Consent"}),
    "R5": frozenset({"Observation", "Encounter", "Consent", "AdverseEvent"}),
}
WAITS_FOR = "waits for "
MIN_GUARDED_REMOVALS = 5  # removing up to this many records of a file never needs the flag


def content_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


@dataclass
class Row:
    rtype: str
    bkey: str
    local_id: str
    seq: int
    source: str
    body: bytes
    hash: str
    state: str
    server_id: str | None
    version_id: str | None
    sent_hash: str | None
    retracted: int
    attempts: int

    @property
    def resource(self) -> dict[str, Any]:
        """A fresh copy of the body, free to change."""
        return dict(orjson.loads(self.body))

    @functools.cached_property
    def key(self) -> str:
        """``Type/local id``: how the other bodies refer to this one."""
        return f"{self.rtype}/{self.local_id}"


_ROW_COLUMNS = (
    "rtype, bkey, local_id, seq, source, body, hash, state, server_id, version_id, sent_hash, "
    "retracted, attempts"
)


@dataclass(frozen=True)
class RefusedRemoval:
    """A file whose removals were not staged: it would remove too much of what it holds."""

    source: str
    would_remove: int
    held: int


@dataclass
class StageResult:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    retracted: int = 0
    deleted: int = 0
    removed_keys: list[tuple[str, str]] = field(default_factory=list)
    refused_removals: list[RefusedRemoval] = field(default_factory=list)


class _Existing(NamedTuple):
    hash: str
    state: str
    sent_hash: str | None
    source: str
    retracted: int


# -- one writer per outbox ---------------------------------------------------------------------
def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def writer_lock(path: Path, timeout: float, *, poll_s: float = 0.05) -> Iterator[None]:
    """Hold the one-writer lock of the outbox at ``path`` (a sync, a delivery worker, …).

    An advisory lock on ``<outbox>.lock`` (``flock``; released by the OS when the process dies,
    even by SIGKILL). A second writer waits up to ``timeout`` seconds, then gets
    :class:`OutboxBusy` (exit 69). Works across processes and across threads of one process
    (each holder opens the file itself). Readers need no lock.
    """
    target = lock_path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the outbox lock {target}: {exc.strerror or exc}"
        ) from None
    try:
        deadline = time.monotonic() + timeout
        waiting = False
        while not _try_lock(fd):
            if not waiting:
                waiting = True
                log.warning(
                    "waiting for the outbox %s: another writer%s holds it (up to %g s)",
                    path,
                    _holder(target),
                    timeout,
                )
            if time.monotonic() >= deadline:
                raise OutboxBusy(
                    f"the outbox {path} is in use by another writer{_holder(target)}; waited "
                    f"{timeout:g} s (FHIR_ADAPTER_LOCK_TIMEOUT_S): run again when it has finished"
                )
            time.sleep(poll_s)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


if sys.platform == "win32":  # pragma: no cover - the project runs on POSIX
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _holder(target: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(target.read_text(encoding="ascii").strip() or "0")
        if pid:
            return f" (process {pid})"
    return ""


class Outbox:
    """One SQLite file per target server (the server's base URL is recorded in it)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """Open (or create) the outbox at ``path``. ``read_only``: an existing outbox, opened
        without writing a byte (``outbox status``, ``dead-letters list``). A database of
        another application is never adopted: it is refused untouched."""
        self.path = path
        try:
            if read_only:
                uri = f"file:{path.resolve()}?mode=ro"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(f"cannot open the outbox {path}: {exc}") from None
        try:
            self._set_up(read_only)
        except sqlite3.Error as exc:
            self.db.close()
            raise ConfigurationError(
                f"cannot use {path} as the outbox ({exc}); point --outbox at an outbox file "
                "or at a new path"
            ) from None
        except ConfigurationError:
            self.db.close()
            raise

    def _set_up(self, read_only: bool, *, wait_s: float = 30.0) -> None:
        """Check the file and set up the schema. Two processes opening a new outbox at the same
        moment can find it locked while the other turns on WAL (SQLite answers "database is
        locked" at once there, without waiting): that is tried again, briefly, until ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._refuse_foreign(read_only)
                if not read_only:
                    self._open()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _refuse_foreign(self, read_only: bool) -> None:
        tables = {
            str(name)
            for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        # an outbox, or a database the webhook's inbox set up first (sync/inbox.py)
        ours = "inbox" in tables or (
            "meta" in tables
            and self.db.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone()
            is not None
        )
        if ours or not (tables or read_only):  # ours, or a new (empty) file to set up
            return
        what = "an SQLite database of another application" if tables else "empty"
        raise ConfigurationError(
            f"{self.path} is {what}, not an outbox; point --outbox at an outbox file or at a "
            "new path"
        )

    def _open(self) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        # one transaction: a process opening the same new file meanwhile finds no outbox or a
        # whole one, never tables without their schema version ("another application's")
        try:
            self.db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {_TRIGGERS}")
            self._migrate()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        version = self.get_meta("schema_version")
        if version is not None and int(version) > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{self.path}: outbox schema {version} is newer than this adapter's "
                f"({SCHEMA_VERSION})"
            )
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(dead_letters)")}
        if "operation" not in columns:  # schema 1
            self.db.execute("ALTER TABLE dead_letters ADD COLUMN operation TEXT")
        if version != str(SCHEMA_VERSION):
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def writer_lock(self, timeout: float) -> contextlib.AbstractContextManager[None]:
        """The one-writer lock of this outbox (see :func:`writer_lock`)."""
        return writer_lock(self.path, timeout)

    @staticmethod
    def copy(source: Path, target: Path) -> None:
        """A consistent copy of the outbox at ``source`` (for a dry run); ``source`` unchanged."""
        try:
            src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the outbox {source}: {exc}") from None
        dst = sqlite3.connect(str(target))
        try:
            src.backup(dst)
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot read the outbox {source}: {exc}") from None
        finally:
            src.close()
            dst.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def bind_server(self, base_url: str) -> None:
        """An outbox belongs to one server: its ids mean nothing on another."""
        known = self.get_meta("server")
        if known is None:
            self.set_meta("server", base_url)
        elif known != base_url:
            raise ConfigurationError(
                f"the outbox {self.path} belongs to {known}, not {base_url}; "
                "use another --outbox for another server"
            )

    # -- the unchanged re-sync ---------------------------------------------------------------
    def settled(self) -> bool:
        """Nothing left to send, refused or held back: every row landed or removed."""
        row = self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM resources WHERE state NOT IN ('sent', 'tombstone')) "
            "OR EXISTS (SELECT 1 FROM dead_letters)"
        ).fetchone()
        return not row[0]

    def record_clean_stage(self, fingerprint: str, today: str, staged: int) -> None:
        """A sync of inputs with digest ``fingerprint`` ended clean and settled: an identical
        run may skip staging until anything writes to the outbox (which deletes this record)."""
        known = {"fingerprint": fingerprint, "today": today, "staged": staged}
        self.set_meta("clean_stage", orjson.dumps(known).decode())

    def forget_clean_stage(self) -> None:
        self.db.execute("DELETE FROM meta WHERE key = 'clean_stage'")

    def unchanged_stage(self, fingerprint: str, today: str) -> int | None:
        """How many resources the recorded clean stage had, when staging inputs with digest
        ``fingerprint`` on ``today`` would change nothing; None otherwise."""
        raw = self.get_meta("clean_stage")
        if raw is None:
            return None
        try:
            known = orjson.loads(raw)
            same = (
                known["fingerprint"] == fingerprint
                and str(known["today"]) <= today  # ISO dates: the clock did not go back
            )
            return int(known["staged"]) if same else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    # -- staging ---------------------------------------------------------------------------
    def stage(
        self,
        items: Iterable[tuple[str, dict[str, Any], bytes]],
        present_sources: Callable[[], set[str]],
        fhir_version: str = "R4",
        *,
        allow_removals: bool = False,
        max_removal_share: float = 0.2,
    ) -> StageResult:
        """Record this run's mapped resources; mark removals. ``items``: (source, resource, body).

        A record is removed when its source file was present in this run and it was not
        emitted: retracted (entered-in-error) where the type has that status, else deleted.
        No silent mass removal: a source that would remove more than ``max_removal_share`` of
        the records the outbox holds from it (and more than 5), or that yields none of them,
        removes nothing unless ``allow_removals``; it is listed in ``refused_removals``.
        """
        with self.transaction():  # read and written in one transaction: no writer in between
            staging = _Staging(self, allow_removals, max_removal_share)
            for source, resource, body in items:
                staging.add(source, resource, body)
            staging.remove_absent(present_sources(), RETRACTABLE[fhir_version])
        return staging.result

    def nothing_to_send(self) -> bool:
        """No row waits to be sent, looked up, deleted or re-read: a sync may send what it
        stages as it stages it (:meth:`stage_in_batches`)."""
        row = self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM resources "
            "WHERE state IN ('pending', 'sending', 'delete', 'conflict'))"
        ).fetchone()
        return not row[0]

    def stage_in_batches(
        self,
        items: Iterable[tuple[str, dict[str, Any], bytes]],
        present_sources: Callable[[], set[str]],
        result: StageResult,
        fhir_version: str = "R4",
        *,
        batch_rows: int = 50,
        allow_removals: bool = False,
        max_removal_share: float = 0.2,
    ) -> Iterator[list[Row]]:
        """:meth:`stage`, committed every ``batch_rows`` items: yields the rows each batch left
        to send, so that sending overlaps staging. Only for an outbox with
        :meth:`nothing_to_send` (every pending row is then one of this run's). The writer lock
        keeps other processes out; the consumer writes between batches (no transaction of
        staging is open while it runs). Removals are staged last and not yielded: they are
        sent after everything else. ``result`` is filled in as staging goes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            staging = _Staging(self, allow_removals, max_removal_share, result)
            first = 1
            for source, resource, body in items:
                staging.add(source, resource, body)
                if staging.seq - first + 1 >= batch_rows:
                    staging.flush()
                    self.db.execute("COMMIT")
                    yield self._pending_between(first, staging.seq)
                    first = staging.seq + 1
                    self.db.execute("BEGIN IMMEDIATE")
            last = staging.seq
            staging.remove_absent(present_sources(), RETRACTABLE[fhir_version])
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        if first <= last:
            yield self._pending_between(first, last)

    def _pending_between(self, first: int, last: int) -> list[Row]:
        return [
            Row(*r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM resources "  # noqa: S608
                "WHERE state = 'pending' AND seq BETWEEN ? AND ? ORDER BY seq",
                (first, last),
            )
        ]

    def _stage_one(
        self,
        key: tuple[str, str],
        source: str,
        body: bytes,
        seq: int,
        old: _Existing,
        refused_deletes: set[tuple[str, str]],
        result: StageResult,
    ) -> None:
        rtype, bkey = key
        digest = content_hash(body)
        if old.state == "sent" and old.sent_hash == digest:
            result.unchanged += 1
            self.db.execute(
                "UPDATE resources SET seq = ?, source = ? WHERE rtype = ? AND bkey = ?",
                (seq, source, rtype, bkey),
            )
        elif key in refused_deletes:
            # the record is back in the source: its refused deletion is moot
            self._delete_letter(rtype, bkey)
            back = "sent" if old.sent_hash == digest else "pending"
            if back == "sent":
                result.unchanged += 1
            else:
                result.changed += 1
            self.db.execute(
                "UPDATE resources SET seq = ?, source = ?, body = ?, hash = ?, state = ?, "
                "retracted = 0, last_error = NULL WHERE rtype = ? AND bkey = ?",
                (seq, source, body, digest, back, rtype, bkey),
            )
        elif old.state == "dead" and old.hash == digest:
            result.unchanged += 1  # still refused; `dead-letters retry` re-queues it
        elif old.state in ("sending", "conflict"):
            # outcome of an earlier send unknown, or the server's copy changed and is still to
            # be re-read: keep the state (no stale If-Match goes out), refresh the content
            result.changed += 1
            self.db.execute(
                "UPDATE resources SET seq = ?, source = ?, body = ?, hash = ?, "
                "retracted = 0 WHERE rtype = ? AND bkey = ?",
                (seq, source, body, digest, rtype, bkey),
            )
        else:
            result.changed += 1
            self.db.execute(
                "UPDATE resources SET seq = ?, source = ?, body = ?, hash = ?, "
                "state = 'pending', retracted = 0, attempts = 0, last_error = NULL "
                "WHERE rtype = ? AND bkey = ?",
                (seq, source, body, digest, rtype, bkey),
            )

    def _remove(
        self, rtype: str, bkey: str, seq: int, result: StageResult, retractable: frozenset[str]
    ) -> None:
        row = self.row(rtype, bkey)
        if row is None:  # pragma: no cover - read in the same transaction
            return
        result.removed_keys.append((rtype, bkey))
        if rtype in retractable:
            resource = row.resource
            resource["status"] = "entered-in-error"
            body = orjson.dumps(resource)
            result.retracted += 1
            self.db.execute(
                "UPDATE resources SET seq = ?, body = ?, hash = ?, state = 'pending', "
                "retracted = 1 WHERE rtype = ? AND bkey = ?",
                (seq, body, content_hash(body), rtype, bkey),
            )
        else:
            result.deleted += 1
            state = "delete" if row.server_id else "tombstone"
            self.db.execute(
                "UPDATE resources SET seq = ?, state = ? WHERE rtype = ? AND bkey = ?",
                (seq, state, rtype, bkey),
            )

    # -- reading -----------------------------------------------------------------------------
    def row(self, rtype: str, bkey: str) -> Row | None:
        r = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM resources WHERE rtype = ? AND bkey = ?",  # noqa: S608
            (rtype, bkey),
        ).fetchone()
        return None if r is None else Row(*r)

    def to_send(self) -> list[Row]:
        """Rows to send, in dependency order (the order of this run's mapping)."""
        return [
            Row(*r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM resources "  # noqa: S608
                "WHERE state IN ('pending', 'sending', 'delete') ORDER BY seq"
            )
        ]

    def landed_hashes(self) -> set[str]:
        """Hashes of the content the server holds (validated when it was sent)."""
        return {
            str(r[0])
            for r in self.db.execute(
                "SELECT sent_hash FROM resources WHERE state = 'sent' AND sent_hash IS NOT NULL"
            )
        }

    def blocked(self) -> int:
        """Rows held back: they refer to a resource that has no server id (e.g. dead-lettered)."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM resources WHERE state = 'pending' AND last_error LIKE ?",
            (WAITS_FOR + "%",),
        ).fetchone()
        return int(row[0])

    def undelivered(self) -> int:
        """Rows still to send that are not held back (pending, sending, to delete, or in
        conflict with a change on the server that is still to be re-read)."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM resources "
            "WHERE state IN ('pending', 'sending', 'delete', 'conflict') "
            "AND (last_error IS NULL OR last_error NOT LIKE ?)",
            (WAITS_FOR + "%",),
        ).fetchone()
        return int(row[0])

    def server_ids(self) -> dict[str, str]:
        """``Type/local id`` -> server id of every resource the server holds (references)."""
        return {
            f"{r[0]}/{r[1]}": str(r[2])
            for r in self.db.execute(
                "SELECT rtype, local_id, server_id FROM resources "
                "WHERE server_id IS NOT NULL AND state NOT IN ('tombstone', 'delete')"
            )
        }

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for rtype, state, n in self.db.execute(
            "SELECT rtype, state, COUNT(*) FROM resources GROUP BY rtype, state ORDER BY rtype"
        ):
            out.setdefault(str(rtype), {})[str(state)] = int(n)
        return out

    def sent_rows(self, rtype: str) -> list[Row]:
        return [
            Row(*r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM resources WHERE rtype = ? "  # noqa: S608
                "AND state IN ('sent', 'sending', 'pending')",
                (rtype,),
            )
        ]

    def by_local_id(self, rtype: str, local_id: str) -> Row | None:
        r = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM resources WHERE rtype = ? AND local_id = ?",  # noqa: S608
            (rtype, local_id),
        ).fetchone()
        return None if r is None else Row(*r)

    def tombstone_keys(self, rtype: str) -> list[str]:
        """Business keys of the resources of ``rtype`` removed from the source."""
        return [
            str(r[0])
            for r in self.db.execute(
                "SELECT bkey FROM resources WHERE rtype = ? AND state = 'tombstone'", (rtype,)
            )
        ]

    def types(self) -> list[str]:
        return [str(r[0]) for r in self.db.execute("SELECT DISTINCT rtype FROM resources")]

    # -- recording server answers ----------------------------------------------------------
    def learn(self, rtype: str, found: dict[str, tuple[str, str | None]]) -> None:
        """Server ids found by a search (business key -> (id, version))."""
        with self.transaction():
            for bkey, (server_id, version) in found.items():
                self.db.execute(
                    "UPDATE resources SET server_id = ?, version_id = ? "
                    "WHERE rtype = ? AND bkey = ? AND server_id IS NULL",
                    (server_id, version, rtype, bkey),
                )
            self.db.execute("INSERT OR IGNORE INTO learned_types (rtype) VALUES (?)", (rtype,))

    def learned(self, rtype: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM learned_types WHERE rtype = ?", (rtype,)).fetchone()
            is not None
        )

    def mark_sending(self, rows: Iterable[Row]) -> None:
        writes = [row for row in rows if row.state != "delete"]
        with self.transaction():
            self.db.executemany(
                "UPDATE resources SET state = 'sending', attempts = attempts + 1 "
                "WHERE rtype = ? AND bkey = ?",
                [(row.rtype, row.bkey) for row in writes],
            )
        for row in writes:
            row.state = "sending"

    def mark_unsent(self, rows: Iterable[Row]) -> None:
        """The server did not apply them (refused connection, 503): plain pending again."""
        with self.transaction():
            for row in rows:
                if row.state == "sending":
                    self.mark_pending(row)
                    row.state = "pending"

    def mark_sent(
        self, row: Row, server_id: str, version: str | None, *, letters: bool = True
    ) -> None:
        """Landed. ``letters=False``: the caller knows the outbox holds no dead letter (one
        statement per landed row instead of two)."""
        self.mark_sent_many([(row, server_id, version)], letters=letters)

    def mark_sent_many(
        self, landed: list[tuple[Row, str, str | None]], *, letters: bool = True
    ) -> None:
        """:meth:`mark_sent` for (row, server id, version) of one answer, in one statement."""
        self.db.executemany(
            "UPDATE resources SET state = 'sent', server_id = ?, version_id = ?, sent_hash = ?, "
            "last_error = NULL WHERE rtype = ? AND bkey = ?",
            [(sid, version, row.hash, row.rtype, row.bkey) for row, sid, version in landed],
        )
        if letters:
            self.db.executemany(
                "DELETE FROM dead_letters WHERE rtype = ? AND bkey = ?",
                [(row.rtype, row.bkey) for row, _, _ in landed],
            )
        for row, server_id, version in landed:
            row.state, row.server_id, row.version_id = "sent", server_id, version

    def mark_unknown_to_server(self, rows: list[Row]) -> None:
        """A look-up found none of ``rows`` on the server: pending, no server id (a row that is
        so already is not written: a first sync looks up every row it staged)."""
        self.db.executemany(
            "UPDATE resources SET state = 'pending', last_error = NULL, server_id = NULL, "
            "version_id = NULL WHERE rtype = ? AND bkey = ? AND NOT (state = 'pending' AND "
            "last_error IS NULL AND server_id IS NULL AND version_id IS NULL)",
            [(row.rtype, row.bkey) for row in rows],
        )
        for row in rows:
            row.state, row.server_id, row.version_id = "pending", None, None

    def mark_deleted(self, row: Row) -> None:
        self.db.execute(
            "UPDATE resources SET state = 'tombstone', server_id = NULL, version_id = NULL, "
            "sent_hash = NULL, last_error = NULL WHERE rtype = ? AND bkey = ?",
            (row.rtype, row.bkey),
        )
        self._delete_letter(row.rtype, row.bkey)
        row.state, row.server_id, row.version_id = "tombstone", None, None

    def mark_dead(
        self, row: Row, status: int | None, message: str, outcome: Any, operation: str = ""
    ) -> None:
        """Refused by the server: a dead letter with its OperationOutcome and the operation
        (a refused ``DELETE`` is retried as a DELETE, never as a PUT)."""
        self.db.execute(
            "UPDATE resources SET state = 'dead', last_error = ? WHERE rtype = ? AND bkey = ?",
            (message, row.rtype, row.bkey),
        )
        self.db.execute(
            "INSERT INTO dead_letters (rtype, bkey, status, message, outcome, operation) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (rtype, bkey) DO UPDATE SET "
            "status = excluded.status, message = excluded.message, outcome = excluded.outcome, "
            "operation = excluded.operation",
            (
                row.rtype,
                row.bkey,
                status,
                message,
                orjson.dumps(outcome).decode() if outcome is not None else None,
                operation or None,
            ),
        )
        row.state = "dead"

    def mark_pending(
        self, row: Row, *, forget_server: bool = False, error: str | None = None
    ) -> None:
        forget = ", server_id = NULL, version_id = NULL" if forget_server else ""
        self.db.execute(
            f"UPDATE resources SET state = 'pending', last_error = ?{forget} "  # noqa: S608 - constant
            "WHERE rtype = ? AND bkey = ?",
            (error, row.rtype, row.bkey),
        )
        row.state = "pending"
        if forget_server:
            row.server_id = row.version_id = None

    def hold(self, row: Row, target: str) -> None:
        """Held back: ``row`` refers to ``target``, which has no server id."""
        self.mark_pending(row, error=f"{WAITS_FOR}{target}")

    def set_server(self, row: Row, server_id: str, version: str | None) -> None:
        """The server holds ``row`` as ``server_id`` (found by a look-up); send it again."""
        self.db.execute(
            "UPDATE resources SET state = 'pending', server_id = ?, version_id = ? "
            "WHERE rtype = ? AND bkey = ?",
            (server_id, version, row.rtype, row.bkey),
        )
        row.state, row.server_id, row.version_id = "pending", server_id, version

    def mark_conflict(self, row: Row, error: str) -> None:
        """Changed on the server since we last saw it (409/412), and the caller re-reads it
        before anything is sent again (:meth:`conflicts`, then :meth:`adopt`): not sent until
        then, its stale version kept."""
        self.db.execute(
            "UPDATE resources SET state = 'conflict', last_error = ? WHERE rtype = ? AND bkey = ?",
            (error, row.rtype, row.bkey),
        )
        row.state = "conflict"

    def conflicts(self) -> list[Row]:
        """Rows in conflict with a change on the server, to be re-read (:meth:`mark_conflict`)."""
        return [
            Row(*r)
            for r in self.db.execute(
                f"SELECT {_ROW_COLUMNS} FROM resources WHERE state = 'conflict' ORDER BY seq"  # noqa: S608
            )
        ]

    def forget_version(self, row: Row, error: str) -> None:
        """Changed on the server since we last saw it (409/412): the source wins next pass."""
        self.mark_pending(row, error=error)
        self.db.execute(
            "UPDATE resources SET version_id = NULL WHERE rtype = ? AND bkey = ?",
            (row.rtype, row.bkey),
        )
        row.version_id = None

    def requeue(self, row: Row) -> None:
        """Send a landed resource again (reconcile --repair)."""
        self.mark_pending(row)

    def requeue_referrers(self, rtype: str, local_id: str) -> list[tuple[str, str]]:
        """Queue again the landed resources whose body refers to ``rtype/local_id``: the
        target got a new server id, so what they hold on the server points at nothing (bodies
        keep local references; a re-send rewrites them to the new id). Returns their keys."""
        needle = f'"reference":"{rtype}/{local_id}"'
        keys = [
            (str(r[0]), str(r[1]))
            for r in self.db.execute(
                "SELECT rtype, bkey FROM resources WHERE state = 'sent' "
                "AND instr(CAST(body AS TEXT), ?) > 0",
                (needle,),
            )
        ]
        self.db.executemany(
            "UPDATE resources SET state = 'pending' WHERE rtype = ? AND bkey = ?", keys
        )
        return keys

    # -- dead letters ------------------------------------------------------------------------
    def _dead_keys(self, operation: str) -> set[tuple[str, str]]:
        return {
            (str(r[0]), str(r[1]))
            for r in self.db.execute(
                "SELECT d.rtype, d.bkey FROM dead_letters d JOIN resources r "
                "ON r.rtype = d.rtype AND r.bkey = d.bkey "
                "WHERE r.state = 'dead' AND d.operation = ?",
                (operation,),
            )
        }

    def _delete_letter(self, rtype: str, bkey: str) -> None:
        self.db.execute("DELETE FROM dead_letters WHERE rtype = ? AND bkey = ?", (rtype, bkey))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {
                "id": int(r[0]),
                "resourceType": r[1],
                "key": r[2],
                "operation": r[6],
                "status": r[3],
                "message": r[4],
                "outcome": orjson.loads(r[5]) if r[5] else None,
            }
            for r in self.db.execute(
                "SELECT rowid, rtype, bkey, status, message, outcome, operation "
                "FROM dead_letters ORDER BY rtype, bkey"
            )
        ]

    def dead_letter_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])

    def retry_dead(self) -> int:
        """Queue the dead letters again: each with the operation the server refused."""
        with self.transaction():
            deletes = self.db.execute(
                "UPDATE resources SET state = 'delete', attempts = 0 WHERE state = 'dead' AND "
                "(rtype, bkey) IN (SELECT rtype, bkey FROM dead_letters WHERE operation = 'DELETE')"
            ).rowcount
            writes = self.db.execute(
                "UPDATE resources SET state = 'pending', attempts = 0, last_error = NULL "
                "WHERE state = 'dead' AND (rtype, bkey) IN (SELECT rtype, bkey FROM dead_letters "
                "WHERE operation IS NULL OR operation != 'DELETE')"
            ).rowcount
        return int(deletes) + int(writes)

    def drop_dead_letter(self, letter_id: int) -> dict[str, Any] | None:
        """Acknowledge a dead letter: it leaves the list and is not sent again.

        A refused deletion becomes a tombstone (the server keeps the resource; the outbox
        remembers it was removed from the source); a refused write stays refused until its
        content changes in the source."""
        found = next((d for d in self.dead_letters() if d["id"] == letter_id), None)
        if found is None:
            return None
        with self.transaction():
            if found["operation"] == "DELETE":
                self.db.execute(
                    "UPDATE resources SET state = 'tombstone', last_error = NULL "
                    "WHERE rtype = ? AND bkey = ? AND state = 'dead'",
                    (found["resourceType"], found["key"]),
                )
            self._delete_letter(found["resourceType"], found["key"])
        return found

    # -- appended for the webhook layer (SPEC §8) ------------------------------------------
    def by_server_id(self, rtype: str, server_id: str) -> Row | None:
        """The row of the resource the server holds as ``rtype/server_id``."""
        r = self.db.execute(
            f"SELECT {_ROW_COLUMNS} FROM resources WHERE rtype = ? AND server_id = ?",  # noqa: S608
            (rtype, server_id),
        ).fetchone()
        return None if r is None else Row(*r)

    def adopt(
        self,
        rtype: str,
        bkey: str,
        local_id: str,
        body: bytes,
        server_id: str,
        version: str | None,
        source: str,
    ) -> bool:
        """Record that the server holds ``bkey`` as ``rtype/server_id`` (``version``) with
        content equivalent to ``body`` - a resource written or changed on the server by someone
        else (e.g. the EHR). References to it then resolve, and staging the same content later
        sends nothing. A row with a change of its own still to send is left alone (False); a
        row in conflict takes the server's copy (its own content is staged again after).
        """
        digest = content_hash(body)
        with self.transaction():
            row = self.row(rtype, bkey)
            if row is None:
                self.db.execute(
                    "INSERT OR IGNORE INTO resources (rtype, bkey, local_id, seq, source, body, "
                    "hash, state, server_id, version_id, sent_hash) "
                    "VALUES (?, ?, ?, 0, ?, ?, ?, 'sent', ?, ?, ?)",
                    (rtype, bkey, local_id, source, body, digest, server_id, version, digest),
                )
                return True
            if row.state not in ("sent", "tombstone", "conflict"):
                return False
            self.db.execute(
                "UPDATE resources SET body = ?, hash = ?, sent_hash = ?, state = 'sent', "
                "server_id = ?, version_id = ?, retracted = 0, last_error = NULL "
                "WHERE rtype = ? AND bkey = ?",
                (body, digest, digest, server_id, version, rtype, bkey),
            )
        return True


class _Staging:
    """One staging run over an open transaction of ``outbox`` (see :meth:`Outbox.stage`)."""

    def __init__(
        self,
        outbox: Outbox,
        allow_removals: bool,
        max_removal_share: float,
        result: StageResult | None = None,
    ) -> None:
        self.outbox = outbox
        self.allow_removals = allow_removals
        self.max_removal_share = max_removal_share
        self.result = StageResult() if result is None else result
        self.seen: set[tuple[str, str]] = set()
        self.seen_by_source: Counter[str] = Counter()
        self.seq = 0
        self.inserts: list[tuple[str, str, str, int, str, bytes, str]] = []
        self.existing = {
            (str(r[0]), str(r[1])): _Existing(r[2], r[3], r[4], r[5], r[6])
            for r in outbox.db.execute(
                "SELECT rtype, bkey, hash, state, sent_hash, source, retracted FROM resources"
            )
        }
        self.refused_deletes = outbox._dead_keys("DELETE")

    def add(self, source: str, resource: dict[str, Any], body: bytes) -> None:
        self.seq += 1
        rtype = str(resource["resourceType"])
        tag = resource["meta"]["tag"][0]
        key = (rtype, f"{tag['system']}|{tag['code']}")
        self.seen_by_source[source] += 1
        old = self.existing.get(key)
        if old is None:  # new: inserted with the others of its batch (one statement)
            self.result.new += 1
            self.inserts.append(
                (rtype, key[1], str(resource["id"]), self.seq, source, body, content_hash(body))
            )
            return
        self.seen.add(key)  # removals are among the existing rows: only they need counting
        self.outbox._stage_one(key, source, body, self.seq, old, self.refused_deletes, self.result)

    def flush(self) -> None:
        """Insert the new rows staged since the last flush (before a commit, before removals)."""
        self.outbox.db.executemany(
            "INSERT INTO resources (rtype, bkey, local_id, seq, source, body, hash, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
            self.inserts,
        )
        self.inserts.clear()

    def remove_absent(self, present: set[str], retractable: frozenset[str]) -> None:
        """Asked only at the end: which files were complete is known once they were read."""
        self.flush()
        removals = _Removals(self.existing, self.seen, present, self.refused_deletes)
        for source, keys in removals.by_source().items():
            held = removals.held(source)
            too_many = (
                len(keys) > self.max_removal_share * held and len(keys) > MIN_GUARDED_REMOVALS
            )
            if not self.allow_removals and (too_many or self.seen_by_source[source] == 0):
                self.result.refused_removals.append(RefusedRemoval(source, len(keys), held))
                continue
            for rtype, bkey in keys:
                self.seq += 1
                self.outbox._remove(rtype, bkey, self.seq, self.result, retractable)


class _Removals:
    """Which records of each complete source this run did not emit (candidates for removal)."""

    def __init__(
        self,
        existing: dict[tuple[str, str], _Existing],
        seen: set[tuple[str, str]],
        present: set[str],
        refused_deletes: set[tuple[str, str]],
    ) -> None:
        self.existing = existing
        self.seen = seen
        self.present = present
        self.refused_deletes = refused_deletes

    def _live(self, key: tuple[str, str], old: _Existing) -> bool:
        return not (
            old.state in ("tombstone", "delete") or old.retracted or key in self.refused_deletes
        )

    def by_source(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list[tuple[str, str]]] = {}
        for key in sorted(self.existing.keys() - self.seen):
            old = self.existing[key]
            if old.source in self.present and self._live(key, old):
                out.setdefault(old.source, []).append(key)
        return out

    def held(self, source: str) -> int:
        """Records the outbox holds from ``source`` (before this run)."""
        return sum(
            1 for key, old in self.existing.items() if old.source == source and self._live(key, old)
        )
