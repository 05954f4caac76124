"""`fhir-adapter demo`: the whole pipeline on the synthetic data set, in one command."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from pathlib import Path

import click

from fhir_adapter.cli.base import AppContext, cli, pass_app, user_errors
from fhir_adapter.cli.data import validate_directory
from fhir_adapter.cli.fhir import mapping_context
from fhir_adapter.domain import EligibilityScreening, MasiRating
from fhir_adapter.eligibility import evaluate
from fhir_adapter.intake import Intake, site_today
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.output import write_bundles, write_ndjson
from fhir_adapter.mapping.validation import validated
from fhir_adapter.scoring import round_half_up, score_visits


def _say(message: str) -> None:
    click.echo(message)


@cli.command()
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=Path("demo-output"),
    show_default=True,
    help="Directory for the data set, FHIR output and report.",
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
    """Generate the synthetic 60-participant set, validate, score, check eligibility, map."""
    from fhir_adapter.generate import generate

    with user_errors():
        from fhir_adapter.testserver import node_bin

        node_bin()  # the local FHIR server needs Node: say so before any work is done
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

        quiet: list[str] = []
        intake, unreadable, _absent = _validate_quietly(app, data, quiet)
        _say("2. validated:")
        for r in intake.reports.values():
            _say(
                f"   {r.file:<22} {r.rows_read:>5} rows  {r.accepted:>5} accepted  "
                f"{r.rejected:>3} rejected  {r.warnings:>3} warnings"
            )
        bad_intake, _, _ = _validate_quietly(app, data / "bad", [])
        _say(
            f"   bad/: {bad_intake.rejected} rows rejected, each with file, line, field and reason "
            f"(`fhir-adapter validate {data / 'bad'}` lists them)"
        )

        scores = score_visits(
            (
                r
                for r in _fresh(app, intake).read_csv("masi", data / "masi.csv")
                if isinstance(r, MasiRating)
            ),
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
                _say(
                    f"   mean MASI improvement at {last}, arm {arm.id}: {mean} % (n={len(values)})"
                )

        verdicts: Counter[str] = Counter()
        for s in _fresh(app, intake).read_csv("eligibility", data / "eligibility.csv"):
            if isinstance(s, EligibilityScreening):
                verdicts[
                    evaluate(s, intake.participants.get(s.subject_id), app.trial).result.value
                ] += 1
        _say("4. eligibility: " + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())))

        for version in ("R4", "R5"):
            ctx = mapping_context(app, version, "registry")
            mapper = DatasetMapper(ctx, _fresh(app), threshold=app.threshold(None))
            counts: Counter[str] = Counter()
            target = out / "fhir" / version.lower()
            resources = validated(mapper.resources(data), ctx.terminology, version)
            target.mkdir(parents=True, exist_ok=True)
            with (target / "all.ndjson").open("wb") as fh:
                written = write_ndjson(resources, fh)
                for resource in write_bundles(
                    written, target / "bundles", app.settings.bundle_size
                ):
                    counts[resource["resourceType"]] += 1
            _say(
                f"5. mapped to FHIR {version}: {sum(counts.values())} resources, all validated "
                f"({', '.join(f'{t} {n}' for t, n in sorted(counts.items()))}); "
                f"{target / 'all.ndjson'} and {target / 'bundles'}/"
            )
        if unreadable:
            _say(f"   unreadable: {', '.join(unreadable)}")
        _sync_step(app, data, out)


def _sync_step(app: AppContext, data: Path, out: Path) -> None:
    """Start the local FHIR server, sync twice (the second sends nothing), read counts back."""
    import time

    from fhir_adapter.client import FhirClient
    from fhir_adapter.sync import sync_directory
    from fhir_adapter.testserver import FhirTestServer

    outbox = out / "outbox.sqlite"
    for suffix in ("", "-wal", "-shm"):  # a fresh in-memory server: start a fresh outbox
        Path(f"{outbox}{suffix}").unlink(missing_ok=True)
    with FhirTestServer() as server:
        _say(f"6. started the local FHIR R4 server (Medplum engine) at {server.base_url}")
        settings = app.settings.model_copy(
            update={"fhir_base_url": server.base_url, "outbox_path": outbox}
        )
        ctx = mapping_context(app, "R4", "registry")
        with FhirClient(settings) as client:
            for attempt in ("first", "second"):
                started = time.perf_counter()
                result = sync_directory(
                    data,
                    ctx=ctx,
                    intake=_fresh(app),
                    client=client,
                    outbox_path=outbox,
                    bundle_size=settings.bundle_size,
                    threshold=app.threshold(None),
                )
                took = time.perf_counter() - started
                send = result.send
                assert send is not None  # noqa: S101 - not a dry run
                _say(
                    f"   {attempt} sync: {send.created} created, {send.updated} updated, "
                    f"{result.stage.unchanged} unchanged, {send.dead_lettered} dead-lettered "
                    f"in {send.bundles} bundles, {took:.1f} s"
                )
            counts = {}
            for rtype in sorted(
                {
                    "Patient",
                    "ResearchSubject",
                    "Observation",
                    "Encounter",
                    "AdverseEvent",
                    "Provenance",
                    "MeasureReport",
                }
            ):
                _, bundle = client.request("GET", rtype, params={"_count": "1"})
                counts[rtype] = bundle.get("total")
            _say(
                "   read back from the server: " + ", ".join(f"{t} {n}" for t, n in counts.items())
            )
        _say(f"   outbox: {outbox} (`fhir-adapter outbox status --outbox {outbox}`)")


def _fresh(app: AppContext, participants_from: Intake | None = None) -> Intake:
    intake = Intake(trial=app.trial, today=site_today(app.timezone))
    if participants_from is not None:
        intake.participants = dict(participants_from.participants)
    return intake


def _validate_quietly(
    app: AppContext, directory: Path, sink: list[str]
) -> tuple[Intake, list[str], list[str]]:
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()) as err:
        result = validate_directory(app, directory, None)
    sink.append(err.getvalue())
    return result
