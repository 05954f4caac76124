"""Build, start, reset and stop the HAPI FHIR JPA test server (tests/hapi_server).

The server is a small Java launcher (HAPI FHIR 8.8.0 JPA, R4, H2 in memory, rest-hook
Subscriptions, ``$validate``) built with Maven from the committed ``pom.xml``. The build is
cached twice: dependencies in the user's Maven repository (``~/.m2``), the launcher in
``tests/hapi_server/target`` next to a stamp of the hash of ``pom.xml`` and ``src/`` — it is
rebuilt only when they change.

    python -m tests.hapi            # build if needed, run in the foreground, print the base URL

Where Java 17+, Maven or Maven Central is missing, `HapiUnavailable` says which (the pytest
fixtures turn it into one skip reason); any other failure is a `HapiError`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

HAPI_DIR = Path(__file__).resolve().parent / "hapi_server"
TARGET_DIR = HAPI_DIR / "target"
JAR = TARGET_DIR / "hapi-test-server.jar"
STAMP = TARGET_DIR / "source-hash"
MIN_JAVA = 17
BUILD_TIMEOUT_S = 1800.0  # a first build downloads ~300 MB into ~/.m2
STARTUP_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 20.0
EXPUNGE_ATTEMPTS = 10

# Start-up matters more than peak speed for a test server: C1 only (no C2 warm-up), serial GC
# (2 cores shared), a heap that holds the validator's R4 definitions.
JVM_FLAGS = (
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseSerialGC",
    "-Xms256m",
    "-Xmx1536m",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
)

# Maven's words for "could not download": the registry is unreachable, not the build broken.
_NETWORK_FAILURE = re.compile(
    r"Could not transfer artifact|Could not resolve dependencies|Could not resolve plugin|"
    r"Plugin .* could not be resolved|UnknownHostException|Network is unreachable|"
    r"Connection refused|Connect to .* timed out|No route to host|offline mode",
)


class HapiUnavailable(RuntimeError):
    """Java, Maven or Maven Central is missing here: the HAPI tests cannot run."""


class HapiError(RuntimeError):
    """The HAPI test server failed to build, start or answer."""


# -- tools ----------------------------------------------------------------------------------
def java_version(java: str) -> int | None:
    """Major version of ``java`` (``java -version`` prints it on stderr), None if unusable."""
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8" is Java 8


def find_java() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH, if it is Java 17 or newer."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    found = []
    for java in candidates:
        version = java_version(java)
        if version is not None and version >= MIN_JAVA:
            return java
        found.append(f"{java} ({'unusable' if version is None else f'Java {version}'})")
    raise HapiUnavailable(
        f"HAPI FHIR tests need Java {MIN_JAVA}+ (JAVA_HOME or java on PATH); found: "
        + (", ".join(found) or "none")
    )


def find_maven() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HapiUnavailable("HAPI FHIR tests need Maven (mvn on PATH) to build tests/hapi_server")
    return mvn


# -- build ----------------------------------------------------------------------------------
def source_hash(hapi_dir: Path = HAPI_DIR) -> str:
    """sha256 of pom.xml and every file under src/ (names and contents)."""
    digest = hashlib.sha256()
    files = [hapi_dir / "pom.xml", *sorted(p for p in (hapi_dir / "src").rglob("*") if p.is_file())]
    for path in files:
        digest.update(path.relative_to(hapi_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def is_built(hapi_dir: Path = HAPI_DIR) -> bool:
    stamp = hapi_dir / "target" / STAMP.name
    jar = hapi_dir / "target" / JAR.name
    return jar.is_file() and stamp.is_file() and stamp.read_text().strip() == source_hash(hapi_dir)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """One build at a time per checkout (two pytest runs may start together)."""
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(hapi_dir: Path = HAPI_DIR) -> float:
    """Build the launcher unless the stamp matches; returns the seconds spent (0 when cached)."""
    target = hapi_dir / "target"
    if is_built(hapi_dir):
        return 0.0
    java = find_java()
    mvn = find_maven()
    with _build_lock(target):
        if is_built(hapi_dir):  # another process built it while we waited
            return 0.0
        started = time.monotonic()
        env = dict(os.environ)
        env["JAVA_HOME"] = str(Path(java).resolve().parent.parent)  # Maven compiles with it
        argv = [mvn, "-B", "-q", "-Dstyle.color=never", "-Dmaven.test.skip=true", "package"]
        try:
            done = subprocess.run(
                argv,
                cwd=hapi_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HapiUnavailable(
                f"building tests/hapi_server took over {BUILD_TIMEOUT_S:.0f} s "
                "(is Maven Central reachable?)"
            ) from exc
        output = f"{done.stdout}\n{done.stderr}"
        if done.returncode != 0:
            if _NETWORK_FAILURE.search(output):
                raise HapiUnavailable(
                    "HAPI FHIR tests need Maven Central to build tests/hapi_server: "
                    + _first_error(output)
                )
            raise HapiError(f"mvn package failed in {hapi_dir}:\n{output[-4000:]}")
        (target / STAMP.name).write_text(source_hash(hapi_dir) + "\n")
        return time.monotonic() - started


def _first_error(output: str) -> str:
    """The line that says what could not be downloaded (else the first error line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).replace("[ERROR]", "").strip() for line in
             output.splitlines()]
    for line in lines:
        if _NETWORK_FAILURE.search(line):
            return line[:300]
    return next((line[:300] for line in lines if line), "no output")


# -- run ------------------------------------------------------------------------------------
@dataclass
class Timings:
    build_s: float = 0.0
    start_s: float = 0.0  # process start to the first 200 of /metadata


class HapiServer:
    """The HAPI FHIR JPA test server as a child process on 127.0.0.1 (a free port).

    >>> with HapiServer() as hapi:
    ...     requests.get(hapi.base_url + "/metadata")
    """

    def __init__(self, hapi_dir: Path = HAPI_DIR, startup_timeout: float = STARTUP_TIMEOUT_S):
        self.hapi_dir = hapi_dir
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.timings = Timings()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def base_url(self) -> str:
        """FHIR base URL, e.g. ``http://127.0.0.1:PORT/fhir``."""
        if self.port is None:
            raise HapiError("HAPI server not started")
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return Path(self._workdir.name) / "hapi.log" if self._workdir else None

    def start(self) -> str:
        """Build if needed, start the JVM and wait for ``/metadata``; returns the base URL."""
        if self.running:
            return self.base_url
        java = find_java()
        self.timings.build_s = ensure_built(self.hapi_dir)
        self._workdir = self._workdir or tempfile.TemporaryDirectory(prefix="hapi-test-server-")
        workdir = Path(self._workdir.name)
        port_file = workdir / "port"
        port_file.unlink(missing_ok=True)
        started = time.monotonic()
        with (workdir / "hapi.log").open("ab") as log:
            self._proc = subprocess.Popen(
                [java, *JVM_FLAGS, "-jar", str(self.hapi_dir / "target" / JAR.name),
                 "--port", "0", "--port-file", str(port_file)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not the JVM
            )
        try:
            self.port = self._wait_for_port(port_file, started)
            self._wait_for_metadata(started)
        except BaseException:
            self.stop()
            raise
        self.timings.start_s = time.monotonic() - started
        return self.base_url

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise HapiError(
                f"HAPI server exited with {self._proc.returncode}; log:\n{self.log_tail()}"
            )

    def _wait_for_port(self, port_file: Path, started: float) -> int:
        while time.monotonic() - started < self.startup_timeout:
            self._check_alive()
            if port_file.is_file():
                return int(port_file.read_text().strip())
            time.sleep(0.1)
        raise HapiError(
            f"HAPI server not up within {self.startup_timeout:.0f} s; log:\n{self.log_tail()}"
        )

    def _wait_for_metadata(self, started: float) -> None:
        url = f"{self.base_url}/metadata"
        while time.monotonic() - started < self.startup_timeout:
            self._check_alive()
            try:
                if requests.get(url, timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise HapiError(f"{url} did not answer within {self.startup_timeout:.0f} s")

    def log_tail(self, lines: int = 60) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def reset(self) -> None:
        """Empty the server: Subscriptions deleted (so none stays active), then ``$expunge``."""
        session = requests.Session()
        session.headers.update({"Accept": "application/fhir+json", "Cache-Control": "no-cache"})
        found = session.get(f"{self.base_url}/Subscription", params={"_elements": "id"}, timeout=60)
        found.raise_for_status()
        for entry in found.json().get("entry", []):
            gone = session.delete(f"{self.base_url}/Subscription/{entry['resource']['id']}", timeout=60)
            gone.raise_for_status()
        for attempt in range(EXPUNGE_ATTEMPTS):
            expunged = session.post(
                f"{self.base_url}/$expunge",
                json={
                    "resourceType": "Parameters",
                    "parameter": [{"name": "expungeEverything", "valueBoolean": True}],
                },
                headers={"Content-Type": "application/fhir+json"},
                timeout=300,
            )
            # 409 (HAPI-0550, a foreign key): a write still being committed — e.g. the
            # transaction of a sync the previous test killed — raced the expunge; again
            if expunged.status_code != 409 or attempt == EXPUNGE_ATTEMPTS - 1:
                break
            time.sleep(1.0)
        if expunged.status_code != 200:
            raise HapiError(f"$expunge answered {expunged.status_code}: {expunged.text[:500]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout (the database is in memory: nothing to lose)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the server and delete its working directory (log, port file)."""
        self.stop()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> HapiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def software(base_url: str) -> dict[str, Any]:
    """``CapabilityStatement.software`` of the server (name, version)."""
    response = requests.get(f"{base_url}/metadata", timeout=60)
    response.raise_for_status()
    return dict(response.json().get("software", {}))


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.hapi", description="HAPI FHIR JPA test server (R4, H2 in memory)."
    )
    parser.parse_args(argv)
    server = HapiServer()
    try:
        server.start()
    except (HapiUnavailable, HapiError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        server.close()
        return 1
    sys.stdout.write(
        f"HAPI FHIR R4 test server: {server.base_url}\n"
        f"build {server.timings.build_s:.1f} s, start {server.timings.start_s:.1f} s; "
        f"log: {server.log_path}\nCtrl-C to stop.\n"
    )
    sys.stdout.flush()
    stopping = False

    def _on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stopping and server.running:
            time.sleep(0.5)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
