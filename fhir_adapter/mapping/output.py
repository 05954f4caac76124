"""Writers: NDJSON (one resource per line) and transaction Bundles (SPEC §6, §13).

NDJSON keeps the canonical form: deterministic ids, ``Type/id`` references. A transaction Bundle
carries conditional updates (``PUT Type?identifier=system|value``, entries without ``id``);
references to resources in the same Bundle become ``urn:uuid`` (derived deterministically from
the target's type and id), references to resources in other Bundles become conditional
references on the target's business identifier, which the server resolves while processing
the transaction.
"""

from __future__ import annotations

import copy
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from fhir_adapter.io.outputs import ReplacedDirectory, starts_with
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import Resource

# Types without a standard R4 `identifier` search parameter: identified by _tag instead.
TAG_IDENTIFIED = frozenset({"AdverseEvent", "Provenance"})


def full_url(resource_type: str, resource_id: str) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'{resource_type}/{resource_id}')}"


def business_key(resource: Resource) -> tuple[str, str]:
    """(system, value) of the resource's business identifier (meta.tag for Provenance)."""
    tag = resource["meta"]["tag"][0]
    return str(tag["system"]), str(tag["code"])


def conditional_url(resource: Resource) -> str:
    system, value = business_key(resource)
    resource_type = resource["resourceType"]
    param = "_tag" if resource_type in TAG_IDENTIFIED else "identifier"
    return f"{resource_type}?{param}={system}|{value}"


def write_ndjson(resources: Iterable[Resource], fh: IO[bytes]) -> Iterator[Resource]:
    for resource in resources:
        fh.write(dumpb(resource) + b"\n")
        yield resource


def _rewrite_references(node: Any, local: dict[str, str], remote: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                out[key] = local.get(value) or remote.get(value) or value
            else:
                out[key] = _rewrite_references(value, local, remote)
        return out
    if isinstance(node, list):
        return [_rewrite_references(v, local, remote) for v in node]
    return node


def transaction_bundle(
    resources: list[Resource], conditional_refs: dict[str, str]
) -> dict[str, Any]:
    """One transaction Bundle of conditional updates for ``resources``."""
    local = {
        f"{r['resourceType']}/{r['id']}": full_url(r["resourceType"], r["id"]) for r in resources
    }
    entries = []
    for resource in resources:
        body = _rewrite_references(copy.deepcopy(resource), local, conditional_refs)
        ref = f"{resource['resourceType']}/{resource['id']}"
        del body["id"]
        entries.append(
            {
                "fullUrl": local[ref],
                "resource": body,
                "request": {"method": "PUT", "url": conditional_url(resource)},
            }
        )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


_BUNDLE_NAME = re.compile(r"bundle-[0-9]{4,}\.json")


def is_bundle_file(path: Path) -> bool:
    """A ``bundle-NNNN.json`` written by :func:`write_bundles` (what a re-run may replace)."""
    return bool(_BUNDLE_NAME.fullmatch(path.name)) and starts_with(
        path, b'{"resourceType":"Bundle"'
    )


def is_ndjson_file(path: Path) -> bool:
    """An NDJSON file of resources written by :func:`write_ndjson` (or an empty file)."""
    return starts_with(path, b'{"resourceType":')


def write_bundles(resources: Iterable[Resource], out_dir: Path, size: int) -> Iterator[Resource]:
    """Write ``bundle-0001.json``, ``bundle-0002.json``, … of at most ``size`` entries each.

    They replace the directory's earlier bundles whole once every resource is written (no
    stale ``bundle-0007.json`` of a longer earlier run); an error leaves the old ones.
    """
    replacement = ReplacedDirectory(out_dir, is_bundle_file)
    try:
        yield from _write_bundles(resources, replacement.open(), size)
    except BaseException:
        replacement.abort()
        raise
    replacement.commit()


def _write_bundles(resources: Iterable[Resource], out_dir: Path, size: int) -> Iterator[Resource]:
    conditional_refs: dict[str, str] = {}  # Type/id of resources already written -> conditional
    chunk: list[Resource] = []
    number = 0

    def flush() -> None:
        nonlocal number, chunk
        if not chunk:
            return
        number += 1
        bundle = transaction_bundle(chunk, conditional_refs)
        (out_dir / f"bundle-{number:04d}.json").write_bytes(dumpb(bundle) + b"\n")
        for r in chunk:
            conditional_refs[f"{r['resourceType']}/{r['id']}"] = conditional_url(r)
        chunk = []

    for resource in resources:
        chunk.append(resource)
        yield resource
        if len(chunk) >= size:
            flush()
    flush()
