"""SQL on FHIR v2 ViewDefinitions: validated once, then run resource by resource.

The semantics follow the specification's processing algorithm ("Process(S, N)"): a selection's
columns, nested selects and ``unionAll`` each produce partial rows, combined by Cartesian
product; ``forEach`` / ``forEachOrNull`` / ``repeat`` choose the nodes a selection runs on and
set ``%rowIndex``; ``where`` keeps a resource only when every path is ``true``. Column order is
the specification's: a selection's own columns, then its nested selects', then its unionAll's.

Everything that can be checked without data is checked when the view is compiled (shape, names,
duplicate columns, union branches, every FHIRPath expression, constants), so an invalid view is
refused with one clear message before any row is produced.
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from fhir_adapter.errors import AdapterError, ExitCode
from fhir_adapter.query.fhirpath import Expression, FhirPathError, model_for, resource_types

Row = dict[str, Any]

_SQL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_VIEW_KEYS = frozenset(
    {
        "resourceType", "id", "meta", "implicitRules", "language", "text", "contained",
        "extension", "modifierExtension", "url", "identifier", "version", "versionAlgorithmString",
        "versionAlgorithmCoding", "name", "title", "status", "experimental", "date", "publisher",
        "contact", "description", "useContext", "jurisdiction", "purpose", "copyright",
        "copyrightLabel", "resource", "profile", "fhirVersion", "constant", "select", "where",
    }
)  # fmt: skip
_SELECT_KEYS = frozenset({"column", "select", "forEach", "forEachOrNull", "repeat", "unionAll"})
_COLUMN_KEYS = frozenset({"path", "name", "description", "collection", "type", "tag"})
_WHERE_KEYS = frozenset({"path", "description"})
#: constant value[x] types and the JSON type each must have
_CONSTANT_TYPES: dict[str, tuple[type, ...]] = {
    "valueBase64Binary": (str,), "valueBoolean": (bool,), "valueCanonical": (str,),
    "valueCode": (str,), "valueDate": (str,), "valueDateTime": (str,),
    "valueDecimal": (int, float, Decimal), "valueId": (str,), "valueInstant": (str,),
    "valueInteger": (int,), "valueInteger64": (int, str), "valueOid": (str,),
    "valueString": (str,), "valuePositiveInt": (int,), "valueTime": (str,),
    "valueUnsignedInt": (int,), "valueUri": (str,), "valueUrl": (str,), "valueUuid": (str,),
}  # fmt: skip


class ViewDefinitionError(AdapterError):
    """The ViewDefinition is invalid (refused before any row) or failed on a resource."""

    exit_code = ExitCode.DATA_ERROR


@dataclass(frozen=True)
class Column:
    name: str
    path: Expression
    collection: bool = False
    type: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None

    @property
    def is_row_index(self) -> bool:
        return self.path.text.strip() == "%rowIndex"


@dataclass
class Selection:
    columns: list[Column]
    selects: list[Selection]
    union: list[Selection]
    iterate: str | None = None  # forEach, forEachOrNull, repeat or None
    foci: list[Expression] = field(default_factory=list)
    #: every column this selection produces, in output order
    output: list[Column] = field(default_factory=list)


@dataclass
class View:
    """A compiled ViewDefinition."""

    name: str
    resource: str
    description: str | None
    columns: list[Column]
    constants: dict[str, Any]
    where: list[Expression]
    root: Selection
    definition: Mapping[str, Any]
    #: constants whose value the caller set (e.g. idbase from Settings)
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def resolved_definition(self) -> dict[str, Any]:
        """The ViewDefinition JSON with the caller's constant values written in (for Spark)."""
        definition = copy.deepcopy(dict(self.definition))
        for item in definition.get("constant", []):
            if item.get("name") in self.overrides:
                key = next(k for k in item if k.startswith("value"))
                item[key] = self.overrides[item["name"]]
        return definition

    def rows(self, resource: Mapping[str, Any]) -> Iterator[Row]:
        """The rows this view makes of one resource (none when it is of another type)."""
        if resource.get("resourceType") != self.resource:
            return
        variables = {**self.constants, "resource": resource, "rowIndex": 0}
        for condition in self.where:
            if not _holds(condition, resource, variables):
                return
        for row in _process(self.root, resource, variables):
            yield {c.name: row.get(c.name) for c in self.columns}

    def run(self, resources: Iterable[Mapping[str, Any]]) -> Iterator[Row]:
        for resource in resources:
            yield from self.rows(resource)


def _holds(
    condition: Expression, resource: Mapping[str, Any], variables: Mapping[str, Any]
) -> bool:
    result = _evaluate(condition, resource, variables)
    if not result:
        return False
    if len(result) > 1 or not isinstance(result[0], bool):
        raise ViewDefinitionError(
            f"where path {condition.text!r} must give a boolean, not {_kind(result)}"
        )
    return result[0]


def _kind(values: Sequence[Any]) -> str:
    if len(values) > 1:
        return f"{len(values)} values"
    return type(values[0]).__name__


def _evaluate(expr: Expression, node: Any, variables: Mapping[str, Any]) -> list[Any]:
    try:
        return expr.values(node, variables)
    except FhirPathError as exc:
        raise ViewDefinitionError(str(exc)) from None


def _process(sel: Selection, node: Any, variables: Mapping[str, Any]) -> Iterator[Row]:
    if sel.iterate is None:
        foci: list[Any] = [node]
    else:
        foci = _foci(sel, node, variables)
    for index, focus in enumerate(foci):
        scope = {**variables, "rowIndex": index} if sel.iterate else variables
        parts: list[list[Row]] = [[_column_row(sel.columns, focus, scope)]]
        parts += [list(_process(child, focus, scope)) for child in sel.selects]
        if sel.union:
            parts.append([r for u in sel.union for r in _process(u, focus, scope)])
        for combination in itertools.product(*parts):
            row: Row = {}
            for part in combination:
                row.update(part)
            yield row
    if not foci and sel.iterate == "forEachOrNull":
        yield {c.name: (0 if c.is_row_index else None) for c in sel.output}


def _foci(sel: Selection, node: Any, variables: Mapping[str, Any]) -> list[Any]:
    def nodes(expr: Expression, at: Any) -> list[Any]:
        try:
            return expr.nodes(at, variables)
        except FhirPathError as exc:
            raise ViewDefinitionError(str(exc)) from None

    if sel.iterate != "repeat":
        return nodes(sel.foci[0], node)
    found: list[Any] = []

    def traverse(at: Any) -> None:
        for expr in sel.foci:
            for child in nodes(expr, at):
                found.append(child)
                traverse(child)

    traverse(node)
    return found


def _column_row(columns: Sequence[Column], focus: Any, variables: Mapping[str, Any]) -> Row:
    row: Row = {}
    for col in columns:
        values = _evaluate(col.path, focus, variables)
        if col.collection:
            row[col.name] = values
        elif len(values) > 1:
            raise ViewDefinitionError(
                f"column {col.name!r}: {len(values)} values where one was expected "
                f"(set collection: true to keep them all)"
            )
        else:
            row[col.name] = values[0] if values else None
    return row


# -- compiling (validation) ----------------------------------------------------------------------
def compile_view(definition: Any, constants: Mapping[str, Any] | None = None) -> View:
    """Validate a ViewDefinition (JSON object) and compile its expressions.

    ``constants`` override the values of constants the view declares (e.g. ``idbase`` from
    Settings); a name the view does not declare is an error.
    """
    if not isinstance(definition, Mapping):
        raise ViewDefinitionError("invalid ViewDefinition: a ViewDefinition must be a JSON object")
    label = _label(definition)
    try:
        return _compile(definition, dict(constants or {}))
    except (ViewDefinitionError, FhirPathError) as exc:
        raise ViewDefinitionError(f"invalid ViewDefinition {label}: {exc}") from None


def _label(definition: Mapping[str, Any]) -> str:
    name = definition.get("name")
    return repr(name) if isinstance(name, str) else "(unnamed)"


def _compile(definition: Mapping[str, Any], overrides: dict[str, Any]) -> View:
    rtype = definition.get("resourceType", "ViewDefinition")
    if rtype != "ViewDefinition":
        raise ViewDefinitionError(f"resourceType is {rtype!r}, not 'ViewDefinition'")
    _no_unknown_keys(definition, _VIEW_KEYS, "the ViewDefinition")
    name = definition.get("name")
    if name is not None and not (isinstance(name, str) and _SQL_NAME.match(name)):
        raise ViewDefinitionError("name must match ^[A-Za-z][A-Za-z0-9_]*$")
    versions = definition.get("fhirVersion")
    model = model_for(versions if isinstance(versions, list) else None)
    resource = definition.get("resource")
    if not isinstance(resource, str) or not resource:
        raise ViewDefinitionError("resource (the FHIR resource type) is required")
    if resource not in resource_types(model):
        raise ViewDefinitionError(f"resource {resource!r} is not a FHIR resource type")
    constants = _constants(definition.get("constant", []), overrides)
    scope = set(constants)
    where = [_expression(w, "where", scope, model) for w in _objects(definition, "where")]
    selects = _objects(definition, "select")
    if not selects:
        raise ViewDefinitionError("select must hold at least one selection")
    root = Selection([], [_selection(s, scope, model) for s in selects], [])
    root.output = _check_columns(root, [])
    description = definition.get("description")
    return View(
        name=name or "view",
        resource=resource,
        description=description if isinstance(description, str) else None,
        columns=root.output,
        constants=constants,
        where=where,
        root=root,
        definition=definition,
        overrides=dict(overrides),
    )


def _no_unknown_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = sorted(k for k in obj if k not in allowed)
    if unknown:
        raise ViewDefinitionError(f"{where} has unknown element(s): {', '.join(unknown)}")


def _objects(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = obj.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ViewDefinitionError(f"{key} must be a list of objects")
    return value


def _constants(items: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(items, list):
        raise ViewDefinitionError("constant must be a list")
    values: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, Mapping):
            raise ViewDefinitionError("each constant must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not _SQL_NAME.match(name):
            raise ViewDefinitionError("a constant needs a name matching ^[A-Za-z][A-Za-z0-9_]*$")
        keys = [k for k in item if k.startswith("value")]
        _no_unknown_keys(item, frozenset({"name", "id", "extension", *_CONSTANT_TYPES}), name)
        if len(keys) != 1:
            raise ViewDefinitionError(f"constant {name!r} needs exactly one value[x]")
        value = item[keys[0]]
        accepted = _CONSTANT_TYPES[keys[0]]
        if not isinstance(value, accepted) or (bool not in accepted and isinstance(value, bool)):
            raise ViewDefinitionError(f"constant {name!r}: {keys[0]} has the wrong JSON type")
        if name in values:
            raise ViewDefinitionError(f"constant {name!r} is defined twice")
        values[name] = Decimal(str(value)) if keys[0] == "valueDecimal" else value
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ViewDefinitionError(f"the view declares no constant {', '.join(unknown)}")
    values.update(overrides)
    return values


def _expression(
    obj: Mapping[str, Any], where: str, scope: set[str], model: dict[str, Any]
) -> Expression:
    _no_unknown_keys(obj, _WHERE_KEYS, where)
    return _path(obj.get("path"), where, scope, model)


def _path(text: Any, where: str, scope: set[str], model: dict[str, Any]) -> Expression:
    if not isinstance(text, str):
        raise ViewDefinitionError(f"{where}: path must be a FHIRPath string")
    try:
        return Expression(text, scope, model)
    except FhirPathError as exc:
        raise ViewDefinitionError(f"{where}: {exc}") from None


def _selection(obj: Mapping[str, Any], scope: set[str], model: dict[str, Any]) -> Selection:
    _no_unknown_keys(obj, _SELECT_KEYS, "a select")
    iterations = [k for k in ("forEach", "forEachOrNull", "repeat") if k in obj]
    if len(iterations) > 1:
        raise ViewDefinitionError(f"a select may have only one of {', '.join(iterations)}")
    iterate = iterations[0] if iterations else None
    foci: list[Expression] = []
    if iterate == "repeat":
        paths = obj["repeat"]
        if not isinstance(paths, list) or not paths:
            raise ViewDefinitionError("repeat must be a non-empty list of FHIRPath strings")
        foci = [_path(p, "repeat", scope, model) for p in paths]
    elif iterate is not None:
        foci = [_path(obj[iterate], iterate, scope, model)]
    columns = [_column(c, scope, model) for c in _objects(obj, "column")]
    selects = [_selection(s, scope, model) for s in _objects(obj, "select")]
    union = [_selection(s, scope, model) for s in _objects(obj, "unionAll")]
    if not (columns or selects or union):
        raise ViewDefinitionError("a select needs a column, a select or a unionAll")
    return Selection(columns, selects, union, iterate, foci)


def _column(obj: Mapping[str, Any], scope: set[str], model: dict[str, Any]) -> Column:
    _no_unknown_keys(obj, _COLUMN_KEYS, "a column")
    name = obj.get("name")
    if not isinstance(name, str) or not _SQL_NAME.match(name):
        raise ViewDefinitionError(
            f"column name {name!r} must match ^[A-Za-z][A-Za-z0-9_]*$ (a column needs a name)"
        )
    collection = obj.get("collection", False)
    if not isinstance(collection, bool):
        raise ViewDefinitionError(f"column {name!r}: collection must be true or false")
    ctype = obj.get("type")
    if ctype is not None and not isinstance(ctype, str):
        raise ViewDefinitionError(f"column {name!r}: type must be a string")
    tags: dict[str, str] = {}
    for tag in obj.get("tag", []) if isinstance(obj.get("tag", []), list) else [None]:
        if not (isinstance(tag, Mapping) and {"name", "value"} >= set(tag) and "name" in tag):
            raise ViewDefinitionError(f"column {name!r}: a tag needs a name and a value")
        tags[str(tag["name"])] = str(tag.get("value", ""))
    description = obj.get("description")
    return Column(
        name=name,
        path=_path(obj.get("path"), f"column {name!r}", scope, model),
        collection=collection,
        type=ctype,
        tags=tags,
        description=description if isinstance(description, str) else None,
    )


def _check_columns(sel: Selection, before: list[Column]) -> list[Column]:
    """The specification's ValidateColumns: names unique, union branches alike."""
    taken = {c.name for c in before}
    own: list[Column] = []

    def add(col: Column) -> None:
        if col.name in taken:
            raise ViewDefinitionError(f"column {col.name!r} is defined more than once")
        taken.add(col.name)
        own.append(col)

    for col in sel.columns:
        add(col)
    for child in sel.selects:
        for col in _check_columns(child, [*before, *own]):
            add(col)
    if sel.union:
        context = [*before, *own]
        branches = [_check_columns(u, context) for u in sel.union]
        first = [c.name for c in branches[0]]
        for branch in branches[1:]:
            if [c.name for c in branch] != first:
                raise ViewDefinitionError(
                    f"unionAll branches have different columns: {first} and "
                    f"{[c.name for c in branch]}"
                )
        for col in branches[0]:
            add(col)
    sel.output = own
    return own


__all__ = ["Column", "Row", "Selection", "View", "ViewDefinitionError", "compile_view"]
