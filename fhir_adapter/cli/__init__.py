"""The ``fhir-adapter`` command line (SPEC §10).

Exit codes: 0 ok, 65 data errors (valid rows still processed), 66 input unreadable,
69 FHIR server unavailable, 70 internal error. stdout carries results only; every message,
warning and rejected row goes to stderr. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import logging
import sys

from fhir_adapter.cli import data as _data  # noqa: F401 - registers the data commands
from fhir_adapter.cli import demo as _demo  # noqa: F401 - registers demo
from fhir_adapter.cli import export as _export  # noqa: F401 - registers export
from fhir_adapter.cli import fhir as _fhir  # noqa: F401 - registers map
from fhir_adapter.cli import query as _query  # noqa: F401 - registers view and query
from fhir_adapter.cli import report as _report  # noqa: F401 - registers report
from fhir_adapter.cli import serve as _serve  # noqa: F401 - registers serve, worker, subscribe
from fhir_adapter.cli import sync as _sync  # noqa: F401 - registers sync and friends
from fhir_adapter.cli.base import cli, echo_err
from fhir_adapter.errors import ExitCode

log = logging.getLogger("fhir_adapter")


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(prog_name="fhir-adapter", standalone_mode=True)
    except SystemExit:
        raise
    except Exception:  # a bug: a short message; the traceback only at DEBUG
        log.debug("internal error", exc_info=True)
        echo_err(
            "internal error: this is a bug in fhir-adapter; run again with --log-level DEBUG "
            "to see the details"
        )
        sys.exit(int(ExitCode.INTERNAL))


__all__ = ["cli", "main"]
