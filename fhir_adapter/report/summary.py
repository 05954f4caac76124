"""``summary.json`` (pinned shape, issue 13): the report's numbers for other tools.

Built from the registry tables (``mappings/views/*.sql``) only::

    {"arms": {ARM: {"participants": n, "visits": {VISIT: {"n_final": n, "masi_mean": x,
        "masi_median": x, "improvement_mean": x, "pga": {"0": n, ..., "6": n},
        "satisfaction": {"numerator": n, "denominator": n, "rate": x}}}}},
     "adverse_events": {ARM: {TERM: {"events": n, "participants": n, "incidence": x,
        "max_grade": g, "serious": n, "by_max_grade": {"1": n, ..., "5": n}}}}}

ARM, VISIT and TERM are the ids of ``mappings/`` (arms and visits of study.yaml, the SPEC §3
term tokens of adverse_events.yaml), every combination present. Means and medians are those of
the final consensus values as the server holds them (MASI exact, improvement to one decimal),
rounded half up to 2 decimals by the registry SQL; rates and incidences (percent) are computed
here from their integer counts, exactly, and rounded the same way. An undefined value (a mean of
nothing, a rate over no response, the maximum grade of no event) is ``null``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from fhir_adapter.query.viewdef import Row

PLACES = Decimal("0.01")
PGA_GRADES = tuple(range(7))
CTCAE_GRADES = tuple(range(1, 6))

Summary = dict[str, Any]


def half_up(value: Decimal | None) -> Decimal | None:
    """Rounded half up (away from zero) to 2 decimals; None stays None."""
    return None if value is None else Decimal(value).quantize(PLACES, rounding=ROUND_HALF_UP)


def percent(numerator: int, denominator: int) -> Decimal | None:
    """numerator / denominator x 100, exact, rounded half up to 2 decimals (None over 0)."""
    if denominator == 0:
        return None
    return half_up(Decimal(numerator) * 100 / Decimal(denominator))


def build_summary(
    tables: Mapping[str, Sequence[Row]],
    arms: Sequence[str],
    visits: Sequence[str],
    terms: Sequence[str],
) -> Summary:
    """The summary from the registry tables ``outcomes_by_arm_visit``, ``arm_participants``
    and ``ae_incidence`` (rows as :meth:`RegistryTables.rows` gives them)."""
    outcomes = {(r["arm"], r["visit"]): r for r in tables["outcomes_by_arm_visit"]}
    sizes = {r["arm"]: int(r["participants"]) for r in tables["arm_participants"]}
    incidence = {(r["arm"], r["term"]): r for r in tables["ae_incidence"]}
    return {
        "arms": {
            arm: {
                "participants": sizes.get(arm, 0),
                "visits": {v: _visit(outcomes.get((arm, v))) for v in visits},
            }
            for arm in arms
        },
        "adverse_events": {
            arm: {t: _term(incidence.get((arm, t)), sizes.get(arm, 0)) for t in terms}
            for arm in arms
        },
    }


def _count(row: Row | None, column: str) -> int:
    return 0 if row is None or row.get(column) is None else int(row[column])


def _value(row: Row | None, column: str) -> Decimal | None:
    return None if row is None else half_up(row.get(column))


def _visit(row: Row | None) -> dict[str, Any]:
    numerator = _count(row, "satisfaction_numerator")
    denominator = _count(row, "satisfaction_denominator")
    return {
        "n_final": _count(row, "n"),
        "masi_mean": _value(row, "masi_mean"),
        "masi_median": _value(row, "masi_median"),
        "improvement_mean": _value(row, "improvement_mean_pct"),
        "pga": {str(g): _count(row, f"pga_{g}") for g in PGA_GRADES},
        "satisfaction": {
            "numerator": numerator,
            "denominator": denominator,
            "rate": percent(numerator, denominator),
        },
    }


def _term(row: Row | None, participants_in_arm: int) -> dict[str, Any]:
    participants = _count(row, "participants")
    max_grade = None if row is None or row.get("max_grade") is None else int(row["max_grade"])
    return {
        "events": _count(row, "events"),
        "participants": participants,
        "incidence": percent(participants, participants_in_arm),
        "max_grade": max_grade,
        "serious": _count(row, "serious_events"),
        "by_max_grade": {str(g): _count(row, f"grade_{g}") for g in CTCAE_GRADES},
    }


__all__ = ["Summary", "build_summary", "half_up", "percent"]
