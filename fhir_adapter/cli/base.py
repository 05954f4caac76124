"""The command group, its shared context and helpers (SPEC §10).

Exit codes: 0 ok, 65 data errors (valid rows still processed), 66 input unreadable,
69 FHIR server unavailable, 70 internal error. stdout carries results only; every message,
warning and rejected row goes to stderr. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import errno
import importlib
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from fhir_adapter import __version__
from fhir_adapter.errors import AdapterError, ConfigurationError, ExitCode
from fhir_adapter.settings import Settings, check_base_url
from fhir_adapter.trial import Trial, load_trial

log = logging.getLogger("fhir_adapter")


@dataclass
class AppContext:
    settings: Settings
    _trial: Trial | None = None

    @property
    def trial(self) -> Trial:
        if self._trial is None:
            self._trial = load_trial(self.settings.mappings_dir)
        return self._trial

    @property
    def timezone(self) -> str:
        return self.settings.site_timezone or self.trial.study.timezone

    def threshold(self, override: Decimal | None) -> Decimal:
        if override is not None:
            return override
        if self.settings.adjudication_threshold is not None:
            return self.settings.adjudication_threshold
        return self.trial.adjudication_threshold


def echo_err(message: str) -> None:
    click.echo(message, err=True)


class DecimalParam(click.ParamType):  # type: ignore[type-arg]
    name = "decimal"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, Decimal):
            return value
        try:
            result = Decimal(str(value))
        except InvalidOperation:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not result.is_finite() or result < 0:
            self.fail(f"{value!r} must be a non-negative number", param, ctx)
        return result


#: errors of writing an output (inputs are read through io/, which names them itself): the
#: output cannot be used — exit 2, as for an output path refused up front
_WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
     errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.EIO, errno.EINVAL,
     errno.ENXIO, errno.ENODEV, errno.ETXTBSY, errno.ENAMETOOLONG, errno.ELOOP}
)  # fmt: skip


def os_error_message(exc: OSError) -> tuple[str, ExitCode]:
    """One line for an operating-system error that reached a command (no traceback)."""
    reason = exc.strerror or type(exc).__name__
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in _WRITE_ERRNOS:
        return f"cannot write the output{where}: {reason}", ExitCode.USAGE
    return f"operating-system error{where}: {reason}", ExitCode.INPUT_UNREADABLE


def server_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The callback of every ``--server``: an absolute http(s) URL, else a usage error (2)."""
    if value is None:
        return None
    try:
        check_base_url(value, "--server")
    except ConfigurationError:
        raise click.BadParameter(
            f"{value!r} is not an http(s) URL (e.g. http://127.0.0.1:8103/fhir/R4)"
        ) from None
    return value


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn adapter errors into a one-line message and their exit code; an unwritable output
    (full disk, read-only file system, …) into one line and exit 2; bugs into exit 70."""
    try:
        yield
    except AdapterError as exc:
        echo_err(f"error: {exc}")
        sys.exit(int(exc.exit_code))
    except BrokenPipeError:
        raise  # the reader of stdout went away: click ends quietly (exit 1)
    except OSError as exc:
        message, code = os_error_message(exc)
        echo_err(f"error: {message}")
        sys.exit(int(code))
    except KeyboardInterrupt:
        echo_err("interrupted")
        sys.exit(130)


#: command -> (the module that registers it, the first sentence of its help). A command's module
#: is imported when the command runs, not before: ``map`` never loads DuckDB, requests or the
#: query engine, ``--help`` loads none of them (tests/unit/test_cli_lazy.py keeps this in step
#: with the commands the modules define).
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "adjudication": (
        "fhir_adapter.cli.data",
        "The worklist of subject x visits whose two raters differ by more than the threshold.",
    ),
    "dead-letters": (
        "fhir_adapter.cli.sync",
        "Resources the server rejected, with its OperationOutcome.",
    ),
    "demo": (
        "fhir_adapter.cli.demo",
        "The whole trial flow on a synthetic set: generate, validate, score, check "
        "eligibility, map (R4 and R5), sync to the local FHIR server, and write the report "
        "from what it holds.",
    ),
    "eligibility": (
        "fhir_adapter.cli.data",
        "Evaluate the eligibility criteria: JSON Lines {subject_id, result, failed, unknown}.",
    ),
    "export": (
        "fhir_adapter.cli.export",
        "De-identified export in Bulk Data layout: pseudonyms, shifted dates, no free text.",
    ),
    "generate": (
        "fhir_adapter.cli.data",
        "Write a synthetic, seeded data set (six CSV files) and a bad/ folder of broken files.",
    ),
    "map": (
        "fhir_adapter.cli.fhir",
        "Map a directory of the eCRF export to FHIR: transaction Bundles or NDJSON.",
    ),
    "outbox": ("fhir_adapter.cli.sync", "The durable outbox."),
    "query": (
        "fhir_adapter.cli.query",
        "Every trial view (CSV + Parquet, OUT/views/) and the registry tables (CSV + "
        "Markdown, OUT/registry/): outcomes per arm x visit, AE incidence per arm x term, "
        "subject timelines.",
    ),
    "reconcile": (
        "fhir_adapter.cli.sync",
        "Compare the outbox with what the server holds: missing, extra, differing, duplicated"
        " resources and dangling references.",
    ),
    "report": (
        "fhir_adapter.cli.report",
        "Plots, tables and summary.json of the trial: outcomes per arm x visit (MASI with 95 "
        "% CI, PGA, satisfaction), adverse-event incidence per arm x term, data-quality "
        "flags.",
    ),
    "score": (
        "fhir_adapter.cli.data",
        "Score a masi.csv file: JSON Lines on stdout, one object per subject x visit.",
    ),
    "serve": (
        "fhir_adapter.cli.serve",
        "Run the webhook (POST /ingest/<kind>, /fhir/notify, /healthz, /readyz, /metrics, "
        "/openapi.json) under gunicorn, and the delivery worker beside it.",
    ),
    "subscribe": (
        "fhir_adapter.cli.serve",
        "Create (or update) the R4 rest-hook Subscription that tells the adapter when a "
        "rater's MASI Observation changes on the FHIR server, and wait until the server has "
        "activated it.",
    ),
    "sync": (
        "fhir_adapter.cli.sync",
        "Bring a FHIR server in step with a directory of source files, exactly once in effect.",
    ),
    "test-server": (
        "fhir_adapter.cli.sync",
        "Run the local in-memory FHIR R4 test server (Medplum engine) until Ctrl-C.",
    ),
    "validate": (
        "fhir_adapter.cli.data",
        "Validate a directory of the eCRF export (participants.csv, eligibility.csv, "
        "masi.csv, pga.csv, satisfaction.csv, adverse_events.csv): rows read, accepted, "
        'rejected per file ("dropped": rows kept without a value that was rejected, e.g. an '
        "MRN off the pattern).",
    ),
    "view": (
        "fhir_adapter.cli.query",
        "Run one SQL-on-FHIR v2 ViewDefinition over NDJSON files/directories or a FHIR server.",
    ),
    "worker": (
        "fhir_adapter.cli.serve",
        "Run the delivery worker alone: map the inbox, send the outbox, follow notifications.",
    ),
}


def load_commands() -> None:
    """Import every command's module (what ``--help`` of a lazy command group avoids)."""
    for module, _ in LAZY_COMMANDS.values():
        importlib.import_module(module)


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (start-up: ~1 s of imports less)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in LAZY_COMMANDS:
            importlib.import_module(LAZY_COMMANDS[cmd_name][0])
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click's, with the help of commands not yet imported from the table."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                # a stand-in with the same help: click's own shortening
                stand_in = click.Command(name, help=LAZY_COMMANDS[name][1])
                text = stand_in.get_short_help_str(limit)
            elif command.hidden:
                continue
            else:
                text = command.get_short_help_str(limit)
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fhir-adapter")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Logging level (default: FHIR_ADAPTER_LOG_LEVEL or WARNING). Logs go to stderr.",
)
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """FHIR interoperability adapter for the melasma trial NCT06677931.

    Exit codes: 0 ok, 65 data errors (valid rows still processed), 66 input unreadable,
    69 FHIR server unavailable, 70 internal error.
    """
    with user_errors():
        try:
            settings = Settings()
        except Exception as exc:  # pydantic ValidationError: name the setting, not its value
            raise ConfigurationError(f"invalid settings: {_settings_problem(exc)}") from None
    level = (log_level or settings.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = AppContext(settings)


def _settings_problem(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return exc.__class__.__name__
    problems = []
    for e in errors(include_input=False, include_url=False):
        name = "_".join(str(p) for p in e["loc"]).upper()
        problems.append(f"FHIR_ADAPTER_{name}: {e['msg']}" if name else str(e["msg"]))
    return "; ".join(problems)


pass_app = click.make_pass_decorator(AppContext)


@contextmanager
def progress_callback(desc: str, unit: str = "resources") -> Iterator[Any]:
    """``on_progress(n)`` drawing a bar on stderr when it is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


def progress(iterable: Any, desc: str, unit: str = "rows") -> Any:
    """A progress bar on stderr when it is a terminal; the plain iterable otherwise."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, file=sys.stderr, leave=False)
