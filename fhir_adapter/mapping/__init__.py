"""Domain -> FHIR (SPEC §6): pure builders per resource type, R4 and R5 kept apart.

- :mod:`.common`: builders identical in R4 and R5 (Observation, Patient, …);
- :mod:`.r4`, :mod:`.r5`: the resources whose shape differs;
- :mod:`.dataset`: a directory of source files to resources, in dependency order;
- :mod:`.validation`: structure (fhir.resources) and value-set checks;
- :mod:`.output`: NDJSON and transaction Bundle writers.
"""

from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.mapping.terminology import Terminology

__all__ = ["MappingContext", "Resource", "Terminology"]
