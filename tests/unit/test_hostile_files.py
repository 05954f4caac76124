"""The hostile corpus (issue 9): files and paths built from the synthetic set that once lost,
shifted or invented data, or wrote into the inputs. Each case asserts the exit status, the file,
physical line and field named, that every valid row is still accepted, and that the input
files are byte-identical afterwards (and nothing was added beside them).

Run through the command group in-process (click's runner), as a user runs the commands.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fhir_adapter.cli import cli
from fhir_adapter.domain import AdverseEvent
from fhir_adapter.generate import generate
from fhir_adapter.intake import KINDS, Intake, site_today
from fhir_adapter.trial import load_trial

FILES = [f"{kind}.csv" for kind in KINDS]


@dataclass(frozen=True)
class Base:
    """The pristine synthetic set: rows per file and per subject."""

    directory: Path
    rows: dict[str, int]
    by_subject: dict[str, Counter[str]]  # file -> subject -> rows
    subject: str  # an enrolled participant with rows in every visit file
    subject_line: int  # its line in participants.csv


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    out = tmp_path_factory.mktemp("base")
    trial = load_trial()
    generate(out, n_participants=6, with_bad=False, today=site_today(trial.study.timezone))
    rows: dict[str, int] = {}
    by_subject: dict[str, Counter[str]] = {}
    for name in FILES:
        lines = _lines(out / name)[1:]
        rows[name] = len(lines)
        by_subject[name] = Counter(line.split(",")[0 if name != FILES[-1] else 1] for line in lines)
    subject = max(by_subject["masi.csv"], key=lambda s: (by_subject["adverse_events.csv"][s], s))
    subject_line = 1 + next(
        i for i, line in enumerate(_lines(out / "participants.csv")) if line.startswith(subject)
    )
    return Base(out, rows, by_subject, subject, subject_line)


def _lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8").rstrip("\n").split("\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


def set_cell(path: Path, line: int, column: str, raw: str) -> None:
    """Put ``raw`` (CSV text, as written) in ``column`` of physical ``line``."""
    lines = _lines(path)
    header = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[header.index(column)] = raw
    lines[line - 1] = ",".join(cells)
    _write_lines(path, lines)


def set_line(path: Path, line: int, text: str) -> None:
    lines = _lines(path)
    lines[line - 1] = text
    _write_lines(path, lines)


def insert_lines(path: Path, before: int, new: list[str]) -> None:
    lines = _lines(path)
    lines[before - 1 : before - 1] = new
    _write_lines(path, lines)


def rename_column(path: Path, old: str, new: str) -> None:
    lines = _lines(path)
    lines[0] = ",".join(new if c == old else c for c in lines[0].split(","))
    _write_lines(path, lines)


# -- the cases -------------------------------------------------------------------------------
Build = Callable[[Path, Path, "Base"], list[str]]  # (data dir, work dir, base) -> command line
Change = Callable[[Path, "Base"], None]  # edits the copy of the data set
Accepted = Callable[[Base], dict[str, int]]  # expected accepted rows per file (validate)


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    exit: int
    expect: tuple[str, ...] = ()  # fragments of stderr, each required
    accepted: Accepted | None = None  # None: no per-file check (not `validate`)
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path, Path, Result, Base], None] | None = None
    absent: tuple[str, ...] = ()  # fragments stderr must not contain


def validate(*extra: str) -> Build:
    def build(d: Path, work: Path, b: Base) -> list[str]:
        return ["validate", str(d), "--json", *extra]

    return build


def mutate(change: Change, *extra: str) -> Build:
    def build(d: Path, work: Path, b: Base) -> list[str]:
        change(d, b)
        return ["validate", str(d), "--json", *extra]

    return build


def all_but(**changes: int) -> Accepted:
    """Every base row accepted except ``changes[file stem]`` fewer."""

    def accepted(b: Base) -> dict[str, int]:
        out = dict(b.rows)
        for stem, fewer in changes.items():
            out[f"{stem}.csv"] -= fewer
        return out

    return accepted


def without_subject(b: Base) -> dict[str, int]:
    """Base rows minus every row of the chosen subject (its participant row was rejected)."""
    return {n: b.rows[n] - b.by_subject[n][b.subject] for n in FILES}


def everything(b: Base) -> dict[str, int]:
    return dict(b.rows)


def _output_case(case_id: str, args: Build, message: str) -> Case:
    return Case(case_id, args, 2, (message,))


def _hardlink(d: Path, work: Path, b: Base) -> list[str]:
    os.link(d / "masi.csv", work / "link.csv")
    return ["score", str(d / "masi.csv"), "--rejects", str(work / "link.csv")]


def _symlink(d: Path, work: Path, b: Base) -> list[str]:
    (work / "sym.csv").symlink_to(d / "masi.csv")
    return ["score", str(d / "masi.csv"), "--rejects", str(work / "sym.csv")]


def _foreign_rejects_dir(d: Path, work: Path, b: Base) -> list[str]:
    (work / "rejects").mkdir()
    (work / "rejects" / "notes.txt").write_text("mine", encoding="utf-8")
    return ["validate", str(d), "--rejects", str(work / "rejects")]


def _existing_file_out(d: Path, work: Path, b: Base) -> list[str]:
    (work / "out").write_text("mine", encoding="utf-8")
    return ["map", str(d), "--out", str(work / "out")]


def _under_a_file(d: Path, work: Path, b: Base) -> list[str]:
    (work / "plain").write_text("mine", encoding="utf-8")
    return ["map", str(d), "--out", str(work / "plain" / "bundles")]


OUTPUT_CASES = [
    _output_case("rejects-is-input-dir", lambda d, w, b: ["validate", str(d), "--rejects", str(d)],
                 "is the input directory"),
    _output_case("rejects-dir-is-input-file",
                 lambda d, w, b: ["validate", str(d), "--rejects", str(d / "masi.csv")],
                 "is the input file"),
    _output_case("rejects-dir-holds-input",
                 lambda d, w, b: ["validate", str(d), "--rejects", str(d.parent)], "holds the input"),
    _output_case("score-rejects-is-input",
                 lambda d, w, b: ["score", str(d / "masi.csv"), "--rejects", str(d / "masi.csv")],
                 "is the input file"),
    _output_case("score-rejects-hardlink-to-input", _hardlink, "is the input file"),
    _output_case("score-rejects-symlink-to-input", _symlink, "is the input file"),
    _output_case("score-rejects-other-source-file",
                 lambda d, w, b: ["score", str(d / "masi.csv"), "--rejects", str(d / "pga.csv")],
                 "not a file fhir-adapter wrote"),
    _output_case("eligibility-rejects-is-participants",
                 lambda d, w, b: ["eligibility", str(d / "eligibility.csv"), "--rejects",
                               str(d / "participants.csv")], "is the input file"),
    _output_case("map-out-is-input-dir", lambda d, w, b: ["map", str(d), "--out", str(d)],
                 "is the input directory"),
    _output_case("map-ndjson-out-is-input-file",
                 lambda d, w, b: ["map", str(d), "--format", "ndjson", "--out",
                               str(d / "participants.csv")], "is the input file"),
    _output_case("map-out-existing-file", _existing_file_out, "not a directory"),
    _output_case("map-out-under-a-file", _under_a_file, "cannot be created"),
    _output_case("map-out-and-rejects-overlap",
                 lambda d, w, b: ["map", str(d), "--out", str(w / "x"), "--rejects", str(w / "x")],
                 "must be separate paths"),
    _output_case("rejects-dir-holds-foreign-files", _foreign_rejects_dir, "did not write"),
    _output_case("map-ndjson-out-is-a-directory",
                 lambda d, w, b: ["map", str(d), "--format", "ndjson", "--out", str(w)],
                 "a directory (this option names a file)"),
]  # fmt: skip


def _stray_quote_unbalanced(d: Path, b: Base) -> None:
    set_cell(d / "adverse_events.csv", 3, "action_taken", '"cold compress')


def _stray_quote_closing_later(d: Path, b: Base) -> None:
    set_cell(d / "adverse_events.csv", 3, "action_taken", '"ice pack')
    set_cell(d / "adverse_events.csv", 4, "action_taken", 'done"')


def _long_multiline(d: Path, b: Base) -> None:
    path = d / "adverse_events.csv"
    lines = _lines(path)
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("term")] = "other"
    cells[header.index("term_text")] = '"' + "x" * 40
    body = ["y" * 40 for _ in range(30)]
    lines[2] = ",".join(cells)
    lines[3:3] = [*body, 'end",' + ",".join(cells[header.index("onset_on") :])]
    _write_lines(path, lines)


def _good_multiline(d: Path, b: Base) -> None:
    path = d / "adverse_events.csv"
    lines = _lines(path)
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("term")] = "other"
    cells[header.index("term_text")] = '"contact dermatitis'
    rest = ",".join(cells[header.index("term_text") + 1 :])
    lines[2] = ",".join(cells[: header.index("term_text") + 1])
    lines[3:3] = [f'to the dressing, ""mild""",{rest}']
    cells5 = lines[5].split(",")  # physical line 6 (the former line 5): a bad grade
    cells5[header.index("grade")] = "9"
    lines[5] = ",".join(cells5)
    _write_lines(path, lines)


def _multiline_outside_free_text(d: Path, b: Base) -> None:
    path = d / "masi.csv"
    lines = _lines(path)
    lines[4] = '"' + lines[4].split(",", 1)[0] + "\n" + '",' + lines[4].split(",", 1)[1]
    _write_lines(path, "\n".join(lines).split("\n"))


def _blank_lines(d: Path, b: Base) -> None:
    insert_lines(d / "pga.csv", 3, ["", ",,,,", "   "])
    set_cell(d / "pga.csv", 9, "pga", "8")  # physical line 9 after the three inserted


def _unclosed_at_eof(d: Path, b: Base) -> None:
    path = d / "adverse_events.csv"
    lines = _lines(path)
    last = len(lines)
    set_cell(path, last, "action_taken", '"never closed')


def _extra_cell(d: Path, b: Base) -> None:
    set_line(d / "masi.csv", 5, _lines(d / "masi.csv")[4] + ",3")


def _fewer_cells(d: Path, b: Base) -> None:
    set_line(d / "masi.csv", 6, _lines(d / "masi.csv")[5].rsplit(",", 1)[0])


def _comma_in_reason(d: Path, b: Base) -> None:
    set_cell(d / "participants.csv", b.subject_line, "withdrawal_reason", "moved, far away")


def _control(column_file: str, line: int, column: str, char: str) -> Change:
    def change(d: Path, b: Base) -> None:
        path = d / column_file
        lines = _lines(path)
        header = lines[0].split(",")
        cells = lines[line - 1].split(",")
        i = header.index(column)
        cells[i] = cells[i][:1] + char + cells[i][1:]
        lines[line - 1] = ",".join(cells)
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))

    return change


STRUCTURE_CASES = [
    Case("stray-quote-opens-action_taken", mutate(_stray_quote_unbalanced), 65,
         ("adverse_events.csv:3: rejected: action_taken: unbalanced quote",),
         all_but(adverse_events=1)),
    Case("stray-quote-inside-term_text",
         mutate(lambda d, b: set_cell(d / "adverse_events.csv", 4, "term_text", 'rash "severe')), 65,
         ("adverse_events.csv:4: rejected: term_text: a quote inside a value",),
         all_but(adverse_events=1)),
    Case("stray-quote-closed-on-a-later-line", mutate(_stray_quote_closing_later), 65,
         ("adverse_events.csv:3: rejected:", "adverse_events.csv:4: rejected: action_taken:"),
         all_but(adverse_events=2)),
    Case("text-after-closing-quote",
         mutate(lambda d, b: set_cell(d / "pga.csv", 4, "rater_id", '"R1"x')), 65,
         ("pga.csv:4: rejected: rater_id: text after a closing quote",), all_but(pga=1)),
    Case("more-cells-than-header", mutate(_extra_cell), 65,
         ("masi.csv:5: rejected: 17 cells where the header has 16",), all_but(masi=1)),
    Case("fewer-cells-than-header", mutate(_fewer_cells), 65,
         ("masi.csv:6: rejected: 15 cells where the header has 16",), all_but(masi=1)),
    Case("unquoted-comma-in-withdrawal_reason", mutate(_comma_in_reason), 65,
         ("participants.csv:{line}: rejected: 12 cells where the header has 11",
          "masi.csv:", "depends on rejected participant {subject} (participants.csv:{line})"),
         without_subject),
    Case("nul-in-a-score", mutate(_control("masi.csv", 7, "chin_a", "\x00")), 65,
         ("masi.csv:7: rejected: chin_a: contains a control character (U+0000)",),
         all_but(masi=1)),
    Case("bel-in-rater_id", mutate(_control("pga.csv", 5, "rater_id", "\x07")), 65,
         ("pga.csv:5: rejected: rater_id: contains a control character (U+0007)",),
         all_but(pga=1)),
    Case("esc-in-outcome", mutate(_control("adverse_events.csv", 2, "outcome", "\x1b")), 65,
         ("adverse_events.csv:2: rejected: outcome: contains a control character (U+001B)",),
         all_but(adverse_events=1)),
    Case("lone-cr-in-a-cell", mutate(_control("satisfaction.csv", 3, "visit", "\r")), 65,
         ("satisfaction.csv:3: rejected: visit: contains a line break",),
         all_but(satisfaction=1)),
    Case("line-break-outside-free-text", mutate(_multiline_outside_free_text), 65,
         ("masi.csv:5: rejected: subject_id: unbalanced quote", "masi.csv:6: rejected:"),
         all_but(masi=1)),
    Case("line-break-in-term_text-kept", mutate(_good_multiline), 65,
         ("adverse_events.csv:6: rejected: grade:",), all_but(adverse_events=1),
         absent=("adverse_events.csv:3:", "adverse_events.csv:4:")),
    Case("line-breaks-over-1000-characters", mutate(_long_multiline), 65,
         ("adverse_events.csv:3: rejected: term_text: a quoted value with line breaks is longer "
          "than 1,000 characters", "adverse_events.csv:34: rejected:"),
         all_but(adverse_events=1)),
    Case("quote-never-closed-at-end-of-file", mutate(_unclosed_at_eof), 65,
         ("rejected: action_taken: unbalanced quote: the quoted value is never closed",),
         all_but(adverse_events=1)),
    Case("blank-and-comma-only-lines", mutate(_blank_lines), 65,
         ("pga.csv:9: rejected: pga:",), all_but(pga=1)),
    Case("line-of-2-MB", mutate(lambda d, b: set_cell(d / "masi.csv", 8, "rater_id", "R" * 2_000_000)),
         65, ("masi.csv:8: rejected: the line is longer than 1,048,576 characters",),
         all_but(masi=1)),
    Case("quoted-header-and-cells",
         mutate(lambda d, b: _write_lines(d / "pga.csv", [",".join(f'"{c}"' for c in line.split(","))
                                                          for line in _lines(d / "pga.csv")])),
         0, (), everything),
    Case("unnamed-trailing-column",
         mutate(lambda d, b: _write_lines(d / "pga.csv", [line + "," for line in _lines(d / "pga.csv")])),
         0, ("pga.csv:1: warning: unknown columns ignored: (unnamed column 6)",), everything),
]  # fmt: skip


def _sparse(d: Path, b: Base, size: int = 2 * 1024**3) -> None:
    with (d / "masi.csv").open("r+b") as fh:
        fh.truncate(size)


def _wide_header(d: Path, b: Base) -> None:
    (d / "eligibility.csv").write_bytes(
        b",".join(b"c%d" % i for i in range(1_000_000)) + b"\n" + b"\xff\xfe" * 10
    )


def _fifo(d: Path, b: Base) -> None:
    (d / "satisfaction.csv").unlink()
    os.mkfifo(d / "satisfaction.csv")


def _replace_with(name: str, make: Callable[[Path], None]) -> Change:
    def change(d: Path, b: Base) -> None:
        (d / name).unlink()
        make(d / name)

    return change


def _loop(path: Path) -> None:
    path.symlink_to(path.name)


def _broken(path: Path) -> None:
    path.symlink_to("gone.csv")


def unreadable(stem: str) -> Accepted:
    """Every file but ``stem`` read whole."""

    def accepted(b: Base) -> dict[str, int]:
        return {n: c for n, c in b.rows.items() if n != f"{stem}.csv"}

    return accepted


LIMIT_CASES = [
    Case("file-of-2-GB", mutate(_sparse), 66,
         ("masi.csv: 2,147,483,648 bytes, over the limit", "FHIR_ADAPTER_MAX_FILE_BYTES"),
         unreadable("masi")),
    Case("file-over-a-configured-limit", validate(), 66, ("masi.csv:", "over the limit of 2,000"),
         unreadable("masi"), env={"FHIR_ADAPTER_MAX_FILE_BYTES": "2000"}),
    Case("header-of-a-million-columns", mutate(_wide_header), 66,
         ("eligibility.csv: the header has more than 512 columns",), unreadable("eligibility")),
    Case("header-wider-than-configured", validate(), 66,
         ("masi.csv: the header has more than 12 columns",),
         lambda b: {n: c for n, c in b.rows.items() if n in ("pga.csv", "satisfaction.csv")}
         | {"participants.csv": b.rows["participants.csv"]},
         env={"FHIR_ADAPTER_MAX_COLUMNS": "12"}),
    Case("first-line-of-10-MB",
         mutate(lambda d, b: (d / "pga.csv").write_bytes(b"x" * 10_000_000 + b"\n")), 66,
         ("pga.csv: the first line is longer than",), unreadable("pga")),
    Case("duplicated-column",
         mutate(lambda d, b: rename_column(d / "masi.csv", "chin_h", "chin_d")), 66,
         ("masi.csv: missing columns: chin_h", "duplicated columns: chin_d"), unreadable("masi")),
    Case("misspelt-optional-stauts",
         mutate(lambda d, b: rename_column(d / "participants.csv", "status", "stauts")), 66,
         ("participants.csv: missing columns: status (found 'stauts' - misspelt?)",
          "depends on participants.csv, which could not be read"),
         lambda b: {n: 0 for n in FILES[1:]}),
    Case("capitalised-optional-Status",
         mutate(lambda d, b: rename_column(d / "participants.csv", "status", "Status")), 66,
         ("participants.csv: missing columns: status (found 'Status' - misspelt?)",),
         lambda b: {n: 0 for n in FILES[1:]}),
    Case("misspelt-optional-improvment_pct",
         mutate(lambda d, b: rename_column(d / "satisfaction.csv", "improvement_pct",
                                        "improvment_pct")), 66,
         ("missing columns: improvement_pct (found 'improvment_pct'",), unreadable("satisfaction")),
    Case("misspelt-required-forhead_d",
         mutate(lambda d, b: rename_column(d / "masi.csv", "forehead_d", "forhead_d")), 66,
         ("masi.csv: missing columns: forehead_d (found 'forhead_d'",), unreadable("masi")),
    Case("source-is-a-directory", mutate(_replace_with("masi.csv", Path.mkdir)), 66,
         ("masi.csv: a directory, not a regular file",), unreadable("masi")),
    Case("source-is-a-symlink-loop", mutate(_replace_with("pga.csv", _loop)), 66,
         ("pga.csv: a symbolic link loop",), unreadable("pga")),
    Case("source-is-a-fifo", mutate(_fifo), 66,
         ("satisfaction.csv: a named pipe (FIFO), not a regular file",), unreadable("satisfaction")),
    Case("source-is-a-broken-symlink", mutate(_replace_with("adverse_events.csv", _broken)), 66,
         ("adverse_events.csv: a broken symbolic link",), unreadable("adverse_events")),
    Case("participants-is-a-directory", mutate(_replace_with("participants.csv", Path.mkdir)), 66,
         ("participants.csv: a directory, not a regular file",
          "masi.csv:2: rejected: subject_id: depends on participants.csv, which could not be read"),
         lambda b: {n: 0 for n in FILES[1:]}),
]  # fmt: skip


def _encode(name: str, encode: Callable[[bytes], bytes]) -> Change:
    def change(d: Path, b: Base) -> None:
        path = d / name
        path.write_bytes(encode(path.read_bytes()))

    return change


def _gb18030(raw: bytes) -> bytes:
    lines = raw.decode("utf-8").split("\n")
    lines[2] = lines[2].replace(",completed,,,", ",completed,,因工作调动迁居外地,")
    return "\n".join(lines).encode("gb18030")


def _latin1(raw: bytes) -> bytes:
    return raw.decode("utf-8").replace(",none,", ",crème hydratante,", 1).encode("latin-1")


def _binary(raw: bytes) -> bytes:
    return bytes(range(256)) * 8


def _binary_no_nul(raw: bytes) -> bytes:
    return bytes((i * 7) % 31 + 1 for i in range(4096)) + b"\xff\xfe\xfa"


ENCODING_CASES = [
    Case("utf-16-le-with-bom", mutate(_encode("masi.csv", lambda b: b"\xff\xfe" + b.decode().encode("utf-16-le"))), 66,
         ("masi.csv: UTF-16 text (byte-order mark), not UTF-8",), unreadable("masi"),
         absent=("GB18030",)),
    Case("utf-16-be-with-bom", mutate(_encode("masi.csv", lambda b: b"\xfe\xff" + b.decode().encode("utf-16-be"))), 66,
         ("masi.csv: UTF-16 text",), unreadable("masi"), absent=("GB18030",)),
    Case("utf-16-without-bom", mutate(_encode("pga.csv", lambda b: b.decode().encode("utf-16-le"))), 66,
         ("pga.csv: UTF-16 text without a byte-order mark",), unreadable("pga"),
         absent=("GB18030",)),
    Case("utf-32", mutate(_encode("pga.csv", lambda b: b.decode().encode("utf-32"))), 66,
         ("pga.csv: UTF-32 text",), unreadable("pga")),
    Case("gzip", mutate(_encode("adverse_events.csv", lambda b: gzip.compress(b, mtime=0))), 66,
         ("adverse_events.csv: a gzip-compressed file",), unreadable("adverse_events"),
         absent=("GB18030",)),
    Case("zip-or-xlsx", mutate(_encode("pga.csv", lambda b: b"PK\x03\x04" + b"\x00" * 40)), 66,
         ("pga.csv: a zip archive (an Excel .xlsx workbook is one)",), unreadable("pga")),
    Case("xls", mutate(_encode("pga.csv", lambda b: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b)), 66,
         ("pga.csv: an Excel 97-2003 workbook",), unreadable("pga")),
    Case("binary-with-nul", mutate(_encode("pga.csv", _binary)), 66,
         ("pga.csv: binary data (NUL bytes)",), unreadable("pga"), absent=("GB18030",)),
    Case("binary-without-nul", mutate(_encode("pga.csv", _binary_no_nul)), 66,
         ("pga.csv: binary data, not CSV text",), unreadable("pga"), absent=("GB18030",)),
    Case("gb18030", mutate(_encode("participants.csv", _gb18030)), 66,
         ("participants.csv: not UTF-8 (first invalid byte on line 3)", "GB18030",
          "depends on participants.csv, which could not be read"),
         lambda b: {n: 0 for n in FILES[1:]}),
    Case("latin-1", mutate(_encode("adverse_events.csv", _latin1)), 66,
         ("adverse_events.csv: not UTF-8", "Windows-1252"), unreadable("adverse_events"),
         absent=("GB18030",)),
    Case("utf-8-bom-and-crlf",
         mutate(_encode("masi.csv", lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n"))), 0,
         (), everything),
    Case("old-mac-cr-line-endings", mutate(_encode("pga.csv", lambda b: b.replace(b"\n", b"\r"))),
         66, ("pga.csv: line 1: a carriage return inside the header",), unreadable("pga")),
]  # fmt: skip


def _hospital_patient_mrns(d: Path, w: Path, r: Result, b: Base) -> None:
    out = w / "hospital.ndjson"
    mapped = CliRunner().invoke(
        cli, ["map", str(d), "--target", "hospital", "--format", "ndjson", "--out", str(out)]
    )
    assert mapped.exit_code == 65, mapped.output
    patients = [
        json.loads(line)
        for line in out.read_text(encoding="utf-8").splitlines()
        if '"resourceType":"Patient"' in line
    ]
    mrns = {
        p["id"]: [i["value"] for i in p.get("identifier", []) if "mrn" in i["system"]]
        for p in patients
    }
    assert mrns[b.subject] == []  # dropped, not shifted or invented
    assert sum(bool(v) for v in mrns.values()) == len(patients) - 1


def _formula_round_trip(d: Path, w: Path, r: Result, b: Base) -> None:
    with (w / "rejects" / "adverse_events.csv").open(encoding="utf-8", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["action_taken"] == "'=HYPERLINK(\"http://x.invalid\",\"see\")"  # neutralised
    assert row["grade"] == "'-1"
    assert row["rejected_line"] == "2"
    row["grade"] = "2"  # corrected; the formula keeps the ' the rejects file gave it
    fixed = w / "fixed"
    fixed.mkdir()
    with (fixed / "adverse_events.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    intake = Intake(trial=load_trial(), cross_file=False)
    (event,) = list(intake.read_csv("adverse_events", fixed / "adverse_events.csv"))
    assert isinstance(event, AdverseEvent)
    assert event.action_taken == '=HYPERLINK("http://x.invalid","see")'  # as the source had it
    assert event.grade == 2


def _custom_mrn_pattern(d: Path, w: Path, r: Result, b: Base) -> None:
    report = json.loads(r.stdout)
    (people,) = [f for f in report["files"] if f["file"] == "participants.csv"]
    assert people["fields_rejected"] == people["rows_read"]  # every MRN-00xxxx dropped
    assert people["accepted"] == people["rows_read"]


def _mrn_off_pattern(d: Path, b: Base) -> None:
    set_cell(d / "participants.csv", b.subject_line, "mrn", "MRN 0001; DROP")


def _formula_in_a_rejected_row(d: Path, b: Base) -> None:
    formula = '"=HYPERLINK(""http://x.invalid"",""see"")"'
    set_cell(d / "adverse_events.csv", 2, "action_taken", formula)
    set_cell(d / "adverse_events.csv", 2, "grade", "-1")
    _write_lines(d / "adverse_events.csv", _lines(d / "adverse_events.csv")[:2])


def _padded(d: Path, b: Base) -> None:
    set_cell(d / "pga.csv", 2, "pga", "\u00a03\u3000")
    set_cell(d / "pga.csv", 3, "rater_id", "\tR2 ")


VALUE_CASES = [
    Case("score-with-plus-sign", mutate(lambda d, b: set_cell(d / "masi.csv", 3, "forehead_d", "+3")), 65,
         ("masi.csv:3: rejected: forehead_d: must be a whole number written with digits 0-9",),
         all_but(masi=1)),
    Case("full-width-digit", mutate(lambda d, b: set_cell(d / "masi.csv", 3, "chin_d", "\uff13")), 65,
         ("masi.csv:3: rejected: chin_d: must be a whole number",), all_but(masi=1)),
    Case("arabic-indic-digit", mutate(lambda d, b: set_cell(d / "pga.csv", 2, "pga", "\u0663")), 65,
         ("pga.csv:2: rejected: pga: must be a whole number",), all_but(pga=1)),
    Case("score-of-5000-digits", mutate(lambda d, b: set_cell(d / "masi.csv", 4, "chin_a", "9" * 5000)), 65,
         ("masi.csv:4: rejected: chin_a: is too long a number (at most 9 digits)",),
         all_but(masi=1), absent=("4300", "Exceeds", "int_max_str_digits")),
    Case("full-width-date", mutate(lambda d, b: set_cell(d / "pga.csv", 3, "assessed_on", "\uff12\uff10\uff12\uff15-\uff10\uff11-\uff11\uff10")), 65,
         ("pga.csv:3: rejected: assessed_on: must be a date written YYYY-MM-DD",),
         all_but(pga=1), absent=("real calendar date",)),
    Case("percentage-with-plus-sign",
         mutate(lambda d, b: set_cell(d / "satisfaction.csv", 2, "improvement_pct", "+40")), 65,
         ("satisfaction.csv:2: rejected: improvement_pct: must be a number written with digits",),
         all_but(satisfaction=1)),
    Case("mrn-off-the-pattern-is-dropped", mutate(_mrn_off_pattern), 65,
         ("participants.csv:{line}: rejected: mrn: does not match the MRN pattern",),
         everything, check=_hospital_patient_mrns, absent=("MRN 0001",)),
    Case("stricter-mrn-pattern", validate(), 65, ("rejected: mrn:",), everything,
         env={"FHIR_ADAPTER_MRN_PATTERN": "H[0-9]{6}"}, check=_custom_mrn_pattern),
    Case("blanks-around-values-are-trimmed", mutate(_padded), 0, (), everything),
    Case("formula-in-rejects-is-neutralised",
         mutate(_formula_in_a_rejected_row, "--rejects", "{work}/rejects"),
         65, ("adverse_events.csv:2: rejected: grade:",),
         lambda b: everything(b) | {"adverse_events.csv": 0}, check=_formula_round_trip),
]  # fmt: skip


def _participant_rejected(d: Path, b: Base) -> None:
    set_cell(d / "participants.csv", b.subject_line, "sex", "F")


def _one_message_per_file(d: Path, w: Path, r: Result, b: Base) -> None:
    lines = [x for x in r.stderr.splitlines() if f"depends on rejected participant {b.subject}" in x]
    files = [x.split(":")[0] for x in lines]
    expected = [n for n in FILES[1:] if b.by_subject[n][b.subject]]
    assert files == expected  # once per file, not once per row
    assert "unknown subject" not in r.stderr


CASCADE_CASES = [
    Case("rejected-participant-explained-once-per-file", mutate(_participant_rejected), 65,
         ("participants.csv:{line}: rejected: sex:",
          "depends on rejected participant {subject} (participants.csv:{line})"),
         without_subject, check=_one_message_per_file),
]  # fmt: skip

def _map_args(change: Change) -> Build:
    def build(d: Path, work: Path, b: Base) -> list[str]:
        change(d, b)
        return ["map", str(d), "--format", "ndjson", "--out", str(work / "out.ndjson")]

    return build


def _mapped_nothing_from(name: str) -> Callable[[Path, Path, Result, Base], None]:
    def check(d: Path, w: Path, r: Result, b: Base) -> None:
        resources = [json.loads(x) for x in (w / "out.ndjson").read_text("utf-8").splitlines()]
        types = Counter(r["resourceType"] for r in resources)
        assert types["Patient"] == b.rows["participants.csv"]  # the rest was still mapped
        assert not [r for r in resources if "-masi" in r["id"]]  # nothing from masi.csv

    return check


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _eligibility_rejects(d: Path, work: Path, b: Base) -> list[str]:
    set_cell(d / "participants.csv", b.subject_line, "birth_date", "1990/01/01")
    set_cell(d / "eligibility.csv", 2, "screened_on", "tomorrow")
    return ["eligibility", str(d / "eligibility.csv"), "--rejects", str(work / "r.csv")]


def _both_rejects_files(d: Path, w: Path, r: Result, b: Base) -> None:
    people, screenings = _csv_rows(w / "r.participants.csv"), _csv_rows(w / "r.csv")
    assert [(p["subject_id"], p["rejected_field"]) for p in people] == [(b.subject, "birth_date")]
    assert {s["rejected_field"] for s in screenings} == {"screened_on", "subject_id"}
    assert len(r.stdout.splitlines()) == b.rows["eligibility.csv"] - len(screenings)


OTHER_COMMANDS = [
    Case("map-with-a-directory-for-masi", _map_args(_replace_with("masi.csv", Path.mkdir)), 66,
         ("error: masi.csv: a directory, not a regular file",), check=_mapped_nothing_from("masi.csv")),
    Case("map-with-a-masi-of-2-GB", _map_args(_sparse), 66, ("masi.csv: 2,147,483,648 bytes",),
         check=_mapped_nothing_from("masi.csv")),
    Case("eligibility-rejects-include-participants", _eligibility_rejects, 65,
         ("participants.csv:{line}: rejected: birth_date:", "eligibility.csv:2: rejected: screened_on:",
          "depends on rejected participant {subject} (participants.csv:{line})"),
         check=_both_rejects_files),
]  # fmt: skip

CASES = [
    *OUTPUT_CASES,
    *STRUCTURE_CASES,
    *LIMIT_CASES,
    *ENCODING_CASES,
    *VALUE_CASES,
    *CASCADE_CASES,
    *OTHER_COMMANDS,
]


# -- the test --------------------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root``: its type and content hash (size and mtime for huge files)."""
    out: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and st.st_size < 64 * 1024 * 1024:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            digest = f"{st.st_size}:{st.st_mtime_ns}"
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), digest)
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input(case: Case, base: Base, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(base.directory, data)
    work = tmp_path / "work"
    work.mkdir()
    args = [a.replace("{work}", str(work)) for a in case.build(data, work, base)]
    before, work_before = _snapshot(data), _snapshot(work)
    result = CliRunner().invoke(cli, args, env=case.env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == case.exit, result.output
    stderr = result.stderr
    assert "Traceback" not in result.output
    assert "internal error" not in stderr
    for fragment in case.expect:
        assert fragment.format(subject=base.subject, line=base.subject_line) in stderr, stderr
    for fragment in case.absent:
        assert fragment not in stderr, stderr
    if case.exit == 2:
        assert len(stderr.strip().splitlines()) == 1, stderr  # one line
        assert _snapshot(work) == work_before  # refused before anything was written
    if case.accepted is not None:
        report: dict[str, Any] = json.loads(result.stdout)
        accepted = {f["file"]: f["accepted"] for f in report["files"]}
        expected = case.accepted(base)
        assert {n: accepted.get(n, 0) for n in expected} == expected
        assert set(report["unreadable"]) == {n for n in FILES if n not in expected}
    if case.check is not None:
        case.check(data, work, result, base)
    assert _snapshot(data) == before  # inputs byte-identical, nothing added


def test_corpus_covers_every_reported_problem() -> None:
    ids = {c.id for c in CASES}
    assert len(ids) == len(CASES)  # unique ids
    assert len(CASES) >= 60
