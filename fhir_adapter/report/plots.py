"""The report's plots as PNG (matplotlib, Agg canvas; no pyplot, so no global state).

- ``masi_over_time.png``: mean final consensus MASI per arm and visit, 95 % CI bands;
- ``pga_by_visit.png``: PGA grades per visit, one panel per arm, stacked to 100 %;
- ``ae_incidence.png``: participants with >= 1 event per term and arm, in % of the arm;
- ``satisfaction_rate.png``: satisfied or very satisfied, in % of responses, per visit and arm.

Arm names, visit labels, term displays and PGA grades come from ``mappings/`` (via
:class:`~fhir_adapter.report.data.Labels`). Floats appear here only, for drawing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from matplotlib import colormaps, rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend_handler import HandlerTuple

from fhir_adapter.report.data import ReportData
from fhir_adapter.report.stats import mean_ci95

DPI = 110
DASH = "\u2013"  # en dash, for ranges
#: colours per arm, in study.yaml order (colour-blind safe: Okabe-Ito)
ARM_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
STYLE: dict[Any, Any] = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.frameon": False,
}


@dataclass(frozen=True)
class Plot:
    """One plot of the report: its file name, title and what it shows (the html caption)."""

    name: str
    title: str
    caption: str
    draw: Callable[[ReportData], Figure]

    @property
    def filename(self) -> str:
        return f"{self.name}.png"


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(i: int) -> str:
    return ARM_COLOURS[i % len(ARM_COLOURS)]


def _float(value: Any) -> float | None:
    return None if value is None else float(Decimal(value))


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"No {what} in the data", ha="center", va="center",
            transform=ax.transAxes, fontsize=12, color="0.4")  # fmt: skip


def _visit_axis(ax: Axes, labels: Sequence[str], xlabel: str = "Visit") -> None:
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", visible=False)


# -- MASI over time ---------------------------------------------------------------------------
def masi_over_time(data: ReportData) -> Figure:
    fig = _figure(9, 5.5)
    ax = fig.add_subplot()
    labels = data.labels
    spread = {(r["arm"], r["visit"]): r for r in data.rows("masi_spread")}
    top = 0.0
    drawn = False
    handles: list[Any] = []
    texts: list[str] = []
    for i, (arm, name) in enumerate(labels.arms):
        xs, means, lows, highs, band_x = [], [], [], [], []
        for x, visit in enumerate(labels.visit_ids):
            cell = data.summary["arms"][arm]["visits"][visit]
            mean = _float(cell["masi_mean"])
            if mean is None:
                continue
            xs.append(x)
            means.append(mean)
            row = spread.get((arm, visit), {})
            ci = mean_ci95(mean, row.get("masi_sd"), int(row.get("n") or 0))
            if ci is not None:
                band_x.append(x)
                lows.append(max(ci[0], 0.0))
                highs.append(ci[1])
        if not xs:
            continue
        drawn = True
        (line,) = ax.plot(xs, means, marker="o", color=_colour(i), linewidth=2)
        handle: Any = line
        if band_x:
            band = ax.fill_between(band_x, lows, highs, color=_colour(i), alpha=0.18, linewidth=0)
            handle = (band, line)
            top = max(top, *highs)
        top = max(top, *means)
        handles.append(handle)
        texts.append(f"{name} (n = {_n_range(data, arm)} per visit)")
    visit_labels = [label for _, label in labels.visits]
    _visit_axis(ax, visit_labels, "Visit (months after the first treatment)")
    ax.set_ylabel(f"Consensus MASI (score, 0{DASH}48)")
    ax.set_title("MASI over time by arm (final consensus scores)")
    if not drawn:
        _no_data(ax, "final consensus MASI")
        ax.set_ylim(0, 48)
        return fig
    ax.set_ylim(0, top * 1.12 + 0.5)
    ax.legend(handles, texts, loc="upper right", title="Mean and 95 % CI of the mean",
              handler_map={tuple: HandlerTuple(ndivide=1)})  # fmt: skip
    return fig


def _n_range(data: ReportData, arm: str) -> str:
    counts = [c["n_final"] for c in data.summary["arms"][arm]["visits"].values() if c["n_final"]]
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}{DASH}{high}"


# -- PGA stacked bars ---------------------------------------------------------------------------
def pga_by_visit(data: ReportData) -> Figure:
    labels = data.labels
    arms = data.summary["arms"]
    visits = [
        (v, label)
        for v, label in labels.visits
        if any(sum(arms[a]["visits"][v]["pga"].values()) for a in labels.arm_ids)
    ]
    fig = _figure(2.2 + 4.4 * max(len(labels.arms), 1), 5.8)
    axes = fig.subplots(1, max(len(labels.arms), 1), sharey=True, squeeze=False)[0]
    cmap = colormaps["RdYlGn_r"]
    grades = labels.pga_grades
    colours = [cmap(0.05 + 0.9 * g / max(len(grades) - 1, 1)) for g, _ in grades]
    for ax, (arm, name) in zip(axes, labels.arms, strict=False):
        ax.set_title(name)
        ax.set_ylim(0, 108)
        if not visits:
            _no_data(ax, "PGA assessments")
            continue
        totals = [sum(arms[arm]["visits"][v]["pga"].values()) for v, _ in visits]
        bottom = [0.0] * len(visits)
        for (grade, glabel), colour in zip(grades, colours, strict=True):
            counts = [arms[arm]["visits"][v]["pga"][str(grade)] for v, _ in visits]
            shares = [100 * c / t if t else 0.0 for c, t in zip(counts, totals, strict=True)]
            ax.bar(range(len(visits)), shares, bottom=bottom, color=colour, width=0.75,
                   edgecolor="white", linewidth=0.5, label=glabel)  # fmt: skip
            bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
        for x, total in enumerate(totals):
            ax.text(x, 101, f"n={total}", ha="center", va="bottom", fontsize=8, color="0.3")
        _visit_axis(ax, [label for _, label in visits])
    axes[0].set_ylabel("Share of PGA assessments (%)")
    handles, texts = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles[::-1], texts[::-1], loc="outside right center",
                   title="PGA grade (physician)")  # fmt: skip
    fig.suptitle("Physician global assessment (PGA) per visit and arm")
    return fig


# -- AE incidence ---------------------------------------------------------------------------------
def ae_incidence(data: ReportData) -> Figure:
    labels = data.labels
    terms = list(labels.terms)
    fig = _figure(9.5, 1.4 + 0.3 * len(terms) * max(len(labels.arms), 1))
    ax = fig.add_subplot()
    events = data.summary["adverse_events"]
    height = 0.8 / max(len(labels.arms), 1)
    right = 0.0
    for i, (arm, name) in enumerate(labels.arms):
        size = data.summary["arms"][arm]["participants"]
        ys = [t + (i - (len(labels.arms) - 1) / 2) * height for t in range(len(terms))]
        values = [_float(events[arm][t]["incidence"]) or 0.0 for t, _ in terms]
        ax.barh(ys, values, height=height * 0.95, color=_colour(i), label=f"{name} (N = {size})")
        for y, value, (term, _) in zip(ys, values, terms, strict=True):
            cell = events[arm][term]
            ax.text(value + 0.6, y, f"{cell['participants']}/{size}", va="center", fontsize=8,
                    color="0.25")  # fmt: skip
        right = max(right, *values)
    ax.set_yticks(range(len(terms)), [display for _, display in terms])
    ax.invert_yaxis()  # the protocol's order, top to bottom
    ax.set_xlim(0, min(100.0, right * 1.18 + 5))
    ax.set_xlabel("Participants with ≥ 1 event (% of the arm's enrolled participants)")
    ax.grid(axis="y", visible=False)
    ax.set_title("Adverse events: incidence per term and arm")
    ax.legend(loc="lower right")
    if not any(events[a][t]["events"] for a in labels.arm_ids for t in labels.term_ids):
        _no_data(ax, "adverse events")
    return fig


# -- satisfaction ---------------------------------------------------------------------------------
def satisfaction_rate(data: ReportData) -> Figure:
    labels = data.labels
    arms = data.summary["arms"]
    visits = [
        (v, label)
        for v, label in labels.visits
        if any(arms[a]["visits"][v]["satisfaction"]["denominator"] for a in labels.arm_ids)
    ]
    fig = _figure(9, 5.2)
    ax = fig.add_subplot()
    width = 0.8 / max(len(labels.arms), 1)
    for i, (arm, name) in enumerate(labels.arms):
        xs = [x + (i - (len(labels.arms) - 1) / 2) * width for x in range(len(visits))]
        cells = [arms[arm]["visits"][v]["satisfaction"] for v, _ in visits]
        rates = [_float(c["rate"]) or 0.0 for c in cells]
        ax.bar(xs, rates, width=width * 0.95, color=_colour(i), label=name)
        for x, rate, cell in zip(xs, rates, cells, strict=True):
            text = f"{cell['numerator']}/{cell['denominator']}" if cell["denominator"] else DASH
            ax.text(x, rate + 1.5, text, ha="center", va="bottom", fontsize=8, color="0.25")
    ax.set_ylim(0, 112)
    ax.set_ylabel("Satisfied or very satisfied (% of responses)")
    ax.set_title("Patient satisfaction rate per visit and arm")
    if not visits:
        _no_data(ax, "satisfaction responses")
        return fig
    _visit_axis(ax, [label for _, label in visits])
    ax.legend(loc="upper left")
    return fig


PLOTS = (
    Plot(
        "masi_over_time",
        "MASI over time",
        "Mean consensus MASI (final values only) per arm at each visit; the band is the 95 % "
        "confidence interval of the mean (Student's t).",
        masi_over_time,
    ),
    Plot(
        "pga_by_visit",
        "PGA per visit",
        "Physician global assessment grades per visit, one panel per arm, as shares of the "
        "visit's PGA assessments (n above each bar); 0 = complete clearance, 6 = worse.",
        pga_by_visit,
    ),
    Plot(
        "ae_incidence",
        "Adverse-event incidence",
        "Participants with at least one event of the term, in % of the arm's enrolled "
        "participants (withdrawn included); labels give participants / arm size.",
        ae_incidence,
    ),
    Plot(
        "satisfaction_rate",
        "Satisfaction rate",
        "Responses 'satisfied' or 'very satisfied' in % of the visit's responses per arm; "
        "labels give numerator / denominator. Visits without responses are left out.",
        satisfaction_rate,
    ),
)


def write_plots(data: ReportData, directory: Path) -> list[Path]:
    """Every plot as ``<name>.png`` in ``directory``."""
    written = []
    for plot in PLOTS:
        with rc_context(STYLE):
            fig = plot.draw(data)
            path = directory / plot.filename
            fig.savefig(path, format="png", metadata={"Software": None})
        written.append(path)
    return written


__all__ = ["PLOTS", "Plot", "write_plots"]
