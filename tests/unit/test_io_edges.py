"""Edges of the readers and the exact JSON writer."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from fhir_adapter.errors import InputUnreadable, InvalidInput
from fhir_adapter.io import load_json_records, open_csv
from fhir_adapter.io.csvfile import RowProblem
from fhir_adapter.jsonout import dumps


def test_decimals_are_written_as_the_numbers_they_are() -> None:
    assert dumps({"a": Decimal("12.45"), "b": Decimal("6.0"), "c": Decimal("1E+1")}) == (
        '{"a":12.45,"b":6.0,"c":10}'
    )
    assert dumps([Decimal("0.1") + Decimal("0.2")]) == "[0.3]"  # never 0.30000000000000004
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps(Decimal("NaN"))
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps(object())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (b"[1, 2]", "record 0: must be a JSON object"),
    ],
)
def test_bad_json_bodies(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_json_records(body)


def test_one_record_or_a_list() -> None:
    assert load_json_records(b'{"a": 1.5}') == [{"a": Decimal("1.5")}]
    assert len(load_json_records(b'[{"a": 1}, {"a": 2}]')) == 2


def test_duplicated_columns_and_truncated_multibyte(tmp_path: Path) -> None:
    dup = tmp_path / "dup.csv"
    dup.write_text("a,b,a\n1,2,3\n", encoding="utf-8")
    with pytest.raises(InputUnreadable, match="duplicated columns: a"):
        open_csv(dup, ["a", "b"])
    cut = tmp_path / "cut.csv"
    cut.write_bytes("a,b\n1,é".encode()[:-1])  # ends inside a two-byte character
    with pytest.raises(InputUnreadable, match="ends inside a multi-byte character"):
        open_csv(cut, ["a", "b"])


def test_blank_header_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text(" , \n", encoding="utf-8")
    with pytest.raises(InputUnreadable, match="empty"):
        open_csv(path, ["a"])


def test_short_rows_are_rejected_and_line_numbers_follow_quoted_newlines(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('a,b\n"x\ny",1\n2\n3,4\n', encoding="utf-8")
    rows = list(open_csv(path, ["a", "b"], free_text=frozenset({"a"})))
    assert [(r.line, r.values, r.problem) for r in rows] == [
        (2, {"a": "x\ny", "b": "1"}, None),
        (4, {}, RowProblem(None, "1 cells where the header has 2")),
        (5, {"a": "3", "b": "4"}, None),
    ]
    assert rows[1].text == "2"
