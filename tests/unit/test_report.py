"""`fhir-adapter report` (issue 13, SPEC §9, §13): summary.json on hand-checked data, the
plots, the self-contained page, the data-quality flags, the output directory's rules.

The golden R4 output (tests/golden/r4/registry.ndjson, see tests/golden/README.md) holds two
participants whose numbers are worked out by hand below.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from fhir_adapter.errors import ConfigurationError
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.query.registry import registry_tables
from fhir_adapter.query.sources import NdjsonSource
from fhir_adapter.report import report_file_names, write_report
from fhir_adapter.report.plots import PLOTS
from fhir_adapter.report.stats import mean_ci95, t_quantile
from fhir_adapter.report.summary import half_up, percent
from fhir_adapter.settings import Settings
from fhir_adapter.trial import default_mappings_dir, load_trial
from tests import helpers as h

CLI = Path(sys.executable).with_name("fhir-adapter")
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "r4" / "registry.ndjson"
TRIAL = load_trial()
ARMS = [a.id for a in TRIAL.arms]
VISITS = list(TRIAL.visit_ids)
TERMS = ["erythema", "burning", "itching", "dryness", "irritation", "hyperpigmentation",
         "edema", "scar_formation", "skin_breakdown", "skin_infection", "other"]  # fmt: skip
D = Decimal


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, check=False,
                          timeout=300)  # fmt: skip


def load_summary(path: Path) -> dict[str, Any]:
    """summary.json with its numbers as Decimals (what was written, digit for digit)."""
    data: dict[str, Any] = json.loads(
        path.read_text(encoding="utf-8"), parse_float=Decimal, parse_int=int
    )
    return data


@pytest.fixture(scope="module")
def golden_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "out"
    done = run("report", "--ndjson", str(GOLDEN), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"-> {out / 'report.html'}" in done.stderr
    assert done.stdout == ""
    return out


# -- summary.json -----------------------------------------------------------------------------
def test_summary_has_the_pinned_shape_with_every_combination(golden_report: Path) -> None:
    summary = load_summary(golden_report / "summary.json")
    assert list(summary) == ["arms", "adverse_events"]
    assert list(summary["arms"]) == ARMS
    assert list(summary["adverse_events"]) == ARMS
    for arm in ARMS:
        assert list(summary["arms"][arm]) == ["participants", "visits"]
        assert list(summary["arms"][arm]["visits"]) == VISITS
        for cell in summary["arms"][arm]["visits"].values():
            assert list(cell) == ["n_final", "masi_mean", "masi_median", "improvement_mean",
                                  "pga", "satisfaction"]  # fmt: skip
            assert list(cell["pga"]) == [str(g) for g in range(7)]
            assert list(cell["satisfaction"]) == ["numerator", "denominator", "rate"]
        assert list(summary["adverse_events"][arm]) == TERMS
        for cell in summary["adverse_events"][arm].values():
            assert list(cell) == ["events", "participants", "incidence", "max_grade", "serious",
                                  "by_max_grade"]  # fmt: skip
            assert list(cell["by_max_grade"]) == [str(g) for g in range(1, 6)]


def test_summary_numbers_of_the_golden_participants(golden_report: Path) -> None:
    summary = load_summary(golden_report / "summary.json")
    combo, laser = summary["arms"]["combo"], summary["arms"]["laser"]
    assert (combo["participants"], laser["participants"]) == (1, 1)  # S001 withdrawn: counted
    # S001 baseline: R1 0.3*(2+2)*3 + 0.3*(3+3)*4 + 0.3*(3+3)*4 + 0.1*(1+1)*2 = 18.4,
    # R2 3.6 + 0.3*(3+2)*4 + 7.2 + 0.4 = 17.2 -> mean 17.8 (final)
    assert combo["visits"]["baseline"] == {
        "n_final": 1, "masi_mean": D("17.80"), "masi_median": D("17.80"),
        "improvement_mean": None, "pga": dict.fromkeys("0123456", 0),
        "satisfaction": {"numerator": 0, "denominator": 0, "rate": None},
    }  # fmt: skip
    # m1: R1 9.8, R2 9.2 -> 9.5; improvement (17.8 - 9.5) / 17.8 = 46.629.. -> 46.6 as stored;
    # very_satisfied -> 1 / 1
    m1 = combo["visits"]["m1"]
    assert (m1["n_final"], m1["masi_mean"], m1["masi_median"], m1["improvement_mean"]) == (
        1, D("9.50"), D("9.50"), D("46.60"),
    )  # fmt: skip
    assert m1["satisfaction"] == {"numerator": 1, "denominator": 1, "rate": D("100.00")}
    # m3: 4.8 / 9.8 / 5.4 -> closest R1 + R3 = 5.1; (17.8 - 5.1) / 17.8 = 71.348.. -> 71.3; PGA 1
    m3 = combo["visits"]["m3"]
    assert (m3["masi_mean"], m3["improvement_mean"]) == (D("5.10"), D("71.30"))
    assert m3["pga"] == {**dict.fromkeys("0123456", 0), "1": 1}
    # no data at m2: zeros and nulls
    assert combo["visits"]["m2"]["n_final"] == 0
    assert combo["visits"]["m2"]["masi_mean"] is None
    # S002 baseline 22.4 / 21.2 -> 21.8; m1 19.4 / 17.6 -> 18.5, (21.8 - 18.5) / 21.8 -> 15.1;
    # PGA 5; satisfaction from improvement_pct 30 -> average: 0 of 1
    lm1 = laser["visits"]["m1"]
    assert laser["visits"]["baseline"]["masi_mean"] == D("21.80")
    assert (lm1["masi_mean"], lm1["improvement_mean"]) == (D("18.50"), D("15.10"))
    assert lm1["pga"]["5"] == 1
    assert lm1["satisfaction"] == {"numerator": 0, "denominator": 1, "rate": D("0.00")}
    events = summary["adverse_events"]
    assert events["combo"]["burning"] == {
        "events": 1, "participants": 1, "incidence": D("100.00"), "max_grade": 2, "serious": 0,
        "by_max_grade": {"1": 0, "2": 1, "3": 0, "4": 0, "5": 0},
    }  # fmt: skip
    assert events["combo"]["irritation"] == {
        "events": 1, "participants": 1, "incidence": D("100.00"), "max_grade": 3, "serious": 1,
        "by_max_grade": {"1": 0, "2": 0, "3": 1, "4": 0, "5": 0},
    }  # fmt: skip
    assert events["laser"]["erythema"] == {
        "events": 0, "participants": 0, "incidence": D("0.00"), "max_grade": None, "serious": 0,
        "by_max_grade": dict.fromkeys("12345", 0),
    }  # fmt: skip


def test_summary_numbers_are_json_numbers_never_strings(golden_report: Path) -> None:
    text = (golden_report / "summary.json").read_text(encoding="utf-8")
    assert '"masi_mean": 17.80' in text
    assert not re.search(r'": "\d', text)  # no number written as a string


@pytest.mark.parametrize(
    ("numerator", "denominator", "want"),
    [(1, 3, "33.33"), (2, 3, "66.67"), (1, 160, "0.63"), (3, 160, "1.88"), (0, 5, "0.00"),
     (7, 7, "100.00")],
)  # fmt: skip
def test_percent_is_exact_and_rounds_half_up(numerator: int, denominator: int, want: str) -> None:
    # 1/160 = 0.625 %: half up gives 0.63 (half-even would give 0.62)
    assert percent(numerator, denominator) == Decimal(want)
    assert str(percent(numerator, denominator)) == want


def test_rounding_helpers_edge_cases() -> None:
    assert percent(1, 0) is None
    assert half_up(None) is None
    assert half_up(Decimal("-0.625")) == Decimal("-0.63")  # away from zero, like the SQL
    assert half_up(Decimal("5.135")) == Decimal("5.14")


@pytest.mark.parametrize(
    ("df", "table"),
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (29, 2.0452),
     (100, 1.9840)],
)  # fmt: skip
def test_t_quantile_matches_the_tables(df: int, table: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(table, rel=2e-3)


def test_mean_ci95() -> None:
    low, high = mean_ci95(10.0, 2.0, 4) or (0, 0)  # t(0.975, 3) = 3.182: 10 -+ 3.182 * 2 / 2
    assert (low, high) == (pytest.approx(6.818, abs=0.01), pytest.approx(13.182, abs=0.01))
    assert mean_ci95(10.0, None, 1) is None
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(0.2, 3)


# -- plots and the page -------------------------------------------------------------------------
@pytest.mark.parametrize("plot", [p.filename for p in PLOTS])
def test_plots_exist_decode_and_are_not_trivial(golden_report: Path, plot: str) -> None:
    path = golden_report / plot
    assert path.stat().st_size > 15_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.load()  # decodes every pixel
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert width >= 800
    assert height >= 450
    assert len(colours) > 50  # drawn: text, bars, lines (a blank canvas has one colour)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append(value)
            if name == "id" and value is not None:
                self.ids.add(value)


def test_report_html_references_only_files_that_exist(golden_report: Path) -> None:
    page = (golden_report / "report.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    files = [r for r in parser.refs if not r.startswith(("data:image/png;base64,", "#"))]
    anchors = [r[1:] for r in parser.refs if r.startswith("#")]
    images = [r for r in parser.refs if r.startswith("data:")]
    assert len(images) == len(PLOTS)  # every plot embedded: the page stands alone
    assert files, "the page links to its files"
    for ref in files:
        assert "/" not in ref
        assert ":" not in ref  # no URL, no absolute path
        assert (golden_report / ref).is_file(), ref
    assert set(anchors) <= parser.ids
    assert "<script" not in page


def test_report_html_shows_names_tables_and_flags(golden_report: Path) -> None:
    page = (golden_report / "report.html").read_text(encoding="utf-8")
    for arm in TRIAL.arms:
        assert arm.name in page
    assert "Month 1" in page
    assert "Burning sensation" in page
    assert "data up to 2025-04-16" in page  # the latest date in the data (AE0002's report)
    # S001 m3: PGA 1 against the grade 3 its MASI improvement implies
    assert "PGA 1, implied by the MASI improvement 3" in page
    for title in ("Awaiting adjudication", "PGA / MASI discordance", "Out-of-window visits"):
        assert title in page


def test_tables_are_written_as_csv_and_markdown(golden_report: Path) -> None:
    names = {p.name for p in golden_report.iterdir()}
    assert names == set(report_file_names(Settings()))
    for table in ("outcomes_by_arm_visit", "ae_incidence", "data_quality_flags",
                  "arm_participants", "subject_timeline"):  # fmt: skip
        assert (golden_report / f"{table}.csv").read_text().count("\n") >= 2
        assert (golden_report / f"{table}.md").read_text().startswith(f"# {table}\n\n| ")


def test_the_report_is_deterministic(golden_report: Path, tmp_path: Path) -> None:
    done = run("report", "--ndjson", str(GOLDEN), "--out", str(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    for path in golden_report.iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


# -- data-quality flags ------------------------------------------------------------------------
def _flag_data(directory: Path) -> Path:
    """S001 (combo): m1 assessed 50 days after the first treatment (window 23-37), two raters
    4.8 points apart there (> 3.0), and a PGA of 1 where the MASI implies 5."""
    h.write_csv(directory / "participants.csv", [h.participant("S001")])
    h.write_csv(directory / "eligibility.csv", [h.screening("S001")])
    low = (1, 1, 2, 2, 2, 3, 2, 2, 3, 1, 1, 1)  # 1.2 + 3.6 + 3.6 + 0.2 = 8.6 (one rater)
    high = (2, 2, 3, 3, 3, 4, 3, 3, 4, 1, 1, 2)  # 3.6 + 7.2 + 7.2 + 0.4 = 18.4
    h.write_csv(directory / "masi.csv", [
        h.masi("S001", "baseline", "R1", high), h.masi("S001", "baseline", "R2", high),
        h.masi("S001", "m1", "R1", (2, 2, 2, 2, 2, 3, 2, 2, 3, 1, 1, 1), assessed_on="2025-03-01"),
        h.masi("S001", "m1", "R2", (2, 2, 2, 3, 3, 4, 3, 3, 4, 1, 1, 1), assessed_on="2025-03-01"),
        h.masi("S001", "m2", "R1", low, assessed_on="2025-03-11"),
    ])  # fmt: skip
    h.write_csv(directory / "pga.csv", [h.pga("S001", "m1", pga="1", assessed_on="2025-03-01")])
    return directory


def test_data_quality_flags(tmp_path: Path) -> None:
    data = _flag_data(tmp_path / "data")
    ndjson = tmp_path / "fhir.ndjson"
    mapped = run("map", str(data), "--format", "ndjson", "--out", str(ndjson))
    assert mapped.returncode == 0, mapped.stderr
    assert "window" in mapped.stderr  # the intake warned already
    done = run("report", "--ndjson", str(ndjson), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    flags = (tmp_path / "out" / "data_quality_flags.csv").read_text().splitlines()
    assert flags[0] == "flag,subject_id,arm,visit,visit_on,detail"
    # m1: R1 2.4 + 3.6 + 3.6 + 0.2 = 9.8, R2 2.4 + 7.2 + 7.2 + 0.2 = 17.0: 7.2 apart -> 13.4
    assert flags[1].startswith("awaiting-adjudication,S001,combo,m1,2025-03-01,consensus MASI "
                               "13.40 (preliminary); raters R1 9.80 / R2 17.00")  # fmt: skip
    # m1 improvement (18.4 - 13.4) / 18.4 = 27.2 % -> implied grade 4, PGA 1: 3 grades apart
    assert flags[2] == ("pga-masi-discordant,S001,combo,m1,2025-03-01,"
                        "\"PGA 1, implied by the MASI improvement 4\"")  # fmt: skip
    # first treatment 2025-01-10 (helpers): m1 on day 50, window days 23..37; m2 on day 60: in
    assert flags[3].startswith("out-of-window,S001,combo,m1,2025-03-01,Month 1 on 2025-03-01: "
                               "outside days 23 to 37")  # fmt: skip
    assert len(flags) == 4
    summary = load_summary(tmp_path / "out" / "summary.json")
    m1 = summary["arms"]["combo"]["visits"]["m1"]
    assert m1["n_final"] == 0  # awaiting adjudication: not in the means
    assert m1["masi_mean"] is None
    page = (tmp_path / "out" / "report.html").read_text()
    assert "outside days 23 to 37" in page


# -- the output directory ------------------------------------------------------------------------
def test_report_replaces_its_own_files_and_refuses_foreign_ones(
    golden_report: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(golden_report, out)
    done = run("report", "--ndjson", str(GOLDEN), "--out", str(out))
    assert done.returncode == 0, done.stderr
    (out / "notes.txt").write_text("mine")
    done = run("report", "--ndjson", str(GOLDEN), "--out", str(out))
    assert done.returncode == 2
    assert "did not write (notes.txt)" in done.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_report_refuses_to_write_into_its_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(GOLDEN, data / "fhir.ndjson")
    done = run("report", "--ndjson", str(data), "--out", str(data / "out"))
    assert done.returncode == 2
    assert "input" in done.stderr
    assert not (data / "out").exists()


def test_report_needs_exactly_one_source(tmp_path: Path) -> None:
    assert run("report", "--out", str(tmp_path / "o")).returncode == 2
    both = run("report", "--ndjson", str(GOLDEN), "--server", "http://x", "--out", str(tmp_path))
    assert both.returncode == 2
    assert not (tmp_path / "o").exists()


def test_report_unreadable_source_is_66_in_one_line(tmp_path: Path) -> None:
    done = run("report", "--ndjson", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert done.returncode == 66
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()  # a failed first run leaves no directory


def test_report_of_an_empty_source_still_has_every_combination(tmp_path: Path) -> None:
    empty = tmp_path / "empty.ndjson"
    empty.write_text("")
    data = write_report(registry_tables(NdjsonSource([empty])), tmp_path / "out",
                        settings=Settings(), source="empty")  # fmt: skip
    assert data.summary["arms"]["combo"]["participants"] == 0
    assert data.summary["adverse_events"]["laser"]["other"]["incidence"] is None  # 0 / 0
    assert data.data_until is None
    for plot in PLOTS:
        with Image.open(tmp_path / "out" / plot.filename) as image:
            assert image.size[0] >= 800


# -- AE terms: grouped on the trial code ----------------------------------------------------------
def test_ae_incidence_groups_on_the_trial_term_code(tmp_path: Path) -> None:
    lines = GOLDEN.read_text(encoding="utf-8").splitlines()
    events = [json.loads(x) for x in lines if '"resourceType":"AdverseEvent"' in x]
    assert [e["event"]["coding"][-1]["code"] for e in events] == ["burning", "irritation"]
    # the hospital target's free text does not split a term; an event without the trial
    # coding (an earlier adapter) falls back to the term whose display is its text
    edited = []
    for line in lines:
        resource = json.loads(line)
        if resource["resourceType"] == "AdverseEvent":
            if resource["id"] == "AE0001":
                resource["event"]["text"] = "burning cheeks after the session"
            else:
                del resource["event"]["coding"]
        edited.append(json.dumps(resource))
    source = tmp_path / "edited.ndjson"
    source.write_text("\n".join(edited) + "\n")
    rows = registry_tables(NdjsonSource([source])).rows("ae_incidence")
    assert [(r["term"], r["term_display"], r["events"]) for r in rows] == [
        ("burning", "Burning sensation", 1),
        ("irritation", "Skin irritation", 1),
    ]


def test_every_ae_term_needs_a_trial_code(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), mappings)
    path = mappings / "codesystem.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["concepts"] = [c for c in data["concepts"] if c["code"] != "edema"]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigurationError, match="no code for the adverse-event term"):
        Terminology(load_trial(mappings), mappings)
