"""Where Medplum and HAPI FHIR JPA differ, shown with plain HTTP, and what the sync makes of it.

Each test runs once per server (`target_server`: Medplum's engine, HAPI FHIR JPA 8.8.0), each
emptied first, and asserts that server's own behaviour; the sync suites (test_sync.py,
test_sync_crash.py, test_sync_fault_proxy.py) then hold the adapter to the same guarantees on
both. Found so far:

=================================  ==========================  ==============================
behaviour                          Medplum (test server)       HAPI FHIR JPA 8.8.0
=================================  ==========================  ==============================
transaction, one entry invalid     that entry refused, the     the whole transaction refused
                                   rest applied (not atomic)   (400), nothing applied
reference to a missing resource    stored as it is (dangling)  refused (HAPI-1094)
``_tag=system|`` (system only)     answered                    refused (HAPI-1218)
identical update (``PUT``)         a new version               no new version
delete of a referenced resource    done (references dangle)    refused: 409
read of a deleted resource         404                         410 Gone
=================================  ==========================  ==============================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import requests

from fhir_adapter.client import Capabilities
from fhir_adapter.sync.engine import choose_strategy

if TYPE_CHECKING:
    from conftest import TargetServer

pytestmark = pytest.mark.integration

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
FRESH = {**FHIR_JSON, "Cache-Control": "no-cache"}
SYSTEM = "urn:nct06677931:patient"
# the types of the synthetic set (fhir-adapter map), and how `auto` must match them on both
EXPECTED_STRATEGY = {
    "AdverseEvent": "tag",  # R4 AdverseEvent has no identifier search parameter
    "CodeSystem": "identifier",
    "Consent": "identifier",
    "Device": "identifier",
    "Encounter": "identifier",
    "Group": "identifier",
    "Location": "identifier",
    "Measure": "identifier",
    "MeasureReport": "identifier",
    "Observation": "identifier",
    "Organization": "identifier",
    "Patient": "identifier",
    "Practitioner": "identifier",
    "Provenance": "tag",  # no identifier element in R4
    "ResearchStudy": "identifier",
    "ResearchSubject": "identifier",
    "Substance": "identifier",
}


def patient(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": SYSTEM, "code": value}]},
        "identifier": [{"system": SYSTEM, "value": value}],
        **extra,
    }


def post(base: str, path: str, body: Any) -> requests.Response:
    return requests.post(f"{base}/{path}".rstrip("/"), json=body, headers=FHIR_JSON, timeout=60)


def held(base: str, params: dict[str, str]) -> int:
    found = requests.get(f"{base}/Patient", params=params, headers=FRESH, timeout=60)
    assert found.status_code == 200, found.text
    return len(found.json().get("entry", []))


def test_identity_strategy_from_each_capability_statement(target_server: TargetServer) -> None:
    statement = requests.get(f"{target_server.base_url}/metadata", headers=FHIR_JSON, timeout=60)
    caps = Capabilities.parse(statement.json())
    chosen = {t: choose_strategy(caps, t, "auto") for t in EXPECTED_STRATEGY}
    assert chosen == EXPECTED_STRATEGY
    # both offer transactions; neither says it creates on update (client-id is a choice)
    assert caps.bundle_mode() == "transaction"
    assert not any(caps.update_create.get(t) for t in EXPECTED_STRATEGY)


def test_search_by_tag_system_alone(target_server: TargetServer) -> None:
    """The sync's look-up: HAPI refuses ``_tag=system|``, both answer the exact keys."""
    base = target_server.base_url
    assert post(base, "Patient", patient("A")).status_code == 201
    by_system = requests.get(f"{base}/Patient", params={"_tag": f"{SYSTEM}|"}, headers=FRESH,
                             timeout=60)  # fmt: skip
    if target_server.kind == "hapi":
        assert by_system.status_code == 400
        assert "HAPI-1218" in by_system.text
    else:
        assert by_system.status_code == 200
        assert len(by_system.json()["entry"]) == 1
    assert held(base, {"_tag": f"{SYSTEM}|A,{SYSTEM}|B"}) == 1


def test_transaction_with_one_bad_entry(target_server: TargetServer) -> None:
    """One entry refers to a resource that does not exist."""
    base = target_server.base_url
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("A"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": patient("B", managingOrganization={"reference": "Organization/none"}),
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": patient("C"), "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    answer = post(base, "", bundle)
    if target_server.kind == "hapi":  # atomic: refused as a whole, nothing applied
        assert answer.status_code == 400, answer.text
        assert "HAPI-1094" in answer.text
        assert held(base, {"identifier": f"{SYSTEM}|"}) == 0
    else:  # not atomic, references not checked: all three stored, B's reference to nothing
        assert answer.status_code == 200, answer.text
        assert [e["response"]["status"][:3] for e in answer.json()["entry"]] == ["201"] * 3
        assert held(base, {"identifier": f"{SYSTEM}|"}) == 3


def test_versions_deletes_and_reads(target_server: TargetServer) -> None:
    base = target_server.base_url
    hapi = target_server.kind == "hapi"
    created = post(base, "Patient", patient("A"))
    assert created.status_code == 201, created.text
    body = created.json()
    url = f"{base}/Patient/{body['id']}"
    again = requests.put(url, json=patient("A", id=body["id"]), headers=FHIR_JSON, timeout=60)
    assert again.status_code == 200, again.text
    same = again.json()["meta"]["versionId"] == body["meta"]["versionId"]
    assert same is hapi  # HAPI keeps the version of an identical update; Medplum adds one

    referrer = post(base, "Observation", {
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": f"Patient/{body['id']}"},
    })  # fmt: skip
    assert referrer.status_code == 201, referrer.text
    refused = requests.delete(url, timeout=60)
    if hapi:  # referential integrity on delete
        assert refused.status_code == 409, refused.text
        gone = requests.delete(f"{base}/Observation/{referrer.json()['id']}", timeout=60)
        assert gone.status_code in (200, 204), gone.text
        refused = requests.delete(url, timeout=60)
    assert refused.status_code in (200, 204), refused.text
    read = requests.get(url, headers=FRESH, timeout=60)
    assert read.status_code == (410 if hapi else 404), read.text
