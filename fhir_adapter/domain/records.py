"""Domain records (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, ClassVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fhir_adapter.trial import Trial

# Business identifiers are built from these values (S001-m3-masi-R1): printable, no spaces or
# separators that would break a search URL. Values outside FHIR's id alphabet get hashed ids.
# Digits are ASCII only ([0-9], never \\d, which also matches full-width and Arabic-Indic
# digits); a sign is '-' only (no '+3'); patterns are matched whole (fullmatch).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_INT_RE = re.compile(r"-?[0-9]+")
_DECIMAL_RE = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)")
#: Longest whole number / decimal accepted as text: longer ones are a clear reject, never a
#: conversion error of Python's (int() refuses more than 4,300 digits).
MAX_INT_DIGITS = 9
MAX_DECIMAL_CHARS = 32
# C0 control characters except tab (NUL, BEL, ESC, a lone CR, ...): never in a value. Line
# breaks (LF, CRLF) only in the free-text fields of a model.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f]")
_CONTROL_EXCEPT_BREAKS_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]|\r(?!\n)")


def _err(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _parse_int(value: object) -> object:
    """Integers as JSON integers or digit strings; never booleans, floats or '3.0'."""
    if value is None:
        raise _err("missing", "is required")
    if isinstance(value, bool):
        raise _err("int_type", "must be a whole number, not true/false")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT_RE.fullmatch(value):
        if len(value.lstrip("-").lstrip("0")) > MAX_INT_DIGITS:
            raise _err("int_too_long", f"is too long a number (at most {MAX_INT_DIGITS} digits)")
        return int(value)
    raise _err("int_parsing", "must be a whole number written with digits 0-9 (e.g. 3, not 3.0)")


def _parse_date(value: object) -> object:
    if value is None:
        raise _err("missing", "is required")
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and _DATE_RE.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise _err("date_value", "is not a real calendar date (YYYY-MM-DD)") from None
    raise _err("date_format", "must be a date written YYYY-MM-DD")


def _parse_decimal(value: object) -> object:
    if value is None:
        raise _err("missing", "is required")
    if isinstance(value, bool):
        raise _err("decimal_type", "must be a number, not true/false")
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, float):
        # JSON readers of this project parse numbers as Decimal; a float here comes from a
        # caller that built records by hand. repr() is the shortest exact round-trip string.
        return Decimal(repr(value))
    if isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        if len(value) > MAX_DECIMAL_CHARS:
            raise _err(
                "decimal_too_long", f"is too long a number (at most {MAX_DECIMAL_CHARS} characters)"
            )
        try:
            return Decimal(value)
        except InvalidOperation:  # pragma: no cover - the regex admits only valid literals
            pass
    raise _err("decimal_parsing", "must be a number written with digits 0-9 (e.g. 40 or 33.5)")


def _parse_id(value: object) -> object:
    if value is None:
        raise _err("missing", "is required")
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        return value
    raise _err(
        "identifier",
        "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    )


WholeNumber = Annotated[int, BeforeValidator(_parse_int)]
Date = Annotated[dt.date, BeforeValidator(_parse_date)]
Number = Annotated[Decimal, BeforeValidator(_parse_decimal)]
Identifier = Annotated[str, BeforeValidator(_parse_id)]
DarknessScore = Annotated[WholeNumber, Field(ge=0, le=4)]
HomogeneityScore = Annotated[WholeNumber, Field(ge=0, le=4)]
AreaScore = Annotated[WholeNumber, Field(ge=0, le=6)]


class YesNo(StrEnum):
    YES = "yes"
    NO = "no"


class Sex(StrEnum):
    FEMALE = "female"
    MALE = "male"
    OTHER = "other"
    UNKNOWN = "unknown"


class ParticipantStatus(StrEnum):
    SCREENING = "screening"
    ON_STUDY = "on-study"
    WITHDRAWN = "withdrawn"
    COMPLETED = "completed"


class SatisfactionLevel(StrEnum):
    VERY_SATISFIED = "very_satisfied"
    SATISFIED = "satisfied"
    AVERAGE = "average"
    DISSATISFIED = "dissatisfied"


class AeTerm(StrEnum):
    ERYTHEMA = "erythema"
    BURNING = "burning"
    ITCHING = "itching"
    DRYNESS = "dryness"
    IRRITATION = "irritation"
    HYPERPIGMENTATION = "hyperpigmentation"
    EDEMA = "edema"
    SCAR_FORMATION = "scar_formation"
    SKIN_BREAKDOWN = "skin_breakdown"
    SKIN_INFECTION = "skin_infection"
    OTHER = "other"


class Causality(StrEnum):
    RELATED = "related"
    POSSIBLY_RELATED = "possibly_related"
    UNLIKELY_RELATED = "unlikely_related"
    UNRELATED = "unrelated"


class Outcome(StrEnum):
    RECOVERED = "recovered"
    RECOVERING = "recovering"
    NOT_RECOVERED = "not_recovered"
    RECOVERED_WITH_SEQUELAE = "recovered_with_sequelae"
    FATAL = "fatal"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RecordContext:
    """What record validation needs beyond the record itself."""

    trial: Trial
    today: dt.date | None = None  # the site's "today"; None disables the future-date check
    extra: dict[str, Any] = field(default_factory=dict)


def _context(info: ValidationInfo) -> RecordContext | None:
    ctx = info.context
    return ctx if isinstance(ctx, RecordContext) else None


class Record(BaseModel):
    """Base of every source record. Empty cells and blank strings mean "absent"."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=True)

    #: The source file this kind of record comes from (the CSV name, the webhook kind).
    kind: ClassVar[str]
    #: Columns a file of this kind may leave out entirely.
    optional_columns: ClassVar[frozenset[str]] = frozenset()
    #: Fields that hold personal data: never logged, never echoed.
    personal_fields: ClassVar[frozenset[str]] = frozenset()
    #: Free-text fields: the only ones whose values may hold line breaks (SPEC §3).
    free_text_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, data: Any) -> Any:
        """Every text value is trimmed of leading and trailing whitespace (CSV and JSON alike,
        free text included); an empty result means "absent". Control characters reject the
        value whatever the field."""
        if isinstance(data, dict):
            fields = _field_names(cls)  # not cls.model_fields: a property, slow per row
            free_text = cls.free_text_fields
            cleaned: dict[str, Any] = {}
            for key, value in data.items():
                if isinstance(value, str) and key in fields:
                    _check_controls(key, value, key in free_text)
                    value = value.strip() or None  # trailing blanks, empty cells
                cleaned[key] = value
            return cleaned
        return data

    @classmethod
    def columns(cls, trial: Trial) -> list[str]:
        """The file's columns in their documented order."""
        return [name for name in cls.model_fields if not name.startswith("_")]

    @field_validator("*", mode="after")
    @classmethod
    def _not_in_future(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, dt.date):
            ctx = _context(info)
            if ctx is not None and ctx.today is not None and value > ctx.today:
                raise _err("date_future", "is in the future")
        return value


@cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(model.model_fields)


def _check_controls(key: str, value: str, free_text: bool) -> None:
    found = (_CONTROL_EXCEPT_BREAKS_RE if free_text else _CONTROL_RE).search(value)
    if found is not None:
        char = found.group()
        what = "a line break" if char in "\r\n" else f"a control character (U+{ord(char):04X})"
        raise _field_error(key, f"contains {what}; remove it")


def _check_visit(value: str | None, info: ValidationInfo) -> str | None:
    ctx = _context(info)
    if value is not None and ctx is not None and value not in ctx.trial.visit_order:
        raise _err(
            "visit", "unknown visit (expected one of " + ", ".join(ctx.trial.visit_ids) + ")"
        )
    return value


# (date, date it may not precede), checked in this order; the first field is the one blamed
_DATE_ORDER = (
    ("enrolled_on", "birth_date"),
    ("consent_date", "birth_date"),
    ("first_treatment_on", "enrolled_on"),
    ("enrolled_on", "consent_date"),
    ("withdrawn_on", "birth_date"),
    ("withdrawn_on", "enrolled_on"),
)


class Participant(Record):
    kind: ClassVar[str] = "participants"
    optional_columns: ClassVar[frozenset[str]] = frozenset({"status", "mrn"})
    personal_fields: ClassVar[frozenset[str]] = frozenset(
        {"birth_date", "mrn", "withdrawal_reason"}
    )
    free_text_fields: ClassVar[frozenset[str]] = frozenset({"withdrawal_reason"})

    subject_id: Identifier
    arm: str | None = None
    sex: Sex
    birth_date: Date
    consent_date: Date | None = None
    enrolled_on: Date | None = None
    first_treatment_on: Date | None = None
    status: ParticipantStatus | None = None
    withdrawn_on: Date | None = None
    withdrawal_reason: str | None = Field(default=None, max_length=1000)
    mrn: str | None = Field(default=None, max_length=64)

    @field_validator("arm")
    @classmethod
    def _known_arm(cls, value: str | None, info: ValidationInfo) -> str | None:
        ctx = _context(info)
        if value is not None and ctx is not None and value not in ctx.trial.arm_ids:
            raise _err(
                "arm", "unknown arm (expected one of " + ", ".join(sorted(ctx.trial.arm_ids)) + ")"
            )
        return value

    @model_validator(mode="after")
    def _dates_in_order(self) -> Participant:
        if self.first_treatment_on is not None and self.enrolled_on is None:
            raise _field_error("first_treatment_on", "is set but enrolled_on is empty")
        for later, earlier in _DATE_ORDER:
            later_day, earlier_day = getattr(self, later), getattr(self, earlier)
            if later_day is not None and earlier_day is not None and later_day < earlier_day:
                raise _field_error(later, f"is before {earlier}")
        if self.status is ParticipantStatus.WITHDRAWN and self.withdrawn_on is None:
            raise _field_error("withdrawn_on", "is required when status is withdrawn")
        if self.withdrawn_on is not None and self.status not in (
            None,
            ParticipantStatus.WITHDRAWN,
        ):
            raise _field_error("status", "must be withdrawn (or empty) when withdrawn_on is set")
        return self

    @property
    def enrolled(self) -> bool:
        return self.enrolled_on is not None

    @property
    def effective_status(self) -> ParticipantStatus:
        """The status column, or what the dates imply when it is empty."""
        if self.status is not None:
            return self.status
        if self.withdrawn_on is not None:
            return ParticipantStatus.WITHDRAWN
        if self.enrolled_on is not None:
            return ParticipantStatus.ON_STUDY
        return ParticipantStatus.SCREENING


class FieldError(ValueError):
    """A model-level rule that blames one field (reported as that field, not the row)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field_name = field_name
        self.message = message


def _field_error(field_name: str, message: str) -> FieldError:
    return FieldError(field_name, message)


class EligibilityScreening(Record):
    """One screening: the answers per criterion column (``yes`` / ``no`` / empty = unknown)."""

    kind: ClassVar[str] = "eligibility"
    optional_columns: ClassVar[frozenset[str]] = frozenset({"screened_by"})

    subject_id: Identifier
    screened_on: Date
    screened_by: str | None = Field(default=None, max_length=64)
    answers: dict[str, YesNo | None] = Field(default_factory=dict)

    @classmethod
    def columns(cls, trial: Trial) -> list[str]:
        return ["subject_id", "screened_on", "screened_by", *(c.column for c in trial.criteria)]

    @model_validator(mode="before")
    @classmethod
    def _pack_answers(cls, data: Any, info: ValidationInfo) -> Any:
        ctx = _context(info)
        if not isinstance(data, dict) or ctx is None or "answers" in data:
            return data
        columns = {c.column for c in ctx.trial.criteria}
        packed = {k: v for k, v in data.items() if k not in columns}
        answers: dict[str, Any] = {}
        for criterion in ctx.trial.criteria:
            raw = data.get(criterion.column)
            if isinstance(raw, str):
                raw = raw.strip().lower() or None  # empty cell = unknown
            answers[criterion.column] = raw
        packed["answers"] = answers
        return packed


class MasiRating(Record):
    """One physician's MASI rating of one subject at one visit: D/H/A for four regions."""

    kind: ClassVar[str] = "masi"

    subject_id: Identifier
    visit: str
    rater_id: Identifier
    assessed_on: Date
    forehead_d: DarknessScore
    forehead_h: HomogeneityScore
    forehead_a: AreaScore
    right_malar_d: DarknessScore
    right_malar_h: HomogeneityScore
    right_malar_a: AreaScore
    left_malar_d: DarknessScore
    left_malar_h: HomogeneityScore
    left_malar_a: AreaScore
    chin_d: DarknessScore
    chin_h: HomogeneityScore
    chin_a: AreaScore

    _visit = field_validator("visit")(_check_visit)


class PgaAssessment(Record):
    kind: ClassVar[str] = "pga"

    subject_id: Identifier
    visit: str
    rater_id: Identifier
    assessed_on: Date
    pga: Annotated[WholeNumber, Field(ge=0, le=6)]

    @field_validator("visit")
    @classmethod
    def _follow_up_visit(cls, value: str, info: ValidationInfo) -> str:
        _check_visit(value, info)
        ctx = _context(info)
        if ctx is not None and value == ctx.trial.baseline_visit:
            raise _err("visit", "PGA is not assessed at baseline (nothing to compare with)")
        return value


class SatisfactionResponse(Record):
    kind: ClassVar[str] = "satisfaction"
    optional_columns: ClassVar[frozenset[str]] = frozenset({"improvement_pct"})

    subject_id: Identifier
    visit: str
    assessed_on: Date
    level: SatisfactionLevel | None = None
    improvement_pct: Annotated[Number, Field(ge=-100, le=100)] | None = None

    @field_validator("visit")
    @classmethod
    def _follow_up_visit(cls, value: str, info: ValidationInfo) -> str:
        _check_visit(value, info)
        ctx = _context(info)
        if ctx is not None and value == ctx.trial.baseline_visit:
            raise _err("visit", "satisfaction is not asked at baseline (nothing to compare with)")
        return value

    @model_validator(mode="after")
    def _level_or_estimate(self) -> SatisfactionResponse:
        if self.level is None and self.improvement_pct is None:
            raise _field_error("level", "is required when improvement_pct is empty")
        return self


#: ``suspect`` value naming every intervention of the study (SPEC §3)
SUSPECT_BOTH = "both"


class AdverseEvent(Record):
    kind: ClassVar[str] = "adverse_events"
    optional_columns: ClassVar[frozenset[str]] = frozenset({"visit", "suspect"})
    personal_fields: ClassVar[frozenset[str]] = frozenset({"term_text", "action_taken"})
    free_text_fields: ClassVar[frozenset[str]] = frozenset({"term_text", "action_taken"})

    ae_id: Identifier
    subject_id: Identifier
    term: AeTerm
    term_text: str | None = Field(default=None, max_length=500)
    onset_on: Date
    resolved_on: Date | None = None
    visit: str | None = None
    grade: Annotated[WholeNumber, Field(ge=1, le=5)]
    serious: YesNo
    causality: Causality
    #: which intervention the causality judgement concerns: an intervention id, ``both``, or
    #: None (not stated)
    suspect: str | None = None
    outcome: Outcome
    action_taken: str | None = Field(default=None, max_length=500)
    reported_on: Date | None = None

    _visit = field_validator("visit")(_check_visit)

    @field_validator("suspect")
    @classmethod
    def _known_suspect(cls, value: str | None, info: ValidationInfo) -> str | None:
        ctx = _context(info)
        if value is None or ctx is None:
            return value
        allowed = [i.id for i in ctx.trial.interventions]
        if value != SUSPECT_BOTH and value not in allowed:
            raise _err(
                "suspect",
                "unknown suspect (expected one of " + ", ".join([*allowed, SUSPECT_BOTH]) + ")",
            )
        return value

    def suspected(self, trial: Trial) -> tuple[str, ...]:
        """The intervention ids the causality judgement concerns (empty: not stated)."""
        if self.suspect is None:
            return ()
        if self.suspect == SUSPECT_BOTH:
            return tuple(i.id for i in trial.interventions)
        return (self.suspect,)

    @model_validator(mode="after")
    def _consistent(self) -> AdverseEvent:
        if self.term is AeTerm.OTHER and not self.term_text:
            raise _field_error("term_text", "is required when term is 'other'")
        if self.resolved_on is not None and self.resolved_on < self.onset_on:
            raise _field_error("resolved_on", "is before onset_on")
        if self.reported_on is not None and self.reported_on < self.onset_on:
            raise _field_error("reported_on", "is before onset_on")
        return self

    @property
    def is_serious(self) -> bool:
        return self.serious is YesNo.YES
