"""Commands that produce FHIR: map."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click

from fhir_adapter.cli.base import AppContext, cli, echo_err, pass_app, progress, user_errors
from fhir_adapter.errors import ExitCode
from fhir_adapter.intake import Intake, RejectsWriter, site_today
from fhir_adapter.mapping.context import FhirVersion, MappingContext, Target
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.output import write_bundles, write_ndjson
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import validated


def mapping_context(app: AppContext, version: FhirVersion, target: Target) -> MappingContext:
    settings = app.settings
    return MappingContext(
        trial=app.trial,
        terminology=Terminology(app.trial, settings.mappings_dir),
        identifier_base=settings.identifier_base,
        fhir_version=version,
        target=target,
        mrn_system=settings.mrn_system,
        timezone=app.timezone,
    )


@cli.command("map")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output: a directory of bundle-0001.json… (bundle) or one file (ndjson).",
)
@click.option(
    "--fhir-version",
    type=click.Choice(["R4", "R5"]),
    default=None,
    help="FHIR version (default: FHIR_ADAPTER_FHIR_VERSION, R4).",
)
@click.option(
    "--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle", show_default=True
)
@click.option(
    "--target",
    type=click.Choice(["registry", "hospital"]),
    default="registry",
    show_default=True,
    help="registry: pseudonymous (no birth date, no MRN); hospital: with both.",
)
@click.option(
    "--bundle-size",
    type=click.IntRange(1, 10000),
    default=None,
    help="Entries per transaction Bundle (default: FHIR_ADAPTER_BUNDLE_SIZE, 100).",
)
@click.option(
    "--rejects",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for rejected rows (one CSV per input file).",
)
@pass_app
def map_command(
    app: AppContext,
    directory: Path,
    out: Path,
    fhir_version: FhirVersion | None,
    fmt: str,
    target: Target,
    bundle_size: int | None,
    rejects: Path | None,
) -> None:
    """Map a directory of the eCRF export to FHIR: transaction Bundles or NDJSON.

    Every resource is validated (structure and value sets) before it is written; output is
    byte-identical for the same input. Prints resource counts per type on stderr.
    """
    with user_errors():
        version: FhirVersion = fhir_version or app.settings.fhir_version
        ctx = mapping_context(app, version, target)
        writer = RejectsWriter(rejects, single_file=False) if rejects else None
        intake = Intake(
            trial=app.trial, today=site_today(app.timezone), rejects=writer, on_issue=echo_err
        )
        mapper = DatasetMapper(ctx, intake, threshold=app.threshold(None))
        counts: Counter[str] = Counter()
        resources = validated(mapper.resources(directory), ctx.terminology, version)
        resources = progress(resources, "mapping", unit="resources")
        try:
            if fmt == "ndjson":
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("wb") as fh:
                    for resource in write_ndjson(resources, fh):
                        counts[resource["resourceType"]] += 1
            else:
                size = bundle_size or app.settings.bundle_size
                for resource in write_bundles(resources, out, size):
                    counts[resource["resourceType"]] += 1
        finally:
            if writer:
                writer.close()
        for resource_type, n in sorted(counts.items()):
            echo_err(f"{resource_type:<16}{n:>7}")
        echo_err(f"{'total':<16}{sum(counts.values()):>7}")
    if mapper.unreadable:
        sys.exit(int(ExitCode.INPUT_UNREADABLE))
    if intake.rejected:
        sys.exit(int(ExitCode.DATA_ERROR))
