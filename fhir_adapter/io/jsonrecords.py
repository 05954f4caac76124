"""JSON records (the webhook's body): one record or a list, numbers parsed as Decimal."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

from fhir_adapter.errors import InvalidInput


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False


def load_json_records(body: bytes | str) -> list[dict[str, Any]]:
    """Parse a JSON record or a list of them. Numbers never pass through float.

    orjson first (several times faster, and most bodies hold integers and strings only); a body
    it refuses (big integers, NaN, UTF-16, too deep…) or that holds a decimal number is parsed
    again by the standard library with ``parse_float=Decimal``, which decides.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if data is None or _has_float(data):
        try:
            data = json.loads(body, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"body is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput(f"record {i}: must be a JSON object")
    return records
