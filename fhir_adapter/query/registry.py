"""The trial's views and registry tables (SPEC §9), as a Python API.

- :func:`trial_views` loads ``mappings/views/*.json`` and sets their constants: ``idbase`` from
  Settings (``FHIR_ADAPTER_IDENTIFIER_BASE``) and ``codes`` (the trial code system's URL) from
  ``mappings/codesystem.yaml``.
- :func:`registry_tables` runs every trial view over a source into DuckDB, adds the ``arms`` and
  ``visits`` of ``mappings/study.yaml`` and the adverse-event terms of
  ``mappings/adverse_events.yaml`` as tables (R4 ``assignedArm`` carries the arm's name; the
  registry tables name arms by id), then runs each registry query (``mappings/views/*.sql``, one
  table named as its file).

Typical use::

    tables = registry_tables(NdjsonSource([Path("export/")]))
    tables.rows("outcomes_by_arm_visit")     # list of dicts
    tables.con.sql("SELECT * FROM ae_incidence")  # a DuckDB relation
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import yaml

from fhir_adapter.errors import ConfigurationError, InputUnreadable
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.query.engine import quote, run_views, table_rows
from fhir_adapter.query.sources import Source
from fhir_adapter.query.viewdef import Row, View, ViewDefinitionError, compile_view
from fhir_adapter.settings import Settings
from fhir_adapter.trial import Trial, default_mappings_dir, load_trial

VIEWS_DIR = "views"


def mappings_dir(settings: Settings) -> Path:
    return settings.mappings_dir or default_mappings_dir()


def trial_constants(settings: Settings) -> dict[str, str]:
    """The values the engine gives the trial views' constants: the identifier base (a
    setting), the trial code system's url and the canonical base of the trial's extensions
    (mappings/codesystem.yaml, mappings/extensions.yaml)."""
    return {
        "idbase": settings.identifier_base,
        "codes": _mapping_value(settings, "codesystem.yaml", "url"),
        "canonical": _mapping_value(settings, "extensions.yaml", "canonical_base"),
    }


def _mapping_value(settings: Settings, file: str, key: str) -> str:
    path = mappings_dir(settings) / file
    try:
        return str(yaml.safe_load(path.read_text(encoding="utf-8"))[key])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"{path}: no {key} ({exc.__class__.__name__})") from None


def load_view(path: Path, constants: Mapping[str, Any] | None = None) -> View:
    """A ViewDefinition file compiled; ``constants`` set only those the view declares."""
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputUnreadable(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ViewDefinitionError(
            f"{path}: not a JSON document ({exc.__class__.__name__})"
        ) from None
    declared = _declared_constants(definition)
    given = {k: v for k, v in (constants or {}).items() if k in declared}
    return compile_view(definition, given)


def _declared_constants(definition: Any) -> set[str]:
    if not isinstance(definition, dict) or not isinstance(definition.get("constant"), list):
        return set()
    return {str(c.get("name")) for c in definition["constant"] if isinstance(c, dict)}


def view_files(settings: Settings) -> list[Path]:
    return sorted((mappings_dir(settings) / VIEWS_DIR).glob("*.json"))


def query_files(settings: Settings) -> list[Path]:
    return sorted((mappings_dir(settings) / VIEWS_DIR).glob("*.sql"))


def trial_views(settings: Settings | None = None) -> list[View]:
    settings = settings or Settings()
    constants = trial_constants(settings)
    return [load_view(p, constants) for p in view_files(settings)]


def trial_definitions(settings: Settings | None = None) -> list[dict[str, Any]]:
    """The trial views as JSON with their constants set (what another engine is given)."""
    return [v.resolved_definition() for v in trial_views(settings)]


@dataclass
class RegistryTables:
    """The view tables and registry tables of one run, in one DuckDB database."""

    con: duckdb.DuckDBPyConnection
    views: list[str]
    queries: list[str]

    def rows(self, table: str) -> list[Row]:
        return table_rows(self.con, table)

    def relation(self, table: str) -> duckdb.DuckDBPyRelation:
        return self.con.table(table)

    def as_dicts(self) -> dict[str, list[Row]]:
        return {t: self.rows(t) for t in [*self.views, *self.queries]}

    def close(self) -> None:
        self.con.close()


def add_trial_tables(
    con: duckdb.DuckDBPyConnection, trial: Trial, terminology: Terminology | None = None
) -> None:
    """``arms`` (arm, arm_name, arm_order), ``study_visits`` (visit, visit_code, visit_order,
    offset_days, visit_label, window_from_day, window_to_day: days after the first treatment)
    and ``ae_terms`` (term, term_display, term_order: the SPEC §3 tokens in the order of
    adverse_events.yaml)."""
    con.execute("CREATE OR REPLACE TABLE arms (arm VARCHAR, arm_name VARCHAR, arm_order INTEGER)")
    con.executemany(
        "INSERT INTO arms VALUES (?, ?, ?)",
        [(a.id, a.name, i) for i, a in enumerate(trial.arms)],
    )
    con.execute(
        "CREATE OR REPLACE TABLE study_visits (visit VARCHAR, visit_code VARCHAR, "
        "visit_order INTEGER, offset_days INTEGER, visit_label VARCHAR, "
        "window_from_day INTEGER, window_to_day INTEGER)"
    )
    con.executemany(
        "INSERT INTO study_visits VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (v.id, f"visit-{v.id}", i, v.offset_days, v.label, *trial.window(v.id))
            for i, v in enumerate(trial.visits)
        ],
    )
    terms = (terminology or Terminology(trial)).ae_map["terms"]
    con.execute(
        "CREATE OR REPLACE TABLE ae_terms (term VARCHAR, term_display VARCHAR, term_order INTEGER)"
    )
    con.executemany(
        "INSERT INTO ae_terms VALUES (?, ?, ?)",
        [(str(t), str(e["display"]), i) for i, (t, e) in enumerate(terms.items())],
    )


def run_queries(con: duckdb.DuckDBPyConnection, files: Iterable[Path]) -> list[str]:
    names = []
    for path in files:
        sql = path.read_text(encoding="utf-8").strip().rstrip(";")
        try:
            con.execute(f"CREATE OR REPLACE TABLE {quote(path.stem)} AS {sql}")
        except duckdb.Error as exc:
            raise ConfigurationError(f"{path}: the query fails: {exc}") from None
        names.append(path.stem)
    return names


def registry_tables(
    source: Source,
    settings: Settings | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
) -> RegistryTables:
    """Every trial view over ``source``, then every registry query (one DuckDB database)."""
    settings = settings or Settings()
    views = trial_views(settings)
    con = run_views(views, source, con)
    return tables_from_views(con, [v.name for v in views], settings)


def tables_from_views(
    con: duckdb.DuckDBPyConnection, views: list[str], settings: Settings
) -> RegistryTables:
    """The registry queries over view tables already in ``con`` (from any engine)."""
    trial = load_trial(settings.mappings_dir)
    add_trial_tables(con, trial, Terminology(trial, settings.mappings_dir))
    queries = run_queries(con, query_files(settings))
    return RegistryTables(con, views, queries)


__all__ = [
    "RegistryTables",
    "add_trial_tables",
    "load_view",
    "registry_tables",
    "run_queries",
    "tables_from_views",
    "trial_constants",
    "trial_definitions",
    "trial_views",
]
