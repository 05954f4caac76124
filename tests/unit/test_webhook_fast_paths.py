"""The webhook's fast paths decide exactly what the slow ones did.

``load_json_records`` parses with orjson first and falls back to the standard library (numbers
as Decimal) for what orjson refuses or for decimal numbers: for every body, the result or the
error is the one ``json.loads(body, parse_float=Decimal)`` gives.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from fhir_adapter.errors import InvalidInput
from fhir_adapter.io import load_json_records

BODIES = [
    b'{"subject_id": "S001", "forehead_d": 2}',
    b'[{"a": 1}, {"a": 2, "b": [1, {"c": 3}]}]',
    b'{"a": 1.5, "b": {"c": [0.1, 2]}}',  # decimals: never a float
    b'{"a": 1e400}',  # out of float range
    b'{"a": 123456789012345678901234567890}',  # beyond 64 bits: orjson refuses
    b'{"a": NaN}',
    b'{"a": 1, "a": 2}',  # a repeated key: the last one wins
    b'{"a": "\\ud800"}',  # a lone surrogate escape
    '{"a": "\u00e9"}'.encode("utf-16"),  # UTF-16 with a BOM
    b"null",
    b'"text"',
    b"[1, 2]",
    b"{not json",
    b"\xff\xfe\x00",
    b"[" * 2000 + b"]" * 2000,
]


def reference(body: bytes) -> Any:
    try:
        data = json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return ("error", type(exc).__name__)
    records = data if isinstance(data, list) else [data]
    if not all(isinstance(r, dict) for r in records):
        return ("error", "not an object")
    return records


@pytest.mark.parametrize("body", BODIES)
def test_same_answer_as_the_standard_library(body: bytes) -> None:
    expected = reference(body)
    try:
        got: Any = load_json_records(body)
    except InvalidInput as exc:
        got = ("error", "not an object" if "JSON object" in str(exc) else str(exc))
    except RecursionError:
        got = ("error", "RecursionError")
    if isinstance(expected, tuple):
        assert isinstance(got, tuple), got
        if expected[1] != "not an object":
            assert got[1] in (expected[1], f"body is not valid UTF-8 JSON ({expected[1]})")
    else:
        assert got == expected
        # types too: a Decimal is dumped as a string, a float as a number
        assert json.dumps(got, default=repr) == json.dumps(expected, default=repr)
