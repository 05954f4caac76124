"""A plain (non-editable) install ships the trial definition inside the package (SPEC §1)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_mappings_and_entry_point(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fhir_adapter-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for yaml_file in ("study.yaml", "codesystem.yaml", "fhir.yaml", "adverse_events.yaml"):
        assert f"fhir_adapter/mappings/{yaml_file}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fhir-adapter = fhir_adapter.cli:main" in text
    assert not any(n.startswith("tests/") for n in names)
    # the webhook layer (SPEC §8) ships beside the library
    for module in ("__init__", "auth", "ingest", "notify", "openapi", "ops"):
        assert f"server/{module}.py" in names
