"""Registry tables read back from the real FHIR test server (SPEC §9, issue 12).

The synthetic set is synced with ``fhir-adapter sync`` to the session's server, then read back
with ``fhir-adapter query --server`` (search with a small ``_count``, paging through ``next``).
Every number of the registry tables is compared with the same number computed straight from the
source CSV files through ``fhir_adapter.intake`` and ``fhir_adapter.scoring`` — an independent
path that never sees FHIR.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from fhirpy import SyncFHIRClient

from fhir_adapter.client import FhirClient
from fhir_adapter.domain import AdverseEvent, MasiRating, PgaAssessment, SatisfactionResponse
from fhir_adapter.generate import generate
from fhir_adapter.intake import Intake
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.query.sources import ServerSource
from fhir_adapter.scoring import (
    ScoreStatus,
    satisfaction_rates,
    score_visits,
    summarize_adverse_events,
)
from fhir_adapter.settings import Settings
from fhir_adapter.testserver import FhirTestServer
from fhir_adapter.trial import Trial, default_mappings_dir, load_trial

if TYPE_CHECKING:
    from conftest import AdapterCli

pytestmark = pytest.mark.integration

BASE = "urn:nct06677931"
CODES = f"{BASE}:codes"
KINDS = ("participants", "eligibility", "masi", "pga", "satisfaction", "adverse_events")


@dataclass
class Synced:
    cli: AdapterCli
    base_url: str
    data: Path
    out: Path


@pytest.fixture(scope="module")
def synced(
    fhir_test_server: FhirTestServer,
    tmp_path_factory: pytest.TempPathFactory,
    make_cli: type[AdapterCli],
) -> Synced:
    fhir_test_server.reset()
    tmp = tmp_path_factory.mktemp("registry")
    data = tmp / "data"
    generate(data, with_bad=False)
    cli = make_cli(fhir_test_server.base_url, tmp / "outbox.sqlite")
    result = cli.sync(data)
    assert result.code == 0, result
    out = tmp / "query"
    result = cli.run("query", "--server", fhir_test_server.base_url, "--out", str(out),
                     "--page-size", "97")  # fmt: skip
    assert result.code == 0, result
    return Synced(cli, fhir_test_server.base_url, data, out)


# -- the independent path: CSV -> intake -> scoring ------------------------------------------------
@dataclass
class Expected:
    trial: Trial
    arm_of: dict[str, str]
    scores: list[Any]
    pga: list[PgaAssessment]
    satisfaction: list[SatisfactionResponse]
    events: list[AdverseEvent]
    participants: list[Any]


@pytest.fixture(scope="module")
def expected(synced: Synced) -> Expected:
    trial = load_trial()
    intake = Intake(trial=trial)
    records: dict[str, list[Any]] = {}
    for kind in KINDS:
        records[kind] = list(intake.read_csv(kind, synced.data / f"{kind}.csv"))
    participants = list(intake.participants.values())
    arm_of = {p.subject_id: p.arm for p in participants if p.enrolled and p.arm is not None}
    ratings = [r for r in records["masi"] if isinstance(r, MasiRating)]
    scores = score_visits(
        ratings, trial.adjudication_threshold, trial.visit_order, trial.baseline_visit
    )
    return Expected(
        trial, arm_of, scores, records["pga"], records["satisfaction"],
        records["adverse_events"], participants,
    )  # fmt: skip


def _groups(subject: str, arm_of: dict[str, str]) -> Iterator[str]:
    yield "all"
    if subject in arm_of:
        yield arm_of[subject]


def _half_up(value: Decimal, places: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def _mean(values: list[Decimal], places: int) -> str:
    return "" if not values else str(_half_up(sum(values, Decimal(0)) / len(values), places))


def _median(values: list[Decimal]) -> str:
    return "" if not values else str(_half_up(statistics.median(values), 2))


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _number(text: str) -> str:
    """A CSV cell as a canonical number string ('' stays '')."""
    if text == "":
        return ""
    return format(Decimal(text).normalize(), "f")


def _canon(row: dict[str, Any]) -> dict[str, str]:
    return {k: _number(str(v)) for k, v in row.items()}


# -- tests -----------------------------------------------------------------------------------------
def test_outcomes_per_arm_and_visit_match_scoring(synced: Synced, expected: Expected) -> None:
    masi: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    mmasi: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    masi_prelim: dict[tuple[str, str], int] = defaultdict(int)
    improvement: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    improvement_prelim: dict[tuple[str, str], int] = defaultdict(int)
    for s in expected.scores:
        for arm in _groups(s.subject_id, expected.arm_of):
            key = (arm, s.visit)
            if s.consensus.status is ScoreStatus.FINAL:
                masi[key].append(s.consensus.masi)
                mmasi[key].append(s.consensus.mmasi)
            else:
                masi_prelim[key] += 1
            if s.improvement_pct is not None:
                if s.improvement_status is ScoreStatus.FINAL:
                    improvement[key].append(s.improvement_rounded)
                else:
                    improvement_prelim[key] += 1
    pga: dict[tuple[str, str], list[int]] = defaultdict(list)
    for p in expected.pga:
        for arm in _groups(p.subject_id, expected.arm_of):
            pga[(arm, p.visit)].append(p.pga)
    rates = {
        (r.arm or "all", r.visit): r
        for r in satisfaction_rates(
            expected.satisfaction, expected.arm_of, expected.trial.visit_order
        )
    }
    table = {
        (r["arm"], r["visit"]): r for r in _read(synced.out / "registry/outcomes_by_arm_visit.csv")
    }
    arms = [a.id for a in expected.trial.arms] + ["all"]
    assert set(table) == {(a, v) for a in arms for v in expected.trial.visit_ids}
    checked = 0
    for key, row in table.items():
        rate = rates.get(key)
        grades = pga.get(key, [])
        want = {
            "n": str(len(masi[key])),
            "masi_preliminary_n": str(masi_prelim[key]),
            "masi_mean": _mean(masi[key], 2),
            "masi_median": _median(masi[key]),
            "mmasi_n": str(len(mmasi[key])),
            "mmasi_mean": _mean(mmasi[key], 2),
            "mmasi_median": _median(mmasi[key]),
            "improvement_n": str(len(improvement[key])),
            "improvement_preliminary_n": str(improvement_prelim[key]),
            "improvement_mean_pct": _mean(improvement[key], 2),
            "pga_n": str(len(grades)),
            **{f"pga_{g}": str(grades.count(g)) for g in range(7)},
            "satisfaction_numerator": str(rate.numerator if rate else 0),
            "satisfaction_denominator": str(rate.denominator if rate else 0),
            "satisfaction_rate_pct": (
                str(_half_up(rate.rate_pct, 1)) if rate and rate.rate_pct is not None else ""
            ),
        }
        got = _canon({k: row[k] for k in want})
        assert got == _canon(want), key
        checked += bool(masi[key])
    assert checked >= 2 * len(expected.trial.visit_ids)  # every arm has data at every visit


def test_ae_incidence_per_arm_and_term_matches_scoring(synced: Synced, expected: Expected) -> None:
    terminology = Terminology(expected.trial)
    want: dict[tuple[str, str], dict[str, str]] = {}
    # every event carries its SPEC §3 term in the trial code system ('other' included)
    for row in summarize_adverse_events(expected.participants, expected.events):
        incidence = row.incidence_pct
        want[(row.arm, row.term)] = {
            "events": str(row.events),
            "participants": str(row.participants),
            "participants_in_arm": str(row.participants_in_arm),
            "incidence_pct": "" if incidence is None else str(_half_up(incidence, 1)),
            "max_grade": str(max(g for g, n in row.by_max_grade.items() if n)),
            **{f"grade_{g}": str(n) for g, n in row.by_max_grade.items()},
            "serious_events": str(row.serious_events),
        }
    table = _read(synced.out / "registry/ae_incidence.csv")
    got = {
        (r["arm"], r["term"]): _canon({k: r[k] for k in next(iter(want.values()))}) for r in table
    }
    assert got == {k: _canon(v) for k, v in want.items()}
    assert {r["term_display"] for r in table} == {
        terminology.ae_term(term).display for _, term in want
    }
    # the denominators count every enrolled participant of the arm, withdrawn ones included
    enrolled = defaultdict(int)
    for arm in expected.arm_of.values():
        enrolled[arm] += 1
    assert {r["arm"]: int(r["participants_in_arm"]) for r in table} == dict(enrolled)


def test_subject_timeline_gives_every_scored_visit(synced: Synced, expected: Expected) -> None:
    rows = _read(synced.out / "registry/subject_timeline.csv")
    by_key = {(r["subject_id"], r["visit"]): r for r in rows}
    for s in expected.scores:
        row = by_key[(s.subject_id, s.visit)]
        assert Decimal(row["masi"]) == s.consensus.masi
        assert row["masi_status"] == s.consensus.status.value
        assert row["masi_method"] == s.consensus.method.value
        assert Decimal(row["mmasi"]) == s.consensus.mmasi
        improvement = s.improvement_rounded
        got = Decimal(row["improvement_pct"]) if row["improvement_pct"] else None
        assert got == improvement
    order = expected.trial.visit_order
    keys = [(r["subject_id"], order[r["visit"]]) for r in rows]
    assert keys == sorted(keys)  # subject by subject, visits in protocol order


def test_every_trial_view_is_written_as_csv_and_parquet(synced: Synced) -> None:
    views = sorted(p.stem for p in (default_mappings_dir() / "views").glob("*.json"))
    for name in views:
        assert (synced.out / "views" / f"{name}.csv").stat().st_size > 0
        assert (synced.out / "views" / f"{name}.parquet").stat().st_size > 0
    for name in ("outcomes_by_arm_visit", "ae_incidence", "subject_timeline"):
        markdown = (synced.out / "registry" / f"{name}.md").read_text(encoding="utf-8")
        assert markdown.startswith(f"# {name}\n\n| ")


def _count(base_url: str, rtype: str) -> int:
    response = requests.get(
        f"{base_url}/{rtype}", params={"_summary": "count"},
        headers={"Accept": "application/fhir+json"}, timeout=60,
    )  # fmt: skip
    response.raise_for_status()
    return int(response.json()["total"])


@pytest.mark.parametrize(("rtype", "page_size"), [("Patient", 7), ("Observation", 250)])
def test_paging_reads_every_resource_exactly_once(
    synced: Synced, rtype: str, page_size: int
) -> None:
    total = _count(synced.base_url, rtype)
    assert total > page_size  # more than one page
    with FhirClient(Settings(), synced.base_url) as client:
        source = ServerSource(client, page_size=page_size, bulk="never")
        ids = [r["id"] for r in source.resources([rtype])]
    assert len(ids) == total
    assert len(set(ids)) == total
    assert source.pages_read == math.ceil(total / page_size)


def test_view_command_pages_through_the_server(synced: Synced) -> None:
    view = default_mappings_dir() / "views" / "subjects.json"
    result = synced.cli.run("view", str(view), "--server", synced.base_url, "--page-size", "5")
    assert result.code == 0, result
    rows = [line for line in result.stdout.splitlines() if line]
    participants = _read(synced.data / "participants.csv")
    assert len(rows) == len(participants)
    assert sorted(json.loads(r)["subject_id"] for r in rows) == sorted(
        p["subject_id"] for p in participants
    )


def test_fhirpy_reads_the_synced_data_back(synced: Synced, expected: Expected) -> None:
    client = SyncFHIRClient(synced.base_url)
    (study,) = (
        client.resources("ResearchStudy")
        .search(identifier="https://clinicaltrials.gov/nctid|NCT06677931")
        .fetch_all()
    )
    subjects = (
        client.resources("ResearchSubject").search(study=f"ResearchStudy/{study['id']}").fetch_all()
    )
    assert sorted(s["identifier"][0]["value"] for s in subjects) == sorted(
        p.subject_id for p in expected.participants
    )
    (patient,) = client.resources("Patient").search(identifier=f"{BASE}:patient|S001").fetch_all()
    masi = (
        client.resources("Observation")
        .search(subject=f"Patient/{patient['id']}", code=f"{CODES}|masi")
        .fetch_all()
    )
    consensus = {o["identifier"][0]["value"]: o for o in masi if "performer" not in o}
    own = {s.visit: s for s in expected.scores if s.subject_id == "S001"}
    assert sorted(consensus) == sorted(f"S001-{v}-masi" for v in own)
    for visit, score in own.items():
        obs = consensus[f"S001-{visit}-masi"]
        assert Decimal(str(obs["valueQuantity"]["value"])) == score.consensus.masi
        assert obs["status"] == score.consensus.status.value
