"""Mapping: ``fhir-adapter map`` (map + validate + serialize) against the naive path.

The adapter runs as a user runs it, a fresh ``fhir-adapter map --format ndjson`` process per
scale; its rate is *marginal* - (resources at the large scale - at 1x) / (seconds at the large
scale - at 1x) - so start-up (imports, the trial definition, the first validation of each
resource shape) cancels. The naive baseline is what one writes with ``fhir.resources`` alone:
per resource, the model constructed (validated) from the same resource and ``model_dump_json``
(R4 through the ``fhir.resources.R4B`` models, as the adapter validates R4), in this process,
after one warm-up resource of each type, so its rate has no start-up either. Its resources are
the adapter's own 1x output (all of it; ``--quick``: an even spread of about 1,000).

Time is CPU time (user + system) of the process doing the work - the ``map`` child, this
process for the naive loop - as both are single-threaded: on an idle machine it is the wall
time, and on a shared one (2 cores, other jobs) it is what stays comparable within a run. The
wall-clock ratios are detail keys (``..._wall``).

Pinned: ``map_ratio_vs_naive`` (default mode) and ``map_strict_ratio_vs_naive`` (``--strict``:
every resource through its model). Detail: each rate, the resource counts, the peak RSS of the
``map`` process by scale and its growth from 1x (``map_rss_growth`` at ``map_rss_scale``), and
the start-up (CPU) time of ``fhir-adapter --help``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import Bench, adapter_command, high_water_kib

#: (fast scales, strict scales): the rate is marginal from the first to the last
FULL_SCALES = ((1, 10, 100), (1, 10))
QUICK_SCALES = ((1, 10), (1, 2))
NAIVE_QUICK_SUBSET = 1000
HELP_RUNS = 3


def run(bench: Bench) -> dict[str, Any]:
    fast_scales, strict_scales = QUICK_SCALES if bench.quick else FULL_SCALES
    results: dict[str, Any] = {}
    fast = {scale: _map(bench, scale, strict=False) for scale in fast_scales}
    strict = {scale: _map(bench, scale, strict=True) for scale in strict_scales}
    _same_bytes(fast[1], strict[1])
    naive = _naive(fast[1].out, subset=NAIVE_QUICK_SUBSET if bench.quick else None)
    naive_rate, naive_wall_rate, naive_n = naive
    small, top = fast_scales[0], fast_scales[-1]
    fast_rate = _marginal(fast[small], fast[top])
    strict_rate = _marginal(strict[strict_scales[0]], strict[strict_scales[-1]])
    fast_wall = _marginal(fast[small], fast[top], wall=True)
    strict_wall = _marginal(strict[strict_scales[0]], strict[strict_scales[-1]], wall=True)
    results.update(
        {
            "map_ratio_vs_naive": fast_rate / naive_rate,
            "map_strict_ratio_vs_naive": strict_rate / naive_rate,
            "map_ratio_vs_naive_wall": fast_wall / naive_wall_rate,
            "map_strict_ratio_vs_naive_wall": strict_wall / naive_wall_rate,
            "map_resources_per_s": fast_rate,
            "map_strict_resources_per_s": strict_rate,
            "map_naive_resources_per_s": naive_rate,
            "map_naive_resources": naive_n,
            "map_marginal_scales": [small, top],
            "map_strict_marginal_scales": [strict_scales[0], strict_scales[-1]],
            "map_resources_by_scale": {f"{s}x": r.resources for s, r in fast.items()},
            "map_cpu_seconds_by_scale": {f"{s}x": r.cpu for s, r in fast.items()},
            "map_wall_seconds_by_scale": {f"{s}x": r.seconds for s, r in fast.items()},
            "map_strict_cpu_seconds_by_scale": {f"{s}x": r.cpu for s, r in strict.items()},
            "map_strict_wall_seconds_by_scale": {f"{s}x": r.seconds for s, r in strict.items()},
            "map_rss_kib_by_scale": {f"{s}x": r.rss_kib for s, r in fast.items()},
            "map_rss_growth": fast[top].rss_kib / fast[1].rss_kib,
            "map_rss_scale": top,
            "cli_help_cpu_seconds": _help_seconds(),
        }
    )
    bench.say(
        f"map {fast_rate:,.0f}/s, strict {strict_rate:,.0f}/s, naive {naive_rate:,.0f}/s: "
        f"{results['map_ratio_vs_naive']:.1f}x and {results['map_strict_ratio_vs_naive']:.2f}x"
    )
    return results


class _Run:
    """One ``map`` process: its output, wall and CPU seconds, peak RSS, resources written."""

    def __init__(self, out: Path, measured: _Measured, resources: int) -> None:
        self.out, self.resources = out, resources
        self.seconds, self.cpu, self.rss_kib = measured.wall, measured.cpu, measured.rss_kib


class _Measured:
    def __init__(self, wall: float, cpu: float, rss_kib: int, returncode: int, err: bytes) -> None:
        self.wall, self.cpu, self.rss_kib, self.returncode, self.err = (
            wall,
            cpu,
            rss_kib,
            returncode,
            err,
        )


def _run_cpu(command: Sequence[str]) -> _Measured:
    """As :func:`benchmarks.common.run_measured`, with the child's CPU time (its rusage)."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(  # noqa: S603 - our own CLI, arguments from the benchmark
            list(command), stdout=subprocess.DEVNULL, stderr=err
        )
        peak = 0
        while True:  # the peak as run_measured reads it (ru_maxrss counts this process too)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, high_water_kib(proc.pid))
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        err.seek(0)
        return _Measured(
            wall,
            usage.ru_utime + usage.ru_stime,
            peak,
            os.waitstatus_to_exitcode(status),
            err.read(),
        )


def _map(bench: Bench, scale: int, *, strict: bool) -> _Run:
    data = bench.data(scale)
    mode = "strict" if strict else "fast"
    out = bench.scratch("map") / f"{mode}-{scale}x.ndjson"
    command = adapter_command("map", str(data), "--format", "ndjson", "--out", str(out))
    command.append("--strict" if strict else "--no-strict")
    measured = _run_cpu(command)
    if measured.returncode != 0:
        raise RuntimeError(f"map {mode} {scale}x failed: {measured.err.decode()[-2000:]}")
    with out.open("rb") as fh:
        resources = sum(1 for _ in fh)
    bench.say(
        f"map {mode} {scale}x: {resources:,} resources, {measured.cpu:.1f} s CPU "
        f"({measured.wall:.1f} s wall), {measured.rss_kib:,} KiB"
    )
    return _Run(out, measured, resources)


def _marginal(small: _Run, large: _Run, *, wall: bool = False) -> float:
    seconds = large.seconds - small.seconds if wall else large.cpu - small.cpu
    return (large.resources - small.resources) / seconds


def _same_bytes(fast: _Run, strict: _Run) -> None:
    if fast.out.read_bytes() != strict.out.read_bytes():
        raise RuntimeError("map and map --strict wrote different bytes")


def _naive(ndjson: Path, subset: int | None) -> tuple[float, float, int]:
    """Resources per CPU second and per wall second of per-resource ``model_validate`` +
    ``model_dump_json`` (R4B models), and how many resources."""
    from fhir.resources.R4B import get_fhir_model_class

    resources = [orjson.loads(line) for line in ndjson.read_bytes().splitlines()]
    if subset is not None and len(resources) > subset:
        resources = resources[:: len(resources) // subset]
    warm: dict[str, Any] = {}
    for resource in resources:  # imports and model building are start-up: not measured
        warm.setdefault(resource["resourceType"], resource)
    for resource in warm.values():
        get_fhir_model_class(resource["resourceType"]).model_validate(resource).model_dump_json()
    started, cpu = time.perf_counter(), time.process_time()
    for resource in resources:
        model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        model.model_dump_json()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - started
    return len(resources) / cpu, len(resources) / wall, len(resources)


def _help_seconds() -> float:
    """Median CPU time of ``fhir-adapter --help``: the CLI's start-up."""
    return statistics.median(_run_cpu(adapter_command("--help")).cpu for _ in range(HELP_RUNS))
