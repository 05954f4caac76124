"""Streaming CSV reader with strict structure (SPEC §3 "Structure is strict").

Checked before a single row is parsed, each at the cost of a ``stat`` or of the first line:

- the path is a readable regular file (a directory, FIFO, device, broken or looping symbolic
  link is an error naming what it is, never "absent"), no larger than ``max_file_bytes``;
- the first line (read with a bounded read) is a header of at most ``max_columns`` columns;
  UTF-16, gzip, zip/xlsx, xls and binary files are named for what they are;
- the header holds every required column, no duplicate, and no unknown column that is a near
  miss of an absent optional one (a misspelling, which would silently drop that column's data);
  unknown extra columns are a warning and are ignored;
- the whole file is UTF-8 (a BOM is accepted); anything else is rejected whole with a message
  saying what it looks like and how to re-export it.

Rows are then yielded one record at a time with the physical line it starts on (header = 1).
Blank lines are skipped; CRLF is fine. A record is rejected, not guessed at, when

- its cell count differs from the header's;
- a quote does not open a cell (``ab"c``) or text follows a closing quote (``"ab"c``);
- a quoted cell runs over the end of its line outside the free-text columns, or its line
  breaks make it longer than :data:`MAX_MULTILINE_CELL` characters, or it is never closed, or
  the line it would swallow is itself a complete row.

A rejected record never takes other lines with it: reading resumes at the physical line after
the one the record began on, so one stray quote costs one row, not the rest of the file.

Why a tokenizer of our own: Python's :mod:`csv` (and the other CSV libraries on PyPI) read a
stray quote as the start of a quoted cell that runs until the next quote anywhere in the file,
silently merging the rows in between, and none of them can "reject this record and resume at
the next physical line" or bound a multi-line cell. The grammar accepted here is RFC 4180 with
those limits; it is small and linear in the size of the input.
"""

from __future__ import annotations

import codecs
import difflib
import errno
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fhir_adapter.errors import InputUnreadable

_CHUNK = 1 << 20
#: Bytes of header allowed per column (names, separators, quotes): bounds the first read.
HEADER_BYTES_PER_COLUMN = 256
#: A physical line longer than this is rejected without being held in memory.
MAX_LINE_CHARS = 1 << 20
#: A quoted cell with line breaks may hold at most this many characters (SPEC §3).
MAX_MULTILINE_CELL = 1000
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_COLUMNS = 512


@dataclass(frozen=True)
class CsvLimits:
    """Limits checked before a file is parsed (``FHIR_ADAPTER_MAX_FILE_BYTES`` / ``_COLUMNS``)."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_columns: int = DEFAULT_MAX_COLUMNS

    @property
    def header_bytes(self) -> int:
        return self.max_columns * HEADER_BYTES_PER_COLUMN


@dataclass(frozen=True)
class RowProblem:
    """Why a record could not be split into the header's cells."""

    field: str | None  # the column the problem was found in; None for the row as a whole
    reason: str


@dataclass(frozen=True)
class RawRow:
    line: int  # physical line the record starts on (header = line 1)
    values: dict[str, str]  # known columns only (empty when ``problem`` is set)
    problem: RowProblem | None = None
    text: str | None = None  # the record's first physical line, when it could not be split
    #: with ``problem``: the cells read before it (best effort, to explain cascades - e.g.
    #: which participant a rejected row was - never taken as data)
    partial: dict[str, str] = field(default_factory=dict)


# -- the path ------------------------------------------------------------------------------
def source_exists(path: Path) -> bool:
    """Whether anything is at ``path`` (a broken symbolic link counts: it is not "absent")."""
    return os.path.lexists(path)


def check_source(path: Path, limits: CsvLimits) -> os.stat_result:
    """The file's ``stat``, or :class:`InputUnreadable` saying why it is not a usable file."""
    name = path.name
    try:
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputUnreadable(f"{name}: a symbolic link loop, not a file") from None
        if exc.errno == errno.ENOENT and source_exists(path):
            raise InputUnreadable(f"{name}: a broken symbolic link (no target)") from None
        if exc.errno == errno.ENOENT:
            raise InputUnreadable(f"{path}: no such file") from None
        raise InputUnreadable(f"{name}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputUnreadable(f"{name}: {_what_it_is(st.st_mode)}, not a regular file")
    if st.st_size > limits.max_file_bytes:
        raise InputUnreadable(
            f"{name}: {st.st_size:,} bytes, over the limit of {limits.max_file_bytes:,} "
            "(FHIR_ADAPTER_MAX_FILE_BYTES); split the export or raise the limit"
        )
    return st


def _what_it_is(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


# -- encodings ---------------------------------------------------------------------------------
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32 text (byte-order mark), not UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text (byte-order mark), not UTF-8"),
    (b"\xff\xfe", "UTF-16 text (byte-order mark), not UTF-8"),
    (b"\xfe\xff", "UTF-16 text (byte-order mark), not UTF-8"),
    (b"\x1f\x8b", "a gzip-compressed file, not CSV text; decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive (an Excel .xlsx workbook is one), not CSV text"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Excel 97-2003 workbook (.xls), not CSV text"),
    (b"%PDF", "a PDF document, not CSV text"),
    (b"\x89PNG", "a PNG image, not CSV text"),
    (b"\xff\xd8\xff", "a JPEG image, not CSV text"),
)
_REEXPORT = "export or save it as 'CSV UTF-8'"


def _classify_head(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when it is plainly not UTF-8 text."""
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            advice = "" if "gzip" in what else f" - {_REEXPORT}"
            return what + advice
    nuls = head.count(0)
    if not nuls:
        return None
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if nuls * 4 >= len(head) and max(even, odd) >= 0.9 * nuls:
        return f"UTF-16 text without a byte-order mark, not UTF-8 - {_REEXPORT}"
    return "binary data (NUL bytes), not CSV text"


def _looks_like_gb18030(sample: bytes) -> bool:
    """Chinese text in GB18030/GBK: decodes, and its two-byte characters are mostly in the
    GB2312 area (both bytes >= 0xA1), which Latin-1 text (accented letters between ASCII
    letters) is not."""
    for cut in range(4):  # the sample may end inside a character
        try:
            sample[: len(sample) - cut].decode("gb18030")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    pairs = good = i = 0
    while i < len(sample):
        byte = sample[i]
        if byte < 0x80:
            i += 1
            continue
        pairs += 1
        if i + 1 < len(sample) and 0x30 <= sample[i + 1] <= 0x39:  # a four-byte sequence
            good += 1
            i += 4
            continue
        good += i + 1 < len(sample) and sample[i + 1] >= 0xA1
        i += 2
    return pairs > 0 and good >= 0.8 * pairs


def _not_utf8(name: str, line: int, sample: bytes) -> InputUnreadable:
    """What a sample of bytes that are not UTF-8 (from the line of the first bad one) is."""
    controls = sum(b < 0x20 and b not in (0x09, 0x0A, 0x0D) for b in sample)
    high = sum(b >= 0x80 for b in sample)
    gb = _looks_like_gb18030(sample)
    # text in a legacy single-byte encoding is mostly ASCII with few control bytes
    if controls * 20 > len(sample) or (not gb and high * 10 > len(sample) * 3):
        return InputUnreadable(
            f"{name}: binary data, not CSV text (first non-text byte on line {line})"
        )
    if gb:
        return InputUnreadable(
            f"{name}: not UTF-8 (first invalid byte on line {line}); the file looks like a "
            "spreadsheet export in a legacy Chinese encoding (GB18030/GBK) - re-export it as "
            "'CSV UTF-8' (or convert it, e.g. iconv -f GB18030 -t UTF-8)"
        )
    return InputUnreadable(
        f"{name}: not UTF-8 (first invalid byte on line {line}); it looks like a legacy "
        "encoding such as Windows-1252 or Latin-1 - re-export it as 'CSV UTF-8' (or convert "
        "it, e.g. iconv -f WINDOWS-1252 -t UTF-8)"
    )


def check_utf8(path: Path) -> None:
    """Reject a file that is not UTF-8, naming the line of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line += chunk[: exc.start].count(b"\n")
                start = chunk.rfind(b"\n", 0, exc.start) + 1
                raise _not_utf8(path.name, line, chunk[start : start + 4096]) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputUnreadable(
                f"{path.name}: not UTF-8 (the file ends inside a multi-byte character); "
                "re-export it as 'CSV UTF-8'"
            ) from None


# -- the tokenizer ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Line:
    number: int
    text: str  # without its line ending
    too_long: bool = False


class _Lines:
    """Physical lines (ended by LF or CRLF only), with push-back for resynchronisation."""

    def __init__(self, fh: IO[str], first_number: int) -> None:
        self._fh = fh
        self._next = first_number
        self._pushed: list[_Line] = []

    def next(self) -> _Line | None:
        if self._pushed:
            return self._pushed.pop()
        raw = self._fh.readline(MAX_LINE_CHARS)
        if not raw:
            return None
        number = self._next
        self._next += 1
        if raw.endswith("\n") or len(raw) < MAX_LINE_CHARS:
            return _Line(number, _strip_eol(raw))
        while (rest := self._fh.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
            pass  # skip the rest of an overlong line without holding it
        return _Line(number, "", too_long=True)

    def push_back(self, lines: list[_Line]) -> None:
        self._pushed.extend(reversed(lines))


def _strip_eol(raw: str) -> str:
    if raw.endswith("\r\n"):
        return raw[:-2]
    return raw[:-1] if raw.endswith("\n") else raw


class _Malformed(Exception):  # internal control flow, never escapes this module
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


class _Splitter:
    """Splits records into cells; ``header`` None splits the header itself."""

    def __init__(self, header: Sequence[str] | None, free_text: frozenset[str]) -> None:
        self.header = header
        self.free_text = free_text

    def _name(self, column: int) -> str | None:
        if self.header is None or column >= len(self.header):
            return None
        return self.header[column] or None

    def split(
        self,
        first: _Line,
        lines: _Lines | None,
        consumed: list[_Line],
        cells: list[str] | None = None,
    ) -> list[str]:
        """The cells of the record starting on ``first`` (appended to ``cells``, which keeps
        those read before a problem); continuation lines (of a quoted multi-line cell) are
        taken from ``lines`` and recorded in ``consumed``."""
        cells = [] if cells is None else cells
        text, pos = first.text, 0
        if '"' not in text:  # most lines: nothing quoted, one split at C speed
            cells.extend(text.split(","))
            return cells
        start_is_a_row = self._naive_row(first.text)
        while True:
            if text.startswith('"', pos):
                cell, text, pos = self._quoted(
                    len(cells), text, pos + 1, lines, consumed, start_is_a_row
                )
                cells.append(cell)
                if pos == len(text):
                    return cells
                if text[pos] != ",":
                    raise _Malformed(
                        self._name(len(cells) - 1),
                        "text after a closing quote (a quote inside a quoted value must be "
                        'doubled: "")',
                    )
                pos += 1
                continue
            comma = text.find(",", pos)
            end = len(text) if comma < 0 else comma
            cell = text[pos:end]
            if '"' in cell:
                raise _Malformed(
                    self._name(len(cells)),
                    "a quote inside a value that does not start with one (quote the whole "
                    'value and double the inner quote: "")',
                )
            cells.append(cell)
            if comma < 0:
                return cells
            pos = comma + 1

    def _quoted(
        self,
        column: int,
        text: str,
        pos: int,
        lines: _Lines | None,
        consumed: list[_Line],
        start_is_a_row: bool,
    ) -> tuple[str, str, int]:
        parts: list[str] = []
        size = 0
        breaks = False
        while True:
            quote = text.find('"', pos)
            if quote < 0:
                parts.append(text[pos:])
                size += len(text) - pos
                text, pos = self._next_line(column, size, lines, consumed, start_is_a_row)
                parts.append("\n")
                size += 1
                breaks = True
                continue
            if text.startswith('"', quote + 1):  # "" is one quote
                parts.append(text[pos : quote + 1])
                size += quote + 1 - pos
                pos = quote + 2
                continue
            parts.append(text[pos:quote])
            size += quote - pos
            if breaks and size > MAX_MULTILINE_CELL:
                raise _Malformed(self._name(column), _too_long_multiline())
            return "".join(parts), text, quote + 1

    def _next_line(
        self,
        column: int,
        size: int,
        lines: _Lines | None,
        consumed: list[_Line],
        start_is_a_row: bool,
    ) -> tuple[str, int]:
        name = self._name(column)
        if lines is None:
            raise _Malformed(name, "a quoted value is not closed on its line")
        if name not in self.free_text:
            allowed = ", ".join(sorted(self.free_text)) or "none of this file's columns"
            raise _Malformed(
                name,
                "unbalanced quote: the quoted value runs past the end of the line (line breaks "
                f"are allowed only inside quoted {allowed})",
            )
        if size > MAX_MULTILINE_CELL:
            raise _Malformed(name, _too_long_multiline())
        following = lines.next()
        if following is None:
            raise _Malformed(name, "unbalanced quote: the quoted value is never closed")
        consumed.append(following)
        # A line that is a row of its own is not text: the quote is a stray one. Either it is
        # a well-formed row, or it and the line the record began on both hold exactly a row's
        # worth of separators (two rows, each with a stray quote).
        swallowed = self.is_record(following) or (
            start_is_a_row and self._naive_row(following.text)
        )
        if following.too_long or swallowed:
            raise _Malformed(name, "unbalanced quote: the quoted value would swallow the next row")
        return following.text, 0

    def _naive_row(self, text: str) -> bool:
        """Split at every comma, ``text`` has exactly the header's number of cells."""
        return self.header is not None and text.count(",") == len(self.header) - 1

    def is_record(self, line: _Line) -> bool:
        """Whether ``line`` on its own is a complete, well-formed row of the header's width."""
        try:
            cells = self.split(line, None, [])
        except _Malformed:
            return False
        return self.header is not None and len(cells) == len(self.header) and not _blank(cells)


def _too_long_multiline() -> str:
    return (
        f"a quoted value with line breaks is longer than {MAX_MULTILINE_CELL:,} characters "
        "(unbalanced quote?)"
    )


def _blank(cells: Sequence[str]) -> bool:
    return not any(c.strip() for c in cells)


# -- header checks -----------------------------------------------------------------------------
def _normalised(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_").replace(".", "_")


def osa_distance(a: str, b: str, bound: int) -> int:
    """Optimal-string-alignment edit distance (insert, delete, substitute, swap neighbours),
    or ``bound + 1`` as soon as it is known to exceed ``bound``."""
    if abs(len(a) - len(b)) > bound:
        return bound + 1
    before: list[int] | None = None
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = ca != cb
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if before is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                current[j] = min(current[j], before[j - 2] + 1)
        if min(current) > bound:
            return bound + 1
        before, previous = previous, current
    return previous[-1]


def is_misspelling(found: str, intended: str) -> bool:
    """``found`` is a near miss of ``intended``: same name up to case and separators, or an edit
    distance of 1 (2 for names longer than 6 characters), or a close difflib ratio."""
    a, b = _normalised(found), _normalised(intended)
    if a == b:
        return True
    if len(a) > 4 * len(b) + 8:  # cheap bound: long names are not misspellings of short ones
        return False
    allowed = 1 if len(b) <= 6 else 2
    if osa_distance(a, b, allowed) <= allowed:
        return True
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.85


def _hint(column: str, extras: Sequence[str]) -> str:
    for extra in extras:
        close = is_misspelling(extra, column) or (
            len(extra) <= 4 * len(column) + 8
            and difflib.SequenceMatcher(None, extra, column).ratio() >= 0.7
        )
        if close:
            return f"{column} (found '{extra}' - misspelt?)"
    return column


# -- the file --------------------------------------------------------------------------------
REJECTS_MARKER = "rejected_line"
_HEADER_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


class CsvFile:
    """An opened, header-checked CSV file. Iterate it for :class:`RawRow` objects."""

    def __init__(
        self,
        path: Path,
        required: Sequence[str],
        optional: Sequence[str] = (),
        *,
        limits: CsvLimits | None = None,
        free_text: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.name = path.name
        self.limits = limits or CsvLimits()
        check_source(path, self.limits)
        header = self._read_header(required)
        self.header = header
        known = [*required, *optional]
        known_set = set(known)
        present = set(header)
        self.extra_columns = [h for h in header if h and h not in known_set]
        self.unnamed_columns = [i + 1 for i, h in enumerate(header) if not h]
        missing = [c for c in required if c not in present]
        # An extra column that is a near miss of an absent optional column is a misspelling,
        # not an addition of the eCRF: treat it as missing rather than silently dropping data.
        misspelt = [
            c
            for c in optional
            if c not in present and any(is_misspelling(e, c) for e in self.extra_columns)
        ]
        duplicated = sorted(h for h, n in Counter(h for h in header if h).items() if n > 1)
        if missing or misspelt or duplicated:
            parts = []
            if missing or misspelt:
                parts.append(
                    "missing columns: "
                    + ", ".join(_hint(c, self.extra_columns) for c in [*missing, *misspelt])
                )
            if duplicated:
                parts.append("duplicated columns: " + ", ".join(duplicated))
            raise InputUnreadable(f"{self.name}: {'; '.join(parts)}; the file was not read")
        self.is_rejects_file = REJECTS_MARKER in present
        self._index = [(i, h) for i, h in enumerate(header) if h in known_set]
        self._splitter = _Splitter(header, free_text)
        check_utf8(path)
        try:
            self._fh: IO[str] = path.open(encoding="utf-8-sig", newline="\n")
        except OSError as exc:
            raise InputUnreadable(f"{self.name}: cannot be read ({exc.strerror})") from None
        while (rest := self._fh.readline(_CHUNK)) and not rest.endswith("\n"):
            pass  # the header line, already checked

    def _read_header(self, required: Sequence[str]) -> list[str]:
        limit = self.limits.header_bytes
        try:
            with self.path.open("rb") as fh:
                head = fh.readline(limit)
        except OSError as exc:
            raise InputUnreadable(f"{self.name}: cannot be read ({exc.strerror})") from None
        what = _classify_head(head)
        if what is not None:
            raise InputUnreadable(f"{self.name}: {what}")
        if len(head) >= limit and not head.endswith(b"\n"):
            if head.count(b",") >= self.limits.max_columns:
                raise InputUnreadable(self._too_wide())
            raise InputUnreadable(
                f"{self.name}: the first line is longer than {limit:,} bytes: not a CSV header"
            )
        try:
            text = _strip_eol(head.decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise _not_utf8(self.name, 1, head[: exc.start + 4096]) from None
        if _HEADER_CONTROLS.search(text):
            raise InputUnreadable(
                f"{self.name}: binary data, not CSV text (control characters in line 1)"
            )
        if "\r" in text:
            raise InputUnreadable(
                f"{self.name}: line 1: a carriage return inside the header (old Mac line "
                "endings?) - re-export it with LF or CRLF line endings"
            )
        if not text.strip():
            raise InputUnreadable(
                f"{self.name}: the file is empty (expected a header line with the columns: "
                + ", ".join(required)
                + ")"
            )
        try:
            cells = _Splitter(None, frozenset()).split(_Line(1, text), None, [])
        except _Malformed as bad:
            raise InputUnreadable(f"{self.name}: line 1: not a CSV header ({bad.reason})") from None
        if len(cells) > self.limits.max_columns:
            raise InputUnreadable(self._too_wide())
        if _blank(cells):
            raise InputUnreadable(
                f"{self.name}: the file is empty (expected a header line with the columns: "
                + ", ".join(required)
                + ")"
            )
        return [c.strip() for c in cells]

    def _too_wide(self) -> str:
        return (
            f"{self.name}: the header has more than {self.limits.max_columns} columns "
            "(FHIR_ADAPTER_MAX_COLUMNS); the file was not read"
        )

    def __iter__(self) -> Iterator[RawRow]:
        lines = _Lines(self._fh, first_number=2)
        width = len(self.header)
        try:
            while (line := lines.next()) is not None:
                if line.too_long:
                    reason = f"the line is longer than {MAX_LINE_CHARS:,} characters"
                    yield RawRow(line.number, {}, RowProblem(None, reason))
                    continue
                if not line.text.strip():
                    continue
                consumed: list[_Line] = []
                cells: list[str] = []
                try:
                    self._splitter.split(line, lines, consumed, cells)
                except _Malformed as bad:
                    lines.push_back(consumed)
                    problem = RowProblem(bad.field, bad.reason)
                    yield RawRow(line.number, {}, problem, line.text, self._partial(cells))
                    continue
                if _blank(cells):
                    continue
                if len(cells) != width:
                    lines.push_back(consumed)
                    hint = "a comma inside a value must be quoted" if len(cells) > width else ""
                    reason = f"{len(cells)} cells where the header has {width}" + (
                        f" ({hint})" if hint else ""
                    )
                    # only the first cell is surely in its column
                    lead = self._partial(cells[:1])
                    yield RawRow(line.number, {}, RowProblem(None, reason), line.text, lead)
                    continue
                yield RawRow(line.number, {h: cells[i] for i, h in self._index})
        except UnicodeDecodeError:  # the file changed since it was checked
            raise InputUnreadable(f"{self.name}: not UTF-8 (changed while being read)") from None
        finally:
            self.close()

    def _partial(self, cells: Sequence[str]) -> dict[str, str]:
        return {h: cells[i] for i, h in self._index if i < len(cells)}

    def close(self) -> None:
        if hasattr(self, "_fh"):
            self._fh.close()

    def __enter__(self) -> CsvFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_csv(
    path: Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    limits: CsvLimits | None = None,
    free_text: frozenset[str] = frozenset(),
) -> CsvFile:
    return CsvFile(path, required, optional, limits=limits, free_text=free_text)
