"""The README a newcomer reads documents every setting and every command (SPEC §1, §10)."""

from __future__ import annotations

from pathlib import Path

import click

from fhir_adapter.cli import cli
from fhir_adapter.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_setting_has_its_environment_variable_in_the_readme() -> None:
    missing = [
        f"FHIR_ADAPTER_{name.upper()}"
        for name in Settings.model_fields
        if f"`FHIR_ADAPTER_{name.upper()}`" not in README
    ]
    assert missing == []


def test_every_command_is_in_the_readme_commands_table() -> None:
    table = README[README.index("## Commands") : README.index("### Exit codes")]
    names = cli.list_commands(click.Context(cli))  # every command, imported or not yet
    assert "map" in names
    missing = [name for name in names if f"`fhir-adapter {name}" not in table]
    assert missing == []


def test_the_two_commands_open_the_readme_and_the_picture_exists() -> None:
    head = README[: README.index("## Commands")]
    assert "make demo" in head
    assert "make test" in head
    picture = "fhir_adapter/report/example/masi_over_time.png"
    assert picture in head
    assert (Path(__file__).resolve().parents[2] / picture).stat().st_size > 10_000
