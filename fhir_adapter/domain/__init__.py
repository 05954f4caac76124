"""Validated domain records: one pydantic model per source file (SPEC §3).

The same models validate CSV rows (all values strings) and JSON records (scores integers, dates
strings). Values are parsed strictly: a score is an integer written as digits (``3``, not
``3.0`` or ``true``); a date is ``YYYY-MM-DD``; a decimal never passes through a float.
Rules that need the trial definition (known visits and arms) read it from the validation
context: ``Model.model_validate(row, context=RecordContext(...))``.
"""

from __future__ import annotations

from fhir_adapter.domain.records import (
    AdverseEvent,
    Causality,
    EligibilityScreening,
    MasiRating,
    Outcome,
    Participant,
    ParticipantStatus,
    PgaAssessment,
    Record,
    RecordContext,
    SatisfactionLevel,
    SatisfactionResponse,
    Sex,
    YesNo,
)

__all__ = [
    "AdverseEvent",
    "Causality",
    "EligibilityScreening",
    "MasiRating",
    "Outcome",
    "Participant",
    "ParticipantStatus",
    "PgaAssessment",
    "Record",
    "RecordContext",
    "SatisfactionLevel",
    "SatisfactionResponse",
    "Sex",
    "YesNo",
]
