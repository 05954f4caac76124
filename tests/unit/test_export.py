"""`fhir-adapter export`: the de-identified Bulk Data export, as users run it.

Input: the hospital target of the synthetic set (`fhir-adapter generate`, then `fhir-adapter map
--target hospital --format ndjson`), which carries birth dates and MRNs, plus a copy enriched
with what a hospital's server may add (names, telecom, narrative, notes, foreign extensions and
tags, a modifier extension, references with names in their display).
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import zoneinfo
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.export import load_rules
from fhir_adapter.jsonout import dumps
from tests import export_checks as ec

EXE = shutil.which("fhir-adapter", path=str(Path(sys.executable).parent))
assert EXE is not None
KEY_A = "test-key-A-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_B = "test-key-B-0123456789abcdefghijklmnopqrstuvwxyz"
SITE = zoneinfo.ZoneInfo("Asia/Shanghai")

Resource = dict[str, Any]


def run(*args: str | Path, cwd: Path, key: str | None = KEY_A) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_ADAPTER_")}
    if key is not None:
        env["FHIR_ADAPTER_DEID_KEY"] = key
    return subprocess.run(
        [EXE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# -- the source ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    done = run("generate", root / "data", cwd=root, key=None)
    assert done.returncode == 0, done.stderr
    done = run(
        "map", root / "data", "--target", "hospital", "--format", "ndjson",
        "--out", root / "hospital.ndjson", cwd=root, key=None,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def source(work: Path) -> list[Resource]:
    return ec.read_ndjson(work / "hospital.ndjson")


@pytest.fixture(scope="module")
def personal(work: Path, source: list[Resource]) -> tuple[set[str], set[str], set[str]]:
    """(words, substrings, exact values) that must not appear anywhere in the export."""
    data = work / "data"
    people = csv_rows(data / "participants.csv")
    events = csv_rows(data / "adverse_events.csv")
    raters = {r["rater_id"] for r in csv_rows(data / "masi.csv")}
    tokens = {p["subject_id"] for p in people} | {e["ae_id"] for e in events} | raters
    within = {p["mrn"] for p in people if p["mrn"]} | {p["birth_date"] for p in people}
    within |= {p["withdrawal_reason"] for p in people if p["withdrawal_reason"]}
    within |= {e["term_text"] for e in events if e["term"] == "other" and e["term_text"]}
    # every business key of a subject's resource (S001-m3-masi-R1, S001-m3, AE0001, ...)
    exact = {str(ec.business_key(r)) for r in source if r["resourceType"] in ec.SUBJECT_TYPES}
    assert len(tokens) > 60
    assert any(p["mrn"] for p in people)
    assert len(exact) > 3000
    assert "mild fever" in within
    assert "personal reasons" in within
    return tokens, within, exact


def export(work: Path, name: str, key: str, source: Path | None = None) -> Path:
    out = work / name
    done = run(
        "export", "--ndjson", source or work / "hospital.ndjson", "--out", out, cwd=work, key=key
    )
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def out_a(work: Path) -> Path:
    return export(work, "export-a", KEY_A)


@pytest.fixture(scope="module")
def exported(out_a: Path) -> tuple[dict[str, Any], dict[str, list[Resource]]]:
    return ec.load_export(out_a)


# -- what is in it ------------------------------------------------------------------------------
def test_no_name_mrn_birth_date_free_text_or_subject_id(
    out_a: Path, personal: tuple[set[str], set[str], set[str]]
) -> None:
    ec.assert_no_values(out_a, *personal)


def test_patients_keep_only_pseudonym_and_sex(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    _, by_type = exported
    patients = by_type["Patient"]
    assert len(patients) == sum(r["resourceType"] == "Patient" for r in source)
    for patient in patients:
        assert set(patient) == {"resourceType", "id", "meta", "identifier", "gender"}
        assert patient["identifier"] == [{"system": ec.BASE + "patient", "value": patient["id"]}]
        assert patient["meta"] == {"tag": [{"system": ec.BASE + "patient", "code": patient["id"]}]}


def test_every_type_and_resource_is_exported_except_the_aggregates(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    """MeasureReports (aggregates dated with real calendar dates) and their Provenance go."""
    _, by_type = exported
    counts = Counter(r["resourceType"] for r in source)
    of_reports = sum(
        r["resourceType"] == "Provenance"
        and all(t["reference"].startswith("MeasureReport/") for t in r["target"])
        for r in source
    )
    assert of_reports > 0
    assert "MeasureReport" not in by_type
    expected = {t: n for t, n in counts.items() if t != "MeasureReport"}
    expected["Provenance"] -= of_reports
    assert {t: len(rs) for t, rs in by_type.items()} == expected


def test_every_reference_resolves_inside_the_export(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]],
) -> None:
    assert ec.assert_references_resolve(exported[1]) > 10000


def test_every_line_validates(exported: tuple[dict[str, Any], dict[str, list[Resource]]]) -> None:
    ec.assert_all_valid(exported[1])


def test_manifest_follows_the_bulk_data_ig(
    out_a: Path, exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    manifest, _ = exported
    ec.assert_manifest(out_a, manifest)
    # one message: the free text of the `other` adverse event was not kept
    (outcome,) = ec.read_ndjson(out_a / manifest["error"][0]["url"])
    assert [(i["severity"], i["code"]) for i in outcome["issue"]] == [("warning", "suppressed")]
    assert "AdverseEvent.event.text" in outcome["issue"][0]["diagnostics"]
    latest = ec.latest_source_date(source, SITE)
    assert dt.datetime.fromisoformat(manifest["transactionTime"]) == latest
    assert manifest["transactionTime"] == latest.astimezone(SITE).isoformat(timespec="seconds")


def test_files_are_sorted_by_pseudonym_not_in_source_order(out_a: Path) -> None:
    for path in out_a.glob("*.ndjson"):
        if path.name == "OperationOutcome.ndjson":
            continue
        ids = [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]
        assert ids == sorted(ids), path.name


# -- pseudonyms ---------------------------------------------------------------------------------
def test_pseudonyms_are_keyed_hmacs_of_the_business_keys(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    _, by_type = exported
    ids = {(t, r["id"]) for t, rs in by_type.items() for r in rs}
    patient = next(r for r in source if r["resourceType"] == "Patient")
    subject_id = patient["id"]  # S001
    mine = ec.pseudonym(KEY_A, subject_id)
    assert {("Patient", mine), ("ResearchSubject", mine), ("Consent", mine)} <= ids
    assert ("Encounter", ec.pseudonym(KEY_A, f"{subject_id}-m1")) in ids
    assert ("Observation", ec.pseudonym(KEY_A, f"{subject_id}-baseline-masi")) in ids
    assert ("Practitioner", ec.pseudonym(KEY_A, "R1")) in ids
    ae = next(r for r in source if r["resourceType"] == "AdverseEvent")
    assert ("AdverseEvent", ec.pseudonym(KEY_A, ae["id"])) in ids
    # study-level resources keep their public ids
    assert ("ResearchStudy", "NCT06677931") in ids
    assert ("Device", "laser") in ids


def test_same_key_gives_the_same_bytes_another_key_other_pseudonyms(
    work: Path, out_a: Path, exported: tuple[dict[str, Any], dict[str, list[Resource]]]
) -> None:
    again = export(work, "export-a-again", KEY_A)
    names = sorted(p.name for p in out_a.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out_a / name).read_bytes() == (again / name).read_bytes(), name

    other = export(work, "export-b", KEY_B)
    _, by_b = ec.load_export(other)
    _, by_a = exported
    for rtype in ("Patient", "Observation", "AdverseEvent", "Practitioner", "Encounter"):
        ids_a = {r["id"] for r in by_a[rtype]}
        ids_b = {r["id"] for r in by_b[rtype]}
        assert len(ids_a) == len(ids_b), rtype
        assert not ids_a & ids_b, rtype
    assert {r["id"] for r in by_b["ResearchStudy"]} == {"NCT06677931"}
    # the other key shifts dates differently too
    dates_a = sorted(r["period"]["start"] for r in by_a["ResearchSubject"])
    dates_b = sorted(r["period"]["start"] for r in by_b["ResearchSubject"])
    assert dates_a != dates_b


# -- dates --------------------------------------------------------------------------------------
def test_dates_of_a_subject_move_by_one_offset_so_intervals_hold(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    shifts = ec.date_shifts(source, exported[1], KEY_A)
    patients = {r["id"] for r in source if r["resourceType"] == "Patient"}
    assert set(shifts) == patients
    for subject, days in shifts.items():
        assert len(days) == 1, f"{subject}: dates moved by {sorted(days)}"
        (n,) = days
        assert 1 <= n <= 365
    assert len({d for days in shifts.values() for d in days}) > 30  # per subject, not global


def test_study_level_dates_are_kept(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    study = next(r for r in source if r["resourceType"] == "ResearchStudy")
    assert exported[1]["ResearchStudy"][0]["period"] == study["period"]


# -- analyses survive ---------------------------------------------------------------------------
def test_registry_tables_from_the_export_match_the_source(work: Path, out_a: Path) -> None:
    """What a registry computes (outcomes per arm x visit, out-of-window visits, AE incidence)
    is the same on the export as on the source: the free-text term aside."""
    for name, src in (("q-source", work / "hospital.ndjson"), ("q-export", out_a)):
        done = run("query", "--ndjson", src, "--out", work / name, cwd=work, key=None)
        assert done.returncode == 0, done.stderr
    source_q, export_q = work / "q-source", work / "q-export"
    for table in ("registry/outcomes_by_arm_visit.csv", "views/out_of_window.csv"):
        assert (source_q / table).read_text() == (export_q / table).read_text(), table
    free_text = {
        e["term_text"] for e in csv_rows(work / "data" / "adverse_events.csv") if e["term_text"]
    }
    ae_source = [
        r for r in csv_rows(source_q / "registry/ae_incidence.csv") if r["term"] not in free_text
    ]
    assert ae_source == csv_rows(export_q / "registry/ae_incidence.csv")


# -- a hospital server's extras -----------------------------------------------------------------
HOSTILE_NAME = "Jane Doe-Wang"
HOSTILE_TEXTS = {
    HOSTILE_NAME,
    "+86 591 8335 7896",
    "12 Gulou Road",
    "Dr. Wang Wei",
    "Patient says the spots got worse after her pregnancy",
    "VIP ward 7",
    "Han",
    "jane.doe@example.org",
    "MRN-999999",
}


def _enriched(source: list[Resource]) -> tuple[list[Resource], str, str]:
    """The source with personal extras; returns it, the subject and the withheld resource id."""
    resources = copy.deepcopy(source)
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    sid = patient["id"]
    patient["name"] = [{"family": "Doe-Wang", "given": ["Jane"], "text": HOSTILE_NAME}]
    patient["telecom"] = [
        {"system": "phone", "value": "+86 591 8335 7896"},
        {"system": "email", "value": "jane.doe@example.org"},
    ]
    patient["address"] = [{"line": ["12 Gulou Road"], "city": "Fuzhou"}]
    patient["text"] = {
        "status": "generated",
        "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{HOSTILE_NAME}</div>',
    }
    patient["_gender"] = {"extension": [{"url": "http://example.org/note", "valueString": "Han"}]}
    patient["extension"] = [{"url": "http://example.org/ethnicity", "valueString": "Han"}]
    patient["meta"]["lastUpdated"] = "2026-11-30T10:11:12.000Z"
    patient["meta"]["versionId"] = "7"
    patient["meta"]["tag"].append({"system": "http://hospital.example/tags", "code": "VIP ward 7"})
    patient["identifier"].append({"system": "http://hospital.example/card", "value": "MRN-999999"})
    for r in resources:
        if r["resourceType"] == "Observation" and r["subject"]["reference"] == f"Patient/{sid}":
            r["note"] = [{"text": "Patient says the spots got worse after her pregnancy"}]
            r["performer"] = [
                *r.get("performer", []),
                {"identifier": {"system": "urn:fhir-adapter:hospital-mrn", "value": "MRN-999999"}},
            ]
            r["hasMember"] = [{"reference": "Observation/not-in-the-source"}]
        if r["resourceType"] == "AdverseEvent" and r["subject"]["reference"] == f"Patient/{sid}":
            r["subject"]["display"] = HOSTILE_NAME
            r["recorder"] = {"reference": "Practitioner/R1", "display": "Dr. Wang Wei"}
            r["contained"] = [
                {"resourceType": "Patient", "id": "x", "name": [{"text": HOSTILE_NAME}]}
            ]
    withheld = next(r for r in resources if r["resourceType"] == "ResearchSubject")
    withheld["modifierExtension"] = [{"url": "http://example.org/not-really", "valueBoolean": True}]
    # a Patient of another study on the same server, and a type the allow-list does not know
    resources.append({"resourceType": "Patient", "id": "other", "name": [{"text": HOSTILE_NAME}]})
    resources.append({
        "resourceType": "DocumentReference", "id": "letter", "status": "current",
        "meta": {"tag": [{"system": ec.BASE + "document", "code": sid}]},
        "description": HOSTILE_NAME, "content": [{"attachment": {"title": "VIP ward 7"}}],
    })  # fmt: skip
    return resources, sid, ec.pseudonym(KEY_A, str(ec.business_key(withheld)))


@pytest.fixture(scope="module")
def hostile(
    work: Path, source: list[Resource]
) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    resources, _, withheld = _enriched(source)
    bulk = work / "hostile-source"  # a Bulk Data directory this time, one file per type
    bulk.mkdir()
    for resource in resources:
        with (bulk / f"{resource['resourceType']}.ndjson").open("a", encoding="utf-8") as fh:
            fh.write(dumps(resource) + "\n")
    out = work / "hostile-export"
    return run("export", "--ndjson", bulk, "--out", out, cwd=work), out, withheld


def test_extras_of_a_hospital_server_are_dropped(
    hostile: tuple[subprocess.CompletedProcess[str], Path, str],
    personal: tuple[set[str], set[str], set[str]],
) -> None:
    done, out, _ = hostile
    assert done.returncode == 65, done.stderr  # one resource withheld
    tokens, within, exact = personal
    ec.assert_no_values(out, tokens, within | HOSTILE_TEXTS, exact)
    manifest, by_type = ec.load_export(out)
    ec.assert_manifest(out, manifest)
    ec.assert_references_resolve(by_type)
    ec.assert_all_valid(by_type)
    assert "DocumentReference" not in by_type
    assert all(
        "lastUpdated" not in r["meta"] and "versionId" not in r["meta"] for r in by_type["Patient"]
    )
    assert all("recorder" not in r and "contained" not in r for r in by_type["AdverseEvent"])


def test_unknown_modifier_extension_withholds_the_resource_and_says_so(
    hostile: tuple[subprocess.CompletedProcess[str], Path, str],
) -> None:
    done, out, withheld = hostile
    manifest, by_type = ec.load_export(out)
    assert withheld not in {r["id"] for r in by_type["ResearchSubject"]}
    outcomes = ec.read_ndjson(out / manifest["error"][0]["url"])
    issues = [i for o in outcomes for i in o["issue"]]
    errors = [i for i in issues if i["severity"] == "error"]
    assert len(errors) == 1
    assert f"ResearchSubject/{withheld}" in errors[0]["diagnostics"]
    warnings = " | ".join(i["diagnostics"] for i in issues if i["severity"] == "warning")
    assert "http://example.org/ethnicity" in warnings  # unknown extensions are counted
    assert "Observation.hasMember" in warnings  # a reference to nothing was dropped
    assert "withheld" in done.stderr


# -- refusals -----------------------------------------------------------------------------------
def test_without_a_key_it_refuses_with_one_line(work: Path) -> None:
    for key in (None, "", "too-short"):
        done = run(
            "export",
            "--ndjson",
            work / "hospital.ndjson",
            "--out",
            work / "nokey",
            cwd=work,
            key=key,
        )
        assert done.returncode == 66
        assert len(done.stderr.strip().splitlines()) == 1
        assert "FHIR_ADAPTER_DEID_KEY" in done.stderr
        assert not (work / "nokey").exists()


def test_refuses_an_output_inside_the_input_or_full_of_other_files(work: Path, out_a: Path) -> None:
    cases = [
        ("--ndjson", out_a, "--out", out_a / "again"),
        ("--ndjson", out_a, "--out", out_a),
        ("--ndjson", work / "hospital.ndjson", "--out", work / "data"),
    ]
    for args in cases:
        done = run("export", *args, cwd=work)
        assert done.returncode == 66, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    done = run("export", "--out", work / "x", cwd=work)
    assert done.returncode == 2
    assert "exactly one source" in done.stderr


def test_unreadable_source_exit_66(work: Path) -> None:
    bad = work / "broken.ndjson"
    bad.write_text('{"resourceType": "Patient", "id": "S001"}\nnot json\n', encoding="utf-8")
    for src in (bad, work / "missing.ndjson"):
        done = run("export", "--ndjson", src, "--out", work / "never", cwd=work)
        assert done.returncode == 66, done.stderr
        assert not (work / "never").exists()
        assert not [p for p in work.iterdir() if p.name.startswith(".never.")]


def test_an_earlier_export_is_replaced_whole(work: Path) -> None:
    lines = (work / "hospital.ndjson").read_text(encoding="utf-8").splitlines()
    study = ("ResearchStudy", "Group", "Organization", "Location")
    small, smaller = work / "small.ndjson", work / "smaller.ndjson"
    small.write_text("\n".join(ln for ln in lines if '"Patient"' in ln[:30]) + "\n")
    kept = [ln for ln in lines if json.loads(ln)["resourceType"] in study]
    smaller.write_text("\n".join(kept) + "\n", encoding="utf-8")
    out = export(work, "replaced", KEY_A, source=small)
    (out / "Stale.ndjson").write_text("{}\n", encoding="utf-8")
    export(work, "replaced", KEY_A, source=smaller)
    names = sorted(p.name for p in out.iterdir())
    assert names == [*sorted(f"{t}.ndjson" for t in study), "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transactionTime"] == "1970-01-01T00:00:00Z"  # no subject data: no date


def test_help(work: Path) -> None:
    done = run("export", "--help", cwd=work, key=None)
    assert done.returncode == 0
    assert "FHIR_ADAPTER_DEID_KEY" in done.stdout


def test_decimals_pass_through_exactly(
    exported: tuple[dict[str, Any], dict[str, list[Resource]]], source: list[Resource]
) -> None:
    values = {
        str(r["valueQuantity"]["value"])
        for r in source
        if r["resourceType"] == "Observation" and "valueQuantity" in r
    }
    mine = {
        str(r["valueQuantity"]["value"]) for r in exported[1]["Observation"] if "valueQuantity" in r
    }
    assert mine == values
    assert any(v.endswith(".0") for v in mine)  # trailing zeros survive


def _extensions(node: Any) -> Iterator[dict[str, Any]]:
    """Every top-level extension (not the sub-extensions of a complex one)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("extension", "modifierExtension") and isinstance(value, list):
                yield from (v for v in value if isinstance(v, dict))
                continue
            yield from _extensions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _extensions(item)


def test_every_extension_the_adapter_emits_has_a_decision(source: list[Resource]) -> None:
    """Each extension of the mapping's output is listed in mappings/deidentify.yaml (kept with
    its own rules, or dropped on purpose), sub-extensions included: none is dropped unseen."""
    rules = load_rules()
    seen = 0
    for resource in source:
        for ext in _extensions(resource):
            rule = rules.extensions.get(ext["url"])
            assert rule is not None, f"{resource['resourceType']}: {ext['url']} has no decision"
            seen += 1
            for sub in ext.get("extension", []) if not rule.drop else []:
                assert sub["url"] in rule.extensions, f"{ext['url']}: {sub['url']}"
    assert seen > 3000
