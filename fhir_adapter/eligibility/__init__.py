"""Eligibility engine (SPEC §5): criteria are data in ``mappings/study.yaml``; pure functions.

Each criterion is ``met``, ``not_met`` or ``unknown``. The verdict is ``ineligible`` when any is
not met (unknown ones are still listed), else ``incomplete`` when any is unknown, else
``eligible``. Criterion ids are listed in protocol order.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum

from fhir_adapter.domain import EligibilityScreening, Participant, YesNo
from fhir_adapter.trial import Check, Criterion, Trial


class Verdict(StrEnum):
    ELIGIBLE = "eligible"
    INELIGIBLE = "ineligible"
    INCOMPLETE = "incomplete"


class CriterionState(StrEnum):
    MET = "met"
    NOT_MET = "not_met"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class EligibilityResult:
    subject_id: str
    screened_on: dt.date
    result: Verdict
    failed: tuple[str, ...]
    unknown: tuple[str, ...]
    criteria: tuple[tuple[str, CriterionState], ...]  # (criterion id, state), protocol order

    def as_dict(self) -> dict[str, object]:
        return {
            "subject_id": self.subject_id,
            "result": self.result.value,
            "failed": list(self.failed),
            "unknown": list(self.unknown),
        }


def age_in_completed_years(birth_date: dt.date, on: dt.date) -> int:
    """Completed years on a date (a 29 February birthday completes on 1 March)."""
    before_birthday = (on.month, on.day) < (birth_date.month, birth_date.day)
    return on.year - birth_date.year - int(before_birthday)


def _combine(*states: CriterionState) -> CriterionState:
    if CriterionState.NOT_MET in states:
        return CriterionState.NOT_MET
    if CriterionState.UNKNOWN in states:
        return CriterionState.UNKNOWN
    return CriterionState.MET


def _check(
    check: Check, screening: EligibilityScreening, participant: Participant | None
) -> CriterionState:
    if participant is None:  # nothing known of the participant beyond the screening
        return CriterionState.UNKNOWN
    if check.rule == "age_between":
        age = age_in_completed_years(participant.birth_date, screening.screened_on)
        low = check.min_years if check.min_years is not None else 0
        high = check.max_years if check.max_years is not None else 200
        return CriterionState.MET if low <= age <= high else CriterionState.NOT_MET
    # consent_on_or_before_screening: a missing consent date fails the criterion
    consent = participant.consent_date
    if consent is None or consent > screening.screened_on:
        return CriterionState.NOT_MET
    return CriterionState.MET


def evaluate_criterion(
    criterion: Criterion, screening: EligibilityScreening, participant: Participant | None
) -> CriterionState:
    answer = screening.answers.get(criterion.column)
    if answer is None:
        answered = CriterionState.UNKNOWN
    elif criterion.kind == "inclusion":
        answered = CriterionState.MET if answer is YesNo.YES else CriterionState.NOT_MET
    else:  # exclusion: "yes" excludes
        answered = CriterionState.NOT_MET if answer is YesNo.YES else CriterionState.MET
    return _combine(answered, *(_check(c, screening, participant) for c in criterion.checks))


def evaluate(
    screening: EligibilityScreening, participant: Participant | None, trial: Trial
) -> EligibilityResult:
    states = tuple((c.id, evaluate_criterion(c, screening, participant)) for c in trial.criteria)
    failed = tuple(cid for cid, s in states if s is CriterionState.NOT_MET)
    unknown = tuple(cid for cid, s in states if s is CriterionState.UNKNOWN)
    if failed:
        verdict = Verdict.INELIGIBLE
    elif unknown:
        verdict = Verdict.INCOMPLETE
    else:
        verdict = Verdict.ELIGIBLE
    return EligibilityResult(
        screening.subject_id, screening.screened_on, verdict, failed, unknown, states
    )
