"""`fhir-adapter serve` as a hospital's integration team meets it: it refuses to run open, each
authentication scheme works over real HTTP, errors carry no stack trace and no submitted value,
and a sentinel personal value never reaches its logs (DEBUG included). Then a bounded loopback
load test: no 5xx, and the inbox holds exactly what was accepted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from fhir_adapter.sync.inbox import Inbox
from tests.integration.conftest import FHIR_ADAPTER, ServeProcess, adapter_env, free_port
from tests.webhook_helpers import (
    JSON,
    bearer_headers,
    body_of,
    hmac_headers,
    masi,
    medplum_headers,
    participant,
    standard_headers,
)

SENTINEL_MRN = "SENTINEL-MRN-93c1"
SENTINEL_TEXT = "SENTINEL-REASON-93c1"


def test_serve_refuses_to_start_without_credentials(fhir_server: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(FHIR_ADAPTER), "serve", "--bind", f"127.0.0.1:{free_port()}", "--server",
         fhir_server, "--outbox", str(tmp_path / "o.sqlite")],
        capture_output=True, text=True, env=adapter_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 66, done.stderr
    assert "refusing to serve without authentication" in done.stderr
    assert "FHIR_ADAPTER_WEBHOOK_TOKEN" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_rejects_a_bad_bind(fhir_server: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(FHIR_ADAPTER), "serve", "--bind", "nowhere", "--server", fhir_server],
        capture_output=True, text=True, timeout=60, check=False,
        env=adapter_env({"FHIR_ADAPTER_WEBHOOK_TOKEN": "t"}),
    )  # fmt: skip
    assert done.returncode == 66
    assert "HOST:PORT" in done.stderr


def test_a_second_worker_on_the_same_outbox_refuses(
    fhir_reset: str, tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    serve_process(fhir_reset, outbox)
    time.sleep(1)  # its delivery worker holds the outbox
    done = subprocess.run(
        [str(FHIR_ADAPTER), "worker", "--server", fhir_reset, "--outbox", str(outbox)],
        capture_output=True, text=True, env=adapter_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 66, done.stderr
    assert "another delivery worker is already running" in done.stderr


def test_every_scheme_over_http_and_no_personal_value_in_logs(
    fhir_reset: str, tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    serve = serve_process(
        fhir_reset, tmp_path / "outbox.sqlite", {"FHIR_ADAPTER_LOG_LEVEL": "DEBUG"}
    )
    url = f"{serve.url}/ingest/participants"
    good = participant("S001", mrn=SENTINEL_MRN)
    good["withdrawal_reason"] = SENTINEL_TEXT
    body = body_of(good)
    answers = {
        "hmac": requests.post(url, data=body, headers={**JSON, **hmac_headers(body)}, timeout=30),
        "standard": requests.post(url, data=body, headers={**JSON, **standard_headers(body)},
                                  timeout=30),
        "bearer": requests.post(url, data=body, headers={**JSON, **bearer_headers()}, timeout=30),
    }  # fmt: skip
    assert {k: r.status_code for k, r in answers.items()} == {
        "hmac": 202, "standard": 202, "bearer": 202
    }  # fmt: skip
    notify = b'{"resourceType": "Patient", "id": "x"}'
    medplum = requests.post(f"{serve.url}/fhir/notify", data=notify, timeout=30,
                            headers={"Content-Type": "application/fhir+json",
                                     **medplum_headers(notify)})  # fmt: skip
    assert (medplum.status_code, medplum.content) == (200, b"")

    refused: list[requests.Response] = []
    bad = body_of(participant("S002", mrn=SENTINEL_MRN, sex=SENTINEL_TEXT))
    refused.append(requests.post(url, data=bad, headers={**JSON, **bearer_headers()}, timeout=30))
    refused.append(requests.post(url, data=bad, headers=JSON, timeout=30))
    refused.append(
        requests.post(url, data=body, headers={**JSON, **hmac_headers(body)}, timeout=30)
    )
    refused.append(
        requests.post(
            url,
            data=b"{" + SENTINEL_TEXT.encode(),
            headers={**JSON, **bearer_headers()},
            timeout=30,
        )
    )
    big = b"[" + b",".join([body] * 6000) + b"]"
    refused.append(requests.post(url, data=big, headers={**JSON, **bearer_headers()}, timeout=30))
    chunked = requests.post(url, data=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
                            headers={**JSON, **bearer_headers()}, timeout=30)  # fmt: skip
    refused.append(chunked)
    assert [r.status_code for r in refused] == [422, 401, 401, 400, 413, 413]
    for response in refused:
        assert response.headers["Content-Type"].startswith("application/fhir+json")
        assert response.json()["resourceType"] == "OperationOutcome"
        for leaked in ("Traceback", SENTINEL_MRN, SENTINEL_TEXT, 'File "'):
            assert leaked not in response.text

    time.sleep(1.5)  # the delivery worker has mapped and sent the accepted record meanwhile
    serve.stop()
    logged = serve.log.read_text()
    assert "ingest participants" in logged  # DEBUG logging was on
    assert SENTINEL_MRN not in logged
    assert SENTINEL_TEXT not in logged
    assert "Traceback" not in logged


# -- load -----------------------------------------------------------------------------------------
CLIENTS = 4
REQUESTS = 5000


def _client(
    serve: ServeProcess, jobs: list[tuple[str, dict[str, Any]]], out: list[tuple[int, float]]
) -> None:
    session = requests.Session()
    for kind, record in jobs:
        body = body_of(record)
        started = time.perf_counter()
        response = session.post(
            f"{serve.url}/ingest/{kind}", data=body, headers={**JSON, **hmac_headers(body)},
            timeout=60,
        )  # fmt: skip
        out.append((response.status_code, time.perf_counter() - started))
    session.close()


def test_bounded_loopback_load(
    fhir_reset: str, tmp_path: Path, serve_process: Callable[..., ServeProcess]
) -> None:
    """5,000 signed requests from 4 concurrent clients (loopback only, bounded in count): no
    5xx, and the inbox holds one row per accepted record. Throughput and p99 are reported
    (stderr and the test's properties), not asserted: performance claims belong to benchmarks/."""
    outbox = tmp_path / "outbox.sqlite"
    serve = serve_process(fhir_reset, outbox, None, "--no-worker")
    subjects = [f"L{i:04d}" for i in range(1, 1001)]
    jobs: list[tuple[str, dict[str, Any]]] = [("participants", participant(s)) for s in subjects]
    jobs += [("masi", masi(s, v, "R1")) for s in subjects for v in ("baseline", "m1", "m2", "m3")]
    assert len(jobs) == REQUESTS
    results: list[list[tuple[int, float]]] = [[] for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=_client, args=(serve, jobs[i::CLIENTS], results[i]))
        for i in range(CLIENTS)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.perf_counter() - started
    answers = [r for rs in results for r in rs]
    assert len(answers) == REQUESTS
    statuses = {s for s, _ in answers}
    assert not [s for s in statuses if s >= 500]
    accepted = sum(1 for s, _ in answers if s == 202)
    assert accepted == REQUESTS, statuses
    with Inbox(outbox) as inbox:
        assert len(inbox.rows()) == accepted
        assert sum(v for k, v in inbox.counters().items() if k.startswith("accepted:")) == accepted
    latencies = sorted(t for _, t in answers)
    figures = {
        "requests": REQUESTS,
        "clients": CLIENTS,
        "workers": 2,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(REQUESTS / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[int(0.99 * len(latencies)) - 1] * 1000, 1),
    }
    sys.stderr.write(f"webhook load test: {json.dumps(figures)}\n")
    (Path(os.environ.get("WEBHOOK_LOAD_REPORT", tmp_path / "load.json"))).write_text(
        json.dumps(figures)
    )
