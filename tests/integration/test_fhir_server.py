"""Behaviour of the in-memory FHIR R4 test server (Medplum engine + wrapper, fhir_adapter/fhir_server)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import pytest
import requests
from pytest_httpserver import HTTPServer

pytestmark = pytest.mark.integration

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
SYSTEM = "urn:test:obs"
TAG_SYSTEM = "urn:test:tag"
TIMEOUT = 60

JsonObject = dict[str, Any]


def observation(value: str | None = None, *, tag: str | None = None, note: str = "x") -> JsonObject:
    resource: JsonObject = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}], "text": note},
    }
    if value is not None:
        resource["identifier"] = [{"system": SYSTEM, "value": value}]
    if tag is not None:
        resource["meta"] = {"tag": [{"system": TAG_SYSTEM, "code": tag}]}
    return resource


def post(url: str, body: JsonObject, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(url, json=body, headers={**FHIR_JSON, **(headers or {})}, timeout=TIMEOUT)


def put(url: str, body: JsonObject, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.put(url, json=body, headers={**FHIR_JSON, **(headers or {})}, timeout=TIMEOUT)


def get(url: str, params: dict[str, str] | None = None) -> requests.Response:
    return requests.get(url, params=params, headers=FHIR_JSON, timeout=TIMEOUT)


def assert_outcome(response: requests.Response, status: int) -> JsonObject:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body: JsonObject = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], body
    return body


def conditional_put_entry(value: str, note: str = "x") -> JsonObject:
    return {
        "resource": observation(value, note=note),
        "request": {"method": "PUT", "url": f"Observation?identifier={SYSTEM}|{value}"},
    }


def search_all(url: str) -> list[JsonObject]:
    """Follow `next` links to the end; returns all matched resources."""
    resources: list[JsonObject] = []
    next_url: str | None = url
    pages = 0
    while next_url is not None:
        pages += 1
        assert pages < 100, "paging does not terminate"
        bundle = get(next_url).json()
        assert bundle["type"] == "searchset"
        entries = bundle.get("entry", [])
        resources += [e["resource"] for e in entries if e["search"]["mode"] == "match"]
        links = {link["relation"]: link["url"] for link in bundle.get("link", [])}
        next_url = links.get("next")
    return resources


def test_metadata(fhir_server: str) -> None:
    response = get(f"{fhir_server}/metadata")
    assert response.status_code == 200
    cap = response.json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1"
    assert "application/fhir+json" in cap["format"]
    resources = {r["type"]: r for r in cap["rest"][0]["resource"]}
    obs = resources["Observation"]
    names = {p["name"] for p in obs["searchParam"]}
    assert {"identifier", "_id", "_lastUpdated", "_tag", "_profile", "_security"} <= names
    assert obs["conditionalUpdate"] is True
    assert obs["conditionalCreate"] is True
    assert obs["updateCreate"] is False
    assert {i["code"] for i in obs["interaction"]} >= {"create", "read", "update", "search-type"}
    ae_names = {p["name"] for p in resources["AdverseEvent"]["searchParam"]}
    assert "identifier" not in ae_names
    assert "_tag" in ae_names


def test_create_and_read(fhir_reset: str) -> None:
    created = post(f"{fhir_reset}/Observation", observation("c-1"))
    assert created.status_code == 201, created.text
    body = created.json()
    rid, vid = body["id"], body["meta"]["versionId"]
    assert created.headers["ETag"] == f'W/"{vid}"'
    assert created.headers["Location"] == f"{fhir_reset}/Observation/{rid}/_history/{vid}"
    assert "Last-Modified" in created.headers

    read = get(f"{fhir_reset}/Observation/{rid}")
    assert read.status_code == 200
    assert read.json()["identifier"] == [{"system": SYSTEM, "value": "c-1"}]
    assert read.headers["ETag"] == f'W/"{vid}"'

    assert_outcome(get(f"{fhir_reset}/Observation/does-not-exist"), 404)


def test_invalid_resource_is_rejected(fhir_reset: str) -> None:
    empty = {"resourceType": "Observation"}
    outcome = assert_outcome(post(f"{fhir_reset}/Observation", empty), 400)
    expressions = {e for issue in outcome["issue"] for e in issue.get("expression", [])}
    assert {"Observation.status", "Observation.code"} <= expressions
    bad_type = observation("inv-1") | {"status": 42}
    assert_outcome(post(f"{fhir_reset}/Observation", bad_type), 400)
    unknown_field = observation("inv-2") | {"bogus": True}
    assert_outcome(post(f"{fhir_reset}/Observation", unknown_field), 400)
    # required binding on a code element (checked by the wrapper, not by validateResource)
    bad_code = observation("inv-4") | {"status": "bogus"}
    outcome = assert_outcome(post(f"{fhir_reset}/Observation", bad_code), 400)
    assert outcome["issue"][0]["code"] == "code-invalid"
    assert post(f"{fhir_reset}/Observation", observation("inv-5") | {"status": "corrected"}).ok
    # also on conditional update
    assert_outcome(
        put(f"{fhir_reset}/Observation?identifier={SYSTEM}|inv-3", {"resourceType": "Observation"}),
        400,
    )
    assert get(f"{fhir_reset}/Observation").json()["total"] == 1


def test_malformed_json_is_400(fhir_reset: str) -> None:
    response = requests.post(
        f"{fhir_reset}/Observation", data=b"{not json", headers=FHIR_JSON, timeout=TIMEOUT
    )
    assert_outcome(response, 400)


def test_unknown_search_parameter_is_400(fhir_reset: str) -> None:
    assert_outcome(get(f"{fhir_reset}/Observation", {"no-such-param": "1"}), 400)
    # AdverseEvent has no `identifier` search parameter in R4
    assert_outcome(get(f"{fhir_reset}/AdverseEvent", {"identifier": f"{SYSTEM}|1"}), 400)
    assert get(f"{fhir_reset}/AdverseEvent", {"_tag": f"{TAG_SYSTEM}|t"}).status_code == 200
    # result parameters are fine
    ok = get(
        f"{fhir_reset}/Observation",
        {"_count": "5", "_sort": "-_lastUpdated", "_total": "accurate", "_summary": "data"},
    )
    assert ok.status_code == 200, ok.text
    # a conditional PUT with an unknown parameter must not create anything
    assert_outcome(put(f"{fhir_reset}/Observation?nope=1", observation("u-1")), 400)
    # ... nor inside a bundle
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": observation("u-2"),
                "request": {"method": "PUT", "url": "Observation?nope=1"},
            },
            {"request": {"method": "GET", "url": "Observation?nope=1"}},
        ],
    }
    response = post(fhir_reset, bundle)
    assert response.status_code == 200, response.text
    for entry in response.json()["entry"]:
        assert entry["response"]["status"].startswith("400")
        assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert get(f"{fhir_reset}/Observation").json()["total"] == 0


def test_conditional_put_twice_updates(fhir_reset: str) -> None:
    url = f"{fhir_reset}/Observation?identifier={SYSTEM}|cp-1"
    first = put(url, observation("cp-1", note="first"))
    assert first.status_code == 201, first.text
    second = put(url, observation("cp-1", note="second"))
    assert second.status_code == 200, second.text
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["meta"]["versionId"] != first.json()["meta"]["versionId"]

    found = get(f"{fhir_reset}/Observation", {"identifier": f"{SYSTEM}|cp-1"}).json()
    assert found["total"] == 1
    rid = first.json()["id"]
    history = get(f"{fhir_reset}/Observation/{rid}/_history").json()
    assert history["total"] == 2
    assert history["entry"][0]["resource"]["code"]["text"] == "second"


def test_conditional_put_identical_content(
    fhir_reset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Documents what the engine does with a no-op update (Medplum's MemoryRepository)."""
    url = f"{fhir_reset}/Observation?identifier={SYSTEM}|same"
    first = put(url, observation("same"))
    second = put(url, observation("same"))
    assert first.status_code == 201
    assert second.status_code == 200
    rid = first.json()["id"]
    versions = get(f"{fhir_reset}/Observation/{rid}/_history").json()["total"]
    changed = first.json()["meta"]["versionId"] != second.json()["meta"]["versionId"]
    with capsys.disabled():
        sys.stdout.write(
            f"\n[fhir-test-server] identical conditional PUT: status {second.status_code}, "
            f"versionId changed: {changed}, "
            f"history versions: {versions}\n"
        )
    # MemoryRepository does not detect no-op updates: every PUT makes a new version.
    assert versions == 2


def test_conditional_put_multiple_matches_is_412(fhir_reset: str) -> None:
    post(f"{fhir_reset}/Observation", observation("dup"))
    post(f"{fhir_reset}/Observation", observation("dup"))
    response = put(f"{fhir_reset}/Observation?identifier={SYSTEM}|dup", observation("dup"))
    assert_outcome(response, 412)
    assert get(f"{fhir_reset}/Observation", {"identifier": f"{SYSTEM}|dup"}).json()["total"] == 2


def test_transaction_reports_per_entry_status(fhir_reset: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            conditional_put_entry("tx-1"),
            {
                "resource": {"resourceType": "Observation", "status": "final"},  # no code
                "request": {"method": "PUT", "url": f"Observation?identifier={SYSTEM}|tx-2"},
            },
            {"resource": observation("tx-3"), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    response = post(fhir_reset, bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201", "400", "201"]
    bad = result["entry"][1]["response"]["outcome"]
    assert bad["resourceType"] == "OperationOutcome"
    assert any("Observation.code" in i.get("expression", []) for i in bad["issue"])
    ok = result["entry"][0]
    assert ok["response"]["location"].startswith("Observation/")
    assert "/_history/" in ok["response"]["location"]
    assert ok["response"]["etag"].startswith('W/"')
    # not atomic: the valid entries were applied
    assert get(f"{fhir_reset}/Observation").json()["total"] == 2

    # the same bundle again: the conditional PUT now updates
    again = post(fhir_reset, bundle).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200", "400", "201"]


def test_transaction_rejects_overlapping_entries(fhir_reset: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [conditional_put_entry("ov-1"), conditional_put_entry("ov-1")],
    }
    assert_outcome(post(fhir_reset, bundle), 400)
    assert get(f"{fhir_reset}/Observation").json()["total"] == 0


def test_batch_processes_entries_in_order(fhir_reset: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [conditional_put_entry("b-1", "one"), conditional_put_entry("b-1", "two")],
    }
    result = post(fhir_reset, bundle).json()
    assert result["type"] == "batch-response"
    assert [e["response"]["status"] for e in result["entry"]] == ["201", "200"]
    found = get(f"{fhir_reset}/Observation", {"identifier": f"{SYSTEM}|b-1"}).json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["code"]["text"] == "two"


def test_paging_default_count_and_next_links(fhir_reset: str) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": observation(f"p-{i}"), "request": {"method": "POST", "url": "Observation"}}
            for i in range(250)
        ],
    }
    response = post(fhir_reset, bundle)
    assert response.status_code == 200
    assert all(e["response"]["status"] == "201" for e in response.json()["entry"])

    first = get(f"{fhir_reset}/Observation").json()
    assert first["total"] == 250
    assert len(first["entry"]) == 100
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert links["next"].startswith(f"{fhir_reset}/Observation?")
    assert first["entry"][0]["fullUrl"].startswith(f"{fhir_reset}/Observation/")

    resources = search_all(f"{fhir_reset}/Observation")
    assert len(resources) == 250
    assert len({r["id"] for r in resources}) == 250

    small = search_all(f"{fhir_reset}/Observation?_count=40&code=http://loinc.org|8310-5")
    assert len(small) == 250
    capped = get(f"{fhir_reset}/Observation", {"_count": "5000"}).json()
    assert len(capped["entry"]) == 250  # capped at 1000, fewer exist
    summary = get(f"{fhir_reset}/Observation", {"_summary": "count"}).json()
    assert summary["total"] == 250
    assert "entry" not in summary


def test_tag_search(fhir_reset: str) -> None:
    post(f"{fhir_reset}/Observation", observation("t-1", tag="alpha"))
    post(f"{fhir_reset}/Observation", observation("t-2", tag="beta"))
    post(f"{fhir_reset}/Observation", observation("t-3"))
    found = get(f"{fhir_reset}/Observation", {"_tag": f"{TAG_SYSTEM}|alpha"}).json()
    assert found["total"] == 1
    assert found["entry"][0]["resource"]["identifier"][0]["value"] == "t-1"
    adverse = {
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "subject": {"reference": "Patient/p1"},
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": "ae-1"}]},
    }
    assert post(f"{fhir_reset}/AdverseEvent", adverse).status_code == 201
    url = f"{fhir_reset}/AdverseEvent?_tag={TAG_SYSTEM}|ae-1"
    assert put(url, adverse).status_code == 200  # conditional update via _tag
    assert get(url).json()["total"] == 1


def test_if_match(fhir_reset: str) -> None:
    created = post(f"{fhir_reset}/Observation", observation("im-1")).json()
    rid, vid = created["id"], created["meta"]["versionId"]
    body = created | {"status": "amended"}
    assert_outcome(put(f"{fhir_reset}/Observation/{rid}", body, {"If-Match": 'W/"wrong"'}), 412)
    ok = put(f"{fhir_reset}/Observation/{rid}", body, {"If-Match": f'W/"{vid}"'})
    assert ok.status_code == 200, ok.text
    assert ok.headers["ETag"] != f'W/"{vid}"'


def test_update_as_create_is_405(fhir_reset: str) -> None:
    body = observation("uc-1") | {"id": "client-chosen"}
    assert_outcome(put(f"{fhir_reset}/Observation/client-chosen", body), 405)


def test_reset_clears_everything(fhir_test_server: Any, fhir_reset: str) -> None:
    post(f"{fhir_reset}/Observation", observation("r-1"))
    assert get(f"{fhir_reset}/Observation").json()["total"] == 1
    fhir_test_server.reset()
    assert get(f"{fhir_reset}/Observation").json()["total"] == 0


def test_rest_hook_subscription(fhir_reset: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("", status=200)
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": "Observation?code=http://loinc.org|8310-5",
        "channel": {
            "type": "rest-hook",
            "endpoint": httpserver.url_for("/hook"),
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer secret-token"],
        },
    }
    created = post(f"{fhir_reset}/Subscription", subscription)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "active"

    other_code = {"coding": [{"system": "http://loinc.org", "code": "1-1"}]}
    other = observation("sub-0") | {"code": other_code}
    post(f"{fhir_reset}/Observation", other)
    match = post(f"{fhir_reset}/Observation", observation("sub-1")).json()

    deadline = time.monotonic() + 10
    while not httpserver.log and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # would a (wrong) second notification arrive?
    assert len(httpserver.log) == 1
    request, _ = httpserver.log[0]
    assert request.headers["Authorization"] == "Bearer secret-token"
    assert request.headers["Content-Type"].startswith("application/fhir+json")
    delivered = json.loads(request.get_data())
    assert delivered["id"] == match["id"]


def test_rest_hook_failure_does_not_break_writes(fhir_reset: str) -> None:
    subscription = {
        "resourceType": "Subscription",
        "status": "active",
        "reason": "test",
        "criteria": "Observation",
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/nothing-listens-here"},
    }
    assert post(f"{fhir_reset}/Subscription", subscription).status_code == 201
    assert post(f"{fhir_reset}/Observation", observation("sf-1")).status_code == 201


def test_subscription_with_unknown_criteria_param_is_400(fhir_reset: str) -> None:
    subscription = {
        "resourceType": "Subscription",
        "status": "active",
        "reason": "test",
        "criteria": "AdverseEvent?identifier=x",
        "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/"},
    }
    assert_outcome(post(f"{fhir_reset}/Subscription", subscription), 400)


def test_time_1000_conditional_puts(fhir_reset: str, capsys: pytest.CaptureFixture[str]) -> None:
    def run(round_: int) -> float:
        start = time.perf_counter()
        for chunk in range(10):
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    conditional_put_entry(f"perf-{chunk * 100 + i}", note=f"round {round_}")
                    for i in range(100)
                ],
            }
            response = post(fhir_reset, bundle)
            assert response.status_code == 200, response.text[:500]
            expected = "201" if round_ == 1 else "200"
            assert {e["response"]["status"] for e in response.json()["entry"]} == {expected}
        return time.perf_counter() - start

    create_s = run(1)
    update_s = run(2)
    assert len(search_all(f"{fhir_reset}/Observation?_count=1000")) == 1000
    with capsys.disabled():
        sys.stdout.write(
            f"\n[fhir-test-server] 1,000 conditional PUTs in transactions of 100: "
            f"{create_s:.2f} s (creating), {update_s:.2f} s (updating the same 1,000)\n"
        )
