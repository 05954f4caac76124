"""Second pass of the export: one resource through the allow-list (``mappings/deidentify.yaml``).

Pure: the resource in, its de-identified copy (or the reason it is withheld) out. Every element
is looked up in the type's rule tree; what no rule reaches is dropped. Whatever the rules say,
references are rewritten (or dropped with their target), unlisted extensions and primitive
extensions (``_field``) are removed, and in a subject's resources a kept string that looks like a
date or carries the subject's or the resource's own business key is removed: a mistake in the
allow-list loses a value rather than leaks it. Object keys come out in sorted order (after
``resourceType``, ``id`` and ``meta``), so the bytes do not depend on how the source ordered them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fhir_adapter.export.keys import DATE_LIKE, Keys, as_instant, shift_date
from fhir_adapter.export.rules import Action, DeidRules, ExtensionRule, RuleNode, TypeRule

_DROP = object()  # "nothing left of this element"
_FIRST = ("resourceType", "id", "meta")


class Withheld(Exception):
    """The resource cannot be exported safely (e.g. an unknown modifier extension)."""


@dataclass
class ScrubContext:
    """What the scrubber knows about the resource at hand."""

    rtype: str
    new_id: str
    identity: str  # its business key (never written)
    subject: str | None  # its subject's business key (never written)
    shift_days: int | None
    resolve: Callable[[str], str | None]


@dataclass
class Findings:
    """What was removed beyond the rules' plain drops, counted by type and path (no values)."""

    unknown_extensions: Counter[tuple[str, str]] = field(default_factory=Counter)
    guarded: Counter[tuple[str, str]] = field(default_factory=Counter)  # kept strings removed
    unparsable_dates: Counter[tuple[str, str]] = field(default_factory=Counter)
    dangling: Counter[tuple[str, str]] = field(default_factory=Counter)  # references dropped
    unlisted: Counter[tuple[str, str]] = field(default_factory=Counter)  # not in a vocabulary
    latest: dt.datetime | None = None  # the latest source date seen by `shift`


class Scrubber:
    """Applies the allow-list; collects :class:`Findings` across resources."""

    def __init__(
        self,
        rules: DeidRules,
        keys: Keys,
        identifier_base: str,
        tz: dt.tzinfo,
        vocabularies: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.rules = rules
        self.vocabularies = vocabularies or {}
        self.keys = keys
        self.prefix = identifier_base.rstrip(":") + ":"
        self.tz = tz
        self.findings = Findings()

    def scrub(self, resource: dict[str, Any], ctx: ScrubContext) -> dict[str, Any]:
        rule = self.rules.types[ctx.rtype]
        walk = _Walk(self, rule, ctx)
        body = walk.node(resource, rule.rules, "drop", ctx.rtype)
        out: dict[str, Any] = {"resourceType": ctx.rtype, "id": ctx.new_id}
        if isinstance(body, dict):
            out.update((k, v) for k, v in body.items() if k not in ("resourceType", "id"))
        return _ordered(out)


def _ordered(resource: dict[str, Any]) -> dict[str, Any]:
    head = {k: resource[k] for k in _FIRST if k in resource}
    return head | {k: resource[k] for k in sorted(resource) if k not in head}


class _Walk:
    """One resource's walk through its rule tree."""

    def __init__(self, scrubber: Scrubber, rule: TypeRule, ctx: ScrubContext) -> None:
        self.s = scrubber
        self.rule = rule
        self.ctx = ctx
        # business keys too short to search for safely are left to the rules alone
        self.guard = [v for v in (ctx.subject, ctx.identity) if v and len(v) >= 3]

    # -- dispatch ---------------------------------------------------------------------------
    def node(self, value: Any, rule: RuleNode | None, inherited: Action, path: str) -> Any:
        action: Action = rule.action if rule is not None and rule.action else inherited
        if isinstance(value, list):
            items = [self.node(v, rule, inherited, path) for v in value]
            kept = [v for v in items if v is not _DROP]
            return kept or _DROP
        if action == "drop" and (rule is None or not rule.children):
            return _DROP
        if isinstance(value, dict):
            return self.mapping(value, rule, action, path)
        if rule is not None and rule.vocabulary is not None and rule.action:
            return self.listed(value, rule.vocabulary, path)
        return self.scalar(value, action, path)

    def mapping(
        self, value: dict[str, Any], rule: RuleNode | None, action: Action, path: str
    ) -> Any:
        if action == "reference" or (action == "keep" and isinstance(value.get("reference"), str)):
            return self.reference(value, rule, action, path)
        if action == "pseudonymize":
            return self.pseudonymized(value)
        out: dict[str, Any] = {}
        for key in sorted(value):
            child = rule.child(key) if rule is not None else None
            result = self.element(key, value[key], child, action, f"{path}.{key}")
            if result is not _DROP:
                out[key] = result
        return out or _DROP

    def element(
        self, key: str, value: Any, rule: RuleNode | None, action: Action, path: str
    ) -> Any:
        if key.startswith("_"):
            return _DROP  # primitive extensions: not on any list
        effective = rule.action if rule is not None and rule.action else action
        if key in ("extension", "modifierExtension") and effective == "keep":
            return self.extensions(value, self.s.rules.extensions, key == "modifierExtension", path)
        return self.node(value, rule, action, path)

    # -- actions ----------------------------------------------------------------------------
    def scalar(self, value: Any, action: Action, path: str) -> Any:
        if action == "keep":
            return self.guarded(value, path)
        if action == "pseudonymize" and isinstance(value, str):
            return self.s.keys.pseudonym(value)
        if action == "shift" and isinstance(value, str):
            return self.shifted(value, path)
        return _DROP

    def listed(self, value: Any, vocabulary: str, path: str) -> Any:
        if value in self.s.vocabularies.get(vocabulary, frozenset()):
            return value
        self.s.findings.unlisted[(self.ctx.rtype, path)] += 1
        return _DROP

    def guarded(self, value: Any, path: str) -> Any:
        if not isinstance(value, str) or not self.rule.subject_bound:
            return value
        if DATE_LIKE.search(value) or any(_mentions(value, g) for g in self.guard):
            self.s.findings.guarded[(self.ctx.rtype, path)] += 1
            return _DROP
        return value

    def shifted(self, value: str, path: str) -> Any:
        days = self.ctx.shift_days
        moved = shift_date(value, days) if days is not None else None
        if moved is None:
            self.s.findings.unparsable_dates[(self.ctx.rtype, path)] += 1
            return _DROP
        moment = as_instant(value, self.s.tz)
        findings = self.s.findings
        if moment is not None and (findings.latest is None or moment > findings.latest):
            findings.latest = moment
        return moved

    def pseudonymized(self, value: dict[str, Any]) -> Any:
        """An Identifier (value) or a Coding (code) of the trial's systems: system + pseudonym."""
        system = value.get("system")
        if not isinstance(system, str) or not system.startswith(self.s.prefix):
            return _DROP  # e.g. the hospital MRN, a server's own tags
        for field_name in ("value", "code"):
            if isinstance(value.get(field_name), str):
                return {"system": system, field_name: self.s.keys.pseudonym(value[field_name])}
        return _DROP

    def reference(
        self, value: dict[str, Any], rule: RuleNode | None, action: Action, path: str
    ) -> Any:
        raw = value.get("reference")
        resolved = self.ctx.resolve(raw) if isinstance(raw, str) else None
        if resolved is None:
            self.s.findings.dangling[(self.ctx.rtype, path)] += 1
            return _DROP  # a logical reference (identifier only) may carry an MRN: dropped too
        out: dict[str, Any] = {"reference": resolved}
        if isinstance(value.get("type"), str):
            out["type"] = value["type"]
        inner: Action = "keep" if action == "keep" else "drop"
        for key in sorted(value):
            if key in ("reference", "type"):
                continue
            child = rule.child(key) if rule is not None else None
            result = self.element(key, value[key], child, inner, f"{path}.{key}")
            if result is not _DROP:
                out[key] = result
        return dict(sorted(out.items()))

    def extensions(
        self, value: Any, table: dict[str, ExtensionRule], modifier: bool, path: str
    ) -> Any:
        kept = []
        for item in value if isinstance(value, list) else [value]:
            url = item.get("url") if isinstance(item, dict) else None
            rule = table.get(url) if isinstance(url, str) else None
            if rule is None or rule.drop:
                if modifier:
                    raise Withheld(f"an unlisted modifier extension at {path}")
                if rule is None:
                    self.s.findings.unknown_extensions[(self.ctx.rtype, str(url))] += 1
                continue
            out: dict[str, Any] = {"url": url}
            for key in sorted(item):
                if key == "url" or key.startswith("_"):
                    continue
                if key == "extension":
                    result = self.extensions(item[key], rule.extensions, False, f"{path}.{key}")
                else:
                    result = self.node(item[key], rule.elements.child(key), "drop", f"{path}.{key}")
                if result is not _DROP:
                    out[key] = result
            if len(out) > 1:
                kept.append(out)
        return kept or _DROP


def _mentions(text: str, key: str) -> bool:
    """``key`` in ``text`` as a token of its own (``S001`` in ``S001-m3``, not in ``S0012``)."""
    start = text.find(key)
    while start >= 0:
        end = start + len(key)
        before = text[start - 1] if start else ""
        after = text[end] if end < len(text) else ""
        if not before.isalnum() and not after.isalnum():
            return True
        start = text.find(key, start + 1)
    return False


__all__ = ["Findings", "ScrubContext", "Scrubber", "Withheld"]
