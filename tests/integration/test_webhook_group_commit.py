"""`fhir-adapter serve` answers 202 only after the commit that holds the records (group commit
across its threads): while the commit cannot happen nobody is answered, and a SIGKILL then
loses nothing that was answered (nobody was) and keeps nothing half-written.

The test holds the outbox database's write lock from a connection of its own, as another
writer process would: the web workers' commit waits (busy timeout) until it is free.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from fhir_adapter.sync.inbox import Inbox
from tests.integration.conftest import ServeProcess
from tests.webhook_helpers import JSON, body_of, hmac_headers, masi, participant

REQUESTS = 6


def _post_all(serve: ServeProcess, records: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    results: list[Any] = [None] * len(records)

    def post(i: int) -> None:
        body = body_of(records[i])
        try:
            results[i] = requests.post(
                f"{serve.url}/ingest/masi", data=body, timeout=60,
                headers={**JSON, **hmac_headers(body)},
            )  # fmt: skip
        except requests.ConnectionError as exc:
            results[i] = exc

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(records))]
    for t in threads:
        t.start()
    return threads, results


def test_no_202_before_the_commit_and_a_kill_keeps_nothing_unanswered(
    fhir_reset: str, tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    serve = serve_process(fhir_reset, outbox, None, "--no-worker")
    assert serve.post("participants", participant("S000")).status_code == 202
    records = [masi(f"S{i:03d}") for i in range(1, REQUESTS + 1)]
    other = sqlite3.connect(str(outbox), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the commit of every web worker must wait for this
    try:
        threads, results = _post_all(serve, records)
        time.sleep(2.0)
        assert results == [None] * REQUESTS  # no answer: the records are not committed yet
        serve.kill()  # SIGKILL master and workers while the requests wait for their commit
        for t in threads:
            t.join(timeout=60)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert all(isinstance(r, requests.ConnectionError) for r in results), results
    with Inbox(outbox) as inbox:
        assert [r.key for r in inbox.rows()] == ["S000"]  # nothing of the unanswered ones

    again = serve_process(fhir_reset, outbox, None, "--no-worker")
    threads, results = _post_all(again, records)  # the sender retries: fresh signatures
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in results] == [202] * REQUESTS
    with Inbox(outbox) as inbox:
        assert sorted(r.key for r in inbox.rows()) == ["S000"] + [
            f"S{i:03d}/baseline/R1" for i in range(1, REQUESTS + 1)
        ]
