"""Group commit of the inbox: concurrent requests of one process share a commit, each keeps
its all-or-none rule, and nobody is answered before the commit that holds its records.

Real SQLite files throughout. To make a batch deterministic, the test holds the database's
write lock from a connection of its own: the leader then waits in ``BEGIN IMMEDIATE`` while the
other requests queue, and takes all of them once the lock is free. Held longer than the
inbox's busy timeout, the same lock makes the commit fail.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from fhir_adapter.sync.inbox import (
    Accepted,
    Claim,
    Inbox,
    InboxConflict,
    InboxUnavailable,
    Replayed,
    ThreadInboxes,
)
from server.state import EXTENSION
from tests.webhook_helpers import JSON, bearer_headers, body_of, masi

THREADS = 8


@contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Hold the database's write lock (another writer, as a second process would be)."""
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def in_threads(calls: list[Callable[[], Any]]) -> tuple[list[threading.Thread], list[Any]]:
    """Start each call in a thread; the list gets each one's result or exception."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the test looks at it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, results


def wait_queued(inboxes: ThreadInboxes, n: int) -> None:
    deadline = time.monotonic() + 10
    while inboxes.group.waiting() < n:
        assert time.monotonic() < deadline, f"only {inboxes.group.waiting()} of {n} queued"
        time.sleep(0.01)


def accept(inboxes: ThreadInboxes, record: dict[str, Any], *claims: Claim) -> list[Accepted]:
    return inboxes.get().accept("masi", [record], claims=claims)


def test_concurrent_requests_are_all_committed_and_readable(tmp_path: Path) -> None:
    inboxes = ThreadInboxes(tmp_path / "outbox.sqlite")
    records = [masi(f"S{s:03d}", v, r) for s in range(1, 11) for v in ("m1", "m2") for r in
               ("R1", "R2", "R3")]  # fmt: skip
    per_thread = [records[i::THREADS] for i in range(THREADS)]
    threads, results = in_threads(
        [lambda rs=rs: [accept(inboxes, r) for r in rs] for rs in per_thread]
    )
    for t in threads:
        t.join(timeout=60)
    assert not [r for r in results if isinstance(r, Exception)]
    assert inboxes.group.requests == len(records)
    with Inbox(inboxes.path) as fresh:  # a connection of its own: what was committed
        rows = fresh.rows()
        assert sorted(r.key for r in rows) == sorted(
            f"{r['subject_id']}/{r['visit']}/{r['rater_id']}" for r in records
        )
        assert {r.state for r in rows} == {"pending"}
        assert fresh.counters()["accepted:masi"] == len(records)
        assert sorted(r.seq for r in rows) == list(range(1, len(records) + 1))


def test_requests_waiting_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    inboxes = ThreadInboxes(tmp_path / "outbox.sqlite")
    accept(inboxes, masi("S000"))  # the tables exist, the connection is open
    before = inboxes.group.batches
    with write_locked(inboxes.path):
        threads, results = in_threads(
            [lambda i=i: accept(inboxes, masi(f"S{i:03d}")) for i in range(1, THREADS + 1)]
        )
        wait_queued(inboxes, THREADS)
        time.sleep(0.2)
        assert results == [None] * THREADS  # nobody answered while the commit cannot happen
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, list) and r[0].changed for r in results), results
    assert inboxes.group.batches == before + 1  # one transaction, one fsync, for all eight
    with Inbox(inboxes.path) as fresh:
        assert len(fresh.rows()) == THREADS + 1


def test_a_refused_request_in_a_batch_fails_only_itself(tmp_path: Path) -> None:
    inboxes = ThreadInboxes(tmp_path / "outbox.sqlite")
    used = Claim("hmac", "ab" * 32, 600)
    accept(inboxes, masi("S000"), used)
    rater_claims = [Claim("hmac", f"{i:064x}", 600) for i in range(4)]
    with write_locked(inboxes.path):
        threads, results = in_threads(
            [
                *(
                    lambda i=i, r=r: accept(inboxes, masi("S001", "m1", r), rater_claims[i])
                    for i, r in enumerate(("R1", "R2", "R3", "R4"))  # four raters: one too many
                ),
                lambda: accept(inboxes, masi("S002"), used),  # a replayed signature
                lambda: accept(inboxes, masi("S003"), Claim("hmac", "cd" * 32, 600)),
            ]
        )
        wait_queued(inboxes, 6)
    for t in threads:
        t.join(timeout=60)
    raters = results[:4]
    # which rater came fourth depends on the threads' order: exactly one is refused
    assert sum(isinstance(r, InboxConflict) for r in raters) == 1, raters
    assert sum(isinstance(r, list) for r in raters) == 3, raters
    assert isinstance(results[4], Replayed)
    assert isinstance(results[5], list)
    with Inbox(inboxes.path) as fresh:
        keys = {r.key for r in fresh.rows()}
        assert len([k for k in keys if k.startswith("S001/m1/")]) == 3
        assert "S002/baseline/R1" not in keys  # the replay kept nothing
        assert "S003/baseline/R1" in keys
        assert fresh.counters()["accepted:masi"] == 1 + 3 + 1
        # the refused rater's signature was written before its refusal, and rolled back
        claimed = [fresh.seen(c.scheme, c.token) for c in rater_claims]
        assert claimed == [isinstance(r, list) for r in raters]


def test_a_failed_commit_fails_the_whole_batch_and_keeps_nothing(tmp_path: Path) -> None:
    inboxes = ThreadInboxes(tmp_path / "outbox.sqlite", timeout_s=0.5)
    accept(inboxes, masi("S000"))
    claims = [Claim("hmac", f"{i:064x}", 600) for i in range(THREADS)]
    with write_locked(inboxes.path):  # longer than the busy timeout: the commit fails
        threads, results = in_threads(
            [lambda i=i: accept(inboxes, masi(f"S{i + 1:03d}"), claims[i]) for i in range(THREADS)]
        )
        for t in threads:
            t.join(timeout=60)
    assert all(isinstance(r, InboxUnavailable) for r in results), results
    with Inbox(inboxes.path) as fresh:
        assert [r.key for r in fresh.rows()] == ["S000/baseline/R1"]
        assert fresh.counters()["accepted:masi"] == 1
        assert not any(fresh.seen(c.scheme, c.token) for c in claims)  # the signatures too
    # nothing of it stayed behind: the same requests (same signatures) go through now
    assert all(accept(inboxes, masi(f"S{i + 1:03d}"), claims[i])[0].changed for i in range(3))


def test_no_202_before_the_commit_and_503_when_it_fails(webhook_app: Flask) -> None:
    st = webhook_app.extensions[EXTENSION]
    st.inboxes = ThreadInboxes(st.settings.outbox_path, timeout_s=0.5)
    client = webhook_app.test_client()

    def post(record: dict[str, Any]) -> Any:
        return client.post(
            "/ingest/masi", data=body_of(record), headers={**JSON, **bearer_headers()}
        )

    assert post(masi("S000")).status_code == 202
    with write_locked(st.settings.outbox_path):
        threads, results = in_threads([lambda i=i: post(masi(f"S{i:03d}")) for i in (1, 2, 3)])
        time.sleep(0.2)
        assert results == [None, None, None]  # no answer while the commit cannot happen
        for t in threads:
            t.join(timeout=60)
    for response in results:
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        outcome = response.get_json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "transient"
    with Inbox(st.settings.outbox_path) as fresh:
        assert [r.key for r in fresh.rows()] == ["S000/baseline/R1"]
    assert post(masi("S001")).status_code == 202


@pytest.mark.parametrize("n", [1, 3])
def test_a_lone_request_is_its_own_batch(tmp_path: Path, n: int) -> None:
    with Inbox(tmp_path / "outbox.sqlite") as inbox:  # no shared group: the notify path's
        for i in range(n):
            assert inbox.accept("masi", [masi(f"S{i:03d}")])[0].changed
        assert inbox._group.batches == n
        assert len(inbox.rows()) == n


def test_a_leader_failing_after_it_took_the_batch_leaves_nobody_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a database error: the file lock's release fails after the commit (an OS fault,
    simulated). Every request of the batch is answered (an error: it retries, and the retry
    is an unchanged update, not a duplicate); nobody waits for ever."""
    import fcntl

    inboxes = ThreadInboxes(tmp_path / "outbox.sqlite")
    accept(inboxes, masi("S000"))
    real_flock = fcntl.flock
    failed = threading.Event()

    def flock(fd: int, op: int) -> None:
        real_flock(fd, op)
        if op == fcntl.LOCK_UN and not failed.is_set():
            failed.set()
            raise OSError("simulated")

    with write_locked(inboxes.path):
        threads, results = in_threads(
            [lambda i=i: accept(inboxes, masi(f"S{i:03d}")) for i in range(1, 5)]
        )
        wait_queued(inboxes, 4)
        monkeypatch.setattr(fcntl, "flock", flock)
    for t in threads:
        t.join(timeout=30)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(r, OSError) for r in results), results
    assert failed.is_set()
    again = [accept(inboxes, masi(f"S{i:03d}"))[0] for i in range(1, 5)]
    assert [a.changed for a in again] == [False] * 4  # they had been committed
    with Inbox(inboxes.path) as fresh:
        assert len(fresh.rows()) == 5
