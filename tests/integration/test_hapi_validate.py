"""HAPI's validator over the R4 resources the adapter emits (issue 14, item 4).

`fhir-adapter map DIR --format ndjson` of the default synthetic set (about 6,300 resources);
each selected resource is POSTed to ``[type]/$validate`` on the HAPI FHIR JPA test server
(`FhirInstanceValidator`, R4 core profiles and code systems, offline). The trial's CodeSystem
and Measure are stored on the server first, so the trial's codes are checked against it and
MeasureReport.measure resolves.

Selection: one resource per *shape* (type + the set of element paths + every coded value: what
the validator's verdict depends on, primitive values aside, which the adapter checks itself) and
a seeded sample of the rest. ``HAPI_VALIDATE_ALL=1`` validates every resource (~75 s on an idle
2-core machine, ~190 s beside the other test worker: too much for `make test`'s budget).
No issue may be an error or fatal; the warnings are grouped in the terminal summary ("HAPI
FHIR") and written in full to ``hapi-validate-warnings.txt`` under pytest's base temp dir.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from fhir_adapter.generate import generate

if TYPE_CHECKING:
    from tests.hapi import HapiServer

pytestmark = pytest.mark.integration

FHIR_ADAPTER = Path(sys.executable).with_name("fhir-adapter")
JSON = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}
SAMPLE = 300
SEED = 14
STORED_FIRST = ("CodeSystem", "Measure")  # what other resources' codes and canonicals need
# Code systems the validator cannot know offline: licensed or published outside FHIR R4 core.
EXTERNAL_SYSTEMS = {
    "http://snomed.info/sct",
    "https://www.meddra.org",
    "http://hl7.org/fhir/sid/icd-10",
    "http://terminology.hl7.org/CodeSystem/research-study-arm-type",
}
_UNKNOWN_SYSTEM = re.compile(
    r"CodeSystem is unknown and can't be validated: (\S+) for|codeSystem '([^']+)' version"
)


@dataclass(frozen=True)
class Issue:
    severity: str
    rtype: str
    rid: str
    path: str
    message: str

    @property
    def group(self) -> tuple[str, str, str]:
        # an issue about the resource as a whole groups across types (e.g. dom-6, narrative)
        path = "(resource)" if self.path == self.rtype else re.sub(r"\[\d+\]", "[*]", self.path)
        message = re.sub(r"'[^'\s]*#[^'\s]*'", "'…'", self.message)
        return self.severity, path, message


def shape(resource: dict[str, Any]) -> tuple[str, frozenset[tuple[str, ...]]]:
    """Type, element paths and coded values: resources of one shape validate alike."""
    out: set[tuple[str, ...]] = set()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "system" in node and "code" in node and not path.endswith(".identifier"):
                out.add((path, str(node["system"]), str(node["code"])))
            for key, value in node.items():
                if key in ("id", "reference", "value") and not isinstance(value, dict | list):
                    out.add((f"{path}.{key}",))
                else:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, path)
        else:
            out.add((path,))

    walk({k: v for k, v in resource.items() if k != "meta"}, resource["resourceType"])
    return resource["resourceType"], frozenset(out)


def select(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if os.environ.get("HAPI_VALIDATE_ALL"):
        return resources
    first: dict[Any, int] = {}
    for i, resource in enumerate(resources):
        first.setdefault(shape(resource), i)
    chosen = set(first.values())
    rest = [i for i in range(len(resources)) if i not in chosen]
    chosen |= set(random.Random(SEED).sample(rest, min(SAMPLE, len(rest))))
    return [resources[i] for i in sorted(chosen)]


def validate(session: requests.Session, base: str, resource: dict[str, Any]) -> list[Issue]:
    rtype = resource["resourceType"]
    response = session.post(f"{base}/{rtype}/$validate", json=resource, headers=JSON, timeout=120)
    assert response.status_code == 200, f"{rtype}/{resource['id']}: {response.text[:1000]}"
    return [
        Issue(
            issue["severity"],
            rtype,
            resource["id"],
            (issue.get("expression") or issue.get("location") or [rtype])[0],
            issue.get("diagnostics", ""),
        )
        for issue in response.json().get("issue", [])
        if issue["severity"] != "information"
    ]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every R4 resource of the default synthetic set, as `fhir-adapter map` writes them."""
    tmp = tmp_path_factory.mktemp("hapi-validate")
    generate(tmp / "data", with_bad=False)
    out = tmp / "r4.ndjson"
    done = subprocess.run(
        [str(FHIR_ADAPTER), "map", str(tmp / "data"), "--format", "ndjson", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@dataclass
class Sweep:
    validated: list[dict[str, Any]]
    issues: list[Issue]


@pytest.fixture(scope="module")
def sweep(
    hapi_test_server: HapiServer,
    emitted: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
    hapi_summary: list[str],
) -> Sweep:
    hapi_test_server.reset()
    base = hapi_test_server.base_url
    chosen = select(emitted)
    issues: list[Issue] = []
    with requests.Session() as session:
        first = [r for r in chosen if r["resourceType"] in STORED_FIRST]
        for resource in first:
            issues += validate(session, base, resource)
        for resource in (r for r in emitted if r["resourceType"] in STORED_FIRST):
            stored = session.put(
                f"{base}/{resource['resourceType']}/{resource['id']}",
                json=resource,
                headers=JSON,
                timeout=120,
            )
            assert stored.status_code in (200, 201), stored.text[:1000]
        rest = [r for r in chosen if r["resourceType"] not in STORED_FIRST]
        with ThreadPoolExecutor(2) as pool:  # the machine has 2 cores; HAPI uses both
            for found in pool.map(lambda r: validate(session, base, r), rest):
                issues += found
    report(issues, chosen, emitted, tmp_path_factory.getbasetemp(), hapi_summary)
    return Sweep(chosen, issues)


def report(
    issues: list[Issue],
    chosen: list[dict[str, Any]],
    emitted: list[dict[str, Any]],
    basetemp: Path,
    summary: list[str],
) -> None:
    groups: dict[tuple[str, str, str], list[Issue]] = defaultdict(list)
    for issue in issues:
        groups[issue.group].append(issue)
    path = basetemp / "hapi-validate-warnings.txt"
    lines = [
        f"$validate: {len(chosen)} of {len(emitted)} resources "
        f"({len({shape(r) for r in emitted})} shapes); issues by severity "
        f"{dict(Counter(i.severity for i in issues))}; in full: {path}"
    ]
    for (severity, where, message), members in sorted(groups.items(), key=lambda g: -len(g[1])):
        types = sorted({i.rtype for i in members})
        lines.append(
            f"  {severity} x{len(members)} {where if len(types) == 1 else ', '.join(types)}: "
            f"{message[:160]} (e.g. {members[0].rtype}/{members[0].rid})"
        )
    with path.open("w", encoding="utf-8") as out:
        for issue in issues:
            out.write(f"{issue.severity}\t{issue.rtype}/{issue.rid}\t{issue.path}\t{issue.message}\n")
    summary.extend(lines)


def test_no_resource_has_an_error_or_fatal_issue(sweep: Sweep) -> None:
    errors = [i for i in sweep.issues if i.severity in ("error", "fatal")]
    assert errors == [], "\n".join(f"{i.rtype}/{i.rid} {i.path}: {i.message}" for i in errors)


def test_every_type_and_shape_was_validated(sweep: Sweep, emitted: list[dict[str, Any]]) -> None:
    assert {shape(r) for r in sweep.validated} == {shape(r) for r in emitted}
    if os.environ.get("HAPI_VALIDATE_ALL"):
        assert len(sweep.validated) == len(emitted)  # every resource, not a sample
    assert len(sweep.validated) >= min(len(emitted), SAMPLE)


def test_codes_unknown_to_the_validator_are_only_external_systems(sweep: Sweep) -> None:
    """A mistyped system URI would show up here (the trial's own codes are checked)."""
    unknown = set()
    for issue in sweep.issues:
        match = _UNKNOWN_SYSTEM.search(issue.message)
        if match:
            unknown.add(match.group(1) or match.group(2))
    assert unknown <= EXTERNAL_SYSTEMS, unknown - EXTERNAL_SYSTEMS


def test_the_validator_does_reject_broken_resources(
    sweep: Sweep, emitted: list[dict[str, Any]], hapi_server: str
) -> None:
    """The sweep can fail: a wrong required code, a missing element, a wrong trial display."""
    event = copy.deepcopy(next(r for r in emitted if r["resourceType"] == "AdverseEvent"))
    event["severity"]["coding"][0]["code"] = "catastrophic"
    masi = copy.deepcopy(next(r for r in emitted if r["id"].endswith("-masi-R1")))
    del masi["code"]
    with requests.Session() as session:
        errors = {i.path for i in validate(session, hapi_server, event) if i.severity == "error"}
        assert "AdverseEvent.severity" in errors
        errors = {i.message for i in validate(session, hapi_server, masi) if i.severity == "error"}
        assert any("Observation.code" in m and "minimum required = 1" in m for m in errors), errors
        masi = copy.deepcopy(next(r for r in emitted if r["id"].endswith("-masi-R1")))
        masi["code"]["coding"][0]["display"] = "Not the trial's display"
        warned = [i.message for i in validate(session, hapi_server, masi)]
        assert any("does not match expected" in m for m in warned), warned
