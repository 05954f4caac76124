"""The report read back from the real FHIR test server (issue 13, SPEC §9, §13).

The synthetic 60-participant set is synced with ``fhir-adapter sync`` to the session's server
and reported with ``fhir-adapter report --server``. Every number of ``summary.json`` is compared
with the same number computed straight from the source CSV files through ``fhir_adapter.intake``
and ``fhir_adapter.scoring`` (the independent path of test_query_registry.py, whose helpers
are reused), and the report of ``map --format ndjson`` output (``report --ndjson``) must give
the same summary.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image
from test_query_registry import KINDS, Expected, _half_up

from fhir_adapter.domain import MasiRating
from fhir_adapter.generate import generate
from fhir_adapter.intake import Intake
from fhir_adapter.scoring import (
    ScoreStatus,
    satisfaction_rates,
    score_visits,
    summarize_adverse_events,
)
from fhir_adapter.testserver import FhirTestServer
from fhir_adapter.trial import load_trial

if TYPE_CHECKING:
    from conftest import AdapterCli

pytestmark = pytest.mark.integration

TERMS = ["erythema", "burning", "itching", "dryness", "irritation", "hyperpigmentation",
         "edema", "scar_formation", "skin_breakdown", "skin_infection", "other"]  # fmt: skip


@dataclass
class Reported:
    data: Path
    server_report: Path
    ndjson_report: Path


@pytest.fixture(scope="module")
def reported(
    fhir_test_server: FhirTestServer,
    tmp_path_factory: pytest.TempPathFactory,
    make_cli: type[AdapterCli],
) -> Reported:
    fhir_test_server.reset()
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    generate(data, with_bad=False)
    cli = make_cli(fhir_test_server.base_url, tmp / "outbox.sqlite")
    result = cli.sync(data)
    assert result.code == 0, result
    server_report = tmp / "from-server"
    result = cli.run("report", "--server", fhir_test_server.base_url, "--out",
                     str(server_report), "--page-size", "113")  # fmt: skip
    assert result.code == 0, result
    ndjson = tmp / "fhir.ndjson"
    result = cli.run("map", str(data), "--format", "ndjson", "--out", str(ndjson))
    assert result.code == 0, result
    ndjson_report = tmp / "from-ndjson"
    result = cli.run("report", "--ndjson", str(ndjson), "--out", str(ndjson_report))
    assert result.code == 0, result
    return Reported(data, server_report, ndjson_report)


@pytest.fixture(scope="module")
def expected(reported: Reported) -> Expected:
    trial = load_trial()
    intake = Intake(trial=trial)
    records = {k: list(intake.read_csv(k, reported.data / f"{k}.csv")) for k in KINDS}
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


def _summary(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (directory / "summary.json").read_text(encoding="utf-8"), parse_float=Decimal
    )
    return loaded


def _two(value: Decimal | None) -> Decimal | None:
    return None if value is None else _half_up(value, 2)


def _mean(values: list[Decimal]) -> Decimal | None:
    return _two(sum(values, Decimal(0)) / len(values)) if values else None


def _median(values: list[Decimal]) -> Decimal | None:
    return _two(statistics.median(values)) if values else None


def _percent(numerator: int, denominator: int) -> Decimal | None:
    return _two(Decimal(numerator) * 100 / denominator) if denominator else None


def expected_summary(ex: Expected) -> dict[str, Any]:
    """summary.json computed from the CSV files through intake and scoring only."""
    arms = [a.id for a in ex.trial.arms]
    visits = list(ex.trial.visit_ids)
    masi: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    improvement: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    for s in ex.scores:
        arm = ex.arm_of.get(s.subject_id)
        if arm is None:
            continue
        if s.consensus.status is ScoreStatus.FINAL:
            masi[(arm, s.visit)].append(s.consensus.masi)  # exact, as the server holds it
        if s.improvement_pct is not None and s.improvement_status is ScoreStatus.FINAL:
            improvement[(arm, s.visit)].append(s.improvement_rounded)  # as stored: 1 decimal
    pga: dict[tuple[str, str], list[int]] = defaultdict(list)
    for p in ex.pga:
        if p.subject_id in ex.arm_of:
            pga[(ex.arm_of[p.subject_id], p.visit)].append(p.pga)
    rates = {
        (r.arm, r.visit): r
        for r in satisfaction_rates(ex.satisfaction, ex.arm_of, ex.trial.visit_order)
        if r.arm is not None
    }
    size = {a: sum(1 for v in ex.arm_of.values() if v == a) for a in arms}
    ae = {(r.arm, r.term): r for r in summarize_adverse_events(ex.participants, ex.events)}

    def visit(arm: str, v: str) -> dict[str, Any]:
        rate = rates.get((arm, v))
        numerator, denominator = (rate.numerator, rate.denominator) if rate else (0, 0)
        return {
            "n_final": len(masi[(arm, v)]),
            "masi_mean": _mean(masi[(arm, v)]),
            "masi_median": _median(masi[(arm, v)]),
            "improvement_mean": _mean(improvement[(arm, v)]),
            "pga": {str(g): pga[(arm, v)].count(g) for g in range(7)},
            "satisfaction": {"numerator": numerator, "denominator": denominator,
                             "rate": _percent(numerator, denominator)},
        }  # fmt: skip

    def term(arm: str, t: str) -> dict[str, Any]:
        row = ae.get((arm, t))
        if row is None:
            return {"events": 0, "participants": 0, "incidence": _percent(0, size[arm]),
                    "max_grade": None, "serious": 0,
                    "by_max_grade": {str(g): 0 for g in range(1, 6)}}  # fmt: skip
        return {
            "events": row.events,
            "participants": row.participants,
            "incidence": _two(row.incidence_pct),
            "max_grade": max(g for g, n in row.by_max_grade.items() if n),
            "serious": row.serious_events,
            "by_max_grade": {str(g): n for g, n in row.by_max_grade.items()},
        }

    return {
        "arms": {a: {"participants": size[a], "visits": {v: visit(a, v) for v in visits}}
                 for a in arms},
        "adverse_events": {a: {t: term(a, t) for t in TERMS} for a in arms},
    }  # fmt: skip


def test_summary_from_the_server_equals_scoring_from_the_csv(
    reported: Reported, expected: Expected
) -> None:
    got = _summary(reported.server_report)
    want = expected_summary(expected)
    for arm in want["arms"]:  # per cell first: a failure names the cell
        assert got["arms"][arm]["participants"] == want["arms"][arm]["participants"], arm
        for visit, cell in want["arms"][arm]["visits"].items():
            assert got["arms"][arm]["visits"][visit] == cell, (arm, visit)
        for term, cell in want["adverse_events"][arm].items():
            assert got["adverse_events"][arm][term] == cell, (arm, term)
    assert got == want
    # the set exercises what the numbers are about
    combo = got["arms"]["combo"]
    assert combo["participants"] == 30
    assert all(combo["visits"][v]["n_final"] > 20 for v in expected.trial.visit_ids)
    assert combo["visits"]["m8"]["satisfaction"]["denominator"] > 0
    assert sum(got["adverse_events"]["laser"][t]["serious"] for t in TERMS) >= 1


def test_ndjson_report_gives_the_same_summary_as_the_server(reported: Reported) -> None:
    server = (reported.server_report / "summary.json").read_bytes()
    assert (reported.ndjson_report / "summary.json").read_bytes() == server
    for name in ("outcomes_by_arm_visit.csv", "ae_incidence.csv", "data_quality_flags.csv"):
        assert (reported.ndjson_report / name).read_bytes() == (
            reported.server_report / name
        ).read_bytes(), name


def test_server_report_plots_and_page(reported: Reported) -> None:
    out = reported.server_report
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["ae_incidence.png", "masi_over_time.png",
                                      "pga_by_visit.png", "satisfaction_rate.png"]  # fmt: skip
    for png in pngs:
        assert png.stat().st_size > 20_000
        with Image.open(png) as image:
            image.load()
            assert image.size[0] >= 800
            assert image.size[1] >= 450
        # the same data draws the same picture, whichever source it came from
        assert (reported.ndjson_report / png.name).read_bytes() == png.read_bytes()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "Awaiting adjudication (" in page
    assert "PGA / MASI discordance (" in page
