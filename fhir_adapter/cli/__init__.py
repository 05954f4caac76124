"""The ``fhir-adapter`` command line (SPEC §10).

Exit codes: 0 ok, 65 data errors (valid rows still processed), 66 input unreadable,
69 FHIR server unavailable, 70 internal error. stdout carries results only; every message,
warning and rejected row goes to stderr. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

# The command modules register their commands on ``cli`` when imported, which the group does
# on first use of a command (base.LAZY_COMMANDS): start-up imports only what the command needs.
from fhir_adapter.cli.base import cli, echo_err, load_commands, os_error_message
from fhir_adapter.errors import ExitCode

log = logging.getLogger("fhir_adapter")


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="fhir-adapter", standalone_mode=True)
    except SystemExit:
        raise
    except OSError as exc:  # e.g. stdout on a full disk (click's own I/O, outside a command)
        _quiet_stdout()
        message, code = os_error_message(exc)
        echo_err(f"error: {message}")
        sys.exit(int(code))
    except Exception:  # a bug: a short message; the traceback only at DEBUG
        log.debug("internal error", exc_info=True)
        echo_err(
            "internal error: this is a bug in fhir-adapter; run again with --log-level DEBUG "
            "to see the details"
        )
        sys.exit(int(ExitCode.INTERNAL))


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush raises nothing more."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


__all__ = ["cli", "load_commands", "main"]
