"""Streaming CSV reader with the checks a whole file needs before any row is trusted.

- the file must be UTF-8 (a BOM is accepted); anything else (e.g. a GB18030 spreadsheet export)
  is rejected whole with a message saying how to re-export it;
- the header must hold every required column; missing or misspelt ones reject the file, naming
  them; unknown extra columns are a warning and are ignored;
- rows are yielded one at a time with the line number of the file they start on (header = 1);
  blank lines are skipped; CRLF and trailing blanks are fine.
"""

from __future__ import annotations

import codecs
import csv
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fhir_adapter.errors import InputUnreadable

_CHUNK = 1 << 20


@dataclass(frozen=True)
class RawRow:
    line: int  # file line the row starts on (header = line 1)
    values: dict[str, str]  # known columns only


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
                raise InputUnreadable(
                    f"{path.name}: not UTF-8 (first invalid byte on line {line}); the file looks "
                    "like a spreadsheet export in a legacy encoding such as GB18030 - re-export "
                    "it as 'CSV UTF-8' (or convert it, e.g. iconv -f GB18030 -t UTF-8)"
                ) from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputUnreadable(
                f"{path.name}: not UTF-8 (the file ends inside a multi-byte character); "
                "re-export it as 'CSV UTF-8'"
            ) from None


class CsvFile:
    """An opened, header-checked CSV file. Iterate it for :class:`RawRow` objects."""

    def __init__(
        self,
        path: Path,
        required: Sequence[str],
        optional: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.name = path.name
        check_utf8(path)
        try:
            self._fh = path.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise InputUnreadable(f"{path.name}: cannot be read ({exc.strerror})") from None
        self._reader = csv.reader(self._fh, strict=False)
        try:
            header = next(self._reader, None)
        except csv.Error as exc:
            self.close()
            raise InputUnreadable(f"{path.name}: line 1: not a CSV header ({exc})") from None
        if not header or not any(h.strip() for h in header):
            self.close()
            raise InputUnreadable(
                f"{path.name}: the file is empty (expected a header line with the columns: "
                + ", ".join(required)
                + ")"
            )
        self.header = [h.strip() for h in header]
        known = [*required, *optional]
        self.extra_columns = [h for h in self.header if h and h not in known]
        missing = [c for c in required if c not in self.header]
        # An extra column that is a near miss of an absent optional column is a misspelling,
        # not an addition of the eCRF: treat it as missing rather than silently dropping data.
        misspelt_optional = [
            c
            for c in optional
            if c not in self.header and difflib.get_close_matches(c, self.extra_columns, 1, 0.85)
        ]
        duplicated = sorted({h for h in self.header if h and self.header.count(h) > 1})
        if missing or misspelt_optional or duplicated:
            self.close()
            parts = []
            if missing or misspelt_optional:
                parts.append(
                    "missing columns: "
                    + ", ".join(
                        _with_hint(c, self.extra_columns) for c in [*missing, *misspelt_optional]
                    )
                )
            if duplicated:
                parts.append("duplicated columns: " + ", ".join(duplicated))
            raise InputUnreadable(f"{path.name}: {'; '.join(parts)}; the file was not read")
        self._index = [(i, h) for i, h in enumerate(self.header) if h in known]

    def __iter__(self) -> Iterator[RawRow]:
        line = 1  # the header
        try:
            for cells in self._reader:
                start = line + 1
                line = self._reader.line_num
                if not cells or not any(c.strip() for c in cells):
                    continue
                values = {h: (cells[i] if i < len(cells) else "") for i, h in self._index}
                yield RawRow(start, values)
        except csv.Error as exc:
            raise InputUnreadable(
                f"{self.name}: line {self._reader.line_num}: malformed CSV ({exc})"
            ) from None
        finally:
            self.close()

    def close(self) -> None:
        if hasattr(self, "_fh"):
            self._fh.close()

    def __enter__(self) -> CsvFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_hint(column: str, extras: Sequence[str]) -> str:
    close = difflib.get_close_matches(column, extras, 1, 0.7)
    return f"{column} (found '{close[0]}' - misspelt?)" if close else column


def open_csv(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> CsvFile:
    if not path.is_file():
        raise InputUnreadable(f"{path}: no such file")
    return CsvFile(path, required, optional)
