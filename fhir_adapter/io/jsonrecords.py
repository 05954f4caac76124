"""JSON records (the webhook's body): one record or a list, numbers parsed as Decimal."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from fhir_adapter.errors import InvalidInput


def load_json_records(body: bytes | str) -> list[dict[str, Any]]:
    """Parse a JSON record or a list of them. Numbers never pass through float."""
    try:
        data = json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput(f"record {i}: must be a JSON object")
    return records
