"""JSON output with exact decimals: a Decimal is written as the number it is, never via float."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError("non-finite decimal cannot be written as JSON")
        return orjson.Fragment(format(value, "f").encode())
    raise TypeError(f"cannot serialize {type(value).__name__}")


def dumps(obj: Any, *, sort_keys: bool = False, indent: bool = False) -> str:
    option = orjson.OPT_SORT_KEYS if sort_keys else 0
    if indent:
        option |= orjson.OPT_INDENT_2
    return orjson.dumps(obj, default=_default, option=option).decode()


def dumpb(obj: Any, *, sort_keys: bool = False) -> bytes:
    return orjson.dumps(obj, default=_default, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
