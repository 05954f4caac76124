"""The durable outbox (SQLite, WAL): what was mapped, what the server holds, what failed.

Keyed by resource type and business key (``system|value``), never by source file path. A row
remembers the canonical body and its hash, the server's id and version once a send landed, and
its state:

- ``pending``: new or changed, to be sent;
- ``sending``: handed to the server, answer not recorded yet (a crash or a timeout leaves it
  here: its outcome is uncertain, so the next send matches it on the server first);
- ``sent``: landed; ``sent_hash`` is the hash of what the server holds;
- ``delete``: to be deleted on the server (removed from the source; no entered-in-error status);
- ``tombstone``: deleted on the server, kept so the removal is remembered;
- ``dead``: rejected by the server; the OperationOutcome is in ``dead_letters``.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from fhir_adapter.errors import ConfigurationError

SCHEMA_VERSION = 1

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
    rtype   TEXT NOT NULL,
    bkey    TEXT NOT NULL,
    status  INTEGER,
    message TEXT NOT NULL,
    outcome TEXT,
    PRIMARY KEY (rtype, bkey)
);
CREATE TABLE IF NOT EXISTS learned_types (rtype TEXT PRIMARY KEY);
"""

# Types whose status has entered-in-error: a removed record is retracted, not deleted.
RETRACTABLE = {
    "R4": frozenset({"Observation", "Encounter", "Consent"}),
    "R5": frozenset({"Observation", "Encounter", "Consent", "AdverseEvent"}),
}


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
        return dict(orjson.loads(self.body))


_ROW_COLUMNS = (
    "rtype, bkey, local_id, seq, source, body, hash, state, server_id, version_id, sent_hash, "
    "retracted, attempts"
)


@dataclass
class StageResult:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    retracted: int = 0
    deleted: int = 0
    removed_keys: list[tuple[str, str]] = field(default_factory=list)


class Outbox:
    """One SQLite file per target server (the server's base URL is recorded in it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) > SCHEMA_VERSION:
            raise ConfigurationError(
                f"{path}: outbox schema {version} is newer than this adapter's ({SCHEMA_VERSION})"
            )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    # -- staging ---------------------------------------------------------------------------
    def stage(
        self,
        items: Iterable[tuple[str, dict[str, Any], bytes]],
        present_sources: Callable[[], set[str]],
        fhir_version: str = "R4",
    ) -> StageResult:
        """Record this run's mapped resources; mark removals. ``items``: (source, resource, body).

        A record is removed when its source file was present in this run and it was not
        emitted: retracted (entered-in-error) where the type has that status, else deleted.
        """
        result = StageResult()
        existing = {
            (r[0], r[1]): (r[2], r[3], r[4])
            for r in self.db.execute("SELECT rtype, bkey, hash, state, sent_hash FROM resources")
        }
        seen: set[tuple[str, str]] = set()
        seq = 0
        with self.transaction():
            for source, resource, body in items:
                seq += 1
                rtype = str(resource["resourceType"])
                tag = resource["meta"]["tag"][0]
                bkey = f"{tag['system']}|{tag['code']}"
                key = (rtype, bkey)
                seen.add(key)
                digest = content_hash(body)
                old = existing.get(key)
                if old is None:
                    result.new += 1
                    self.db.execute(
                        "INSERT INTO resources (rtype, bkey, local_id, seq, source, body, hash, "
                        "state) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
                        (rtype, bkey, str(resource["id"]), seq, source, body, digest),
                    )
                    continue
                old_hash, state, sent_hash = old
                landed = state == "sent" and sent_hash == digest
                if landed:
                    result.unchanged += 1
                    self.db.execute(
                        "UPDATE resources SET seq = ?, source = ? WHERE rtype = ? AND bkey = ?",
                        (seq, source, rtype, bkey),
                    )
                elif state == "dead" and old_hash == digest:
                    result.unchanged += 1  # still rejected; `dead-letters retry` re-queues it
                elif state == "sending":
                    # outcome of an earlier send unknown: keep the state, refresh the content
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
                        "state = 'pending', retracted = 0, attempts = 0 "
                        "WHERE rtype = ? AND bkey = ?",
                        (seq, source, body, digest, rtype, bkey),
                    )
            # asked only now: which files were complete is known once they were read
            self._removals(
                existing, seen, present_sources(), seq, result, RETRACTABLE[fhir_version]
            )
        return result

    def _removals(
        self,
        existing: dict[tuple[str, str], tuple[str, str, str | None]],
        seen: set[tuple[str, str]],
        present_sources: set[str],
        seq: int,
        result: StageResult,
        retractable: frozenset[str],
    ) -> None:
        for rtype, bkey in existing.keys() - seen:
            row = self.row(rtype, bkey)
            if row is None or row.source not in present_sources:
                continue
            if row.state in ("tombstone", "delete") or row.retracted:
                continue
            seq += 1
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
        """Rows waiting for a reference target that has no server id (e.g. dead-lettered)."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM resources "
            "WHERE state = 'pending' AND last_error LIKE 'waits for%'"
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
        with self.transaction():
            for row in rows:
                if row.state != "delete":
                    self.db.execute(
                        "UPDATE resources SET state = 'sending', attempts = attempts + 1 "
                        "WHERE rtype = ? AND bkey = ?",
                        (row.rtype, row.bkey),
                    )
                    row.state = "sending"

    def mark_sent(self, row: Row, server_id: str, version: str | None) -> None:
        self.db.execute(
            "UPDATE resources SET state = 'sent', server_id = ?, version_id = ?, sent_hash = ?, "
            "last_error = NULL WHERE rtype = ? AND bkey = ?",
            (server_id, version, row.hash, row.rtype, row.bkey),
        )
        self.db.execute(
            "DELETE FROM dead_letters WHERE rtype = ? AND bkey = ?", (row.rtype, row.bkey)
        )

    def mark_deleted(self, row: Row) -> None:
        self.db.execute(
            "UPDATE resources SET state = 'tombstone', server_id = NULL, version_id = NULL, "
            "sent_hash = NULL "
            "WHERE rtype = ? AND bkey = ?",
            (row.rtype, row.bkey),
        )

    def mark_dead(self, row: Row, status: int | None, message: str, outcome: Any) -> None:
        self.db.execute(
            "UPDATE resources SET state = 'dead', last_error = ? WHERE rtype = ? AND bkey = ?",
            (message, row.rtype, row.bkey),
        )
        self.db.execute(
            "INSERT INTO dead_letters (rtype, bkey, status, message, outcome) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (rtype, bkey) DO UPDATE SET "
            "status = excluded.status, message = excluded.message, outcome = excluded.outcome",
            (
                row.rtype,
                row.bkey,
                status,
                message,
                orjson.dumps(outcome).decode() if outcome is not None else None,
            ),
        )

    def mark_pending(
        self, row: Row, *, forget_server: bool = False, error: str | None = None
    ) -> None:
        forget = ", server_id = NULL, version_id = NULL" if forget_server else ""
        self.db.execute(
            f"UPDATE resources SET state = 'pending', last_error = ?{forget} "  # noqa: S608 - constant
            "WHERE rtype = ? AND bkey = ?",
            (error, row.rtype, row.bkey),
        )

    # -- dead letters ------------------------------------------------------------------------
    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            {
                "resourceType": r[0],
                "key": r[1],
                "status": r[2],
                "message": r[3],
                "outcome": orjson.loads(r[4]) if r[4] else None,
            }
            for r in self.db.execute(
                "SELECT rtype, bkey, status, message, outcome FROM dead_letters "
                "ORDER BY rtype, bkey"
            )
        ]

    def retry_dead(self) -> int:
        with self.transaction():
            n = self.db.execute(
                "UPDATE resources SET state = 'pending', attempts = 0 WHERE state = 'dead'"
            ).rowcount
        return int(n)

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
        sends nothing. A row with a change of its own still to send is left alone (False).
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
            if row.state not in ("sent", "tombstone"):
                return False
            self.db.execute(
                "UPDATE resources SET body = ?, hash = ?, sent_hash = ?, state = 'sent', "
                "server_id = ?, version_id = ?, retracted = 0, last_error = NULL "
                "WHERE rtype = ? AND bkey = ?",
                (body, digest, digest, server_id, version, rtype, bkey),
            )
        return True

