"""Personal values never reach logs, error messages or exceptions (SPEC §3, guide: Privacy)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from fhir_adapter.cli import cli
from fhir_adapter.intake import Intake, RejectsWriter
from fhir_adapter.trial import Trial
from tests import helpers as h
from tests.conftest import TODAY

SENTINEL_BIRTH = "1901-02-03"
SENTINEL_MRN = "MRN-SENTINEL-7319"
SENTINEL_NAME = "Zhang Sentinelname"


def _bad_rows() -> list[dict[str, str]]:
    return [
        # every row is rejected for a reason tied to a personal field
        h.participant("S001", birth_date="03/02/1901", mrn=SENTINEL_MRN),
        h.participant("S002", birth_date=SENTINEL_BIRTH, sex=SENTINEL_NAME),
        h.participant("S003", withdrawal_reason=SENTINEL_NAME * 60, mrn=SENTINEL_MRN),
        h.participant("S004", mrn=SENTINEL_MRN * 10, birth_date=SENTINEL_BIRTH),
        h.participant("S005", birth_date="2999-01-01", withdrawal_reason=SENTINEL_NAME),
    ]


def test_sentinels_never_reach_logs_messages_or_exceptions(
    trial: Trial, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = h.write_csv(tmp_path / "participants.csv", _bad_rows(), h.columns("participants"))
    messages: list[str] = []
    rejects = RejectsWriter(tmp_path / "rejects.csv", single_file=True)
    intake = Intake(trial=trial, today=TODAY, rejects=rejects, on_issue=messages.append)
    with caplog.at_level(logging.DEBUG):
        accepted = list(intake.read_csv("participants", path))
    rejects.close()
    # S004 is kept: only its MRN (off FHIR_ADAPTER_MRN_PATTERN) is dropped and reported
    assert [(p.subject_id, getattr(p, "mrn", "?")) for p in accepted] == [("S004", None)]
    assert len(messages) == 5  # one line per rejected row or value
    seen = "\n".join([*messages, caplog.text, *(str(i) for i in intake.issues)])
    for sentinel in (SENTINEL_BIRTH, SENTINEL_MRN, SENTINEL_NAME, "1901", "Sentinelname"):
        assert sentinel not in seen
    # the rejects file, written only where asked, keeps the rows for correction
    assert SENTINEL_MRN in (tmp_path / "rejects.csv").read_text(encoding="utf-8")


def test_cli_stderr_carries_no_personal_values(tmp_path: Path) -> None:
    d = tmp_path / "d"
    h.write_csv(d / "participants.csv", _bad_rows(), h.columns("participants"))
    result = CliRunner().invoke(cli, ["--log-level", "DEBUG", "validate", str(d)])
    assert result.exit_code == 65
    assert "participants.csv:2: rejected: birth_date" in result.output
    for sentinel in (SENTINEL_BIRTH, SENTINEL_MRN, SENTINEL_NAME, "Sentinelname"):
        assert sentinel not in result.output
