"""Property tests of MASI scoring and consensus (SPEC 4) over random valid ratings."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_adapter.domain import MasiRating, RecordContext
from fhir_adapter.scoring import (
    Consensus,
    ConsensusMethod,
    RaterScore,
    ScoreStatus,
    VisitScore,
    consensus,
    improvement_pct,
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
THRESHOLD = TRIAL.adjudication_threshold
REGIONS = ("forehead", "right_malar", "left_malar", "chin")
SETTINGS = settings(max_examples=200, deadline=None)
# whole masi files are slower to generate and validate
FILE_SETTINGS = settings(max_examples=100, deadline=None)

# Rater ids: any valid identifier (letters, digits, '-', '.'), so natural ordering is exercised
# with awkward ids too (R2 / R10 / R02 / r1 / 10 / A.1 ...).
# R1 / R01 / R001 are equal in natural order: their order must still not depend on row order.
rater_ids = st.one_of(
    st.integers(0, 120).map(lambda n: f"R{n}"),
    st.tuples(st.integers(0, 2), st.integers(0, 3)).map(lambda t: "R" + "0" * t[0] + str(t[1])),
    st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9.\-]{0,5}\Z"),
)


@st.composite
def rating_rows(
    draw: st.DrawFn, subject: str = "S001", visit: str = "baseline", rater: str = "R1"
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "subject_id": subject,
        "visit": visit,
        "rater_id": rater,
        "assessed_on": "2024-09-02",
    }
    for region in REGIONS:
        row[f"{region}_d"] = draw(st.integers(0, 4))
        row[f"{region}_h"] = draw(st.integers(0, 4))
        row[f"{region}_a"] = draw(st.integers(0, 6))
    return row


def to_rating(row: dict[str, Any]) -> MasiRating:
    return MasiRating.model_validate(row, context=CTX)


@st.composite
def rater_scores(draw: st.DrawFn, min_size: int = 1, max_size: int = 3) -> list[RaterScore]:
    """1-3 real per-rater scores from random ratings, with distinct rater ids."""
    ids = draw(st.lists(rater_ids, min_size=min_size, max_size=max_size, unique=True))
    return [rater_score(to_rating(draw(rating_rows(rater=rid)))) for rid in ids]


def masi_values(scores: list[RaterScore], raters: tuple[str, ...]) -> list[Decimal]:
    return [s.masi for s in scores if s.rater_id in raters]


def is_multiple_of(value: Decimal, step: str) -> bool:
    q = value / Decimal(step)
    return q == q.to_integral_value()


# ---------------------------------------------------------------------------- per-rater ranges


@SETTINGS
@given(rating_rows())
def test_rater_scores_in_range(row: dict[str, Any]) -> None:
    r = to_rating(row)
    masi, mmasi = rater_masi(r), rater_mmasi(r)
    assert isinstance(masi, Decimal)
    assert isinstance(mmasi, Decimal)
    assert 0 <= masi <= 48
    assert 0 <= mmasi <= 24
    assert mmasi <= masi
    assert is_multiple_of(masi, "0.1")
    assert is_multiple_of(mmasi, "0.1")
    # independent reference computation with exact fractions
    ref = sum(
        Fraction(3 if region != "chin" else 1, 10)
        * (row[f"{region}_d"] + row[f"{region}_h"])
        * row[f"{region}_a"]
        for region in REGIONS
    )
    assert Fraction(masi) == ref


# ---------------------------------------------------------------------------------- consensus


def check_consensus(scores: list[RaterScore], c: Consensus) -> None:
    used = masi_values(scores, c.raters)
    used_mmasi = [s.mmasi for s in scores if s.rater_id in c.raters]
    every = [s.masi for s in scores]
    assert set(c.raters) <= {s.rater_id for s in scores}
    assert len(set(c.raters)) == len(c.raters)
    assert min(used) <= c.masi <= max(used)
    assert min(every) <= c.masi <= max(every)
    assert min(used_mmasi) <= c.mmasi <= max(used_mmasi)
    assert isinstance(c.masi, Decimal)
    assert isinstance(c.mmasi, Decimal)
    assert is_multiple_of(c.masi, "0.01")  # at most two decimals arise
    assert is_multiple_of(c.mmasi, "0.01")
    expected_count = {
        ConsensusMethod.SINGLE: 1,
        ConsensusMethod.MEAN_OF_2: 2,
        ConsensusMethod.CLOSEST_2_OF_3: 2,
        ConsensusMethod.MEDIAN_OF_3: 3,
    }[c.method]
    assert len(c.raters) == expected_count
    if c.method in (ConsensusMethod.MEAN_OF_2, ConsensusMethod.CLOSEST_2_OF_3):
        assert c.masi == sum(used) / 2
        assert c.mmasi == sum(used_mmasi) / 2
    if c.method is ConsensusMethod.MEDIAN_OF_3:
        assert c.masi == sorted(every)[1]
        assert c.mmasi == sorted(s.mmasi for s in scores)[1]


@SETTINGS
@given(rater_scores())
def test_consensus_between_min_and_max(scores: list[RaterScore]) -> None:
    c = consensus(scores, THRESHOLD)
    check_consensus(scores, c)
    n = len(scores)
    if n == 1:
        assert (c.method, c.status, c.needs_adjudication) == (
            ConsensusMethod.SINGLE,
            ScoreStatus.PRELIMINARY,
            False,
        )
    elif n == 2:
        a, b = scores
        agree = abs(a.masi - b.masi) <= THRESHOLD
        assert c.method is ConsensusMethod.MEAN_OF_2
        assert c.status is (ScoreStatus.FINAL if agree else ScoreStatus.PRELIMINARY)
        assert c.needs_adjudication is (not agree)
    else:
        low, mid, high = sorted(s.masi for s in scores)
        assert c.status is ScoreStatus.FINAL
        assert c.needs_adjudication is False
        if mid - low == high - mid:
            assert c.method is ConsensusMethod.MEDIAN_OF_3
        else:
            assert c.method is ConsensusMethod.CLOSEST_2_OF_3
            pair = (low, mid) if mid - low < high - mid else (mid, high)
            assert c.masi == (pair[0] + pair[1]) / 2


@SETTINGS
@given(st.data(), rater_scores())
def test_consensus_invariant_to_rater_order(data: st.DataObject, scores: list[RaterScore]) -> None:
    shuffled = data.draw(st.permutations(scores))
    a, b = consensus(scores, THRESHOLD), consensus(shuffled, THRESHOLD)
    assert (a.masi, a.mmasi, a.raters, a.method, a.status, a.needs_adjudication) == (
        b.masi,
        b.mmasi,
        b.raters,
        b.method,
        b.status,
        b.needs_adjudication,
    )


@SETTINGS
@given(
    rater_scores().filter(lambda s: len(s) != 2),
    st.decimals(min_value=0, max_value=60, places=2),
    st.decimals(min_value=0, max_value=60, places=2),
)
def test_consensus_independent_of_threshold_for_1_and_3_raters(
    scores: list[RaterScore], t1: Decimal, t2: Decimal
) -> None:
    assert consensus(scores, t1) == consensus(scores, t2)


@SETTINGS
@given(rater_scores(min_size=2, max_size=2), st.decimals(min_value=0, max_value=60, places=1))
def test_two_raters_final_iff_within_threshold(
    scores: list[RaterScore], threshold: Decimal
) -> None:
    c = consensus(scores, threshold)
    within = abs(scores[0].masi - scores[1].masi) <= threshold
    assert (c.status is ScoreStatus.FINAL) is within
    assert c.needs_adjudication is (not within)


# ------------------------------------------------------------------------------- score_visits


@st.composite
def masi_files(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A masi.csv as rows: a few subjects x visits, 1-3 distinct raters each."""
    rows: list[dict[str, Any]] = []
    subjects = draw(st.lists(st.sampled_from(["S001", "S002", "S010"]), min_size=1, unique=True))
    for subject in subjects:
        visits = draw(
            st.lists(st.sampled_from(TRIAL.visit_ids), min_size=1, max_size=4, unique=True)
        )
        for visit in visits:
            ids = draw(st.lists(rater_ids, min_size=1, max_size=3, unique=True))
            rows.extend(draw(rating_rows(subject, visit, rid)) for rid in ids)
    return rows


def summary(results: list[VisitScore]) -> list[tuple[object, ...]]:
    return [
        (
            v.subject_id,
            v.visit,
            v.consensus.masi,
            v.consensus.mmasi,
            v.consensus.raters,
            v.consensus.method,
            v.consensus.status,
            v.consensus.needs_adjudication,
            v.improvement_pct,
            v.improvement_status,
            v.pga_from_masi,
            tuple(r.rater_id for r in v.raters),
        )
        for v in results
    ]


@FILE_SETTINGS
@given(st.data(), masi_files())
def test_score_visits_invariant_to_row_order(
    data: st.DataObject, rows: list[dict[str, Any]]
) -> None:
    ratings = [to_rating(r) for r in rows]
    shuffled = data.draw(st.permutations(ratings))
    first = score_visits(ratings, THRESHOLD, TRIAL.visit_order, TRIAL.baseline_visit)
    second = score_visits(shuffled, THRESHOLD, TRIAL.visit_order, TRIAL.baseline_visit)
    assert summary(first) == summary(second)
    keys = [(v.subject_id, TRIAL.visit_order[v.visit]) for v in first]
    assert keys == sorted(keys)
    assert len(keys) == len(set(keys)) == len({(r["subject_id"], r["visit"]) for r in rows})


@FILE_SETTINGS
@given(masi_files())
def test_score_visits_improvement_consistent(rows: list[dict[str, Any]]) -> None:
    results = score_visits(
        [to_rating(r) for r in rows], THRESHOLD, TRIAL.visit_order, TRIAL.baseline_visit
    )
    base = {v.subject_id: v.consensus for v in results if v.visit == TRIAL.baseline_visit}
    for v in results:
        b = base.get(v.subject_id)
        if v.visit == TRIAL.baseline_visit or b is None or b.masi == 0:
            assert v.improvement_pct is None
            assert v.pga_from_masi is None
            assert v.improvement_status is None
            continue
        assert v.improvement_pct is not None
        exact = (Fraction(b.masi) - Fraction(v.consensus.masi)) * 100 / Fraction(b.masi)
        # the rounded report equals rounding the exact rational half away from zero
        assert v.improvement_rounded == reference_round(exact)
        assert v.pga_from_masi == reference_grade(exact)
        both_final = b.status is v.consensus.status is ScoreStatus.FINAL
        assert v.improvement_status is (
            ScoreStatus.FINAL if both_final else ScoreStatus.PRELIMINARY
        )


def reference_round(x: Fraction) -> Decimal:
    """Round an exact rational to 1 decimal, half away from zero."""
    scaled = abs(x) * 10
    whole = int(scaled)
    if scaled - whole >= Fraction(1, 2):
        whole += 1
    sign = -1 if x < 0 else 1
    return Decimal(sign * whole) / 10


def reference_grade(x: Fraction) -> int:
    for grade, bound in ((0, 100), (1, 90), (2, 75), (3, 50), (4, 25), (5, 0)):
        if x >= bound:
            return grade
    return 6


@SETTINGS
@given(
    st.integers(1, 4800).map(lambda n: Decimal(n) / 100),
    st.integers(0, 4800).map(lambda n: Decimal(n) / 100),
)
def test_improvement_rounding_and_grade_exact(baseline: Decimal, visit: Decimal) -> None:
    # consensus values are multiples of 0.01 in [0, 48]
    value = improvement_pct(baseline, visit)
    assert value is not None
    exact = (Fraction(baseline) - Fraction(visit)) * 100 / Fraction(baseline)
    assert round_half_up(value) == reference_round(exact)
    assert pga_from_improvement(baseline, visit) == reference_grade(exact)
