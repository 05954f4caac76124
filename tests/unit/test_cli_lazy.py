"""The CLI imports a command's module on first use: the table it does it from stays complete."""

from __future__ import annotations

import subprocess
import sys

import click

from fhir_adapter.cli import cli, load_commands
from fhir_adapter.cli.base import LAZY_COMMANDS


def test_the_table_names_every_command_its_module_and_its_help() -> None:
    load_commands()
    assert set(LAZY_COMMANDS) == set(cli.commands)
    for name, command in cli.commands.items():
        module, short_help = LAZY_COMMANDS[name]
        assert command.callback is not None
        assert command.callback.__module__ == module, name
        # the help --help shows without importing the module is the command's own
        stand_in = click.Command(name, help=short_help)
        for limit in (45, 80, 10_000):
            assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit), name


def test_help_and_map_import_no_query_engine_nor_http_client() -> None:
    code = (
        "import sys\n"
        "from fhir_adapter.cli import cli\n"
        "ctx = cli.make_context('fhir-adapter', ['--help'], resilient_parsing=True)\n"
        "cli.format_help(ctx, __import__('click').HelpFormatter())\n"
        "cli.get_command(ctx, 'map')\n"
        "print(sorted(m for m in ('duckdb', 'requests', 'fhirpathpy', 'jwt') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def test_an_unloaded_command_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fhir_adapter", "map", "--help"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "--strict / --no-strict" in result.stdout
