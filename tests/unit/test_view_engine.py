"""The embedded engine, feature by feature, on hand-written resources with answers worked out by
hand; invalid ViewDefinitions refused with one clear message before any row; DuckDB typing."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from fhir_adapter.query.engine import column_type, plain_decimal, run_view
from fhir_adapter.query.fhirpath import reference_key
from fhir_adapter.query.sources import NdjsonSource
from fhir_adapter.query.viewdef import ViewDefinitionError, compile_view

PT1 = {
    "resourceType": "Patient",
    "id": "pt1",
    "active": True,
    "gender": "female",
    "birthDate": "1990-05",
    "name": [
        {"use": "official", "family": "Li", "given": ["Mei", "Hua"]},
        {"use": "usual", "family": "Lee", "given": ["May"]},
    ],
    "address": [{"city": "Fuzhou"}, {"city": "Xiamen"}],
    "managingOrganization": {"reference": "Organization/org1"},
    "extension": [{"url": "urn:x:ext", "valueCode": "A"}],
}
PT2 = {"resourceType": "Patient", "id": "pt2", "active": False, "name": [{"family": "Wu"}]}
OBS = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "urn:codes", "code": "masi"}]},
    "subject": {"reference": "https://example.org/fhir/Patient/pt1/_history/3"},
    "valueQuantity": {"value": 12.45, "unit": "score"},
    "effectiveDateTime": "2025-01-10",
    "component": [
        {"code": {"text": "d"}, "valueInteger": 3},
        {"code": {"text": "flag"}, "valueBoolean": True},
    ],
}
ALL = [PT1, PT2, OBS]


def view(select: list[dict[str, Any]], resource: str = "Patient", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "ViewDefinition", "name": "t", "resource": resource,
            "select": select, **extra}  # fmt: skip


def rows(definition: dict[str, Any], resources: list[dict[str, Any]] = ALL) -> list[dict[str, Any]]:
    return list(compile_view(definition).run(resources))


def cols(*pairs: tuple[str, str], **flags: Any) -> dict[str, Any]:
    return {"column": [{"name": n, "path": p, **flags} for n, p in pairs]}


def test_resource_type_filter_and_plain_columns() -> None:
    assert rows(view([cols(("id", "id"), ("active", "active"))])) == [
        {"id": "pt1", "active": True},
        {"id": "pt2", "active": False},
    ]


def test_for_each_makes_a_row_per_item_and_drops_resources_without() -> None:
    sel = [cols(("id", "id")), {"forEach": "address", **cols(("city", "city"))}]
    assert rows(view(sel)) == [{"id": "pt1", "city": "Fuzhou"}, {"id": "pt1", "city": "Xiamen"}]


def test_for_each_or_null_keeps_resources_without_items() -> None:
    sel = [
        cols(("id", "id")),
        {"forEachOrNull": "address", **cols(("city", "city"), ("i", "%rowIndex"))},
    ]
    assert rows(view(sel)) == [
        {"id": "pt1", "city": "Fuzhou", "i": 0},
        {"id": "pt1", "city": "Xiamen", "i": 1},
        {"id": "pt2", "city": None, "i": 0},
    ]


def test_sibling_selects_are_a_cartesian_product() -> None:
    sel = [
        {"forEach": "name", **cols(("family", "family"))},
        {"forEach": "address", **cols(("city", "city"))},
    ]
    got = rows(view(sel), [PT1])
    assert [(r["family"], r["city"]) for r in got] == [
        ("Li", "Fuzhou"), ("Li", "Xiamen"), ("Lee", "Fuzhou"), ("Lee", "Xiamen"),
    ]  # fmt: skip


def test_nested_selects_repeat_the_parent_and_order_columns() -> None:
    sel = [{"forEach": "name", **cols(("family", "family")),
            "select": [{"forEach": "given", **cols(("given", "$this"))}]}]  # fmt: skip
    got = rows(view([cols(("id", "id")), *sel]), [PT1])
    assert got == [
        {"id": "pt1", "family": "Li", "given": "Mei"},
        {"id": "pt1", "family": "Li", "given": "Hua"},
        {"id": "pt1", "family": "Lee", "given": "May"},
    ]
    assert list(got[0]) == ["id", "family", "given"]


def test_union_all_concatenates_branches_with_the_same_columns() -> None:
    sel = [cols(("id", "id")), {"unionAll": [
        {"forEach": "name", **cols(("text", "family"), ("kind", "'name'"))},
        {"forEach": "address", **cols(("text", "city"), ("kind", "'city'"))},
    ]}]  # fmt: skip
    got = rows(view(sel), [PT1])
    assert [(r["kind"], r["text"]) for r in got] == [
        ("name", "Li"), ("name", "Lee"), ("city", "Fuzhou"), ("city", "Xiamen"),
    ]  # fmt: skip


def test_view_where_keeps_only_true_and_constants_are_substituted() -> None:
    definition = view([cols(("id", "id"))], where=[{"path": "gender = %sex"}],
                      constant=[{"name": "sex", "valueCode": "female"}])  # fmt: skip
    assert rows(definition) == [{"id": "pt1"}]
    other = compile_view(definition, {"sex": "male"})  # the engine sets a constant at run time
    assert list(other.run(ALL)) == []


def test_where_must_be_boolean() -> None:
    with pytest.raises(ViewDefinitionError, match="must give a boolean"):
        rows(view([cols(("id", "id"))], where=[{"path": "name.family"}]))


def test_keys_join_references_to_resources() -> None:
    patients = rows(view([cols(("key", "getResourceKey()"))]))
    obs = rows(view([cols(("patient", "subject.getReferenceKey(Patient)"),
                          ("org", "subject.getReferenceKey(Organization)"),
                          ("any", "subject.getReferenceKey()"))], "Observation"))  # fmt: skip
    assert patients[0]["key"] == obs[0]["patient"] == obs[0]["any"] == "Patient/pt1"
    assert obs[0]["org"] is None
    assert reference_key("urn:uuid:53fefa32-fcbb-4ff8-8a92-55ee120877b7") is None
    assert reference_key("#contained") is None
    assert reference_key("Patient/pt1/_history/2", "Patient") == "Patient/pt1"


def test_of_type_first_join_extension_and_indexer() -> None:
    got = rows(view([cols(
        ("masi", "value.ofType(Quantity).value"),
        ("d", "component.where(code.text = 'd').value.ofType(integer)"),
        ("flag", "component.value.ofType(boolean)"),
        ("day", "effective.ofType(dateTime)"),
        ("none", "value.ofType(string)"),
    )], "Observation"))  # fmt: skip
    assert got == [
        {"masi": Decimal("12.45"), "d": 3, "flag": True, "day": "2025-01-10", "none": None}
    ]
    (pt,) = rows(view([cols(
        ("first_given", "name.first().given.first()"),
        ("all_given", "name.given.join(', ')"),
        ("second_family", "name[1].family"),
        ("ext", "extension('urn:x:ext').value.ofType(code)"),
    )]), [PT1])  # fmt: skip
    assert pt == {"first_given": "Mei", "all_given": "Mei, Hua, May", "second_family": "Lee",
                  "ext": "A"}  # fmt: skip


def test_boundaries() -> None:
    (got,) = rows(view([cols(
        ("low", "birthDate.lowBoundary()"),
        ("high", "birthDate.highBoundary()"),
    )]), [PT1])  # fmt: skip
    assert got == {"low": "1990-05-01", "high": "1990-05-31"}
    (obs,) = rows(view([cols(
        ("low", "value.ofType(Quantity).value.lowBoundary()"),
        ("high", "effective.ofType(dateTime).highBoundary()"),
    )], "Observation"))  # fmt: skip
    assert obs["low"] == Decimal("12.445")
    assert obs["high"] == "2025-01-10T23:59:59.999-12:00"


def test_collection_columns_and_multiple_values_refused() -> None:
    got = rows(view([cols(("given", "name.given"), collection=True)]))
    assert got == [{"given": ["Mei", "Hua", "May"]}, {"given": []}]
    with pytest.raises(ViewDefinitionError, match="3 values where one was expected"):
        rows(view([cols(("given", "name.given"))]))


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ([], "must be a JSON object"),
        ({"select": [{"column": [{"name": "id", "path": "id"}]}]}, "resource"),
        ({"resource": "Patiant", "select": [{"column": [{"name": "id", "path": "id"}]}]},
         "not a FHIR resource type"),
        ({"resource": "Patient", "select": []}, "at least one selection"),
        ({"resource": "Patient", "select": [{"forEach": "@@"}]}, "invalid FHIRPath"),
        ({"resource": "Patient", "select": [{"forEach": 1, "column": [{"name": "a", "path": "id"}]}]},
         "path must be a FHIRPath string"),
        ({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "nosuch()"}]}]},
         "unknown function nosuch()"),
        ({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "%nope"}]}]},
         "undefined constant %nope"),
        ({"resource": "Patient", "select": [{"column": [{"name": "a b", "path": "id"}]}]},
         "column name"),
        ({"resource": "Patient", "select": [{"column": [{"name": "a", "path": "id"},
                                                        {"name": "a", "path": "id"}]}]},
         "defined more than once"),
        ({"resource": "Patient", "select": [{"unionAll": [cols(("a", "id")), cols(("b", "id"))]}]},
         "unionAll branches have different columns"),
        ({"resource": "Patient", "select": [{"forEach": "name", "forEachOrNull": "name",
                                             "column": [{"name": "a", "path": "id"}]}]},
         "only one of"),
        ({"resource": "Patient", "constant": [{"name": "c"}], "select": [cols(("a", "id"))]},
         "exactly one value"),
        ({"resource": "Patient", "constant": [{"name": "c", "valueInteger": "1"}],
          "select": [cols(("a", "id"))]}, "wrong JSON type"),
        ({"resource": "Patient", "select": [{"colunm": [{"name": "a", "path": "id"}]}]},
         "unknown element"),
        ({"resource": "Patient", "name": "1bad", "select": [cols(("a", "id"))]}, "name must match"),
    ],
)  # fmt: skip
def test_invalid_views_are_refused_before_any_row(definition: Any, message: str) -> None:
    with pytest.raises(ViewDefinitionError, match=r"^invalid ViewDefinition") as caught:
        compile_view(definition)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_overriding_an_undeclared_constant_is_refused() -> None:
    with pytest.raises(ViewDefinitionError, match="declares no constant idbase"):
        compile_view(view([cols(("id", "id"))]), {"idbase": "urn:x"})


def test_resolved_definition_carries_the_run_time_constants() -> None:
    definition = view([cols(("id", "id"))], constant=[{"name": "idbase", "valueString": "urn:a"}])
    compiled = compile_view(definition, {"idbase": "urn:b"})
    assert compiled.resolved_definition()["constant"] == [
        {"name": "idbase", "valueString": "urn:b"}
    ]
    assert definition["constant"] == [{"name": "idbase", "valueString": "urn:a"}]  # untouched


def test_duckdb_types_follow_the_view() -> None:
    compiled = compile_view(view([{"column": [
        {"name": "a", "path": "active", "type": "boolean"},
        {"name": "b", "path": "id", "type": "http://hl7.org/fhir/StructureDefinition/decimal"},
        {"name": "c", "path": "name", "type": "HumanName", "collection": True},
        {"name": "d", "path": "birthDate", "type": "date",
         "tag": [{"name": "ansi/type", "value": "DATE"}]},
        {"name": "e", "path": "id"},
    ]}]))  # fmt: skip
    a, b, c, d, e = compiled.columns
    assert [column_type(a), column_type(b), column_type(c), column_type(d)] == [
        "BOOLEAN", "DECIMAL(38, 12)", "JSON[]", "DATE",
    ]  # fmt: skip
    assert column_type(e, {"BIGINT"}) == "BIGINT"
    assert column_type(e, {"BIGINT", "DECIMAL"}) == "DECIMAL(38, 12)"
    assert column_type(e, set()) == "VARCHAR"
    assert plain_decimal(Decimal("100.000")) == Decimal("100")
    assert str(plain_decimal(Decimal("12.4500"))) == "12.45"


def test_run_view_through_duckdb_keeps_values(tmp_path: Any) -> None:
    path = tmp_path / "data.ndjson"
    import orjson

    path.write_bytes(b"\n".join(orjson.dumps(r) for r in ALL) + b"\n")
    got = run_view(
        compile_view(view([{"column": [
            {"name": "masi", "path": "value.ofType(Quantity).value", "type": "decimal"},
            {"name": "items", "path": "component.value.ofType(integer)", "type": "integer",
             "collection": True},
            {"name": "code", "path": "code", "type": "CodeableConcept"},
        ]}], "Observation")),
        NdjsonSource([path]),
    )  # fmt: skip
    assert got == [{"masi": Decimal("12.45"), "items": [3],
                    "code": {"coding": [{"system": "urn:codes", "code": "masi"}]}}]  # fmt: skip
