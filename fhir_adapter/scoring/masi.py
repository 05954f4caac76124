"""MASI, mMASI, consensus, improvement and the MASI-implied PGA (SPEC §4)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from fhir_adapter.domain import MasiRating

# Region weights of the MASI formula (Kimbrough-Green 1994): forehead, right malar, left malar
# 0.3 each, chin 0.1. Part of the scoring rule (versioned), not of the trial definition.
_REGION_WEIGHTS: tuple[tuple[str, Decimal], ...] = (
    ("forehead", Decimal("0.3")),
    ("right_malar", Decimal("0.3")),
    ("left_malar", Decimal("0.3")),
    ("chin", Decimal("0.1")),
)
_HUNDRED = Decimal(100)
_TWO = Decimal(2)


class ScoreStatus(StrEnum):
    FINAL = "final"
    PRELIMINARY = "preliminary"


class ConsensusMethod(StrEnum):
    SINGLE = "single"
    MEAN_OF_2 = "mean-of-2"
    CLOSEST_2_OF_3 = "closest-2-of-3"
    MEDIAN_OF_3 = "median-of-3"


def _scores(r: MasiRating, region: str) -> tuple[int, int, int]:
    return (
        getattr(r, f"{region}_d"),
        getattr(r, f"{region}_h"),
        getattr(r, f"{region}_a"),
    )


def rater_masi(r: MasiRating) -> Decimal:
    """0.3(D+H)A forehead + 0.3(D+H)A right malar + 0.3(D+H)A left malar + 0.1(D+H)A chin."""
    total = Decimal(0)
    for region, weight in _REGION_WEIGHTS:
        d, h, a = _scores(r, region)
        total += weight * (d + h) * a
    return total


def rater_mmasi(r: MasiRating) -> Decimal:
    """Modified MASI: the same without homogeneity, 0.3·D·A … + 0.1·D·A (range 0-24)."""
    total = Decimal(0)
    for region, weight in _REGION_WEIGHTS:
        d, _h, a = _scores(r, region)
        total += weight * d * a
    return total


@dataclass(frozen=True)
class RaterScore:
    rater_id: str
    masi: Decimal
    mmasi: Decimal
    assessed_on: dt.date | None = None


def rater_score(r: MasiRating) -> RaterScore:
    return RaterScore(r.rater_id, rater_masi(r), rater_mmasi(r), r.assessed_on)


@dataclass(frozen=True)
class Consensus:
    masi: Decimal
    mmasi: Decimal
    status: ScoreStatus
    method: ConsensusMethod
    raters: tuple[str, ...]  # exactly the raters whose values enter the consensus
    needs_adjudication: bool
    #: |a - b| of the two raters of a mean-of-2 (None otherwise): the adjudication worklist
    difference: Decimal | None = None


def _natural_key(rater_id: str) -> tuple[tuple[tuple[int, int | str], ...], str]:
    """R2 before R10: raters are listed in natural order.

    Ids that are equal in natural order (R1 / R01) fall back to the plain id, so the order never
    depends on the order of the input rows.
    """
    parts: list[tuple[int, int | str]] = []
    num = ""
    text = ""
    for ch in rater_id:
        if ch.isdigit():
            if text:
                parts.append((1, text))
                text = ""
            num += ch
        else:
            if num:
                parts.append((0, int(num)))
                num = ""
            text += ch
    if num:
        parts.append((0, int(num)))
    if text:
        parts.append((1, text))
    return tuple(parts), rater_id


def _ordered(raters: Iterable[RaterScore]) -> tuple[str, ...]:
    return tuple(sorted((r.rater_id for r in raters), key=_natural_key))


def consensus(scores: Sequence[RaterScore], threshold: Decimal) -> Consensus:
    """Consensus of 1-3 raters' scores, decided on MASI; mMASI follows the same raters.

    - 1 rater: that value, preliminary, ``single``.
    - 2 raters: the mean; final when |a - b| <= threshold, else preliminary and
      ``needs_adjudication`` (a third physician is required).
    - 3 raters: the mean of the two closest MASI values (``closest-2-of-3``); when both pairs
      are equally close, the median of the three (``median-of-3``, mMASI: the median of the
      three mMASI). Always final, whatever the spread.
    """
    n = len(scores)
    if n == 1:
        (only,) = scores
        return Consensus(
            only.masi,
            only.mmasi,
            ScoreStatus.PRELIMINARY,
            ConsensusMethod.SINGLE,
            (only.rater_id,),
            needs_adjudication=False,
        )
    if n == 2:
        a, b = scores
        difference = abs(a.masi - b.masi)
        agree = difference <= threshold
        return Consensus(
            (a.masi + b.masi) / _TWO,
            (a.mmasi + b.mmasi) / _TWO,
            ScoreStatus.FINAL if agree else ScoreStatus.PRELIMINARY,
            ConsensusMethod.MEAN_OF_2,
            _ordered(scores),
            needs_adjudication=not agree,
            difference=difference,
        )
    if n == 3:
        # Sort by value (rater id breaks ties, so the result never depends on row order).
        low, mid, high = sorted(scores, key=lambda s: (s.masi, _natural_key(s.rater_id)))
        lower_gap = mid.masi - low.masi
        upper_gap = high.masi - mid.masi
        if lower_gap == upper_gap:
            mmasi_values = sorted(s.mmasi for s in scores)
            return Consensus(
                mid.masi,
                mmasi_values[1],
                ScoreStatus.FINAL,
                ConsensusMethod.MEDIAN_OF_3,
                _ordered(scores),
                needs_adjudication=False,
            )
        pair = (low, mid) if lower_gap < upper_gap else (mid, high)
        return Consensus(
            (pair[0].masi + pair[1].masi) / _TWO,
            (pair[0].mmasi + pair[1].mmasi) / _TWO,
            ScoreStatus.FINAL,
            ConsensusMethod.CLOSEST_2_OF_3,
            _ordered(pair),
            needs_adjudication=False,
        )
    raise ValueError(f"consensus needs 1 to 3 raters, got {n}")


def improvement_pct(baseline: Decimal | None, visit: Decimal) -> Decimal | None:
    """(baseline - visit) / baseline x 100, exact to 28 digits; None when baseline missing or 0.

    Not rounded: classifications use :func:`pga_from_improvement` on exact comparisons and
    reports round with :func:`round_half_up`.
    """
    if baseline is None or baseline == 0:
        return None
    return (baseline - visit) * _HUNDRED / baseline


def round_half_up(value: Decimal, places: int = 1) -> Decimal:
    """Round half away from zero (ROUND_HALF_UP in decimal's terms) to ``places`` decimals.

    A quotient of two MASI values (at most 2 decimals, at most 48) that is not exactly a
    ``.x5`` tie is at least 1/96000 away from one, far beyond the 28-digit context, so rounding
    the computed quotient gives the same result as rounding the exact one.
    """
    rounded = value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    return rounded if rounded != 0 else abs(rounded)  # never "-0.0"


# Lower bounds (inclusive) of improvement for PGA grades 0-5; below 0 is grade 6.
_PGA_BOUNDS: tuple[tuple[int, int], ...] = ((0, 100), (1, 90), (2, 75), (3, 50), (4, 25), (5, 0))


def pga_from_improvement(baseline: Decimal | None, visit: Decimal) -> int | None:
    """The PGA grade MASI improvement implies, decided on exact comparisons (no division).

    0 = 100 % (clearance), 1 = [90, 100), 2 = [75, 90), 3 = [50, 75), 4 = [25, 50),
    5 = [0, 25), 6 = < 0 (worse than baseline). None when improvement is undefined.
    """
    if baseline is None or baseline == 0:
        return None
    gained = (baseline - visit) * _HUNDRED  # improvement x baseline, exactly
    for grade, bound in _PGA_BOUNDS:
        if gained >= bound * baseline:
            return grade
    return 6


def pga_discordant(pga: int, implied: int | None) -> bool:
    """A physician's PGA and the MASI-implied grade differ by 2 grades or more."""
    return implied is not None and abs(pga - implied) >= 2


@dataclass(frozen=True)
class VisitScore:
    """Everything scored for one subject at one visit."""

    subject_id: str
    visit: str
    raters: tuple[RaterScore, ...]  # every rater of the visit, natural order
    consensus: Consensus
    improvement_pct: Decimal | None  # exact
    improvement_status: ScoreStatus | None
    pga_from_masi: int | None
    baseline: Consensus | None

    @property
    def improvement_rounded(self) -> Decimal | None:
        return None if self.improvement_pct is None else round_half_up(self.improvement_pct)


def _weaker(a: ScoreStatus, b: ScoreStatus) -> ScoreStatus:
    return ScoreStatus.FINAL if a is b is ScoreStatus.FINAL else ScoreStatus.PRELIMINARY


def score_visits(
    ratings: Iterable[MasiRating | tuple[str, str, RaterScore]],
    threshold: Decimal,
    visit_order: Mapping[str, int],
    baseline_visit: str,
) -> list[VisitScore]:
    """Score every subject x visit, ordered by subject_id then visit order.

    ``ratings`` may hold at most 3 raters per subject x visit, each rater once (intake enforces
    it). Only the per-rater scores are kept in memory, not the rows.
    """
    groups: dict[tuple[str, str], list[RaterScore]] = defaultdict(list)
    for item in ratings:
        if isinstance(item, MasiRating):
            groups[(item.subject_id, item.visit)].append(rater_score(item))
        else:
            subject_id, visit, score = item
            groups[(subject_id, visit)].append(score)
    consensus_of = {key: consensus(scores, threshold) for key, scores in groups.items()}
    result = []
    for subject_id, visit in sorted(groups, key=lambda k: (k[0], visit_order[k[1]])):
        current = consensus_of[(subject_id, visit)]
        base = consensus_of.get((subject_id, baseline_visit))
        improvement: Decimal | None = None
        status: ScoreStatus | None = None
        implied: int | None = None
        if visit != baseline_visit:
            base_value = base.masi if base is not None else None
            improvement = improvement_pct(base_value, current.masi)
            implied = pga_from_improvement(base_value, current.masi)
            if improvement is not None and base is not None:
                status = _weaker(base.status, current.status)
        raters = tuple(sorted(groups[(subject_id, visit)], key=lambda s: _natural_key(s.rater_id)))
        result.append(
            VisitScore(
                subject_id,
                visit,
                raters,
                current,
                improvement,
                status,
                implied,
                base if visit != baseline_visit else None,
            )
        )
    return result
