"""What the pure mapping functions need besides the record: trial, codes, identity, target."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal
from zoneinfo import ZoneInfo

from fhir_adapter import __version__
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.trial import Trial

Resource = dict[str, Any]
FhirVersion = Literal["R4", "R5"]
Target = Literal["registry", "hospital"]

_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# Kind of business identifier per resource type: system = "<base>:<kind>" (SPEC §6)
IDENTIFIER_KIND: dict[str, str] = {
    "Patient": "patient",
    "ResearchSubject": "research-subject",
    "Consent": "consent",
    "Encounter": "encounter",
    "Observation": "observation",
    "AdverseEvent": "adverse-event",
    "Practitioner": "practitioner",
    "ResearchStudy": "research-study",
    "Organization": "organization",
    "Location": "location",
    "Group": "group",
    "Substance": "substance",
    "Device": "device",
    "CodeSystem": "codesystem",
    "Measure": "measure",
    "MeasureReport": "measure-report",
    "Provenance": "provenance",
}


@dataclass(frozen=True)
class MappingContext:
    trial: Trial
    terminology: Terminology
    identifier_base: str = "urn:nct06677931"
    fhir_version: FhirVersion = "R4"
    target: Target = "registry"
    mrn_system: str = "urn:fhir-adapter:hospital-mrn"
    timezone: str = "Asia/Shanghai"
    adapter_version: str = __version__

    # -- identity ----------------------------------------------------------------------------
    def system(self, resource_type: str) -> str:
        return f"{self.identifier_base}:{IDENTIFIER_KIND[resource_type]}"

    def identifier(self, resource_type: str, value: str) -> dict[str, str]:
        return {"system": self.system(resource_type), "value": value}

    def tag(self, resource_type: str, value: str) -> dict[str, str]:
        """The business key as a meta.tag: searchable with _tag where identifier is not."""
        return {"system": self.system(resource_type), "code": value}

    @staticmethod
    def resource_id(value: str) -> str:
        """Deterministic FHIR id: the business value itself when it is a valid id."""
        if _FHIR_ID.match(value):
            return value
        return uuid.uuid5(uuid.NAMESPACE_URL, value).hex

    @staticmethod
    def ref(resource_type: str, value: str, display: str | None = None) -> dict[str, str]:
        reference = {"reference": f"{resource_type}/{MappingContext.resource_id(value)}"}
        if display:
            reference["display"] = display
        return reference

    def base(self, resource_type: str, value: str, *, tag: bool = True) -> Resource:
        """resourceType, id, meta.tag (the business key) and identifier (where the type has one)."""
        resource: Resource = {"resourceType": resource_type, "id": self.resource_id(value)}
        if tag:
            resource["meta"] = {"tag": [self.tag(resource_type, value)]}
        if resource_type != "Provenance":
            resource["identifier"] = [self.identifier(resource_type, value)]
        return resource

    # -- time ----------------------------------------------------------------------------
    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def instant(self, day: dt.date) -> str:
        """A site-local date as an instant (start of that day at the site)."""
        moment = dt.datetime.combine(day, dt.time(0, 0), tzinfo=self.zone)
        return moment.isoformat()

    # -- study-level values ----------------------------------------------------------------
    @property
    def study_value(self) -> str:
        return self.trial.study.nct_id

    @property
    def study_ref(self) -> dict[str, str]:
        return self.ref("ResearchStudy", self.study_value)

    def study_extension(self) -> dict[str, Any]:
        return {
            "url": "http://hl7.org/fhir/StructureDefinition/workflow-researchStudy",
            "valueReference": self.study_ref,
        }
