"""Fixtures of the fault-injection tests (pytest-httpserver)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import tenacity
from pytest_httpserver import HTTPServer

import fhir_adapter.client as client_module


@pytest.fixture(scope="session")
def make_httpserver() -> Iterator[HTTPServer]:
    """pytest-httpserver's server, threaded and on 127.0.0.1: a handler sleeping past the
    client's read timeout must not hold back the retry that follows it."""
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff without Retry-After is random up to seconds: make it zero (Retry-After is still
    honoured, since the client reads it before falling back to the jitter)."""
    monkeypatch.setattr(
        client_module, "wait_random_exponential", lambda **_kw: tenacity.wait_none()
    )


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at the end of a test so handlers that sleep past the read timeout finish at once."""
    event = threading.Event()
    yield event
    event.set()
    time.sleep(0.05)


# -- webhook (server/) tests: the Flask app through its test client -----------------------------
from pathlib import Path  # noqa: E402

from flask import Flask  # noqa: E402
from flask.testing import FlaskClient  # noqa: E402

from fhir_adapter.settings import Settings  # noqa: E402
from fhir_adapter.sync.inbox import Inbox  # noqa: E402
from tests.webhook_helpers import SECRET, STANDARD_SECRET, TOKEN  # noqa: E402


@pytest.fixture
def webhook_settings(tmp_path: Path) -> Settings:
    """Every authentication scheme enabled; a FHIR server nobody listens on (port 9)."""
    return Settings(
        outbox_path=tmp_path / "outbox.sqlite",
        webhook_secret=SECRET,
        webhook_token=TOKEN,
        webhook_standard_secret=STANDARD_SECRET,
        fhir_base_url="http://127.0.0.1:9/fhir/R4",
        connect_timeout_s=0.5,
    )


@pytest.fixture
def webhook_app(webhook_settings: Settings) -> Flask:
    from server import create_app

    return create_app(webhook_settings)


@pytest.fixture
def webhook(webhook_app: Flask) -> FlaskClient:
    return webhook_app.test_client()


@pytest.fixture
def inbox(webhook_settings: Settings) -> Iterator[Inbox]:
    """The inbox tables the app writes to (a connection of the test's own)."""
    with Inbox(webhook_settings.outbox_path) as box:
        yield box
