"""`fhir-adapter demo`: the whole pipeline on the synthetic data set, in one command.

Steps (numbered the same in the output): 1 generate, 2 validate (the deliberately bad rows and
why), 3 score, 4 eligibility, 5 map to R4 and R5, 6 start the local FHIR server and sync (twice:
the second sends nothing), 7 the report read back from the server, 8 stop the server.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from fhir_adapter.cli.base import AppContext, cli, pass_app, progress_callback, user_errors
from fhir_adapter.cli.data import validate_directory
from fhir_adapter.cli.fhir import mapping_context
from fhir_adapter.domain import EligibilityScreening, MasiRating
from fhir_adapter.eligibility import evaluate
from fhir_adapter.intake import Intake, site_today
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.output import write_bundles, write_ndjson
from fhir_adapter.mapping.validation import validated
from fhir_adapter.scoring import VisitScore, round_half_up, score_visits

#: rejected rows of the deliberately bad set shown in full (the rest are counted)
SHOWN_REJECTS = 8


def _say(message: str) -> None:
    click.echo(message)


@cli.command()
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Directory for the data set, FHIR output, outbox and report.",
)
@click.option("--seed", type=int, default=20241028, show_default=True)
@click.option(
    "--participants",
    "n_participants",
    type=click.IntRange(2, 100000),
    default=60,
    show_default=True,
    help="Enrolled participants of the synthetic set.",
)
@pass_app
def demo(app: AppContext, out: Path, seed: int, n_participants: int) -> None:
    """The whole trial flow on a synthetic set: generate, validate, score, check eligibility,
    map (R4 and R5), sync to the local FHIR server, and write the report from what it holds."""
    with user_errors():
        from fhir_adapter.testserver import node_bin

        node_bin()  # the local FHIR server needs Node: say so before any work is done
        data = _generate(app, out, seed, n_participants)
        intake = _validate(app, data)
        _score(app, data, intake)
        _eligibility(app, data, intake)
        _map(app, data, out)
        _sync_and_report(app, data, out)


def _generate(app: AppContext, out: Path, seed: int, n_participants: int) -> Path:
    from fhir_adapter.generate import generate

    data = out / "data"
    summary = generate(
        data,
        seed=seed,
        n_participants=n_participants,
        trial=app.trial,
        today=site_today(app.timezone),  # the bad set's future dates stay in the future
    )
    _say(
        f"1. generated {sum(summary.rows.values())} rows in {data} (seed {seed}); "
        f"deliberately bad files in {data / 'bad'}"
    )
    return data


def _validate(app: AppContext, data: Path) -> Intake:
    intake, _ = _validate_quietly(app, data)
    _say("2. validated:")
    for r in intake.reports.values():
        _say(
            f"   {r.file:<22} {r.rows_read:>5} rows  {r.accepted:>5} accepted  "
            f"{r.rejected:>3} rejected  {r.warnings:>3} warnings"
        )
    bad_intake, lines = _validate_quietly(app, data / "bad")
    rejects = [line for line in lines if ": rejected: " in line]
    _say(
        f"   bad/: {bad_intake.rejected} rows rejected, each with file, line, field and reason "
        "(values are never shown), e.g.:"
    )
    for line in rejects[:SHOWN_REJECTS]:
        _say(f"     {line}")
    if len(rejects) > SHOWN_REJECTS:
        _say(f"     … {len(rejects) - SHOWN_REJECTS} more: fhir-adapter validate {data / 'bad'}")
    return intake


def _score(app: AppContext, data: Path, intake: Intake) -> None:
    ratings = _fresh(app, intake).read_csv("masi", data / "masi.csv")
    scores = score_visits(
        (r for r in ratings if isinstance(r, MasiRating)),
        app.threshold(None),
        app.trial.visit_order,
        app.trial.baseline_visit,
    )
    methods = Counter(vs.consensus.method.value for vs in scores)
    waiting = sum(vs.consensus.needs_adjudication for vs in scores)
    _say(
        f"3. scored {len(scores)} subject x visits: "
        + ", ".join(f"{m} {n}" for m, n in sorted(methods.items()))
        + f"; {waiting} await a third physician (`fhir-adapter adjudication`)"
    )
    for line in _improvement_lines(app, scores, intake):
        _say(f"   {line}")


def _improvement_lines(app: AppContext, scores: list[VisitScore], intake: Intake) -> Iterator[str]:
    arm_of = {p.subject_id: p.arm for p in intake.participants.values()}
    last = app.trial.visits[-1].id
    for arm in app.trial.arms:
        values = [
            vs.improvement_pct
            for vs in scores
            if vs.visit == last
            and arm_of.get(vs.subject_id) == arm.id
            and vs.improvement_pct is not None
        ]
        if values:
            mean = round_half_up(sum(values, Decimal(0)) / len(values))
            yield f"mean MASI improvement at {last}, arm {arm.id}: {mean} % (n={len(values)})"


def _eligibility(app: AppContext, data: Path, intake: Intake) -> None:
    verdicts: Counter[str] = Counter()
    for s in _fresh(app, intake).read_csv("eligibility", data / "eligibility.csv"):
        if isinstance(s, EligibilityScreening):
            participant = intake.participants.get(s.subject_id)
            verdicts[evaluate(s, participant, app.trial).result.value] += 1
    _say("4. eligibility: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())))


def _map(app: AppContext, data: Path, out: Path) -> None:
    for version in ("R4", "R5"):
        ctx = mapping_context(app, version, "registry")
        mapper = DatasetMapper(ctx, _fresh(app), threshold=app.threshold(None))
        counts: Counter[str] = Counter()
        target = out / "fhir" / version.lower()
        resources = validated(
            mapper.resources(data),
            ctx.terminology,
            version,
            strict=app.settings.strict_validation,
        )
        target.mkdir(parents=True, exist_ok=True)
        with (target / "all.ndjson").open("wb") as fh:
            written = write_ndjson(resources, fh)
            for resource in write_bundles(written, target / "bundles", app.settings.bundle_size):
                counts[resource["resourceType"]] += 1
        step = (
            "5. mapped to FHIR" if version == "R4" else "   and to FHIR"
        )  # one step, two versions
        _say(
            f"{step} {version}: {sum(counts.values())} resources, all validated "
            f"({', '.join(f'{t} {n}' for t, n in sorted(counts.items()))}); "
            f"{target / 'all.ndjson'} and {target / 'bundles'}/"
        )


def _sync_and_report(app: AppContext, data: Path, out: Path) -> None:
    """Start the local FHIR server, sync twice (the second sends nothing), report from it."""
    from fhir_adapter.testserver import FhirTestServer

    outbox = out / "outbox.sqlite"
    for suffix in ("", "-wal", "-shm", ".lock"):  # a fresh in-memory server: a fresh outbox
        Path(f"{outbox}{suffix}").unlink(missing_ok=True)
    server = FhirTestServer()
    server.start()
    try:
        _say(f"6. started the local FHIR R4 server (Medplum engine) at {server.base_url}")
        settings = app.settings.model_copy(
            update={"fhir_base_url": server.base_url, "outbox_path": outbox}
        )
        _sync_twice(app, settings, data, outbox)
        _report(app, settings, out / "report")
    finally:
        server.close()
    _say("8. stopped the local FHIR server")


def _sync_twice(app: AppContext, settings: Any, data: Path, outbox: Path) -> None:
    from fhir_adapter.client import FhirClient
    from fhir_adapter.sync import sync_directory

    ctx = mapping_context(app, "R4", "registry")
    with FhirClient(settings) as client:
        for attempt in ("first", "second"):
            started = time.perf_counter()
            with progress_callback(f"{attempt} sync") as on_progress:
                result = sync_directory(
                    data,
                    ctx=ctx,
                    intake=_fresh(app),
                    client=client,
                    outbox_path=outbox,
                    bundle_size=settings.bundle_size,
                    threshold=app.threshold(None),
                    on_progress=on_progress,
                )
            send = result.send
            assert send is not None  # noqa: S101 - not a dry run
            _say(
                f"   {attempt} sync: {send.created} created, {send.updated} updated, "
                f"{result.stage.unchanged} unchanged, {send.dead_lettered} dead-lettered "
                f"in {send.bundles} bundles, {time.perf_counter() - started:.1f} s"
            )
        counts = {}
        for rtype in ("AdverseEvent", "Encounter", "MeasureReport", "Observation", "Patient",
                      "Provenance", "ResearchSubject"):  # fmt: skip
            _, bundle = client.request("GET", rtype, params={"_count": "1", "_total": "accurate"})
            counts[rtype] = bundle.get("total")
        _say("   read back from the server: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    _say(f"   outbox: {outbox} (`fhir-adapter outbox status --outbox {outbox}`)")


def _report(app: AppContext, settings: Any, target: Path) -> None:
    from fhir_adapter.client import FhirClient
    from fhir_adapter.query.registry import registry_tables
    from fhir_adapter.query.sources import ServerSource
    from fhir_adapter.report import REPORT_HTML, write_report

    with FhirClient(settings) as client:
        tables = registry_tables(ServerSource(client), settings)
        try:
            data = write_report(tables, target, settings=settings, source=settings.fhir_base_url)
        finally:
            tables.close()
    arms = data.summary["arms"]
    enrolled = ", ".join(f"{arm} {a['participants']}" for arm, a in arms.items())
    _say(f"7. report of what the server holds (enrolled: {enrolled}):")
    _say(f"   {(target / REPORT_HTML).resolve()}")


def _fresh(app: AppContext, participants_from: Intake | None = None) -> Intake:
    intake = Intake(trial=app.trial, today=site_today(app.timezone))
    if participants_from is not None:
        intake.participants = dict(participants_from.participants)
    return intake


def _validate_quietly(app: AppContext, directory: Path) -> tuple[Intake, list[str]]:
    """validate_directory with its stderr lines returned, not printed."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        intake, _, _ = validate_directory(app, directory, None)
    return intake, err.getvalue().splitlines()
