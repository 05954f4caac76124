"""Commands on source data: validate, score, eligibility, adjudication, generate."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import sys
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path

import click

from fhir_adapter.cli.base import (
    AppContext,
    DecimalParam,
    cli,
    echo_err,
    pass_app,
    progress,
    user_errors,
)
from fhir_adapter.domain import EligibilityScreening, MasiRating
from fhir_adapter.eligibility import evaluate
from fhir_adapter.errors import ExitCode, InputUnreadable
from fhir_adapter.intake import (
    KINDS,
    Intake,
    RejectsWriter,
    file_name,
    is_rejects_file,
    site_today,
    source_files,
)
from fhir_adapter.io.csvfile import source_exists
from fhir_adapter.io.outputs import check_output
from fhir_adapter.jsonout import dumps
from fhir_adapter.scoring import VisitScore, score_visits

_rejects_option = click.option(
    "--rejects",
    type=click.Path(path_type=Path),
    default=None,
    help="Write rejected rows, with line, field and reason, to this CSV file (or directory, "
    "for commands that read a directory), replacing the previous run's. Nothing is written "
    "anywhere else; an input file is never a rejects path.",
)


def _exit(code: ExitCode) -> None:
    if code is not ExitCode.OK:
        sys.exit(int(code))


def score_line(vs: VisitScore) -> dict[str, object]:
    """One line of `score` output: the SPEC §4 contract, keys in their documented order."""
    c = vs.consensus
    return {
        "subject_id": vs.subject_id,
        "visit": vs.visit,
        "masi": c.masi,
        "mmasi": c.mmasi,
        "status": c.status.value,
        "method": c.method.value,
        "raters": list(c.raters),
        "needs_adjudication": c.needs_adjudication,
        "improvement_pct": vs.improvement_rounded,
        "pga_from_masi": vs.pga_from_masi,
    }


def _intake(app: AppContext, *, cross_file: bool, rejects: RejectsWriter | None) -> Intake:
    return Intake(
        trial=app.trial,
        today=site_today(app.timezone),
        cross_file=cross_file,
        rejects=rejects,
        on_issue=echo_err,
        settings=app.settings,
    )


def check_rejects(
    path: Path | None, inputs: Iterable[Path], *, directory: bool, option: str = "--rejects"
) -> None:
    """Refuse a rejects path that is (or holds) an input or a file the adapter did not write,
    before anything is read or written."""
    if path is not None:
        check_output(
            path,
            option=option,
            inputs=inputs,
            kind="directory" if directory else "file",
            owned=is_rejects_file,
        )


def participants_rejects(rejects: Path) -> Path:
    """Where `eligibility --rejects FILE` puts the rejected rows of participants.csv."""
    return rejects.with_name(f"{rejects.stem}.participants{rejects.suffix or '.csv'}")


def _score(
    app: AppContext, path: Path, threshold: Decimal | None, rejects: Path | None
) -> tuple[Intake, list[VisitScore]]:
    check_rejects(rejects, [path], directory=False)
    with _rejects_writer(rejects, single_file=True) as writer:
        intake = _intake(app, cross_file=False, rejects=writer)
        ratings: Iterable[MasiRating] = progress(intake.read_csv("masi", path), "scoring")
        scores = score_visits(
            ratings,
            app.threshold(threshold),
            app.trial.visit_order,
            app.trial.baseline_visit,
        )
    return intake, scores


@contextlib.contextmanager
def _rejects_writer(
    rejects: Path | None, *, single_file: bool, files: dict[str, Path] | None = None
) -> Iterator[RejectsWriter | None]:
    if rejects is None:
        yield None
        return
    with RejectsWriter(rejects, single_file=single_file, files=files) as writer:
        yield writer


@cli.command()
@click.argument("masi_csv", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    type=DecimalParam(),
    default=None,
    help="Adjudication threshold: two raters' MASI differing by more than this need a third "
    "(default: FHIR_ADAPTER_ADJUDICATION_THRESHOLD or mappings/study.yaml, 3.0).",
)
@_rejects_option
@pass_app
def score(app: AppContext, masi_csv: Path, threshold: Decimal | None, rejects: Path | None) -> None:
    """Score a masi.csv file: JSON Lines on stdout, one object per subject x visit.

    Keys: subject_id, visit, masi, mmasi, status, method, raters, needs_adjudication,
    improvement_pct, pga_from_masi. Ordered by subject_id, then visit order. Rejected rows go
    to stderr (file line and field); the rest is still scored and the exit status is 65.
    """
    with user_errors():
        intake, scores = _score(app, masi_csv, threshold, rejects)
        out = sys.stdout
        for vs in scores:
            out.write(dumps(score_line(vs)) + "\n")
        out.flush()
    _exit(ExitCode.DATA_ERROR if intake.rejected else ExitCode.OK)


@cli.command()
@click.argument("masi_csv", type=click.Path(path_type=Path))
@click.option("--threshold", type=DecimalParam(), default=None, help="Adjudication threshold.")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True
)
@pass_app
def adjudication(app: AppContext, masi_csv: Path, threshold: Decimal | None, fmt: str) -> None:
    """The worklist of subject x visits whose two raters differ by more than the threshold.

    Each needs a third physician's rating: the list gives both raters, their MASI, the
    difference and the assessment dates.
    """
    with user_errors():
        intake, scores = _score(app, masi_csv, threshold, None)
        rows = []
        for vs in scores:
            if not vs.consensus.needs_adjudication:
                continue
            a, b = vs.raters
            rows.append(
                {
                    "subject_id": vs.subject_id,
                    "visit": vs.visit,
                    "rater_1": a.rater_id,
                    "masi_1": a.masi,
                    "assessed_on_1": a.assessed_on.isoformat() if a.assessed_on else None,
                    "rater_2": b.rater_id,
                    "masi_2": b.masi,
                    "assessed_on_2": b.assessed_on.isoformat() if b.assessed_on else None,
                    "difference": vs.consensus.difference,
                }
            )
        if fmt == "jsonl":
            for row in rows:
                sys.stdout.write(dumps(row) + "\n")
        else:
            writer = csv.DictWriter(
                sys.stdout,
                fieldnames=[
                    "subject_id",
                    "visit",
                    "rater_1",
                    "masi_1",
                    "assessed_on_1",
                    "rater_2",
                    "masi_2",
                    "assessed_on_2",
                    "difference",
                ],
                lineterminator="\n",
            )
            writer.writeheader()
            writer.writerows(rows)
        echo_err(f"{len(rows)} subject x visit(s) need a third physician")
    _exit(ExitCode.DATA_ERROR if intake.rejected else ExitCode.OK)


def validate_directory(
    app: AppContext, directory: Path, rejects: Path | None
) -> tuple[Intake, list[str], list[str]]:
    """Read every source file of a directory through intake.

    Returns the intake (reports, participants), the unreadable files and the absent ones.
    """
    if not directory.is_dir():
        raise InputUnreadable(f"{directory}: not a directory")
    if not source_exists(directory / file_name("participants")):
        raise InputUnreadable(
            f"{directory}: participants.csv is required (the other files refer to it)"
        )
    check_rejects(rejects, [directory, *source_files(directory)], directory=True)
    unreadable: list[str] = []
    absent: list[str] = []
    with _rejects_writer(rejects, single_file=False) as writer:
        intake = _intake(app, cross_file=True, rejects=writer)
        for kind in KINDS:
            path = directory / file_name(kind)
            if not source_exists(path):  # what is there but is no file is unreadable
                absent.append(path.name)
                continue
            try:
                for _ in progress(intake.read_csv(kind, path), f"validating {path.name}"):
                    pass
            except InputUnreadable as exc:
                echo_err(f"error: {exc}")
                unreadable.append(path.name)
    return intake, unreadable, absent


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_rejects_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_app
def validate(app: AppContext, directory: Path, rejects: Path | None, as_json: bool) -> None:
    """Validate a directory of the eCRF export (participants.csv, eligibility.csv, masi.csv,
    pga.csv, satisfaction.csv, adverse_events.csv): rows read, accepted, rejected per file
    ("dropped": rows kept without a value that was rejected, e.g. an MRN off the pattern).

    Exit 65 when any row or value is rejected, 66 when a file cannot be read at all.
    """
    with user_errors():
        intake, unreadable, absent = validate_directory(app, directory, rejects)
        reports = [r.as_dict() for r in intake.reports.values()]
        if as_json:
            click.echo(dumps({"files": reports, "unreadable": unreadable, "absent": absent}))
        else:
            click.echo(
                f"{'file':<22}{'rows':>7}{'accepted':>10}{'rejected':>10}{'warnings':>10}"
                f"{'dropped':>9}"
            )
            for r in reports:
                click.echo(
                    f"{r['file']:<22}{r['rows_read']:>7}{r['accepted']:>10}"
                    f"{r['rejected']:>10}{r['warnings']:>10}{r['fields_rejected']:>9}"
                )
            for name in unreadable:
                click.echo(f"{name:<22}  unreadable (see the message above)")
            for name in absent:
                click.echo(f"{name:<22}  absent (nothing to check)")
    if unreadable:
        _exit(ExitCode.INPUT_UNREADABLE)
    _exit(ExitCode.DATA_ERROR if intake.rejected else ExitCode.OK)


@cli.command()
@click.argument("eligibility_csv", type=click.Path(path_type=Path))
@click.option(
    "--participants",
    "participants_csv",
    type=click.Path(path_type=Path),
    default=None,
    help="participants.csv (birth_date for the age rule, consent_date for I3). "
    "Default: participants.csv beside ELIGIBILITY_CSV, if there is one.",
)
@_rejects_option
@pass_app
def eligibility(
    app: AppContext, eligibility_csv: Path, participants_csv: Path | None, rejects: Path | None
) -> None:
    """Evaluate the eligibility criteria: JSON Lines {subject_id, result, failed, unknown}.

    result is eligible, ineligible (failed lists the criteria not met) or incomplete (unknown
    lists the unanswered ones); criterion ids I1-I5, E1-E14 in protocol order. With
    --rejects FILE, rejected rows of the participants file go to FILE's sibling
    NAME.participants.csv (e.g. rejects.participants.csv).
    """
    with user_errors():
        if participants_csv is None:
            sibling = eligibility_csv.parent / file_name("participants")
            participants_csv = sibling if source_exists(sibling) else None
        inputs = [eligibility_csv, *([participants_csv] if participants_csv else [])]
        files: dict[str, Path] = {}
        if rejects is not None and participants_csv is not None:
            files[participants_csv.name] = participants_rejects(rejects)
            check_rejects(files[participants_csv.name], inputs, directory=False)
        check_rejects(rejects, inputs, directory=False)
        with _rejects_writer(rejects, single_file=True, files=files) as writer:
            intake = _intake(app, cross_file=participants_csv is not None, rejects=writer)
            if participants_csv is not None:
                for _ in intake.read_csv("participants", participants_csv):
                    pass
            screenings = [
                s
                for s in intake.read_csv("eligibility", eligibility_csv)
                if isinstance(s, EligibilityScreening)
            ]
        for screening in sorted(screenings, key=lambda s: s.subject_id):
            result = evaluate(screening, intake.participants.get(screening.subject_id), app.trial)
            sys.stdout.write(dumps(result.as_dict()) + "\n")
    _exit(ExitCode.DATA_ERROR if intake.rejected else ExitCode.OK)


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=20241028, show_default=True, help="Random seed.")
@click.option(
    "--participants",
    "n_participants",
    type=int,
    default=60,
    show_default=True,
    help="Enrolled participants (screen failures come on top).",
)
@click.option(
    "--today",
    type=click.DateTime(formats=["%Y-%m-%d"]),
    default=None,
    help="The day the data set ends on, YYYY-MM-DD (default: today's date at the site). Every "
    "date is offset from it, so the deliberately bad future dates stay in the future.",
)
@pass_app
def generate(
    app: AppContext, out_dir: Path, seed: int, n_participants: int, today: dt.datetime | None
) -> None:
    """Write a synthetic, seeded data set (six CSV files) and a bad/ folder of broken files.

    The same seed and --today give the same bytes; another --today shifts every date.
    """
    from fhir_adapter.generate import check_out_dir  # heavy, lazy
    from fhir_adapter.generate import generate as run_generate

    with user_errors():
        check_out_dir(out_dir)
        day = today.date() if today is not None else site_today(app.timezone)
        try:
            summary = run_generate(
                out_dir, seed=seed, n_participants=n_participants, trial=app.trial, today=day
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        for name, count in summary.rows.items():
            echo_err(f"{name}: {count} rows")
        echo_err(f"bad files: {len(summary.bad_files)} under {out_dir / 'bad'}")
        echo_err(f"dates end on {day.isoformat()} (--today)")
