"""First pass of the export: who is who, before anything is rewritten.

For every resource of the trial the index keeps its business key (the ``meta.tag`` under the
trial's identifier base, SPEC §6), the references that lead to its subject and the references it
cannot live without. From these it decides which resources are exported, each one's new id, and
each one's subject, so the second pass rewrites every reference consistently and shifts all of a
subject's dates by the same offset. It holds a few strings per resource, never the resources.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fhir_adapter.export.keys import Keys
from fhir_adapter.export.rules import DeidRules, TypeRule

Key = tuple[str, str]  # (resourceType, source id)


@dataclass(slots=True)
class Entry:
    identity: str  # the business key
    subject_refs: tuple[Key, ...]
    required_refs: tuple[Key, ...]
    exported: bool = True
    problem: str | None = None  # why it is withheld (no personal data)
    subject: str | None = None  # the subject's business key
    written: bool = False  # set by the second pass: a resource twice in the source goes once


def values_at(node: Any, path: list[str]) -> Iterator[Any]:
    """Every value at a dotted path; arrays are transparent."""
    if isinstance(node, list):
        for item in node:
            yield from values_at(item, path)
        return
    if not path:
        yield node
        return
    if isinstance(node, dict) and path[0] in node:
        yield from values_at(node[path[0]], path[1:])


def parse_reference(reference: str, base_url: str | None = None) -> Key | None:
    """``Type/id`` (or ``Type/id/_history/n``, or absolute under ``base_url``) -> key."""
    if base_url and reference.startswith(base_url.rstrip("/") + "/"):
        reference = reference[len(base_url.rstrip("/")) + 1 :]
    parts = reference.split("/")
    if len(parts) == 4 and parts[2] == "_history":
        parts = parts[:2]
    if len(parts) != 2 or not parts[0][:1].isupper() or not parts[0].isalpha() or not parts[1]:
        return None
    return parts[0], parts[1]


class ResourceIndex:
    """Business keys, subjects and export decisions of every resource of the trial."""

    def __init__(
        self, rules: DeidRules, keys: Keys, identifier_base: str, base_url: str | None = None
    ) -> None:
        self.rules = rules
        self.keys = keys
        self.prefix = identifier_base.rstrip(":") + ":"
        self.base_url = base_url
        self.entries: dict[Key, Entry] = {}
        self.owners: dict[tuple[str, str], str] = {}  # (type, business key) -> first source id
        self.not_exported: Counter[str] = Counter()  # type -> resources left out
        self.outside_trial: Counter[str] = Counter()

    # -- building ---------------------------------------------------------------------------
    def business_key(self, resource: dict[str, Any]) -> str | None:
        for tag in values_at(resource, ["meta", "tag"]):
            if self._ours(tag, "code"):
                return str(tag["code"])
        for identifier in values_at(resource, ["identifier"]):
            if self._ours(identifier, "value"):
                return str(identifier["value"])
        return None

    def _ours(self, coding: Any, field: str) -> bool:
        return (
            isinstance(coding, dict)
            and str(coding.get("system", "")).startswith(self.prefix)
            and isinstance(coding.get(field), str)
            and bool(coding[field])
        )

    def _refs(self, resource: dict[str, Any], paths: tuple[str, ...]) -> tuple[Key, ...]:
        found = []
        for path in paths:
            for ref in values_at(resource, [*path.split("."), "reference"]):
                key = parse_reference(ref, self.base_url) if isinstance(ref, str) else None
                if key is not None:
                    found.append(key)
        return tuple(found)

    def add(self, resource: dict[str, Any]) -> None:
        rtype = str(resource.get("resourceType", ""))
        rule = self.rules.types.get(rtype)
        if rule is None:
            self.not_exported[rtype] += 1
            return
        identity = self.business_key(resource)
        sid = resource.get("id")
        if identity is None or not isinstance(sid, str):
            self.outside_trial[rtype] += 1
            return
        key = (sys.intern(rtype), sid)
        if key in self.entries:
            return  # the same resource twice in the source: exported once
        subject_paths = rule.subject if isinstance(rule.subject, tuple) else ()
        entry = Entry(
            identity, self._refs(resource, subject_paths), self._refs(resource, rule.required)
        )
        owner = self.owners.setdefault((rtype, identity), sid)
        if owner != sid:
            entry.exported = False
            entry.problem = "another resource of this type has the same business key"
        self.entries[key] = entry

    # -- deciding ---------------------------------------------------------------------------
    def finish(self) -> None:
        self._drop_without_required()
        for key, entry in self.entries.items():
            rule = self.rules.types[key[0]]
            if not rule.subject_bound:
                continue
            subjects = self._subjects(key, set())
            if len(subjects) == 1:
                entry.subject = next(iter(subjects))
            elif entry.exported:
                entry.exported = False
                entry.problem = (
                    "its subject cannot be found" if not subjects else "it refers to two subjects"
                )

    def _drop_without_required(self) -> None:
        changed = True
        while changed:
            changed = False
            for key, entry in self.entries.items():
                if not entry.exported or not self.rules.types[key[0]].required:
                    continue
                if not any(self.exported(ref) for ref in entry.required_refs):
                    entry.exported = False  # e.g. a Provenance of a MeasureReport not exported
                    self.not_exported[key[0]] += 1
                    changed = True

    def _subjects(self, key: Key, seen: set[Key]) -> set[str]:
        entry = self.entries.get(key)
        if entry is None or key in seen:
            return set()
        rule: TypeRule = self.rules.types[key[0]]
        if rule.subject == "self":
            return {entry.identity}
        if entry.subject is not None:
            return {entry.subject}
        seen.add(key)
        found: set[str] = set()
        for ref in entry.subject_refs:
            found |= self._subjects(ref, seen)
        return found

    # -- answers ----------------------------------------------------------------------------
    def target(self, key: Key) -> Key:
        """The resource that represents ``key`` in the export (the first of a business key)."""
        entry = self.entries.get(key)
        if entry is None:
            return key
        owner = self.owners.get((key[0], entry.identity), key[1])
        return (key[0], owner)

    def exported(self, key: Key) -> bool:
        entry = self.entries.get(self.target(key))
        return entry is not None and entry.exported

    def new_id(self, key: Key) -> str:
        entry = self.entries[self.target(key)]
        if self.rules.types[key[0]].keeps_id():
            return entry.identity
        return self.keys.pseudonym(entry.identity)

    def resolve(self, reference: str) -> str | None:
        """The reference as it reads in the export, or None when its target is not exported."""
        key = parse_reference(reference, self.base_url)
        if key is None or not self.exported(key):
            return None
        return f"{key[0]}/{self.new_id(key)}"


__all__ = ["Entry", "Key", "ResourceIndex", "parse_reference", "values_at"]
