"""What every benchmark part shares: the work directory, data sets by scale, timing, peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fhir_adapter.generate import generate

PARTICIPANTS_AT_1X = 60


@dataclass
class Bench:
    """One benchmark run: where it works, how thorough it is, what it has measured so far."""

    work: Path
    quick: bool = False
    log: list[str] = field(default_factory=list)

    def data(self, scale: int = 1) -> Path:
        """The synthetic set at ``scale`` x 60 participants (no bad/ files), generated once."""
        out = self.work / "data" / f"{scale}x"
        if not (out / "participants.csv").exists():
            generate(out, n_participants=PARTICIPANTS_AT_1X * scale, with_bad=False)
        return out

    def scratch(self, name: str) -> Path:
        path = self.work / "scratch" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def say(self, line: str) -> None:
        self.log.append(line)
        sys.stderr.write(f"  {line}\n")
        sys.stderr.flush()


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` holds the wall-clock seconds."""
    result: list[float] = []
    started = time.perf_counter()
    try:
        yield result
    finally:
        result.append(time.perf_counter() - started)


def adapter_command(*args: str) -> list[str]:
    """The CLI as a user runs it: a fresh process of this interpreter."""
    return [sys.executable, "-m", "fhir_adapter", *args]


def run_measured(
    command: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[float, int, subprocess.CompletedProcess[bytes]]:
    """Run ``command`` to completion: (wall seconds, peak RSS in KiB of that child, the result).

    The peak is the child's own high-water mark (``VmHWM`` of ``/proc/<pid>/status``, read
    every 20 ms while it runs; it only grows). Not ``wait4``'s ``ru_maxrss``: Linux carries the
    RSS of the forked copy of *this* process across ``exec`` into it, so a child of a large
    benchmark process would report at least the benchmark's own size.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 - our own CLI, arguments from the benchmark
            list(command), env={**os.environ, **(env or {})}, cwd=cwd, stdout=out, stderr=err
        )
        peak = 0
        while proc.poll() is None:
            peak = max(peak, high_water_kib(proc.pid))
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(list(command), proc.returncode, out.read(), err.read())
    return seconds, peak, result


def high_water_kib(pid: int) -> int:
    """``VmHWM`` of a running process (0 once it has exited or before it has a memory map)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
