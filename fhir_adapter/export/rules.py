"""The de-identification allow-list (``mappings/deidentify.yaml``) loaded and checked at start-up.

Rules are ``path: action`` per resource type, compiled into a tree of element names; the longest
path matching an element decides its action, and anything no rule reaches is dropped. A broken
file is a :class:`ConfigurationError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fhir_adapter.errors import ConfigurationError
from fhir_adapter.trial import default_mappings_dir, describe_validation_error

Action = Literal["keep", "drop", "pseudonymize", "shift", "reference"]
ACTIONS: frozenset[str] = frozenset(Action.__args__)  # type: ignore[attr-defined]
FILE_NAME = "deidentify.yaml"

_SEGMENT = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


@dataclass
class RuleNode:
    """One element name of a rule path: its own action (if a rule ends here) and deeper rules.

    ``vocabulary``: a `keep` limited to the values of a closed list (e.g. the AE terms'
    displays), so free text written where a code's text is expected is dropped.
    """

    action: Action | None = None
    children: dict[str, RuleNode] = field(default_factory=dict)
    vocabulary: str | None = None

    def child(self, name: str) -> RuleNode | None:
        return self.children.get(name)

    def actions(self) -> set[str]:
        found: set[str] = {self.action} if self.action else set()
        for node in self.children.values():
            found |= node.actions()
        return found

    def vocabularies(self) -> set[str]:
        found = {self.vocabulary} if self.vocabulary else set()
        for node in self.children.values():
            found |= node.vocabularies()
        return found


Rule = str | dict[str, str]  # an action, or {keep: VOCABULARY}


def compile_rules(rules: dict[str, Rule]) -> RuleNode:
    root = RuleNode()
    for path, rule in rules.items():
        node = root
        for segment in path.split("."):
            node = node.children.setdefault(segment, RuleNode())
        if isinstance(rule, dict):
            node.action, node.vocabulary = "keep", rule["keep"]
        else:
            node.action = rule  # type: ignore[assignment]
    return root


@dataclass
class ExtensionRule:
    """What to keep of an extension: its elements (``valueX``) and its sub-extensions by URL."""

    drop: bool
    elements: RuleNode
    extensions: dict[str, ExtensionRule]


@dataclass
class TypeRule:
    rules: RuleNode
    subject: Literal["self"] | tuple[str, ...] | None
    required: tuple[str, ...]

    @property
    def subject_bound(self) -> bool:
        """True for a subject's resources (pseudonymized, dates shifted)."""
        return self.subject is not None

    def keeps_id(self) -> bool:
        node = self.rules.child("id")
        return node is not None and node.action == "keep"


@dataclass
class DeidRules:
    types: dict[str, TypeRule]
    dropped_types: frozenset[str]
    extensions: dict[str, ExtensionRule]
    hex_length: int
    max_shift_days: int
    digest: str  # sha256 of the file: which allow-list made an export

    @property
    def exported_types(self) -> list[str]:
        return sorted(self.types)


# -- the file's shape ------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_paths(rules: dict[str, Rule]) -> dict[str, Rule]:
    for path, rule in rules.items():
        if not all(_SEGMENT.match(s) for s in path.split(".")):
            raise ValueError(f"{path!r} is not a dotted path of element names")
        if isinstance(rule, dict):
            if set(rule) != {"keep"} or not isinstance(rule["keep"], str):
                raise ValueError(f"{path}: a limited rule reads {{keep: VOCABULARY}}")
        elif rule not in ACTIONS:
            raise ValueError(f"{path}: unknown action {rule!r} (one of {sorted(ACTIONS)})")
    return rules


class _Pseudonym(_Model):
    hex_length: Annotated[int, Field(ge=16, le=64)]


class _DateShift(_Model):
    max_days: Annotated[int, Field(ge=1, le=3650)]


class _TypeSpec(_Model):
    subject: Literal["self"] | list[str] | None = None
    required: list[str] = Field(default_factory=list)
    rules: dict[str, Rule]

    @field_validator("rules")
    @classmethod
    def _paths(cls, value: dict[str, Rule]) -> dict[str, Rule]:
        return _check_paths(value)


class _File(_Model):
    version: Literal[1]
    pseudonym: _Pseudonym
    date_shift: _DateShift
    common: dict[str, Rule]
    extensions: dict[str, Any]
    types: dict[str, _TypeSpec | Literal["drop"]]

    @field_validator("common")
    @classmethod
    def _common_paths(cls, value: dict[str, Rule]) -> dict[str, Rule]:
        return _check_paths(value)


def _extension_rule(where: str, spec: Any) -> ExtensionRule:
    if spec == "drop":
        return ExtensionRule(True, RuleNode(), {})
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where}: an extension's rules must be a mapping or 'drop'")
    subs = spec.get("extension", {})
    if not isinstance(subs, dict):
        raise ConfigurationError(f"{where}.extension: sub-extensions must be a mapping by URL")
    elements = {k: v for k, v in spec.items() if k != "extension"}
    try:
        _check_paths(elements)
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return ExtensionRule(
        False,
        compile_rules(elements),
        {url: _extension_rule(f"{where}.extension.{url}", s) for url, s in subs.items()},
    )


def _type_rule(name: str, spec: _TypeSpec, common: dict[str, Rule], where: str) -> TypeRule:
    merged: dict[str, Any] = {**common, **spec.rules}
    node = compile_rules(merged)
    subject: Literal["self"] | tuple[str, ...] | None = (
        tuple(spec.subject) if isinstance(spec.subject, list) else spec.subject
    )
    rule = TypeRule(node, subject, tuple(spec.required))
    if not rule.subject_bound and "shift" in node.actions():
        raise ConfigurationError(
            f"{where}: types.{name}: `shift` needs a subject (dates move by the subject's offset)"
        )
    return rule


def load_rules(
    mappings_dir: Path | None = None, vocabularies: Iterable[str] | None = None
) -> DeidRules:
    """The allow-list; ``vocabularies``: the names a ``{keep: NAME}`` rule may use."""
    path = (mappings_dir or default_mappings_dir()) / FILE_NAME
    try:
        raw = path.read_bytes()
        data = yaml.safe_load(raw)
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: de-identification allow-list not found") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    try:
        spec = _File.model_validate(data)
    except ValidationError as exc:
        raise ConfigurationError(describe_validation_error(str(path), exc)) from None
    types = {
        name: _type_rule(name, t, spec.common, str(path))
        for name, t in spec.types.items()
        if isinstance(t, _TypeSpec)
    }
    extensions = {
        url: _extension_rule(f"{path}: extensions.{url}", s) for url, s in spec.extensions.items()
    }
    if vocabularies is not None:
        _check_vocabularies(str(path), types, extensions, set(vocabularies))
    return DeidRules(
        types=types,
        dropped_types=frozenset(n for n, t in spec.types.items() if t == "drop"),
        extensions=extensions,
        hex_length=spec.pseudonym.hex_length,
        max_shift_days=spec.date_shift.max_days,
        digest=hashlib.sha256(raw).hexdigest(),
    )


def _check_vocabularies(
    where: str, types: dict[str, TypeRule], extensions: dict[str, ExtensionRule], known: set[str]
) -> None:
    used: set[str] = set()
    for rule in types.values():
        used |= rule.rules.vocabularies()
    pending = list(extensions.values())
    while pending:
        ext = pending.pop()
        used |= ext.elements.vocabularies()
        pending.extend(ext.extensions.values())
    unknown = used - known
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown vocabularies {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )


__all__ = [
    "ACTIONS",
    "Action",
    "DeidRules",
    "ExtensionRule",
    "RuleNode",
    "TypeRule",
    "compile_rules",
    "load_rules",
]
