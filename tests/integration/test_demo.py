"""`make demo` runs `fhir-adapter demo`: the whole pipeline on a synthetic set, one command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("fhir-adapter", path=str(Path(sys.executable).parent))


@pytest.mark.integration
def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    assert EXE is not None
    out = tmp_path / "demo"
    result = subprocess.run(
        [EXE, "demo", "--out", str(out), "--participants", "8"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for step in (
        "1. generated",
        "2. validated",
        "3. scored",
        "4. eligibility",
        "5. mapped to FHIR R4",
        "   and to FHIR R5",
        "6. started the local FHIR",
        "7. report of what the server holds (enrolled: combo 4, laser 4)",
        "8. stopped the local FHIR server",
    ):
        assert step in text, text
    scored = re.search(r"3\. scored (\d+) subject x visits: .*mean-of-2 (\d+)", text)
    assert scored is not None, text
    assert int(scored.group(1)) > 8  # 8 participants x up to 9 visits
    assert "mean MASI improvement at m8, arm combo" in text
    first = re.search(r"first sync: (\d+) created", text)
    second = re.search(r"second sync: (\d+) created, (\d+) updated", text)
    assert first is not None
    assert int(first.group(1)) > 0
    assert second is not None
    assert second.groups() == ("0", "0")  # a re-run writes nothing
    assert "read back from the server: AdverseEvent" in text
    assert (out / "fhir" / "r4" / "bundles" / "bundle-0001.json").is_file()
    assert (out / "fhir" / "r5" / "all.ndjson").is_file()
    assert (out / "data" / "bad" / "README.md").is_file()
    # the deliberately bad rows are shown with file, line, field and reason
    assert re.search(r"bad/: \d+ rows rejected", text), text
    assert re.search(r"^     participants\.csv:\d+: rejected: \w+: ", text, re.M), text
    report = out / "report" / "report.html"
    assert str(report.resolve()) in text
    assert report.is_file()
    assert (out / "report" / "summary.json").is_file()


@pytest.mark.integration
def test_a_second_demo_in_the_same_place_works(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    for _ in range(2):
        result = subprocess.run(
            [EXE, "demo", "--out", str(out), "--participants", "4"],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "8. stopped the local FHIR server" in result.stdout


@pytest.mark.integration
def test_test_server_command_serves_metadata(tmp_path: Path) -> None:
    """`python -m fhir_adapter.testserver` (what `fhir-adapter test-server` runs) for people."""
    import signal
    import socket
    import threading

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_adapter.testserver", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(120, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        first_line = proc.stdout.readline()  # printed once the server answers
        assert f"http://127.0.0.1:{port}/fhir/R4" in first_line
        r = requests.get(f"http://127.0.0.1:{port}/fhir/R4/metadata", timeout=10)
        assert r.json()["fhirVersion"] == "4.0.1"
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest
