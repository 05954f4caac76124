"""AE terminology that can be audited (mappings/adverse_events.yaml, SPEC §6.4).

Every emitted code names its evidence (document, version, row) with a confidence no higher than
it; codes without evidence are ``review: true`` and never emitted; every MedDRA coding carries
the MedDRA version, and the MedDRA level is kept in the YAML. Checked on the YAML itself, on
what the loader refuses, and on the AdverseEvents of the synthetic data set.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fhir_adapter.errors import ConfigurationError
from fhir_adapter.generate import generate
from fhir_adapter.intake import Intake
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import validated
from fhir_adapter.trial import Trial, default_mappings_dir, load_trial

LEVELS = ["low", "medium", "high"]
MEDDRA = "https://www.meddra.org"
SNOMED = "http://snomed.info/sct"


@pytest.fixture(scope="module")
def trial() -> Trial:
    return load_trial()


def concept_map() -> dict[str, Any]:
    text = (default_mappings_dir() / "adverse_events.yaml").read_text(encoding="utf-8")
    return dict(yaml.safe_load(text))


def entries() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (token, system, entry[system])
        for token, entry in concept_map()["terms"].items()
        for system in ("snomed", "meddra")
        if system in entry
    ]


@pytest.mark.parametrize(
    ("token", "system", "entry"), entries(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_code_names_its_evidence_or_waits_for_review(
    token: str, system: str, entry: dict[str, Any]
) -> None:
    sources = concept_map()["sources"]
    evidence = entry.get("evidence") or []
    if not entry.get("review"):
        assert evidence, f"{token}.{system}: emitted without evidence"
    for item in evidence:
        assert item["source"] in sources
        assert sources[item["source"]]["document"]
        assert str(item["version"]).strip()
        assert str(item["row"]).strip()
        assert str(entry["code"]) in item["row"]  # the row pairs the code with its meaning
    # no higher than the strongest evidence; without evidence, low
    strongest = max((LEVELS.index(e["strength"]) for e in evidence), default=0)
    assert LEVELS.index(entry["confidence"]) <= strongest
    if system == "meddra":
        assert entry["level"] in {"LLT", "PT"}


def test_ctcae_terms_are_meddra_lowest_level_terms() -> None:
    """The emitted MedDRA codes all come from CTCAE term lists: they are LLTs, said so."""
    emitted = [
        (token, e) for token, system, e in entries() if system == "meddra" and not e.get("review")
    ]
    assert emitted
    for _token, entry in emitted:
        assert entry["level"] == "LLT"
        assert any("CTCAE" in e["row"] for e in entry["evidence"])
    assert concept_map()["meddra_version"]


def _mappings_with(tmp_path: Path, change: Any) -> Path:
    out = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), out)
    data = yaml.safe_load((out / "adverse_events.yaml").read_text(encoding="utf-8"))
    change(data)
    (out / "adverse_events.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return out


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            lambda d: d["terms"]["dryness"]["snomed"].update(confidence="high"),
            "confidence is higher than its evidence",
        ),
        (
            lambda d: d["terms"]["burning"]["snomed"].update(review=False),
            "no evidence: must be review: true",
        ),
        (lambda d: d["terms"]["edema"]["meddra"].pop("level"), "MedDRA level"),
        (
            lambda d: d["terms"]["edema"]["meddra"]["evidence"][0].pop("row"),
            "evidence row missing",
        ),
        (
            lambda d: d["terms"]["edema"]["meddra"]["evidence"][0].update(source="a blog"),
            "unknown source",
        ),
        (lambda d: d.pop("meddra_version"), "meddra_version"),
    ],
)
def test_the_loader_refuses_unaudited_codes(
    tmp_path: Path, trial: Trial, change: Any, reason: str
) -> None:
    with pytest.raises(ConfigurationError, match=reason):
        Terminology(trial, _mappings_with(tmp_path, change))


def test_meddra_codings_carry_the_version(trial: Trial) -> None:
    term = Terminology(trial)
    version = concept_map()["meddra_version"]
    for token in concept_map()["terms"]:
        codes = term.ae_term(token)
        for coding in (*codes.codings, *codes.candidates):
            if coding["system"] == MEDDRA:
                assert coding["version"] == version, token
            else:
                assert "version" not in coding


@pytest.fixture(scope="module")
def synthetic_events(
    trial: Trial, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    data = tmp_path_factory.mktemp("terms") / "data"
    generate(data, with_bad=False)
    events = []
    for version in ("R4", "R5"):
        ctx = MappingContext(trial=trial, terminology=Terminology(trial), fhir_version=version)
        intake = Intake(trial=trial, today=dt.date(2026, 11, 1))
        resources = validated(DatasetMapper(ctx, intake).resources(data), ctx.terminology, version)
        events += [r for r in resources if r["resourceType"] == "AdverseEvent"]
    return events


def test_every_emitted_code_has_evidence_and_every_meddra_coding_a_version(
    synthetic_events: list[dict[str, Any]],
) -> None:
    audited = {
        (SNOMED if system == "snomed" else MEDDRA, str(e["code"]))
        for _, system, e in entries()
        if e.get("evidence") and not e.get("review")
    }
    version = concept_map()["meddra_version"]
    meddra_seen = 0
    for event in synthetic_events:
        concept = event.get("event") or event["code"]
        for coding in concept.get("coding", []):
            if coding["system"] in (SNOMED, MEDDRA):
                assert (coding["system"], coding["code"]) in audited, coding
            if coding["system"] == MEDDRA:
                assert coding["version"] == version
                meddra_seen += 1
    assert meddra_seen  # the set does exercise MedDRA codings
