"""Output paths: checked before anything is read or written, replaced whole per run (SPEC §3).

Inputs are read-only: an output or rejects path that is an input (``os.path.samefile``), holds
one, or is a file or directory the adapter did not write itself is refused up front with
:class:`OutputRefused` (exit 2), naming the option and the reason. What is written replaces the
previous run's output whole: a directory loses the files an earlier run wrote and this one did
not (no stale ``bundle-0007.json`` or rejects file), a file is swapped in with one rename.
Nothing is ever deleted that the adapter cannot recognise as its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from fhir_adapter.errors import OutputRefused

#: Prefix of the work directory a run writes into before its output replaces the previous one.
INCOMING_PREFIX = ".fhir-adapter-incoming-"
_PEEK = 64 * 1024

Owned = Callable[[Path], bool]


def starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the regular file ``path`` begins with ``prefix`` (an empty file counts)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(len(prefix))
    except OSError:
        return False
    return head == b"" or head == prefix


def first_line(path: Path) -> str | None:
    """The first line of a UTF-8 file (bounded read), None when unreadable or not text."""
    try:
        with path.open("rb") as fh:
            head = fh.readline(_PEEK)
        return head.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None


def check_output(
    path: Path,
    *,
    option: str,
    inputs: Iterable[Path],
    kind: Literal["file", "directory"],
    owned: Owned,
    overwrite: str = "it replaces the directory's contents on every run",
) -> None:
    """Refuse ``path`` as the output of ``option`` unless writing it is safe (see the module).
    ``overwrite`` says what writing would do to a directory's files (the refusal names it)."""
    where = f"{option} {path}"
    exists = os.path.lexists(path)
    if exists and not path.exists():
        raise OutputRefused(f"{where}: a broken symbolic link; choose another path")
    target = path.resolve()
    for source in inputs:
        if not source.exists():
            continue
        same = exists and os.path.samefile(path, source)
        if same or target == source.resolve():
            what = "directory" if source.is_dir() else "file"
            raise OutputRefused(f"{where}: is the input {what} {source}; inputs are never written")
        if kind == "directory" and source.resolve().is_relative_to(target):
            raise OutputRefused(
                f"{where}: holds the input {source}; it would be overwritten - choose a "
                "directory of its own"
            )
    if exists:
        _check_existing(path, where, kind, owned, overwrite)
    _check_writable(path, where, kind)


def _check_existing(path: Path, where: str, kind: str, owned: Owned, overwrite: str) -> None:
    if kind == "directory":
        if not path.is_dir():
            raise OutputRefused(f"{where}: not a directory (this option names a directory)")
        foreign = sorted(
            e.name
            for e in path.iterdir()
            if not (e.name.startswith(INCOMING_PREFIX) or (_plain(e) and owned(e)))
        )
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputRefused(
                f"{where}: holds files fhir-adapter did not write ({listed}); {overwrite} - "
                "choose a new or empty directory"
            )
        return
    if path.is_dir():
        raise OutputRefused(f"{where}: a directory (this option names a file)")
    if not _plain_file(path):
        raise OutputRefused(f"{where}: not a regular file")
    if not owned(path):
        raise OutputRefused(
            f"{where}: exists and is not a file fhir-adapter wrote; choose another path (or "
            "delete it first)"
        )


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _plain(path: Path) -> bool:
    """A regular file or directory, not a link (``owned`` decides whether it is ours)."""
    return (path.is_file() or path.is_dir()) and not path.is_symlink()


def _check_writable(path: Path, where: str, kind: str) -> None:
    probe = path if kind == "directory" and path.is_dir() else path.parent
    while not probe.exists():
        if os.path.lexists(probe):
            raise OutputRefused(f"{where}: cannot be created ({probe} is a broken link)")
        probe = probe.parent
    if not probe.is_dir():
        raise OutputRefused(f"{where}: cannot be created ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputRefused(f"{where}: cannot be written ({probe}: permission denied)")


def refuse_overlap(first: tuple[str, Path], second: tuple[str, Path]) -> None:
    """Two outputs of one command may not be one path or lie inside each other."""
    (a_option, a), (b_option, b) = first, second
    ra, rb = a.resolve(), b.resolve()
    if ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra):
        raise OutputRefused(f"{a_option} and {b_option} must be separate paths")


class ReplacedDirectory:
    """A directory whose contents a run replaces: files are written into :meth:`open`'s work
    directory (inside the target) and moved in by :meth:`commit`, which then removes what an
    earlier run wrote (``owned``) and this one did not. :meth:`abort` leaves the old contents."""

    def __init__(self, target: Path, owned: Owned) -> None:
        self.target = target
        self.owned = owned
        self.incoming: Path | None = None
        self._created = False

    def open(self) -> Path:
        self._created = not os.path.lexists(self.target)
        self.target.mkdir(parents=True, exist_ok=True)
        incoming = self.target / f"{INCOMING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        incoming.mkdir()
        self.incoming = incoming
        return incoming

    def commit(self) -> None:
        incoming = self.incoming
        if incoming is None:
            return
        written = set()
        for item in sorted(incoming.iterdir()):
            os.replace(item, self.target / item.name)
            written.add(item.name)
        incoming.rmdir()
        self.incoming = None
        for entry in self.target.iterdir():
            if entry.name in written:
                continue
            if entry.name.startswith(INCOMING_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)  # left by a killed run
            elif _plain_file(entry) and self.owned(entry):
                entry.unlink()

    def abort(self) -> None:
        if self.incoming is not None:
            shutil.rmtree(self.incoming, ignore_errors=True)
            self.incoming = None
            if self._created:  # a failed first run leaves no empty directory behind
                with contextlib.suppress(OSError):
                    self.target.rmdir()


class ReplacedFile:
    """A file a run replaces with one rename: written at :attr:`incoming` (beside the target),
    swapped in by :meth:`commit`; :meth:`abort` leaves the old file."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.incoming = target.parent / f".{target.name}{INCOMING_PREFIX}{secrets.token_hex(4)}"

    def commit(self) -> None:
        if self.incoming.exists():
            os.replace(self.incoming, self.target)

    def abort(self) -> None:
        self.incoming.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_file(target: Path) -> Iterator[Path]:
    """Write the yielded path; on success it replaces ``target``, on error nothing changes."""
    replacement = ReplacedFile(target)
    try:
        yield replacement.incoming
    except BaseException:
        replacement.abort()
        raise
    replacement.commit()
