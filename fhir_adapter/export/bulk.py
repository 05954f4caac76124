"""The export on disk in Bulk Data layout (Bulk Data Access IG, complete-status manifest).

``<Type>.ndjson`` per resource type, lines sorted by id (a pseudonym: the order of the source,
e.g. S001, S002, ..., is not carried over), ``OperationOutcome.ndjson`` when there are messages,
and ``manifest.json`` with ``transactionTime``, ``request``, ``requiresAccessToken``, ``output``
and ``error``; file URLs are relative to the manifest. Everything is written into a fresh
directory beside ``--out`` and moved into place at the end, so a failed run leaves the previous
export as it was and never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

from fhir_adapter.errors import AdapterError, ExitCode
from fhir_adapter.jsonout import dumpb, dumps

MANIFEST = "manifest.json"
ERRORS = "OperationOutcome.ndjson"


class OutputRefused(AdapterError):
    """``--out`` cannot take the export (exit 66)."""

    exit_code = ExitCode.INPUT_UNREADABLE


def check_output(out: Path, inputs: list[Path]) -> None:
    """Refuse an ``--out`` that is, holds or lies in an input, or is a directory of other files."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise OutputRefused(f"{out}: the output must not be, contain or lie inside the input")
    if target.exists() and not target.is_dir():
        raise OutputRefused(f"{out}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise OutputRefused(
            f"{out}: the directory is not empty and holds no earlier export ({MANIFEST}); "
            "choose an empty or new directory"
        )


class BulkWriter:
    """Collects resource lines per type, then writes the sorted files and the manifest."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        self._spool: IO[bytes] = (self.staging / "spool.tmp").open("w+b")
        self._lines: dict[str, list[tuple[str, int, int]]] = {}
        self._issues: list[bytes] = []

    def add(self, resource: dict[str, Any]) -> None:
        data = dumpb(resource) + b"\n"
        offset = self._spool.tell()
        self._spool.write(data)
        rtype, rid = str(resource["resourceType"]), str(resource["id"])
        self._lines.setdefault(rtype, []).append((rid, offset, len(data)))

    def add_issue(self, outcome: dict[str, Any]) -> None:
        self._issues.append(dumpb(outcome) + b"\n")

    def counts(self) -> dict[str, int]:
        return {rtype: len(lines) for rtype, lines in sorted(self._lines.items())}

    def finish(
        self, *, transaction_time: str, request: str, extension: dict[str, Any]
    ) -> dict[str, Any]:
        output = []
        for rtype, lines in sorted(self._lines.items()):
            name = f"{rtype}.ndjson"
            with (self.staging / name).open("wb") as fh:
                for _, offset, length in sorted(lines):
                    self._spool.seek(offset)
                    fh.write(self._spool.read(length))
            output.append({"type": rtype, "url": name, "count": len(lines)})
        self._spool.close()
        (self.staging / "spool.tmp").unlink()
        errors = []
        if self._issues:
            (self.staging / ERRORS).write_bytes(b"".join(sorted(self._issues)))
            errors.append({"type": "OperationOutcome", "url": ERRORS, "count": len(self._issues)})
        manifest = {
            "transactionTime": transaction_time,
            "request": request,
            "requiresAccessToken": False,
            "output": output,
            "error": errors,
            "extension": extension,
        }
        (self.staging / MANIFEST).write_text(dumps(manifest, indent=True) + "\n", encoding="utf-8")
        self._swap()
        return manifest

    def _swap(self) -> None:
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old.", dir=self.out.parent))
            os.replace(self.out, old / "export")
        try:
            os.replace(self.staging, self.out)
        except OSError:
            if old is not None:
                os.replace(old / "export", self.out)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        shutil.rmtree(self.staging, ignore_errors=True)


__all__ = ["ERRORS", "MANIFEST", "BulkWriter", "OutputRefused", "check_output"]
