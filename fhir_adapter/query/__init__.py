"""Registry queries (SPEC §9): the trial's SQL-on-FHIR views, run embedded or on Spark.

The Python API::

    from fhir_adapter.query import NdjsonSource, registry_tables, run_view, trial_views

    tables = registry_tables(NdjsonSource([Path("export/")]))   # every view + registry table
    tables.rows("ae_incidence")                                 # list of dicts
    tables.relation("outcomes_by_arm_visit")                    # a DuckDB relation
    run_view(trial_views()[0], ServerSource(FhirClient(settings, url)))  # rows of one view

The Spark engine (``fhir_adapter.query.spark``) needs the ``spark`` extra and is imported on
demand only.
"""

from fhir_adapter.query.engine import run_view, run_views, table_rows
from fhir_adapter.query.registry import (
    RegistryTables,
    load_view,
    registry_tables,
    tables_from_views,
    trial_views,
)
from fhir_adapter.query.sources import NdjsonSource, ServerSource, Source
from fhir_adapter.query.viewdef import View, ViewDefinitionError, compile_view

__all__ = [
    "NdjsonSource",
    "RegistryTables",
    "ServerSource",
    "Source",
    "View",
    "ViewDefinitionError",
    "compile_view",
    "load_view",
    "registry_tables",
    "run_view",
    "run_views",
    "table_rows",
    "tables_from_views",
    "trial_views",
]
