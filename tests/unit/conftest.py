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
