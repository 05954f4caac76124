"""Benchmarks of fhir-adapter (issue 15): ``python -m benchmarks [--quick] [--json PATH]``.

Not run in CI. Each part is a module with ``run(bench: Bench) -> dict[str, Any]`` returning its
pinned keys (see ``PINNED`` in ``__main__``) and any detail under other keys.
"""
