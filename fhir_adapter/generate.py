"""A synthetic, seeded, realistic data set of the trial (SPEC §3, `fhir-adapter generate`).

:func:`generate` writes the six CSV files of SPEC §3 into a directory, plus ``bad/``: files that
mix valid rows with deliberately bad ones (documented in ``bad/README.md`` and in
:func:`bad_rows` / :data:`BAD_FILES`) and whole files the intake must refuse.

Everything is derived from ``random.Random(seed)`` and ``today`` (the ``--today`` of the command,
by default the site's real date): every date is an offset from ``today`` - the data set starts
``elapsed_days`` (795) days before it - so a seed and a ``today`` give byte-identical files,
another ``today`` shifts every date by the same number of days, and the deliberately bad
"future" dates of ``bad/`` (``today`` + 30 days) stay in the future on the day the set is made.
No global random state, no wall clock. ``elapsed_days`` shorter than the study truncates it:
visits, resolutions and withdrawals after ``today`` are not generated. Visits, arms and criteria
come from the trial definition.

Rows are written as they are generated, one participant at a time: memory does not grow with
``n_participants`` (used for the 100x benchmarks).

Design of the good data set (the numbers are rates, so they scale with ``n_participants``):

- ``n_participants`` enrolled, allocated to the arms in equal numbers in random order, plus
  about 10 % screen failures interleaved in screening order (ineligible: an exclusion criterion
  answered ``yes`` (E4 pregnancy for women), an inclusion criterion ``no``, an age outside the
  I1 range; or incomplete: a criterion left empty, status ``screening``). Subject ids ``S001``...
  in screening order; screening spread over the first year of the study.
- Enrolled: mostly women, aged 22-55 at screening, consent <= screening < enrolment <= first
  treatment; every criterion answered so that they are eligible (E4 ``no`` for men too).
- MASI at every visit (baseline on or up to 3 days before the first treatment, follow-ups
  within 5 days of their nominal day), two physicians of the pool R1-R4 per visit; severity
  improves over time, more in experimental arms (``type: experimental``, about 70 % at the last
  visit) than in the others (about 40 %); rater noise of +-1 on some items. About 8 % of the
  pairs differ by more than the adjudication threshold and 75 % of those have a third rater.
- About 5 % withdraw (status ``withdrawn``, no visits after ``withdrawn_on``); about 3 % of the
  follow-up visits are missed (no rows); everyone else whose last visit is past is ``completed``.
- PGA at every follow-up visit by one of the MASI raters, consistent with the MASI improvement
  (within one grade) except about 5 % discordant by >= 2 grades.
- Satisfaction at every second follow-up visit (m2, m4, m6, m8 with the shipped visits): a level,
  or in about 15 % only the patient's ``improvement_pct``.
- Adverse events after laser sessions (first treatment and each attended follow-up visit),
  recorded at the next attended visit: erythema and burning very common, itching, dryness and
  edema common, irritation and hyperpigmentation occasional, scar formation, skin breakdown and
  skin infection rare; about one serious skin infection and one ``other`` event per 60
  participants; most recovered within days, hyperpigmentation often still ongoing.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from fhir_adapter.domain.records import AeTerm
from fhir_adapter.intake import KINDS, file_name
from fhir_adapter.io.outputs import check_output
from fhir_adapter.trial import Criterion, Trial, load_trial

DEFAULT_SEED = 20241028
DEFAULT_TODAY = dt.date(2026, 11, 1)  # the library's default; the command uses the real date
STUDY_START = dt.date(2024, 8, 28)  # the registry's start date: 795 days before DEFAULT_TODAY
#: Days from the first screening to ``today``: recruitment, then the whole follow-up.
DEFAULT_ELAPSED_DAYS = (DEFAULT_TODAY - STUDY_START).days
RECRUITMENT_DAYS = 365

RATERS: tuple[str, ...] = ("R1", "R2", "R3", "R4")
SCREEN_FAILURE_RATE = 0.10
FEMALE_RATE = 0.90
WITHDRAWAL_RATE = 0.05
MISSED_VISIT_RATE = 0.03
DISCORDANT_PAIR_RATE = 0.08
THIRD_RATER_RATE = 0.75
ITEM_NOISE_RATE = 0.10
PGA_DISCORDANT_RATE = 0.05
SATISFACTION_ESTIMATE_ONLY_RATE = 0.15
ENROLLED_AGE = (22, 55)
BAD_SET_MIN_DAYS = 180  # the valid rows of bad/ are dated within the first 150 days

#: MASI regions (the scoring rule's, not the trial's) and their weights in tenths.
_REGIONS: tuple[tuple[str, int], ...] = (
    ("forehead", 3),
    ("right_malar", 3),
    ("left_malar", 3),
    ("chin", 1),
)
_ITEM_MAX = (4, 4, 6)  # D, H, A
_SCORE_COLUMNS: tuple[str, ...] = tuple(
    f"{region}_{item}" for region, _ in _REGIONS for item in ("d", "h", "a")
)

Scores = tuple[int, ...]  # the 12 MASI items in _SCORE_COLUMNS order


# -- public results --------------------------------------------------------------------------
@dataclass(frozen=True)
class BadRow:
    """A deliberately bad (or warning) row of a file in ``bad/``."""

    file: str  # file name inside bad/
    line: int  # file line (header = 1)
    field: str
    why: str
    severity: Literal["error", "warning"] = "error"


@dataclass(frozen=True)
class BadFile:
    """A file under ``bad/`` the intake must refuse whole (or, for ``ok``, accept whole)."""

    path: str  # relative to bad/
    why: str
    rejected: bool = True


#: Whole files written under ``bad/``.
BAD_FILES: tuple[BadFile, ...] = (
    BadFile(
        "missing_columns/masi.csv",
        "header misspells forehead_d as 'forhead_d': the file is rejected whole, naming the column",
    ),
    BadFile(
        "gb18030/participants.csv",
        "GB18030-encoded (Chinese withdrawal_reason), not UTF-8: rejected whole with re-export "
        "advice",
    ),
    BadFile("empty/pga.csv", "0 bytes (no header): rejected whole"),
    BadFile(
        "bom_crlf/masi.csv",
        "valid: UTF-8 BOM, CRLF line endings and trailing blanks in cells must all be accepted "
        "(its subjects are in bom_crlf/participants.csv and bad/participants.csv)",
        rejected=False,
    ),
    BadFile(
        "bom_crlf/participants.csv",
        "valid: UTF-8 BOM, CRLF line endings, trailing blanks",
        rejected=False,
    ),
)


@dataclass(frozen=True)
class GenerateSummary:
    out_dir: Path
    seed: int
    rows: Mapping[str, int]  # file name -> data rows written (good set)
    enrolled: int
    screen_failures: int
    withdrawn: int
    bad_files: tuple[str, ...] = ()  # every file written under bad/, relative to out_dir
    bad_rows: tuple[BadRow, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "seed": self.seed,
            "rows": dict(self.rows),
            "enrolled": self.enrolled,
            "screen_failures": self.screen_failures,
            "withdrawn": self.withdrawn,
            "bad_files": list(self.bad_files),
            "bad_rows": len(self.bad_rows),
        }


# -- small helpers ---------------------------------------------------------------------------
def _iso(day: dt.date | None) -> str:
    return "" if day is None else day.isoformat()


def _masi10(scores: Scores) -> int:
    """MASI in tenths of a point (exact integer arithmetic)."""
    total = 0
    for i, (_, weight) in enumerate(_REGIONS):
        d, h, a = scores[3 * i : 3 * i + 3]
        total += weight * (d + h) * a
    return total


def _item_max(index: int) -> int:
    return _ITEM_MAX[index % 3]


def _pick(rng: random.Random, k_left: int, n_left: int) -> bool:
    """Selection sampling: exactly k of n chosen, streaming, each subset equally likely."""
    return n_left > 0 and rng.random() * n_left < k_left


def _weighted(rng: random.Random, options: Sequence[tuple[Any, float]]) -> Any:
    total = sum(w for _, w in options)
    x = rng.random() * total
    for value, weight in options:
        x -= weight
        if x < 0:
            return value
    return options[-1][0]


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)


def _birth_date(rng: random.Random, age: int, on: dt.date) -> dt.date:
    """A birth date giving exactly ``age`` completed years on ``on``."""
    return _add_years(on, -age) - dt.timedelta(days=rng.randint(0, 360))


def _writer(stack: ExitStack, path: Path, columns: Sequence[str]) -> csv.DictWriter[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = stack.enter_context(path.open("w", encoding="utf-8", newline=""))
    writer = csv.DictWriter(fh, fieldnames=list(columns), restval="", lineterminator="\n")
    writer.writeheader()
    return writer


# -- MASI ratings ----------------------------------------------------------------------------
def _normalise(scores: Sequence[int]) -> Scores:
    """A region without darkness or without area has no melasma: all its items are 0."""
    out = list(scores)
    for region in range(len(_REGIONS)):
        d, _h, a = out[3 * region : 3 * region + 3]
        if d == 0 or a == 0:
            out[3 * region : 3 * region + 3] = [0, 0, 0]
    return tuple(out)


def _jitter(rng: random.Random, scores: Scores, rate: float, floor: int = 0) -> Scores:
    """A rater's reading: some items one step off (never below ``floor``)."""
    out = list(scores)
    for i in range(len(out)):
        if rng.random() < rate:
            out[i] = min(_item_max(i), max(floor, out[i] + rng.choice((-1, 1))))
    return _normalise(out)


def _push_apart(rng: random.Random, start: Scores, threshold10: Decimal) -> list[Scores]:
    """Move items one step at a time until MASI differs from ``start`` by > the threshold.

    Returns the path (every intermediate state, the last one is the result).
    """
    base = _masi10(start)
    step = -1 if base > threshold10 + 60 and rng.random() < 0.5 else 1
    current = start
    path: list[Scores] = []
    for _ in range(1000):
        if abs(_masi10(current) - base) > threshold10:
            break
        present = [r for r in range(len(_REGIONS)) if current[3 * r] and current[3 * r + 2]]
        movable = [
            i
            for r in present
            for i in range(3 * r, 3 * r + 3)
            if 0 <= current[i] + step <= _item_max(i)
        ]
        items = list(current)
        if movable:
            i = rng.choice(movable)
            items[i] += step
        elif step > 0 and len(present) < len(_REGIONS):  # a region not affected so far
            r = rng.choice([r for r in range(len(_REGIONS)) if r not in present])
            items[3 * r : 3 * r + 3] = [1, 1, 1]
        else:  # pragma: no cover - everything at its maximum: go the other way
            step = -step
            continue
        current = _normalise(items)
        path.append(current)
    return path


@dataclass(frozen=True)
class _Rating:
    rater_id: str
    scores: Scores


def _visit_ratings(
    rng: random.Random,
    truth: Scores,
    raters: tuple[str, str],
    third: str,
    threshold10: Decimal,
    floor: int,
) -> list[_Rating]:
    first = _jitter(rng, truth, ITEM_NOISE_RATE, floor)
    if rng.random() < DISCORDANT_PAIR_RATE:
        path = _push_apart(rng, first, threshold10)
        second = path[-1]
        ratings = [_Rating(raters[0], first), _Rating(raters[1], second)]
        if rng.random() < THIRD_RATER_RATE:
            middle = _masi10(first) + _masi10(second)
            midpoints = [s for s in path if 2 * _masi10(s) == middle]
            if midpoints and rng.random() < 0.3:
                adjudicator = midpoints[0]  # exactly between the two: median-of-3
            else:
                adjudicator = _jitter(rng, truth, ITEM_NOISE_RATE, floor)
            ratings.append(_Rating(third, adjudicator))
        return ratings
    for _ in range(5):
        second = _jitter(rng, truth, ITEM_NOISE_RATE, floor)
        if abs(_masi10(first) - _masi10(second)) <= threshold10:
            return [_Rating(raters[0], first), _Rating(raters[1], second)]
    return [_Rating(raters[0], truth), _Rating(raters[1], truth)]


def _baseline_truth(rng: random.Random) -> Scores:
    levels = ((1, 0.15), (2, 0.35), (3, 0.35), (4, 0.15))
    scores: list[int] = []
    malar_area = _weighted(rng, ((2, 0.2), (3, 0.35), (4, 0.3), (5, 0.15)))
    for region, _ in _REGIONS:
        d = _weighted(rng, levels)
        h = _weighted(rng, levels)
        if region == "forehead":
            a = _weighted(rng, ((1, 0.3), (2, 0.35), (3, 0.25), (4, 0.1)))
        elif region == "chin":
            a = _weighted(rng, ((1, 0.55), (2, 0.35), (3, 0.1)))
        else:
            a = min(5, max(1, malar_area + rng.choice((-1, 0, 0, 1))))
        scores += [d, h, a]
    return tuple(scores)


def _truth_at(rng: random.Random, baseline: Scores, improvement: float) -> Scores:
    """Baseline items scaled so that MASI falls by ``improvement`` (stochastic rounding)."""
    factor = math.sqrt(max(0.0, 1.0 - improvement))
    out = []
    for i, value in enumerate(baseline):
        scaled = value * factor
        whole = math.floor(scaled)
        item = whole + (1 if rng.random() < scaled - whole else 0)
        out.append(min(_item_max(i), max(0, item)))
    return _normalise(out)


def _implied_pga(baseline2: int, visit2: int) -> int:
    """SPEC §4 grade implied by improvement, on exact integers (values are 2 x consensus)."""
    gained = (baseline2 - visit2) * 100
    for grade, bound in ((0, 100), (1, 90), (2, 75), (3, 50), (4, 25), (5, 0)):
        if gained >= bound * baseline2:
            return grade
    return 6


# -- adverse events --------------------------------------------------------------------------
@dataclass(frozen=True)
class _AeProfile:
    per_interval: float  # probability per laser session
    grades: tuple[tuple[int, float], ...]
    causality: tuple[tuple[str, float], ...]
    onset_days: tuple[int, int]  # after the session
    duration_days: tuple[int, int]
    ongoing: float  # probability the event is still ongoing (no resolved_on)
    actions: tuple[str, ...]


_RELATED = (("related", 0.7), ("possibly_related", 0.3))
_PROFILES: dict[AeTerm, _AeProfile] = {
    AeTerm.ERYTHEMA: _AeProfile(
        0.14,
        ((1, 0.85), (2, 0.14), (3, 0.01)),
        _RELATED,
        (0, 1),
        (1, 6),
        0.0,
        ("", "none", "cold compress"),
    ),
    AeTerm.BURNING: _AeProfile(
        0.10, ((1, 0.8), (2, 0.2)), _RELATED, (0, 1), (1, 3), 0.0, ("", "none", "cold compress")
    ),
    AeTerm.ITCHING: _AeProfile(
        0.045,
        ((1, 0.9), (2, 0.1)),
        (("related", 0.5), ("possibly_related", 0.4), ("unlikely_related", 0.1)),
        (1, 5),
        (2, 10),
        0.04,
        ("", "topical emollient", "oral antihistamine"),
    ),
    AeTerm.DRYNESS: _AeProfile(
        0.045,
        ((1, 0.9), (2, 0.1)),
        (("related", 0.5), ("possibly_related", 0.4), ("unlikely_related", 0.1)),
        (1, 7),
        (3, 14),
        0.04,
        ("", "moisturiser"),
    ),
    AeTerm.EDEMA: _AeProfile(
        0.035, ((1, 0.85), (2, 0.15)), _RELATED, (0, 1), (1, 4), 0.0, ("", "none", "cold compress")
    ),
    AeTerm.IRRITATION: _AeProfile(
        0.012, ((1, 0.8), (2, 0.2)), _RELATED, (0, 3), (2, 10), 0.0, ("", "none")
    ),
    AeTerm.HYPERPIGMENTATION: _AeProfile(
        0.015,
        ((1, 0.7), (2, 0.3)),
        _RELATED,
        (10, 20),
        (30, 120),
        0.5,
        ("sun protection; topical depigmenting cream", "laser session postponed"),
    ),
    AeTerm.SCAR_FORMATION: _AeProfile(
        0.0015,
        ((2, 1.0),),
        (("possibly_related", 1.0),),
        (7, 14),
        (60, 180),
        0.5,
        ("topical silicone gel",),
    ),
    AeTerm.SKIN_BREAKDOWN: _AeProfile(
        0.002, ((1, 0.6), (2, 0.4)), _RELATED, (0, 3), (5, 14), 0.0, ("wound care",)
    ),
    AeTerm.SKIN_INFECTION: _AeProfile(
        0.002,
        ((2, 1.0),),
        (("possibly_related", 0.6), ("unlikely_related", 0.4)),
        (2, 6),
        (7, 14),
        0.0,
        ("topical antibiotic", "oral antibiotics"),
    ),
}
_OTHER_TEXTS = ("acneiform eruption", "contact dermatitis to dressing", "headache", "mild fever")


# reactions of the skin to the laser session itself: the investigator tends to blame the device
_DEVICE_TYPICAL = frozenset({AeTerm.ERYTHEMA, AeTerm.BURNING, AeTerm.EDEMA, AeTerm.SKIN_BREAKDOWN})


def _suspect(trial: Trial, arm: str, event: Mapping[str, str]) -> str:
    """Which intervention(s) the causality judgement concerns, often not stated (SPEC §3).

    Drawn from a generator of its own, seeded by the event, so the rest of the data set does
    not depend on it.
    """
    rng = random.Random(f"suspect:{event['ae_id']}:{event['subject_id']}")  # noqa: S311
    given = next(a.interventions for a in trial.arms if a.id == arm)
    if event["causality"] == "unrelated" or rng.random() < 0.4:
        return ""
    devices = [i.id for i in trial.interventions if i.id in given and i.kind == "device"]
    if AeTerm(event["term"]) in _DEVICE_TYPICAL and devices and rng.random() < 0.7:
        return rng.choice(devices)
    everything = len(given) > 1 and set(given) == {i.id for i in trial.interventions}
    return "both" if everything and rng.random() < 0.5 else rng.choice(given)


@dataclass
class _Counter:
    value: int = 0

    def next(self) -> int:
        self.value += 1
        return self.value


def _ae_row(
    ae_id: int,
    subject: str,
    term: str,
    onset: dt.date,
    visit: tuple[str, dt.date],
    *,
    term_text: str = "",
    grade: int,
    serious: bool = False,
    causality: str,
    resolved: dt.date | None,
    outcome: str,
    action: str,
) -> dict[str, str]:
    return {
        "ae_id": f"AE{ae_id:04d}",
        "subject_id": subject,
        "term": term,
        "term_text": term_text,
        "onset_on": _iso(onset),
        "resolved_on": _iso(resolved),
        "visit": visit[0],
        "grade": str(grade),
        "serious": "yes" if serious else "no",
        "causality": causality,
        "outcome": outcome,
        "action_taken": action,
        "reported_on": _iso(visit[1]),
    }


def _resolution(
    rng: random.Random, onset: dt.date, days: tuple[int, int], ongoing: float, today: dt.date
) -> tuple[dt.date | None, str]:
    if rng.random() < ongoing:
        return None, rng.choice(("recovering", "not_recovered"))
    resolved = onset + dt.timedelta(days=rng.randint(*days))
    if resolved > today:
        return None, "recovering"
    return resolved, "recovered"


# -- the good data set -----------------------------------------------------------------------
@dataclass
class _Writers:
    rows: dict[str, csv.DictWriter[str]]
    counts: dict[str, int] = field(default_factory=dict)

    def write(self, kind: str, row: Mapping[str, str]) -> None:
        self.rows[kind].writerow(row)
        name = file_name(kind)
        self.counts[name] = self.counts.get(name, 0) + 1


@dataclass(frozen=True)
class _Setup:
    trial: Trial
    today: dt.date
    start: dt.date
    span_days: int
    threshold10: Decimal
    age_limits: tuple[int, int]
    follow_ups: tuple[str, ...]
    satisfaction_visits: frozenset[str]
    last_offset: int


def _age_limits(trial: Trial) -> tuple[int, int]:
    for criterion in trial.criteria:
        for check in criterion.checks:
            if check.rule == "age_between":
                return check.min_years or 0, check.max_years or 200
    return 0, 200


def _answers(trial: Trial, value: Callable[[Criterion], str]) -> dict[str, str]:
    return {c.column: value(c) for c in trial.criteria}


def _eligible(c: Criterion) -> str:
    return "yes" if c.kind == "inclusion" else "no"


def _screen_failure(
    rng: random.Random, setup: _Setup, female: bool
) -> tuple[dict[str, str], int | None, bool]:
    """Answers of a failed screening, an age override (or None) and whether it is incomplete."""
    trial = setup.trial
    answers = _answers(trial, _eligible)
    exclusions = [c for c in trial.criteria if c.kind == "exclusion"]
    inclusions = [c for c in trial.criteria if c.kind == "inclusion"]
    pregnancy = next((c for c in exclusions if "pregnan" in c.column), None)
    reasons = ["exclusion", "inclusion", "age", "incomplete"]
    if female and pregnancy is not None:
        reasons.append("pregnancy")
    reason = rng.choice(reasons)
    if reason == "pregnancy" and pregnancy is not None:
        answers[pregnancy.column] = "yes"
    elif reason == "exclusion" and exclusions:
        answers[rng.choice([c for c in exclusions if c is not pregnancy] or exclusions).column] = (
            "yes"
        )
    elif reason == "inclusion" and inclusions:
        answers[rng.choice(inclusions).column] = "no"
    elif reason == "age":
        low, high = setup.age_limits
        age = rng.choice((max(0, low - 1), high + 1, high + rng.randint(2, 4)))
        return answers, age, False
    elif reason == "incomplete":
        answers[rng.choice(trial.criteria).column] = ""
        return answers, None, True
    return answers, None, False


_WITHDRAWAL_REASONS = (
    "moved to another city",
    "personal reasons",
    "unable to attend follow-up visits",
    "withdrew consent",
    "discomfort after laser sessions",
    "work schedule conflicts",
)


@dataclass
class _Quota:
    """Streaming selection: k of n, decided one candidate at a time."""

    k: int
    n: int

    def take(self, rng: random.Random) -> bool:
        chosen = _pick(rng, self.k, self.n)
        self.n -= 1
        if chosen:
            self.k -= 1
        return chosen


def _participant(
    rng: random.Random,
    setup: _Setup,
    out: _Writers,
    *,
    subject: str,
    screened: dt.date,
    mrn: str,
    arm: str | None,
    withdraw: bool,
    serious: bool,
    other: bool,
    ae_ids: _Counter,
) -> bool:
    """Write every row of one participant; returns whether they withdrew."""
    trial, today = setup.trial, setup.today
    female = rng.random() < FEMALE_RATE
    consent = max(setup.start, screened - dt.timedelta(days=rng.randint(0, 3)))
    screener = rng.choice(RATERS)
    if arm is None:  # screen failure
        answers, age, incomplete = _screen_failure(rng, setup, female)
        if age is None:
            age = rng.randint(*ENROLLED_AGE)
        out.write(
            "participants",
            {
                "subject_id": subject,
                "sex": "female" if female else "male",
                "birth_date": _iso(_birth_date(rng, age, screened)),
                "consent_date": _iso(consent),
                "status": "screening" if incomplete else "",
                "mrn": mrn,
            },
        )
        out.write(
            "eligibility",
            {"subject_id": subject, "screened_on": _iso(screened), "screened_by": screener}
            | answers,
        )
        return False

    age = rng.randint(*ENROLLED_AGE)
    birth = _birth_date(rng, age, screened)
    enrolled = screened + dt.timedelta(days=rng.randint(1, 10))
    first = enrolled + dt.timedelta(days=rng.randint(0, 7))
    experimental = any(a.id == arm and a.type == "experimental" for a in trial.arms)
    final_improvement = (
        rng.triangular(0.45, 0.92, 0.74) if experimental else rng.triangular(0.10, 0.70, 0.38)
    )

    # the schedule: visit id -> date, attended or not
    schedule: list[tuple[str, dt.date, bool]] = []
    for index, visit in enumerate(trial.visits):
        earliest, latest = trial.window(visit.id)
        if index == 0:
            offset = visit.offset_days - rng.randint(0, min(3, visit.offset_days - earliest))
        else:
            lo = max(earliest, visit.offset_days - 5)
            hi = min(latest, visit.offset_days + 5)
            offset = rng.randint(lo, hi)
        day = first + dt.timedelta(days=offset)
        attended = index == 0 or rng.random() >= MISSED_VISIT_RATE
        schedule.append((visit.id, day, attended and day <= today))

    withdrawn_on: dt.date | None = None
    if withdraw and len(schedule) > 2:
        last = rng.randint(1, len(schedule) - 2)  # index of the last visit attended
        next_day = first + dt.timedelta(days=trial.window(schedule[last + 1][0])[0])
        withdrawn_on = min(
            schedule[last][1] + dt.timedelta(days=rng.randint(2, 18)),
            next_day - dt.timedelta(days=1),
        )
        if withdrawn_on > today:
            withdrawn_on = None
        else:
            schedule = [(v, d, a and i <= last) for i, (v, d, a) in enumerate(schedule)]
    if withdrawn_on is not None:
        status = "withdrawn"
    elif schedule[-1][1] <= today:
        status = "completed"
    else:
        status = "on-study"
    out.write(
        "participants",
        {
            "subject_id": subject,
            "arm": arm,
            "sex": "female" if female else "male",
            "birth_date": _iso(birth),
            "consent_date": _iso(consent),
            "enrolled_on": _iso(enrolled),
            "first_treatment_on": _iso(first),
            "status": status,
            "withdrawn_on": _iso(withdrawn_on),
            "withdrawal_reason": rng.choice(_WITHDRAWAL_REASONS) if withdrawn_on else "",
            "mrn": mrn,
        },
    )
    out.write(
        "eligibility",
        {"subject_id": subject, "screened_on": _iso(screened), "screened_by": screener}
        | _answers(trial, _eligible),
    )

    # assessments
    pair = tuple(sorted(rng.sample(RATERS, 2)))
    baseline = _baseline_truth(rng)
    baseline2: int | None = None
    visits_done = [(v, d) for v, d, a in schedule if a]
    for visit_id, day in visits_done:
        offset = trial.visit(visit_id).offset_days
        if visit_id == trial.baseline_visit:
            improvement = 0.0
        else:
            x = offset / setup.last_offset if setup.last_offset else 1.0
            shape = x * 1.35 / (x + 0.35)  # fast early response, levelling off
            improvement = final_improvement * shape + rng.uniform(-0.05, 0.05)
        truth = (
            baseline if visit_id == trial.baseline_visit else _truth_at(rng, baseline, improvement)
        )
        raters = pair
        if rng.random() < 0.1:  # a colleague stands in for one of the pair
            stand_in = rng.choice([r for r in RATERS if r not in pair])
            kept = pair[0] if rng.random() < 0.5 else pair[1]
            raters = (kept, stand_in) if kept < stand_in else (stand_in, kept)
        third = rng.choice([r for r in RATERS if r not in raters])
        floor = 1 if visit_id == trial.baseline_visit else 0  # melasma everywhere at baseline
        ratings = _visit_ratings(
            rng, truth, (raters[0], raters[1]), third, setup.threshold10, floor
        )
        for rating in ratings:
            out.write(
                "masi",
                {
                    "subject_id": subject,
                    "visit": visit_id,
                    "rater_id": rating.rater_id,
                    "assessed_on": _iso(day),
                }
                | dict(zip(_SCORE_COLUMNS, (str(s) for s in rating.scores), strict=True)),
            )
        pair_sum = _masi10(ratings[0].scores) + _masi10(ratings[1].scores)
        if visit_id == trial.baseline_visit:
            baseline2 = pair_sum
            continue
        implied = _implied_pga(baseline2, pair_sum) if baseline2 else 5
        if rng.random() < PGA_DISCORDANT_RATE:
            pga = implied + rng.choice((-3, -2, 2, 3))
            if not 0 <= pga <= 6:
                pga = implied - (pga - implied)
        else:
            pga = implied + _weighted(rng, ((0, 0.7), (-1, 0.15), (1, 0.15)))
        out.write(
            "pga",
            {
                "subject_id": subject,
                "visit": visit_id,
                "rater_id": rng.choice(ratings[:2]).rater_id,
                "assessed_on": _iso(day),
                "pga": str(min(6, max(0, pga))),
            },
        )
        if visit_id in setup.satisfaction_visits:
            perceived = max(-100.0, min(100.0, improvement * 100 + rng.uniform(-15, 15)))
            row = {"subject_id": subject, "visit": visit_id, "assessed_on": _iso(day)}
            if rng.random() < SATISFACTION_ESTIMATE_ONLY_RATE:
                row["improvement_pct"] = str(_round_half_up(perceived))
            else:
                row["level"] = (
                    "very_satisfied"
                    if perceived >= 75
                    else "satisfied"
                    if perceived >= 50
                    else "average"
                    if perceived >= 25
                    else "dissatisfied"
                )
            out.write("satisfaction", row)

    # adverse events: laser sessions at the first treatment and each attended follow-up visit;
    # an event is recorded at the next attended visit.
    follow = [(v, d) for v, d in visits_done if v != trial.baseline_visit]
    sessions = [first, *(d for _, d in follow)]
    intervals = list(zip(sessions, follow, strict=False))
    special: dict[int, str] = {}
    if intervals and serious:
        special[rng.randrange(len(intervals))] = "serious"
    if intervals and other:
        special.setdefault(rng.randrange(len(intervals)), "other")
    for index, (session, recorded) in enumerate(intervals):
        latest_onset = recorded[1] - dt.timedelta(days=1)
        events: list[dict[str, str]] = []

        def onset_after(
            days: tuple[int, int], session: dt.date = session, latest: dt.date = latest_onset
        ) -> dt.date:
            return min(latest, session + dt.timedelta(days=rng.randint(*days)))

        for term, profile in _PROFILES.items():
            if rng.random() >= profile.per_interval:
                continue
            onset = onset_after(profile.onset_days)
            resolved, outcome = _resolution(
                rng, onset, profile.duration_days, profile.ongoing, today
            )
            if term is AeTerm.SCAR_FORMATION and resolved is not None:
                outcome = "recovered_with_sequelae"
            events.append(
                _ae_row(
                    0,
                    subject,
                    term.value,
                    onset,
                    recorded,
                    grade=_weighted(rng, profile.grades),
                    causality=_weighted(rng, profile.causality),
                    resolved=resolved,
                    outcome=outcome,
                    action=rng.choice(profile.actions),
                )
            )
        kind = special.get(index)
        if kind == "serious":
            onset = onset_after((2, 6))
            resolved, outcome = _resolution(rng, onset, (10, 21), 0.0, today)
            events.append(
                _ae_row(
                    0,
                    subject,
                    AeTerm.SKIN_INFECTION.value,
                    onset,
                    recorded,
                    grade=3,
                    serious=True,
                    causality="possibly_related",
                    resolved=resolved,
                    outcome=outcome,
                    action="hospitalised; intravenous antibiotics; laser sessions paused",
                )
            )
        elif kind == "other":
            onset = onset_after((0, 10))
            resolved, outcome = _resolution(rng, onset, (1, 7), 0.0, today)
            events.append(
                _ae_row(
                    0,
                    subject,
                    AeTerm.OTHER.value,
                    onset,
                    recorded,
                    term_text=rng.choice(_OTHER_TEXTS),
                    grade=1,
                    causality=rng.choice(("unlikely_related", "unrelated")),
                    resolved=resolved,
                    outcome=outcome,
                    action="none",
                )
            )
        for event in sorted(events, key=lambda e: e["onset_on"]):
            event["ae_id"] = f"AE{ae_ids.next():04d}"
            event["suspect"] = _suspect(trial, arm, event)
            out.write("adverse_events", event)
    return withdrawn_on is not None


def _setup(trial: Trial, today: dt.date, elapsed_days: int) -> _Setup:
    start = today - dt.timedelta(days=elapsed_days)
    last_offset = trial.visits[-1].offset_days
    # screening, enrolment and the first treatment (up to 17 days) all before today
    available = elapsed_days - 30
    if available < 1:
        raise ValueError(f"elapsed_days ({elapsed_days}) must be over 30 (today - first screening)")
    follow_ups = tuple(v.id for v in trial.visits[1:])
    missing = [c for c in _SCORE_COLUMNS if c not in KINDS["masi"].columns(trial)]
    if missing:  # pragma: no cover - the MASI columns are the scoring rule's
        raise ValueError("masi columns missing: " + ", ".join(missing))
    return _Setup(
        trial=trial,
        today=today,
        start=start,
        span_days=min(RECRUITMENT_DAYS, available),
        threshold10=trial.adjudication_threshold * 10,
        age_limits=_age_limits(trial),
        follow_ups=follow_ups,
        satisfaction_visits=frozenset(follow_ups[1::2]),
        last_offset=last_offset,
    )


def _write_good(
    rng: random.Random, setup: _Setup, out_dir: Path, n_participants: int
) -> tuple[dict[str, int], int, int, int]:
    trial = setup.trial
    n_failures = _round_half_up(n_participants * SCREEN_FAILURE_RATE)
    total = n_participants + n_failures
    width = max(3, len(str(total)))
    failures = _Quota(n_failures, total)
    arms = [a.id for a in trial.arms]
    quotas = {
        a: n_participants // len(arms) + (i < n_participants % len(arms))
        for i, a in enumerate(arms)
    }
    withdrawals = _Quota(_round_half_up(n_participants * WITHDRAWAL_RATE), n_participants)
    serious = _Quota(max(1, n_participants // 60), n_participants)
    others = _Quota(max(1, n_participants // 60), n_participants)
    mrn = rng.randint(100, 9999)
    ae_ids = _Counter()
    withdrawn = 0
    with ExitStack() as stack:
        writers = _Writers(
            {
                kind: _writer(stack, out_dir / file_name(kind), model.columns(trial))
                for kind, model in KINDS.items()
            }
        )
        for kind in KINDS:
            writers.counts[file_name(kind)] = 0
        for i in range(total):
            screened = setup.start + dt.timedelta(days=i * setup.span_days // total)
            mrn += rng.randint(1, 97)
            arm: str | None = None
            if not failures.take(rng):
                left = sum(quotas.values())
                x = rng.randrange(left)
                for candidate in arms:
                    x -= quotas[candidate]
                    if x < 0:
                        arm = candidate
                        break
                assert arm is not None  # noqa: S101 - quotas sum to the enrolled still to come
                quotas[arm] -= 1
            enrolled = arm is not None
            withdrew = _participant(
                rng,
                setup,
                writers,
                subject=f"S{i + 1:0{width}d}",
                screened=screened,
                mrn=f"MRN-{mrn:06d}",
                arm=arm,
                withdraw=enrolled and withdrawals.take(rng),
                serious=enrolled and serious.take(rng),
                other=enrolled and others.take(rng),
                ae_ids=ae_ids,
            )
            withdrawn += withdrew
        return dict(writers.counts), n_participants, n_failures, withdrawn


# -- the bad data set ------------------------------------------------------------------------
_Problem = tuple[str, ...]  # (field, why) or (field, why, "warning")
_Table = list[tuple[dict[str, str], _Problem | None]]


def _not_in(values: Sequence[str] | frozenset[str], candidate: str) -> str:
    while candidate in values:
        candidate += "x"
    return candidate


def _unpadded(day: dt.date) -> str:
    """A date of ``day``'s month written without zero padding (2024-9-5): not YYYY-MM-DD."""
    return f"{day.year}-{day.month}-5"


def _bad_tables(trial: Trial, today: dt.date, start: dt.date) -> dict[str, _Table]:
    """Rows of every file in bad/, each with the problem it carries (None = valid row)."""
    base = trial.baseline_visit
    fu = [v.id for v in trial.visits[1:]]
    v1, v2 = fu[0], fu[1 % len(fu)]
    v3 = fu[min(3, len(fu) - 1)]
    arm_a, arm_b = trial.arms[0].id, trial.arms[1 % len(trial.arms)].id
    future = _iso(today + dt.timedelta(days=30))
    unknown_visit = _not_in(trial.visit_ids, "m99")

    def day(n: int) -> str:
        return _iso(start + dt.timedelta(days=n))

    def born(years: int, days: int) -> str:  # ``years`` completed on the study's first day
        return _iso(_add_years(start, -years) - dt.timedelta(days=days))

    ft = {"B001": 13, "B002": 15, "B003": 16}

    def on(subject: str, visit: str, shift: int = 0) -> str:
        offset = trial.visit(visit).offset_days if visit in trial.visit_order else 60
        return day(ft.get(subject, 13) + offset + shift)

    def person(subject: str, **values: str) -> dict[str, str]:
        return {"subject_id": subject, "sex": "female", "birth_date": born(34, 167)} | values

    participants: _Table = [
        (
            person(
                "B001",
                arm=arm_a,
                consent_date=day(5),
                enrolled_on=day(8),
                first_treatment_on=day(13),
                status="on-study",
                mrn="MRN-900001",
            ),
            None,
        ),
        (
            person(
                "B002",
                arm=arm_b,
                birth_date=born(38, 300),
                consent_date=day(6),
                enrolled_on=day(9),
                first_treatment_on=day(15),
                status="on-study",
            ),
            None,
        ),
        (
            person(
                "B003",
                arm=arm_b,
                sex="male",
                birth_date=born(32, 69),
                consent_date=day(7),
                enrolled_on=day(12),
                first_treatment_on=day(16),
                status="withdrawn",
                withdrawn_on=day(16 + 40),
                withdrawal_reason="moved to another city",
            ),
            None,
        ),
        (person("B004", birth_date=born(31, 233), consent_date=day(8)), None),
        (
            person(
                "B005",
                arm="placebo" if "placebo" not in trial.arm_ids else "plaseb0",
                consent_date=day(9),
                enrolled_on=day(12),
                first_treatment_on=day(14),
            ),
            ("arm", "unknown arm"),
        ),
        (person("B006", sex="F", consent_date=day(9)), ("sex", "'F' is not a sex code")),
        (
            person("B007", birth_date=born(34, 108).replace("-", "/"), consent_date=day(9)),
            ("birth_date", "date not written YYYY-MM-DD"),
        ),
        (person("B008", consent_date=future), ("consent_date", "date in the future")),
        (
            person("B009", birth_date=f"{start.year - 36}-02-30", consent_date=day(9)),
            ("birth_date", "not a real calendar date"),
        ),
        (person("B001", consent_date=day(5)), ("subject_id", "duplicate subject_id")),
        (
            person("B010", arm=arm_a, consent_date=day(10)),
            ("arm", "arm given for a participant who is not enrolled (ignored)", "warning"),
        ),
        (
            person(
                "B011",
                arm=arm_a,
                consent_date=day(10),
                enrolled_on=day(12),
                first_treatment_on=day(14),
                status="withdrawn",
            ),
            ("withdrawn_on", "status withdrawn without withdrawn_on"),
        ),
        (
            person(
                "B012",
                arm=arm_a,
                consent_date=day(10),
                enrolled_on=day(14),
                first_treatment_on=day(12),
            ),
            ("first_treatment_on", "first treatment before enrolment"),
        ),
        (person("B013", sex="", consent_date=day(10)), ("sex", "required value empty")),
    ]

    def answers(**changes: str) -> dict[str, str]:
        return _answers(trial, _eligible) | changes

    exclusions = [c.column for c in trial.criteria if c.kind == "exclusion"]
    pregnancy = next((c for c in exclusions if "pregnan" in c), exclusions[0])
    other_exclusion = exclusions[min(5, len(exclusions) - 1)]

    def screening(subject: str, screened: str, **changes: str) -> dict[str, str]:
        return {"subject_id": subject, "screened_on": screened, "screened_by": "R1"} | answers(
            **changes
        )

    eligibility: _Table = [
        (screening("B001", day(6)), None),
        (screening("B002", day(7)), None),
        (screening("B003", day(8)), None),
        (screening("B004", day(9), **{pregnancy: "yes"}), None),
        (screening("B010", day(10), **{other_exclusion: ""}), None),
        (screening("B099", day(10)), ("subject_id", "unknown subject")),
        (screening("B002", day(7)), ("subject_id", "second screening of the same subject")),
        (
            screening("B001", day(6), **{other_exclusion: "maybe"}),
            (other_exclusion, "answer is not yes/no/empty"),
        ),
        (screening("B001", future), ("screened_on", "date in the future")),
        (screening("B001", f"{start.year}-13-01"), ("screened_on", "not a real calendar date")),
    ]

    def masi(
        subject: str, visit_id: str, rater: str, shift: int = 0, **changes: str
    ) -> dict[str, str]:
        items = "3 3 2 3 2 4 3 3 4 2 2 1" if visit_id == base else "2 2 2 2 2 3 2 2 3 1 1 1"
        scores = dict(zip(_SCORE_COLUMNS, items.split(), strict=True))
        assessed = on(subject, visit_id, -1 if visit_id == base else shift)
        return (
            {"subject_id": subject, "visit": visit_id, "rater_id": rater, "assessed_on": assessed}
            | scores
            | changes
        )

    masi_rows: _Table = [
        (masi("B001", base, "R1"), None),
        (masi("B001", base, "R2", forehead_a="3"), None),
        (masi("B001", v1, "R1"), None),
        (masi("B001", v1, "R2"), None),
        (masi("B002", base, "R1"), None),
        (masi("B002", base, "R2"), None),
        (masi("B002", v1, "R1"), None),
        (masi("B002", v1, "R2", right_malar_a="5", left_malar_a="5"), None),
        (masi("B002", v1, "R3", right_malar_a="4"), None),
        (masi("B002", v1, "R4"), ("rater_id", "a fourth rater for the same subject and visit")),
        (masi("B001", v1, "R1"), ("rater_id", "duplicate rater for the same subject and visit")),
        (masi("B001", v2, "R1", forehead_d="5"), ("forehead_d", "D above 4")),
        (masi("B001", v2, "R1", right_malar_a="2.5"), ("right_malar_a", "not a whole number")),
        (masi("B001", v2, "R1", chin_h="3.0"), ("chin_h", "'3.0' is not written as an integer")),
        (masi("B001", v2, "R1", left_malar_a="7"), ("left_malar_a", "A above 6")),
        (masi("B001", v2, "R1", forehead_h="-1"), ("forehead_h", "negative score")),
        (masi("B001", v2, "R1", chin_a=""), ("chin_a", "required score empty")),
        (masi("B001", v2, "R1", visit=unknown_visit), ("visit", "unknown visit")),
        (masi("B099", base, "R1", assessed_on=day(10)), ("subject_id", "unknown subject")),
        (masi("B001", v2, "R1", assessed_on=future), ("assessed_on", "date in the future")),
        (
            masi(
                "B001", v2, "R1", assessed_on=(start + dt.timedelta(days=74)).strftime("%m/%d/%Y")
            ),
            ("assessed_on", "date not written YYYY-MM-DD"),
        ),
        (masi("B001", v2, "R#1"), ("rater_id", "not a valid identifier")),
        (masi("B001", v2, "R1", 12), ("assessed_on", "outside the visit window", "warning")),
        (masi("B003", base, "R2"), None),
        (masi("B003", v1, "R2"), None),
        (masi("B003", v2, "R2"), ("assessed_on", "after the participant's withdrawal", "warning")),
    ]

    def pga(subject: str, visit: str, value: str, **changes: str) -> dict[str, str]:
        return {
            "subject_id": subject,
            "visit": visit,
            "rater_id": "R1",
            "assessed_on": on(subject, visit) if subject in ft else day(40),
            "pga": value,
        } | changes

    pga_rows: _Table = [
        (pga("B001", v1, "3"), None),
        (pga("B002", v1, "4"), None),
        (pga("B001", base, "3", assessed_on=day(12)), ("visit", "PGA at baseline")),
        (pga("B001", v2, "7"), ("pga", "above 6")),
        (pga("B001", v2, "2.5"), ("pga", "not a whole number")),
        (pga("B001", v2, ""), ("pga", "required value empty")),
        (pga("B001", v1, "2"), ("visit", "second PGA for the same subject and visit")),
        (pga("B099", v1, "3"), ("subject_id", "unknown subject")),
        (pga("B001", v2, "3", assessed_on=future), ("assessed_on", "date in the future")),
        (pga("B001", unknown_visit, "3", assessed_on=day(50)), ("visit", "unknown visit")),
    ]

    def sat(subject: str, visit: str, **values: str) -> dict[str, str]:
        assessed = on(subject, visit) if subject in ft else day(80)
        return {"subject_id": subject, "visit": visit, "assessed_on": assessed} | values

    satisfaction_rows: _Table = [
        (sat("B001", v2, level="satisfied"), None),
        (sat("B002", v2, improvement_pct="55"), None),
        (
            sat("B001", base, level="satisfied", assessed_on=day(12)),
            ("visit", "satisfaction at baseline"),
        ),
        (sat("B001", v3, level="happy"), ("level", "not a satisfaction level")),
        (sat("B001", v3), ("level", "neither level nor improvement_pct given")),
        (sat("B001", v3, improvement_pct="150"), ("improvement_pct", "above 100")),
        (sat("B001", v3, improvement_pct="about 50"), ("improvement_pct", "not a number")),
        (
            sat("B001", v3, level="average", assessed_on=on("B001", v3) + "T10:00"),
            ("assessed_on", "a date-time, not YYYY-MM-DD"),
        ),
        (sat("B099", v2, level="satisfied"), ("subject_id", "unknown subject")),
        (sat("B001", v2, level="average"), ("visit", "second response for the same visit")),
    ]

    given_b = next(a.interventions for a in trial.arms if a.id == arm_b)
    foreign_b = next((i.id for i in trial.interventions if i.id not in given_b), None)

    def ae(ae_id: str, subject: str, term: str, **values: str) -> dict[str, str]:
        onset = day(ft.get(subject, 13) + 1)
        return {
            "ae_id": ae_id,
            "subject_id": subject,
            "term": term,
            "onset_on": onset,
            "resolved_on": day(ft.get(subject, 13) + 4),
            "visit": v1,
            "grade": "1",
            "serious": "no",
            "causality": "related",
            "outcome": "recovered",
            "action_taken": "cold compress",
            "reported_on": on(subject, v1) if subject in ft else day(43),
        } | values

    ae_rows: _Table = [
        (ae("AE0001", "B001", AeTerm.ERYTHEMA.value), None),
        (ae("AE0002", "B002", AeTerm.BURNING.value, grade="2"), None),
        (
            ae(
                "AE0003",
                "B001",
                AeTerm.OTHER.value,
                term_text="contact dermatitis to dressing",
                causality="unlikely_related",
            ),
            None,
        ),
        (
            ae("AE0004", "B001", AeTerm.ERYTHEMA.value, resolved_on=day(12)),
            ("resolved_on", "resolved before onset"),
        ),
        (ae("AE0005", "B001", AeTerm.OTHER.value), ("term_text", "'other' without term_text")),
        (ae("AE0006", "B001", "redness"), ("term", "not one of the protocol terms")),
        (ae("AE0007", "B001", AeTerm.EDEMA.value, grade="6"), ("grade", "CTCAE grade above 5")),
        (ae("AE0008", "B001", AeTerm.EDEMA.value, grade="two"), ("grade", "not a whole number")),
        (ae("AE0009", "B001", AeTerm.ITCHING.value, serious="maybe"), ("serious", "not yes/no")),
        (
            ae("AE0010", "B001", AeTerm.ITCHING.value, causality="probable"),
            ("causality", "not a causality code"),
        ),
        (
            ae(
                "AE0011",
                "B001",
                AeTerm.DRYNESS.value,
                onset_on=future,
                resolved_on="",
                outcome="recovering",
                reported_on="",
            ),
            ("onset_on", "date in the future"),
        ),
        (
            ae("AE0012", "B001", AeTerm.DRYNESS.value, reported_on=day(13)),
            ("reported_on", "reported before onset"),
        ),
        (ae("AE0001", "B002", AeTerm.BURNING.value), ("ae_id", "duplicate ae_id")),
        (ae("AE0013", "B099", AeTerm.ERYTHEMA.value), ("subject_id", "unknown subject")),
        (ae("AE0014", "B001", AeTerm.ERYTHEMA.value, visit="week2"), ("visit", "unknown visit")),
        (
            ae(
                "AE0015",
                "B001",
                AeTerm.ERYTHEMA.value,
                onset_on=_unpadded(start + dt.timedelta(days=33)),
            ),
            ("onset_on", "date not written YYYY-MM-DD"),
        ),
        (
            ae("AE0016", "B001", AeTerm.ERYTHEMA.value, outcome="resolved"),
            ("outcome", "not an outcome code"),
        ),
        (
            ae("AE0017", "B004", AeTerm.ERYTHEMA.value, visit=""),
            ("subject_id", "adverse event for a participant who is not enrolled", "warning"),
        ),
        (
            ae("AE0018", "B002", AeTerm.BURNING.value, suspect=given_b[0]),
            None,
        ),
        (ae("AE0019", "B001", AeTerm.ITCHING.value, suspect="cream"), ("suspect", "unknown id")),
    ]
    if foreign_b is not None:
        ae_rows.append(
            (
                ae("AE0020", "B002", AeTerm.ITCHING.value, suspect=foreign_b),
                ("suspect", "an intervention the participant's arm does not give"),
            )
        )
    return {
        "participants": participants,
        "eligibility": eligibility,
        "masi": masi_rows,
        "pga": pga_rows,
        "satisfaction": satisfaction_rows,
        "adverse_events": ae_rows,
    }


def bad_rows(trial: Trial | None = None, today: dt.date = DEFAULT_TODAY) -> tuple[BadRow, ...]:
    """Every documented bad (or warning) row of ``bad/``, in file order then line order."""
    trial = trial or load_trial()
    out: list[BadRow] = []
    start = today - dt.timedelta(days=DEFAULT_ELAPSED_DAYS)  # lines and fields only
    for kind, table in _bad_tables(trial, today, start).items():
        for index, (_, problem) in enumerate(table):
            if problem is not None:
                severity: Literal["error", "warning"] = (
                    "warning" if problem[2:] == ("warning",) else "error"
                )
                out.append(BadRow(file_name(kind), index + 2, problem[0], problem[1], severity))
    return tuple(out)


def _write_table(path: Path, columns: Sequence[str], rows: Iterator[Mapping[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _csv_text(columns: Sequence[str], rows: Sequence[Mapping[str, str]], eol: str) -> str:
    lines = [",".join(columns)]
    lines += [",".join(row.get(c, "") for c in columns) for row in rows]
    return eol.join(lines) + eol


def _write_bad(
    trial: Trial, today: dt.date, start: dt.date, bad_dir: Path
) -> tuple[list[str], list[BadRow]]:
    tables = _bad_tables(trial, today, start)
    written: list[str] = []
    for kind, table in tables.items():
        _write_table(
            bad_dir / file_name(kind), KINDS[kind].columns(trial), (row for row, _ in table)
        )
        written.append(file_name(kind))

    participants_cols = KINDS["participants"].columns(trial)
    masi_cols = KINDS["masi"].columns(trial)
    valid_masi = [row for row, problem in tables["masi"] if problem is None]
    valid_people = [row for row, problem in tables["participants"] if problem is None]

    # a misspelt column: rejected whole
    misspelt = [("forhead_d" if c == "forehead_d" else c) for c in masi_cols]
    (bad_dir / "missing_columns").mkdir(parents=True, exist_ok=True)
    text = _csv_text(
        misspelt,
        [
            {("forhead_d" if k == "forehead_d" else k): v for k, v in row.items()}
            for row in valid_masi[:2]
        ],
        "\n",
    )
    (bad_dir / "missing_columns" / "masi.csv").write_text(text, encoding="utf-8")

    # GB18030 bytes (a spreadsheet export): not UTF-8
    (bad_dir / "gb18030").mkdir(parents=True, exist_ok=True)
    chinese = dict(valid_people[2]) | {"withdrawal_reason": "因工作调动迁居外地而退出研究"}
    gb_rows = [valid_people[0], chinese]
    (bad_dir / "gb18030" / "participants.csv").write_bytes(
        _csv_text(participants_cols, gb_rows, "\r\n").encode("gb18030")
    )

    # an empty file
    (bad_dir / "empty").mkdir(parents=True, exist_ok=True)
    (bad_dir / "empty" / "pga.csv").write_bytes(b"")

    # BOM, CRLF and trailing blanks: valid
    (bad_dir / "bom_crlf").mkdir(parents=True, exist_ok=True)
    subjects = {row["subject_id"] for row in valid_masi}
    people = [row for row in valid_people if row["subject_id"] in subjects]
    padded_people = [{k: (v + "  " if v else v) for k, v in row.items()} for row in people]
    (bad_dir / "bom_crlf" / "participants.csv").write_bytes(
        b"\xef\xbb\xbf" + _csv_text(participants_cols, padded_people, "\r\n").encode("utf-8")
    )
    padded_masi = [{k: (v + " " if v else v) for k, v in row.items()} for row in valid_masi]
    (bad_dir / "bom_crlf" / "masi.csv").write_bytes(
        b"\xef\xbb\xbf" + _csv_text(masi_cols, padded_masi, "\r\n").encode("utf-8")
    )
    written += [f.path for f in BAD_FILES]

    rows = list(bad_rows(trial, today))
    (bad_dir / "README.md").write_text(_readme(rows, today), encoding="utf-8")
    written.append("README.md")
    return written, rows


def _readme(rows: Sequence[BadRow], today: dt.date) -> str:
    lines = [
        "# Deliberately bad input",
        "",
        "Written by `fhir-adapter generate` (`fhir_adapter.generate`). The six CSV files here mix",
        "valid rows with bad ones; valid rows refer to participants of this folder's",
        "`participants.csv` (B001-B004, B010). Read the files in the order participants,",
        "eligibility, masi, pga, satisfaction, adverse_events: exactly the rows marked `error`",
        "below are rejected (file, line with header = 1, field); the `warning` rows are",
        "accepted with a warning. Everything else is accepted without a remark.",
        f"Dates in the future are judged against {today.isoformat()}.",
        "",
        "| file | line | field | severity | why |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.file} | {r.line} | {r.field} | {r.severity} | {r.why} |" for r in rows]
    lines += [
        "",
        "## Whole files",
        "",
        "| file | rejected whole | why |",
        "|---|---|---|",
    ]
    lines += [f"| {f.path} | {'yes' if f.rejected else 'no'} | {f.why} |" for f in BAD_FILES]
    return "\n".join(lines) + "\n"


# -- where it writes ----------------------------------------------------------------------------
#: written into every generated set: later runs may write over a directory that holds it
GENERATED_MARKER = ".fhir-adapter-generated"


def check_out_dir(out_dir: Path) -> None:
    """Refuse ``out_dir`` when it holds a file of the names this function writes that it did
    not write itself (a hospital's participants.csv is never written over); a set it generated
    before (its marker file) is written over, other files are left alone.
    :class:`~fhir_adapter.errors.OutputRefused` (exit 2) names the reason."""
    ours = {file_name(kind) for kind in KINDS} | {"bad", GENERATED_MARKER}
    generated = (out_dir / GENERATED_MARKER).is_file()
    check_output(
        out_dir,
        option="OUT_DIR",
        inputs=(),
        kind="directory",
        owned=lambda path: generated or path.name not in ours,
        overwrite="generate would write over them",
    )


# -- entry point -----------------------------------------------------------------------------
def generate(
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    n_participants: int = 60,
    trial: Trial | None = None,
    today: dt.date | None = None,
    with_bad: bool = True,
    elapsed_days: int = DEFAULT_ELAPSED_DAYS,
) -> GenerateSummary:
    """Write the synthetic data set (and ``bad/``) into ``out_dir``; same seed and ``today``,
    same bytes. ``today`` defaults to :data:`DEFAULT_TODAY` (the command passes the site's
    real date)."""
    if n_participants < 1:
        raise ValueError("n_participants must be at least 1")
    trial = trial or load_trial()
    today = today or DEFAULT_TODAY
    setup = _setup(trial, today, elapsed_days)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GENERATED_MARKER).write_text(
        "Synthetic data written by `fhir-adapter generate`; it may write over this directory.\n",
        encoding="utf-8",
    )
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
    counts, enrolled, failures, withdrawn = _write_good(rng, setup, out_dir, n_participants)
    bad_files: list[str] = []
    rows: list[BadRow] = []
    if with_bad:
        if elapsed_days < BAD_SET_MIN_DAYS:
            raise ValueError(f"the bad/ files need elapsed_days of at least {BAD_SET_MIN_DAYS}")
        written, rows = _write_bad(trial, today, setup.start, out_dir / "bad")
        bad_files = [f"bad/{name}" for name in written]
    return GenerateSummary(
        out_dir=out_dir,
        seed=seed,
        rows=counts,
        enrolled=enrolled,
        screen_failures=failures,
        withdrawn=withdrawn,
        bad_files=tuple(bad_files),
        bad_rows=tuple(rows),
    )
