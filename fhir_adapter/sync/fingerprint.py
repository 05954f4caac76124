"""What a sync's staging depends on, as one digest: the unchanged re-sync's shortcut.

Staging is a pure function of the source files, the adapter's code, the trial definition, the
settings and options of the run, the site's "today" (rows dated after it are rejected) and the
outbox. When the digest of the first five equals the one recorded by a clean, settled earlier
run, and the outbox has not changed since that run ended (any write to it deletes the record,
see :meth:`Outbox.unchanged_stage`), staging again would change nothing: the sync skips mapping
and validation and goes straight to sending (which then finds nothing to send).

The digest covers, conservatively:

- every source file the mapper reads (``<kind>.csv`` for each kind): its whole content, or
  that it is absent; anything there that is not a regular file, or is over
  ``FHIR_ADAPTER_MAX_FILE_BYTES``, gives no digest (no shortcut; intake refuses it unread);
- the code: every ``.py`` file of the package, and the package version;
- the trial definition: every file of the mappings directory;
- every setting (secrets as the placeholder pydantic writes, never their value), the mapping
  context and the options of the run (threshold, ``--allow-removals``, the removal share).

"Today" is not part of the digest: a clean run had no row dated after its day, so none is
after any later day; the shortcut is refused only when the clock went back.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

import fhir_adapter
from fhir_adapter.intake import KINDS, file_name
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.settings import Settings
from fhir_adapter.trial import default_mappings_dir

_PACKAGE = Path(fhir_adapter.__file__).resolve().parent
_CHUNK = 1 << 20


def _file_digest(path: Path, sha: Any, max_bytes: int) -> bool:
    """Feed a regular file's content to ``sha``; False when ``path`` is anything else or larger
    than ``max_bytes`` (intake refuses it after one ``stat``: it is never read whole here)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if os.path.lexists(path):  # a broken link: unreadable, not absent
            return False
        sha.update(b"absent\0")
        return True
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a directory: never read here
            return False
        if info.st_size > max_bytes:
            return False
        with os.fdopen(fd, "rb", closefd=False) as fh:
            while chunk := fh.read(_CHUNK):
                sha.update(chunk)
    finally:
        os.close(fd)
    sha.update(b"\0")
    return True


def _tree_digest(root: Path, pattern: str) -> str:
    sha = hashlib.sha256()
    for path in sorted(root.rglob(pattern)):
        if path.is_file():
            sha.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()


@functools.cache  # the code a process runs is the code it loaded once
def code_digest() -> str:
    """The adapter's own code (every module of the package) and version."""
    return f"{fhir_adapter.__version__}:{_tree_digest(_PACKAGE, '*.py')}"


def input_fingerprint(
    directory: Path,
    *,
    ctx: MappingContext,
    settings: Settings,
    options: Mapping[str, Any],
) -> str | None:
    """The digest of everything staging ``directory`` depends on but the outbox and "today";
    None when a source is not a regular file or over the size limit (never skipped)."""
    sha = hashlib.sha256()
    for kind in KINDS:
        sha.update(kind.encode() + b"\0")
        if not _file_digest(directory / file_name(kind), sha, settings.max_file_bytes):
            return None
    mappings = (settings.mappings_dir or default_mappings_dir()).resolve()
    context = {
        "fhir_version": ctx.fhir_version,
        "target": ctx.target,
        "identifier_base": ctx.identifier_base,
        "mrn_system": ctx.mrn_system,
        "timezone": ctx.timezone,
        "adapter_version": ctx.adapter_version,
    }
    described = {
        "code": code_digest(),
        "mappings": _tree_digest(mappings, "*"),
        "settings": settings.model_dump(mode="json"),
        "context": context,
        "options": {k: str(v) for k, v in sorted(options.items())},
    }
    sha.update(orjson.dumps(described, option=orjson.OPT_SORT_KEYS, default=str))
    return sha.hexdigest()


__all__ = ["code_digest", "input_fingerprint"]
