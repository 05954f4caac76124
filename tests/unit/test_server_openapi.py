"""GET /openapi.json: a valid OpenAPI 3.1 document of every route, schemas from the intake."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from fhir_adapter.intake import KINDS
from server.openapi import openapi_path
from tests import helpers
from tests.webhook_helpers import as_json_record, bearer_headers, masi, participant


@pytest.fixture
def document(webhook: FlaskClient) -> dict[str, Any]:
    response = webhook.get("/openapi.json", headers=bearer_headers())
    assert response.status_code == 200
    body: dict[str, Any] = response.get_json()
    return body


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_of_the_app_is_documented(webhook_app: Flask, document: dict[str, Any]) -> None:
    missing = []
    for rule in webhook_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if method.lower() not in document["paths"].get(path, {}):
                missing.append(f"{method} {path}")
    assert missing == []


def test_only_the_probes_are_public(document: dict[str, Any]) -> None:
    public = sorted(
        f"{m.upper()} {p}"
        for p, ops in document["paths"].items()
        for m, op in ops.items()
        if op.get("security") == []
    )
    assert public == ["GET /healthz", "GET /readyz"]


def record_validator(document: dict[str, Any], kind: str) -> Draft202012Validator:
    name = f"{kind.title().replace('_', '')}Record"
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("kind", "record"),
    [
        ("participants", participant()),
        ("masi", masi()),
        ("eligibility", as_json_record(helpers.screening())),
        ("adverse_events", as_json_record(helpers.adverse_event())),
    ],
)
def test_request_schemas_accept_what_the_intake_accepts(
    document: dict[str, Any], kind: str, record: dict[str, Any]
) -> None:
    assert list(record_validator(document, kind).iter_errors(record)) == []


def test_request_schemas_come_from_the_intake_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for kind in KINDS:
        properties = schemas[f"{kind.title().replace('_', '')}Record"]["properties"]
        assert set(properties) == set(KINDS[kind].columns(helpers.TRIAL)), kind
    validator = record_validator(document, "masi")
    assert list(validator.iter_errors({**masi(), "unknown": 1}))  # additionalProperties: false
    record = masi()
    del record["chin_a"]
    assert list(validator.iter_errors(record))


@pytest.mark.parametrize(
    ("kind", "record", "override"),
    [
        ("masi", masi(), {"forehead_d": 99}),
        ("masi", masi(), {"chin_a": -1}),
        ("masi", masi(), {"visit": "nonsense-visit"}),
        ("pga", as_json_record(helpers.pga()), {"pga": 7}),
        ("participants", participant(), {"arm": "placebo"}),
        ("adverse_events", as_json_record(helpers.adverse_event()), {"grade": 6}),
        ("adverse_events", as_json_record(helpers.adverse_event()), {"suspect": "cream"}),
    ],
    ids=["score-over", "score-under", "visit", "pga", "arm", "grade", "suspect"],
)
def test_request_schemas_refuse_what_the_intake_refuses(
    document: dict[str, Any],
    webhook: FlaskClient,
    kind: str,
    record: dict[str, Any],
    override: dict[str, Any],
) -> None:
    """The published limits are JSON Schema's (minimum/maximum, enums of the trial's ids), so a
    generated client refuses what the adapter would answer 422 — and the adapter does."""
    bad = {**record, **override}
    assert list(record_validator(document, kind).iter_errors(bad)), override
    answer = webhook.post(f"/ingest/{kind}", json=bad, headers=bearer_headers())
    assert answer.status_code == 422, answer.get_data(as_text=True)
    text = str(document)
    assert "'ge'" not in text
    assert "'le'" not in text
