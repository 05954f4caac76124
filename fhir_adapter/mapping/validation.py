"""Every emitted resource is proven valid before it leaves the adapter (SPEC §6).

Two checks: the structure with ``fhir.resources`` (R4B models for R4 - the resources used here
are identical in R4 and R4B - and the default R5 models), and every status and coding against
the value set it belongs to (fhir.resources does not check codes). A failure is a bug of the
adapter: it raises :class:`InvalidResource`, and the resource is never written or sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from fhir.resources import get_fhir_model_class as r5_model
from fhir.resources.R4B import get_fhir_model_class as r4b_model
from pydantic import ValidationError

from fhir_adapter.errors import AdapterError, ExitCode
from fhir_adapter.mapping.context import Resource
from fhir_adapter.mapping.terminology import Terminology


class InvalidResource(AdapterError):
    """An emitted resource failed validation: a bug, never sent."""

    exit_code = ExitCode.INTERNAL


@cache
def _model(version: str, resource_type: str) -> Any:
    if version == "R4":
        return r4b_model(resource_type)
    return r5_model(resource_type)


def _where(resource: Resource) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def validate_structure(resource: Resource, version: str) -> None:
    try:
        _model(version, str(resource["resourceType"])).model_validate(resource)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)[:5]
        )
        raise InvalidResource(
            f"{_where(resource)} is not valid FHIR {version}: {problems}"
        ) from None


class ValueSetChecker:
    """Checks top-level coded elements and every Coding against the value sets of fhir.yaml."""

    def __init__(self, terminology: Terminology, version: str) -> None:
        self.version = version
        self.elements: dict[str, dict[str, frozenset[str]]] = {}
        for path, codes in terminology.value_sets(version).items():
            resource_type, element = path.split(".", 1)
            self.elements.setdefault(resource_type, {})[element] = codes
        self.codings = terminology.coding_value_sets_for(version)

    def problems(self, resource: Resource) -> list[str]:
        found = []
        for element, allowed in self.elements.get(str(resource["resourceType"]), {}).items():
            value = resource.get(element)
            if value is not None and value not in allowed:
                found.append(f"{element} {value!r} is not in its value set")
        for coding in _codings(resource):
            known = self.codings.get(str(coding.get("system")))
            if known is not None and coding.get("code") not in known:
                found.append(f"code {coding.get('code')!r} is not in {coding.get('system')}")
        return found

    def check(self, resource: Resource) -> None:
        found = self.problems(resource)
        if found:
            raise InvalidResource(f"{_where(resource)}: " + "; ".join(found))


def _codings(node: Any) -> Iterator[dict[str, Any]]:
    """Every Coding-shaped dict (system + code) anywhere in the resource."""
    if isinstance(node, dict):
        if "system" in node and "code" in node and isinstance(node.get("code"), str):
            yield node
        for value in node.values():
            if isinstance(value, dict | list):
                yield from _codings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _codings(item)


def validated(
    resources: Iterable[Resource],
    terminology: Terminology,
    version: str,
    *,
    structure: bool = True,
) -> Iterator[Resource]:
    """Pass resources through both checks; raises on the first invalid one."""
    checker = ValueSetChecker(terminology, version)
    for resource in resources:
        checker.check(resource)
        if structure:
            validate_structure(resource, version)
        yield resource
