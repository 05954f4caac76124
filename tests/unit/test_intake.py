"""The bad-input corpus of SPEC §3 for all six files: every rejected row names its line and
field, and the valid rows around it are still accepted."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.errors import InputUnreadable
from fhir_adapter.intake import (
    Intake,
    RejectsWriter,
    is_rejects_file,
    neutralise,
    unneutralise,
)
from fhir_adapter.io import load_json_records
from fhir_adapter.settings import Settings
from fhir_adapter.trial import Trial
from tests import helpers as h
from tests.conftest import TODAY

FUTURE = (TODAY + dt.timedelta(days=30)).isoformat()


def _participants(tmp_path: Path) -> Path:
    return h.write_csv(
        tmp_path / "participants.csv",
        [
            h.participant("S001"),
            h.participant("S002", arm="laser"),
            h.participant(
                "S003", status="withdrawn", withdrawn_on="2025-03-01", withdrawal_reason="moved"
            ),
        ],
    )


def _run(intake: Intake, tmp_path: Path, kind: str, rows: list[dict[str, Any]]) -> list[Any]:
    _participants(tmp_path)
    list(intake.read_csv("participants", tmp_path / "participants.csv"))
    if kind == "participants":
        path = h.write_csv(tmp_path / "p2" / "participants.csv", rows, h.columns(kind))
        fresh = Intake(trial=intake.trial, today=intake.today)
        records = list(fresh.read_csv(kind, path))
        intake.reports, intake.issues = fresh.reports, fresh.issues
        return records
    path = h.write_csv(tmp_path / f"{kind}.csv", rows, h.columns(kind))
    return list(intake.read_csv(kind, path))


# (kind, rows: valid, bad, valid; field the rejection must name; words the reason must contain)
BAD_ROWS: list[tuple[str, list[dict[str, Any]], str, str]] = [
    # participants
    ("participants", [h.participant("S001"), h.participant("S002", arm="placebo"), h.participant("S003")], "arm", "unknown arm"),
    ("participants", [h.participant("S001"), h.participant("S002", sex="f"), h.participant("S003")], "sex", "female"),
    ("participants", [h.participant("S001"), h.participant("S002", birth_date="17/05/1990"), h.participant("S003")], "birth_date", "YYYY-MM-DD"),
    ("participants", [h.participant("S001"), h.participant("S002", consent_date=FUTURE), h.participant("S003")], "consent_date", "future"),
    ("participants", [h.participant("S001"), h.participant("S001"), h.participant("S003")], "subject_id", "duplicate"),
    ("participants", [h.participant("S001"), h.participant("S002", first_treatment_on="2025-01-01"), h.participant("S003")], "first_treatment_on", "before enrolled_on"),
    ("participants", [h.participant("S001"), h.participant("S002", birth_date="1990-02-30"), h.participant("S003")], "birth_date", "calendar date"),
    ("participants", [h.participant("S001"), h.participant("S 2"), h.participant("S003")], "subject_id", "letters, digits"),
    # eligibility
    ("eligibility", [h.screening("S001"), h.screening("S999"), h.screening("S002")], "subject_id", "unknown subject"),
    ("eligibility", [h.screening("S001"), h.screening("S002", e4_pregnant_or_lactating="maybe"), h.screening("S003")], "e4_pregnant_or_lactating", "yes"),
    ("eligibility", [h.screening("S001"), h.screening("S001"), h.screening("S002")], "subject_id", "duplicate"),
    ("eligibility", [h.screening("S001"), h.screening("S002", screened_on=FUTURE), h.screening("S003")], "screened_on", "future"),
    # masi
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", forehead_d="5"), h.masi(rater_id="R3")], "forehead_d", "less than or equal to 4"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", chin_a="7"), h.masi(rater_id="R3")], "chin_a", "less than or equal to 6"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", left_malar_h="2.5"), h.masi(rater_id="R3")], "left_malar_h", "whole number"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", right_malar_a="-1"), h.masi(rater_id="R3")], "right_malar_a", "greater than or equal to 0"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", visit="m9"), h.masi(rater_id="R3")], "visit", "unknown visit"),
    ("masi", [h.masi(rater_id="R1"), h.masi("S999", rater_id="R2"), h.masi(rater_id="R3")], "subject_id", "unknown subject"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R1"), h.masi(rater_id="R3")], "rater_id", "duplicate rater"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", assessed_on=FUTURE), h.masi(rater_id="R3")], "assessed_on", "future"),
    ("masi", [h.masi(rater_id="R1"), h.masi(rater_id="R2", chin_d=""), h.masi(rater_id="R3")], "chin_d", "required"),
    # pga
    ("pga", [h.pga(visit="m1"), h.pga(visit="m2", pga="7"), h.pga(visit="m3")], "pga", "less than or equal to 6"),
    ("pga", [h.pga(visit="m1"), h.pga(visit="baseline"), h.pga(visit="m3")], "visit", "baseline"),
    ("pga", [h.pga(visit="m1"), h.pga(visit="m1"), h.pga(visit="m3")], "visit", "duplicate"),
    ("pga", [h.pga(visit="m1"), h.pga(visit="m2", pga="true"), h.pga(visit="m3")], "pga", "whole number"),
    # satisfaction
    ("satisfaction", [h.satisfaction(visit="m1"), h.satisfaction(visit="baseline"), h.satisfaction(visit="m3")], "visit", "baseline"),
    ("satisfaction", [h.satisfaction(visit="m1"), h.satisfaction(visit="m2", level="happy"), h.satisfaction(visit="m3")], "level", "very_satisfied"),
    ("satisfaction", [h.satisfaction(visit="m1"), h.satisfaction(visit="m2", level=""), h.satisfaction(visit="m3")], "level", "required"),
    ("satisfaction", [h.satisfaction(visit="m1"), h.satisfaction(visit="m2", level="", improvement_pct="abc"), h.satisfaction(visit="m3")], "improvement_pct", "number"),
    # adverse events
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", resolved_on="2025-01-01"), h.adverse_event("AE3")], "resolved_on", "before onset_on"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", term="rash"), h.adverse_event("AE3")], "term", "erythema"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", term="other"), h.adverse_event("AE3")], "term_text", "required"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", grade="6"), h.adverse_event("AE3")], "grade", "less than or equal to 5"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE1"), h.adverse_event("AE3")], "ae_id", "duplicate"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", onset_on=FUTURE, resolved_on=""), h.adverse_event("AE3")], "onset_on", "future"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", serious="Y"), h.adverse_event("AE3")], "serious", "yes"),
    ("adverse_events", [h.adverse_event("AE1"), h.adverse_event("AE2", subject_id="S999"), h.adverse_event("AE3")], "subject_id", "unknown subject"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "rows", "field", "reason"),
    BAD_ROWS,
    ids=[f"{k}-{f}-{r.split()[0]}" for k, _, f, r in BAD_ROWS],
)
def test_bad_row_is_rejected_with_line_and_field_and_others_go_on(
    intake: Intake, tmp_path: Path, kind: str, rows: list[dict[str, Any]], field: str, reason: str
) -> None:
    accepted = _run(intake, tmp_path, kind, rows)
    file = f"{kind}.csv"
    errors = [i for i in intake.issues if i.severity == "error" and i.file == file]
    assert [(i.line, i.field) for i in errors] == [(3, field)]  # header = 1, bad row = line 3
    assert reason in errors[0].reason
    assert len(accepted) == 2
    report = intake.reports[file]
    assert (report.rows_read, report.accepted, report.rejected) == (3, 2, 1)


def test_more_than_three_raters_rejects_the_fourth(intake: Intake, tmp_path: Path) -> None:
    rows = [h.masi(rater_id=r) for r in ("R1", "R2", "R3", "R4")]
    accepted = _run(intake, tmp_path, "masi", rows)
    assert len(accepted) == 3
    (err,) = [i for i in intake.issues if i.severity == "error"]
    assert (err.line, err.field) == (5, "rater_id")
    assert "more than 3 raters" in err.reason


def test_all_errors_of_a_row_are_reported(intake: Intake, tmp_path: Path) -> None:
    rows = [h.masi(forehead_d="9", chin_a="x", visit="m12")]
    assert _run(intake, tmp_path, "masi", rows) == []
    fields = {i.field for i in intake.issues if i.severity == "error"}
    assert fields == {"forehead_d", "chin_a", "visit"}


def test_warnings_do_not_reject(intake: Intake, tmp_path: Path) -> None:
    # S003 withdrew on 2025-03-01; first treatment 2025-01-10 -> m1 window is day 23..37
    rows = [
        h.masi("S003", visit="m3", assessed_on="2025-04-10"),  # after withdrawal + in window
        h.masi("S001", visit="m1", assessed_on="2025-03-30"),  # day 79: out of the m1 window
    ]
    accepted = _run(intake, tmp_path, "masi", rows)
    assert len(accepted) == 2
    warnings = [(i.line, i.field, i.reason) for i in intake.issues if i.severity == "warning"]
    assert (2, "assessed_on", "after the participant's withdrawal") in warnings
    assert any(line == 3 and "outside the m1 window" in reason for line, _, reason in warnings)


def test_arm_of_a_participant_not_enrolled_is_ignored_with_a_warning(
    intake: Intake, tmp_path: Path
) -> None:
    row = h.participant("S009", enrolled_on="", first_treatment_on="", status="screening")
    (p,) = _run(intake, tmp_path, "participants", [row])
    assert p.arm is None
    assert any(i.field == "arm" and i.severity == "warning" for i in intake.issues)


def test_missing_columns_reject_the_whole_file_naming_them(intake: Intake, tmp_path: Path) -> None:
    cols = [c for c in h.columns("masi") if c != "chin_a"]
    path = h.write_csv(tmp_path / "masi.csv", [h.masi()], [*cols, "chn_a"])
    with pytest.raises(InputUnreadable, match=r"missing columns: chin_a \(found 'chn_a'"):
        list(intake.read_csv("masi", path))


def test_misspelt_optional_column_is_not_silently_dropped(intake: Intake, tmp_path: Path) -> None:
    cols = [("improvement_pc" if c == "improvement_pct" else c) for c in h.columns("satisfaction")]
    row = h.satisfaction()
    row["improvement_pc"] = "40"
    path = h.write_csv(tmp_path / "satisfaction.csv", [row], cols)
    with pytest.raises(InputUnreadable, match="improvement_pct"):
        list(intake.read_csv("satisfaction", path))


def test_optional_columns_may_be_absent(intake: Intake, tmp_path: Path) -> None:
    cols = [c for c in h.columns("participants") if c not in ("mrn", "status")]
    path = h.write_csv(tmp_path / "participants.csv", [h.participant()], cols)
    (p,) = list(intake.read_csv("participants", path))
    assert p.mrn is None
    assert p.status is None


def test_extra_columns_are_a_warning_and_ignored(intake: Intake, tmp_path: Path) -> None:
    row = {**h.participant(), "site_note": "x"}
    path = h.write_csv(
        tmp_path / "participants.csv", [row], [*h.columns("participants"), "site_note"]
    )
    assert len(list(intake.read_csv("participants", path))) == 1
    (w,) = [i for i in intake.issues if i.severity == "warning"]
    assert (w.line, "site_note" in w.reason) == (1, True)


def test_bom_crlf_trailing_blanks_and_blank_lines(intake: Intake, tmp_path: Path) -> None:
    rows = [h.participant(), {**h.participant("S002"), "sex": "male  ", "arm": " laser "}]
    path = tmp_path / "participants.csv"
    h.write_csv(path, rows, h.columns("participants"), encoding="utf-8-sig", newline="\r\n")
    path.write_bytes(path.read_bytes() + b"\r\n\r\n")
    records = list(intake.read_csv("participants", path))
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [(p.subject_id, p.arm, p.sex.value) for p in records] == [
        ("S001", "combo", "female"),
        ("S002", "laser", "male"),
    ]
    assert intake.issues == []


def test_empty_file_is_unreadable(intake: Intake, tmp_path: Path) -> None:
    path = tmp_path / "pga.csv"
    path.write_bytes(b"")
    with pytest.raises(InputUnreadable, match="empty"):
        list(intake.read_csv("pga", path))


def test_header_only_file_has_no_rows(intake: Intake, tmp_path: Path) -> None:
    path = h.write_csv(tmp_path / "pga.csv", [], h.columns("pga"))
    assert list(intake.read_csv("pga", path)) == []


def test_gb18030_file_is_rejected_with_re_export_advice(intake: Intake, tmp_path: Path) -> None:
    row = h.participant(withdrawal_reason="搬家到外地")  # "moved away"
    path = h.write_csv(tmp_path / "participants.csv", [row], encoding="gb18030")
    with pytest.raises(
        InputUnreadable, match=r"not UTF-8 \(first invalid byte on line 2\).*CSV UTF-8"
    ):
        list(intake.read_csv("participants", path))


def test_missing_file_is_unreadable(intake: Intake, tmp_path: Path) -> None:
    with pytest.raises(InputUnreadable, match="no such file"):
        list(intake.read_csv("masi", tmp_path / "masi.csv"))


def test_rejects_file_keeps_the_row_and_the_reason(trial: Trial, tmp_path: Path) -> None:
    writer = RejectsWriter(tmp_path / "rejects", single_file=False)
    intake = Intake(trial=trial, today=TODAY, cross_file=False, rejects=writer)
    rows = [h.masi(rater_id="R1"), h.masi(rater_id="R2", forehead_d="5")]
    path = h.write_csv(tmp_path / "masi.csv", rows, h.columns("masi"))
    list(intake.read_csv("masi", path))
    writer.close()
    with (tmp_path / "rejects" / "masi.csv").open(encoding="utf-8") as fh:
        (kept,) = list(csv.DictReader(fh))
    assert kept["rater_id"] == "R2"
    assert kept["forehead_d"] == "5"
    assert (kept["rejected_line"], kept["rejected_field"]) == ("3", "forehead_d")
    assert "forehead_d: " in kept["reason"]
    # the rejects file is itself an input file: corrected, it is accepted again
    fixed = Intake(trial=trial, today=TODAY, cross_file=False)
    kept["forehead_d"] = "4"
    again = h.write_csv(tmp_path / "fixed" / "masi.csv", [kept])
    assert len(list(fixed.read_csv("masi", again))) == 1


def test_json_records_share_the_validation(intake: Intake) -> None:
    body = b'[{"subject_id": "S001", "visit": "m1", "rater_id": "R1", "assessed_on": "2025-02-09", "pga": 3},' \
        b' {"subject_id": "S001", "visit": "m2", "rater_id": "R1", "assessed_on": "2025-03-09", "pga": 2.5},' \
        b' {"subject_id": "S001", "visit": "m3", "rater_id": "R1", "assessed_on": "2025-04-09", "pga": true}]'  # fmt: skip
    intake.cross_file = False
    accepted, issues = intake.read_records("pga", load_json_records(body), "webhook")
    assert len(accepted) == 1
    assert [(i.line, i.field) for i in issues] == [(1, "pga"), (2, "pga")]


def test_json_decimals_never_become_floats(intake: Intake) -> None:
    body = b'{"subject_id": "S001", "visit": "m1", "assessed_on": "2025-02-09", "improvement_pct": 33.3}'
    intake.cross_file = False
    (record,), _ = intake.read_records("satisfaction", load_json_records(body), "webhook")
    assert str(record.improvement_pct) == "33.3"  # type: ignore[attr-defined]


# -- issue 9: values as the source states them ------------------------------------------------
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("+3", "digits 0-9"),
        ("\uff13", "digits 0-9"),  # full-width 3
        ("\u0663", "digits 0-9"),  # Arabic-Indic 3
        ("9" * 5000, "too long a number (at most 9 digits)"),
        ("0" * 20 + "3", None),  # leading zeros are digits like any other
    ],
)
def test_scores_are_ascii_digits_only(
    intake: Intake, tmp_path: Path, value: str, reason: str | None
) -> None:
    rows = [h.masi(rater_id="R1", forehead_d=value)]
    accepted = _run(intake, tmp_path, "masi", rows)
    errors = [i for i in intake.issues if i.severity == "error"]
    if reason is None:
        assert len(accepted) == 1
        return
    assert accepted == []
    assert [(e.line, e.field) for e in errors] == [(2, "forehead_d")]
    assert reason in errors[0].reason
    assert "int" not in errors[0].reason.split()  # no Python internals


def test_dates_and_percentages_are_ascii_too(intake: Intake, tmp_path: Path) -> None:
    rows = [
        h.satisfaction(visit="m1", assessed_on="\uff12\uff10\uff12\uff15-02-09"),
        h.satisfaction(visit="m2", level="", improvement_pct="+40"),
        h.satisfaction(visit="m3", level="", improvement_pct="\u0664\u0660"),
        h.satisfaction(visit="m4", level="", improvement_pct="1" + "0" * 40),
        h.satisfaction(visit="m5", level="", improvement_pct="-12.5"),
    ]
    accepted = _run(intake, tmp_path, "satisfaction", rows)
    assert len(accepted) == 1
    errors = {(i.line, i.field): i.reason for i in intake.issues if i.severity == "error"}
    assert errors[(2, "assessed_on")] == "must be a date written YYYY-MM-DD"
    assert "digits 0-9" in errors[(3, "improvement_pct")]
    assert "digits 0-9" in errors[(4, "improvement_pct")]
    assert "too long a number" in errors[(5, "improvement_pct")]


@pytest.mark.parametrize(
    ("column", "value", "kept"),
    [
        ("withdrawal_reason", "moved\x00away", False),
        ("withdrawal_reason", "moved\x1baway", False),
        ("withdrawal_reason", "moved\raway", False),  # a lone CR
        ("withdrawal_reason", "moved\r\naway", True),  # a line break in free text
        ("withdrawal_reason", "moved\taway", True),  # tab is not a control character here
        ("mrn", "MRN\x07-1", True),  # off the MRN pattern: dropped, the participant kept
        ("sex", "female\n", False),  # a line break outside free text, even at the end
        ("arm", "co\nmbo", False),
    ],
)
def test_control_characters(
    intake: Intake, tmp_path: Path, column: str, value: str, kept: bool
) -> None:
    row = h.participant("S009", status="withdrawn", withdrawn_on="2025-03-01")
    row[column] = value
    intake.cross_file = False
    records = intake.read_records("participants", [row], "webhook")[0]
    assert bool(records) is kept
    if not kept:
        (issue,) = intake.issues
        assert issue.field == column
        assert "control character" in issue.reason or "line break" in issue.reason


def test_trimming_is_the_same_for_csv_and_json(intake: Intake, tmp_path: Path) -> None:
    row = h.pga(pga="\u00a03\u3000", rater_id="\tR1 ")
    intake.cross_file = False
    (from_json,), _ = intake.read_records("pga", [row], "webhook")
    path = h.write_csv(tmp_path / "pga.csv", [row])
    (from_csv,) = list(Intake(trial=intake.trial, cross_file=False).read_csv("pga", path))
    assert from_json == from_csv
    assert (from_csv.pga, from_csv.rater_id) == (3, "R1")  # type: ignore[attr-defined]


def test_an_mrn_off_the_pattern_is_dropped_and_reported(trial: Trial, tmp_path: Path) -> None:
    rows = [
        h.participant("S001", mrn="MRN-0001"),
        h.participant("S002", mrn="MRN 0002; x"),
        h.participant("S003", mrn="M" * 33),
    ]
    path = h.write_csv(tmp_path / "participants.csv", rows)
    writer = RejectsWriter(tmp_path / "rejects", single_file=False)
    intake = Intake(trial=trial, today=TODAY, rejects=writer)
    people = list(intake.read_csv("participants", path))
    writer.close()
    assert [(p.subject_id, p.mrn) for p in people] == [  # type: ignore[attr-defined]
        ("S001", "MRN-0001"),
        ("S002", None),
        ("S003", None),
    ]
    assert [(i.line, i.field) for i in intake.issues] == [(3, "mrn"), (4, "mrn")]
    report = intake.reports["participants.csv"]
    assert (report.accepted, report.rejected, report.fields_rejected) == (3, 0, 2)
    assert intake.rejected == 2  # the exit status is 65
    with (tmp_path / "rejects" / "participants.csv").open(encoding="utf-8", newline="") as fh:
        kept = list(csv.DictReader(fh))
    assert [(k["subject_id"], k["rejected_field"]) for k in kept] == [("S002", "mrn"), ("S003", "mrn")]
    # a setting chooses the pattern
    strict = Intake(
        trial=trial,
        today=TODAY,
        settings=Settings(mrn_pattern=r"MRN-[0-9]{4}"),
    )
    assert [getattr(p, "mrn", None) for p in strict.read_csv("participants", path)] == [
        "MRN-0001",
        None,
        None,
    ]


def test_mrn_pattern_setting_must_compile() -> None:
    with pytest.raises(ValueError, match="not a regular expression"):
        Settings(mrn_pattern="[unclosed")


# -- issue 9: cascades -----------------------------------------------------------------------
def test_rows_of_a_rejected_participant_are_explained_once_per_file(
    trial: Trial, tmp_path: Path
) -> None:
    people = [h.participant("S001"), h.participant("S002", sex="F"), h.participant("S003")]
    h.write_csv(tmp_path / "participants.csv", people)
    masi = [h.masi("S002", rater_id=r) for r in ("R1", "R2", "R3")] + [h.masi("S001")]
    h.write_csv(tmp_path / "masi.csv", masi)
    h.write_csv(tmp_path / "pga.csv", [h.pga("S002", visit=v) for v in ("m1", "m2")])
    lines: list[str] = []
    intake = Intake(trial=trial, today=TODAY, on_issue=lines.append)
    for kind in ("participants", "masi", "pga"):
        list(intake.read_csv(kind, tmp_path / f"{kind}.csv"))
    assert lines == [
        "participants.csv:3: rejected: sex: Input should be 'female', 'male', 'other' or "
        "'unknown'",
        "masi.csv:2: rejected: subject_id: depends on rejected participant S002 "
        "(participants.csv:3); its other rows in this file are rejected with it",
        "pga.csv:2: rejected: subject_id: depends on rejected participant S002 "
        "(participants.csv:3); its other rows in this file are rejected with it",
    ]
    assert intake.reports["masi.csv"].rejected == 3
    assert intake.reports["masi.csv"].accepted == 1
    assert intake.reports["pga.csv"].rejected == 2
    # JSON records (the webhook) answer for each record, always
    _, issues = intake.read_records("pga", [h.pga("S002", visit="m3")] * 2, "webhook")
    assert [i.line for i in issues] == [0, 1]


def test_rows_of_an_unreadable_participants_file_are_explained_once_per_file(
    trial: Trial, tmp_path: Path
) -> None:
    (tmp_path / "participants.csv").write_bytes("subject_id,备注\n".encode("gb18030"))
    h.write_csv(tmp_path / "pga.csv", [h.pga("S001", visit=v) for v in ("m1", "m2", "m3")])
    lines: list[str] = []
    intake = Intake(trial=trial, today=TODAY, on_issue=lines.append)
    with pytest.raises(InputUnreadable, match="GB18030"):
        list(intake.read_csv("participants", tmp_path / "participants.csv"))
    assert list(intake.read_csv("pga", tmp_path / "pga.csv")) == []
    assert lines == [
        "pga.csv:2: rejected: subject_id: depends on participants.csv, which could not be "
        "read; every row of this file is rejected with it"
    ]
    assert intake.reports["pga.csv"].rejected == 3


def test_a_participant_rejected_for_its_structure_still_explains_its_rows(
    trial: Trial, tmp_path: Path
) -> None:
    path = h.write_csv(tmp_path / "participants.csv", [h.participant("S001")])
    path.write_bytes(path.read_bytes().replace(b",,MRN", b",moved, far away,MRN"))
    h.write_csv(tmp_path / "pga.csv", [h.pga("S001")])
    intake = Intake(trial=trial, today=TODAY)
    list(intake.read_csv("participants", path))
    list(intake.read_csv("pga", tmp_path / "pga.csv"))
    assert [i.reason.split(" (")[0] for i in intake.issues] == [
        "12 cells where the header has 11",
        "depends on rejected participant S001",
    ]


# -- issue 9: rejects files ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("=1+2", "'=1+2"),
        ("+3", "'+3"),
        ("-1", "'-1"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=a source value", "''=a source value"),  # a leading ' of the source survives
        ("''+x", "'" + "''+x"),
        ("'quoted", "'quoted"),
        ("plain", "plain"),
        ("", ""),
    ],
)
def test_formula_cells_are_neutralised_and_read_back(value: str, written: str) -> None:
    assert neutralise(value) == written
    assert unneutralise(neutralise(value)) == value  # every value comes back exactly


def test_rejects_directory_is_replaced_whole(trial: Trial, tmp_path: Path) -> None:
    rejects = tmp_path / "rejects"
    src = h.write_csv(tmp_path / "in" / "masi.csv", [h.masi(forehead_d="9")])
    pga = h.write_csv(tmp_path / "in" / "pga.csv", [h.pga(pga="9")])
    with RejectsWriter(rejects, single_file=False) as writer:
        intake = Intake(trial=trial, today=TODAY, cross_file=False, rejects=writer)
        list(intake.read_csv("masi", src))
        list(intake.read_csv("pga", pga))
    assert sorted(p.name for p in rejects.iterdir()) == ["masi.csv", "pga.csv"]
    h.write_csv(src, [h.masi()])  # corrected: the next run leaves no stale rejects
    with RejectsWriter(rejects, single_file=False) as writer:
        intake = Intake(trial=trial, today=TODAY, cross_file=False, rejects=writer)
        list(intake.read_csv("masi", src))
        list(intake.read_csv("pga", pga))
    assert sorted(p.name for p in rejects.iterdir()) == ["pga.csv"]
    with pytest.raises(RuntimeError), RejectsWriter(rejects, single_file=False) as writer:
        raise RuntimeError  # a failed run leaves the previous rejects as they were
    assert sorted(p.name for p in rejects.iterdir()) == ["pga.csv"]


def test_single_rejects_file_is_rewritten_even_when_clean(trial: Trial, tmp_path: Path) -> None:
    target = tmp_path / "rejects.csv"
    src = h.write_csv(tmp_path / "masi.csv", [h.masi(forehead_d="9")])
    for expected in (1, 0):
        with RejectsWriter(target, single_file=True) as writer:
            intake = Intake(trial=trial, today=TODAY, cross_file=False, rejects=writer)
            list(intake.read_csv("masi", src))
        with target.open(encoding="utf-8", newline="") as fh:
            assert len(list(csv.DictReader(fh))) == expected
        h.write_csv(src, [h.masi()])
    assert is_rejects_file(target)


def test_unsplittable_records_keep_their_text(trial: Trial, tmp_path: Path) -> None:
    path = h.write_csv(tmp_path / "pga.csv", [h.pga(), h.pga(visit="m2")])
    path.write_bytes(path.read_bytes().replace(b"m2,R1", b'm2,"R1', 1))
    with RejectsWriter(tmp_path / "r", single_file=False) as writer:
        intake = Intake(trial=trial, today=TODAY, cross_file=False, rejects=writer)
        assert len(list(intake.read_csv("pga", path))) == 1
    with (tmp_path / "r" / "pga.csv").open(encoding="utf-8", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["subject_id"] == ""  # not guessed
    assert row["rejected_text"] == 'S001,m2,"R1,2025-02-09,3'
    assert row["rejected_field"] == "rater_id"
