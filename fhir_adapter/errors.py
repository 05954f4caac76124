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
    USAGE = 2  # a wrong option or argument, an unusable output path (as click reports it)
    DATA_ERROR = 65  # some rows or records rejected; the valid ones were still processed
    INPUT_UNREADABLE = 66  # a file or the configuration cannot be used (missing, not UTF-8, …)
    SERVER_UNAVAILABLE = 69  # the FHIR server could not be reached, or records are undelivered
    INTERNAL = 70  # a bug: please report it


class AdapterError(Exception):
    """Base of every error the adapter raises deliberately."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigurationError(AdapterError):
    """A setting, an option's value or a mapping file (mappings/*.yaml) is invalid or incomplete:
    an invalid URL, an auth method without its secret, an unusable key, an outbox path that
    cannot be opened, a server of another FHIR version."""

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
        full_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome  # the server's OperationOutcome, if any
        self.issues = list(issues)
        self.retry_after = retry_after
        # with the server's diagnostics: kept with a dead letter, never logged or printed
        self.full_message = full_message or message


class ServerRejected(ServerError):
    """4xx (other than the retryable, auth and conflict ones) and 501: the server refused the
    request; nothing was applied. Carries the OperationOutcome."""


class ServerUnavailable(ServerError):
    """Not applied, retryable: connection refused, a connect timeout, 408, 429, 503."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class OutcomeUncertain(ServerError):
    """Maybe applied: 500, 502, 504, a timeout or a dropped connection after the request was
    sent, a 2xx whose body is not the expected answer. A write is resolved by looking it up on
    the server before anything is sent again; a read is simply retried."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class LookupRefused(OutcomeUncertain):
    """The server refused a look-up by business identity (4xx to the search): what it holds
    stays unknown, so the records concerned stay undelivered — never taken for "not held",
    which would create them twice. Not retried (the same search would be refused again)."""


class Conflict(ServerError):
    """409 / 412: a concurrent change or a version mismatch."""


class AuthError(ServerError):
    """401 / 403 after any token refresh, or a token endpoint that refuses or cannot be reached."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


class OutboxBusy(AdapterError):
    """Another writer (a sync, a delivery worker) held the outbox longer than the lock timeout."""

    exit_code = ExitCode.SERVER_UNAVAILABLE
