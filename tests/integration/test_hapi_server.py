"""The HAPI FHIR JPA test server itself (tests/hapi_server, issue 14): what it offers and how it
behaves where it differs from the Medplum test server — the differences the adapter must live with.

Every test starts from an emptied server (`hapi_reset`) and talks plain HTTP (`requests`).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer

pytestmark = pytest.mark.integration

JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
FRESH = {**JSON, "Cache-Control": "no-cache"}
SYSTEM = "urn:fhir-adapter:test:hapi"
# every R4 type `fhir-adapter map` emits (tests/golden/r4/registry.ndjson)
EMITTED = (
    "AdverseEvent", "CodeSystem", "Consent", "Device", "Encounter", "Group", "Location",
    "Measure", "MeasureReport", "Observation", "Organization", "Patient", "Practitioner",
    "Provenance", "ResearchStudy", "ResearchSubject", "Substance",
)  # fmt: skip
WITHOUT_IDENTIFIER_SEARCH = {"AdverseEvent", "Provenance"}  # R4 defines none for them


def post(url: str, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(url, json=body, headers={**JSON, **headers}, timeout=60)


def put(url: str, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.put(url, json=body, headers={**JSON, **headers}, timeout=60)


def get(url: str, **params: str) -> requests.Response:
    return requests.get(url, params=params, headers=FRESH, timeout=60)


def total(base: str, rtype: str, **params: str) -> int:
    response = get(f"{base}/{rtype}", _summary="count", **params)
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


def patient(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": value}],
        **extra,
    }


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def test_capability_statement_offers_what_the_adapter_needs(hapi_reset: str) -> None:
    statement = get(f"{hapi_reset}/metadata").json()
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["software"]["name"] == "HAPI FHIR Server"
    assert statement["software"]["version"].startswith("8.")
    (rest,) = statement["rest"]
    # transaction is listed, batch is not (HAPI still accepts batch Bundles)
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "history-system"}
    assert "expunge" in {o["name"] for o in rest["operation"]}
    resources = {r["type"]: r for r in rest["resource"]}
    for rtype in (*EMITTED, "Subscription"):
        resource = resources[rtype]
        interactions = {i["code"] for i in resource["interaction"]}
        assert {"create", "read", "update", "delete", "search-type"} <= interactions, rtype
        assert resource["conditionalUpdate"] is True, rtype
        assert resource["versioning"] == "versioned-update", rtype
        # HAPI accepts client-assigned (non-numeric) ids on PUT but does not say so
        assert "updateCreate" not in resource, rtype
        params = {p["name"] for p in resource.get("searchParam", [])}
        assert "_tag" in params, rtype
        assert ("identifier" in params) == (rtype not in WITHOUT_IDENTIFIER_SEARCH | {"Subscription"})
        assert "validate" in {o["name"] for o in resource["operation"]}, rtype


def test_transactions_are_atomic(hapi_reset: str) -> None:
    """One bad entry (a reference to nothing) rolls the whole Bundle back."""
    response = post(
        hapi_reset,
        transaction(
            {"resource": patient("atomic-1"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "probe"},
                    "subject": {"reference": "Patient/not-there"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ),
    )
    assert response.status_code in (400, 404), response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert total(hapi_reset, "Patient") == 0
    assert total(hapi_reset, "Observation") == 0


def test_transaction_entry_answers_and_urn_uuid_references(hapi_reset: str) -> None:
    full_url = f"urn:uuid:{uuid.uuid4()}"
    response = post(
        hapi_reset,
        transaction(
            {
                "fullUrl": full_url,
                "resource": patient("answers-1"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "identifier": [{"system": SYSTEM, "value": "answers-obs"}],
                    "status": "final",
                    "code": {"text": "probe"},
                    "subject": {"reference": full_url},
                },
                "request": {"method": "PUT", "url": f"Observation?identifier={SYSTEM}|answers-obs"},
            },
        ),
    )
    assert response.status_code == 200, response.text
    created, upserted = (e["response"] for e in response.json()["entry"])
    # status with reason phrase, location with _history, etag as the bare version (no W/"…")
    assert created["status"] == "201 Created"
    assert re.fullmatch(r"Patient/\d+/_history/1", created["location"]), created
    assert created["etag"] == "1"
    assert upserted["status"] == "201 Created"  # conditional update that matched nothing
    patient_id = created["location"].split("/")[1]
    observation = get(f"{hapi_reset}/{upserted['location'].rsplit('/_history', 1)[0]}").json()
    assert observation["subject"]["reference"] == f"Patient/{patient_id}"  # urn:uuid rewritten
    assert observation["meta"]["source"].startswith("#")  # HAPI adds a request id to meta.source


def test_identical_update_makes_no_new_version_and_etags(hapi_reset: str) -> None:
    url = f"{hapi_reset}/Patient/hapi-probe-1"
    body = patient("etag-1", id="hapi-probe-1", gender="female")
    first = put(url, body)
    assert first.status_code == 201, first.text  # update-as-create with a client id
    assert first.headers["ETag"] == 'W/"1"'
    again = put(url, body, **{"If-Match": 'W/"1"'})
    assert again.status_code == 200
    assert again.headers["ETag"] == 'W/"1"'  # same content: no new version (Medplum makes one)
    changed = put(url, {**body, "gender": "male"}, **{"If-Match": 'W/"1"'})
    assert changed.headers["ETag"] == 'W/"2"'
    stale = put(url, {**body, "gender": "other"}, **{"If-Match": 'W/"1"'})
    assert stale.status_code == 409, stale.text  # a version conflict is 409 here, not 412
    assert get(url).json()["meta"]["versionId"] == "2"
    numeric = put(f"{hapi_reset}/Patient/12345", {**body, "id": "12345"})
    assert numeric.status_code == 400, numeric.text  # client ids must not be purely numeric


def test_conditional_update_semantics(hapi_reset: str) -> None:
    url = f"{hapi_reset}/Patient?identifier={SYSTEM}|cond-1"
    created = put(url, patient("cond-1"))
    assert created.status_code == 201, created.text
    updated = put(url, patient("cond-1", gender="female"))
    assert updated.status_code == 200
    assert updated.headers["Content-Location"].split("/_history")[0] == created.headers[
        "Content-Location"
    ].split("/_history")[0]
    # creating: the resource must itself match the conditional URL ...
    mismatch = put(f"{hapi_reset}/Patient?identifier={SYSTEM}|cond-new", patient("cond-other"))
    assert mismatch.status_code == 400, mismatch.text
    assert "HAPI-0929" in mismatch.text
    # ... updating: it need not, the match is overwritten (its identifier changes with it)
    moved = put(url, patient("cond-moved"))
    assert moved.status_code == 200, moved.text
    assert total(hapi_reset, "Patient", identifier=f"{SYSTEM}|cond-1") == 0
    # two matches: refused, nothing written
    assert post(f"{hapi_reset}/Patient", patient("cond-2")).status_code == 201
    assert post(f"{hapi_reset}/Patient", patient("cond-2")).status_code == 201
    ambiguous = put(f"{hapi_reset}/Patient?identifier={SYSTEM}|cond-2", patient("cond-2"))
    assert ambiguous.status_code == 412, ambiguous.text
    assert total(hapi_reset, "Patient") == 3


def test_identical_searches_are_answered_from_a_60_s_cache(hapi_reset: str) -> None:
    """Without ``Cache-Control: no-cache`` a repeated search misses writes made meanwhile."""
    url = f"{hapi_reset}/Patient"
    params = {"identifier": f"{SYSTEM}|cached-1"}
    before = requests.get(url, params=params, headers=JSON, timeout=60).json()
    assert before.get("entry", []) == []
    assert post(url, patient("cached-1")).status_code == 201
    cached = requests.get(url, params=params, headers=JSON, timeout=60).json()
    assert cached.get("entry", []) == []  # stale: the cached result of the first search
    fresh = requests.get(url, params=params, headers=FRESH, timeout=60).json()
    assert len(fresh["entry"]) == 1


def test_token_search_by_system_alone(hapi_reset: str) -> None:
    """``identifier=system|`` finds every value in the system; ``_tag=system|`` is refused."""
    tagged = patient("tok-1", meta={"tag": [{"system": SYSTEM, "code": "tok-1"}]})
    assert post(f"{hapi_reset}/Patient", tagged).status_code == 201
    assert total(hapi_reset, "Patient", identifier=f"{SYSTEM}|") == 1
    assert total(hapi_reset, "Patient", _tag=f"{SYSTEM}|tok-1") == 1
    by_tag_system = get(f"{hapi_reset}/Patient", _tag=f"{SYSTEM}|")
    assert by_tag_system.status_code == 400
    assert "HAPI-1218" in by_tag_system.text


def test_paging_follows_next_links(hapi_reset: str) -> None:
    entries = [
        {"resource": patient(f"page-{i:02d}"), "request": {"method": "POST", "url": "Patient"}}
        for i in range(45)
    ]
    assert post(hapi_reset, transaction(*entries)).status_code == 200
    page = get(f"{hapi_reset}/Patient", identifier=f"{SYSTEM}|", _count="20").json()
    seen: list[str] = []
    for _ in range(10):
        seen += [e["resource"]["identifier"][0]["value"] for e in page["entry"]]
        links = {link["relation"]: link["url"] for link in page["link"]}
        if "next" not in links:
            break
        page = get(links["next"]).json()
    assert sorted(seen) == sorted(f"page-{i:02d}" for i in range(45))
    # without _count: the starter's default page size of 20
    assert len(get(f"{hapi_reset}/Patient").json()["entry"]) == 20


def test_deleting_a_referenced_resource_is_refused(hapi_reset: str) -> None:
    created = post(f"{hapi_reset}/Patient", patient("ref-1"))
    patient_ref = created.headers["Location"].split("/_history")[0].split("/fhir/")[1]
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "probe"},
        "subject": {"reference": patient_ref},
    }
    assert post(f"{hapi_reset}/Observation", observation).status_code == 201
    refused = requests.delete(f"{hapi_reset}/{patient_ref}", headers=JSON, timeout=60)
    assert refused.status_code == 409, refused.text
    assert total(hapi_reset, "Patient") == 1


def test_reset_empties_everything(hapi_test_server: Any, hapi_reset: str) -> None:
    assert post(f"{hapi_reset}/Patient", patient("reset-1")).status_code == 201
    hapi_test_server.reset()
    assert total(hapi_reset, "Patient") == 0


def wait_for(predicate: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"not within {seconds:.0f} s: {what}")


def test_rest_hook_subscription_delivers_with_its_header(
    hapi_reset: str, httpserver: HTTPServer
) -> None:
    """HAPI matches and delivers in-process: ``PUT endpoint/Observation/id`` with the resource."""
    httpserver.expect_request(re.compile(r"^/notify/.*")).respond_with_data("", status=200)
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "fhir-adapter test",
        "criteria": f"Observation?code={SYSTEM}|masi",
        "channel": {
            "type": "rest-hook",
            "endpoint": httpserver.url_for("/notify"),
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer hapi-test-token"],
        },
    }
    created = post(f"{hapi_reset}/Subscription", subscription)
    assert created.status_code == 201, created.text
    sub_url = f"{hapi_reset}/{created.headers['Location'].split('/fhir/')[1].split('/_history')[0]}"
    wait_for(lambda: get(sub_url).json()["status"] == "active", 60, "Subscription active")

    def observation(code: str) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": SYSTEM, "code": code}]},
        }

    assert post(f"{hapi_reset}/Observation", observation("other")).status_code == 201
    made = post(f"{hapi_reset}/Observation", observation("masi"))
    assert made.status_code == 201
    obs_id = made.headers["Location"].split("/Observation/")[1].split("/")[0]
    delivered = wait_for(
        lambda: [r for r, _ in httpserver.log if r.path.startswith("/notify/")], 60, "delivery"
    )
    request = delivered[0]
    assert request.method == "PUT"
    assert request.path == f"/notify/Observation/{obs_id}"
    assert request.headers["Authorization"] == "Bearer hapi-test-token"
    assert request.get_json(force=True)["code"]["coding"][0]["code"] == "masi"
    time.sleep(1)  # the non-matching Observation is never delivered
    assert len([r for r, _ in httpserver.log if r.path.startswith("/notify/")]) == 1


def test_target_server_runs_a_test_once_per_server(target_server: Any) -> None:
    """`target_server` (conftest): the same assertions on Medplum and on HAPI, each emptied."""
    statement = get(f"{target_server.base_url}/metadata").json()
    assert statement["fhirVersion"] == "4.0.1"
    assert ("HAPI" in statement["software"]["name"]) == (target_server.kind == "hapi")
    created = post(f"{target_server.base_url}/Patient", patient(f"{target_server.kind}-1"))
    assert created.status_code == 201, created.text
    assert total(target_server.base_url, "Patient") == 1
