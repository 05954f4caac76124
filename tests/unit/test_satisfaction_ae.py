"""Satisfaction levels and rates, adverse-event summaries (SPEC 4), hand-computed; the AE
``suspect`` rules of intake (SPEC 3)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from fhir_adapter.domain import (
    AdverseEvent,
    Participant,
    RecordContext,
    SatisfactionLevel,
    SatisfactionResponse,
)
from fhir_adapter.intake import Intake
from fhir_adapter.scoring import (
    AeSummaryRow,
    level_from_improvement,
    response_level,
    satisfaction_rates,
    summarize_adverse_events,
)
from fhir_adapter.trial import load_trial

TRIAL = load_trial()
CTX = RecordContext(trial=TRIAL)
D = Decimal
L = SatisfactionLevel


def response(
    subject: str, visit: str, level: str | None, pct: str | None = None
) -> SatisfactionResponse:
    row: dict[str, Any] = {
        "subject_id": subject,
        "visit": visit,
        "assessed_on": "2024-10-02",
        "level": level or "",
        "improvement_pct": pct or "",
    }
    return SatisfactionResponse.model_validate(row, context=CTX)


def participant(
    subject: str, arm: str | None, enrolled_on: str | None, **extra: str
) -> Participant:
    row: dict[str, Any] = {
        "subject_id": subject,
        "arm": arm or "",
        "sex": "female",
        "birth_date": "1990-01-01",
        "consent_date": "2024-08-30",
        "enrolled_on": enrolled_on or "",
        **extra,
    }
    return Participant.model_validate(row, context=CTX)


def event(ae_id: str, subject: str, term: str, grade: int, serious: str = "no") -> AdverseEvent:
    row: dict[str, Any] = {
        "ae_id": ae_id,
        "subject_id": subject,
        "term": term,
        "onset_on": "2024-10-05",
        "grade": str(grade),
        "serious": serious,
        "causality": "possibly_related",
        "outcome": "recovered",
    }
    return AdverseEvent.model_validate(row, context=CTX)


# ------------------------------------------------------------------------ satisfaction level


@pytest.mark.parametrize(
    ("pct", "level"),
    [
        ("100", L.VERY_SATISFIED),
        ("75", L.VERY_SATISFIED),  # >= 75
        ("74.9", L.SATISFIED),
        ("50", L.SATISFIED),  # [50, 75)
        ("49.9", L.AVERAGE),
        ("25", L.AVERAGE),  # [25, 50)
        ("24.9", L.DISSATISFIED),  # < 25
        ("0", L.DISSATISFIED),
        ("-10", L.DISSATISFIED),  # worse than before
    ],
)
def test_level_from_improvement(pct: str, level: SatisfactionLevel) -> None:
    assert level_from_improvement(D(pct)) is level


def test_response_level_prefers_the_given_level() -> None:
    # the patient says "dissatisfied" although the estimate (90 %) would mean very_satisfied
    assert response_level(response("S001", "m1", "dissatisfied", "90")) is L.DISSATISFIED
    assert response_level(response("S001", "m1", "satisfied")) is L.SATISFIED


def test_response_level_from_estimate_when_no_level() -> None:
    r = response("S001", "m1", None, "60")
    assert r.level is None
    assert response_level(r) is L.SATISFIED  # 60 in [50, 75)
    assert response_level(response("S001", "m1", None, "24.9")) is L.DISSATISFIED


# ------------------------------------------------------------------------- satisfaction rate


def test_satisfaction_rates_per_visit_and_arm() -> None:
    responses = [
        # m3 first in the input: the output is still in visit order
        response("S001", "m3", "dissatisfied"),
        response("S005", "m3", "satisfied"),  # no arm: counts only in the visit's total
        response("S001", "m1", "very_satisfied"),
        response("S002", "m1", "satisfied"),
        response("S003", "m1", "average"),
        response("S004", "m1", None, "60"),  # derived: satisfied
    ]
    arm_of: dict[str, str | None] = {
        "S001": "combo",
        "S002": "combo",
        "S003": "laser",
        "S004": "laser",
        "S005": None,
    }
    rates = satisfaction_rates(responses, arm_of, TRIAL.visit_order)
    got = {(r.visit, r.arm): r for r in rates}
    assert [(r.visit, r.arm) for r in rates] == [
        ("m1", None),
        ("m1", "combo"),
        ("m1", "laser"),
        ("m3", None),
        ("m3", "combo"),
    ]
    # m1 all arms: very_satisfied S001 + satisfied S002, S004 = 3 of 4 responses -> 75
    m1 = got[("m1", None)]
    assert (m1.numerator, m1.denominator) == (3, 4)
    assert m1.rate_pct == D(75)
    assert m1.counts[L.VERY_SATISFIED] == 1
    assert m1.counts[L.SATISFIED] == 2
    assert m1.counts[L.AVERAGE] == 1
    assert m1.counts[L.DISSATISFIED] == 0
    # m1 combo: S001, S002 both satisfied -> 2 / 2 = 100
    assert (got[("m1", "combo")].numerator, got[("m1", "combo")].denominator) == (2, 2)
    assert got[("m1", "combo")].rate_pct == D(100)
    # m1 laser: S004 satisfied, S003 average -> 1 / 2 = 50
    assert (got[("m1", "laser")].numerator, got[("m1", "laser")].denominator) == (1, 2)
    assert got[("m1", "laser")].rate_pct == D(50)
    # m3 all: S005 satisfied, S001 dissatisfied -> 1 / 2 = 50; combo: 0 / 1 = 0
    assert (got[("m3", None)].numerator, got[("m3", None)].denominator) == (1, 2)
    assert got[("m3", None)].rate_pct == D(50)
    assert (got[("m3", "combo")].numerator, got[("m3", "combo")].denominator) == (0, 1)
    assert got[("m3", "combo")].rate_pct == D(0)
    for r in rates:
        assert isinstance(r.rate_pct, Decimal)


def test_satisfaction_rate_exact_thirds() -> None:
    responses = [
        response("S001", "m2", "satisfied"),
        response("S002", "m2", "average"),
        response("S003", "m2", "very_satisfied"),
    ]
    (rate,) = satisfaction_rates(responses, {}, TRIAL.visit_order)
    # 2 of 3 -> 200 / 3 = 66.66... (exact Decimal, reported rounded elsewhere)
    assert (rate.numerator, rate.denominator) == (2, 3)
    assert rate.rate_pct == D(200) / D(3)
    assert rate.arm is None


# ------------------------------------------------------------------------------ AE summaries


def ae_fixture() -> tuple[list[Participant], list[AdverseEvent]]:
    participants = [
        participant("S001", "combo", "2024-09-01"),
        participant("S002", "combo", "2024-09-01", status="withdrawn", withdrawn_on="2024-10-20"),
        participant("S003", "combo", "2024-09-02"),
        participant("S004", "combo", "2024-09-03"),  # no events, still in the denominator
        participant("S005", "combo", None),  # screen failure: arm given but never enrolled
        participant("S006", "laser", "2024-09-01"),
        participant("S007", "laser", "2024-09-02"),
        participant("S008", None, None),  # screen failure without arm
    ]
    events = [
        event("AE1", "S001", "erythema", 2),
        event("AE2", "S001", "erythema", 1),  # a later, milder event: S001's max stays 2
        event("AE3", "S002", "erythema", 3, serious="yes"),  # withdrawn participant
        event("AE4", "S005", "erythema", 4, serious="yes"),  # screen failure: never counted
        event("AE5", "S003", "itching", 1),
        event("AE6", "S006", "burning", 2),
        event("AE7", "S008", "burning", 5),  # screen failure: never counted
    ]
    return participants, events


def test_ae_summary_rows_and_counts() -> None:
    rows = summarize_adverse_events(*ae_fixture())
    assert [(r.arm, r.term) for r in rows] == [
        ("combo", "erythema"),
        ("combo", "itching"),
        ("laser", "burning"),
    ]
    erythema, itching, burning = rows
    # combo arm = S001, S002 (withdrawn, included), S003, S004 = 4; S005 never enrolled
    assert erythema.participants_in_arm == 4
    # erythema events AE1, AE2 (S001), AE3 (S002) = 3; AE4 of screen failure S005 excluded
    assert erythema.events == 3
    assert erythema.participants == 2  # S001, S002
    # incidence 2 / 4 * 100 = 50
    assert erythema.incidence_pct == D(50)
    # S001's maximum grade is 2 (grades 2, then 1), S002's is 3
    assert erythema.by_max_grade == {1: 0, 2: 1, 3: 1, 4: 0, 5: 0}
    assert erythema.serious_events == 1  # AE3
    # itching: S003 only -> 1 / 4 * 100 = 25
    assert (itching.events, itching.participants, itching.serious_events) == (1, 1, 0)
    assert itching.incidence_pct == D(25)
    assert itching.by_max_grade == {1: 1, 2: 0, 3: 0, 4: 0, 5: 0}
    # laser = S006, S007; burning S006 -> 1 / 2 * 100 = 50; S008's grade-5 event not counted
    assert burning.participants_in_arm == 2
    assert (burning.events, burning.participants) == (1, 1)
    assert burning.incidence_pct == D(50)
    assert burning.by_max_grade == {1: 0, 2: 1, 3: 0, 4: 0, 5: 0}
    for r in rows:
        assert isinstance(r.incidence_pct, Decimal)


def test_ae_incidence_non_terminating() -> None:
    participants = [
        participant("S001", "laser", "2024-09-01"),
        participant("S002", "laser", "2024-09-01"),
        participant("S003", "laser", "2024-09-01", status="withdrawn", withdrawn_on="2024-09-30"),
    ]
    events = [event("AE1", "S001", "dryness", 1), event("AE2", "S001", "dryness", 1)]
    (row,) = summarize_adverse_events(participants, events)
    # 2 events of 1 participant among 3 enrolled (one withdrawn): 1 / 3 * 100 = 33.33...
    assert (row.events, row.participants, row.participants_in_arm) == (2, 1, 3)
    assert row.incidence_pct == D(100) / D(3)


def test_ae_summary_ignores_screen_failures_entirely() -> None:
    participants = [participant("S005", "combo", None)]
    assert summarize_adverse_events(participants, [event("AE1", "S005", "edema", 2)]) == []


def test_ae_incidence_undefined_for_empty_arm() -> None:
    assert AeSummaryRow("combo", "edema", participants_in_arm=0).incidence_pct is None


# ------------------------------------------------------------------------------ AE suspects


def _ae_row(subject: str, suspect: str) -> dict[str, Any]:
    return {
        "ae_id": f"AE-{subject}-{suspect or 'none'}",
        "subject_id": subject,
        "term": "erythema",
        "onset_on": "2024-10-05",
        "grade": "1",
        "serious": "no",
        "causality": "related",
        "suspect": suspect,
        "outcome": "recovered",
    }


def test_suspect_names_interventions_of_the_study() -> None:
    assert event("AE1", "S001", "erythema", 1).suspected(TRIAL) == ()
    row = {**_ae_row("S001", "both")}
    assert AdverseEvent.model_validate(row, context=CTX).suspected(TRIAL) == ("exosomes", "laser")
    row = {**_ae_row("S001", "laser")}
    assert AdverseEvent.model_validate(row, context=CTX).suspected(TRIAL) == ("laser",)
    with pytest.raises(ValidationError, match="unknown suspect"):
        AdverseEvent.model_validate(_ae_row("S001", "cream"), context=CTX)


@pytest.mark.parametrize(
    ("subject", "suspect", "accepted"),
    [
        ("S001", "laser", True),  # combo arm: exosomes + laser
        ("S001", "exosomes", True),
        ("S001", "both", True),
        ("S001", "", True),  # not stated
        ("S002", "laser", True),  # laser arm
        ("S002", "exosomes", False),  # the laser arm gives no exosomes
        ("S002", "both", False),
        ("S003", "laser", False),  # never enrolled: received nothing
        ("S003", "", True),
    ],
)
def test_a_suspect_outside_the_participants_arm_rejects_the_row(
    subject: str, suspect: str, accepted: bool
) -> None:
    intake = Intake(trial=TRIAL)
    for p in (
        {"subject_id": "S001", "arm": "combo", "enrolled_on": "2024-09-01"},
        {"subject_id": "S002", "arm": "laser", "enrolled_on": "2024-09-01"},
        {"subject_id": "S003", "arm": "", "enrolled_on": ""},
    ):
        row = {"sex": "female", "birth_date": "1990-01-01", "consent_date": "2024-08-30", **p}
        assert intake.accept("participants", row, "participants.csv", 2) is not None
    record = intake.accept("adverse_events", _ae_row(subject, suspect), "adverse_events.csv", 2)
    assert (record is not None) is accepted
    if not accepted:
        (issue,) = [i for i in intake.issues if i.severity == "error"]
        assert (issue.file, issue.line, issue.field) == ("adverse_events.csv", 2, "suspect")
        assert "arm" in issue.reason
