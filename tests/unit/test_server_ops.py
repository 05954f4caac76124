"""/healthz, /readyz and /metrics (Prometheus text read from the outbox database)."""

from __future__ import annotations

from pathlib import Path

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer

from fhir_adapter.settings import Settings
from server import create_app
from tests.fakes import capability_statement
from tests.webhook_helpers import JSON, bearer_headers, body_of, masi, participant

AUTH = bearer_headers()


def samples(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_accepted_and_rejected_records(webhook: FlaskClient) -> None:
    ok = webhook.post(
        "/ingest/masi",
        data=body_of([masi("S001", "m1", "R1"), masi("S001", "m1", "R2")]),
        headers={**JSON, **AUTH},
    )
    assert ok.status_code == 202
    bad = webhook.post(
        "/ingest/participants", data=body_of(participant(sex="x")), headers={**JSON, **AUTH}
    )
    assert bad.status_code == 422
    found = samples(webhook)
    assert found[("fhir_adapter_records_accepted_total", (("kind", "masi"),))] == 2
    assert found[("fhir_adapter_records_rejected_total", (("kind", "participants"),))] == 1
    assert found[("fhir_adapter_inbox_records", (("state", "pending"),))] == 2
    assert found[("fhir_adapter_outbox_depth", ())] == 0
    assert found[("fhir_adapter_dead_letters", ())] == 0
    assert found[("fhir_adapter_delivery_latency_seconds_count", ())] == 0


def test_metrics_are_the_same_from_every_worker_process(
    webhook_settings: Settings, webhook: FlaskClient
) -> None:
    """Read from the database: a second app instance (another gunicorn worker) agrees."""
    assert (
        webhook.post("/ingest/masi", data=body_of(masi()), headers={**JSON, **AUTH}).status_code
        == 202
    )
    other = create_app(webhook_settings).test_client()
    key = ("fhir_adapter_records_accepted_total", (("kind", "masi"),))
    assert samples(other)[key] == samples(webhook)[key] == 1


def test_healthz(webhook: FlaskClient) -> None:
    response = webhook.get("/healthz")
    assert (response.status_code, response.get_json()) == (200, {"status": "ok"})


def test_readyz_needs_the_fhir_server(webhook: FlaskClient) -> None:
    response = webhook.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "not ready",
        "outbox": "ok",
        "fhir_server": "unreachable",
    }


def test_readyz_when_everything_answers(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/fhir/R4/metadata").respond_with_json(capability_statement())
    settings = Settings(
        outbox_path=tmp_path / "o.sqlite",
        webhook_token="t",  # noqa: S106
        fhir_base_url=httpserver.url_for("/fhir/R4"),
    )
    client = create_app(settings).test_client()
    response = client.get("/readyz")
    assert (response.status_code, response.get_json()["fhir_server"]) == (200, "ok")
