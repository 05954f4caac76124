"""A newcomer's install (issue 13 item 3): the wheel built from this checkout, installed with the
`demo` extra into a fresh venv (its dependencies resolved from the index, none from this venv
or the source tree), runs `fhir-adapter demo` and `fhir-adapter serve --help` from an empty
directory. This proves the runtime imports all come from `[project.dependencies]` and that the
local FHIR server, the webhook layer and the trial definition ship inside the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/`` of a fresh venv holding ``fhir-adapter[demo]`` from a wheel of the checkout."""
    work = tmp_path_factory.mktemp("newcomer")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = work.glob("fhir_adapter-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    done = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", f"{wheel}[demo]"],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


def _clean_env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_ADAPTER_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_demo_runs_from_an_empty_directory_after_a_plain_install(
    installed: Path, tmp_path: Path
) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    done = subprocess.run(
        [str(installed / "fhir-adapter"), "demo", "--out", "out", "--participants", "6"],
        cwd=cwd, env=_clean_env(installed), capture_output=True, text=True, timeout=900,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in range(1, 9):
        assert f"{step}. " in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert (cwd / "out" / "report" / "report.html").is_file()
    assert (cwd / "out" / "report" / "summary.json").is_file()
    assert sorted(p.name for p in cwd.iterdir()) == ["out"]  # nothing else written where it ran


def test_serve_help_works_after_a_plain_install(installed: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(installed / "fhir-adapter"), "serve", "--help"],
        cwd=tmp_path, env=_clean_env(installed), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "--bind" in done.stdout
    assert list(tmp_path.iterdir()) == []
