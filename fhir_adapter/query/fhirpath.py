"""FHIRPath for the view engine: ``fhirpathpy`` plus the functions SQL on FHIR v2 adds.

fhirpathpy parses and evaluates; this module compiles an expression once, checks it names only
known functions and defined constants (so a bad ViewDefinition is refused before any row), and
registers ``getResourceKey()``, ``getReferenceKey([type])``, ``lowBoundary()`` and
``highBoundary()`` (the latter two are not in fhirpathpy).

Keys: ``getResourceKey()`` is ``Type/id`` and ``getReferenceKey()`` turns a relative or absolute
literal reference (``Patient/1``, ``https://x/fhir/Patient/1/_history/2``) into the same
``Type/id``; any other reference (``urn:uuid:``, ``#contained``, logical) has no key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from fhirpathpy.engine import do_eval as _do_eval
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.nodes import FP_Type, ResourceNode, TypeInfo
from fhirpathpy.engine.util import arraify as _arraify
from fhirpathpy.engine.util import get_data as _get_data
from fhirpathpy.models import models
from fhirpathpy.parser import parse as _parse


# fhirpathpy's engine functions carry no annotations: typed once here
def get_data(value: Any) -> Any:
    return _get_data(value)  # type: ignore[no-untyped-call]


def arraify(value: Any) -> list[Any]:
    return list(_arraify(value))  # type: ignore[no-untyped-call]


def do_eval(ctx: dict[str, Any], data: Any, node: Any) -> Any:
    return _do_eval(ctx, data, node)  # type: ignore[no-untyped-call]


def parse(text: str) -> dict[str, Any]:
    return dict(_parse(text))  # type: ignore[no-untyped-call]


#: environment variables every expression may use besides the view's constants
BUILTIN_VARIABLES = frozenset(
    {"rowIndex", "resource", "rootResource", "context", "ucum", "sct", "loinc"}
)
_MODELS = {"4.0.1": "r4", "4.0": "r4", "5.0.0": "r5", "5.0": "r5", "3.0.2": "stu3", "3.0": "stu3"}


class FhirPathError(ValueError):
    """An expression that does not parse or uses an unknown function or constant."""


def model_for(fhir_versions: Iterable[str] | None) -> dict[str, Any]:
    """The fhirpathpy type model for a ViewDefinition's ``fhirVersion`` (R4 by default)."""
    names = [_MODELS[v] for v in fhir_versions or () if v in _MODELS]
    return dict(models["r4" if not names or "r4" in names else names[0]])


def resource_types(model: Mapping[str, Any]) -> frozenset[str]:
    parents = model["type2Parent"]
    return frozenset(t for t, p in parents.items() if p in ("DomainResource", "Resource")) | {
        "Bundle",
        "Binary",
        "Parameters",
    }


# -- SQL on FHIR functions -----------------------------------------------------------------------
_REFERENCE = re.compile(
    r"^(?:[a-z][a-z0-9+.-]*://[^#]*?/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
)


def _resource_key(_ctx: Any, inputs: list[Any]) -> list[str]:
    out = []
    for item in inputs:
        data = get_data(item)
        if isinstance(data, Mapping) and data.get("resourceType") and data.get("id"):
            out.append(f"{data['resourceType']}/{data['id']}")
    return out


def reference_key(reference: Any, wanted: str | None = None) -> str | None:
    """``Type/id`` of a literal reference, or None (also when it is not of type ``wanted``)."""
    if not isinstance(reference, str):
        return None
    match = _REFERENCE.match(reference)
    if match is None or (wanted is not None and match.group(1) != wanted):
        return None
    return f"{match.group(1)}/{match.group(2)}"


def _reference_key(_ctx: Any, inputs: list[Any], wanted: Any = None) -> list[str]:
    name = wanted.name if isinstance(wanted, TypeInfo) else None
    out = []
    for item in inputs:
        data = get_data(item)
        key = reference_key(data.get("reference") if isinstance(data, Mapping) else None, name)
        if key is not None:
            out.append(key)
    return out


_TIME = re.compile(r"^(\d\d)(?::(\d\d)(?::(\d\d)(?:\.(\d+))?)?)?$")
_DATETIME = re.compile(
    r"^(\d{4})(?:-(\d\d)(?:-(\d\d)(?:T(\d\d)(?::(\d\d)(?::(\d\d)(?:\.(\d+))?)?)?"
    r"(Z|[+-]\d\d:\d\d)?)?)?)?$"
)
_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _month_days(year: int, month: int) -> int:
    leap = month == 2 and (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0))
    return _DAYS[month - 1] + int(leap)


def _decimal_boundary(value: Decimal, high: bool, precision: int | None) -> Decimal:
    exponent = value.as_tuple().exponent
    digits = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    half = Decimal(5).scaleb(-(digits + 1))
    bound = value + half if high else value - half
    return bound.quantize(Decimal(1).scaleb(-(precision if precision is not None else 8)))


def _date_boundary(text: str, high: bool, with_time: bool) -> str | None:
    match = _DATETIME.match(text)
    if match is None:
        return None
    y, mo, d, h, mi, s, frac, tz = match.groups()
    month = int(mo) if mo else (12 if high else 1)
    day = int(d) if d else (_month_days(int(y), month) if high else 1)
    date = f"{y}-{month:02d}-{day:02d}"
    if not with_time:
        return date
    return date + "T" + _clock(h, mi, s, frac, high) + (tz or ("-12:00" if high else "+14:00"))


def _clock(h: str | None, mi: str | None, s: str | None, frac: str | None, high: bool) -> str:
    top = {"h": "23", "m": "59", "s": "59", "f": "999"} if high else dict.fromkeys("hmsf", "0")
    millis = (frac + "000")[:3] if frac else top["f"].rjust(3, "0")
    return f"{h or top['h'].rjust(2, '0')}:{mi or top['m'].rjust(2, '0')}:" + (
        f"{s or top['s'].rjust(2, '0')}.{millis}"
    )


def _boundary(item: Any, high: bool, precision: int | None) -> Any:
    path = item.path if isinstance(item, ResourceNode) else None
    data = get_data(item)
    if path == "Period" and isinstance(data, Mapping):
        edge = data.get("end" if high else "start")
        return None if edge is None else _date_boundary(str(edge), high, with_time=True)
    if isinstance(data, FP_Type):
        data = str(data).lstrip("@")
    if isinstance(data, bool):
        return None
    if isinstance(data, int | Decimal):
        return _decimal_boundary(Decimal(data), high, precision)
    if not isinstance(data, str):
        return None
    time = _TIME.match(data) if path in (None, "time") and "-" not in data else None
    if time is not None:
        hour, minute, second, fraction = time.groups()
        return _clock(hour, minute, second, fraction, high)
    with_time = path in ("dateTime", "instant") or (path is None and "T" in data)
    return _date_boundary(data.rstrip("T"), high, with_time)


def _boundary_fn(high: bool) -> Callable[..., list[Any]]:
    def fn(_ctx: Any, inputs: list[Any], precision: Any = None) -> list[Any]:
        digits = int(precision) if isinstance(precision, int) else None
        out = [_boundary(item, high, digits) for item in inputs]
        return [o for o in out if o is not None]

    return fn


def _join(_ctx: Any, inputs: list[Any], separator: Any = None) -> list[str]:
    """join([separator]): an empty collection joins to '' (fhirpathpy gives empty)."""
    sep = separator if isinstance(separator, str) else ""
    return [sep.join(str(_plain(i)) for i in inputs)]


FUNCTIONS: dict[str, dict[str, Any]] = {
    "join": {"fn": _join, "arity": {0: [], 1: ["String"]}},
    "getResourceKey": {"fn": _resource_key, "arity": {0: []}},
    "getReferenceKey": {"fn": _reference_key, "arity": {0: [], 1: ["TypeSpecifier"]}},
    "lowBoundary": {"fn": _boundary_fn(high=False), "arity": {0: [], 1: ["Integer"]}},
    "highBoundary": {"fn": _boundary_fn(high=True), "arity": {0: [], 1: ["Integer"]}},
}
KNOWN_FUNCTIONS = frozenset(invocation_registry) | frozenset(FUNCTIONS)


# -- compile and evaluate ------------------------------------------------------------------------
def _walk(node: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield node
    for child in node.get("children", []):
        yield from _walk(child)


class Expression:
    """One compiled FHIRPath expression."""

    def __init__(self, text: str, variables: Iterable[str], model: dict[str, Any]) -> None:
        if not isinstance(text, str) or not text.strip():
            raise FhirPathError("an expression must be a non-empty string")
        try:
            self.tree = parse(text)
        except Exception as exc:
            raise FhirPathError(f"invalid FHIRPath {text!r} ({exc.__class__.__name__})") from None
        self.text = text
        self.model = model
        known = set(variables) | BUILTIN_VARIABLES
        for node in _walk(self.tree):
            if node.get("type") == "Functn":
                name = node["children"][0].get("text")
                if name not in KNOWN_FUNCTIONS:
                    raise FhirPathError(f"unknown function {name}() in {text!r}")
            elif node.get("type") == "ExternalConstant":
                name = str(node["children"][0].get("text", "")).strip("`")
                if name not in known:
                    raise FhirPathError(f"undefined constant %{name} in {text!r}")

    def nodes(self, data: Any, variables: Mapping[str, Any]) -> list[Any]:
        """The result with its FHIR type information kept (for forEach foci)."""
        root = arraify(data)
        env: dict[str, Any] = {"context": data, "ucum": "http://unitsofmeasure.org", **variables}
        if variables.get("resource") is not None:
            env.setdefault("rootResource", variables["resource"])
        ctx = {
            "dataRoot": root,
            "$this": root,  # $this at the start of a path is the input (fhirpathpy has none)
            "vars": env,
            "model": self.model,
            "userInvocationTable": FUNCTIONS,
        }
        try:
            result = do_eval(ctx, root, self.tree["children"][0])
        except FhirPathError:
            raise
        except Exception as exc:
            raise FhirPathError(f"cannot evaluate {self.text!r}: {exc}") from None
        return [item for item in arraify(result) if not _only_extension(item)]

    def values(self, data: Any, variables: Mapping[str, Any]) -> list[Any]:
        """The result as plain values: str, bool, int, Decimal, or dict for complex types."""
        return [_plain(item) for item in self.nodes(data, variables)]


def _only_extension(item: Any) -> bool:
    data = get_data(item)
    return isinstance(data, Mapping) and list(data) == ["extension"]


def _plain(item: Any) -> Any:
    data = get_data(item)
    if isinstance(data, FP_Type):
        return str(data).lstrip("@")
    if isinstance(data, Mapping):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_plain(v) for v in data]
    return data


__all__ = [
    "BUILTIN_VARIABLES",
    "Expression",
    "FhirPathError",
    "model_for",
    "reference_key",
    "resource_types",
]
