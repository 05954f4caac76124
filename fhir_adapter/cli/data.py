"""Commands on source data: validate, score, eligibility, adjudication, generate."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
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
from fhir_adapter.intake import KINDS, Intake, RejectsWriter, file_name, site_today
from fhir_adapter.jsonout import dumps
from fhir_adapter.scoring import VisitScore, score_visits

_rejects_option = click.option(
    "--rejects",
    type=click.Path(path_type=Path),
    default=None,
    help="Write rejected rows, with line, field and reason, to this CSV file (or directory, "
    "for commands that read a directory). Nothing is written anywhere else.",
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
    )


def _score(
    app: AppContext, path: Path, threshold: Decimal | None, rejects: Path | None
) -> tuple[Intake, list[VisitScore]]:
    writer = RejectsWriter(rejects, single_file=True) if rejects else None
    intake = _intake(app, cross_file=False, rejects=writer)
    try:
        ratings: Iterable[MasiRating] = progress(intake.read_csv("masi", path), "scoring")
        scores = score_visits(
            ratings,
            app.threshold(threshold),
            app.trial.visit_order,
            app.trial.baseline_visit,
        )
    finally:
        if writer:
            writer.close()
    return intake, scores


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
    if not (directory / file_name("participants")).is_file():
        raise InputUnreadable(
            f"{directory}: participants.csv is required (the other files refer to it)"
        )
    writer = RejectsWriter(rejects, single_file=False) if rejects else None
    intake = _intake(app, cross_file=True, rejects=writer)
    unreadable: list[str] = []
    absent: list[str] = []
    try:
        for kind in KINDS:
            path = directory / file_name(kind)
            if not path.is_file():
                absent.append(path.name)
                continue
            try:
                for _ in progress(intake.read_csv(kind, path), f"validating {path.name}"):
                    pass
            except InputUnreadable as exc:
                echo_err(f"error: {exc}")
                unreadable.append(path.name)
    finally:
        if writer:
            writer.close()
    return intake, unreadable, absent


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@_rejects_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_app
def validate(app: AppContext, directory: Path, rejects: Path | None, as_json: bool) -> None:
    """Validate a directory of the eCRF export (participants.csv, eligibility.csv, masi.csv,
    pga.csv, satisfaction.csv, adverse_events.csv): rows read, accepted, rejected per file.

    Exit 65 when any row is rejected, 66 when a file cannot be read at all.
    """
    with user_errors():
        intake, unreadable, absent = validate_directory(app, directory, rejects)
        reports = [r.as_dict() for r in intake.reports.values()]
        if as_json:
            click.echo(dumps({"files": reports, "unreadable": unreadable, "absent": absent}))
        else:
            click.echo(f"{'file':<22}{'rows':>7}{'accepted':>10}{'rejected':>10}{'warnings':>10}")
            for r in reports:
                click.echo(
                    f"{r['file']:<22}{r['rows_read']:>7}{r['accepted']:>10}"
                    f"{r['rejected']:>10}{r['warnings']:>10}"
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
    lists the unanswered ones); criterion ids I1-I5, E1-E14 in protocol order.
    """
    with user_errors():
        if participants_csv is None:
            sibling = eligibility_csv.parent / file_name("participants")
            participants_csv = sibling if sibling.is_file() else None
        intake = _intake(app, cross_file=participants_csv is not None, rejects=None)
        if participants_csv is not None:
            for _ in intake.read_csv("participants", participants_csv):
                pass
        writer = RejectsWriter(rejects, single_file=True) if rejects else None
        intake.rejects = writer
        try:
            screenings = [
                s
                for s in intake.read_csv("eligibility", eligibility_csv)
                if isinstance(s, EligibilityScreening)
            ]
        finally:
            if writer:
                writer.close()
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
@pass_app
def generate(app: AppContext, out_dir: Path, seed: int, n_participants: int) -> None:
    """Write a synthetic, seeded data set (six CSV files) and a bad/ folder of broken files."""
    from fhir_adapter.generate import generate as run_generate

    with user_errors():
        summary = run_generate(out_dir, seed=seed, n_participants=n_participants, trial=app.trial)
        for name, count in summary.rows.items():
            echo_err(f"{name}: {count} rows")
        echo_err(f"bad files: {len(summary.bad_files)} under {out_dir / 'bad'}")
