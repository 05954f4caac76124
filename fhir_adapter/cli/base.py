"""The command group, its shared context and helpers (SPEC §10).

Exit codes: 0 ok, 65 data errors (valid rows still processed), 66 input unreadable,
69 FHIR server unavailable, 70 internal error. stdout carries results only; every message,
warning and rejected row goes to stderr. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from fhir_adapter import __version__
from fhir_adapter.errors import AdapterError, ConfigurationError
from fhir_adapter.settings import Settings
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


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn adapter errors into a one-line message and their exit code; bugs into exit 70."""
    try:
        yield
    except AdapterError as exc:
        echo_err(f"error: {exc}")
        sys.exit(int(exc.exit_code))
    except KeyboardInterrupt:
        echo_err("interrupted")
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
