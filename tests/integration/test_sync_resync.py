"""The unchanged re-sync's shortcut (issue 15) against the real in-memory server: a second sync
of the very same inputs skips mapping and validation, and it is never taken when anything
changed — a file's content, a file removed, a setting, the removal guard's refusal, the outbox
written by someone else. Every run's effect on the server is checked as without the shortcut."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fhir_adapter.generate import generate

if TYPE_CHECKING:
    from conftest import AdapterCli, CliResult, FhirView

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate(directory, n_participants=6, with_bad=False)
    return directory


@pytest.fixture
def data(tiny_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_set, tmp_path / "data"))


def summary(result: CliResult, code: int = 0) -> dict[str, Any]:
    assert result.code == code, result
    out: dict[str, Any] = result.json
    return out


def quiet(run: dict[str, Any]) -> bool:
    """Nothing staged, nothing sent."""
    sent = run["created"] + run["updated"] + run["deletes_sent"] + run["matched"]
    return run["new"] == run["changed"] == sent == 0 and run["removed"] == []


def masi_line(path: Path, index: int) -> str:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)[index]


def test_an_unchanged_resync_skips_staging_and_sends_nothing(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    first = summary(adapter_cli.sync(data))
    assert first["inputs_unchanged"] is False
    types = sorted(adapter_cli.outbox_counts())
    before = fhir_view.versions(types)

    again = summary(adapter_cli.sync(data))
    assert again["inputs_unchanged"] is True
    assert quiet(again)
    assert again["unchanged"] == first["new"]
    assert fhir_view.versions(types) == before  # not one write
    # a read-only command between two syncs changes nothing
    adapter_cli.outbox_counts()
    assert summary(adapter_cli.sync(data))["inputs_unchanged"] is True


def test_a_changed_file_is_staged_and_sent(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    summary(adapter_cli.sync(data))
    masi = data / "masi.csv"
    header = masi_line(masi, 0).rstrip("\n").split(",")
    lines = masi.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[1].rstrip("\n").split(",")
    column = header.index("forehead_d")
    fields[column] = "1" if fields[column] != "1" else "2"
    lines[1] = ",".join(fields) + "\n"
    masi.write_text("".join(lines), encoding="utf-8")

    changed = summary(adapter_cli.sync(data))
    assert changed["inputs_unchanged"] is False
    assert changed["changed"] >= 1
    assert changed["updated"] == changed["changed"]
    assert summary(adapter_cli.sync(data))["inputs_unchanged"] is True


def test_a_removed_row_is_retracted_and_a_removed_file_removes_nothing(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    summary(adapter_cli.sync(data))
    masi = data / "masi.csv"
    lines = masi.read_text(encoding="utf-8").splitlines(keepends=True)
    masi.write_text("".join(lines[:1] + lines[2:]), encoding="utf-8")  # one row gone

    removal = summary(adapter_cli.sync(data))
    assert removal["inputs_unchanged"] is False
    assert removal["retracted"] == 1
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 1

    # the file absent: each file present is the complete set, an absent one removes nothing
    masi.unlink()
    run = adapter_cli.sync(data)
    assert run.code in (0, 65), run  # 65: what is derived from MASI scores would go (guarded)
    absent = run.json
    assert absent["inputs_unchanged"] is False
    assert absent["removed"] == []
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 1

    # the rows back: the retracted Observation is final again
    masi.write_text("".join(lines), encoding="utf-8")
    back = summary(adapter_cli.sync(data))
    assert back["inputs_unchanged"] is False
    assert back["changed"] >= 1
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 0


def test_a_refused_removal_is_refused_again_on_every_run(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    """The issue-9 guard: a header-only masi.csv removes nothing without --allow-removals, and
    saying so (exit 65) is not skipped on the next, identical run."""
    summary(adapter_cli.sync(data))
    masi = data / "masi.csv"
    masi.write_text(masi_line(masi, 0), encoding="utf-8")
    for _ in range(2):
        refused = adapter_cli.sync(data)
        assert refused.code == 65, refused
        assert refused.json["inputs_unchanged"] is False
        assert "masi.csv" in [r["file"] for r in refused.json["refused_removals"]]
        assert "--allow-removals" in refused.stderr
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 0
    allowed = summary(adapter_cli.sync(data, "--allow-removals"))
    assert allowed["inputs_unchanged"] is False
    assert allowed["retracted"] > 0


def test_a_rejected_row_is_reported_again_on_every_run(
    adapter_cli: AdapterCli, data: Path
) -> None:
    masi = data / "masi.csv"
    header = masi_line(masi, 0).rstrip("\n").split(",")
    lines = masi.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[1].rstrip("\n").split(",")
    fields[header.index("forehead_d")] = "9"  # out of range
    lines[1] = ",".join(fields) + "\n"
    masi.write_text("".join(lines), encoding="utf-8")
    for _ in range(2):
        run = adapter_cli.sync(data)
        assert run.code == 65, run
        assert run.json["rejected_rows"] == 1
        assert run.json["inputs_unchanged"] is False
        assert "masi.csv:2" in run.stderr


def test_a_changed_setting_is_not_skipped(adapter_cli: AdapterCli, data: Path) -> None:
    summary(adapter_cli.sync(data))
    other = adapter_cli.sync(data, env={"FHIR_ADAPTER_ADJUDICATION_THRESHOLD": "0.5"})
    assert summary(other)["inputs_unchanged"] is False
    assert summary(adapter_cli.sync(data))["inputs_unchanged"] is False  # back: not as last run
    assert summary(adapter_cli.sync(data))["inputs_unchanged"] is True
    hospital = summary(adapter_cli.sync(data, "--target", "hospital"))
    assert hospital["inputs_unchanged"] is False


def test_an_outbox_written_by_someone_else_is_staged_again(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    """Anything that writes to the outbox between two syncs (here: plain SQL sending one row
    again, as `reconcile --repair` would) turns the shortcut off: that row is sent."""
    summary(adapter_cli.sync(data))
    db = sqlite3.connect(str(adapter_cli.outbox))
    with db:
        db.execute(
            "UPDATE resources SET state = 'pending' WHERE rowid = "
            "(SELECT MIN(rowid) FROM resources WHERE rtype = 'Observation')"
        )
    db.close()
    again = summary(adapter_cli.sync(data))
    assert again["inputs_unchanged"] is False
    assert again["matched"] + again["updated"] == 1
    assert summary(adapter_cli.sync(data))["inputs_unchanged"] is True
