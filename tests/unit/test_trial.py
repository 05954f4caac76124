"""The trial definition is data, loaded and validated at start-up (SPEC §2)."""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fhir_adapter.cli import cli
from fhir_adapter.errors import ConfigurationError
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.trial import Trial, default_mappings_dir, load_trial


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), target)
    return target


def _edit(directory: Path, name: str, change: object) -> None:
    path = directory / name
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def test_packaged_trial(trial: Trial) -> None:
    assert trial.study.nct_id == "NCT06677931"
    assert trial.study.target_enrollment == 60
    assert trial.visit_ids == ("baseline", *(f"m{k}" for k in range(1, 9)))
    assert [v.offset_days for v in trial.visits[1:]] == [30 * k for k in range(1, 9)]
    assert trial.window("m3") == (83, 97)  # 90 +- 7 days
    assert trial.adjudication_threshold == Decimal("3.0")
    assert sorted(trial.arm_ids) == ["combo", "laser"]
    assert [c.id for c in trial.criteria] == [
        *(f"I{i}" for i in range(1, 6)),
        *(f"E{i}" for i in range(1, 15)),
    ]


def test_missing_key_is_named(tmp_path: Path) -> None:
    mappings = _copy(tmp_path)
    _edit(mappings, "study.yaml", lambda d: d["study"].pop("title"))
    with pytest.raises(ConfigurationError, match=r"study\.yaml: study\.title: Field required"):
        load_trial(mappings)


def test_wrong_type_and_duplicates_are_named(tmp_path: Path) -> None:
    mappings = _copy(tmp_path)
    _edit(mappings, "study.yaml", lambda d: d.__setitem__("adjudication_threshold", "three"))
    with pytest.raises(ConfigurationError, match="adjudication_threshold"):
        load_trial(mappings)
    mappings = _copy(tmp_path / "b")
    _edit(mappings, "study.yaml", lambda d: d["arms"].append(dict(d["arms"][0])))
    with pytest.raises(ConfigurationError, match="duplicate arms: combo"):
        load_trial(mappings)


def test_broken_yaml_syntax(tmp_path: Path) -> None:
    mappings = _copy(tmp_path)
    (mappings / "study.yaml").write_text("study: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_trial(mappings)


def test_arms_are_data(tmp_path: Path) -> None:
    """A deployment renames or adds arms without code changes."""
    mappings = _copy(tmp_path)

    def add_arm(d: dict[str, list[dict[str, object]]]) -> None:
        d["arms"].append({**d["arms"][1], "id": "sham", "name": "Sham"})

    _edit(mappings, "study.yaml", add_arm)
    trial = load_trial(mappings)
    assert "sham" in trial.arm_ids
    assert "arm-sham" in Terminology(trial, mappings).concepts


def test_terminology_names_missing_ae_terms(tmp_path: Path, trial: Trial) -> None:
    mappings = _copy(tmp_path)
    _edit(mappings, "adverse_events.yaml", lambda d: d["terms"].pop("edema"))
    with pytest.raises(ConfigurationError, match="terms: missing edema"):
        Terminology(trial, mappings)


def test_cli_reports_a_broken_mapping_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mappings = _copy(tmp_path)
    _edit(mappings, "study.yaml", lambda d: d["visits"][1].pop("offset_days"))
    monkeypatch.setenv("FHIR_ADAPTER_MAPPINGS_DIR", str(mappings))
    masi = tmp_path / "masi.csv"
    masi.write_text("subject_id\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["score", str(masi)])
    assert result.exit_code == 66
    assert "visits.1.offset_days: Field required" in result.output
    assert "Traceback" not in result.output


def test_mrn_system_may_not_lie_under_the_trial_base(tmp_path: Path) -> None:
    import pydantic

    from fhir_adapter.settings import Settings

    with pytest.raises(pydantic.ValidationError, match="mrn_system must not lie under"):
        Settings(mrn_system="urn:nct06677931:mrn")
    assert Settings(mrn_system="urn:oid:1.2.156.1").mrn_system == "urn:oid:1.2.156.1"
