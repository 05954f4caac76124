"""What the report shows, gathered once: the registry tables' rows, the summary, and the
trial's labels (arm names, visit labels, term displays, PGA grades) from ``mappings/``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.query.registry import RegistryTables
from fhir_adapter.query.viewdef import Row
from fhir_adapter.report.summary import PGA_GRADES, Summary, build_summary
from fhir_adapter.trial import Trial


@dataclass(frozen=True)
class Labels:
    """Ids and the names people read, in the order of ``mappings/``."""

    arms: tuple[tuple[str, str], ...]  # (arm id, arm name)
    visits: tuple[tuple[str, str], ...]  # (visit id, label)
    terms: tuple[tuple[str, str], ...]  # (SPEC §3 token, display)
    pga_grades: tuple[tuple[int, str], ...]  # (grade, display)

    @property
    def arm_ids(self) -> list[str]:
        return [a for a, _ in self.arms]

    @property
    def visit_ids(self) -> list[str]:
        return [v for v, _ in self.visits]

    @property
    def term_ids(self) -> list[str]:
        return [t for t, _ in self.terms]

    def arm_name(self, arm: str | None) -> str:
        return dict(self.arms).get(arm or "", arm or "")

    def visit_label(self, visit: str | None) -> str:
        return dict(self.visits).get(visit or "", visit or "")


def trial_labels(trial: Trial, terminology: Terminology) -> Labels:
    terms = terminology.ae_map["terms"]
    return Labels(
        arms=tuple((a.id, a.name) for a in trial.arms),
        visits=tuple((v.id, v.label) for v in trial.visits),
        terms=tuple((str(t), str(e["display"])) for t, e in terms.items()),
        pga_grades=tuple((g, str(terminology.concepts[f"pga-{g}"]["display"])) for g in PGA_GRADES),
    )


@dataclass(frozen=True)
class ReportData:
    study: Trial
    labels: Labels
    tables: dict[str, list[Row]]  # registry table name -> rows
    summary: Summary
    #: the latest visit or adverse-event date in the data (the report's date: never the clock)
    data_until: dt.date | None

    def rows(self, table: str) -> list[Row]:
        return self.tables.get(table, [])


def _date(value: Any) -> dt.date | None:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


def latest_date(tables: RegistryTables) -> dt.date | None:
    """The latest visit date or adverse-event date (onset, resolution, report) in the views."""
    values: list[Any] = []
    if "visits" in tables.views:
        values += [r.get("visit_on") for r in tables.rows("visits")]
    if "adverse_events" in tables.views:
        for r in tables.rows("adverse_events"):
            values += [r.get("onset_on"), r.get("resolved_on"), r.get("recorded_on")]
    dates = [d for d in (_date(v) for v in values if v) if d is not None]
    return max(dates, default=None)


def gather(tables: RegistryTables, trial: Trial, terminology: Terminology) -> ReportData:
    labels = trial_labels(trial, terminology)
    rows = {name: tables.rows(name) for name in tables.queries}
    summary = build_summary(rows, labels.arm_ids, labels.visit_ids, labels.term_ids)
    return ReportData(trial, labels, rows, summary, latest_date(tables))


__all__ = ["Labels", "ReportData", "gather", "trial_labels"]
