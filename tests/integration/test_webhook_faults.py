"""Nothing the webhook answered 202 for is lost: not when the FHIR server is unreachable, not
when `fhir-adapter serve` is SIGKILLed. Real processes: `serve` (gunicorn, its web workers and
the delivery worker) in front of the fault proxy of tests/faultproxy.py, the real server behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import requests

from fhir_adapter.sync.inbox import Inbox
from tests.faultproxy import FaultProxy
from tests.integration.conftest import (
    IDENTIFIER_BASE,
    FhirView,
    ServeProcess,
    stored_problems,
    wait_for,
)
from tests.webhook_helpers import masi, participant

TYPES = [
    "Patient", "ResearchSubject", "Consent", "Encounter", "Observation", "Practitioner",
    "Provenance", "ResearchStudy", "Group", "Organization", "Location", "Substance", "Device",
    "CodeSystem", "Measure",
]  # fmt: skip
CLOSE = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2)  # MASI 18.4
FAR = (2, 2, 1, 3, 3, 2, 3, 3, 2, 1, 1, 1)  # MASI 8.6


def observation_value(view: FhirView, value: str) -> float | None:
    found = view.search("Observation", {"identifier": f"{IDENTIFIER_BASE}observation|{value}"})
    return found[0]["valueQuantity"]["value"] if len(found) == 1 else None


def inbox_states(outbox: Path) -> dict[str, str]:
    with Inbox(outbox) as inbox:
        return {f"{r.kind}/{r.key}": r.state for r in inbox.rows()}


def test_server_unreachable_then_healed_everything_arrives(
    fault_proxy: FaultProxy,
    fhir_view: FhirView,
    tmp_path: Path,
    serve_process: Callable[..., ServeProcess],
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    fault_proxy.refuse_connections()
    serve = serve_process(fault_proxy.base_url, outbox)

    assert serve.post("participants", [participant("S001"), participant("S002")]).status_code == 202
    records = [
        masi(s, "m3", r, v) for s in ("S001", "S002") for r, v in (("R1", CLOSE), ("R2", FAR))
    ]
    assert serve.post("masi", records).status_code == 202
    ready = requests.get(f"{serve.url}/readyz", timeout=10)
    assert (ready.status_code, ready.json()["fhir_server"]) == (503, "unreachable")
    time.sleep(2)  # the worker has tried and failed meanwhile
    assert fhir_view.counts(["Patient", "Observation"]) == {}
    assert set(inbox_states(outbox).values()) == {"pending"}

    fault_proxy.heal()
    wait_for(lambda: observation_value(fhir_view, "S002-m3-masi") == 13.5, timeout=90)
    wait_for(lambda: set(inbox_states(outbox).values()) == {"delivered"}, timeout=30)
    assert observation_value(fhir_view, "S001-m3-masi") == 13.5
    assert fhir_view.count("Patient") == 2
    assert fhir_view.count("Observation") == 4 + 2 * 2  # raters + consensus and mMASI
    assert stored_problems(fhir_view, TYPES) == {}


def test_sigkill_after_the_202_then_restart_the_record_arrives(
    fault_proxy: FaultProxy,
    fhir_view: FhirView,
    tmp_path: Path,
    serve_process: Callable[..., ServeProcess],
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    fault_proxy.refuse_connections()  # so the record cannot have left before the kill
    serve = serve_process(fault_proxy.base_url, outbox)
    assert serve.post("participants", participant("S001")).status_code == 202
    assert serve.post("masi", masi("S001", "baseline", "R1", CLOSE)).status_code == 202
    serve.kill()  # SIGKILL: master, web workers and delivery worker, no clean-up at all

    fault_proxy.heal()
    assert fhir_view.counts(["Patient", "Observation"]) == {}
    serve_process(fault_proxy.base_url, outbox)  # same outbox; the locks died with the process
    wait_for(lambda: observation_value(fhir_view, "S001-baseline-masi-R1") == 18.4, timeout=90)
    wait_for(lambda: observation_value(fhir_view, "S001-baseline-masi") == 18.4, timeout=30)
    assert stored_problems(fhir_view, TYPES) == {}


def test_sigkill_while_delivering_loses_and_duplicates_nothing(
    fhir_view: FhirView,
    tmp_path: Path,
    serve_process: Callable[..., ServeProcess],
) -> None:
    """Killed at once after the 202s, whatever the delivery worker was doing at that moment."""
    outbox = tmp_path / "outbox.sqlite"
    serve = serve_process(fhir_view.base_url, outbox)
    subjects = [f"S{i:03d}" for i in range(1, 21)]
    assert serve.post("participants", [participant(s) for s in subjects]).status_code == 202
    rows = [masi(s, "baseline", r, v) for s in subjects for r, v in (("R1", CLOSE), ("R2", FAR))]
    assert serve.post("masi", rows).status_code == 202
    time.sleep(0.3)
    serve.kill()

    serve_process(fhir_view.base_url, outbox)
    wait_for(lambda: set(inbox_states(outbox).values()) == {"delivered"}, timeout=120)
    assert fhir_view.count("Patient") == 20
    assert all(observation_value(fhir_view, f"{s}-baseline-masi") == 13.5 for s in subjects)
    assert stored_problems(fhir_view, TYPES) == {}
