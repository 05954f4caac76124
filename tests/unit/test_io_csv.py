"""The strict CSV reader (SPEC §3): structure, resynchronisation, limits, encodings, header
vocabulary; and the output-path guard with whole replacement."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fhir_adapter.errors import InputUnreadable, OutputRefused
from fhir_adapter.io import csvfile
from fhir_adapter.io.csvfile import (
    CsvLimits,
    RowProblem,
    is_misspelling,
    open_csv,
    osa_distance,
)
from fhir_adapter.io.outputs import (
    INCOMING_PREFIX,
    ReplacedDirectory,
    check_output,
    refuse_overlap,
    replaced_file,
)

FREE = frozenset({"note"})


def _rows(tmp_path: Path, text: str | bytes, **kw: object) -> list[tuple[int, object, object]]:
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    rows = open_csv(path, ["id", "note", "n"], free_text=FREE, **kw)  # type: ignore[arg-type]
    return [(r.line, r.values or None, r.problem and r.problem.field) for r in rows]


def test_rfc4180_quoting_is_read_as_written(tmp_path: Path) -> None:
    text = 'id,note,n\n"a,1","say ""hi""",3\nb,,\n'
    assert _rows(tmp_path, text) == [
        (2, {"id": "a,1", "note": 'say "hi"', "n": "3"}, None),
        (3, {"id": "b", "note": "", "n": ""}, None),
    ]


def test_a_line_break_is_kept_only_in_free_text_and_lines_stay_physical(tmp_path: Path) -> None:
    text = 'id,note,n\na,"one\r\ntwo",1\n"b\nc",x,2\nd,ok,3\n'
    assert _rows(tmp_path, text) == [
        (2, {"id": "a", "note": "one\ntwo", "n": "1"}, None),
        (4, None, "id"),  # not a free-text column: rejected ...
        (5, None, "id"),  # ... and reading resumes on the next physical line
        (6, {"id": "d", "note": "ok", "n": "3"}, None),
    ]


def test_one_stray_quote_costs_one_row(tmp_path: Path) -> None:
    rows = [f"r{i},text {i},{i}" for i in range(200)]
    rows[3] = 'r3,"unclosed,3'
    got = _rows(tmp_path, "id,note,n\n" + "\n".join(rows) + "\n")
    assert len(got) == 200
    assert got[3] == (5, None, "note")
    assert all(values for line, values, _ in got if line != 5)


def test_a_quote_that_would_close_on_a_later_row_does_not_swallow_it(tmp_path: Path) -> None:
    text = 'id,note,n\na,"stray,1\nb,also stray",2\nc,fine,3\n'
    assert _rows(tmp_path, text) == [(2, None, "note"), (3, None, "note"), (4, {"id": "c", "note": "fine", "n": "3"}, None)]  # fmt: skip


def test_multiline_cell_limit_and_unclosed_quote(tmp_path: Path) -> None:
    body = "\n".join("x" * 50 for _ in range(25))  # 1,274 characters
    got = _rows(tmp_path, f'id,note,n\na,"{body}",1\nb,ok,2\nc,"never closed,3\n')
    assert got[0] == (2, None, "note")
    # reading resumed on line 3: lines 3-26 (the rest of the cell) are rejected one by one
    assert [line for line, values, _ in got[1:-2] if values is None] == list(range(3, 27))
    assert got[-2] == (27, {"id": "b", "note": "ok", "n": "2"}, None)
    assert got[-1] == (28, None, "note")


@pytest.mark.parametrize(
    ("line", "field", "reason"),
    [
        ('a,b"c,1', "note", "a quote inside a value that does not start with one"),
        ('a,"b"c,1', "note", "text after a closing quote"),
        ("a,b,1,2", None, "4 cells where the header has 3 (a comma inside a value must be quoted)"),
        ("a,b", None, "2 cells where the header has 3"),
    ],
)
def test_malformed_records(tmp_path: Path, line: str, field: str | None, reason: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(f"id,note,n\n{line}\nz,ok,9\n", encoding="utf-8")
    bad, good = list(open_csv(path, ["id", "note", "n"], free_text=FREE))
    assert bad.problem is not None
    assert (bad.line, bad.problem.field) == (2, field)
    assert bad.problem.reason.startswith(reason)
    assert bad.text == line  # kept, as it was, for the rejects file
    assert bad.partial.get("id") == "a"  # what is known, to explain cascades
    assert (good.line, good.values["id"]) == (3, "z")


def test_blank_and_separator_only_lines_are_skipped(tmp_path: Path) -> None:
    assert _rows(tmp_path, "id,note,n\n\n , ,\n,,\na,b,1\n") == [
        (5, {"id": "a", "note": "b", "n": "1"}, None)
    ]


def test_overlong_line_is_rejected_without_losing_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(csvfile, "MAX_LINE_CHARS", 64)
    got = _rows(tmp_path, "id,note,n\na," + "x" * 500 + ",1\nb,ok,2\n")
    assert got == [(2, None, None), (3, {"id": "b", "note": "ok", "n": "2"}, None)]


# -- before parsing ------------------------------------------------------------------------
def test_size_limit_costs_a_stat(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("wb") as fh:
        fh.truncate(3 * 1024**3)  # sparse: reading it would take tens of seconds
    with pytest.raises(InputUnreadable, match=r"3,221,225,472 bytes, over the limit"):
        open_csv(path, ["id"])
    small = tmp_path / "small.csv"
    small.write_text("id\n" + "a\n" * 100, encoding="utf-8")
    with pytest.raises(InputUnreadable, match="over the limit of 50"):
        open_csv(small, ["id"], limits=CsvLimits(max_file_bytes=50))


def test_header_width_is_checked_on_the_first_line_only(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    # a million columns followed by bytes that are not UTF-8: refused for the width, unread
    path.write_bytes(b",".join(b"c%d" % i for i in range(1_000_000)) + b"\n\xff\xfe\xfd")
    with pytest.raises(InputUnreadable, match="more than 512 columns"):
        open_csv(path, ["id"])
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("id,a,b,c\n1,2,3,4\n", encoding="utf-8")
    with pytest.raises(InputUnreadable, match="more than 3 columns"):
        open_csv(narrow, ["id"], limits=CsvLimits(max_columns=3))


def test_header_checks_scale_linearly(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    names = [f"extra_{i}" for i in range(511)]
    path.write_text(",".join(["id", *names]) + "\n1" + "," * 511 + "\n", encoding="utf-8")
    csv = open_csv(path, ["id"], ["status", "improvement_pct"])
    assert len(csv.extra_columns) == 511
    assert [r.values for r in csv] == [{"id": "1"}]
    duplicated = tmp_path / "d.csv"
    duplicated.write_text(",".join(["id"] * 500) + "\n", encoding="utf-8")
    with pytest.raises(InputUnreadable, match="duplicated columns: id;"):
        open_csv(duplicated, ["id"])


@pytest.mark.parametrize(
    ("found", "intended", "near"),
    [
        ("stauts", "status", True),  # a transposition: one edit (difflib's ratio is 0.83)
        ("Status", "status", True),
        ("improvement pct", "improvement_pct", True),
        ("improvment_pct", "improvement_pct", True),
        ("mrm", "mrn", True),
        ("screenedby", "screened_by", True),
        ("visits", "visit", True),
        ("site_note", "status", False),
        ("arm", "mrn", False),
        ("reason", "status", False),
        ("x" * 10_000, "status", False),
    ],
)
def test_misspellings(found: str, intended: str, near: bool) -> None:
    assert is_misspelling(found, intended) is near


def test_osa_distance() -> None:
    assert osa_distance("status", "stauts", 3) == 1
    assert osa_distance("kitten", "sitting", 5) == 3
    assert osa_distance("abc", "abc", 0) == 0
    assert osa_distance("a" * 50, "b" * 50, 2) == 3  # stops as soon as the bound is passed


def test_header_problems(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text('"id,"x\n', encoding="utf-8")
    with pytest.raises(InputUnreadable, match="line 1: not a CSV header"):
        open_csv(path, ["id"])
    path.write_text("id\r1\r2\r", encoding="utf-8")
    with pytest.raises(InputUnreadable, match="carriage return inside the header"):
        open_csv(path, ["id"])
    path.write_bytes(b"x" * 200_000 + b"\n")
    with pytest.raises(InputUnreadable, match="first line is longer than 131,072 bytes"):
        open_csv(path, ["id"])
    path.write_text('"id","n"\n1,2\n', encoding="utf-8")
    assert [r.values for r in open_csv(path, ["id", "n"])] == [{"id": "1", "n": "2"}]


# -- what a path or a file is ----------------------------------------------------------------
def test_path_kinds(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "loop.csv").symlink_to("loop.csv")
    (tmp_path / "broken.csv").symlink_to("missing.csv")
    for name, what in [
        ("dir.csv", "a directory, not a regular file"),
        ("fifo.csv", "a named pipe"),
        ("loop.csv", "symbolic link loop"),
        ("broken.csv", "broken symbolic link"),
        ("none.csv", "no such file"),
    ]:
        with pytest.raises(InputUnreadable, match=what):
            open_csv(tmp_path / name, ["id"])


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("id,n\n1,2\n".encode("utf-16"), "UTF-16 text \\(byte-order mark\\)"),
        ("id,n\n1,2\n".encode("utf-16-be"), "UTF-16 text without a byte-order mark"),
        ("id,n\n1,2\n".encode("utf-32"), "UTF-32"),
        (b"\x1f\x8b\x08\x00rest", "gzip"),
        (b"PK\x03\x04rest", "zip archive"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1rest", "Excel 97-2003"),
        (b"%PDF-1.7\n", "PDF"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image"),
        (b"\x00\xff\x13\x00\x00\x07abc\x00def\n", "binary data \\(NUL bytes\\)"),
        (b"\x01\x02\x03\x04\x05\n", "binary data, not CSV text \\(control characters"),
        (b"id,n\n" + bytes(range(128, 256)) * 4, "binary data, not CSV text \\(first non-text"),
        ("id,n\n1,李明\n".encode("gb18030"), "legacy Chinese encoding \\(GB18030/GBK\\)"),
        ("id,n\n1,Müller\n".encode("latin-1"), "Windows-1252 or Latin-1"),
        ("id,n\n1,café au lait\n".encode("latin-1"), "Windows-1252 or Latin-1"),
        (b"id,n\n1,2" + "é".encode()[:1], "ends inside a multi-byte"),
    ],
)
def test_encodings_are_named_for_what_they_are(tmp_path: Path, content: bytes, what: str) -> None:
    path = tmp_path / "e.csv"
    path.write_bytes(content)
    with pytest.raises(InputUnreadable, match=what) as caught:
        open_csv(path, ["id", "n"])
    if "Chinese" not in what:
        assert "GB18030" not in str(caught.value)


def test_utf8_bom_and_crlf_are_fine(tmp_path: Path) -> None:
    assert _rows(tmp_path, "\ufeffid,note,n\r\na,b,1\r\n") == [
        (2, {"id": "a", "note": "b", "n": "1"}, None)
    ]


# -- outputs -------------------------------------------------------------------------------
def _always(path: Path) -> bool:
    return True


def _never(path: Path) -> bool:
    return False


def test_outputs_that_are_or_hold_inputs_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    source = data / "masi.csv"
    source.write_text("x", encoding="utf-8")
    inputs = [data, source]
    (tmp_path / "hard.csv").hardlink_to(source)
    (tmp_path / "soft.csv").symlink_to(source)
    cases = [
        (data, "directory", "is the input directory"),
        (source, "directory", "is the input file"),
        (source, "file", "is the input file"),
        (tmp_path / "hard.csv", "file", "is the input file"),
        (tmp_path / "soft.csv", "file", "is the input file"),
        (tmp_path, "directory", "holds the input"),
        (data / "sub" / ".." / "masi.csv", "file", "is the input file"),
    ]
    for path, kind, message in cases:
        with pytest.raises(OutputRefused, match=message):
            check_output(path, option="--x", inputs=inputs, kind=kind, owned=_always)  # type: ignore[arg-type]
    check_output(data / "rejects", option="--x", inputs=inputs, kind="directory", owned=_never)


def test_outputs_of_someone_else_are_refused(tmp_path: Path) -> None:
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(OutputRefused, match=r"did not write \(notes.txt\)"):
        check_output(mine, option="--out", inputs=[], kind="directory", owned=_never)
    with pytest.raises(OutputRefused, match="not a file fhir-adapter wrote"):
        check_output(mine / "notes.txt", option="--out", inputs=[], kind="file", owned=_never)
    with pytest.raises(OutputRefused, match="cannot be created"):
        check_output(mine / "notes.txt" / "x", option="--o", inputs=[], kind="file", owned=_never)
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(OutputRefused, match="broken symbolic link"):
        check_output(tmp_path / "dangling", option="--o", inputs=[], kind="file", owned=_never)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputRefused, match="not a regular file"):
        check_output(tmp_path / "fifo", option="--o", inputs=[], kind="file", owned=_always)
    with pytest.raises(OutputRefused, match="must be separate paths"):
        refuse_overlap(("--out", mine), ("--rejects", mine / "r"))


def test_a_directory_is_replaced_whole_and_only_its_own_files_go(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    for name in ("bundle-0001.json", "bundle-0002.json", "keep.txt"):
        (target / name).write_text("old", encoding="utf-8")
    (target / f"{INCOMING_PREFIX}123-dead").mkdir()  # left by a killed run

    def ours(path: Path) -> bool:
        return path.name.startswith("bundle-")

    replacement = ReplacedDirectory(target, ours)
    (replacement.open() / "bundle-0001.json").write_text("new", encoding="utf-8")
    assert (target / "bundle-0002.json").exists()  # nothing replaced before the commit
    replacement.commit()
    assert sorted(p.name for p in target.iterdir()) == ["bundle-0001.json", "keep.txt"]
    assert (target / "bundle-0001.json").read_text(encoding="utf-8") == "new"
    aborted = ReplacedDirectory(target, ours)
    (aborted.open() / "bundle-0009.json").write_text("x", encoding="utf-8")
    aborted.abort()
    assert sorted(p.name for p in target.iterdir()) == ["bundle-0001.json", "keep.txt"]
    fresh = ReplacedDirectory(tmp_path / "new", ours)
    fresh.open()
    fresh.abort()
    assert not (tmp_path / "new").exists()


def test_a_file_is_replaced_by_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "out.ndjson"
    target.write_text("old", encoding="utf-8")
    with replaced_file(target) as incoming:
        incoming.write_text("new", encoding="utf-8")
        assert target.read_text(encoding="utf-8") == "old"
    assert target.read_text(encoding="utf-8") == "new"
    with pytest.raises(RuntimeError):
        _write_and_fail(target)
    assert target.read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ndjson"]


def _write_and_fail(target: Path) -> None:
    with replaced_file(target) as incoming:
        incoming.write_text("half", encoding="utf-8")
        raise RuntimeError


def test_row_problem_is_plain_data() -> None:
    assert RowProblem(None, "x") == RowProblem(None, "x")
