"""``report.html``: one self-contained page (no script, no external resource).

The plots are embedded as ``data:`` URIs; links point only at files written beside the page
(the PNGs, ``summary.json``, the tables as CSV and Markdown). Every text from the data is
escaped. The page's date is the latest date in the data, never the clock.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from decimal import Decimal
from html import escape
from pathlib import Path
from typing import Any

from fhir_adapter.report.data import ReportData
from fhir_adapter.report.plots import DASH, PLOTS, Plot
from fhir_adapter.report.stats import mean_ci95

FLAGS = (
    ("awaiting-adjudication", "Awaiting adjudication",
     "Two raters' MASI differ by more than the adjudication threshold: the consensus stays "
     "preliminary (left out of the means above) until a third physician rates."),
    ("pga-masi-discordant", "PGA / MASI discordance",
     "The physician's PGA differs by two grades or more from the grade implied by the MASI "
     "improvement."),
    ("out-of-window", "Out-of-window visits",
     "Assessed outside the visit's window (days after the first treatment, mappings/study.yaml)."),
)  # fmt: skip

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
  max-width: 72rem; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2.4rem; border-bottom: 1px solid
  #ddd; padding-bottom: .2rem; } .meta { color: #555; margin-top: 0; }
nav a { margin-right: 1rem; } figure { margin: 1rem 0; } figure img { max-width: 100%;
  height: auto; border: 1px solid #eee; } figcaption { color: #555; font-size: .9rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .85rem; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; text-align: right; }
th { background: #f4f6f8; } td.text, th.text { text-align: left; }
.flag-count { font-weight: bold; } details { margin: 1rem 0; } .muted { color: #777; }
"""


def _cell(value: Any) -> str:
    if value is None or value == "":
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        return format(value, "f")
    return escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], text_columns: int = 1) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text."""

    def cls(i: int) -> str:
        return ' class="text"' if i < text_columns else ""

    head = "".join(f"<th{cls(i)}>{escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_cell(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(plot: Plot, directory: Path) -> str:
    png = (directory / plot.filename).read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{escape(plot.title)}">'
        f"<figcaption>{escape(plot.caption)} "
        f'(<a href="{escape(plot.filename)}">{escape(plot.filename)}</a>)</figcaption></figure>'
    )


def _participants(data: ReportData) -> str:
    sizes = {r["arm"]: r for r in data.rows("arm_participants")}
    rows = [
        [name, *(sizes.get(arm, {}).get(k) for k in ("participants", "withdrawn", "completed"))]
        for arm, name in data.labels.arms
    ]
    note = (
        '<p class="muted">Enrolled participants of each arm (withdrawn ones included, screen '
        "failures never): the denominators of the incidences below.</p>"
    )
    return _table(["Arm", "Enrolled", "Withdrawn", "Completed (off-study)"], rows) + note


def _masi(data: ReportData) -> str:
    spread = {(r["arm"], r["visit"]): r for r in data.rows("masi_spread")}
    outcomes = {(r["arm"], r["visit"]): r for r in data.rows("outcomes_by_arm_visit")}
    headers = ["Visit"]
    for _, name in data.labels.arms:
        headers += [f"{name}: n final", "preliminary", "MASI mean (95 % CI)", "median",
                    "improvement mean %"]  # fmt: skip
    rows = []
    for visit, label in data.labels.visits:
        row: list[Any] = [label]
        for arm in data.labels.arm_ids:
            cell = data.summary["arms"][arm]["visits"][visit]
            row += [
                cell["n_final"],
                (outcomes.get((arm, visit)) or {}).get("masi_preliminary_n"),
                _mean_ci(cell["masi_mean"], spread.get((arm, visit))),
                cell["masi_median"],
                cell["improvement_mean"],
            ]
        rows.append(row)
    return _table(headers, rows)


def _mean_ci(mean: Decimal | None, spread: dict[str, Any] | None) -> str | None:
    if mean is None:
        return None
    ci = mean_ci95(float(mean), (spread or {}).get("masi_sd"), int((spread or {}).get("n") or 0))
    return f"{mean} ({ci[0]:.2f}{DASH}{ci[1]:.2f})" if ci else str(mean)


def _pga(data: ReportData) -> str:
    headers = ["Arm", "Visit", "n", *[f"PGA {g}" for g, _ in data.labels.pga_grades]]
    rows = []
    for arm, name in data.labels.arms:
        for visit, label in data.labels.visits:
            pga = data.summary["arms"][arm]["visits"][visit]["pga"]
            if sum(pga.values()):
                rows.append([name, label, sum(pga.values()), *pga.values()])
    legend = "; ".join(escape(text) for _, text in data.labels.pga_grades)
    return _table(headers, rows, 2) + f'<p class="muted">Grades: {legend}.</p>'


def _satisfaction(data: ReportData) -> str:
    headers = ["Visit"]
    for _, name in data.labels.arms:
        headers += [f"{name}: satisfied", "responses", "rate %"]
    rows = []
    for visit, label in data.labels.visits:
        cells = [data.summary["arms"][a]["visits"][visit]["satisfaction"]
                 for a in data.labels.arm_ids]  # fmt: skip
        if any(c["denominator"] for c in cells):
            rows.append([label, *[v for c in cells for v in
                                  (c["numerator"], c["denominator"], c["rate"])]])  # fmt: skip
    return _table(headers, rows)


def _adverse_events(data: ReportData) -> str:
    headers = ["Arm", "Term", "Events", "Participants", "Incidence %", "Max grade", "Serious",
               *[f"max grade {g}" for g in range(1, 6)]]  # fmt: skip
    rows = []
    for arm, name in data.labels.arms:
        for term, display in data.labels.terms:
            c = data.summary["adverse_events"][arm][term]
            rows.append([name, display, c["events"], c["participants"], c["incidence"],
                         c["max_grade"], c["serious"], *c["by_max_grade"].values()])  # fmt: skip
    return _table(headers, rows, 2) + (
        '<p class="muted">Serious counts events; "max grade k" counts participants whose '
        "highest CTCAE grade for the term is k.</p>"
    )


def _flags(data: ReportData) -> str:
    flags = data.rows("data_quality_flags")
    parts = ["<ul>"]
    for flag, title, _ in FLAGS:
        count = sum(1 for f in flags if f["flag"] == flag)
        parts.append(f'<li>{escape(title)}: <span class="flag-count">{count}</span></li>')
    parts.append("</ul>")
    for flag, title, explanation in FLAGS:
        mine = [f for f in flags if f["flag"] == flag]
        parts.append(f"<h3>{escape(title)} ({len(mine)})</h3><p>{escape(explanation)}</p>")
        if mine:
            parts.append(_table(
                ["Subject", "Arm", "Visit", "Date", "Detail"],
                [[f["subject_id"], data.labels.arm_name(f["arm"]),
                  data.labels.visit_label(f["visit"]), f["visit_on"], f["detail"]]
                 for f in mine],
                5,
            ))  # fmt: skip
        else:
            parts.append('<p class="muted">None.</p>')
    return "".join(parts)


def _files(table_files: Sequence[str]) -> str:
    names = ["summary.json", *(p.filename for p in PLOTS), *table_files]
    return (
        "<ul>" + "".join(f'<li><a href="{escape(n)}">{escape(n)}</a></li>' for n in names) + "</ul>"
    )


def _timeline(data: ReportData) -> str:
    rows = data.rows("subject_timeline")
    if not rows:
        return '<p class="muted">No visits.</p>'
    columns = list(rows[0])
    return _table(columns, [[r[c] for c in columns] for r in rows], 4)


def render_html(data: ReportData, directory: Path, table_files: Sequence[str], source: str) -> str:
    """The page; ``directory`` holds the PNGs already written, ``table_files`` the names of
    the table files beside it."""
    study = data.study.study
    until = data.data_until.isoformat() if data.data_until else "no dated records"
    figures = {p.name: _figure(p, directory) for p in PLOTS}
    sections = [
        ("participants", "Participants", _participants(data)),
        ("masi", "MASI (primary outcome)", figures["masi_over_time"] + _masi(data)),
        ("pga", "Physician global assessment", figures["pga_by_visit"] + _pga(data)),
        ("satisfaction", "Patient satisfaction",
         figures["satisfaction_rate"] + _satisfaction(data)),
        ("adverse-events", "Adverse events", figures["ae_incidence"] + _adverse_events(data)),
        ("data-quality", "Data-quality flags", _flags(data)),
        ("files", "Files", _files(table_files)),
    ]  # fmt: skip
    nav = "".join(f'<a href="#{k}">{escape(t)}</a>' for k, t, _ in sections)
    body = "".join(f'<section id="{k}"><h2>{escape(t)}</h2>{html}</section>'
                   for k, t, html in sections)  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(study.nct_id)}: trial report</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(study.title)}</h1>"
        f'<p class="meta">{escape(study.nct_id)} · {escape(study.sponsor)} · data up to '
        f"{escape(until)} · source: {escape(source)}</p></header><nav>{nav}</nav>{body}"
        f"<details><summary>Subject timelines ({len(data.rows('subject_timeline'))} visits)"
        f"</summary>{_timeline(data)}</details></body></html>\n"
    )


__all__ = ["render_html"]
