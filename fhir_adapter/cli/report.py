"""``report``: the trial at a glance for registries (SPEC §9, §13; issue 13).

``fhir-adapter report (--server URL | --ndjson PATH) --out DIR`` reads the trial back through
its SQL-on-FHIR views and writes ``report.html``, ``summary.json``, the plots (PNG) and the
registry tables (CSV and Markdown) into DIR.

Exit codes: 0 ok; 2 an unusable --out; 66 unreadable source; 69 server unavailable.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from fhir_adapter.cli.base import AppContext, cli, echo_err, pass_app, server_url, user_errors
from fhir_adapter.client import FhirClient
from fhir_adapter.query.registry import registry_tables
from fhir_adapter.query.sources import DEFAULT_PAGE_SIZE, NdjsonSource, ServerSource, Source


@cli.command("report")
@click.option(
    "--server", default=None, callback=server_url, help="Read the trial from this FHIR server."
)
@click.option(
    "--ndjson",
    type=click.Path(path_type=Path),
    default=None,
    help="...or from this NDJSON file or directory (Bulk Data layout, or `map --format ndjson`).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
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
    help="Bulk Data $export: where the server offers it (auto), never, or required.",
)
@pass_app
def report_command(
    app: AppContext,
    server: str | None,
    ndjson: Path | None,
    out: Path,
    page_size: int,
    bulk: str,
) -> None:
    """Plots, tables and summary.json of the trial: outcomes per arm x visit (MASI with 95 %
    CI, PGA, satisfaction), adverse-event incidence per arm x term, data-quality flags.

    Writes OUT/report.html (self-contained), OUT/summary.json, OUT/*.png and every registry
    table as OUT/<table>.csv and OUT/<table>.md. OUT is replaced whole on every run.
    """
    if (server is None) == (ndjson is None):
        raise click.UsageError("give either --server URL or --ndjson PATH (exactly one of them)")
    # matplotlib is loaded here, not when the CLI starts: other commands stay quick and never
    # touch its cache in the home directory
    from fhir_adapter.report import REPORT_HTML, check_report_dir, write_report

    with user_errors():
        check_report_dir(out, app.settings, [ndjson] if ndjson is not None else [])
        with ExitStack() as stack:
            source: Source
            if ndjson is not None:
                source, label = NdjsonSource([ndjson]), f"NDJSON {ndjson}"
            else:
                client = stack.enter_context(FhirClient(app.settings, str(server)))
                source, label = ServerSource(client, page_size=page_size, bulk=bulk), str(server)
            tables = registry_tables(source, app.settings)
            stack.callback(tables.close)
            data = write_report(tables, out, settings=app.settings, source=label)
        participants = sum(a["participants"] for a in data.summary["arms"].values())
        if participants == 0:
            echo_err("warning: the source holds no enrolled participant of this trial")
        echo_err(f"report: {participants} enrolled participants -> {out / REPORT_HTML}")


__all__ = ["report_command"]
