"""R5 mapping: the whole synthetic set maps to valid R5, with each R4 -> R5 difference handled."""

from __future__ import annotations

import copy
import datetime as dt
import inspect
import itertools
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.domain import Participant
from fhir_adapter.eligibility import EligibilityResult, Verdict
from fhir_adapter.generate import GenerateSummary, generate
from fhir_adapter.intake import Intake
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping import r4, r5
from fhir_adapter.mapping.context import FhirVersion, MappingContext, Resource
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import ValueSetChecker, validated
from fhir_adapter.trial import Trial

TODAY = dt.date(2026, 11, 1)
SEVERITY_EXT = "http://hl7.org/fhir/4.0/StructureDefinition/extension-AdverseEvent.severity"
SUBJECT_STATE = "http://terminology.hl7.org/CodeSystem/research-subject-state"
STATE_TYPE = "http://terminology.hl7.org/CodeSystem/research-subject-state-type"
SERIOUSNESS = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
CAUSALITY = "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess"

ByType = dict[str, list[Resource]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerateSummary]:
    out = tmp_path_factory.mktemp("r5-data")
    return out, generate(out, with_bad=False)


def _map(
    trial: Trial, directory: Path, version: FhirVersion, *, validate: bool
) -> Iterator[Resource]:
    ctx = MappingContext(trial=trial, terminology=Terminology(trial), fhir_version=version)
    intake = Intake(trial=trial, today=TODAY)
    mapper = DatasetMapper(ctx, intake)
    resources = mapper.resources(directory)
    if validate:
        resources = validated(resources, ctx.terminology, version)
    yield from resources
    assert intake.rejected == 0
    assert not mapper.unreadable


def _by_type(resources: list[Resource]) -> ByType:
    out: ByType = defaultdict(list)
    for resource in resources:
        out[resource["resourceType"]].append(resource)
    return out


@pytest.fixture(scope="module")
def r5_list(trial: Trial, generated: tuple[Path, GenerateSummary]) -> list[Resource]:
    # validated(): every resource checked with the fhir.resources R5 models and the value sets
    return list(_map(trial, generated[0], "R5", validate=True))


@pytest.fixture(scope="module")
def r5_out(r5_list: list[Resource]) -> ByType:
    return _by_type(r5_list)


@pytest.fixture(scope="module")
def r4_out(trial: Trial, generated: tuple[Path, GenerateSummary]) -> ByType:
    return _by_type(list(_map(trial, generated[0], "R4", validate=False)))


def _codes(concept: dict[str, Any], system: str) -> list[str]:
    return [c["code"] for c in concept.get("coding", []) if c["system"] == system]


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


# -- the whole set ---------------------------------------------------------------------------
def test_whole_set_is_valid_r5_with_the_same_resources_as_r4(
    r5_out: ByType, r4_out: ByType, generated: tuple[Path, GenerateSummary]
) -> None:
    counts = {t: len(rs) for t, rs in r5_out.items()}
    assert counts == {t: len(rs) for t, rs in r4_out.items()}
    participants = generated[1].rows["participants.csv"]
    assert counts["ResearchSubject"] == counts["Consent"] == participants
    assert counts["AdverseEvent"] > 0
    assert counts["MeasureReport"] > 0


def test_every_reference_resolves_inside_the_output(r5_list: list[Resource]) -> None:
    ids = {f"{r['resourceType']}/{r['id']}" for r in r5_list}
    dangling = {ref for r in r5_list for ref in _references(r)} - ids
    assert not dangling


def test_two_runs_are_byte_identical(
    trial: Trial, generated: tuple[Path, GenerateSummary], r5_list: list[Resource]
) -> None:
    again = list(_map(trial, generated[0], "R5", validate=False))
    assert b"".join(dumpb(r) for r in again) == b"".join(dumpb(r) for r in r5_list)


# -- ResearchSubject -------------------------------------------------------------------------
def test_research_subject_subject_and_progress(r5_out: ByType, r4_out: ByType) -> None:
    r4_status = {r["id"]: r["status"] for r in r4_out["ResearchSubject"]}
    arms = {g["linkId"] for g in r5_out["ResearchStudy"][0]["comparisonGroup"]}
    seen_states = set()
    for rs in r5_out["ResearchSubject"]:
        assert "individual" not in rs
        assert "assignedArm" not in rs
        assert rs["subject"] == {"reference": f"Patient/{rs['id']}"}
        assert rs["status"] == "active"
        assert rs["consent"] == [{"reference": f"Consent/{rs['id']}"}]
        progress = rs["progress"]
        assert _codes(progress[0]["subjectState"], SUBJECT_STATE)
        for step in progress:
            assert _codes(step["type"], STATE_TYPE) == ["Enrollment"]
        # chronological: each state ends when the next one starts; the last one is current
        for before, after in itertools.pairwise(progress):
            if "startDate" in after:
                assert before["endDate"] == after["startDate"]
                if "startDate" in before:
                    assert before["startDate"] <= after["startDate"]
        assert "endDate" not in progress[-1]
        current = _codes(progress[-1]["subjectState"], SUBJECT_STATE)[0]
        assert current == r4_status[rs["id"]]
        seen_states.add(current)
        if "assignedComparisonGroup" in rs:
            assert rs["assignedComparisonGroup"] in arms
            assert rs["actualComparisonGroup"] == rs["assignedComparisonGroup"]
            assert any(_codes(s["subjectState"], SUBJECT_STATE) == ["on-study"] for s in progress)
    assert {"off-study", "withdrawn"} <= seen_states


def _states(participant: dict[str, str], verdict: Verdict | None, trial: Trial) -> list[Any]:
    person = Participant.model_validate(
        {"subject_id": "S900", "sex": "female", "birth_date": "1990-01-01", **participant}
    )
    result = None
    if verdict is not None:
        result = EligibilityResult("S900", dt.date(2024, 9, 5), verdict, (), (), ())
    ctx = MappingContext(trial=trial, terminology=Terminology(trial), fhir_version="R5")
    progress = r5.to_research_subject(person, result, ctx)["progress"]
    return [
        (_codes(p["subjectState"], SUBJECT_STATE)[0], p.get("startDate"), p.get("endDate"))
        for p in progress
    ]


def test_progress_lifecycle_edge_cases(trial: Trial) -> None:
    assert _states({}, None, trial) == [("candidate", None, None)]
    # withdrawn after screening, before enrollment
    consent_withdrawn = {"consent_date": "2024-09-01", "withdrawn_on": "2024-09-10"}
    assert _states(consent_withdrawn, Verdict.ELIGIBLE, trial) == [
        ("candidate", "2024-09-01", "2024-09-05"),
        ("eligible", "2024-09-05", "2024-09-10"),
        ("withdrawn", "2024-09-10", None),
    ]
    # an incomplete screening keeps the participant a candidate (one state, not two)
    assert _states({"consent_date": "2024-09-01"}, Verdict.INCOMPLETE, trial) == [
        ("candidate", "2024-09-01", None)
    ]
    # completed: off-study, no date for the end of the study in the source
    completed = {"consent_date": "2024-09-05", "enrolled_on": "2024-09-06", "status": "completed"}
    assert _states(completed, Verdict.ELIGIBLE, trial) == [
        ("eligible", "2024-09-05", "2024-09-06"),
        ("on-study", "2024-09-06", None),
        ("off-study", None, None),
    ]


def test_withdrawn_subject_ends_with_its_withdrawal_date(r5_out: ByType) -> None:
    withdrawn = [
        rs
        for rs in r5_out["ResearchSubject"]
        if _codes(rs["progress"][-1]["subjectState"], SUBJECT_STATE) == ["withdrawn"]
    ]
    assert withdrawn
    for rs in withdrawn:
        assert rs["progress"][-1]["startDate"] == rs["period"]["end"]


# -- ResearchStudy, Group, interventions ----------------------------------------------------
def test_research_study_r5_shape(r5_out: ByType, trial: Trial) -> None:
    (study,) = r5_out["ResearchStudy"]
    for r4_only in ("arm", "enrollment", "sponsor"):
        assert r4_only not in study
    assert study["status"] == trial.study.fhir_status_r5
    assert [g["linkId"] for g in study["comparisonGroup"]] == [a.id for a in trial.arms]
    assert [g["name"] for g in study["comparisonGroup"]] == [a.name for a in trial.arms]
    assert study["recruitment"] == {
        "targetNumber": trial.study.target_enrollment,
        "eligibility": {"reference": "Group/NCT06677931-enrollment"},
    }
    (party,) = study["associatedParty"]
    assert party["party"]["reference"] == "Organization/NCT06677931-sponsor"
    assert _codes(party["role"], "http://hl7.org/fhir/research-study-party-role") == ["sponsor"]
    state = study["progressStatus"][0]["state"]
    assert _codes(state, "http://hl7.org/fhir/research-study-status") == ["recruiting"]
    assert study["site"] == [{"reference": "Location/fjmu-union-fuzhou"}]


def test_group_device_substance_r5_shape(r5_out: ByType) -> None:
    (group,) = r5_out["Group"]
    assert group["membership"] == "definitional"
    assert "actual" not in group
    assert all("exclude" in c and "valueBoolean" in c for c in group["characteristic"])
    (substance,) = r5_out["Substance"]
    assert substance["instance"] is False
    assert substance["code"]["concept"]["text"]
    for device in r5_out["Device"]:
        assert "deviceName" not in device
        assert device["name"][0]["type"] == "user-friendly-name"
    adapter = next(d for d in r5_out["Device"] if d["id"] == r5.ADAPTER_DEVICE)
    assert adapter["version"][0]["value"]


# -- participants and visits ------------------------------------------------------------------
def test_consent_r5_shape(r5_out: ByType, r4_out: ByType) -> None:
    r4_status = {c["id"]: c["status"] for c in r4_out["Consent"]}
    r5_for_r4 = {"active": "active", "inactive": "inactive", "proposed": "draft"}
    for consent in r5_out["Consent"]:
        for r4_only in ("patient", "scope", "policy", "dateTime"):
            assert r4_only not in consent
        assert consent["subject"] == {"reference": f"Patient/{consent['id']}"}
        assert consent["status"] == r5_for_r4[r4_status[consent["id"]]]
        assert consent["policyBasis"]["url"].endswith("NCT06677931")
        if consent["status"] != "draft":
            assert consent["decision"] == "permit"
            dt.date.fromisoformat(consent["date"])  # a date, not a dateTime


def test_encounter_r5_shape(r5_out: ByType) -> None:
    for encounter in r5_out["Encounter"]:
        assert "period" not in encounter
        assert encounter["actualPeriod"]["start"]
        assert encounter["status"] == "completed"
        assert isinstance(encounter["class"], list)
        assert encounter["class"][0]["coding"][0]["code"] == "AMB"


# -- AdverseEvent ----------------------------------------------------------------------------
RESOLVE_DATE_EXT = "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/resolve-date"
STUDY_TREATMENT_EXT = "urn:nct06677931/StructureDefinition/ae-causality-study-treatment"


def _lower(concept: dict[str, Any]) -> list[str]:
    return [c["code"].lower() for c in concept.get("coding", [])]


def test_adverse_event_r5_shape(r5_out: ByType, r4_out: ByType) -> None:
    r4_events = {ae["id"]: ae for ae in r4_out["AdverseEvent"]}
    statuses = set()
    for ae in r5_out["AdverseEvent"]:
        r4_ae = r4_events[ae["id"]]
        for r4_only in ("event", "date", "severity"):
            assert r4_only not in ae
        assert ae["code"] == r4_ae["event"]
        # the course: R5 has the Period that R4 carries as date + the resolve-date extension
        r4_resolved = [
            e["valueDateTime"] for e in r4_ae.get("extension", []) if e["url"] == RESOLVE_DATE_EXT
        ]
        if r4_resolved:
            assert ae["occurrencePeriod"] == {"start": r4_ae["date"], "end": r4_resolved[0]}
            assert "occurrenceDateTime" not in ae
        else:
            assert ae["occurrenceDateTime"] == r4_ae["date"]
            assert "occurrencePeriod" not in ae
        assert ae["identifier"] == [r4_ae["identifier"]]
        assert ae["meta"] == r4_ae["meta"]
        statuses.add(ae["status"])
        if (
            _codes(r4_ae["outcome"], "http://terminology.hl7.org/CodeSystem/adverse-event-outcome")[
                0
            ]
            in ("resolved", "resolvedWithSequelae", "fatal")
            or r4_resolved
        ):
            assert ae["status"] == "completed"
        (ext,) = [e for e in ae["extension"] if e["url"] == SEVERITY_EXT]
        assert ext["valueCodeableConcept"]["coding"] == r4_ae["severity"]["coding"]
        r4_serious = _codes(r4_ae["seriousness"], SERIOUSNESS)[0]
        assert _codes(ae["seriousness"], SERIOUSNESS) == [r4_serious.lower()]
        assert isinstance(ae["outcome"], list)
        assert ae["outcome"][0]["coding"][0]["display"]
        # the same suspects as R4, the judgement on the same ones, R5 codes, source word as text
        entities, r4_entities = ae.get("suspectEntity", []), r4_ae.get("suspectEntity", [])
        assert len(entities) == len(r4_entities)
        for entity, r4_entity in zip(entities, r4_entities, strict=True):
            assert "instance" not in entity
            assert entity["instanceReference"] == r4_entity["instance"]
            assert ("causality" in entity) == ("causality" in r4_entity)
            if "causality" in entity:
                relatedness = entity["causality"]["entityRelatedness"]
                r4_causality = r4_entity["causality"][0]
                assert _lower(relatedness) == _lower(r4_causality.get("assessment", {}))
                assert relatedness["text"] == r4_causality["productRelatedness"]
                assert all(c["code"] == c["code"].lower() for c in relatedness.get("coding", []))
        r5_study = [e for e in ae["extension"] if e["url"] == STUDY_TREATMENT_EXT]
        r4_study = [e for e in r4_ae.get("extension", []) if e["url"] == STUDY_TREATMENT_EXT]
        assert len(r5_study) == len(r4_study)
        for r5_ext, r4_ext in zip(r5_study, r4_study, strict=True):
            r5_parts = {p["url"]: p for p in r5_ext["extension"]}
            r4_parts = {p["url"]: p for p in r4_ext["extension"]}
            assert r5_parts["productRelatedness"] == r4_parts["productRelatedness"]
            assert _lower(r5_parts.get("assessment", {}).get("valueCodeableConcept", {})) == _lower(
                r4_parts.get("assessment", {}).get("valueCodeableConcept", {})
            )
        assert "mitigatingAction" not in ae  # free text: hospital target only
        assert ae["study"] == [{"reference": "ResearchStudy/NCT06677931"}]
    assert statuses == {"completed", "in-progress"}


def test_r5_hospital_target_keeps_the_action_taken(
    trial: Trial, generated: tuple[Path, GenerateSummary]
) -> None:
    ctx = MappingContext(
        trial=trial, terminology=Terminology(trial), fhir_version="R5", target="hospital"
    )
    intake = Intake(trial=trial, today=TODAY)
    events = [
        r
        for r in validated(
            DatasetMapper(ctx, intake).resources(generated[0]), ctx.terminology, "R5"
        )
        if r["resourceType"] == "AdverseEvent"
    ]
    with_action = [e for e in events if "mitigatingAction" in e]
    assert with_action
    for event in with_action:
        (action,) = event["mitigatingAction"]
        assert set(action) == {"itemCodeableConcept"}
        assert action["itemCodeableConcept"]["text"]
    others = [e for e in events if e["code"].get("coding", [{}])[0].get("code") == "other"]
    assert others
    assert all(e["code"]["text"] != "Other" for e in others)  # the free text itself


def test_measure_report_score_is_measure_score_quantity(r5_out: ByType) -> None:
    scored = 0
    for report in r5_out["MeasureReport"]:
        for group in report["group"]:
            assert "measureScore" not in group
            scored += "measureScoreQuantity" in group
    assert scored


def test_provenance_is_the_r4_shape(r5_out: ByType, r4_out: ByType) -> None:
    assert r5_out["Provenance"] == r4_out["Provenance"]


# -- value sets are version-aware --------------------------------------------------------------
def test_value_sets_reject_the_other_versions_spelling(
    r5_out: ByType, r4_out: ByType, trial: Trial
) -> None:
    term = Terminology(trial)
    r5_checker, r4_checker = ValueSetChecker(term, "R5"), ValueSetChecker(term, "R4")
    r5_ae, r4_ae = r5_out["AdverseEvent"][0], r4_out["AdverseEvent"][0]
    assert r5_checker.problems(r5_ae) == []
    assert r4_checker.problems(r4_ae) == []

    wrong = copy.deepcopy(r5_ae)
    wrong["seriousness"]["coding"][0]["code"] = "Serious"  # the R4 spelling
    assert any("Serious" in p for p in r5_checker.problems(wrong))
    wrong = copy.deepcopy(r4_ae)
    wrong["seriousness"]["coding"][0]["code"] = "serious"  # the R5 spelling
    assert any("serious" in p for p in r4_checker.problems(wrong))

    wrong = copy.deepcopy(r5_ae)
    wrong["status"] = "finished"
    assert r5_checker.problems(wrong)
    subject = copy.deepcopy(r5_out["ResearchSubject"][0])
    subject["progress"][0]["subjectState"]["coding"][0]["code"] = "enrolled"
    assert r5_checker.problems(subject)
    subject = copy.deepcopy(r5_out["ResearchSubject"][0])
    subject["status"] = "on-study"  # the R4 status is not an R5 publication status
    assert r5_checker.problems(subject)


def test_r5_module_mirrors_the_r4_interface() -> None:
    for name in r4.__all__:
        assert hasattr(r5, name), name
        r4_obj, r5_obj = getattr(r4, name), getattr(r5, name)
        if callable(r4_obj):
            assert inspect.signature(r4_obj) == inspect.signature(r5_obj), name
