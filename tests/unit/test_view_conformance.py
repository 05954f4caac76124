"""The embedded engine against the SQL on FHIR v2 specification's own test suite.

Every test of every vendored file (tests/sof_conformance/*.json) runs: ``shareable`` and
``experimental`` alike. Rows are compared as unordered multisets, numbers by value
(``0.95`` equals ``0.95000000``), as the specification's reference runner does.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.query.viewdef import ViewDefinitionError, compile_view

SUITE = Path(__file__).resolve().parent.parent / "sof_conformance"
FILES = sorted(SUITE.glob("*.json"))


def _cases() -> list[Any]:
    cases = []
    for path in FILES:
        suite = json.loads(path.read_text(encoding="utf-8"))
        for test in suite["tests"]:
            tags = ",".join(test.get("tags", []))
            cases.append(
                pytest.param(suite["resources"], test, id=f"{path.stem}: {test['title']} [{tags}]")
            )
    return cases


def _normal(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float | Decimal):
        return str(Decimal(str(value)).normalize())
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _multiset(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(
        json.dumps({k: _normal(v) for k, v in row.items()}, sort_keys=True) for row in rows
    )


def test_the_whole_suite_is_vendored() -> None:
    assert len(FILES) == 22
    assert sum(len(json.loads(p.read_text())["tests"]) for p in FILES) == 134


@pytest.mark.parametrize(("resources", "test"), _cases())
def test_conformance(resources: list[dict[str, Any]], test: dict[str, Any]) -> None:
    if test.get("expectError"):
        with pytest.raises(ViewDefinitionError):
            list(compile_view(test["view"]).run(resources))
        return
    view = compile_view(test["view"])
    rows = list(view.run(resources))
    if "expectCount" in test:
        assert len(rows) == test["expectCount"]
        return
    assert _multiset(rows) == _multiset(test["expect"])
    for row in rows:  # every column present in every row, in the view's order
        assert list(row) == view.column_names
    if "expectColumns" in test:
        assert view.column_names == test["expectColumns"]
