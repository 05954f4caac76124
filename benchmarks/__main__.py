"""``python -m benchmarks [--quick] [--json PATH] [--only PART ...]``: run, print, write JSON."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from benchmarks.common import Bench

# the parts, in the order they run; each module has run(bench) -> dict
PARTS = ("map_bench", "sync_bench", "webhook_bench")
# pinned keys of the JSON (other tools read them): the part that measures each
PINNED = {
    "map_ratio_vs_naive": "map_bench",
    "map_strict_ratio_vs_naive": "map_bench",
    "sync_fraction_of_raw_bundles": "sync_bench",
    "sync_ratio_vs_fhirpy": "sync_bench",
    "sync_ratio_vs_put_at_20ms": "sync_bench",
    "resync_fraction": "sync_bench",
    "rss_growth_1x_to_100x": "map_bench and sync_bench",
    "webhook_ratio_vs_bare": "webhook_bench",
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="under 5 minutes; memory 1x to 10x")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fhir-adapter-bench-") as tmp:
        bench = Bench(work=args.work or Path(tmp), quick=args.quick)
        results: dict[str, Any] = {}
        for part in args.only or PARTS:
            sys.stderr.write(f"{part}:\n")
            module = importlib.import_module(f"benchmarks.{part}")
            results.update(module.run(bench))
    results.update(combined_memory_growth(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    print_table(results)
    return 0


def combined_memory_growth(results: dict[str, Any]) -> dict[str, Any]:
    """``rss_growth_1x_to_100x``: the larger of map's and sync's peak-RSS growth, at the scale
    both reached (``rss_growth_scale``: 10 in a quick run)."""
    growths = [results[k] for k in ("map_rss_growth", "sync_rss_growth") if k in results]
    if not growths:
        return {}
    scales = [results[k] for k in ("map_rss_scale", "rss_growth_scale") if k in results]
    return {"rss_growth_1x_to_100x": max(growths), "rss_growth_scale": min(scales, default=100)}


def print_table(results: dict[str, Any]) -> None:
    width = max(len(k) for k in PINNED)
    for key in PINNED:
        value = results.get(key)
        shown = "not measured" if value is None else f"{value:.3f}"
        sys.stdout.write(f"{key:<{width}}  {shown}\n")


if __name__ == "__main__":
    sys.exit(main())
