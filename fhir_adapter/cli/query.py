"""``view`` and ``query``: the trial's tables for registries (SPEC §9, §13).

``fhir-adapter view VIEW_JSON (SOURCE... | --server URL) [--format jsonl|csv|parquet] [--out PATH]
[--engine embedded|spark]`` runs one SQL-on-FHIR ViewDefinition; without ``--out`` it writes JSON
Lines on stdout, one object per row with every column (``null`` where empty), collections as
arrays. ``fhir-adapter query (--server URL | --ndjson DIR) --out DIR`` writes every trial view
as CSV and Parquet and the registry tables as CSV and Markdown.

Exit codes: 0 ok; 65 invalid ViewDefinition; 66 unreadable source or view file; 69 server or
Spark unavailable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import duckdb

from fhir_adapter.cli.base import AppContext, cli, echo_err, pass_app, server_url, user_errors
from fhir_adapter.client import FhirClient
from fhir_adapter.errors import InputUnreadable
from fhir_adapter.query.engine import load_rows, markdown_table, run_views, write_table
from fhir_adapter.query.registry import load_view, tables_from_views, trial_constants, trial_views
from fhir_adapter.query.sources import DEFAULT_PAGE_SIZE, NdjsonSource, ServerSource, Source
from fhir_adapter.query.viewdef import View
from fhir_adapter.settings import Settings

_ENGINES = click.Choice(["embedded", "spark"])


def _source_options(f: Any) -> Any:
    f = click.option(
        "--page-size",
        type=click.IntRange(1, 10000),
        default=DEFAULT_PAGE_SIZE,
        show_default=True,
        help="Search page size (_count) when reading a server.",
    )(f)
    f = click.option(
        "--bulk",
        type=click.Choice(["auto", "never", "always"]),
        default="auto",
        show_default=True,
        help="Bulk Data $export: where the server offers it (auto), never, or required.",
    )(f)
    return click.option(
        "--engine", type=_ENGINES, default="embedded", show_default=True, help="View engine."
    )(f)


def _server_source(app: AppContext, url: str, page_size: int, bulk: str) -> ServerSource:
    return ServerSource(FhirClient(app.settings, url), page_size=page_size, bulk=bulk)


def _run(
    views: Sequence[View],
    source: Source,
    engine: str,
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
) -> None:
    if engine == "embedded":
        run_views(views, source, con)
        return
    from fhir_adapter.query.spark import run_on_spark  # the optional extra, loaded on demand

    results = run_on_spark(views, source, settings=settings)
    for view in views:
        load_rows(con, view, results[view.name])


def _refuse_overwriting_input(out: Path | None, sources: Sequence[Path]) -> None:
    if out is None:
        return
    target = out.resolve()
    for src in sources:
        resolved = src.resolve()
        if target == resolved or resolved in target.parents:
            raise InputUnreadable(f"--out {out} would be written into the input {src}")


@cli.command("view")
@click.argument("view_json", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--server", default=None, callback=server_url, help="Read the resources from this FHIR server."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet"]),
    default="jsonl",
    show_default=True,
)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output file.")
@_source_options
@pass_app
def view_command(
    app: AppContext,
    view_json: Path,
    sources: tuple[Path, ...],
    server: str | None,
    fmt: str,
    out: Path | None,
    engine: str,
    page_size: int,
    bulk: str,
) -> None:
    """Run one SQL-on-FHIR v2 ViewDefinition over NDJSON files/directories or a FHIR server.

    SOURCE is an NDJSON file or a directory whose *.ndjson files are all read; resources are
    filtered on resourceType (Bulk Data layout and `map --format ndjson` output both work).
    Exit codes: 65 invalid ViewDefinition, 66 unreadable source, 69 server unavailable.
    """
    if bool(sources) == bool(server):
        raise click.UsageError("give either SOURCE... or --server URL (exactly one of them)")
    if fmt != "jsonl" and out is None:
        raise click.UsageError(f"--format {fmt} needs --out PATH")
    with user_errors():
        view = load_view(view_json, trial_constants(app.settings))
        _refuse_overwriting_input(out, [*sources, view_json])
        source: Source = (
            NdjsonSource(sources) if sources else _server_source(app, str(server), page_size, bulk)
        )
        con = duckdb.connect()
        try:
            _run([view], source, engine, con, app.settings)
            count = write_table(con, view.name, fmt, out if out is not None else sys.stdout)
        finally:
            con.close()
        if out is not None:
            echo_err(f"{view.name}: {count} rows -> {out}")


@cli.command("query")
@click.option(
    "--server", default=None, callback=server_url, help="Read the trial from this FHIR server."
)
@click.option(
    "--ndjson",
    "ndjson",
    type=click.Path(path_type=Path),
    default=None,
    help="...or from this NDJSON file or directory (Bulk Data layout).",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory.")
@_source_options
@pass_app
def query_command(
    app: AppContext,
    server: str | None,
    ndjson: Path | None,
    out: Path,
    engine: str,
    page_size: int,
    bulk: str,
) -> None:
    """Every trial view (CSV + Parquet, OUT/views/) and the registry tables (CSV + Markdown,
    OUT/registry/): outcomes per arm x visit, AE incidence per arm x term, subject timelines."""
    if (server is None) == (ndjson is None):
        raise click.UsageError("give either --server URL or --ndjson DIR (exactly one of them)")
    with user_errors():
        views = trial_views(app.settings)
        if ndjson is not None:
            _refuse_overwriting_input(out, [ndjson])
        source: Source = (
            NdjsonSource([ndjson])
            if ndjson is not None
            else _server_source(app, str(server), page_size, bulk)
        )
        con = duckdb.connect()
        try:
            _run(views, source, engine, con, app.settings)
            tables = tables_from_views(con, [v.name for v in views], app.settings)
            _write_all(con, tables.views, tables.queries, out)
        finally:
            con.close()
        echo_err(
            f"{len(tables.views)} views -> {out / 'views'}; "
            f"{len(tables.queries)} registry tables -> {out / 'registry'}"
        )


def _write_all(
    con: duckdb.DuckDBPyConnection, views: list[str], queries: list[str], out: Path
) -> None:
    (out / "views").mkdir(parents=True, exist_ok=True)
    (out / "registry").mkdir(parents=True, exist_ok=True)
    for name in views:
        write_table(con, name, "csv", out / "views" / f"{name}.csv")
        write_table(con, name, "parquet", out / "views" / f"{name}.parquet")
    for name in queries:
        write_table(con, name, "csv", out / "registry" / f"{name}.csv")
        markdown = markdown_table(con, name)
        (out / "registry" / f"{name}.md").write_text(markdown, encoding="utf-8")


__all__ = ["markdown_table", "query_command", "view_command"]
