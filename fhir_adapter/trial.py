"""The trial definition (``mappings/study.yaml``) loaded and validated at start-up (SPEC §2).

A broken YAML file is a :class:`ConfigurationError` naming the file and the key, never a
traceback.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fhir_adapter.errors import ConfigurationError

_PACKAGED = Path(__file__).parent / "mappings"
_SOURCE_TREE = Path(__file__).parent.parent / "mappings"


def default_mappings_dir() -> Path:
    """The mappings shipped in the installed package, or the source tree's when run from it."""
    return _PACKAGED if _PACKAGED.is_dir() else _SOURCE_TREE


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Site(_Model):
    id: str
    name: str
    city: str
    state: str | None = None
    postal_code: str | None = None
    country: str


class Condition(_Model):
    text: str


class StudyInfo(_Model):
    nct_id: str
    org_study_id: str | None = None
    title: str
    sponsor: str
    registry_status: str
    fhir_status_r4: str
    fhir_status_r5: str
    phase: str
    primary_purpose: str
    design: str
    target_enrollment: int
    start_date: dt.date | None = None
    condition: Condition
    sites: list[Site]
    timezone: str


class Arm(_Model):
    id: str
    name: str
    description: str
    type: str
    interventions: list[str]


class Intervention(_Model):
    id: str
    kind: Literal["substance", "device"]
    name: str


class Visit(_Model):
    id: str
    label: str
    offset_days: int
    window_before_days: int | None = None
    window_after_days: int | None = None


class Check(_Model):
    rule: Literal["age_between", "consent_on_or_before_screening"]
    min_years: int | None = None
    max_years: int | None = None


class Criterion(_Model):
    id: str
    kind: Literal["inclusion", "exclusion"]
    column: str
    text: str
    text_verbatim: bool = True
    checks: list[Check] = Field(default_factory=list)


PositiveDecimal = Annotated[Decimal, Field(ge=0)]


class Trial(_Model):
    """Everything the adapter knows about the trial, as loaded from ``study.yaml``."""

    schema_version: int
    study: StudyInfo
    arms: list[Arm]
    interventions: list[Intervention]
    visit_window_days: int = Field(ge=0)
    visits: list[Visit]
    adjudication_threshold: PositiveDecimal
    criteria: list[Criterion]

    @model_validator(mode="after")
    def _check_references(self) -> Trial:
        for name, ids in (
            ("arms", [a.id for a in self.arms]),
            ("visits", [v.id for v in self.visits]),
            ("criteria", [c.id for c in self.criteria]),
            ("criteria.column", [c.column for c in self.criteria]),
            ("interventions", [i.id for i in self.interventions]),
        ):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                raise ValueError(f"duplicate {name}: {', '.join(dupes)}")
        known = {i.id for i in self.interventions}
        for arm in self.arms:
            unknown = [i for i in arm.interventions if i not in known]
            if unknown:
                raise ValueError(f"arm {arm.id} names unknown interventions: {', '.join(unknown)}")
        return self

    @cached_property
    def visit_ids(self) -> tuple[str, ...]:
        return tuple(v.id for v in self.visits)

    @cached_property
    def visit_order(self) -> dict[str, int]:
        return {v.id: i for i, v in enumerate(self.visits)}

    @cached_property
    def baseline_visit(self) -> str:
        """The first visit is the baseline: the one improvement is measured against."""
        return self.visits[0].id

    @cached_property
    def arm_ids(self) -> frozenset[str]:
        return frozenset(a.id for a in self.arms)

    def visit(self, visit_id: str) -> Visit:
        return self.visits[self.visit_order[visit_id]]

    def window(self, visit_id: str) -> tuple[int, int]:
        """(earliest, latest) day offset from the first treatment for a visit."""
        v = self.visit(visit_id)
        before = self.visit_window_days if v.window_before_days is None else v.window_before_days
        after = self.visit_window_days if v.window_after_days is None else v.window_after_days
        return v.offset_days - before, v.offset_days + after


def _load_yaml(path: Path) -> object:
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: mapping file not found") from exc
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc.__class__.__name__})") from exc


def describe_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem, naming the key path; never the offending value."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{source}: {loc}: {err['msg']}")
    return "\n".join(parts)


def load_trial(mappings_dir: Path | None = None) -> Trial:
    path = (mappings_dir or default_mappings_dir()) / "study.yaml"
    data = _load_yaml(path)
    try:
        return Trial.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(str(path), exc)) from None
