"""Every emitted resource is proven valid before it leaves the adapter (SPEC §6).

Two checks: the structure with ``fhir.resources`` (R4B models for R4 - the resources used here
are identical in R4 and R4B - and the default R5 models), and every status and coding against
the value set it belongs to (fhir.resources does not check codes). A failure is a bug of the
adapter: it raises :class:`InvalidResource`, and the resource is never written or sent.

The structure is proven in one of two ways, with the same verdict:

- strict: every resource is validated with its ``fhir.resources`` model (``model_validate``);
- fast (the default): a resource's *shape* - its type, its keys and their nesting, list lengths,
  the Python type of each value and the target type of each reference - is validated with the
  model once, the first time it is seen. What a model checks beyond the shape (presence of
  required elements, choice elements ``value[x]``, unknown keys, list-ness, ...) depends on the
  shape only, so it holds for every later resource of that shape; what is left, the values,
  each goes through the validator ``fhir.resources`` itself declares for its element (the
  pydantic type of ``Observation.effectiveDateTime``, ``Reference.reference``, ...), taken
  from the model's fields. A shape whose elements cannot be told that way is validated whole,
  every time. The shapes are few (a few dozen on the synthetic set) and fixed by the mapping.
"""

from __future__ import annotations

import operator
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from typing import Any

from fhir.resources import get_fhir_model_class as r5_model
from fhir.resources.R4B import get_fhir_model_class as r4b_model
from pydantic import TypeAdapter, ValidationError

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


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)[:5]
    )


def validate_structure(resource: Resource, version: str) -> None:
    """The whole resource through its ``fhir.resources`` model (what strict mode does)."""
    try:
        _model(version, str(resource["resourceType"])).model_validate(resource)
    except ValidationError as exc:
        raise InvalidResource(
            f"{_where(resource)} is not valid FHIR {version}: {_problems(exc)}"
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

    def problems(
        self, resource: Resource, codings: Iterable[dict[str, Any]] | None = None
    ) -> list[str]:
        """What is wrong; ``codings``: the resource's Codings when the caller has them."""
        found = []
        for element, allowed in self.elements.get(str(resource["resourceType"]), {}).items():
            value = resource.get(element)
            if value is not None and value not in allowed:
                found.append(f"{element} {value!r} is not in its value set")
        for coding in _codings(resource) if codings is None else codings:
            known = self.codings.get(str(coding.get("system")))
            if known is not None and coding.get("code") not in known:
                found.append(f"code {coding.get('code')!r} is not in {coding.get('system')}")
        return found

    def check(self, resource: Resource, codings: Iterable[dict[str, Any]] | None = None) -> None:
        found = self.problems(resource, codings)
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


# -- fast mode: shapes proven once, values checked one by one --------------------------------
#: a local reference as the mapping writes it: ``Type/id`` (the id as FHIR's id type)
_LOCAL_REFERENCE = re.compile(r"([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}")
_OPEN, _CLOSE, _ITEM = "{", "}", "["

Check = Callable[[Any], Any]


class _Walk:
    """One resource taken apart: its shape (hashable), its values in order, its Codings."""

    __slots__ = ("codings", "shape", "values")

    def __init__(self, resource: Resource) -> None:
        self.shape: list[Any] = [resource.get("resourceType")]
        self.values: list[Any] = []
        self.codings: list[dict[str, Any]] = []
        self.node(resource)

    def node(self, node: dict[str, Any]) -> None:
        shape, values = self.shape, self.values
        if "code" in node and "system" in node and type(node["code"]) is str:
            self.codings.append(node)
        for key, value in node.items():
            kind = type(value)
            shape.append(key)
            if kind is dict:
                shape.append(_OPEN)
                self.node(value)
                shape.append(_CLOSE)
            elif kind is list:
                for item in value:
                    shape.append(_ITEM)
                    if type(item) is dict:
                        shape.append(_OPEN)
                        self.node(item)
                        shape.append(_CLOSE)
                    else:
                        shape.append(type(item))
                        values.append(item)
                shape.append(_CLOSE)
            else:
                if key == "reference":  # the target type is part of the shape
                    matched = _LOCAL_REFERENCE.fullmatch(value) if kind is str else None
                    shape.append(matched.group(1) if matched else None)
                shape.append(kind)
                values.append(value)


def _unwrap(annotation: Any) -> Any:
    """``Optional[List[X]]`` -> ``X`` (``X`` itself an ``Annotated`` primitive or a model type)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType or origin is list:
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return None
            annotation = args[0]
        else:
            return annotation


@cache
def _aliases(model: Any) -> dict[str, Any]:
    """JSON key -> element type of each field of ``model``."""
    return {
        (info.alias or name): _unwrap(info.annotation) for name, info in model.model_fields.items()
    }


@cache
def _values_check(element: Any) -> Check | None:
    """The validator fhir.resources declares for a primitive element, over a tuple of values
    (one call for all the values of that element type in a resource); None for a complex one."""
    if element is None or hasattr(element, "get_model_klass"):
        return None
    return TypeAdapter(tuple[element, ...]).validator.validate_python


#: the element types of a resource's values in walk order; None for ``resourceType``
Elements = list[Any]


def _plan(node: dict[str, Any], model: Any, out: Elements) -> bool:
    """The element type of each value of ``node`` in :class:`_Walk` order; False when one
    cannot be told (an unknown key, a value of a complex type)."""
    fields = _aliases(model)
    for key, value in node.items():
        if key == "resourceType":  # its value is part of the shape
            out.append(None)
            continue
        element = fields.get(key)
        if element is None:
            return False
        items = value if type(value) is list else [value]
        for item in items:
            if type(item) is dict:
                klass = getattr(element, "get_model_klass", None)
                if klass is None or not _plan(item, klass(), out):
                    return False
            elif _values_check(element) is None:
                return False
            else:
                out.append(element)
    return True


class _Checks:
    """The value checks of one shape: per element type, which values and their validator.

    A group's values that passed before pass again (equal values of one place in one shape
    are of one Python type): systems, units, displays repeat in every resource; ids and dates
    do not, and a group stops remembering at :attr:`LIMIT` (memory stays bounded).
    """

    __slots__ = ("groups",)
    LIMIT = 256

    def __init__(self, elements: Elements) -> None:
        by_element: dict[Any, list[int]] = {}
        for index, element in enumerate(elements):
            if element is not None:
                by_element.setdefault(element, []).append(index)
        self.groups: list[tuple[Callable[[list[Any]], tuple[Any, ...]], Check, set[Any]]] = []
        for element, indices in by_element.items():
            check = _values_check(element)
            if check is not None:  # always: _plan kept primitive elements only
                self.groups.append((_picker(indices), check, set()))

    def run(self, values: list[Any]) -> None:
        for pick, check, passed in self.groups:
            picked = pick(values)
            if picked not in passed:
                check(picked)
                if len(passed) < self.LIMIT:
                    passed.add(picked)


def _picker(indices: list[int]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """``values`` -> the tuple of ``values[i]`` for ``indices`` (itemgetter: in C)."""
    if len(indices) == 1:
        (index,) = indices
        return lambda values: (values[index],)
    return operator.itemgetter(*indices)


class ResourceValidator:
    """Proves each resource valid: value sets, local references and the structure (strict: with
    its fhir.resources model every time; fast: the shape once, then the values)."""

    def __init__(self, terminology: Terminology, version: str, *, strict: bool = False) -> None:
        self.version = version
        self.strict = strict
        self.value_sets = ValueSetChecker(terminology, version)
        #: shape -> the value checks of that shape, None: validated whole every time
        self.shapes: dict[tuple[Any, ...], _Checks | None] = {}
        #: resources validated whole with their model (strict: all of them)
        self.models_run = 0

    def check(self, resource: Resource) -> None:
        walk = _Walk(resource)
        self.value_sets.check(resource, walk.codings)
        if None in walk.shape:  # a reference that is not Type/id
            raise InvalidResource(f"{_where(resource)}: a reference is not of the form Type/id")
        if self.strict:
            self._whole(resource)
            return
        shape = tuple(walk.shape)
        try:
            checks = self.shapes[shape]
        except KeyError:
            self._whole(resource)
            self.shapes[shape] = self._checks(resource)
            return
        if checks is None:
            self._whole(resource)
            return
        try:
            checks.run(walk.values)
        except (ValidationError, TypeError):
            # the model decides (strict's verdict) and names the element: the tuple's error
            # does not
            self._whole(resource)

    def _whole(self, resource: Resource) -> None:
        self.models_run += 1
        validate_structure(resource, self.version)

    def _checks(self, resource: Resource) -> _Checks | None:
        elements: Elements = []
        model = _model(self.version, str(resource["resourceType"]))
        return _Checks(elements) if _plan(resource, model, elements) else None


def validated(
    resources: Iterable[Resource],
    terminology: Terminology,
    version: str,
    *,
    structure: bool = True,
    strict: bool = False,
) -> Iterator[Resource]:
    """Pass resources through the checks; raises on the first invalid one.

    ``structure=False``: value sets only (tests that look at other things); ``strict``: every
    resource through its fhir.resources model rather than its shape once (the same verdict).
    """
    if not structure:
        checker = ValueSetChecker(terminology, version)
        for resource in resources:
            checker.check(resource)
            yield resource
        return
    validator = ResourceValidator(terminology, version, strict=strict)
    for resource in resources:
        validator.check(resource)
        yield resource
