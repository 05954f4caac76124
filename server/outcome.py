"""Error answers as FHIR OperationOutcome: fields named, submitted values never echoed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Response

from fhir_adapter.jsonout import dumpb

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Problem:
    """One issue: ``code`` from the FHIR issue-type value set; ``expression`` names the field."""

    diagnostics: str
    code: str = "invalid"
    expression: str | None = None
    severity: str = "error"

    def as_issue(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def outcome(problems: Iterable[Problem]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [p.as_issue() for p in problems]}


def outcome_response(
    status: int,
    problems: Iterable[Problem],
    headers: Mapping[str, str] | None = None,
) -> Response:
    response = Response(dumpb(outcome(problems)), status=status, mimetype=FHIR_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(status: int, diagnostics: str, code: str = "invalid") -> Response:
    return outcome_response(status, [Problem(diagnostics, code)])


def json_response(status: int, body: Any) -> Response:
    return Response(dumpb(body), status=status, mimetype="application/json")


def empty_response(status: int = 200) -> Response:
    """What a FHIR server's rest-hook expects: 2xx and nothing else (HAPI fails on ``{}``)."""
    response = Response(b"", status=status)
    response.headers.pop("Content-Type", None)
    return response
