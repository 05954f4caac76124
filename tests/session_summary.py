"""Lines for the "HAPI FHIR" section of the test summary, from whichever process ran them.

Tests append to :data:`HAPI_SUMMARY`; under pytest-xdist each worker hands its lines to the
controller (tests/conftest.py), which prints the section once.
"""

from __future__ import annotations

HAPI_SUMMARY: list[str] = []
