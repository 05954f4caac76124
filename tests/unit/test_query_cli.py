"""`fhir-adapter view` and `fhir-adapter query` as users run them (SPEC §13): output shapes,
exit codes and one-line messages; and the trial views on the golden R4 output."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from fhir_adapter.query.registry import registry_tables, trial_views
from fhir_adapter.query.sources import NdjsonSource
from fhir_adapter.settings import Settings
from fhir_adapter.trial import default_mappings_dir

CLI = Path(sys.executable).with_name("fhir-adapter")
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "r4" / "registry.ndjson"
VIEWS = default_mappings_dir() / "views"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, check=False,
                          timeout=300, env=env)  # fmt: skip


def test_view_writes_json_lines_with_every_column() -> None:
    done = run("view", str(VIEWS / "masi_consensus.json"), str(GOLDEN))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    view = json.loads((VIEWS / "masi_consensus.json").read_text())
    names = [c["name"] for s in view["select"] for c in s["column"]]
    assert all(list(r) == names for r in rows)
    by_id = {r["observation_id"]: r for r in rows}
    m1 = by_id["S001-m1-masi"]  # the golden file's values (tests/golden/r4/registry.ndjson)
    assert (m1["value"], m1["status"], m1["method"], m1["needs_adjudication"]) == (
        9.5, "final", "mean-of-2", False,
    )  # fmt: skip
    assert m1["rater_observation_keys"] == [
        "Observation/S001-m1-masi-R1",
        "Observation/S001-m1-masi-R2",
    ]
    assert by_id["S001-baseline-mmasi"]["value"] == 9.2
    assert done.stderr == ""


def test_view_nulls_and_csv_and_parquet(tmp_path: Path) -> None:
    done = run("view", str(VIEWS / "subjects.json"), str(GOLDEN))
    rows = {r["subject_id"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert rows["S001"]["withdrawn_on"] == "2025-04-20"
    assert rows["S002"]["withdrawn_on"] is None  # present, null where empty
    assert rows["S001"]["arm_name"] == "UC-MSC exosomes + 1565 nm NAFL"
    out = tmp_path / "subjects.csv"
    assert run("view", str(VIEWS / "subjects.json"), str(GOLDEN), "--format", "csv",
               "--out", str(out)).returncode == 0  # fmt: skip
    with out.open(newline="") as fh:
        assert [r["subject_id"] for r in csv.DictReader(fh)] == ["S001", "S002"]
    parquet = tmp_path / "subjects.parquet"
    assert run("view", str(VIEWS / "subjects.json"), str(GOLDEN), "--format", "parquet",
               "--out", str(parquet)).returncode == 0  # fmt: skip
    con = duckdb.connect()
    assert con.execute("SELECT count(*) FROM read_parquet(?)", [str(parquet)]).fetchall() == [(2,)]
    con.close()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["/nonexistent/view.json", str(GOLDEN)], 66, "cannot be read"),
        ([str(VIEWS / "subjects.json"), "/nonexistent/data"], 66, "no such file or directory"),
        (["BAD", str(GOLDEN)], 65, "invalid ViewDefinition"),
        (["CASE", str(GOLDEN)], 65, "differ only in case"),
    ],
)
def test_view_exit_codes_and_one_line_messages(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    views = {
        "BAD": {"resource": "Patient", "select": [{"forEach": "@@"}]},
        "CASE": {"resource": "Patient", "select": [{"column": [
            {"name": "id", "path": "id"}, {"name": "ID", "path": "id"}]}]},
    }  # fmt: skip
    if args[0] in views:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(views[args[0]]))
        args = [str(bad), *args[1:]]
    done = run("view", *args)
    assert done.returncode == code
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_view_needs_exactly_one_kind_of_source() -> None:
    assert run("view", str(VIEWS / "subjects.json")).returncode == 2
    both = run("view", str(VIEWS / "subjects.json"), str(GOLDEN), "--server", "http://x")
    assert both.returncode == 2
    assert run("view", str(VIEWS / "subjects.json"), str(GOLDEN), "--format", "csv").returncode == 2


def test_unreachable_server_is_69() -> None:
    env = {"PATH": "/usr/bin", "FHIR_ADAPTER_MAX_ATTEMPTS": "1"}
    done = run("view", str(VIEWS / "subjects.json"), "--server", "http://127.0.0.1:9/fhir", env=env)
    assert done.returncode == 69
    assert "cannot connect" in done.stderr


def test_query_writes_views_and_registry_tables(tmp_path: Path) -> None:
    done = run("query", "--ndjson", str(GOLDEN), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    for view in sorted(VIEWS.glob("*.json")):
        assert (tmp_path / "out" / "views" / f"{view.stem}.csv").exists()
        assert (tmp_path / "out" / "views" / f"{view.stem}.parquet").exists()
    with (tmp_path / "out" / "registry" / "ae_incidence.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    # golden data: S001 (combo, withdrawn) has two events, S002 (laser) none
    assert [(r["arm"], r["term"], r["events"], r["participants_in_arm"], r["incidence_pct"],
             r["max_grade"], r["serious_events"]) for r in table] == [
        ("combo", "burning", "1", "1", "100", "2", "0"),
        ("combo", "irritation", "1", "1", "100", "3", "1"),
    ]  # fmt: skip
    md = (tmp_path / "out" / "registry" / "outcomes_by_arm_visit.md").read_text()
    assert md.startswith("# outcomes_by_arm_visit\n\n| arm | arm_name | visit | n |")


def test_query_refuses_to_write_into_its_input(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "Patient.ndjson").write_text(GOLDEN.read_text().splitlines()[0] + "\n")
    done = run("query", "--ndjson", str(data), "--out", str(data / "out"))
    assert done.returncode == 66
    assert "would be written into the input" in done.stderr


def test_views_take_the_identifier_base_from_settings() -> None:
    views = {v.name: v for v in trial_views(Settings())}
    assert views["subjects"].constants["idbase"] == "urn:nct06677931"
    other = {v.name: v for v in trial_views(Settings(identifier_base="urn:other-trial"))}
    assert other["subjects"].constants["idbase"] == "urn:other-trial"
    # the golden data is under urn:nct06677931: another base finds none of it
    source = NdjsonSource([GOLDEN])
    assert (
        registry_tables(source, Settings(identifier_base="urn:other-trial")).rows("subjects") == []
    )
    assert len(registry_tables(source).rows("subjects")) == 2


def test_every_trial_view_has_a_description_and_typed_columns() -> None:
    for view in trial_views():
        assert view.description, view.name
        assert all(c.type and c.description for c in view.columns), view.name
        assert "urn:nct06677931" not in json.dumps(view.definition["select"]), view.name


def test_registry_outcomes_on_the_golden_data() -> None:
    tables = registry_tables(NdjsonSource([GOLDEN]))
    rows = {(r["arm"], r["visit"]): r for r in tables.rows("outcomes_by_arm_visit")}
    m1 = rows[("combo", "m1")]  # S001 at m1: consensus MASI 9.5 final, improvement 46.6 %
    assert (m1["n"], str(m1["masi_mean"]), str(m1["improvement_mean_pct"])) == (1, "9.5", "46.6")
    assert tables.rows("subject_timeline")[0]["subject_id"] == "S001"


def test_adverse_event_view_reads_the_course_and_the_causality_words() -> None:
    """The AE view follows the mapping's shapes: resolved_on from the R5 cross-version
    occurrence Period, causality words from the suspect it concerns or, with no suspect named,
    from the study-treatment extension (tests/golden/input/adverse_events.csv)."""
    done = run("view", str(VIEWS / "adverse_events.json"), str(GOLDEN))
    assert done.returncode == 0, done.stderr
    rows = {r["ae_id"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert (rows["AE0001"]["onset_on"], rows["AE0001"]["resolved_on"]) == ("2025-01-11", "2025-01-14")
    assert rows["AE0001"]["causality"] == ["possibly_related"]
    assert rows["AE0001"]["causality_on_study_treatment"] is False
    assert rows["AE0002"]["resolved_on"] is None
    assert rows["AE0002"]["causality"] == ["unrelated"]
    assert rows["AE0002"]["causality_on_study_treatment"] is True
    suspects = run("view", str(VIEWS / "adverse_event_suspects.json"), str(GOLDEN))
    by_key = {(r["ae_id"], r["suspect_key"]): r for r in map(json.loads, suspects.stdout.splitlines())}
    assert by_key[("AE0001", "Device/laser")]["causality"] == "possibly_related"
    assert by_key[("AE0002", "Device/laser")]["causality"] is None


def test_trial_extensions_are_found_under_another_identifier_base(tmp_path: Path) -> None:
    """The trial's extension URLs come from extensions.yaml's canonical_base, not from the
    identifier base: the views read them through the `canonical` constant, so a deployment with
    its own FHIR_ADAPTER_IDENTIFIER_BASE sees the same causality and window flags."""
    golden_input = GOLDEN.parent.parent / "input"
    rows = {}
    for base in ("urn:nct06677931", "urn:other-trial"):
        out = tmp_path / f"{base.rsplit(':', 1)[1]}.ndjson"
        env = {**os.environ, "FHIR_ADAPTER_IDENTIFIER_BASE": base}
        done = run("map", str(golden_input), "--format", "ndjson", "--out", str(out), env=env)
        assert done.returncode == 0, done.stderr
        tables = registry_tables(NdjsonSource([out]), Settings(identifier_base=base))
        rows[base] = sorted(
            (r["ae_id"], r["causality_on_study_treatment"]) for r in tables.rows("adverse_events")
        )
    assert rows["urn:other-trial"] == rows["urn:nct06677931"]
    assert (True in {flag for _, flag in rows["urn:nct06677931"]})  # the extension is there
    views = {v.name: v for v in trial_views(Settings(identifier_base="urn:other-trial"))}
    assert views["adverse_events"].constants["canonical"] == "urn:nct06677931"
