"""``GET /openapi.json``: an OpenAPI 3.1 document of every route of the app.

Request schemas come from the intake's pydantic models (one record or a list, the fields of the
CSV files), so an EHR team can generate a client that sends what ``validate`` accepts.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app

from fhir_adapter import __version__
from fhir_adapter.intake import KINDS
from fhir_adapter.sync.inbox import KEY_FIELDS
from fhir_adapter.trial import Trial
from server.outcome import json_response
from server.state import state

bp = Blueprint("openapi", __name__)

PUBLIC_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz", "static"})
_RULE_PARAM = re.compile(r"<(?:[a-z]+:)?([A-Za-z_]+)>")
_REF = "#/components/schemas/{model}"
_OUTCOME = {"$ref": "#/components/schemas/OperationOutcome"}


def openapi_path(rule: str) -> str:
    """Flask's ``/ingest/masi/<path:key>`` as OpenAPI's ``/ingest/masi/{key}``."""
    return _RULE_PARAM.sub(r"{\1}", rule)


#: pydantic writes a custom type's bounds under their Python names: JSON Schema's are these
_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _json_schema_bounds(node: Any) -> Any:
    """``{"ge": 0, "le": 4}`` -> ``{"minimum": 0, "maximum": 4}``, everywhere in ``node``."""
    if isinstance(node, dict):
        return {_BOUNDS.get(k, k): _json_schema_bounds(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_json_schema_bounds(v) for v in node]
    return node


def _closed_vocabularies(properties: dict[str, Any], trial: Trial) -> None:
    """The trial's ids (visits, arms, interventions) as enums: what intake accepts, no more."""
    vocabularies = {
        "visit": list(trial.visit_ids),
        "arm": sorted(trial.arm_ids),
        "suspect": [*(i.id for i in trial.interventions), "both"],
    }
    for name, values in vocabularies.items():
        if name not in properties:
            continue
        optional = "anyOf" in properties[name]
        closed = {"type": "string", "enum": values}
        kept = {k: v for k, v in properties[name].items() if k in ("title", "default")}
        properties[name] = {"anyOf": [closed, {"type": "null"}]} if optional else closed
        properties[name].update(kept)


def record_schema(kind: str, trial: Trial) -> dict[str, Any]:
    """The JSON Schema of one record of ``kind``, from its intake model."""
    model = KINDS[kind]
    schema: dict[str, Any] = _json_schema_bounds(
        model.model_json_schema(mode="validation", ref_template=_REF)
    )
    properties: dict[str, Any] = schema.setdefault("properties", {})
    _closed_vocabularies(properties, trial)
    if "answers" in properties:  # eligibility: one field per criterion, as in the CSV file
        del properties["answers"]
        for criterion in trial.criteria:
            properties[criterion.column] = {
                "anyOf": [{"type": "string", "enum": ["yes", "no"]}, {"type": "null"}],
                "description": f"{criterion.id} ({criterion.kind}); empty = unknown",
            }
    schema["additionalProperties"] = False
    schema["description"] = f"One row of {kind}.csv as a JSON object (SPEC §3)"
    return schema


def _responses(*codes: int, accepted: str | None = None) -> dict[str, Any]:
    texts = {
        200: "Acknowledged (empty body)",
        202: "Accepted: committed to the inbox; delivered to the FHIR server from there",
        400: "Malformed JSON",
        401: "Not authenticated",
        404: "No such record",
        409: "Refused: other records depend on it",
        413: "Body over the size limit",
        415: "Not JSON",
        422: "Invalid records: every problem by field (values never echoed)",
        503: "Not ready, or the records could not be stored (nothing kept): retry after "
        "Retry-After",
    }
    out: dict[str, Any] = {}
    for code in codes:
        body: dict[str, Any] = {"description": texts[code]}
        if code == 202 and accepted:
            body["content"] = {"application/json": {"schema": {"$ref": accepted}}}
        elif code >= 400:
            body["content"] = {"application/fhir+json": {"schema": _OUTCOME}}
        out[str(code)] = body
    return out


_SECURITY: list[dict[str, list[str]]] = [
    {"hmac": [], "hmacSignature": []},
    {"standardWebhooks": []},
    {"bearer": []},
]
_AUTH_ERRORS = (401, 413)


def _ingest_operations(kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    name = f"{kind.title().replace('_', '')}Record"
    post = {
        "operationId": f"ingest_{kind}",
        "summary": f"Push {kind} records (one object or a list)",
        "tags": ["ingest"],
        "security": _SECURITY,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": f"#/components/schemas/{name}"},
                            {
                                "type": "array",
                                "minItems": 1,
                                "items": {"$ref": f"#/components/schemas/{name}"},
                            },
                        ]
                    }
                }
            },
        },
        "responses": {
            **_responses(
                202, 400, *_AUTH_ERRORS, 415, 422, 503, accepted="#/components/schemas/Accepted"
            ),
            "200": {
                "description": "A Standard Webhooks message id already processed: acknowledged,"
                " not processed again",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        },
    }
    delete = {
        "operationId": f"retract_{kind}",
        "summary": f"Retract a {kind} record the EHR sent",
        "tags": ["ingest"],
        "security": _SECURITY,
        "parameters": [
            {
                "name": "key",
                "in": "path",
                "required": True,
                "description": "/".join(KEY_FIELDS[kind])
                + " (e.g. S001/m3/R1), or the record's business identifier (S001-m3-masi-R1)",
                "schema": {"type": "string"},
            }
        ],
        "responses": _responses(
            202, 404, 409, *_AUTH_ERRORS, accepted="#/components/schemas/Accepted"
        ),
    }
    return post, delete


def _notify_operations() -> dict[str, dict[str, Any]]:
    any_resource = {"type": "object", "description": "A FHIR resource or notification Bundle"}
    params = [
        {"name": "rtype", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "rid", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    security = [*_SECURITY, {"medplumSignature": []}]
    common = {"tags": ["notify"], "security": security}
    return {
        "/fhir/notify": {
            "post": {
                **common,
                "operationId": "notify",
                "summary": "FHIR Subscription notification: Backport IG Bundle, bare resource, "
                "or empty (query back)",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/fhir+json": {"schema": any_resource},
                        "application/json": {"schema": any_resource},
                    },
                },
                "responses": _responses(200, 400, *_AUTH_ERRORS, 415),
            }
        },
        "/fhir/notify/{rtype}/{rid}": {
            "put": {
                **common,
                "operationId": "notify_update",
                "summary": "Classic rest-hook (HAPI FHIR): a created or updated resource",
                "parameters": params,
                "requestBody": {
                    "required": False,
                    "content": {"application/fhir+json": {"schema": any_resource}},
                },
                "responses": _responses(200, 400, *_AUTH_ERRORS, 415),
            },
            "delete": {
                **common,
                "operationId": "notify_delete",
                "summary": "Classic rest-hook (HAPI FHIR): a deleted resource",
                "parameters": params,
                "responses": _responses(200, *_AUTH_ERRORS),
            },
        },
    }


def _ops_operations() -> dict[str, dict[str, Any]]:
    status = {"type": "object", "additionalProperties": {"type": "string"}}

    def op(op_id: str, summary: str, secured: bool, codes: tuple[int, ...]) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "operationId": op_id,
            "summary": summary,
            "tags": ["operations"],
            "security": _SECURITY if secured else [],
            "responses": {
                str(c): {
                    "description": "OK" if c == 200 else "Not ready",
                    "content": {"application/json": {"schema": status}},
                }
                for c in codes
            },
        }
        return operation

    metrics = op("metrics", "Prometheus metrics (text exposition format)", True, (200,))
    metrics["responses"] = {
        "200": {
            "description": "Prometheus text",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        "401": {"description": "Not authenticated"},
    }
    document = op("openapi", "This document", True, (200,))
    document["responses"]["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    return {
        "/healthz": {"get": op("healthz", "Liveness", False, (200,))},
        "/readyz": {
            "get": op("readyz", "Outbox writable, FHIR server reachable", False, (200, 503))
        },
        "/metrics": {"get": metrics},
        "/openapi.json": {"get": document},
    }


def _components(trial: Trial) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for kind in KINDS:
        schema = record_schema(kind, trial)
        schemas.update(schema.pop("$defs", {}))
        schemas[f"{kind.title().replace('_', '')}Record"] = schema
    identifier = {
        "type": "object",
        "properties": {"system": {"type": "string"}, "value": {"type": "string"}},
        "required": ["system", "value"],
    }
    schemas["Accepted"] = {
        "type": "object",
        "properties": {
            "accepted": {"type": "integer"},
            "changed": {"type": "integer"},
            "retracted": {"type": "integer"},
            "records": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": list(KINDS)},
                        "key": {"type": "string"},
                        "status": {
                            "type": "string",
                            "enum": ["accepted", "unchanged", "retracting"],
                        },
                        "identifiers": {"type": "array", "items": identifier},
                    },
                },
            },
        },
    }
    schemas["OperationOutcome"] = {
        "type": "object",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"const": "OperationOutcome"},
            "issue": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "severity": {"type": "string"},
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    }
    return {
        "schemas": schemas,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "FHIR_ADAPTER_WEBHOOK_TOKEN",
            },
            "hmac": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Timestamp",
                "description": "Unix seconds, within 5 minutes of the server's clock",
            },
            "hmacSignature": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Signature",
                "description": "sha256=<hex HMAC-SHA256(FHIR_ADAPTER_WEBHOOK_SECRET, "
                '"<X-Timestamp>." + raw body)>; each signature is accepted once',
            },
            "standardWebhooks": {
                "type": "apiKey",
                "in": "header",
                "name": "webhook-signature",
                "description": "Standard Webhooks (webhook-id, webhook-timestamp, "
                "webhook-signature: v1,<base64>) with FHIR_ADAPTER_WEBHOOK_STANDARD_SECRET",
            },
            "medplumSignature": {
                "type": "apiKey",
                "in": "header",
                "name": "X-Signature",
                "description": "/fhir/notify only: <hex HMAC-SHA256(FHIR_ADAPTER_WEBHOOK_SECRET,"
                " body)>",
            },
        },
    }


def build_document(app: Flask, trial: Trial) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for kind in KINDS:
        post, delete = _ingest_operations(kind)
        paths[f"/ingest/{kind}"] = {"post": post}
        paths[f"/ingest/{kind}/{{key}}"] = {"delete": delete}
    paths.update(_notify_operations())
    paths.update(_ops_operations())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fhir-adapter webhook (NCT06677931)",
            "version": __version__,
            "description": "Push trial records (202 once committed; delivered to the FHIR "
            "server from the durable inbox) and receive FHIR Subscription notifications.",
        },
        "paths": paths,
        "components": _components(trial),
    }


@bp.get("/openapi.json")
def document() -> Response:
    return json_response(200, build_document(current_app, state().trial))
