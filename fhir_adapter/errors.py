"""Error hierarchy and the process exit codes documented in the README (SPEC §10, §13).

Every error the adapter raises on purpose derives from :class:`AdapterError` and carries the exit
code the CLI ends with. Messages never contain the values of personal fields: they name files,
rows and fields only.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Process exit codes (sysexits.h numbering)."""

    OK = 0
    USAGE = 2  # a usage error, as click reports it (e.g. an output path that cannot be used)
    DATA_ERROR = 65  # some rows or records rejected; the valid ones were still processed
    INPUT_UNREADABLE = 66  # a file could not be read at all (missing, not UTF-8, missing columns)
    SERVER_UNAVAILABLE = 69  # the FHIR server could not be reached
    INTERNAL = 70  # a bug: please report it


class AdapterError(Exception):
    """Base of every error the adapter raises deliberately."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigurationError(AdapterError):
    """A setting or a mapping file (mappings/*.yaml) is invalid."""

    exit_code = ExitCode.INPUT_UNREADABLE


class InvalidInput(AdapterError):
    """Input data is invalid (rows rejected)."""

    exit_code = ExitCode.DATA_ERROR


class OutputRefused(AdapterError):
    """An output or rejects path that cannot be used: an input, not writable, someone else's."""

    exit_code = ExitCode.USAGE


class InputUnreadable(AdapterError):
    """A whole input file cannot be used: missing, not UTF-8, empty, or missing required columns."""

    exit_code = ExitCode.INPUT_UNREADABLE


class ServerError(AdapterError):
    """Base of the errors a FHIR server answer maps to (built in one place: the client)."""

    exit_code = ExitCode.DATA_ERROR

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: Any = None,
        issues: Sequence[str] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome  # the server's OperationOutcome, if any
        self.issues = list(issues)
        self.retry_after = retry_after


class ServerRejected(ServerError):
    """4xx (other than the retryable/auth/conflict ones) and 500: the server refused the content."""


class ServerUnavailable(ServerError):
    """408, 429, 502, 503, 504, timeouts, connection errors: retryable."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class Conflict(ServerError):
    """409 / 412: a concurrent change or a version mismatch."""


class AuthError(ServerError):
    """401 / 403 after any token refresh."""

    exit_code = ExitCode.SERVER_UNAVAILABLE
