"""Webhook: ``POST /ingest/masi`` with durable writes against a bare Flask endpoint answering 202.

Both run under the very same gunicorn application ``fhir-adapter serve`` builds
(:func:`fhir_adapter.cli.serve.gunicorn_app`: gthread, worker processes and threads from
Settings), on loopback, driven by the same load generator: a bounded number of client threads,
each with its own keep-alive ``http.client`` connection, each request one signed MASI record (SPEC
§13 HMAC, signed before the clock starts, every signature used once). The adapter's side is the
real thing: authentication, the replay cache, the intake's validation, the inbox commit (WAL,
``synchronous=FULL``) before the ``202``. Rounds alternate (bare, ingest, bare, ingest, …) so
a noisy neighbour on the machine hurts both.

``webhook_ratio_vs_bare`` = ingest requests/s / bare requests/s: the median over the rounds of
each round's pair (under the same load); the rates are each side's median round. Run alone with
``python -m benchmarks --only webhook_bench [--quick]``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import requests

from benchmarks.common import Bench
from fhir_adapter.sync.inbox import Inbox

SECRET = "bench-webhook-secret-0123456789"  # noqa: S105 - a throwaway secret of this run
CONCURRENCY = 8  # client threads: as many as the server's workers x threads (2 x 4)
VISITS = ("baseline", "m1", "m2", "m3")
RATERS = ("R1", "R2", "R3")
SCORES = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2)
REGIONS = ("forehead", "right_malar", "left_malar", "chin")

Job = tuple[bytes, dict[str, str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "FHIR_ADAPTER_WEBHOOK_SECRET": SECRET,
        "FHIR_ADAPTER_WEBHOOK_WORKERS": "2",
        "FHIR_ADAPTER_WEBHOOK_THREADS": "4",
        "FHIR_ADAPTER_LOG_LEVEL": "WARNING",
    }


def masi_record(n: int) -> dict[str, Any]:
    """The n-th distinct valid MASI row: 12 per subject (4 visits x 3 raters)."""
    subject, rest = divmod(n, len(VISITS) * len(RATERS))
    visit, rater = divmod(rest, len(RATERS))
    record: dict[str, Any] = {
        "subject_id": f"B{subject + 1:05d}",
        "visit": VISITS[visit],
        "rater_id": RATERS[rater],
        "assessed_on": "2025-01-15",
    }
    scores = iter(SCORES)
    for region in REGIONS:
        for part in ("d", "h", "a"):
            record[f"{region}_{part}"] = next(scores)
    return record


def signed_jobs(first: int, count: int) -> list[Job]:
    """Signed requests (SPEC §13 headers) of one record each: records first .. first + count - 1."""
    jobs = []
    ts = str(int(time.time()))
    for n in range(first, first + count):
        body = orjson.dumps(masi_record(n))
        digest = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-Timestamp": ts,
            "X-Signature": f"sha256={digest}",
        }
        jobs.append((body, headers))
    return jobs


def load(url: str, jobs: Sequence[Job], concurrency: int) -> tuple[float, list[int], list[float]]:
    """Post every job with ``concurrency`` keep-alive clients: (seconds, statuses, latencies).

    Each client is one ``http.client`` connection: a load generator a few times cheaper per
    request than ``requests``, so on a small machine the bare endpoint's rate is the server's,
    not the client's.
    """
    parts = urlsplit(url)
    statuses: list[list[int]] = [[] for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        try:
            for body, headers in jobs[i::concurrency]:
                started = time.perf_counter()
                conn.request("POST", parts.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                latencies[i].append(time.perf_counter() - started)
                statuses[i].append(response.status)
                if response.will_close:
                    conn.close()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return seconds, [s for ss in statuses for s in ss], [t for ts in latencies for t in ts]


@contextmanager
def served(argv: list[str], port: int, log: Path) -> Iterator[str]:
    """A server process on ``port`` until the block ends; yields its base URL."""
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            argv, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(q * len(ordered)) - 1)]


def run(bench: Bench) -> dict[str, Any]:
    per_round = 600 if bench.quick else 1500
    rounds = 5 if bench.quick else 9
    warmup = 200
    scratch = bench.scratch("webhook")
    outbox = scratch / "outbox.sqlite"
    for suffix in ("", "-wal", "-shm", ".inbox-queue"):
        Path(f"{outbox}{suffix}").unlink(missing_ok=True)
    ingest_port, bare_port = _free_port(), _free_port()
    ingest_argv = [
        sys.executable, "-m", "fhir_adapter", "serve", "--no-worker",
        "--bind", f"127.0.0.1:{ingest_port}", "--server", "http://127.0.0.1:9/fhir",
        "--outbox", str(outbox),
    ]  # fmt: skip
    bare_argv = [sys.executable, "-m", "benchmarks.webhook_bench", f"127.0.0.1:{bare_port}"]
    rates: dict[str, list[float]] = {"ingest": [], "bare": []}
    lat: dict[str, list[float]] = {"ingest": [], "bare": []}
    sent = {"ingest": 0, "bare": 0}
    n = 0
    log = scratch / "servers.log"
    with served(ingest_argv, ingest_port, log) as ingest, served(bare_argv, bare_port, log) as bare:
        urls = {"ingest": f"{ingest}/ingest/masi", "bare": f"{bare}/ingest/masi"}
        for side, url in urls.items():  # warm both (imports, connections, SQLite pages)
            _, statuses, _ = load(url, signed_jobs(n, warmup), CONCURRENCY)
            n += warmup
            if set(statuses) != {202}:
                raise RuntimeError(f"{side} warm-up answered {sorted(set(statuses))}")
        for r in range(rounds):
            for side in ("bare", "ingest"):
                jobs = signed_jobs(n, per_round)
                n += per_round
                seconds, statuses, latencies = load(urls[side], jobs, CONCURRENCY)
                if set(statuses) != {202}:
                    raise RuntimeError(f"{side} answered {sorted(set(statuses))}")
                rates[side].append(per_round / seconds)
                lat[side] += latencies
                sent[side] += per_round
            bench.say(
                f"webhook round {r + 1}: bare {rates['bare'][-1]:.0f}/s, "
                f"ingest {rates['ingest'][-1]:.0f}/s"
            )
    with Inbox(outbox) as inbox:  # every 202 is a committed row (warm-up and rounds)
        kept = len(inbox.rows())
    if kept != sent["ingest"] + warmup:
        raise RuntimeError(f"the inbox holds {kept} rows for {sent['ingest'] + warmup} 202s")
    # the machine's load drifts: each round's pair (bare then ingest, seconds apart) gives a
    # ratio under the same load; the figure is their median
    pairs = [i / b for b, i in zip(rates["bare"], rates["ingest"], strict=True)]
    ratio = statistics.median(pairs)
    ingest_rps = statistics.median(rates["ingest"])
    bare_rps = statistics.median(rates["bare"])
    bench.say(f"webhook: ingest {ingest_rps:.0f}/s, bare {bare_rps:.0f}/s, ratio {ratio:.3f}")
    return {
        "webhook_ratio_vs_bare": ratio,
        "webhook_round_ratios": [round(p, 3) for p in pairs],
        "webhook_ingest_rps": ingest_rps,
        "webhook_bare_rps": bare_rps,
        "webhook_ingest_p50_ms": 1000 * _percentile(lat["ingest"], 0.50),
        "webhook_ingest_p99_ms": 1000 * _percentile(lat["ingest"], 0.99),
        "webhook_bare_p50_ms": 1000 * _percentile(lat["bare"], 0.50),
        "webhook_bare_p99_ms": 1000 * _percentile(lat["bare"], 0.99),
        "webhook_requests_ingest": sent["ingest"],
        "webhook_requests_bare": sent["bare"],
        "webhook_rounds": rounds,
        "webhook_concurrency": CONCURRENCY,
        "webhook_workers": 2,
        "webhook_threads": 4,
        "webhook_wsgi_server": f"gunicorn {version('gunicorn')} gthread",
        "webhook_records_per_request": 1,
        "webhook_inbox_rows": kept,
        "webhook_load_average": [round(x, 2) for x in os.getloadavg()],
    }


# -- the bare endpoint: python -m benchmarks.webhook_bench HOST:PORT ---------------------------
def bare_app(settings: Any) -> Any:
    """A Flask app that reads the body and answers 202 (and /healthz 200): nothing else."""
    from flask import Flask, Response, request

    app = Flask("bare")

    @app.post("/ingest/masi")
    def ingest() -> Response:
        request.get_data()
        return Response(b'{"accepted":1}', status=202, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok", status=200)

    return app


def _serve_bare(bind: str) -> None:
    from fhir_adapter.cli.serve import gunicorn_app
    from fhir_adapter.settings import Settings

    host, port = bind.rsplit(":", 1)
    gunicorn_app(Settings(), host, int(port), lambda: None, factory=bare_app).run()


if __name__ == "__main__":
    _serve_bare(sys.argv[1])
