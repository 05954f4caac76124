"""Intake: validate rows into domain records, apply the cross-row and cross-file rules of SPEC §3,
report every rejected row (file, line, field, reason) and keep rejects for correction.

Valid rows go on; a rejected row never stops the others. Messages name files, lines and fields,
never values.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from fhir_adapter.domain import (
    AdverseEvent,
    EligibilityScreening,
    MasiRating,
    Participant,
    PgaAssessment,
    Record,
    RecordContext,
    SatisfactionResponse,
)
from fhir_adapter.domain.records import FieldError
from fhir_adapter.io.csvfile import open_csv
from fhir_adapter.trial import Trial

log = logging.getLogger(__name__)

R = TypeVar("R", bound=Record)

#: Source kinds in the order a directory is read (participants first: the others refer to them).
KINDS: dict[str, type[Record]] = {
    "participants": Participant,
    "eligibility": EligibilityScreening,
    "masi": MasiRating,
    "pga": PgaAssessment,
    "satisfaction": SatisfactionResponse,
    "adverse_events": AdverseEvent,
}
MAX_RATERS = 3


def file_name(kind: str) -> str:
    return f"{kind}.csv"


def site_today(timezone: str) -> dt.date:
    """The site's calendar date now: what "in the future" is judged against."""
    return dt.datetime.now(ZoneInfo(timezone)).date()


@dataclass(frozen=True)
class Issue:
    file: str
    line: int | None
    field: str | None
    reason: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return format_issues([self])


@dataclass
class FileReport:
    file: str
    rows_read: int = 0
    accepted: int = 0
    rejected: int = 0
    warnings: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "rows_read": self.rows_read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "warnings": self.warnings,
        }


def format_issues(issues: list[Issue]) -> str:
    """One line for one row: ``file:line: rejected: field: reason; field: reason``."""
    first = issues[0]
    where = first.file if first.line is None else f"{first.file}:{first.line}"
    label = "rejected" if first.severity == "error" else "warning"
    what = "; ".join(f"{i.field}: {i.reason}" if i.field else i.reason for i in issues)
    return f"{where}: {label}: {what}"


def pydantic_issues(
    file: str, line: int | None, exc: ValidationError, raw: Mapping[str, Any] | None = None
) -> list[Issue]:
    """Turn a ValidationError into issues naming fields; never includes the input values."""
    issues = []
    for err in exc.errors(include_input=False, include_url=False):
        error = (err.get("ctx") or {}).get("error")
        if isinstance(error, FieldError):
            issues.append(Issue(file, line, error.field_name, error.message))
            continue
        loc = [str(p) for p in err["loc"] if p != "answers"]
        fld = ".".join(loc) if loc else None
        msg = err["msg"]
        blank = raw is not None and fld is not None and _is_blank(raw.get(loc[-1]))
        if err["type"] == "missing" or (blank and len(loc) == 1):
            msg = "is required"
        issues.append(Issue(file, line, fld, msg))
    return issues


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class RejectsWriter:
    """Rejected rows, as they were, plus where and why, one CSV per input file.

    The written file is itself a valid input file (the extra columns are ignored with a
    warning), so corrected rows can be fed back.
    """

    EXTRA = ("rejected_line", "rejected_field", "reason")

    def __init__(self, target: Path, *, single_file: bool) -> None:
        self.target = target
        self.single_file = single_file
        self._open: dict[str, tuple[IO[str], Any]] = {}
        self.count = 0

    def write(
        self, file: str, columns: list[str], row: Mapping[str, Any], issues: list[Issue]
    ) -> None:
        if file not in self._open:
            path = self.target if self.single_file else self.target / file
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = path.open("w", encoding="utf-8", newline="")
            writer = csv.writer(fh)
            writer.writerow([*columns, *self.EXTRA])
            self._open[file] = (fh, writer)
        _, writer = self._open[file]
        line = issues[0].line if issues else ""
        writer.writerow(
            [
                *(_cell(row.get(c)) for c in columns),
                line if line is not None else "",
                ";".join(sorted({i.field for i in issues if i.field})),
                "; ".join(f"{i.field}: {i.reason}" if i.field else i.reason for i in issues),
            ]
        )
        self.count += 1

    def close(self) -> None:
        for fh, _ in self._open.values():
            fh.close()
        self._open.clear()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


@dataclass
class Intake:
    """Validates records of every kind against the trial and against each other.

    ``cross_file=False`` (the ``score`` command) keeps only the rules inside one file.
    """

    trial: Trial
    today: dt.date | None = None
    cross_file: bool = True
    rejects: RejectsWriter | None = None
    participants: dict[str, Participant] = field(default_factory=dict)
    reports: dict[str, FileReport] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    #: called with one line per rejected row or warning (the CLI prints them to stderr)
    on_issue: Callable[[str], None] | None = None
    _seen: dict[str, set[tuple[str, ...]]] = field(default_factory=lambda: defaultdict(set))
    _raters: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    _participants_loaded: bool = False

    def __post_init__(self) -> None:
        self._ctx = RecordContext(trial=self.trial, today=self.today)

    # -- reporting -----------------------------------------------------------------------
    def _report(self, issues: list[Issue]) -> None:
        """One call per rejected row (all its errors) or per warning."""
        self.issues.extend(issues)
        line = format_issues(issues)
        # identifiers, fields and reasons only: never the row's values
        log.info("%s", line)
        if self.on_issue is not None:
            self.on_issue(line)

    @property
    def rejected(self) -> int:
        return sum(r.rejected for r in self.reports.values())

    # -- entry points --------------------------------------------------------------------
    def read_csv(self, kind: str, path: Path) -> Iterator[Record]:
        """Stream a CSV file of ``kind``: yields accepted records."""
        model = KINDS[kind]
        columns = model.columns(self.trial)
        optional = sorted(model.optional_columns)
        required = [c for c in columns if c not in model.optional_columns]
        csvfile = open_csv(path, required, optional)
        name = path.name
        report = self.reports.setdefault(name, FileReport(name))
        if csvfile.extra_columns:
            report.warnings += 1
            self._report(
                [
                    Issue(
                        name,
                        1,
                        None,
                        "unknown columns ignored: " + ", ".join(csvfile.extra_columns),
                        "warning",
                    )
                ]
            )
        for raw in csvfile:
            record = self.accept(kind, raw.values, name, raw.line, columns=columns)
            if record is not None:
                yield record

    def read_records(
        self, kind: str, records: Iterable[Mapping[str, Any]], source: str
    ) -> tuple[list[Record], list[Issue]]:
        """Validate JSON records (the webhook); returns the accepted ones and every issue."""
        start = len(self.issues)
        accepted = []
        for index, raw in enumerate(records):
            record = self.accept(kind, raw, source, index)
            if record is not None:
                accepted.append(record)
        return accepted, self.issues[start:]

    def accept(
        self,
        kind: str,
        raw: Mapping[str, Any],
        file: str,
        line: int | None,
        *,
        columns: list[str] | None = None,
    ) -> Record | None:
        """Validate one row; report and keep it when rejected; returns the record or None."""
        model = KINDS[kind]
        report = self.reports.setdefault(file, FileReport(file))
        report.rows_read += 1
        try:
            record: Record | None = model.model_validate(dict(raw), context=self._ctx)
            errors: list[Issue] = []
        except ValidationError as exc:
            record, errors = None, pydantic_issues(file, line, exc, raw)
        warnings: list[Issue] = []
        if record is not None:
            record, errors, warnings = self._cross_checks(record, file, line)
        for w in warnings:
            report.warnings += 1
            self._report([w])
        if errors or record is None:
            report.rejected += 1
            self._report(errors)
            if self.rejects is not None:
                self.rejects.write(file, columns or list(model.columns(self.trial)), raw, errors)
            return None
        report.accepted += 1
        return record

    # -- rules across rows and files -----------------------------------------------------
    def _cross_checks(
        self, record: Record, file: str, line: int | None
    ) -> tuple[Record | None, list[Issue], list[Issue]]:
        errors: list[Issue] = []
        warnings: list[Issue] = []

        def error(fld: str | None, reason: str) -> None:
            errors.append(Issue(file, line, fld, reason))

        def warn(fld: str | None, reason: str) -> None:
            warnings.append(Issue(file, line, fld, reason, "warning"))

        subject = getattr(record, "subject_id", None)
        participant = None
        if self.cross_file and not isinstance(record, Participant) and subject is not None:
            participant = self.participants.get(subject)
            if participant is None:
                error("subject_id", "unknown subject (not in participants.csv)")
                return None, errors, warnings

        if isinstance(record, Participant):
            if self._duplicate("participants", (record.subject_id,)):
                error("subject_id", "duplicate subject_id (already given on an earlier row)")
                return None, errors, warnings
            if record.arm is not None and not record.enrolled:
                warn("arm", "given for a participant who is not enrolled; the arm is ignored")
                record = record.model_copy(update={"arm": None})
            elif record.enrolled and record.arm is None:
                warn("arm", "empty for an enrolled participant; arm-level summaries omit them")
            self.participants[record.subject_id] = record
        elif isinstance(record, EligibilityScreening):
            if self._duplicate("eligibility", (record.subject_id,)):
                error("subject_id", "duplicate screening for this subject")
        elif isinstance(record, MasiRating):
            key = (record.subject_id, record.visit)
            if self._duplicate("masi", (*key, record.rater_id)):
                error("rater_id", "duplicate rater for this subject and visit")
            elif self._raters[key] >= MAX_RATERS:
                error("rater_id", f"more than {MAX_RATERS} raters for this subject and visit")
            else:
                self._raters[key] += 1
        elif isinstance(record, PgaAssessment | SatisfactionResponse):
            if self._duplicate(record.kind, (record.subject_id, record.visit)):
                error("visit", "duplicate assessment for this subject and visit")
        elif isinstance(record, AdverseEvent):
            if self._duplicate("ae", (record.ae_id,)):
                error("ae_id", "duplicate ae_id (already given on an earlier row)")
            elif participant is not None and not _received(record, participant, self.trial):
                error("suspect", "names an intervention the participant's arm does not give")

        if not errors and participant is not None:
            self._participant_warnings(record, participant, warn)
        return (None if errors else record), errors, warnings

    def _duplicate(self, scope: str, key: tuple[str, ...]) -> bool:
        seen = self._seen[scope]
        if key in seen:
            return True
        seen.add(key)
        return False

    def _participant_warnings(self, record: Record, participant: Participant, warn: Any) -> None:
        assessed_on = getattr(record, "assessed_on", None)
        visit = getattr(record, "visit", None)
        if assessed_on is None:
            if isinstance(record, AdverseEvent) and not participant.enrolled:
                warn("subject_id", "adverse event for a participant who is not enrolled")
            return
        if participant.withdrawn_on is not None and assessed_on > participant.withdrawn_on:
            warn("assessed_on", "after the participant's withdrawal")
        if visit is None:
            return
        if participant.first_treatment_on is None:
            if visit != self.trial.baseline_visit:
                warn("assessed_on", "participant has no first_treatment_on; window not checked")
            return
        earliest, latest = self.trial.window(visit)
        day = (assessed_on - participant.first_treatment_on).days
        if not earliest <= day <= latest:
            warn(
                "assessed_on",
                f"outside the {visit} window (day {day} after first treatment; "
                f"window {earliest}..{latest})",
            )


def _received(event: AdverseEvent, participant: Participant, trial: Trial) -> bool:
    """Every intervention the AE's ``suspect`` names belongs to the participant's arm."""
    suspected = event.suspected(trial)
    if not suspected:
        return True
    arm = next((a for a in trial.arms if a.id == participant.arm), None)
    return arm is not None and set(suspected) <= set(arm.interventions)
