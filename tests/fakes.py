"""A scripted FHIR server's pieces, shared by the fault-injection tests."""

from __future__ import annotations

from typing import Any


def capability_statement(
    fhir_version: str = "4.0.1", types: tuple[str, ...] = ("Patient", "Observation")
) -> dict[str, Any]:
    """A minimal CapabilityStatement: each type searchable by identifier and _tag."""
    params = [{"name": "identifier", "type": "token"}, {"name": "_tag", "type": "token"}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": fhir_version,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}],
                "resource": [
                    {
                        "type": rtype,
                        "interaction": [{"code": c} for c in ("read", "create", "update")],
                        "searchParam": params,
                    }
                    for rtype in types
                ],
            }
        ],
    }
