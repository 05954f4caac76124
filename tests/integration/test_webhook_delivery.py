"""End to end against the real test FHIR server: records pushed to the webhook land on it.

The app runs through its test client, the delivery worker in-process (cycled until it settles),
the FHIR server is the session's real one. Every test ends by checking the server: one resource
per business key, every reference resolves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.conftest import IDENTIFIER_BASE, AdapterCli, WebhookStack
from tests.webhook_helpers import masi, participant, pga

TYPES = [
    "Patient",
    "ResearchSubject",
    "Consent",
    "Encounter",
    "Observation",
    "Practitioner",
    "Provenance",
    "ResearchStudy",
    "Group",
    "Organization",
    "Location",
    "Substance",
    "Device",
    "CodeSystem",
    "Measure",
    "MeasureReport",
    "AdverseEvent",
]
CLOSE = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2)  # MASI 18.4 (mMASI 9.2)
NEAR = (2, 2, 3, 3, 3, 4, 3, 3, 3, 1, 1, 2)  # MASI 16.6
FAR = (2, 2, 1, 3, 3, 2, 3, 3, 2, 1, 1, 1)  # MASI 8.6


def value_of(resource: dict[str, Any]) -> str:
    return str(resource["identifier"][0]["value"])


def method(resource: dict[str, Any]) -> str:
    return str(resource["method"]["coding"][0]["code"])


def assert_server_consistent(stack: WebhookStack) -> dict[tuple[str, str], tuple[str, str]]:
    versions = stack.view.versions(TYPES)  # asserts one resource per business key
    assert stack.view.dangling_references(TYPES) == []
    return versions


def derived_from(stack: WebhookStack, resource: dict[str, Any]) -> list[str]:
    return sorted(
        value_of(stack.view.get(ref["reference"])) for ref in resource.get("derivedFrom", [])
    )


def test_participant_and_two_raters_then_a_third(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    stack.post("participants", participant("S001"))
    stack.post("masi", [masi("S001", "m3", "R1", CLOSE), masi("S001", "m3", "R2", FAR)])
    stack.deliver()

    r1, r2 = stack.observation("S001-m3-masi-R1"), stack.observation("S001-m3-masi-R2")
    assert (r1["valueQuantity"]["value"], r2["valueQuantity"]["value"]) == (18.4, 8.6)
    consensus = stack.observation("S001-m3-masi")
    assert consensus["valueQuantity"]["value"] == 13.5
    assert (consensus["status"], method(consensus)) == ("preliminary", "mean-of-2")
    assert consensus["component"][0]["valueBoolean"] is True  # needs adjudication
    assert derived_from(stack, consensus) == ["S001-m3-masi-R1", "S001-m3-masi-R2"]
    assert stack.observation("S001-m3-mmasi")["status"] == "preliminary"

    stack.post("masi", masi("S001", "m3", "R3", NEAR))
    stack.deliver()
    consensus = stack.observation("S001-m3-masi")
    assert consensus["valueQuantity"]["value"] == 17.5
    assert (consensus["status"], method(consensus)) == ("final", "closest-2-of-3")
    assert consensus["component"][0]["valueBoolean"] is False
    assert derived_from(stack, consensus) == ["S001-m3-masi-R1", "S001-m3-masi-R3"]
    states = stack.inbox_states()
    assert set(states.values()) == {"delivered"}, states
    assert_server_consistent(stack)


def test_the_same_records_again_change_nothing(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    records = [masi("S001", v, r, CLOSE) for v in ("baseline", "m1") for r in ("R1", "R2")]
    stack.post("participants", participant("S001"))
    stack.post("masi", records)
    stack.post("pga", pga("S001", "m1"))
    stack.deliver()
    before = assert_server_consistent(stack)

    again = stack.post("masi", records)
    assert again["changed"] == 0
    stack.post("participants", participant("S001"))
    stack.deliver()
    assert assert_server_consistent(stack) == before  # no duplicate, no new version


def test_an_update_is_a_new_version_not_a_duplicate(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    stack.post("participants", participant("S001"))
    stack.post("masi", masi("S001", "baseline", "R1", CLOSE))
    stack.deliver()
    first = stack.observation("S001-baseline-masi-R1")
    stack.post("masi", masi("S001", "baseline", "R1", NEAR))
    stack.deliver()
    updated = stack.observation("S001-baseline-masi-R1")
    assert updated["id"] == first["id"]
    assert updated["meta"]["versionId"] != first["meta"]["versionId"]
    assert updated["valueQuantity"]["value"] == 16.6
    assert stack.observation("S001-baseline-masi")["valueQuantity"]["value"] == 16.6
    assert_server_consistent(stack)


def test_a_baseline_change_re_derives_every_visit(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    stack.post("participants", participant("S001"))
    stack.post(
        "masi",
        [
            masi("S001", "baseline", "R1", CLOSE),
            masi("S001", "m1", "R1", FAR),
            masi("S001", "m2", "R1", NEAR),
        ],
    )
    stack.deliver()
    assert stack.observation("S001-m1-masi-improvement")["valueQuantity"]["value"] == 53.3
    assert stack.observation("S001-m2-masi-improvement")["valueQuantity"]["value"] == 9.8
    stack.post("masi", masi("S001", "baseline", "R1", NEAR))  # baseline 16.6
    stack.deliver()
    assert stack.observation("S001-m1-masi-improvement")["valueQuantity"]["value"] == 48.2
    assert stack.observation("S001-m2-masi-improvement")["valueQuantity"]["value"] == 0.0
    assert_server_consistent(stack)


def test_a_rating_before_its_participant_waits(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    stack.post("masi", masi("S002", "baseline", "R1", CLOSE))
    stack.deliver()
    assert stack.inbox_states() == {"masi/S002/baseline/R1": "waiting"}
    assert (
        stack.view.search(
            "Observation", {"identifier": f"{IDENTIFIER_BASE}observation|S002-baseline-masi-R1"}
        )
        == []
    )

    stack.post("participants", participant("S002"))
    stack.deliver()
    assert stack.observation("S002-baseline-masi-R1")["valueQuantity"]["value"] == 18.4
    assert set(stack.inbox_states().values()) == {"delivered"}
    assert_server_consistent(stack)


def test_delete_retracts_on_the_server(webhook_stack: WebhookStack) -> None:
    stack = webhook_stack
    stack.post("participants", participant("S001"))
    stack.post(
        "masi", [masi("S001", "m3", r, s) for r, s in (("R1", CLOSE), ("R2", FAR), ("R3", NEAR))]
    )
    stack.deliver()
    assert method(stack.observation("S001-m3-masi")) == "closest-2-of-3"

    stack.delete("masi", "S001-m3-masi-R3")
    stack.deliver()
    assert stack.observation("S001-m3-masi-R3")["status"] == "entered-in-error"
    consensus = stack.observation("S001-m3-masi")
    assert (consensus["status"], method(consensus)) == ("preliminary", "mean-of-2")
    assert derived_from(stack, consensus) == ["S001-m3-masi-R1", "S001-m3-masi-R2"]
    assert stack.inbox_states()["masi/S001/m3/R3"] == "retracted"

    for key in ("S001/m3/R1", "S001/m3/R2"):
        stack.delete("masi", key)
    stack.deliver()
    for value in ("S001-m3-masi", "S001-m3-mmasi", "S001-m3-masi-R1", "S001-m3-masi-R2"):
        assert stack.observation(value)["status"] == "entered-in-error", value
    assert_server_consistent(stack)


def test_sync_dir_and_the_webhook_share_one_outbox(
    webhook_stack: WebhookStack, tmp_path: Path
) -> None:
    """`sync DIR` never removes what came through the webhook, and the webhook's retractions
    never remove what came from files: the outbox keeps each record's source."""
    from tests.helpers import masi as masi_row
    from tests.helpers import participant as participant_row
    from tests.helpers import write_csv

    stack = webhook_stack
    stack.post("participants", participant("W001"))
    stack.post("masi", masi("W001", "baseline", "R1", CLOSE))
    stack.deliver()

    data = tmp_path / "data"
    write_csv(data / "participants.csv", [participant_row("F001")])
    write_csv(data / "masi.csv", [masi_row("F001", "baseline", "R1", CLOSE)])
    cli = AdapterCli(stack.view.base_url, stack.settings.outbox_path)
    assert cli.sync(data).code == 0
    # the file is the complete set of the file's records: the webhook's are not "missing"
    assert stack.observation("W001-baseline-masi-R1")["status"] == "final"
    assert len(stack.view.search("Patient", {"identifier": f"{IDENTIFIER_BASE}patient|W001"})) == 1

    write_csv(data / "masi.csv", [masi_row("F001", "baseline", "R2", CLOSE)])  # R1 removed
    result = cli.sync(data)
    assert result.code == 0, result
    assert stack.observation("F001-baseline-masi-R1")["status"] == "entered-in-error"
    assert stack.observation("W001-baseline-masi-R1")["status"] == "final"

    stack.delete("masi", "W001/baseline/R1")
    stack.deliver()
    assert stack.observation("W001-baseline-masi-R1")["status"] == "entered-in-error"
    assert stack.observation("F001-baseline-masi-R2")["status"] == "final"
    assert_server_consistent(stack)
