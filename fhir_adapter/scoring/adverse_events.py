"""Adverse-event summary per arm x term (SPEC §4)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from fhir_adapter.domain import AdverseEvent, Participant


@dataclass
class AeSummaryRow:
    arm: str
    term: str
    participants_in_arm: int
    events: int = 0
    serious_events: int = 0
    #: participants with >= 1 event of the term
    participants: int = 0
    #: participants by the maximum grade of their events of the term (grade -> count)
    by_max_grade: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(1, 6), 0))

    @property
    def incidence_pct(self) -> Decimal | None:
        if self.participants_in_arm == 0:
            return None
        return Decimal(self.participants) * 100 / Decimal(self.participants_in_arm)


def summarize_adverse_events(
    participants: Iterable[Participant], events: Iterable[AdverseEvent]
) -> list[AeSummaryRow]:
    """Events, participants with >= 1 event, incidence, participants by max grade, serious events.

    Participants in an arm are the enrolled ones (``enrolled_on`` set) of that arm, withdrawn
    ones included; screen failures never count, nor do their events.
    """
    arm_of: dict[str, str] = {}
    arm_size: dict[str, int] = {}
    for p in participants:
        if p.enrolled and p.arm is not None:
            arm_of[p.subject_id] = p.arm
            arm_size[p.arm] = arm_size.get(p.arm, 0) + 1
    max_grade: dict[tuple[str, str], dict[str, int]] = {}
    rows: dict[tuple[str, str], AeSummaryRow] = {}
    for event in events:
        arm = arm_of.get(event.subject_id)
        if arm is None:
            continue
        term = event.term.value
        key = (arm, term)
        row = rows.get(key)
        if row is None:
            row = rows[key] = AeSummaryRow(arm, term, arm_size[arm])
        row.events += 1
        row.serious_events += int(event.is_serious)
        graded = max_grade.setdefault(key, {})
        graded[event.subject_id] = max(graded.get(event.subject_id, 0), event.grade)
    for key, row in rows.items():
        row.participants = len(max_grade[key])
        for grade in max_grade[key].values():
            row.by_max_grade[grade] += 1
    return [rows[k] for k in sorted(rows)]
