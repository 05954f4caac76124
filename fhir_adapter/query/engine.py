"""The embedded engine: ViewDefinitions over a source, one DuckDB table per view.

Resources are read once for all the views of a run and each resource is given to the views of its
type; rows go, as they are made, to a temporary JSON Lines file per view, which DuckDB then loads
with the column types of the view. Memory holds one resource and its rows at a time, whatever
the size of the source.

Column types: ``boolean`` -> BOOLEAN; ``integer``, ``positiveInt``, ``unsignedInt`` -> INTEGER;
``integer64`` -> BIGINT; ``decimal`` -> DECIMAL(38, 12) (exact); every other primitive (dates
included, in their FHIR string form) -> VARCHAR; a non-primitive value -> JSON. A column without
``type`` takes the type of its values. The column tag ``ansi/type`` overrides all of this. A
``collection`` column is a LIST of its type.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import duckdb
import orjson

from fhir_adapter.jsonout import dumpb
from fhir_adapter.query.sources import Source
from fhir_adapter.query.viewdef import Column, Row, View, ViewDefinitionError

_DUCK_TYPES = {
    "boolean": "BOOLEAN",
    "integer": "INTEGER",
    "positiveInt": "INTEGER",
    "unsignedInt": "INTEGER",
    "integer64": "BIGINT",
    "decimal": "DECIMAL(38, 12)",
}
_PRIMITIVES = frozenset(
    {
        "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
        "instant", "integer", "integer64", "markdown", "oid", "positiveInt", "string", "time",
        "unsignedInt", "uri", "url", "uuid", "xhtml",
    }
)  # fmt: skip
_FHIR_SD = "http://hl7.org/fhir/StructureDefinition/"


def fhir_type(column: Column) -> str | None:
    if column.type is None:
        return None
    return column.type.removeprefix(_FHIR_SD)


@dataclass
class _Sink:
    """Rows of one view on their way to DuckDB (a temporary JSON Lines file)."""

    view: View
    handle: IO[bytes]
    rows: int = 0
    seen: dict[str, set[str]] = field(default_factory=dict)

    def write(self, row: Row) -> None:
        for name, value in row.items():
            self.seen.setdefault(name, set()).update(_kinds(value))
        self.handle.write(dumpb(_jsonable(row)) + b"\n")
        self.rows += 1


def _kinds(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, list):
        return {k for v in value for k in _kinds(v)}
    if isinstance(value, bool):
        return {"BOOLEAN"}
    if isinstance(value, int):
        return {"BIGINT"}
    if isinstance(value, Decimal):
        return {"DECIMAL"}
    if isinstance(value, dict):
        return {"JSON"}
    return {"VARCHAR"}


def _jsonable(row: Row) -> Row:
    """Decimals as strings (DuckDB casts them exactly); complex values stay JSON objects."""

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return format(value, "f")
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {k: convert(v) for k, v in row.items()}


def column_type(column: Column, seen: set[str] | None = None) -> str:
    """The DuckDB type of a view column (see the module docstring)."""
    declared = column.tags.get("ansi/type")
    if declared:
        base = declared
    else:
        ftype = fhir_type(column)
        if ftype is not None:
            base = _DUCK_TYPES.get(ftype, "VARCHAR" if ftype in _PRIMITIVES else "JSON")
        else:
            base = _inferred(seen or set())
    return f"{base}[]" if column.collection else base


def _inferred(kinds: set[str]) -> str:
    if kinds == {"BOOLEAN"}:
        return "BOOLEAN"
    if kinds == {"BIGINT"}:
        return "BIGINT"
    if kinds and kinds <= {"BIGINT", "DECIMAL"}:
        return "DECIMAL(38, 12)"
    if kinds == {"JSON"}:
        return "JSON"
    return "VARCHAR"


def _staged_type(target: str) -> str:
    """How a column is read from the staged JSON: decimals as text, cast exactly afterwards."""
    if target.startswith("DECIMAL"):
        return "VARCHAR[]" if target.endswith("[]") else "VARCHAR"
    return target


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_name(view: View) -> str:
    return view.name


def check_table_columns(view: View) -> None:
    """A table cannot hold two columns whose names differ only in case (DuckDB and Spark
    compare them so): refused as an invalid view, before any row is produced."""
    seen: dict[str, str] = {}
    for column in view.columns:
        other = seen.setdefault(column.name.casefold(), column.name)
        if other != column.name:
            raise ViewDefinitionError(
                f"columns {other!r} and {column.name!r} differ only in case; a table "
                "(DuckDB, Spark) cannot hold both"
            )


def run_views(
    views: Sequence[View],
    source: Source,
    con: duckdb.DuckDBPyConnection | None = None,
) -> duckdb.DuckDBPyConnection:
    """Run every view over the source once; one DuckDB table per view (named as the view)."""
    names = [table_name(v) for v in views]
    if len(set(names)) != len(names):
        raise ValueError("two views of one run have the same name")
    for view in views:
        check_table_columns(view)
    con = con or duckdb.connect()
    with tempfile.TemporaryDirectory(prefix="fhir-adapter-views-") as tmp:
        sinks = [_Sink(v, (Path(tmp) / f"{i}.jsonl").open("wb")) for i, v in enumerate(views)]
        by_type: dict[str, list[_Sink]] = {}
        for sink in sinks:
            by_type.setdefault(sink.view.resource, []).append(sink)
        try:
            for resource in source.resources(by_type):
                for sink in by_type.get(str(resource.get("resourceType")), ()):
                    for row in sink.view.rows(resource):
                        sink.write(row)
        finally:
            for sink in sinks:
                sink.handle.close()
        for i, sink in enumerate(sinks):
            _load(con, sink, Path(tmp) / f"{i}.jsonl")
    return con


def _load(con: duckdb.DuckDBPyConnection, sink: _Sink, path: Path) -> None:
    view = sink.view
    types = {c.name: column_type(c, sink.seen.get(c.name)) for c in view.columns}
    table = quote(table_name(view))
    cols = ", ".join(f"{quote(n)} {t}" for n, t in types.items())
    con.execute(f"CREATE OR REPLACE TABLE {table} ({cols})")
    if sink.rows == 0:
        return
    staged = "{" + ", ".join(f"'{n}': '{_staged_type(t)}'" for n, t in types.items()) + "}"
    select = ", ".join(f"CAST({quote(n)} AS {t})" for n, t in types.items())
    con.execute(
        f"INSERT INTO {table} SELECT {select} FROM read_json(?, "  # noqa: S608 - our own names
        f"format = 'newline_delimited', columns = {staged}, maximum_object_size = 67108864)",
        [str(path)],
    )


def load_rows(con: duckdb.DuckDBPyConnection, view: View, rows: Iterable[Row]) -> None:
    """Rows made elsewhere (e.g. by Spark) into the view's table, typed as the engine types it."""
    with tempfile.TemporaryDirectory(prefix="fhir-adapter-views-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        with path.open("wb") as handle:
            sink = _Sink(view, handle)
            for row in rows:
                sink.write(row)
        _load(con, sink, path)


def run_view(view: View, source: Source) -> list[Row]:
    """The rows of one view over a source, as dicts in column order (the Python API)."""
    con = run_views([view], source)
    try:
        return table_rows(con, table_name(view))
    finally:
        con.close()


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[Row]:
    """A table's rows as dicts; decimals without trailing zeros, JSON columns parsed."""
    return list(iter_rows(con, table))


def iter_rows(con: duckdb.DuckDBPyConnection, table: str) -> Iterator[Row]:
    cursor = con.execute(f"SELECT * FROM {quote(table)}")  # noqa: S608 - a table we created
    names = [d[0] for d in cursor.description or []]
    json_cols = {d[0] for d in cursor.description or [] if str(d[1]).startswith("JSON")}
    while True:
        batch = cursor.fetchmany(1000)
        if not batch:
            return
        for values in batch:
            yield {n: _python(v, n in json_cols) for n, v in zip(names, values, strict=True)}


def _python(value: Any, is_json: bool) -> Any:
    if isinstance(value, Decimal):
        return plain_decimal(value)
    if isinstance(value, list):
        return [_python(v, is_json) for v in value]
    if is_json and isinstance(value, str):
        return orjson.loads(value)
    return value


def plain_decimal(value: Decimal) -> Decimal:
    """12.450000 -> 12.45, 100.00 -> 100 (never 1E+2)."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


# -- writing a table -----------------------------------------------------------------------------
_TRAILING = re.compile(r"^DECIMAL")


def write_table(
    con: duckdb.DuckDBPyConnection, table: str, fmt: str, out: Path | IO[str] | None
) -> int:
    """Write a table as jsonl (to a path or a text stream), csv or parquet (to a path)."""
    if fmt == "jsonl":
        count = 0
        stream = out.open("w", encoding="utf-8") if isinstance(out, Path) else out
        if stream is None:
            raise ValueError("jsonl needs a path or a stream")
        try:
            for row in iter_rows(con, table):
                stream.write(dumpb(row).decode() + "\n")
                count += 1
        finally:
            if isinstance(out, Path):
                stream.close()
        return count
    if not isinstance(out, Path):
        raise ValueError(f"{fmt} output needs a file path (--out)")
    select = _export_select(con, table, fmt)
    options = "FORMAT PARQUET" if fmt == "parquet" else "HEADER, DELIMITER ','"
    con.execute(f"COPY ({select}) TO '{_sql_string(str(out))}' ({options})")
    counted = con.execute(f"SELECT count(*) FROM {quote(table)}").fetchone()  # noqa: S608
    return int(counted[0]) if counted else 0


def _export_select(con: duckdb.DuckDBPyConnection, table: str, fmt: str) -> str:
    """CSV: decimals without trailing zeros, lists as JSON arrays. Parquet: the table as is."""
    if fmt == "parquet":
        return f"SELECT * FROM {quote(table)}"  # noqa: S608
    cols = []
    for name, ctype, *_ in con.execute(f"DESCRIBE {quote(table)}").fetchall():
        q = quote(str(name))
        if _TRAILING.match(str(ctype)):
            cols.append(f"{_trim_decimal(q)} AS {q}")
        elif str(ctype).endswith("[]"):
            cols.append(f"to_json({q}) AS {q}")
        else:
            cols.append(q)
    return f"SELECT {', '.join(cols)} FROM {quote(table)}"  # noqa: S608


def _trim_decimal(expr: str) -> str:
    text = f"CAST({expr} AS VARCHAR)"
    return f"CASE WHEN {text} LIKE '%.%' THEN rtrim(rtrim({text}, '0'), '.') ELSE {text} END"


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def views_by_name(views: Iterable[View]) -> Mapping[str, View]:
    return {v.name: v for v in views}


def markdown_table(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """A table as a GitHub-flavoured Markdown table (a title line, then the table)."""
    rows = list(iter_rows(con, table))
    names = [str(r[0]) for r in con.execute(f"DESCRIBE {quote(table)}").fetchall()]
    lines = [f"# {table}", "", "| " + " | ".join(names) + " |"]
    lines.append("|" + "|".join("---" for _ in names) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row[n]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value).replace("|", "\\|").replace("\n", " ")


__all__ = [
    "column_type",
    "iter_rows",
    "load_rows",
    "markdown_table",
    "plain_decimal",
    "quote",
    "run_view",
    "run_views",
    "table_rows",
    "write_table",
]
