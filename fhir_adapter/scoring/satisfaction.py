"""Satisfaction levels and rates (SPEC §4)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from fhir_adapter.domain import SatisfactionLevel, SatisfactionResponse

_SATISFIED = frozenset({SatisfactionLevel.VERY_SATISFIED, SatisfactionLevel.SATISFIED})


def level_from_improvement(improvement_pct: Decimal) -> SatisfactionLevel:
    """very_satisfied >= 75; satisfied [50, 75); average [25, 50); dissatisfied < 25.

    The protocol's ranges overlap at 25 and 75; these half-open bounds resolve them.
    """
    if improvement_pct >= 75:
        return SatisfactionLevel.VERY_SATISFIED
    if improvement_pct >= 50:
        return SatisfactionLevel.SATISFIED
    if improvement_pct >= 25:
        return SatisfactionLevel.AVERAGE
    return SatisfactionLevel.DISSATISFIED


def response_level(response: SatisfactionResponse) -> SatisfactionLevel:
    """The given level, or the one derived from the patient's estimate when none is given."""
    if response.level is not None:
        return response.level
    if response.improvement_pct is None:  # pragma: no cover - rejected at intake
        raise ValueError("a satisfaction response needs a level or an improvement estimate")
    return level_from_improvement(response.improvement_pct)


@dataclass(frozen=True)
class SatisfactionRate:
    visit: str
    arm: str | None  # None: all arms together
    numerator: int  # very_satisfied + satisfied
    denominator: int  # responses at the visit
    counts: Mapping[SatisfactionLevel, int]

    @property
    def rate_pct(self) -> Decimal | None:
        """Exact rate (numerator / denominator x 100); None without responses."""
        if self.denominator == 0:
            return None
        return Decimal(self.numerator) * 100 / Decimal(self.denominator)


def satisfaction_rates(
    responses: Iterable[SatisfactionResponse],
    arm_of: Mapping[str, str | None],
    visit_order: Mapping[str, int],
) -> list[SatisfactionRate]:
    """Rates per visit (arm None) and per arm x visit, in visit order then arm."""
    counts: dict[tuple[str, str | None], dict[SatisfactionLevel, int]] = {}
    for response in responses:
        level = response_level(response)
        arm = arm_of.get(response.subject_id)
        keys: list[tuple[str, str | None]] = [(response.visit, None)]
        if arm is not None:
            keys.append((response.visit, arm))
        for key in keys:
            bucket = counts.setdefault(key, dict.fromkeys(SatisfactionLevel, 0))
            bucket[level] += 1
    rates = []
    for (visit, arm), bucket in sorted(
        counts.items(), key=lambda kv: (visit_order[kv[0][0]], kv[0][1] is not None, kv[0][1] or "")
    ):
        numerator = sum(n for level, n in bucket.items() if level in _SATISFIED)
        rates.append(SatisfactionRate(visit, arm, numerator, sum(bucket.values()), bucket))
    return rates
