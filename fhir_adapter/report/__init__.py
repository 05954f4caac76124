"""The trial at a glance (SPEC §9, §13; issue 13): plots, tables and ``summary.json``.

``write_report(tables, out, settings=..., source=...)`` writes into the directory ``out``:

- ``report.html``: one self-contained page (plots embedded, links only to the files below);
- ``summary.json``: the pinned numbers (:mod:`fhir_adapter.report.summary`);
- the plots as PNG (:mod:`fhir_adapter.report.plots`);
- every registry table (``mappings/views/*.sql``) as ``<table>.csv`` and ``<table>.md``.

The directory is replaced whole: written aside, moved in, and files an earlier report wrote
but this one did not are removed (never a file it did not write). Python API::

    tables = registry_tables(NdjsonSource([Path("export/")]))
    data = write_report(tables, Path("report/"), settings=Settings(), source="export/")
    data.summary["arms"]["combo"]["participants"]
"""

from __future__ import annotations

from pathlib import Path

from fhir_adapter.errors import OutputRefused
from fhir_adapter.io.outputs import ReplacedDirectory, check_output
from fhir_adapter.jsonout import dumps
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.query.engine import markdown_table, write_table
from fhir_adapter.query.registry import RegistryTables, query_files
from fhir_adapter.report.data import Labels, ReportData, gather
from fhir_adapter.report.html import render_html
from fhir_adapter.report.plots import PLOTS, write_plots
from fhir_adapter.report.summary import build_summary
from fhir_adapter.settings import Settings
from fhir_adapter.trial import load_trial

REPORT_HTML = "report.html"
SUMMARY_JSON = "summary.json"


def report_file_names(settings: Settings) -> list[str]:
    """Every file name a report writes with the current mappings."""
    tables = [p.stem for p in query_files(settings)]
    return [
        REPORT_HTML,
        SUMMARY_JSON,
        *(p.filename for p in PLOTS),
        *(f"{t}.{ext}" for t in tables for ext in ("csv", "md")),
    ]


def check_report_dir(out: Path, settings: Settings, inputs: list[Path]) -> None:
    """Refuse ``out`` before anything is read when writing it is unsafe (an input, inside an
    input directory, a file, a directory holding files the report does not write)."""
    for source in inputs:
        if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
            raise OutputRefused(f"--out {out}: lies inside the input directory {source}")
    names = set(report_file_names(settings))
    check_output(out, option="--out", inputs=inputs, kind="directory",
                 owned=lambda p: p.name in names)  # fmt: skip


def write_report(
    tables: RegistryTables, out: Path, *, settings: Settings, source: str
) -> ReportData:
    """Write the report of ``tables`` into ``out`` (see the module); returns what it shows."""
    trial = load_trial(settings.mappings_dir)
    data = gather(tables, trial, Terminology(trial, settings.mappings_dir))
    names = set(report_file_names(settings))
    target = ReplacedDirectory(out, lambda p: p.name in names)
    work = target.open()
    try:
        (work / SUMMARY_JSON).write_text(dumps(data.summary, indent=True) + "\n", "utf-8")
        table_files = []
        for name in tables.queries:
            write_table(tables.con, name, "csv", work / f"{name}.csv")
            (work / f"{name}.md").write_text(markdown_table(tables.con, name), "utf-8")
            table_files += [f"{name}.csv", f"{name}.md"]
        write_plots(data, work)
        html = render_html(data, work, table_files, source)
        (work / REPORT_HTML).write_text(html, "utf-8")
    except BaseException:
        target.abort()
        raise
    target.commit()
    return data


__all__ = [
    "REPORT_HTML",
    "SUMMARY_JSON",
    "Labels",
    "ReportData",
    "build_summary",
    "check_report_dir",
    "report_file_names",
    "write_report",
]
