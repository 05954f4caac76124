"""Known-answer tests for MASI, mMASI, consensus, improvement and the MASI-implied PGA (SPEC 4).

Every expected value is worked out by hand in a comment next to it; all values are Decimal.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any, TypedDict

import pytest

from fhir_adapter.domain import MasiRating, RecordContext
from fhir_adapter.scoring import (
    Consensus,
    ConsensusMethod,
    RaterScore,
    ScoreStatus,
    VisitScore,
    consensus,
    improvement_pct,
    pga_discordant,
    pga_from_improvement,
    rater_masi,
    rater_mmasi,
    rater_score,
    round_half_up,
    score_visits,
)
from fhir_adapter.trial import load_trial

TRIAL = load_trial()
CTX = RecordContext(trial=TRIAL)
THRESHOLD = TRIAL.adjudication_threshold  # 3.0 in mappings/study.yaml
BASELINE = TRIAL.baseline_visit

Region = tuple[int, int, int]  # (D, H, A)
ZERO: Region = (0, 0, 0)


class Regions(TypedDict, total=False):
    """Scores per region of one rating; a region left out scores (0, 0, 0)."""

    f: Region
    mr: Region
    ml: Region
    c: Region


D = Decimal


def rating(
    subject: str = "S001",
    visit: str = "baseline",
    rater: str = "R1",
    *,
    f: Region = ZERO,
    mr: Region = ZERO,
    ml: Region = ZERO,
    c: Region = ZERO,
) -> MasiRating:
    """A validated masi.csv row (values as strings, as read from the CSV)."""
    row: dict[str, Any] = {
        "subject_id": subject,
        "visit": visit,
        "rater_id": rater,
        "assessed_on": "2024-09-02",
    }
    regions = (("forehead", f), ("right_malar", mr), ("left_malar", ml), ("chin", c))
    for region, (d, h, a) in regions:
        row[f"{region}_d"] = str(d)
        row[f"{region}_h"] = str(h)
        row[f"{region}_a"] = str(a)
    return MasiRating.model_validate(row, context=CTX)


# Real ratings with known MASI / mMASI, reused below.
# MASI 10.3: 0.3*(3+2)*4 + 0.3*(2+1)*3 + 0.3*(1+1)*2 + 0.1*(2+2)*1 = 6.0+2.7+1.2+0.4 = 10.3
# mMASI 6.2: 0.3*3*4 + 0.3*2*3 + 0.3*1*2 + 0.1*2*1 = 3.6+1.8+0.6+0.2 = 6.2
R_10_3: Regions = {"f": (3, 2, 4), "mr": (2, 1, 3), "ml": (1, 1, 2), "c": (2, 2, 1)}
# MASI 8.0: 0.3*(2+2)*6 + 0.1*(2+2)*2 = 7.2+0.8; mMASI 0.3*2*6 + 0.1*2*2 = 3.6+0.4 = 4.0
R_8_0: Regions = {"f": (2, 2, 6), "c": (2, 2, 2)}
# MASI 7.9: 0.3*(2+2)*6 + 0.1*(4+3)*1 = 7.2+0.7; mMASI 3.6 + 0.1*4*1 = 4.0
R_7_9: Regions = {"f": (2, 2, 6), "c": (4, 3, 1)}
# MASI 5.3: 0.3*(3+2)*3 + 0.1*(4+4)*1 = 4.5+0.8; mMASI 0.3*3*3 + 0.1*4*1 = 2.7+0.4 = 3.1
R_5_3: Regions = {"f": (3, 2, 3), "c": (4, 4, 1)}
# MASI 8.1: 0.3*(2+2)*6 + 0.1*(2+1)*3 = 7.2+0.9; mMASI 3.6 + 0.1*2*3 = 4.2
R_8_1: Regions = {"f": (2, 2, 6), "c": (2, 1, 3)}
# MASI 10.7: 0.3*(2+2)*6 + 0.3*(3+2)*2 + 0.1*(3+2)*1 = 7.2+3.0+0.5; mMASI 3.6+1.8+0.3 = 5.7
R_10_7: Regions = {"f": (2, 2, 6), "mr": (3, 2, 2), "c": (3, 2, 1)}
# MASI 3.0: 0.3*(2+3)*2 = 3.0; mMASI 0.3*2*2 = 1.2
R_3_0: Regions = {"f": (2, 3, 2)}
# MASI 3.1: 0.3*(2+3)*2 + 0.1*(1+0)*1 = 3.0+0.1; mMASI 1.2 + 0.1*1*1 = 1.3
R_3_1: Regions = {"f": (2, 3, 2), "c": (1, 0, 1)}
R_0: Regions = {}


def rs(rater: str, masi: str, mmasi: str) -> RaterScore:
    return RaterScore(rater, D(masi), D(mmasi))


def assert_no_float(obj: object, path: str = "result") -> None:
    """Walk dataclasses, tuples and dicts: every number is a Decimal or an int, never a float."""
    assert not isinstance(obj, float), f"{path} is a float"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for fld in dataclasses.fields(obj):
            assert_no_float(getattr(obj, fld.name), f"{path}.{fld.name}")
    elif isinstance(obj, tuple | list):
        for i, item in enumerate(obj):
            assert_no_float(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            assert_no_float(item, f"{path}[{key!r}]")


def score(*ratings: MasiRating, threshold: Decimal = THRESHOLD) -> list[VisitScore]:
    return score_visits(list(ratings), threshold, TRIAL.visit_order, BASELINE)


def by_visit(results: list[VisitScore]) -> dict[tuple[str, str], VisitScore]:
    return {(r.subject_id, r.visit): r for r in results}


# --------------------------------------------------------------------------- per-rater scores


def test_worked_example_masi_and_mmasi() -> None:
    r = rating(**R_10_3)
    # 0.3*(3+2)*4 + 0.3*(2+1)*3 + 0.3*(1+1)*2 + 0.1*(2+2)*1 = 6.0 + 2.7 + 1.2 + 0.4 = 10.3
    assert rater_masi(r) == D("10.3")
    # 0.3*3*4 + 0.3*2*3 + 0.3*1*2 + 0.1*2*1 = 3.6 + 1.8 + 0.6 + 0.2 = 6.2
    assert rater_mmasi(r) == D("6.2")
    assert isinstance(rater_masi(r), Decimal)
    assert isinstance(rater_mmasi(r), Decimal)


def test_all_zero() -> None:
    r = rating()
    assert rater_masi(r) == 0
    assert rater_mmasi(r) == 0
    assert isinstance(rater_masi(r), Decimal)


def test_maxima_48_and_24() -> None:
    top: Region = (4, 4, 6)
    r = rating(f=top, mr=top, ml=top, c=top)
    # 0.3*(4+4)*6*3 + 0.1*(4+4)*6 = 43.2 + 4.8 = 48
    assert rater_masi(r) == D(48)
    # 0.3*4*6*3 + 0.1*4*6 = 21.6 + 2.4 = 24
    assert rater_mmasi(r) == D(24)


@pytest.mark.parametrize(
    ("region", "masi", "mmasi"),
    [
        # (D, H, A) = (1, 1, 1) in one region only: weight*(1+1)*1 and weight*1*1
        ({"f": (1, 1, 1)}, "0.6", "0.3"),  # 0.3*2*1 = 0.6; 0.3*1*1 = 0.3
        ({"mr": (1, 1, 1)}, "0.6", "0.3"),
        ({"ml": (1, 1, 1)}, "0.6", "0.3"),
        ({"c": (1, 1, 1)}, "0.2", "0.1"),  # 0.1*2*1 = 0.2; 0.1*1*1 = 0.1
    ],
)
def test_region_weights(region: Regions, masi: str, mmasi: str) -> None:
    r = rating(**region)
    assert rater_masi(r) == D(masi)
    assert rater_mmasi(r) == D(mmasi)


def test_area_zero_scores_nothing() -> None:
    # darkness and homogeneity at maximum but area 0: 0.3*(4+4)*0 ... = 0
    r = rating(f=(4, 4, 0), mr=(4, 4, 0), ml=(4, 4, 0), c=(4, 4, 0))
    assert rater_masi(r) == 0
    assert rater_mmasi(r) == 0


def test_mmasi_ignores_homogeneity() -> None:
    # MASI 0.3*(0+4)*6 = 7.2, mMASI 0.3*0*6 = 0
    r = rating(f=(0, 4, 6))
    assert rater_masi(r) == D("7.2")
    assert rater_mmasi(r) == 0


def test_rater_score_carries_both_scores() -> None:
    s = rater_score(rating(rater="R7", **R_10_3))
    assert s.rater_id == "R7"
    assert (s.masi, s.mmasi) == (D("10.3"), D("6.2"))
    assert s.assessed_on is not None
    assert s.assessed_on.isoformat() == "2024-09-02"


# --------------------------------------------------------------------------------- consensus


def test_single_rater_is_preliminary() -> None:
    c = consensus([rs("R1", "10.3", "6.2")], THRESHOLD)
    assert c == Consensus(
        D("10.3"),
        D("6.2"),
        ScoreStatus.PRELIMINARY,
        ConsensusMethod.SINGLE,
        ("R1",),
        needs_adjudication=False,
    )


def test_mean_of_2_within_threshold_is_final() -> None:
    c = consensus([rs("R1", "12.3", "6.0"), rs("R2", "12.6", "6.6")], THRESHOLD)
    # (12.3 + 12.6) / 2 = 24.9 / 2 = 12.45; mMASI (6.0 + 6.6) / 2 = 6.3; |12.3 - 12.6| = 0.3
    assert c.masi == D("12.45")
    assert c.mmasi == D("6.3")
    assert c.method is ConsensusMethod.MEAN_OF_2
    assert c.status is ScoreStatus.FINAL
    assert c.needs_adjudication is False
    assert c.raters == ("R1", "R2")
    assert c.difference == D("0.3")
    assert isinstance(c.masi, Decimal)
    assert isinstance(c.mmasi, Decimal)


def test_threshold_boundary_3_0_is_final() -> None:
    # real ratings: 3.0 and 0 -> |3.0 - 0| = 3.0, not > 3.0 -> final; mean 1.5, mMASI (1.2+0)/2
    (v,) = score(rating(rater="R1", **R_3_0), rating(rater="R2", **R_0))
    c = v.consensus
    assert c.difference == D("3.0")
    assert c.masi == D("1.5")
    assert c.mmasi == D("0.6")
    assert c.status is ScoreStatus.FINAL
    assert c.needs_adjudication is False
    assert c.method is ConsensusMethod.MEAN_OF_2


def test_threshold_boundary_3_1_needs_adjudication() -> None:
    # real ratings: 3.1 and 0 -> |3.1 - 0| = 3.1 > 3.0 -> preliminary, needs a third physician
    # mean (3.1 + 0) / 2 = 1.55; mMASI (1.3 + 0) / 2 = 0.65
    (v,) = score(rating(rater="R1", **R_3_1), rating(rater="R2", **R_0))
    c = v.consensus
    assert c.difference == D("3.1")
    assert c.masi == D("1.55")
    assert c.mmasi == D("0.65")
    assert c.status is ScoreStatus.PRELIMINARY
    assert c.needs_adjudication is True
    assert c.method is ConsensusMethod.MEAN_OF_2
    assert c.raters == ("R1", "R2")


def test_threshold_is_a_parameter() -> None:
    pair = [rs("R1", "3.1", "1.3"), rs("R2", "0", "0")]
    assert consensus(pair, D("3.1")).status is ScoreStatus.FINAL  # 3.1 <= 3.1
    assert consensus(pair, D("3.0")).status is ScoreStatus.PRELIMINARY  # 3.1 > 3.0


def test_closest_2_of_3_lower_pair() -> None:
    # gaps: 11.0 - 10.0 = 1.0 < 20.0 - 11.0 = 9.0 -> R1, R2; (10.0 + 11.0) / 2 = 10.5
    # mMASI (5.0 + 4.0) / 2 = 4.5
    c = consensus(
        [rs("R3", "20.0", "9.0"), rs("R1", "10.0", "5.0"), rs("R2", "11.0", "4.0")], THRESHOLD
    )
    assert c.masi == D("10.5")
    assert c.mmasi == D("4.5")
    assert c.method is ConsensusMethod.CLOSEST_2_OF_3
    assert c.status is ScoreStatus.FINAL
    assert c.needs_adjudication is False
    assert c.raters == ("R1", "R2")


def test_closest_2_of_3_upper_pair() -> None:
    # gaps: 14.0 - 5.0 = 9.0 > 15.0 - 14.0 = 1.0 -> R2, R3; (14.0 + 15.0) / 2 = 14.5
    # mMASI (7.0 + 8.0) / 2 = 7.5
    c = consensus(
        [rs("R1", "5.0", "2.0"), rs("R2", "14.0", "7.0"), rs("R3", "15.0", "8.0")], THRESHOLD
    )
    assert c.masi == D("14.5")
    assert c.mmasi == D("7.5")
    assert c.method is ConsensusMethod.CLOSEST_2_OF_3
    assert c.raters == ("R2", "R3")


def test_closest_2_of_3_mmasi_follows_the_masi_pair() -> None:
    # MASI pair R1/R2 (gap 1.0 vs 9.0); their mMASI 2.0 and 8.0 are far apart while R2/R3's
    # mMASI (8.0, 7.9) are the closest - mMASI still follows the MASI pair: (2.0 + 8.0) / 2 = 5.0
    c = consensus(
        [rs("R1", "10.0", "2.0"), rs("R2", "11.0", "8.0"), rs("R3", "20.0", "7.9")], THRESHOLD
    )
    assert c.masi == D("10.5")
    assert c.mmasi == D("5.0")
    assert c.raters == ("R1", "R2")


def test_closest_2_of_3_from_real_ratings() -> None:
    # 8.0 and 7.9 (gap 0.1) against 10.3 (gap 2.3): (8.0 + 7.9) / 2 = 7.95; mMASI (4.0+4.0)/2
    (v,) = score(
        rating(rater="R3", **R_10_3), rating(rater="R1", **R_8_0), rating(rater="R2", **R_7_9)
    )
    assert v.consensus.masi == D("7.95")
    assert v.consensus.mmasi == D("4.0")
    assert v.consensus.raters == ("R1", "R2")
    assert v.consensus.method is ConsensusMethod.CLOSEST_2_OF_3
    assert [r.rater_id for r in v.raters] == ["R1", "R2", "R3"]  # every rater is kept


def test_median_of_3_on_equal_gaps() -> None:
    # gaps 6.0 - 4.0 = 2.0 == 8.0 - 6.0 = 2.0 -> median 6.0 (R2's MASI)
    # mMASI = median(3.0, 1.0, 2.0) = 2.0, which is R3's value, not the MASI-median rater's
    c = consensus(
        [rs("R1", "4.0", "3.0"), rs("R2", "6.0", "1.0"), rs("R3", "8.0", "2.0")], THRESHOLD
    )
    assert c.masi == D("6.0")
    assert c.mmasi == D("2.0")
    assert c.method is ConsensusMethod.MEDIAN_OF_3
    assert c.status is ScoreStatus.FINAL
    assert c.needs_adjudication is False
    assert c.raters == ("R1", "R2", "R3")


def test_three_raters_far_apart_still_final() -> None:
    # gaps 20.0 and 25.0 -> closest pair R1/R2, (0 + 20.0) / 2 = 10.0; far beyond 3.0, still final
    c = consensus(
        [rs("R1", "0", "0"), rs("R2", "20.0", "10.0"), rs("R3", "45.0", "22.0")], THRESHOLD
    )
    assert c.masi == D("10.0")
    assert c.mmasi == D("5.0")
    assert c.status is ScoreStatus.FINAL
    assert c.needs_adjudication is False
    assert c.method is ConsensusMethod.CLOSEST_2_OF_3
    # equal gaps of 24 -> median 24, final
    c = consensus([rs("R1", "0", "0"), rs("R2", "24", "12"), rs("R3", "48", "24")], THRESHOLD)
    assert (c.masi, c.method, c.status) == (D(24), ConsensusMethod.MEDIAN_OF_3, ScoreStatus.FINAL)
    assert c.needs_adjudication is False


def test_raters_in_natural_order() -> None:
    c2 = consensus([rs("R10", "5.0", "2.0"), rs("R2", "5.0", "2.0")], THRESHOLD)
    assert c2.raters == ("R2", "R10")
    c3 = consensus(
        [rs("R10", "4.0", "1.0"), rs("R2", "6.0", "2.0"), rs("R1", "8.0", "3.0")], THRESHOLD
    )
    assert c3.raters == ("R1", "R2", "R10")
    (v,) = score(rating(rater="R10", **R_8_0), rating(rater="R9", **R_7_9))
    assert v.consensus.raters == ("R9", "R10")
    assert [r.rater_id for r in v.raters] == ["R9", "R10"]


def test_raters_equal_in_natural_order_do_not_depend_on_row_order() -> None:
    # R1 and R01 are the same in natural order; the plain id breaks the tie ("R01" < "R1")
    pair = [rs("R1", "5.0", "2.0"), rs("R01", "5.0", "2.0")]
    assert consensus(pair, THRESHOLD).raters == ("R01", "R1")
    assert consensus(pair[::-1], THRESHOLD).raters == ("R01", "R1")
    trio = [rs("R1", "5.0", "1.0"), rs("R01", "5.0", "2.0"), rs("R001", "5.0", "3.0")]
    assert consensus(trio, THRESHOLD).raters == ("R001", "R01", "R1")
    assert consensus(trio[::-1], THRESHOLD).raters == ("R001", "R01", "R1")


@pytest.mark.parametrize("n", [0, 4])
def test_consensus_needs_1_to_3_raters(n: int) -> None:
    with pytest.raises(ValueError, match="1 to 3 raters"):
        consensus([rs(f"R{i}", "1.0", "0.5") for i in range(n)], THRESHOLD)


# ------------------------------------------------------------------------------- improvement


def test_improvement_normal_exact() -> None:
    # (10.0 - 6.5) / 10.0 * 100 = 35
    value = improvement_pct(D("10.0"), D("6.5"))
    assert value == D(35)
    assert isinstance(value, Decimal)


def test_improvement_negative_is_worsening() -> None:
    # (10.0 - 12.5) / 10.0 * 100 = -25
    assert improvement_pct(D("10.0"), D("12.5")) == D(-25)


def test_improvement_undefined_without_baseline() -> None:
    assert improvement_pct(D(0), D("3.0")) is None
    assert improvement_pct(D("0.0"), D(0)) is None
    assert improvement_pct(None, D("3.0")) is None
    assert pga_from_improvement(D(0), D("3.0")) is None
    assert pga_from_improvement(None, D("3.0")) is None


def test_improvement_repeating_decimal_rounds_to_one_place() -> None:
    # baseline 12.45 = 3 * 4.15: (12.45 - 8.3) / 12.45 * 100 = 4.15 / 12.45 * 100 = 33.33...
    value = improvement_pct(D("12.45"), D("8.3"))
    assert value is not None
    assert D("33.3333") < value < D("33.3334")
    assert str(round_half_up(value)) == "33.3"


@pytest.mark.parametrize(
    ("baseline", "visit", "exact", "rounded"),
    [
        # (8.0 - 5.3) / 8.0 * 100 = 2.7 * 12.5 = 33.75 -> 33.8 (half up, not down to 33.7)
        (R_8_0, R_5_3, "33.75", "33.8"),
        # (8.0 - 7.9) / 8.0 * 100 = 0.1 * 12.5 = 1.25 -> 1.3 (half up, not half-even 1.2)
        (R_8_0, R_7_9, "1.25", "1.3"),
        # (8.0 - 8.1) / 8.0 * 100 = -0.1 * 12.5 = -1.25 -> -1.3 (away from zero)
        (R_8_0, R_8_1, "-1.25", "-1.3"),
        # (8.0 - 10.7) / 8.0 * 100 = -2.7 * 12.5 = -33.75 -> -33.8 (away from zero)
        (R_8_0, R_10_7, "-33.75", "-33.8"),
    ],
)
def test_improvement_rounds_half_away_from_zero(
    baseline: Regions, visit: Regions, exact: str, rounded: str
) -> None:
    base_v, visit_v = score(rating(**baseline), rating(visit="m3", **visit))
    assert visit_v.improvement_pct == D(exact)
    assert visit_v.improvement_rounded is not None
    assert str(visit_v.improvement_rounded) == rounded
    assert base_v.improvement_rounded is None


def test_round_half_up_never_negative_zero() -> None:
    assert str(round_half_up(D("-0.04"))) == "0.0"
    assert str(round_half_up(D("-0.05"))) == "-0.1"
    assert str(round_half_up(D("12.345"), 2)) == "12.35"


def test_improvement_from_score_visits_with_implied_pga() -> None:
    # baseline R1/R2 8.0 and 8.0 -> 8.0 final; m3 R1/R2 5.3 and 5.3 -> 5.3 final
    # improvement (8.0 - 5.3) / 8.0 * 100 = 33.75 -> PGA 4 ([25, 50)); both final -> final
    results = score(
        rating(rater="R1", **R_8_0),
        rating(rater="R2", **R_8_0),
        rating(visit="m3", rater="R1", **R_5_3),
        rating(visit="m3", rater="R2", **R_5_3),
    )
    base_v, m3 = results
    assert m3.improvement_pct == D("33.75")
    assert m3.improvement_status is ScoreStatus.FINAL
    assert m3.pga_from_masi == 4
    assert m3.baseline == base_v.consensus
    assert_no_float(results)
    for v in results:
        assert isinstance(v.consensus.masi, Decimal)
        assert isinstance(v.consensus.mmasi, Decimal)


def test_baseline_visit_has_no_improvement() -> None:
    base_v, m1 = score(rating(**R_8_0), rating(visit="m1", **R_5_3))
    assert base_v.visit == BASELINE
    assert base_v.improvement_pct is None
    assert base_v.improvement_status is None
    assert base_v.pga_from_masi is None
    assert base_v.baseline is None
    assert m1.improvement_pct is not None  # the follow-up does have one


def test_missing_baseline_gives_no_improvement() -> None:
    (m2,) = score(rating(visit="m2", **R_5_3))
    assert m2.consensus.masi == D("5.3")
    assert m2.improvement_pct is None
    assert m2.improvement_rounded is None
    assert m2.improvement_status is None
    assert m2.pga_from_masi is None
    assert m2.baseline is None


def test_zero_baseline_gives_no_improvement() -> None:
    base_v, m1 = score(rating(**R_0), rating(visit="m1", **R_5_3))
    assert base_v.consensus.masi == 0
    assert m1.improvement_pct is None
    assert m1.improvement_status is None
    assert m1.pga_from_masi is None


def test_preliminary_baseline_makes_improvement_preliminary() -> None:
    # baseline single rater 8.0 (preliminary); m1 R1/R2 5.3 and 5.3 (final) -> 33.75, preliminary
    _, m1 = score(
        rating(**R_8_0),
        rating(visit="m1", rater="R1", **R_5_3),
        rating(visit="m1", rater="R2", **R_5_3),
    )
    assert m1.consensus.status is ScoreStatus.FINAL
    assert m1.improvement_pct == D("33.75")
    assert m1.improvement_status is ScoreStatus.PRELIMINARY


def test_awaiting_adjudication_baseline_still_counts() -> None:
    # baseline 10.7 and 5.3: |10.7 - 5.3| = 5.4 > 3.0 -> mean 8.0, preliminary, needs adjudication
    # m1 5.3 and 5.3 -> 5.3 final; improvement (8.0 - 5.3) / 8.0 * 100 = 33.75, preliminary
    base_v, m1 = score(
        rating(rater="R1", **R_10_7),
        rating(rater="R2", **R_5_3),
        rating(visit="m1", rater="R1", **R_5_3),
        rating(visit="m1", rater="R2", **R_5_3),
    )
    assert base_v.consensus.needs_adjudication is True
    assert base_v.consensus.masi == D("8.0")
    assert m1.improvement_pct == D("33.75")
    assert m1.improvement_status is ScoreStatus.PRELIMINARY
    assert m1.pga_from_masi == 4


def test_awaiting_adjudication_visit_makes_improvement_preliminary() -> None:
    # baseline 8.0 and 7.9 -> 7.95 final; m1 10.7 and 5.3 -> 8.0, preliminary (gap 5.4)
    # improvement (7.95 - 8.0) / 7.95 * 100 = -0.05 * 100 / 7.95 = -0.6289... -> -0.6, PGA 6
    base_v, m1 = score(
        rating(rater="R1", **R_8_0),
        rating(rater="R2", **R_7_9),
        rating(visit="m1", rater="R1", **R_10_7),
        rating(visit="m1", rater="R2", **R_5_3),
    )
    assert base_v.consensus.status is ScoreStatus.FINAL
    assert m1.consensus.needs_adjudication is True
    assert m1.improvement_status is ScoreStatus.PRELIMINARY
    assert m1.improvement_rounded == D("-0.6")
    assert m1.pga_from_masi == 6


# ---------------------------------------------------------------------- PGA from improvement


@pytest.mark.parametrize(
    ("baseline", "visit", "grade"),
    [
        # baseline 10.0: improvement = (10.0 - visit) * 10
        ("10.0", "0", 0),  # 100 % -> 0 (clearance)
        ("10.0", "0.1", 1),  # 99 %
        ("10.0", "1.0", 1),  # 90 % -> 1 (lower bound inclusive)
        ("10.0", "1.1", 2),  # 89 %
        ("10.0", "2.5", 2),  # 75 % -> 2
        ("10.0", "2.6", 3),  # 74 %
        ("10.0", "5.0", 3),  # 50 % -> 3
        ("10.0", "5.1", 4),  # 49 %
        ("10.0", "7.5", 4),  # 25 % -> 4
        ("10.0", "7.6", 5),  # 24 %
        ("10.0", "10.0", 5),  # 0 % -> 5 (unchanged)
        ("10.0", "10.5", 6),  # -5 % -> 6 (worse than baseline)
        # (47.95 - 4.8) / 47.95 * 100 = 4315 / 47.95 = 89.9896 -> reported 90.0, but the exact
        # value is below 90 -> grade 2 (classification uses the exact value)
        ("47.95", "4.8", 2),
        # (0.3 - 0.2) / 0.3 * 100 = 33.33 % -> 4
        ("0.3", "0.2", 4),
    ],
)
def test_pga_from_improvement_bounds(baseline: str, visit: str, grade: int) -> None:
    assert pga_from_improvement(D(baseline), D(visit)) == grade


def test_pga_classified_on_exact_not_rounded_value() -> None:
    exact = improvement_pct(D("47.95"), D("4.8"))
    assert exact is not None
    assert exact < 90
    assert round_half_up(exact) == D("90.0")
    assert pga_from_improvement(D("47.95"), D("4.8")) == 2


@pytest.mark.parametrize(
    ("pga", "implied", "discordant"),
    [
        (3, 3, False),
        (3, 4, False),  # 1 grade apart
        (4, 3, False),
        (3, 5, True),  # 2 grades apart
        (5, 3, True),
        (0, 6, True),
        (2, None, False),  # improvement undefined
    ],
)
def test_pga_discordant(pga: int, implied: int | None, discordant: bool) -> None:
    assert pga_discordant(pga, implied) is discordant


# ----------------------------------------------------------------------- score_visits ordering


def test_score_visits_orders_by_subject_then_visit_order() -> None:
    rows = [
        rating("S002", "m8", **R_5_3),
        rating("S001", "m2", **R_5_3),
        rating("S002", "baseline", **R_8_0),
        rating("S010", "m3", **R_7_9),
        rating("S001", "m1", **R_7_9),
        rating("S001", "m8", **R_3_0),
        rating("S001", "baseline", **R_8_0),
    ]
    results = score_visits(rows, THRESHOLD, TRIAL.visit_order, BASELINE)
    assert [(v.subject_id, v.visit) for v in results] == [
        ("S001", "baseline"),
        ("S001", "m1"),
        ("S001", "m2"),
        ("S001", "m8"),
        ("S002", "baseline"),
        ("S002", "m8"),
        ("S010", "m3"),
    ]
    got = by_visit(results)
    # S001 m8: (8.0 - 3.0) / 8.0 * 100 = 62.5 -> PGA 3; S010 has no baseline
    assert got[("S001", "m8")].improvement_pct == D("62.5")
    assert got[("S001", "m8")].pga_from_masi == 3
    assert got[("S010", "m3")].improvement_pct is None
    assert_no_float(results)


def test_score_visits_uses_the_visit_order_not_the_names() -> None:
    # a trial whose visits are not in alphabetical order: baseline, m2, m1
    order = {"baseline": 0, "m2": 1, "m1": 2}
    rows = [
        rating("S001", "m1", **R_5_3),
        rating("S001", "baseline", **R_8_0),
        rating("S001", "m2", **R_7_9),
    ]
    results = score_visits(rows, THRESHOLD, order, "baseline")
    assert [v.visit for v in results] == ["baseline", "m2", "m1"]


def test_score_visits_accepts_rater_score_tuples() -> None:
    rows = [
        ("S001", "m1", rs("R1", "5.3", "3.1")),
        ("S001", "baseline", rs("R2", "8.0", "4.0")),
        ("S001", "baseline", rs("R1", "7.9", "4.0")),
    ]
    base_v, m1 = score_visits(rows, THRESHOLD, TRIAL.visit_order, BASELINE)
    # baseline (8.0 + 7.9) / 2 = 7.95 final; m1 (7.95 - 5.3) / 7.95 * 100 = 265 / 7.95 = 33.33..
    assert base_v.consensus.masi == D("7.95")
    assert m1.improvement_rounded == D("33.3")
    assert m1.improvement_status is ScoreStatus.PRELIMINARY  # m1 is single-rater
    assert m1.pga_from_masi == 4
