"""``export``: the de-identified Bulk Data export for registries (SPEC §9, §13).

``fhir-adapter export (--server URL | --ndjson PATH) --out DIR`` writes ``<Type>.ndjson`` per
resource type, ``manifest.json`` and, when there are messages, ``OperationOutcome.ndjson``,
governed by ``mappings/deidentify.yaml``. The key comes from ``FHIR_ADAPTER_DEID_KEY`` only
(never an argument: command lines are visible to other users of the machine).

Exit codes: 0 ok; 65 some resources withheld (listed in the manifest's ``error`` file); 66 no
key, an unreadable source or an unusable ``--out``; 69 server unavailable.
"""

from __future__ import annotations

import sys
import zoneinfo
from pathlib import Path
from typing import Any

import click

from fhir_adapter.cli.base import AppContext, cli, echo_err, pass_app, server_url, user_errors
from fhir_adapter.client import FhirClient
from fhir_adapter.errors import ExitCode
from fhir_adapter.export import (
    BulkWriter,
    Exporter,
    ExportResult,
    Spooled,
    check_output,
    key_bytes,
    load_rules,
)
from fhir_adapter.export.vocabularies import trial_vocabularies
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import ResourceValidator
from fhir_adapter.query.sources import DEFAULT_PAGE_SIZE, NdjsonSource, ServerSource

Resource = dict[str, Any]


def _validator(terminology: Terminology, *, strict: bool) -> Any:
    """Every exported resource is proven valid R4, structure and value sets (as `map` does)."""
    return ResourceValidator(terminology, "R4", strict=strict).check


def _progress() -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc="de-identifying", unit="resources", file=sys.stderr, leave=False)


def _summary(result: ExportResult, out: Path) -> None:
    for rtype, n in result.counts.items():
        echo_err(f"{rtype:<16}{n:>7}")
    echo_err(f"{'total':<16}{sum(result.counts.values()):>7}")
    left_out = result.not_exported + result.outside_trial
    if left_out:
        echo_err(
            "left out by the allow-list: "
            + ", ".join(f"{t} {n}" for t, n in sorted(left_out.items()))
        )
    if result.manifest["error"]:
        what = f"{result.withheld} resources withheld; " if result.withheld else ""
        echo_err(f"{what}messages in {out / result.manifest['error'][0]['url']}")
    echo_err(f"manifest: {out / 'manifest.json'}")


@cli.command("export")
@click.option(
    "--server",
    default=None,
    callback=server_url,
    help="Read the trial's resources from this FHIR server.",
)
@click.option(
    "--ndjson",
    type=click.Path(path_type=Path),
    default=None,
    help="Read a Bulk Data directory or the file of `map --format ndjson`.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for the export (new, empty, or an earlier export, which is replaced).",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 10000),
    default=DEFAULT_PAGE_SIZE,
    show_default=True,
    help="Search page size (_count) when reading a server.",
)
@click.option(
    "--bulk",
    type=click.Choice(["auto", "never", "always"]),
    default="auto",
    show_default=True,
    help="Read the server with Bulk Data $export where it offers it (auto), never, or required.",
)
@pass_app
def export_command(
    app: AppContext,
    server: str | None,
    ndjson: Path | None,
    out: Path,
    page_size: int,
    bulk: str,
) -> None:
    """De-identified export in Bulk Data layout: pseudonyms, shifted dates, no free text.

    Subject ids and every identifier that reveals them become keyed-HMAC pseudonyms
    (FHIR_ADAPTER_DEID_KEY, required), each subject's dates move back by an offset derived from
    the key, birth date, MRN and free text are dropped; only what mappings/deidentify.yaml lists
    is kept. The same key and data give the same bytes. A limited data set, not anonymous data.
    """
    if (server is None) == (ndjson is None):
        raise click.UsageError("give exactly one source: --server URL or --ndjson PATH")
    with user_errors():
        key = key_bytes(app.settings.deid_key)  # before anything is read
        terminology = Terminology(app.trial, app.settings.mappings_dir)
        vocabularies = trial_vocabularies(app.trial, terminology)
        rules = load_rules(app.settings.mappings_dir, vocabularies)
        check_output(out, [ndjson] if ndjson is not None else [])
        types = rules.exported_types
        client = FhirClient(app.settings, server) if server is not None else None
        if client is not None:
            reader = ServerSource(client, page_size=page_size, bulk=bulk)
            source: Any = Spooled(lambda: reader.resources(types))  # read once, used twice
        else:
            files = NdjsonSource([ndjson])  # type: ignore[list-item]
            source = lambda: files.resources(types)  # noqa: E731 - re-read per pass
        bar = _progress()
        exporter = Exporter(
            rules,
            key,
            identifier_base=app.settings.identifier_base,
            timezone=zoneinfo.ZoneInfo(app.timezone),
            base_url=client.base_url if client is not None else None,
            validate=_validator(terminology, strict=app.settings.strict_validation),
            vocabularies=vocabularies,
            on_resource=bar.update if bar is not None else None,
        )
        writer = BulkWriter(out)
        try:
            result = exporter.run(source, writer)
        except BaseException:
            writer.abort()
            raise
        finally:
            if isinstance(source, Spooled):
                source.close()
            if client is not None:
                client.close()
            if bar is not None:
                bar.close()
        _summary(result, out)
    if result.withheld:
        sys.exit(int(ExitCode.DATA_ERROR))
