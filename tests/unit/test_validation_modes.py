"""Fast and strict validation: the same verdict and the same bytes (SPEC §6, issue 15).

Strict runs every resource through its fhir.resources model; fast runs each resource *shape*
through it once and then every value through its element's own validator. On the whole
synthetic set both pass every resource (strict: each one proven valid FHIR, R4 and R5) and
write the same bytes; a resource broken in a variable part - an id, a date, a code, a string,
a reference - after its shape was proven fails in fast mode as in strict mode.
"""

from __future__ import annotations

import copy
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.generate import generate
from fhir_adapter.intake import Intake
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import InvalidResource, ResourceValidator
from fhir_adapter.trial import Trial

TODAY = dt.date(2026, 11, 1)
GOLDEN_INPUT = Path(__file__).resolve().parent.parent / "golden" / "input"
Resource = dict[str, Any]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, n_participants=60, with_bad=False, today=TODAY)
    return out


def mapped(trial: Trial, directory: Path, version: str, target: str) -> list[Resource]:
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial),
        fhir_version=version,  # type: ignore[arg-type]
        target=target,  # type: ignore[arg-type]
    )
    return list(DatasetMapper(ctx, Intake(trial=trial, today=TODAY)).resources(directory))


def checked(resources: list[Resource], validator: ResourceValidator) -> bytes:
    out = []
    for resource in resources:
        validator.check(resource)
        out.append(dumpb(resource) + b"\n")
    return b"".join(out)


@pytest.mark.parametrize(
    ("version", "target"), [("R4", "registry"), ("R5", "registry"), ("R4", "hospital")]
)
def test_whole_synthetic_set_strict_and_fast_agree(
    trial: Trial, synthetic: Path, version: str, target: str
) -> None:
    resources = mapped(trial, synthetic, version, target)
    assert len(resources) > 6000
    strict = ResourceValidator(Terminology(trial), version, strict=True)
    fast = ResourceValidator(Terminology(trial), version)
    strict_bytes = checked(resources, strict)  # every resource through its fhir.resources model
    fast_bytes = checked(resources, fast)
    assert fast_bytes == strict_bytes
    assert strict.models_run == len(resources)
    # fast: each shape once through the model, none of them left to whole validation
    assert fast.models_run == len(fast.shapes) < 100
    assert None not in fast.shapes.values()


def test_cli_map_fast_and_strict_write_the_same_bytes(synthetic: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fhir_adapter.cli import cli

    outputs = []
    for flag in ("--no-strict", "--strict"):
        out = tmp_path / f"{flag}.ndjson"
        result = CliRunner().invoke(
            cli, ["map", str(synthetic), "--format", "ndjson", "--out", str(out), flag]
        )
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert outputs[0].count(b"\n") > 6000


@pytest.fixture(scope="module")
def proven(trial: Trial) -> tuple[ResourceValidator, list[Resource]]:
    """A fast validator that has seen (and proven) every shape of the golden output."""
    resources = mapped(trial, GOLDEN_INPUT, "R4", "registry")
    validator = ResourceValidator(Terminology(trial), "R4")
    for resource in resources:
        validator.check(resource)
    return validator, resources


def first(resources: list[Resource], resource_type: str, key: str) -> Resource:
    return copy.deepcopy(
        next(r for r in resources if r["resourceType"] == resource_type and key in r)
    )


BROKEN = [
    ("Patient", lambda r: r.update(id="S 001"), "id"),
    ("Patient", lambda r: r["identifier"][0].update(value=""), "value"),
    ("Patient", lambda r: r["meta"]["tag"][0].update(code="S001  x"), "code"),
    ("Observation", lambda r: r.update(effectiveDateTime="2025-02-30"), "effectiveDateTime"),
    ("Observation", lambda r: r.update(effectiveDateTime="2025-01-03T10:00:00"), "effective"),
    ("Observation", lambda r: r["code"]["coding"][0].update(display=""), "display"),
    ("Encounter", lambda r: r["period"].update(start="03/01/2025"), "start"),
]


@pytest.mark.parametrize(("resource_type", "breaks", "where"), BROKEN)
def test_a_broken_value_of_a_proven_shape_fails_fast_as_strict(
    trial: Trial,
    proven: tuple[ResourceValidator, list[Resource]],
    resource_type: str,
    breaks: Any,
    where: str,
) -> None:
    validator, resources = proven
    key = "period" if resource_type == "Encounter" else "id"
    resource = first(resources, resource_type, key)
    shapes = len(validator.shapes)
    breaks(resource)
    strict = ResourceValidator(Terminology(trial), "R4", strict=True)
    with pytest.raises(InvalidResource, match=where):
        strict.check(resource)
    with pytest.raises(InvalidResource, match=where):
        validator.check(resource)
    assert len(validator.shapes) == shapes  # the shape was known: the values caught it


def test_a_reference_not_type_slash_id_fails(
    proven: tuple[ResourceValidator, list[Resource]],
) -> None:
    validator, resources = proven
    resource = first(resources, "Observation", "subject")
    resource["subject"]["reference"] = "Patient/S 001"
    with pytest.raises(InvalidResource, match="Type/id"):
        validator.check(resource)


def test_a_new_shape_is_validated_whole(
    proven: tuple[ResourceValidator, list[Resource]],
) -> None:
    validator, resources = proven
    unknown = first(resources, "Patient", "id")
    unknown["colour"] = "blue"  # not an element of Patient
    with pytest.raises(InvalidResource, match="colour"):
        validator.check(unknown)
    wrong_type = first(resources, "Organization", "active")
    wrong_type["active"] = "maybe"  # a string where a boolean goes: another shape
    with pytest.raises(InvalidResource, match="active"):
        validator.check(wrong_type)
    decimal = first(resources, "Observation", "valueQuantity")
    decimal["valueQuantity"]["value"] = Decimal("NaN")
    with pytest.raises(InvalidResource):
        validator.check(decimal)


def test_a_code_outside_its_value_set_fails_in_both_modes(
    trial: Trial, proven: tuple[ResourceValidator, list[Resource]]
) -> None:
    validator, resources = proven
    resource = first(resources, "Observation", "status")
    resource["status"] = "registered-ish"
    for mode in (validator, ResourceValidator(Terminology(trial), "R4", strict=True)):
        with pytest.raises(InvalidResource, match="value set"):
            mode.check(resource)
