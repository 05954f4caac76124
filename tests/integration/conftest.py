"""Fixtures for tests that talk to the real in-memory FHIR R4 server (tests/fhir_server)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from fhir_adapter.testserver import FhirTestServer


@pytest.fixture(scope="session")
def fhir_test_server() -> Iterator[FhirTestServer]:
    """The running server process (session-wide; started once, stopped at the end)."""
    server = FhirTestServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fhir_server(fhir_test_server: FhirTestServer) -> str:
    """Base URL of the session's FHIR server, e.g. ``http://127.0.0.1:PORT/fhir/R4``."""
    return fhir_test_server.base_url


@pytest.fixture
def fhir_reset(fhir_test_server: FhirTestServer) -> str:
    """Empty the server's repository (``POST /$reset``) before the test; returns the base URL."""
    response = requests.post(f"{fhir_test_server.root_url}/$reset", timeout=30)
    response.raise_for_status()
    return fhir_test_server.base_url


@pytest.fixture(scope="session")
def httpserver_listen_address() -> tuple[str, int]:
    """pytest-httpserver on 127.0.0.1 (not "localhost"), on a free port."""
    return ("127.0.0.1", 0)
