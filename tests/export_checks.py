"""Checks on a de-identified export (``fhir-adapter export``), shared by unit and integration tests.

Independent of the exporter's code: the pseudonym of a business key is recomputed here from its
documented definition (first 32 hex characters of HMAC-SHA256(key, domain + value)), dates are
compared as calendar dates, references and files are read back from disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.mapping.validation import ValueSetChecker, validate_structure
from fhir_adapter.trial import load_trial

Resource = dict[str, Any]
BASE = "urn:nct06677931:"
SUBJECT_TYPES = (
    "Patient",
    "ResearchSubject",
    "Consent",
    "Encounter",
    "Observation",
    "AdverseEvent",
    "Provenance",
)
FULL_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(T.*)?$")
INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def pseudonym(key: str, value: str) -> str:
    digest = hmac.new(
        key.encode(), b"fhir-adapter/deid/v1/pseudonym\x00" + value.encode(), hashlib.sha256
    )
    return digest.hexdigest()[:32]


def read_ndjson(path: Path) -> list[Resource]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line, parse_float=Decimal) for line in fh if line.strip()]


def load_export(out: Path) -> tuple[dict[str, Any], dict[str, list[Resource]]]:
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    by_type = {item["type"]: read_ndjson(out / item["url"]) for item in manifest["output"]}
    return manifest, by_type


def business_key(resource: Resource) -> str | None:
    for tag in (resource.get("meta") or {}).get("tag", []):
        if str(tag.get("system", "")).startswith(BASE):
            return str(tag["code"])
    return None


def strings(node: Any) -> Iterator[str]:
    """Every key and every string value, JSON escapes decoded."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, str):
        yield node


def every_string_in(out: Path) -> Iterator[tuple[str, str]]:
    """(file name, string) for every string of every file of the export directory."""
    for path in sorted(out.iterdir()):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ndjson":
            for line in text.splitlines():
                for s in strings(json.loads(line)):
                    yield path.name, s
        elif path.suffix == ".json":
            for s in strings(json.loads(text)):
                yield path.name, s
        else:
            raise AssertionError(f"unexpected file in the export: {path.name}")


def assert_no_values(
    out: Path, tokens: Iterable[str], substrings: Iterable[str], exact: Iterable[str] = ()
) -> None:
    """No string of the export holds a ``tokens`` item as a word of its own (``S001`` in
    ``S001-m3``), contains a ``substrings`` item, or equals an ``exact`` one."""
    token_set = set(tokens)
    exact_set = set(exact) | set(substrings)
    within = re.compile("|".join(re.escape(v) for v in sorted(set(substrings), key=len)[::-1]))
    leaks = []
    for name, s in set(every_string_in(out)):  # each distinct string once
        words = set(re.findall(r"[A-Za-z0-9]+", s))
        if s in exact_set or words & token_set or within.search(s):
            leaks.append((name, s))
    assert not leaks, f"personal values in the export: {leaks[:10]}"


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def assert_references_resolve(by_type: dict[str, list[Resource]]) -> int:
    ids = {f"{t}/{r['id']}" for t, rs in by_type.items() for r in rs}
    count = 0
    for resources in by_type.values():
        for resource in resources:
            for ref in references(resource):
                assert ref in ids, f"{resource['resourceType']}/{resource['id']}: {ref} dangles"
                count += 1
    return count


def assert_all_valid(by_type: dict[str, list[Resource]]) -> None:
    trial = load_trial()
    checker = ValueSetChecker(Terminology(trial), "R4")
    for rtype, resources in by_type.items():
        for resource in resources:
            assert resource["resourceType"] == rtype
            checker.check(resource)
            validate_structure(resource, "R4")


def assert_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """The complete-status manifest of the Bulk Data IG, with relative URLs."""
    assert set(manifest) >= {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert INSTANT.match(manifest["transactionTime"]), manifest["transactionTime"]
    assert isinstance(manifest["request"], str)
    assert "$export" in manifest["request"]
    assert manifest["requiresAccessToken"] is False
    assert isinstance(manifest["error"], list)
    listed = set()
    for item in [*manifest["output"], *manifest["error"]]:
        assert set(item) == {"type", "url", "count"}
        assert "://" not in item["url"]
        assert not item["url"].startswith("/")
        path = out / item["url"]
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert len(lines) == item["count"]
        assert all(json.loads(ln)["resourceType"] == item["type"] for ln in lines)
        listed.add(item["url"])
    for item in manifest["output"]:
        assert item["url"] == f"{item['type']}.ndjson"
    for item in manifest["error"]:
        assert item["type"] == "OperationOutcome"
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}
    types = [item["type"] for item in manifest["output"]]
    assert types == sorted(types)
    assert len(types) == len(set(types))


def subject_of(resource: Resource, by_id: dict[str, Resource]) -> str | None:
    """The Patient a source resource belongs to (its id = business key in map's NDJSON)."""
    if resource["resourceType"] == "Patient":
        return str(resource["id"])
    if resource["resourceType"] == "Provenance":
        for ref in references(resource.get("target", [])):
            target = by_id.get(ref)
            if target is not None:
                return subject_of(target, by_id)
        return None
    for field in ("subject", "patient", "individual"):
        ref = (resource.get(field) or {}).get("reference", "")
        if ref.startswith("Patient/"):
            return ref.split("/", 1)[1]
    return None


def dated(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path with indexes, value) of every full date / dateTime / instant string."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "meta":
                yield from dated(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from dated(item, f"{path}[{i}]")
    elif isinstance(node, str) and FULL_DATE.match(node):
        yield path, node


def date_shifts(
    source: list[Resource], by_type: dict[str, list[Resource]], key: str
) -> dict[str, set[int]]:
    """Days each subject's dates moved back, per subject; every source date accounted for.

    The export is matched to the source through the pseudonym of each resource's business key.
    Every date of the source (the birth date aside) must appear at the same place, moved by a
    whole number of days with its time of day and zone unchanged.
    """
    exported = {(t, r["id"]): r for t, rs in by_type.items() for r in rs}
    by_id = {f"{r['resourceType']}/{r['id']}": r for r in source}
    shifts: dict[str, set[int]] = defaultdict(set)
    for resource in source:
        rtype = resource["resourceType"]
        if rtype not in SUBJECT_TYPES:
            continue
        twin = exported.get((rtype, pseudonym(key, str(business_key(resource)))))
        if twin is None:
            continue  # not exported (e.g. the Provenance of a MeasureReport)
        subject = subject_of(resource, by_id)
        assert subject is not None
        mine = dict(dated(twin))
        for path, value in dated(resource):
            if path == ".birthDate":
                continue
            assert path in mine, f"{rtype}{path}: date lost"
            moved = mine[path]
            assert moved[10:] == value[10:], f"{rtype}{path}: time of day changed"
            days = (dt.date.fromisoformat(value[:10]) - dt.date.fromisoformat(moved[:10])).days
            shifts[subject].add(days)
    return shifts


def latest_source_date(source: list[Resource], tz: dt.tzinfo) -> dt.datetime:
    """The latest date or time of the source data (birth dates aside), as an instant."""
    latest = None
    for resource in source:
        for path, value in dated(resource):
            if path == ".birthDate":
                continue
            moment = (
                dt.datetime.fromisoformat(value)
                if "T" in value
                else dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), tz)
            )
            if latest is None or moment > latest:
                latest = moment
    assert latest is not None
    return latest
