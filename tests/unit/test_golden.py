"""Golden files: the complete R4 output for two participants, compared byte for byte.

Input: ``tests/golden/input/*.csv`` (written by hand, see ``tests/golden/README.md``).
Expected: ``tests/golden/r4/registry.ndjson`` (the NDJSON of ``fhir-adapter map --format
ndjson``, default registry target) and ``tests/golden/r4/bundles/bundle-000N.json`` (the
transaction Bundles, 30 entries each). The adapter version is pinned to ``GOLDEN_VERSION`` so a
release does not churn the files; the CLI test swaps it for the installed one.

The expected files were produced by the mapper once and then reviewed by hand against SPEC §6;
the hand-checked facts are asserted again below (``test_golden_*``), with the MASI arithmetic
worked out in comments. Regenerate after an intended change with

    UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py

and review the diff (``git diff tests/golden``) before committing it.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fhir_adapter import __version__
from fhir_adapter.cli import cli
from fhir_adapter.intake import Intake
from fhir_adapter.jsonout import dumpb, dumps
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.output import write_bundles
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import validated
from fhir_adapter.trial import Trial, load_trial

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
INPUT = GOLDEN / "input"
EXPECTED = GOLDEN / "r4"
NDJSON = EXPECTED / "registry.ndjson"
BUNDLES = EXPECTED / "bundles"
BUNDLE_SIZE = 30
GOLDEN_VERSION = "0.0.0+golden"
TODAY = dt.date(2026, 11, 1)
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def trial() -> Trial:
    return load_trial()


def map_golden(trial: Trial, target: str = "registry", version: str = "R4") -> list[Resource]:
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial),
        fhir_version=version,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
        adapter_version=GOLDEN_VERSION,
    )
    intake = Intake(trial=trial, today=TODAY)
    resources = list(
        validated(DatasetMapper(ctx, intake).resources(INPUT), ctx.terminology, version)
    )
    assert intake.issues == [], intake.issues  # the golden input is clean: no warning either
    return resources


@pytest.fixture(scope="module")
def golden(trial: Trial) -> list[Resource]:
    return map_golden(trial)


def ndjson(resources: list[Resource]) -> bytes:
    return b"".join(dumpb(r) + b"\n" for r in resources)


def _explain(expected: bytes, actual: bytes, name: str) -> str:
    """A readable diff: the first differing resources, pretty-printed."""
    exp_lines, act_lines = expected.splitlines(), actual.splitlines()
    if len(exp_lines) != len(act_lines):
        head = f"{name}: {len(act_lines)} lines, golden has {len(exp_lines)}\n"
    else:
        head = f"{name}: differs\n"
    pretty_exp = [dumps(json.loads(line), indent=True) for line in exp_lines]
    pretty_act = [dumps(json.loads(line), indent=True) for line in act_lines]
    diff = difflib.unified_diff(
        "\n".join(pretty_exp).splitlines(),
        "\n".join(pretty_act).splitlines(),
        "golden",
        "actual",
        lineterm="",
        n=4,
    )
    text = "\n".join(list(diff)[:120])
    return f"{head}{text}\n(if the change is intended: UPDATE_GOLDEN=1, then review git diff tests/golden)"


def compare(path: Path, actual: bytes) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual)
    assert path.is_file(), f"{path} missing: run with UPDATE_GOLDEN=1"
    expected = path.read_bytes()
    assert actual == expected, _explain(expected, actual, path.name)


# -- byte-for-byte comparisons --------------------------------------------------------------------
def test_ndjson_matches_golden(golden: list[Resource]) -> None:
    compare(NDJSON, ndjson(golden))


def test_r5_ndjson_matches_golden(trial: Trial) -> None:
    """The same two participants in R5 (tests/golden/r5/registry.ndjson), byte for byte."""
    r5 = map_golden(trial, version="R5")
    compare(GOLDEN / "r5" / "registry.ndjson", ndjson(r5))
    by_key = {f"{r['resourceType']}/{r['id']}": r for r in r5}
    # the R5 differences of SPEC §6, on the hand-checked participants
    subject = by_key["ResearchSubject/S001"]
    assert "individual" not in subject
    assert subject["subject"] == {"reference": "Patient/S001"}
    assert subject["progress"][-1]["subjectState"]["coding"][0]["code"] == "withdrawn"
    study = by_key["ResearchStudy/NCT06677931"]
    assert "arm" not in study
    assert [g["linkId"] for g in study["comparisonGroup"]] == ["combo", "laser"]
    assert study["recruitment"]["targetNumber"] == 60
    ae1, ae2 = by_key["AdverseEvent/AE0001"], by_key["AdverseEvent/AE0002"]
    for ae in (ae1, ae2):
        assert "event" not in ae
        assert "severity" not in ae
        assert "code" in ae
    # resolved: completed, the course as occurrencePeriod; ongoing: in-progress, onset only
    assert ae1["status"] == "completed"
    assert ae1["occurrencePeriod"] == {"start": "2025-01-11", "end": "2025-01-14"}
    assert ae2["status"] == "in-progress"
    assert ae2["occurrenceDateTime"] == "2025-04-15"
    # causality only on the suspect (laser), lower-case R5 code, the source word as text
    assert ae1["suspectEntity"] == [
        {
            "instanceReference": {
                "reference": "Device/laser",
                "display": "1565 nm non-ablative fractional laser",
            },
            "causality": {
                "entityRelatedness": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess",
                            "code": "possible",
                            "display": "Possible",
                        }
                    ],
                    "text": "possibly_related",
                }
            },
        }
    ]
    assert all("causality" not in s for s in ae2["suspectEntity"])
    assert ae2["extension"][1] == {
        "url": "urn:nct06677931/StructureDefinition/ae-causality-study-treatment",
        "extension": [{"url": "productRelatedness", "valueString": "unrelated"}],
    }
    # Observations are unchanged between versions
    r4 = {f"{r['resourceType']}/{r['id']}": r for r in map_golden(trial)}
    for key, resource in by_key.items():
        if key.startswith("Observation/"):
            assert resource == r4[key], key


def test_bundles_match_golden(golden: list[Resource], tmp_path: Path) -> None:
    out = tmp_path / "bundles"
    list(write_bundles(iter(golden), out, BUNDLE_SIZE))
    produced = sorted(p.name for p in out.iterdir())
    assert produced == ["bundle-0001.json", "bundle-0002.json", "bundle-0003.json"]
    if UPDATE and BUNDLES.exists():
        for stale in BUNDLES.glob("bundle-*.json"):
            stale.unlink()
    for name in produced:
        compare(BUNDLES / name, (out / name).read_bytes())
    assert sorted(p.name for p in BUNDLES.glob("*.json")) == produced


def test_cli_map_gives_the_golden_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FHIR_ADAPTER_"):
            monkeypatch.delenv(key)
    out = tmp_path / "out.ndjson"
    result = CliRunner().invoke(
        cli, ["map", str(INPUT), "--format", "ndjson", "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    expected = NDJSON.read_bytes()
    expected = expected.replace(
        f'"display":"fhir-adapter {GOLDEN_VERSION}"'.encode(),
        f'"display":"fhir-adapter {__version__}"'.encode(),
    ).replace(
        f'"version":[{{"value":"{GOLDEN_VERSION}"}}]'.encode(),
        f'"version":[{{"value":"{__version__}"}}]'.encode(),
    )
    assert GOLDEN_VERSION.encode() not in expected
    assert out.read_bytes() == expected, _explain(expected, out.read_bytes(), "fhir-adapter map")
    assert out.read_bytes().count(b"\n") == 82


def test_hospital_output_differs_only_in_patients_and_free_text(
    trial: Trial, golden: list[Resource]
) -> None:
    hospital = map_golden(trial, "hospital")
    differ = ("Patient", "AdverseEvent")
    assert [r for r in hospital if r["resourceType"] not in differ] == [
        r for r in golden if r["resourceType"] not in differ
    ]
    # the AEs differ only by the action taken (free text): hospital target only
    mitigating = (
        "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/mitigating-action"
    )
    events = {r["id"]: r for r in hospital if r["resourceType"] == "AdverseEvent"}
    registry_events = {r["id"]: r for r in golden if r["resourceType"] == "AdverseEvent"}
    for ae_id, action in [("AE0001", "none"), ("AE0002", "treatment withdrawn")]:
        ae = events[ae_id]
        (ext,) = [e for e in ae["extension"] if e["url"] == mitigating]
        assert ext["extension"] == [{"url": "item", "valueCodeableConcept": {"text": action}}]
        without = {**ae, "extension": [e for e in ae["extension"] if e["url"] != mitigating]}
        assert without == registry_events[ae_id]
        assert action.encode() not in dumpb(registry_events[ae_id])
    patients = {r["id"]: r for r in hospital if r["resourceType"] == "Patient"}
    assert patients["S001"]["birthDate"] == "1990-05-17"
    assert patients["S002"]["birthDate"] == "1985-11-30"
    assert patients["S001"]["identifier"][1]["system"] == "urn:fhir-adapter:hospital-mrn"
    assert patients["S001"]["identifier"][1]["value"] == "MRN-0001"


# -- the facts checked by hand in the golden output ---------------------------------------------
def _golden_resources() -> dict[str, Resource]:
    out = {}
    for line in NDJSON.read_bytes().splitlines():
        r = json.loads(line, parse_float=Decimal)
        out[f"{r['resourceType']}/{r['id']}"] = r
    return out


@pytest.fixture(scope="module")
def g() -> dict[str, Resource]:
    return _golden_resources()


def _value(r: Resource) -> Decimal:
    return Decimal(r["valueQuantity"]["value"])


def test_golden_inventory(g: dict[str, Resource]) -> None:
    ids = list(g)
    # 82 resources: 9 study-level, 3 per participant, 7 encounters, 4 raters, 30 observations,
    # 21 provenances (one for S002's satisfaction level derived from its estimate),
    # 3 measure reports, 2 adverse events
    assert len(ids) == 82
    assert sum(k.startswith("Observation/") for k in ids) == 30
    assert sum(k.startswith("Provenance/") for k in ids) == 21
    assert "Provenance/S002-m1-satisfaction" in ids
    assert {k for k in ids if k.startswith("Encounter/")} == {
        "Encounter/S001-screening",
        "Encounter/S001-baseline",
        "Encounter/S001-m1",
        "Encounter/S001-m3",
        "Encounter/S002-screening",
        "Encounter/S002-baseline",
        "Encounter/S002-m1",
    }
    # pinned identifier values (SPEC §6), system urn:nct06677931:<kind>
    for kind, value in [
        ("Patient", "S001"),
        ("ResearchSubject", "S001"),
        ("Encounter", "S001-m3"),
        ("Observation", "S001-m3-masi-R1"),
        ("Observation", "S001-m3-masi"),
        ("Observation", "S001-m3-mmasi"),
        ("Observation", "S001-m3-masi-improvement"),
        ("Observation", "S001-m3-pga"),
        ("Observation", "S001-m1-satisfaction"),
        ("Observation", "S001-eligibility"),
        ("AdverseEvent", "AE0001"),
    ]:
        r = g[f"{kind}/{value}"]
        ident = r["identifier"] if isinstance(r["identifier"], dict) else r["identifier"][0]
        system = {"ResearchSubject": "research-subject", "AdverseEvent": "adverse-event"}.get(
            kind, kind.lower()
        )
        assert ident == {"system": f"urn:nct06677931:{system}", "value": value}
    assert g["AdverseEvent/AE0001"]["meta"]["tag"] == [
        {"system": "urn:nct06677931:adverse-event", "code": "AE0001"}
    ]
    study = g["ResearchStudy/NCT06677931"]
    assert study["identifier"][0] == {
        "system": "https://clinicaltrials.gov/nctid",
        "value": "NCT06677931",
    }
    assert study["phase"]["coding"][0]["code"] == "n-a"
    assert study["primaryPurposeType"]["coding"][0]["code"] == "treatment"
    assert {c["code"] for c in study["condition"][0]["coding"]} == {"36209000", "L81.1"}
    # no improvement at baseline; S001 has no m2 at all
    assert "Observation/S001-baseline-masi-improvement" not in g
    assert "Observation/S002-baseline-masi-improvement" not in g


def test_golden_rater_masi(g: dict[str, Resource]) -> None:
    # MASI = 0.3(Df+Hf)Af + 0.3(Dmr+Hmr)Amr + 0.3(Dml+Hml)Aml + 0.1(Dc+Hc)Ac
    expected = {
        # S001 baseline R1 (2,2,3 | 3,3,4 | 3,3,4 | 1,1,2): 0.3*4*3 + 0.3*6*4 + 0.3*6*4 + 0.1*2*2
        #   = 3.6 + 7.2 + 7.2 + 0.4 = 18.4
        "S001-baseline-masi-R1": "18.4",
        # R2 (2,2,3 | 3,2,4 | 3,3,4 | 1,1,2): 3.6 + 0.3*5*4 + 7.2 + 0.4 = 3.6 + 6.0 + 7.2 + 0.4 = 17.2
        "S001-baseline-masi-R2": "17.2",
        # S001 m1 R1 (2,2,2 | 2,2,3 | 2,2,3 | 1,1,1): 0.3*4*2 + 0.3*4*3 + 0.3*4*3 + 0.1*2*1
        #   = 2.4 + 3.6 + 3.6 + 0.2 = 9.8
        "S001-m1-masi-R1": "9.8",
        # R2 (2,1,2 | 2,2,3 | 2,2,3 | 1,1,1): 0.3*3*2 + 3.6 + 3.6 + 0.2 = 1.8 + 7.2 + 0.2 = 9.2
        "S001-m1-masi-R2": "9.2",
        # S001 m3 R1 (1,1,2 | 2,1,2 | 2,1,2 | 0,0,0): 0.3*2*2 + 0.3*3*2 + 0.3*3*2 + 0 = 1.2+1.8+1.8 = 4.8
        "S001-m3-masi-R1": "4.8",
        # R2 (2,2,2 | 2,2,3 | 2,2,3 | 1,1,1): as S001 m1 R1 = 9.8
        "S001-m3-masi-R2": "9.8",
        # R3 (1,1,2 | 2,2,2 | 2,1,2 | 0,0,0): 1.2 + 0.3*4*2 + 1.8 + 0 = 1.2 + 2.4 + 1.8 = 5.4
        "S001-m3-masi-R3": "5.4",
        # S002 baseline R2 (3,3,4 | 3,3,4 | 3,3,4 | 2,2,2): 3 * 0.3*6*4 + 0.1*4*2 = 21.6 + 0.8 = 22.4
        "S002-baseline-masi-R2": "22.4",
        # R4 (3,2,4 | 3,3,4 | 3,3,4 | 2,2,2): 0.3*5*4 + 7.2 + 7.2 + 0.8 = 6.0 + 14.4 + 0.8 = 21.2
        "S002-baseline-masi-R4": "21.2",
        # S002 m1 R2 (3,3,3 | 3,3,4 | 3,2,4 | 2,2,2): 0.3*6*3 + 0.3*6*4 + 0.3*5*4 + 0.8
        #   = 5.4 + 7.2 + 6.0 + 0.8 = 19.4
        "S002-m1-masi-R2": "19.4",
        # R4 (3,3,3 | 3,3,3 | 3,2,4 | 2,2,2): 5.4 + 0.3*6*3 + 6.0 + 0.8 = 5.4 + 5.4 + 6.0 + 0.8 = 17.6
        "S002-m1-masi-R4": "17.6",
    }
    for rid, value in expected.items():
        obs = g[f"Observation/{rid}"]
        assert _value(obs) == Decimal(value), rid
        assert obs["status"] == "final"
        assert obs["performer"] == [{"reference": f"Practitioner/{rid.rsplit('-', 1)[1]}"}]
        assert [c["code"]["coding"][0]["code"] for c in obs["component"]][:3] == [
            "forehead-darkness",
            "forehead-homogeneity",
            "forehead-area",
        ]
        assert len(obs["component"]) == 12
    assert [c["valueInteger"] for c in g["Observation/S001-m3-masi-R3"]["component"]] == [
        1,
        1,
        2,
        2,
        2,
        2,
        2,
        1,
        2,
        0,
        0,
        0,
    ]


def test_golden_consensus(g: dict[str, Resource]) -> None:
    def consensus(rid: str) -> tuple[Decimal, str, str, list[str], bool, str]:
        obs = g[f"Observation/{rid}"]
        return (
            _value(obs),
            obs["status"],
            obs["method"]["coding"][0]["code"],
            [d["reference"].rsplit("-", 1)[1] for d in obs["derivedFrom"]],
            obs["component"][0]["valueBoolean"],
            obs["effectiveDateTime"],
        )

    # S001 baseline: |18.4 - 17.2| = 1.2 <= 3 -> mean 17.8, final
    # mMASI R1 0.3*2*3 + 0.3*3*4 + 0.3*3*4 + 0.1*1*2 = 1.8+3.6+3.6+0.2 = 9.2; R2 the same (D only) -> 9.2
    assert consensus("S001-baseline-masi") == (
        Decimal("17.8"),
        "final",
        "mean-of-2",
        ["R1", "R2"],
        False,
        "2025-01-10",
    )
    assert consensus("S001-baseline-mmasi")[:4] == (
        Decimal("9.2"),
        "final",
        "mean-of-2",
        ["R1", "R2"],
    )
    # S001 m1: (9.8 + 9.2) / 2 = 9.5; mMASI R1 = R2 = 0.3*2*2 + 0.3*2*3*2 + 0.1*1*1 = 1.2+3.6+0.1 = 4.9
    assert consensus("S001-m1-masi") == (
        Decimal("9.5"),
        "final",
        "mean-of-2",
        ["R1", "R2"],
        False,
        "2025-02-09",
    )
    assert consensus("S001-m1-mmasi")[0] == Decimal("4.9")
    # S001 m3, three raters 4.8 / 9.8 / 5.4: pairs |R1-R2| = 5.0, |R1-R3| = 0.6, |R2-R3| = 4.4
    # -> closest R1 + R3, (4.8 + 5.4) / 2 = 5.1, final; dated by the later of the two (R3, 04-12)
    # mMASI R1 = 0.3*1*2 + 0.3*2*2 + 0.3*2*2 = 3.0, R3 = 3.0 -> 3.0 (R2's 4.9 not used)
    assert consensus("S001-m3-masi") == (
        Decimal("5.1"),
        "final",
        "closest-2-of-3",
        ["R1", "R3"],
        False,
        "2025-04-12",
    )
    assert consensus("S001-m3-mmasi")[:4] == (
        Decimal("3.0"),
        "final",
        "closest-2-of-3",
        ["R1", "R3"],
    )
    # S002 baseline: (22.4 + 21.2) / 2 = 21.8; mMASI 3 * 0.3*3*4 + 0.1*2*2 = 10.8 + 0.4 = 11.2 (both)
    assert consensus("S002-baseline-masi") == (
        Decimal("21.8"),
        "final",
        "mean-of-2",
        ["R2", "R4"],
        False,
        "2025-02-06",
    )
    assert consensus("S002-baseline-mmasi")[0] == Decimal("11.2")
    # S002 m1: |19.4 - 17.6| = 1.8 -> (19.4 + 17.6) / 2 = 18.5
    # mMASI R2 0.3*3*3 + 0.3*3*4 + 0.3*3*4 + 0.1*2*2 = 2.7+3.6+3.6+0.4 = 10.3, R4 2.7+2.7+3.6+0.4 = 9.4
    # -> (10.3 + 9.4) / 2 = 9.85
    assert consensus("S002-m1-masi") == (
        Decimal("18.5"),
        "final",
        "mean-of-2",
        ["R2", "R4"],
        False,
        "2025-03-08",
    )
    assert consensus("S002-m1-mmasi")[0] == Decimal("9.85")
    prov = g["Provenance/S001-m3-masi"]
    assert [e["what"]["reference"] for e in prov["entity"]] == [
        "Observation/S001-m3-masi-R1",
        "Observation/S001-m3-masi-R3",
    ]
    assert prov["recorded"] == "2025-04-12T00:00:00+08:00"
    assert prov["target"] == [{"reference": "Observation/S001-m3-masi"}]


def test_golden_improvement_and_pga(g: dict[str, Resource]) -> None:
    # S001 m1: (17.8 - 9.5) / 17.8 * 100 = 46.629... -> 46.6 %, implied PGA 4 ([25, 50))
    # S001 m3: (17.8 - 5.1) / 17.8 * 100 = 71.348... -> 71.3 %, implied PGA 3 ([50, 75))
    # S002 m1: (21.8 - 18.5) / 21.8 * 100 = 15.137... -> 15.1 %, implied PGA 5 ([0, 25))
    for rid, value in [("S001-m1", "46.6"), ("S001-m3", "71.3"), ("S002-m1", "15.1")]:
        obs = g[f"Observation/{rid}-masi-improvement"]
        assert _value(obs) == Decimal(value)
        assert obs["valueQuantity"]["code"] == "%"
        assert obs["valueQuantity"]["system"] == "http://unitsofmeasure.org"
        subject = rid.split("-")[0]
        assert [d["reference"] for d in obs["derivedFrom"]] == [
            f"Observation/{subject}-baseline-masi",
            f"Observation/{rid}-masi",
        ]

    def pga(rid: str) -> tuple[int, str, str, bool]:
        obs = g[f"Observation/{rid}-pga"]
        c = {x["code"]["coding"][0]["code"]: x for x in obs["component"]}
        return (
            obs["valueInteger"],
            c["pga-grade"]["valueCodeableConcept"]["coding"][0]["code"],
            c["pga-from-masi"]["valueCodeableConcept"]["coding"][0]["code"],
            c["pga-discordant"]["valueBoolean"],
        )

    # S001 m3: physician says 1 (almost clear), MASI implies 3: |1 - 3| = 2 -> discordant
    assert pga("S001-m3") == (1, "pga-1", "pga-3", True)
    assert g["Observation/S001-m3-pga"]["performer"] == [{"reference": "Practitioner/R3"}]
    # S002 m1: physician 5, MASI implies 5 -> concordant
    assert pga("S002-m1") == (5, "pga-5", "pga-5", False)


def test_golden_participants_satisfaction_and_events(g: dict[str, Resource]) -> None:
    s1, s2 = g["ResearchSubject/S001"], g["ResearchSubject/S002"]
    assert (s1["status"], s1["period"]) == (
        "withdrawn",
        {"start": "2025-01-05", "end": "2025-04-20"},
    )
    assert (s2["status"], s2["period"]) == ("on-study", {"start": "2025-02-04"})
    assert s1["assignedArm"] == "UC-MSC exosomes + 1565 nm NAFL"
    assert s2["assignedArm"] == "1565 nm NAFL alone"
    assert g["Consent/S001"]["status"] == "inactive"
    assert g["Consent/S002"]["status"] == "active"
    assert g["Patient/S001"] == {
        "resourceType": "Patient",
        "id": "S001",
        "meta": {"tag": [{"system": "urn:nct06677931:patient", "code": "S001"}]},
        "identifier": [{"system": "urn:nct06677931:patient", "value": "S001"}],
        "gender": "female",
    }
    elig = g["Observation/S002-eligibility"]
    assert elig["valueCodeableConcept"]["coding"][0]["code"] == "eligible"
    assert [c["code"]["coding"][0]["code"] for c in elig["component"]] == [
        *(f"I{i}" for i in range(1, 6)),
        *(f"E{i}" for i in range(1, 15)),
    ]
    # satisfaction: S001 very satisfied (given); S002 only estimated 30 % -> average ([25, 50))
    assert (
        g["Observation/S001-m1-satisfaction"]["valueCodeableConcept"]["coding"][0]["code"]
        == "very_satisfied"
    )
    s2sat = g["Observation/S002-m1-satisfaction"]
    assert s2sat["valueCodeableConcept"]["coding"][0]["code"] == "average"
    assert s2sat["component"][0]["valueQuantity"]["value"] == 30
    # m1 rates: all arms 1 of 2 = 50 %, combo 1 of 1 = 100 %, laser 0 of 1 = 0 %
    for rid, num, den, rate in [
        ("all", 1, 2, "50.0"),
        ("combo", 1, 1, "100.0"),
        ("laser", 0, 1, "0.0"),
    ]:
        group = g[f"MeasureReport/satisfaction-m1-{rid}"]["group"][0]
        assert [p["count"] for p in group["population"]] == [num, den]
        assert Decimal(group["measureScore"]["value"]) == Decimal(rate)
    # AE0001 burning: no SNOMED CT / MedDRA code (both candidates are review: true, no
    # published evidence), only the protocol's term in the trial code system; grade
    # 2 -> moderate, recovered -> resolved; suspect laser (combo arm): the causality
    # (possibly_related -> Possible) on the laser Device only, the source word kept
    ae1 = g["AdverseEvent/AE0001"]
    assert ae1["event"] == {
        "coding": [
            {"system": "urn:nct06677931:codes", "code": "burning", "display": "Burning sensation"}
        ],
        "text": "Burning sensation",
    }
    assert ae1["seriousness"]["coding"][0]["code"] == "Non-serious"
    assert [c["code"] for c in ae1["severity"]["coding"]] == ["moderate", "2"]
    assert ae1["outcome"]["coding"][0]["code"] == "resolved"
    assert ae1["suspectEntity"] == [
        {
            "instance": {
                "reference": "Device/laser",
                "display": "1565 nm non-ablative fractional laser",
            },
            "causality": [
                {
                    "assessment": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess",
                                "code": "Possible",
                                "display": "Possible",
                            }
                        ]
                    },
                    "productRelatedness": "possibly_related",
                }
            ],
        }
    ]
    # its course: onset in `date`, resolved 2025-01-14 in the AE Research Backport extension
    assert ae1["extension"] == [
        {
            "url": "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/resolve-date",
            "valueDateTime": "2025-01-14",
        }
    ]
    assert ae1["encounter"] == {"reference": "Encounter/S001-m1"}
    # ... recorded at m1, whose Encounter still starts on its first MASI (2025-02-09), not on
    # the AE's onset (2025-01-11)
    assert g["Encounter/S001-m1"]["period"] == {"start": "2025-02-09"}
    # AE0002 irritation: no external code (the only candidate needs review), the trial term
    # code and the text; grade 3 ->
    # severe, serious -> Serious, not recovered -> ongoing (no course extension); no suspect
    # stated: both interventions of the combo arm, neither with causality, and the one judgement
    # (unrelated -> no WHO-UMC code) in the trial extension; no visit
    ae2 = g["AdverseEvent/AE0002"]
    assert ae2["event"] == {
        "coding": [
            {"system": "urn:nct06677931:codes", "code": "irritation", "display": "Skin irritation"}
        ],
        "text": "Skin irritation",
    }
    assert ae2["seriousness"]["coding"][0]["code"] == "Serious"
    assert [c["code"] for c in ae2["severity"]["coding"]] == ["severe", "3"]
    assert ae2["outcome"]["coding"][0]["code"] == "ongoing"
    assert [s["instance"]["reference"] for s in ae2["suspectEntity"]] == [
        "Substance/exosomes",
        "Device/laser",
    ]
    assert all("causality" not in s for s in ae2["suspectEntity"])
    assert ae2["extension"] == [
        {
            "url": "urn:nct06677931/StructureDefinition/ae-causality-study-treatment",
            "extension": [{"url": "productRelatedness", "valueString": "unrelated"}],
        }
    ]
    assert "encounter" not in ae2
    # free text of the source (action_taken) stays out of the registry output
    assert b"treatment withdrawn" not in NDJSON.read_bytes()
