"""Small builders of valid source rows for tests (synthetic values only)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fhir_adapter.intake import KINDS
from fhir_adapter.trial import Trial, load_trial

TRIAL: Trial = load_trial()
CRITERIA_COLUMNS = [c.column for c in TRIAL.criteria]


def columns(kind: str) -> list[str]:
    return KINDS[kind].columns(TRIAL)


def participant(subject_id: str = "S001", **over: Any) -> dict[str, Any]:
    row = {
        "subject_id": subject_id,
        "arm": "combo",
        "sex": "female",
        "birth_date": "1990-05-17",
        "consent_date": "2025-01-02",
        "enrolled_on": "2025-01-05",
        "first_treatment_on": "2025-01-10",
        "status": "on-study",
        "withdrawn_on": "",
        "withdrawal_reason": "",
        "mrn": "MRN-0001",
    }
    row.update(over)
    return row


def screening(subject_id: str = "S001", **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "subject_id": subject_id,
        "screened_on": "2025-01-03",
        "screened_by": "R1",
    }
    for c in TRIAL.criteria:
        row[c.column] = "yes" if c.kind == "inclusion" else "no"
    row.update(over)
    return row


def masi(
    subject_id: str = "S001",
    visit: str = "baseline",
    rater_id: str = "R1",
    scores: Iterable[int] = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2),
    **over: Any,
) -> dict[str, Any]:
    names = [
        f"{region}_{part}"
        for region in ("forehead", "right_malar", "left_malar", "chin")
        for part in ("d", "h", "a")
    ]
    row: dict[str, Any] = {
        "subject_id": subject_id,
        "visit": visit,
        "rater_id": rater_id,
        "assessed_on": "2025-01-10",
    }
    row.update({n: str(v) for n, v in zip(names, scores, strict=True)})
    row.update(over)
    return row


def pga(subject_id: str = "S001", visit: str = "m1", **over: Any) -> dict[str, Any]:
    row = {
        "subject_id": subject_id,
        "visit": visit,
        "rater_id": "R1",
        "assessed_on": "2025-02-09",
        "pga": "3",
    }
    row.update(over)
    return row


def satisfaction(subject_id: str = "S001", visit: str = "m1", **over: Any) -> dict[str, Any]:
    row = {
        "subject_id": subject_id,
        "visit": visit,
        "assessed_on": "2025-02-09",
        "level": "satisfied",
        "improvement_pct": "",
    }
    row.update(over)
    return row


def adverse_event(ae_id: str = "AE0001", subject_id: str = "S001", **over: Any) -> dict[str, Any]:
    row = {
        "ae_id": ae_id,
        "subject_id": subject_id,
        "term": "erythema",
        "term_text": "",
        "onset_on": "2025-01-11",
        "resolved_on": "2025-01-14",
        "visit": "baseline",
        "grade": "1",
        "serious": "no",
        "causality": "related",
        "outcome": "recovered",
        "action_taken": "none",
        "reported_on": "2025-01-11",
    }
    row.update(over)
    return row


def write_csv(
    path: Path,
    rows: Iterable[Mapping[str, Any]],
    header: list[str] | None = None,
    *,
    encoding: str = "utf-8",
    newline: str = "\n",
) -> Path:
    rows = list(rows)
    if header is None:
        header = list(rows[0]) if rows else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding=encoding, newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=header, lineterminator=newline, extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
    return path
