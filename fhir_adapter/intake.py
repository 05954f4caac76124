"""Intake: validate rows into domain records, apply the cross-row and cross-file rules of SPEC §3,
report every rejected row (file, line, field, reason) and keep rejects for correction.

Valid rows go on; a rejected row never stops the others. Messages name files, lines and fields,
never values. CSV files (:meth:`Intake.read_csv`) and JSON records of the webhook
(:meth:`Intake.read_records`) go through the same :meth:`Intake.accept`.

Policies (README "Bad input"):

- every text value is trimmed of leading and trailing whitespace, in every field, CSV and JSON
  alike; control characters reject it (domain models);
- an MRN that does not match ``FHIR_ADAPTER_MRN_PATTERN`` is dropped and reported as a rejected
  ``mrn`` field; the participant is kept;
- rows of a participant whose own row was rejected (or of a participants.csv that could not be
  read) are rejected and explained once per file, not as "unknown subject" row by row;
- a corrected rejects file (it carries ``rejected_line``) is read with the spreadsheet-safety
  prefix of :class:`RejectsWriter` removed again.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
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
from fhir_adapter.errors import InputUnreadable
from fhir_adapter.io.csvfile import REJECTS_MARKER, CsvLimits, RawRow, open_csv, source_exists
from fhir_adapter.io.outputs import ReplacedDirectory, ReplacedFile, first_line
from fhir_adapter.settings import Settings
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
_SUBJECT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


def file_name(kind: str) -> str:
    return f"{kind}.csv"


def source_files(directory: Path) -> list[Path]:
    """The source files present in ``directory`` (whatever they are: files, links, folders)."""
    return [p for kind in KINDS if source_exists(p := directory / file_name(kind))]


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
    fields_rejected: int = 0  # accepted rows with a value dropped (an MRN off the pattern)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "rows_read": self.rows_read,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "warnings": self.warnings,
            "fields_rejected": self.fields_rejected,
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


# -- rejects files -----------------------------------------------------------------------------
#: First characters a spreadsheet executes as a formula (OWASP "CSV injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def _formula_like(value: str) -> bool:
    """Starts with a trigger, after any leading ``'`` (so that the prefix is reversible)."""
    return value.lstrip("'").startswith(FORMULA_TRIGGERS)


def neutralise(value: str) -> str:
    """A cell a spreadsheet would execute gets a leading ``'`` (OWASP); so does one that already
    starts with ``'`` before such a trigger (``'=x``), so that :func:`unneutralise` gives every
    value back exactly. Others are unchanged."""
    return "'" + value if _formula_like(value) else value


def unneutralise(value: str) -> str:
    """The inverse of :func:`neutralise`, for corrected rejects files fed back."""
    return value[1:] if value.startswith("'") and _formula_like(value[1:]) else value


def is_rejects_file(path: Path) -> bool:
    """A rejects file written by :class:`RejectsWriter` (its header names ``rejected_line``)."""
    head = first_line(path)
    return head is not None and (head == "" or REJECTS_MARKER in head)


class RejectsWriter:
    """Rejected rows, as they were, plus where and why, one CSV per input file.

    The written file is itself a valid input file (the extra columns are ignored with a
    warning), so corrected rows can be fed back. Cells a spreadsheet would execute are
    neutralised (:func:`neutralise`); intake removes the prefix again when it reads a file
    carrying ``rejected_line``. A record that could not be split into cells keeps its first
    physical line, as it was, in ``rejected_text``.

    ``single_file``: every input's rejects go to ``target`` (``files`` may send some inputs,
    by file name, elsewhere) and each of those files is written even when nothing is rejected,
    so a clean run leaves a header-only file, not a stale one. Otherwise ``target`` is a
    directory whose contents are replaced: it ends up holding exactly this run's rejects.
    Use as a context manager (or call :meth:`close`): nothing replaces the old output until
    the run ends without an error.
    """

    EXTRA = ("rejected_line", "rejected_field", "reason", "rejected_text")

    def __init__(
        self, target: Path, *, single_file: bool, files: Mapping[str, Path] | None = None
    ) -> None:
        self.target = target
        self.single_file = single_file
        self.files = dict(files or {})
        self.count = 0
        self._columns: dict[str, list[str]] = {}  # input file -> its columns
        self._open: dict[Path, tuple[IO[str], Any, list[str]]] = {}
        self._replaced: dict[Path, ReplacedFile] = {}
        self._directory: ReplacedDirectory | None = None
        self._incoming: Path | None = None
        if not single_file:
            self._directory = ReplacedDirectory(target, is_rejects_file)
            self._incoming = self._directory.open()

    def _path(self, file: str) -> Path:
        if self.single_file:
            return self.files.get(file, self.target)
        assert self._incoming is not None  # noqa: S101 - set in directory mode
        return self._incoming / file

    def begin(self, file: str, columns: list[str]) -> None:
        """An input file is about to be read: in single-file mode its rejects file is started."""
        self._columns[file] = columns
        if self.single_file:
            self._writer(file, columns)

    def _writer(self, file: str, columns: list[str]) -> Any:
        path = self._path(file)
        if path not in self._open:
            where = path
            if self.single_file:
                replaced = self._replaced[path] = ReplacedFile(path)
                where = replaced.incoming
            where.parent.mkdir(parents=True, exist_ok=True)
            fh: IO[str] = where.open("w", encoding="utf-8", newline="")
            writer = csv.writer(fh)
            writer.writerow([*columns, *self.EXTRA])
            self._open[path] = (fh, writer, columns)
        fh, writer, written_columns = self._open[path]
        if written_columns != columns:
            raise ValueError(f"rejects of {file} need a file of their own")  # a caller's bug
        return writer

    def write(
        self,
        file: str,
        columns: list[str],
        row: Mapping[str, Any],
        issues: list[Issue],
        *,
        text: str | None = None,
    ) -> None:
        writer = self._writer(file, columns)
        line = issues[0].line if issues else None
        cells = [
            *(_cell(row.get(c)) for c in columns),
            "" if line is None else str(line),
            ";".join(sorted({i.field for i in issues if i.field})),
            "; ".join(f"{i.field}: {i.reason}" if i.field else i.reason for i in issues),
            text or "",
        ]
        writer.writerow([neutralise(c) for c in cells])
        self.count += 1

    def close(self, *, ok: bool = True) -> None:
        """Finish: the new rejects replace the old ones (``ok``) or are thrown away."""
        for fh, _, _ in self._open.values():
            fh.close()
        self._open.clear()
        for replaced in self._replaced.values():
            if ok:
                replaced.commit()
            else:
                replaced.abort()
        self._replaced.clear()
        if self._directory is not None:
            if ok:
                self._directory.commit()
            else:
                self._directory.abort()
            self._directory = None

    def __enter__(self) -> RejectsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(ok=exc_type is None)


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _intake_limits(settings: Settings) -> CsvLimits:
    return CsvLimits(max_file_bytes=settings.max_file_bytes, max_columns=settings.max_columns)


@dataclass
class Intake:
    """Validates records of every kind against the trial and against each other.

    ``cross_file=False`` (the ``score`` command) keeps only the rules inside one file.
    ``settings`` gives the limits and the MRN pattern (default: from the environment).
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
    settings: Settings | None = None
    _seen: dict[str, set[tuple[str, ...]]] = field(default_factory=lambda: defaultdict(set))
    _raters: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    #: participants whose row was rejected: subject_id -> (file, line)
    _rejected_participants: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    _participants_unreadable: str | None = None
    _explained: set[tuple[str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._ctx = RecordContext(trial=self.trial, today=self.today)
        settings = self.settings or Settings()
        self._limits = _intake_limits(settings)
        self._mrn = re.compile(settings.mrn_pattern)

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
        """Rejections of every file: rows rejected plus values dropped from kept rows (either
        makes the exit status 65)."""
        return sum(r.rejected + r.fields_rejected for r in self.reports.values())

    # -- entry points --------------------------------------------------------------------
    def read_csv(self, kind: str, path: Path) -> Iterator[Record]:
        """Stream a CSV file of ``kind``: yields accepted records."""
        model = KINDS[kind]
        columns = model.columns(self.trial)
        optional = sorted(model.optional_columns)
        required = [c for c in columns if c not in model.optional_columns]
        name = path.name
        try:
            csvfile = open_csv(
                path, required, optional, limits=self._limits, free_text=model.free_text_fields
            )
        except InputUnreadable:
            if kind == "participants":
                self._participants_unreadable = name
            raise
        report = self.reports.setdefault(name, FileReport(name))
        if self.rejects is not None:
            self.rejects.begin(name, columns)
        unnamed = [f"(unnamed column {n})" for n in csvfile.unnamed_columns]
        ignored = [*csvfile.extra_columns, *unnamed]
        if ignored:
            report.warnings += 1
            self._report(
                [Issue(name, 1, None, "unknown columns ignored: " + ", ".join(ignored), "warning")]
            )
        for raw in csvfile:
            if raw.problem is not None:
                self._reject_structure(kind, name, raw, columns)
                continue
            values = raw.values
            if csvfile.is_rejects_file:
                values = {k: unneutralise(v) for k, v in values.items()}
            record = self.accept(kind, values, name, raw.line, columns=columns, explain_once=True)
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
        explain_once: bool = False,
    ) -> Record | None:
        """Validate one row; report and keep it when rejected; returns the record or None.

        ``explain_once``: a row rejected only because its participant was rejected is
        reported once per file and participant (CSV files), not once per row (JSON records).
        """
        model = KINDS[kind]
        report = self.reports.setdefault(file, FileReport(file))
        report.rows_read += 1
        values = dict(raw)
        dropped = self._check_mrn(values, file, line) if model is Participant else []
        try:
            record: Record | None = model.model_validate(values, context=self._ctx)
            errors: list[Issue] = []
        except ValidationError as exc:
            record, errors = None, pydantic_issues(file, line, exc, values)
        warnings: list[Issue] = []
        if record is not None:
            record, errors, warnings = self._cross_checks(record, file, line)
        for w in warnings:
            report.warnings += 1
            self._report([w])
        cols = columns or list(model.columns(self.trial))
        if errors or record is None:
            if model is Participant:
                self._note_rejected_participant(raw, file, line)
            report.rejected += 1
            errors = [*dropped, *errors]
            if not (explain_once and self._already_explained(errors)):
                self._report(errors)
            if self.rejects is not None:
                self.rejects.write(file, cols, raw, errors)
            return None
        if dropped:
            report.fields_rejected += 1
            self._report(dropped)
            if self.rejects is not None:
                self.rejects.write(file, cols, raw, dropped)
        report.accepted += 1
        return record

    def _reject_structure(self, kind: str, file: str, raw: RawRow, columns: list[str]) -> None:
        """A record that could not be split into the header's cells."""
        assert raw.problem is not None  # noqa: S101 - the caller checked
        report = self.reports.setdefault(file, FileReport(file))
        report.rows_read += 1
        report.rejected += 1
        issue = Issue(file, raw.line, raw.problem.field, raw.problem.reason)
        if kind == "participants":
            self._note_rejected_participant(raw.partial, file, raw.line)
        self._report([issue])
        if self.rejects is not None:
            self.rejects.write(file, columns, {}, [issue], text=raw.text)

    def _check_mrn(self, values: dict[str, Any], file: str, line: int | None) -> list[Issue]:
        """An MRN off the pattern is dropped (the participant is kept) and reported."""
        mrn = values.get("mrn")
        if not isinstance(mrn, str) or not mrn.strip() or self._mrn.fullmatch(mrn.strip()):
            return []
        values["mrn"] = None
        return [
            Issue(
                file,
                line,
                "mrn",
                "does not match the MRN pattern (FHIR_ADAPTER_MRN_PATTERN); the MRN was "
                "dropped, the participant kept",
            )
        ]

    # -- cascades ------------------------------------------------------------------------
    def _note_rejected_participant(
        self, raw: Mapping[str, Any], file: str, line: int | None
    ) -> None:
        subject = raw.get("subject_id")
        if not isinstance(subject, str) or not _SUBJECT_RE.fullmatch(subject.strip()):
            return
        subject = subject.strip()
        if subject not in self.participants:
            self._rejected_participants.setdefault(subject, (file, line))

    def _missing_participant(self, subject: str) -> str:
        """Why a row's participant is not known."""
        if subject in self._rejected_participants:
            file, line = self._rejected_participants[subject]
            where = file if line is None else f"{file}:{line}"
            return (
                f"depends on rejected participant {subject} ({where}); its other rows in this "
                "file are rejected with it"
            )
        if self._participants_unreadable is not None:
            return (
                f"depends on {self._participants_unreadable}, which could not be read; every "
                "row of this file is rejected with it"
            )
        return "unknown subject (not in participants.csv)"

    def _already_explained(self, errors: list[Issue]) -> bool:
        """Whether ``errors`` is only a dependency already explained for its file."""
        if len(errors) != 1 or not errors[0].reason.startswith("depends on "):
            return False
        key = (errors[0].file, errors[0].reason)  # per file and participant (or per file)
        if key in self._explained:
            return True
        self._explained.add(key)
        return False

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
                error("subject_id", self._missing_participant(subject))
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
