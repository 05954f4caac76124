"""Eligibility engine (SPEC 5): every verdict, the age and consent checks, protocol order."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from fhir_adapter.domain import EligibilityScreening, Participant, RecordContext
from fhir_adapter.eligibility import (
    CriterionState,
    Verdict,
    age_in_completed_years,
    evaluate,
)
from fhir_adapter.trial import load_trial

TRIAL = load_trial()
CTX = RecordContext(trial=TRIAL)
SCREENED_ON = "2024-09-02"

# The pinned eligibility.csv columns (SPEC 5), in protocol order.
INCLUSION = {
    "I1": "i1_good_health",
    "I2": "i2_melasma_facial_lesions",
    "I3": "i3_informed_consent",
    "I4": "i4_other_pigmentary_disorders_excluded",
    "I5": "i5_no_other_cosmetic_treatment",
}
EXCLUSION = {
    "E1": "e1_refuses_consent",
    "E2": "e2_organ_autoimmune_or_immune_disease",
    "E3": "e3_coagulation_thrombosis_or_genetic_history",
    "E4": "e4_pregnant_or_lactating",
    "E5": "e5_oral_contraceptive_or_hrt_12m",
    "E6": "e6_keloid_prone",
    "E7": "e7_local_skin_damage_or_disease",
    "E8": "e8_severe_allergy_photosensitivity_or_anesthetic_allergy",
    "E9": "e9_post_inflammatory_hyperpigmentation_history",
    "E10": "e10_prior_melasma_treatment",
    "E11": "e11_prior_peel_or_resurfacing",
    "E12": "e12_chronic_skin_disease",
    "E13": "e13_in_other_clinical_study",
    "E14": "e14_investigator_judgement",
}
COLUMN = {**INCLUSION, **EXCLUSION}
PROTOCOL_ORDER = [*INCLUSION, *EXCLUSION]


def screening(**answers: str | None) -> EligibilityScreening:
    """An eligibility.csv row: every inclusion `yes`, every exclusion `no`, unless overridden.

    Keyword names are criterion ids (I1=..., E10=...); None removes the column's value.
    """
    row: dict[str, Any] = {
        "subject_id": "S001",
        "screened_on": SCREENED_ON,
        "screened_by": "Dr Lin",
    }
    row.update({col: "yes" for col in INCLUSION.values()})
    row.update({col: "no" for col in EXCLUSION.values()})
    for cid, value in answers.items():
        row[COLUMN[cid]] = "" if value is None else value
    return EligibilityScreening.model_validate(row, context=CTX)


def participant(
    birth_date: str = "1990-05-15", consent_date: str | None = "2024-09-01", sex: str = "female"
) -> Participant:
    row = {
        "subject_id": "S001",
        "sex": sex,
        "birth_date": birth_date,
        "consent_date": consent_date or "",
    }
    return Participant.model_validate(row, context=CTX)


def test_trial_criteria_are_the_pinned_columns_in_protocol_order() -> None:
    assert [c.id for c in TRIAL.criteria] == PROTOCOL_ORDER
    assert {c.id: c.column for c in TRIAL.criteria} == COLUMN


# ------------------------------------------------------------------------------------- age


@pytest.mark.parametrize(
    ("birth", "on", "age"),
    [
        ("2000-05-15", "2024-05-15", 24),  # birthday today: the year is completed
        ("2000-05-15", "2024-05-14", 23),  # the day before
        ("2000-05-15", "2024-12-31", 24),
        ("2000-12-31", "2025-01-01", 24),
        ("2000-02-29", "2024-02-29", 24),  # leap-year birthday in a leap year
        ("2000-02-29", "2024-02-28", 23),
        ("2000-02-29", "2023-02-28", 22),  # non-leap year: not yet on 28 Feb ...
        ("2000-02-29", "2023-03-01", 23),  # ... completed on 1 March
        ("2000-05-15", "2000-05-15", 0),
    ],
)
def test_age_in_completed_years(birth: str, on: str, age: int) -> None:
    assert age_in_completed_years(dt.date.fromisoformat(birth), dt.date.fromisoformat(on)) == age


# -------------------------------------------------------------------------------- verdicts


def test_eligible() -> None:
    result = evaluate(screening(), participant(), TRIAL)
    assert result.result is Verdict.ELIGIBLE
    assert result.failed == ()
    assert result.unknown == ()
    assert result.subject_id == "S001"
    assert result.screened_on == dt.date(2024, 9, 2)
    assert [cid for cid, _ in result.criteria] == PROTOCOL_ORDER
    assert all(state is CriterionState.MET for _, state in result.criteria)
    assert result.as_dict() == {
        "subject_id": "S001",
        "result": "eligible",
        "failed": [],
        "unknown": [],
    }


def test_ineligible_lists_failures_in_protocol_order() -> None:
    # E10 sorts after E9 (protocol order), not after E1 (string order)
    result = evaluate(screening(E10="yes", E9="yes", E1="yes", I2="no"), participant(), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I2", "E1", "E9", "E10")
    assert result.unknown == ()
    assert result.as_dict()["failed"] == ["I2", "E1", "E9", "E10"]


def test_incomplete_lists_unknowns_in_protocol_order() -> None:
    result = evaluate(screening(E14=None, I4=None, E2=None, E11=None), participant(), TRIAL)
    assert result.result is Verdict.INCOMPLETE
    assert result.failed == ()
    assert result.unknown == ("I4", "E2", "E11", "E14")
    states = dict(result.criteria)
    assert states["I4"] is CriterionState.UNKNOWN
    assert states["I5"] is CriterionState.MET


def test_missing_column_is_unknown() -> None:
    row: dict[str, Any] = {"subject_id": "S001", "screened_on": SCREENED_ON}
    row.update({col: "yes" for col in INCLUSION.values()})
    row.update({col: "no" for col in EXCLUSION.values() if col != EXCLUSION["E12"]})
    s = EligibilityScreening.model_validate(row, context=CTX)
    result = evaluate(s, participant(), TRIAL)
    assert result.result is Verdict.INCOMPLETE
    assert result.unknown == ("E12",)


def test_ineligible_wins_over_incomplete_and_still_lists_unknown() -> None:
    result = evaluate(screening(E4="yes", I5=None, E13=None), participant(), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("E4",)
    assert result.unknown == ("I5", "E13")
    assert result.as_dict() == {
        "subject_id": "S001",
        "result": "ineligible",
        "failed": ["E4"],
        "unknown": ["I5", "E13"],
    }


@pytest.mark.parametrize(
    ("birth_date", "age", "verdict"),
    [
        # screened on 2024-09-02
        ("2006-09-03", 17, Verdict.INELIGIBLE),  # turns 18 the day after screening
        ("2006-09-02", 18, Verdict.ELIGIBLE),  # 18th birthday on the screening day
        ("1963-09-03", 60, Verdict.ELIGIBLE),  # turns 61 the day after screening
        ("1963-09-02", 61, Verdict.INELIGIBLE),  # 61st birthday on the screening day
    ],
)
def test_age_boundaries_on_screened_on(birth_date: str, age: int, verdict: Verdict) -> None:
    assert age_in_completed_years(dt.date.fromisoformat(birth_date), dt.date(2024, 9, 2)) == age
    result = evaluate(screening(), participant(birth_date=birth_date), TRIAL)
    assert result.result is verdict
    assert result.failed == (() if verdict is Verdict.ELIGIBLE else ("I1",))


def test_good_health_no_fails_i1() -> None:
    result = evaluate(screening(I1="no"), participant(), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I1",)


def test_good_health_unknown_with_valid_age_is_unknown() -> None:
    result = evaluate(screening(I1=None), participant(), TRIAL)
    assert result.result is Verdict.INCOMPLETE
    assert result.unknown == ("I1",)


def test_age_out_of_range_fails_i1_even_when_health_unknown() -> None:
    result = evaluate(screening(I1=None), participant(birth_date="1950-01-01"), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I1",)
    assert result.unknown == ()


def test_missing_consent_date_fails_i3() -> None:
    result = evaluate(screening(), participant(consent_date=None), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I3",)


def test_consent_after_screening_fails_i3() -> None:
    result = evaluate(screening(), participant(consent_date="2024-09-03"), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I3",)


def test_consent_on_screening_day_meets_i3() -> None:
    result = evaluate(screening(), participant(consent_date=SCREENED_ON), TRIAL)
    assert result.result is Verdict.ELIGIBLE


def test_consent_answer_no_fails_i3() -> None:
    result = evaluate(screening(I3="no"), participant(), TRIAL)
    assert result.failed == ("I3",)


def test_e4_yes_excludes() -> None:
    result = evaluate(screening(E4="yes"), participant(), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("E4",)


def test_e4_is_never_inferred_from_sex() -> None:
    male = participant(sex="male")
    assert evaluate(screening(E4="no"), male, TRIAL).result is Verdict.ELIGIBLE
    result = evaluate(screening(E4=None), male, TRIAL)
    assert result.result is Verdict.INCOMPLETE
    assert result.unknown == ("E4",)


def test_no_participant_leaves_i1_and_i3_unknown() -> None:
    result = evaluate(screening(), None, TRIAL)
    assert result.result is Verdict.INCOMPLETE
    assert result.failed == ()
    assert result.unknown == ("I1", "I3")


def test_no_participant_but_failed_answer_is_ineligible() -> None:
    result = evaluate(screening(I1="no", E6="yes"), None, TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == ("I1", "E6")
    assert result.unknown == ("I3",)


@pytest.mark.parametrize("cid", PROTOCOL_ORDER)
def test_each_criterion_fails_on_its_own(cid: str) -> None:
    answer = "no" if cid.startswith("I") else "yes"
    result = evaluate(screening(**{cid: answer}), participant(), TRIAL)
    assert result.result is Verdict.INELIGIBLE
    assert result.failed == (cid,)
    assert dict(result.criteria)[cid] is CriterionState.NOT_MET


def test_answers_are_case_insensitive() -> None:
    result = evaluate(screening(I2="YES", E5="No"), participant(), TRIAL)
    assert result.result is Verdict.ELIGIBLE
