"""POST /ingest/<kind> and DELETE /ingest/<kind>/<key> through the test client (SPEC §8).

A request is accepted or refused whole; accepted records are in the inbox when the 202 comes;
refusals name every problem by field and never echo a submitted value.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flask.testing import FlaskClient

from fhir_adapter.settings import Settings
from fhir_adapter.sync.inbox import Inbox
from tests import helpers
from tests.webhook_helpers import (
    JSON,
    as_json_record,
    bearer_headers,
    body_of,
    hmac_headers,
    masi,
    participant,
    pga,
)

AUTH = bearer_headers()
SENTINEL_MRN = "SENTINEL-MRN-7f3a"
SENTINEL_TEXT = "SENTINEL withdrawal reason 7f3a"


def post(client: FlaskClient, kind: str, records: Any, **headers: str) -> Any:
    return client.post(
        f"/ingest/{kind}", data=body_of(records), headers={**JSON, **AUTH, **headers}
    )


def issues(response: Any) -> list[dict[str, Any]]:
    outcome = response.get_json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return list(outcome["issue"])


# -- accepted ---------------------------------------------------------------------------------
def test_one_record_is_committed_before_the_202(webhook: FlaskClient, inbox: Inbox) -> None:
    response = post(webhook, "participants", participant("S001"))
    assert response.status_code == 202
    body = response.get_json()
    assert body["accepted"] == 1
    [record] = body["records"]
    assert record["key"] == "S001"
    assert {"system": "urn:nct06677931:patient", "value": "S001"} in record["identifiers"]
    [row] = inbox.rows()
    assert (row.kind, row.key, row.state) == ("participants", "S001", "pending")
    assert row.record == participant("S001")


def test_a_list_of_records(webhook: FlaskClient, inbox: Inbox) -> None:
    records = [masi("S001", "m3", r) for r in ("R1", "R2", "R3")]
    response = post(webhook, "masi", records)
    assert response.status_code == 202
    keys = [r["key"] for r in response.get_json()["records"]]
    assert keys == ["S001/m3/R1", "S001/m3/R2", "S001/m3/R3"]
    idents = {i["value"] for r in response.get_json()["records"] for i in r["identifiers"]}
    assert {
        "S001-m3-masi-R1",
        "S001-m3-masi",
        "S001-m3-mmasi",
        "S001-m3-masi-improvement",
    } <= idents
    assert len(inbox.rows()) == 3


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        ("eligibility", as_json_record(helpers.screening("S001"))),
        ("pga", pga("S001", "m1")),
        ("satisfaction", as_json_record(helpers.satisfaction("S001", "m1"))),
        ("adverse_events", as_json_record(helpers.adverse_event("AE0001", "S001"))),
    ],
)
def test_every_kind_is_accepted(
    webhook: FlaskClient, inbox: Inbox, kind: str, record: dict[str, Any]
) -> None:
    assert post(webhook, kind, record).status_code == 202
    assert [r.kind for r in inbox.rows()] == [kind]


def test_the_same_record_again_is_not_a_duplicate(webhook: FlaskClient, inbox: Inbox) -> None:
    assert post(webhook, "masi", masi()).status_code == 202
    seq = inbox.last_seq()
    again = post(webhook, "masi", masi())
    assert again.status_code == 202
    assert again.get_json()["records"][0]["status"] == "unchanged"
    assert len(inbox.rows()) == 1
    assert inbox.last_seq() == seq  # nothing new for the worker


def test_a_changed_record_is_an_update(webhook: FlaskClient, inbox: Inbox) -> None:
    assert post(webhook, "masi", masi()).status_code == 202
    changed = masi(scores=(1,) * 12)
    assert post(webhook, "masi", changed).get_json()["records"][0]["status"] == "accepted"
    [row] = inbox.rows()
    assert row.record == changed


def test_a_masi_row_before_its_participant_is_accepted(webhook: FlaskClient, inbox: Inbox) -> None:
    """It waits in the inbox until the participant arrives (the delivery worker's rule)."""
    assert post(webhook, "masi", masi("S404")).status_code == 202
    assert [r.subject for r in inbox.rows()] == ["S404"]


# -- refused ----------------------------------------------------------------------------------
def test_one_bad_record_refuses_the_whole_request(webhook: FlaskClient, inbox: Inbox) -> None:
    records = [masi("S001", "m3", "R1"), masi("S001", "m3", "R2", forehead_d=9)]
    response = post(webhook, "masi", records)
    assert response.status_code == 422
    assert [i["expression"] for i in issues(response)] == [["masi[1].forehead_d"]]
    assert inbox.rows() == []


def test_every_problem_is_named_by_field_without_values(webhook: FlaskClient) -> None:
    bad = participant(
        "S 001", sex="robot", birth_date="17/05/1990", mrn=SENTINEL_MRN, withdrawn_on="2099-01-01"
    )
    bad["withdrawal_reason"] = SENTINEL_TEXT
    bad["unexpected_column"] = SENTINEL_TEXT
    response = post(webhook, "participants", [participant("S002"), bad])
    assert response.status_code == 422
    where = {e for i in issues(response) for e in i["expression"]}
    assert {
        "participants[1].subject_id",
        "participants[1].sex",
        "participants[1].birth_date",
        "participants[1].unexpected_column",
    } <= where
    text = response.get_data(as_text=True)
    for value in (SENTINEL_MRN, SENTINEL_TEXT, "S 001", "robot", "17/05/1990", "2099-01-01"):
        assert value not in text
    assert "Traceback" not in text


def test_missing_fields_are_required(webhook: FlaskClient) -> None:
    record = masi()
    del record["chin_a"], record["assessed_on"]
    response = post(webhook, "masi", record)
    assert response.status_code == 422
    found = {(i["expression"][0], i["code"]) for i in issues(response)}
    assert ("masi[0].chin_a", "required") in found
    assert ("masi[0].assessed_on", "required") in found


def test_scores_must_be_whole_numbers(webhook: FlaskClient) -> None:
    response = post(webhook, "masi", masi(forehead_a=2.5))
    assert response.status_code == 422
    assert issues(response)[0]["expression"] == ["masi[0].forehead_a"]


def test_a_fourth_rater_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    assert (
        post(webhook, "masi", [masi("S001", "m3", r) for r in ("R1", "R2", "R3")]).status_code
        == 202
    )
    response = post(webhook, "masi", masi("S001", "m3", "R4"))
    assert response.status_code == 422
    assert issues(response)[0]["expression"] == ["masi[0].rater_id"]
    assert len(inbox.rows()) == 3
    # a known rater again is an update, not a fourth
    assert post(webhook, "masi", masi("S001", "m3", "R2", chin_a=1)).status_code == 202


def test_the_same_rater_twice_in_one_request_is_refused(webhook: FlaskClient, inbox: Inbox) -> None:
    response = post(webhook, "masi", [masi(), masi(chin_a=1)])
    assert response.status_code == 422
    assert inbox.rows() == []


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"subject_id": "S001"', b"[1, 2]", b'"just a string"', b"[" * 50000],
)
def test_malformed_json_is_400(webhook: FlaskClient, body: bytes) -> None:
    response = webhook.post("/ingest/participants", data=body, headers={**JSON, **AUTH})
    assert response.status_code == 400
    assert issues(response)[0]["code"] == "structure"
    assert "Traceback" not in response.get_data(as_text=True)


def test_an_empty_list_is_422(webhook: FlaskClient) -> None:
    assert post(webhook, "participants", []).status_code == 422


@pytest.mark.parametrize("content_type", ["text/csv", "application/x-www-form-urlencoded", ""])
def test_wrong_content_type_is_415(webhook: FlaskClient, content_type: str) -> None:
    body = body_of(participant())
    response = webhook.post(
        "/ingest/participants", data=body, headers={**AUTH, "Content-Type": content_type}
    )
    assert response.status_code == 415


def test_oversize_body_is_413_before_anything_else(
    webhook: FlaskClient, webhook_settings: Settings, inbox: Inbox
) -> None:
    big = body_of([participant(f"S{i:05d}") for i in range(8000)])
    assert len(big) > webhook_settings.max_request_bytes
    for headers in ({**JSON, **AUTH}, {**JSON}, {**JSON, **hmac_headers(big)}):
        response = webhook.post("/ingest/participants", data=big, headers=headers)
        assert response.status_code == 413
        assert issues(response)[0]["code"] == "too-long"
    assert inbox.rows() == []


def test_unknown_kind_is_404(webhook: FlaskClient) -> None:
    response = post(webhook, "medications", participant())
    assert response.status_code == 404
    assert issues(response)[0]["code"] == "not-found"


# -- retraction -------------------------------------------------------------------------------
def test_delete_by_key_or_identifier(webhook: FlaskClient, inbox: Inbox) -> None:
    assert (
        post(webhook, "masi", [masi("S001", "m3", "R1"), masi("S001", "m3", "R2")]).status_code
        == 202
    )
    first = webhook.delete("/ingest/masi/S001/m3/R1", headers=AUTH)
    assert first.status_code == 202
    assert first.get_json()["records"][0]["key"] == "S001/m3/R1"
    second = webhook.delete("/ingest/masi/S001-m3-masi-R2", headers=AUTH)
    assert second.status_code == 202
    assert [(r.key, r.retracted) for r in inbox.rows()] == [
        ("S001/m3/R1", True),
        ("S001/m3/R2", True),
    ]
    assert webhook.delete("/ingest/masi/S001/m3/R1", headers=AUTH).status_code == 404


def test_delete_of_an_unknown_record_is_404(webhook: FlaskClient) -> None:
    response = webhook.delete("/ingest/pga/S001/m1", headers=AUTH)
    assert response.status_code == 404
    assert issues(response)[0]["code"] == "not-found"


def test_a_participant_with_records_is_not_retracted(webhook: FlaskClient, inbox: Inbox) -> None:
    assert post(webhook, "participants", participant()).status_code == 202
    assert post(webhook, "masi", masi()).status_code == 202
    assert webhook.delete("/ingest/participants/S001", headers=AUTH).status_code == 409
    assert webhook.delete("/ingest/masi/S001/baseline/R1", headers=AUTH).status_code == 202
    assert webhook.delete("/ingest/participants/S001", headers=AUTH).status_code == 202


def test_a_retracted_record_sent_again_is_live_again(webhook: FlaskClient, inbox: Inbox) -> None:
    assert post(webhook, "masi", masi()).status_code == 202
    assert webhook.delete("/ingest/masi/S001/baseline/R1", headers=AUTH).status_code == 202
    assert post(webhook, "masi", masi()).get_json()["records"][0]["status"] == "accepted"
    assert [r.retracted for r in inbox.rows()] == [False]


# -- privacy of the logs ------------------------------------------------------------------------
def test_a_personal_value_never_reaches_the_logs(
    webhook: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = participant("S001", mrn=SENTINEL_MRN)
    good["withdrawal_reason"] = SENTINEL_TEXT
    assert post(webhook, "participants", good).status_code == 202
    bad = participant("S002", mrn=SENTINEL_MRN, sex=SENTINEL_TEXT, birth_date=SENTINEL_TEXT)
    assert post(webhook, "participants", bad).status_code == 422
    assert webhook.get("/metrics", headers=AUTH).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "ingest participants" in logged  # the logs say what happened...
    assert SENTINEL_MRN not in logged  # ...never to whom
    assert SENTINEL_TEXT not in logged


def test_an_mrn_off_the_pattern_refuses_the_request(webhook: FlaskClient, inbox: Inbox) -> None:
    """A file's intake drops such an MRN and keeps the row; the webhook keeps nothing of a
    request with a bad field (the EHR corrects and sends it again)."""
    response = post(webhook, "participants", participant("S001", mrn="Jane Doe 1990"))
    assert response.status_code == 422
    [issue] = issues(response)
    assert issue["expression"] == ["participants[0].mrn"]
    assert "kept" not in issue["diagnostics"]
    assert "Jane" not in response.get_data(as_text=True)
    assert inbox.rows() == []


def test_control_characters_are_refused(webhook: FlaskClient) -> None:
    record = participant("S001")
    record["withdrawal_reason"] = "moved\x07away"
    response = post(webhook, "participants", record)
    assert response.status_code == 422
    assert issues(response)[0]["expression"] == ["participants[0].withdrawal_reason"]


def test_rules_across_records_apply_where_the_inbox_holds_the_participant(
    webhook: FlaskClient, inbox: Inbox
) -> None:
    """An AE naming an intervention the participant's arm does not give is refused at the door
    (422) once the participant is known, never accepted (202) and dropped at delivery; before
    the participant arrives it waits, as any record does."""
    ae = as_json_record(helpers.adverse_event("AE0001", "S002", suspect="exosomes"))
    assert post(webhook, "adverse_events", ae).status_code == 202  # S002 not known yet: waits
    assert post(webhook, "participants", participant("S001", arm="laser")).status_code == 202
    refused = post(
        webhook,
        "adverse_events",
        as_json_record(helpers.adverse_event("AE0002", "S001", suspect="exosomes")),
    )
    assert refused.status_code == 422, refused.get_data(as_text=True)
    assert issues(refused)[0]["expression"] == ["adverse_events[0].suspect"]
    assert "exosomes" not in refused.get_data(as_text=True)  # no submitted value echoed
    laser = as_json_record(helpers.adverse_event("AE0002", "S001", suspect="laser"))
    assert post(webhook, "adverse_events", laser).status_code == 202
    assert post(webhook, "adverse_events", laser).status_code == 202  # the same again: update
    assert sorted(r.key for r in inbox.rows()) == ["AE0001", "AE0002", "S001"]
