"""The synthetic data set: seeded, valid where it should be, bad exactly where documented."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path

import pytest

from fhir_adapter.domain import MasiRating, Participant, ParticipantStatus
from fhir_adapter.errors import InputUnreadable
from fhir_adapter.generate import BAD_FILES, BadFile, GenerateSummary, bad_rows, generate
from fhir_adapter.intake import KINDS, Intake
from fhir_adapter.scoring import ConsensusMethod, score_visits
from fhir_adapter.trial import Trial, load_trial

TODAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="module")
def trial() -> Trial:
    return load_trial()


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerateSummary]:
    out = tmp_path_factory.mktemp("generated")
    return out, generate(out)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _read_all(trial: Trial, directory: Path) -> tuple[Intake, dict[str, list[object]]]:
    intake = Intake(trial=trial, today=TODAY)
    records: dict[str, list[object]] = {}
    for kind in KINDS:
        records[kind] = list(intake.read_csv(kind, directory / f"{kind}.csv"))
    return intake, records


def test_same_seed_gives_identical_bytes(
    tmp_path: Path, generated: tuple[Path, GenerateSummary]
) -> None:
    first, _ = generated
    again = generate(tmp_path / "again")
    assert _files(first) == _files(tmp_path / "again")
    assert again.rows == generated[1].rows


def test_different_seed_gives_different_data(
    tmp_path: Path, generated: tuple[Path, GenerateSummary]
) -> None:
    first, _ = generated
    generate(tmp_path / "other", seed=7)
    for kind in ("participants", "masi", "adverse_events"):
        assert (first / f"{kind}.csv").read_bytes() != (
            tmp_path / "other" / f"{kind}.csv"
        ).read_bytes()


def test_columns_in_documented_order(trial: Trial, generated: tuple[Path, GenerateSummary]) -> None:
    out, summary = generated
    for kind, model in KINDS.items():
        with (out / f"{kind}.csv").open(encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == model.columns(trial)
        assert len(rows) - 1 == summary.rows[f"{kind}.csv"]


def test_good_set_validates_without_rejects_or_warnings(
    trial: Trial, generated: tuple[Path, GenerateSummary]
) -> None:
    out, summary = generated
    intake, records = _read_all(trial, out)
    assert intake.rejected == 0
    assert intake.issues == []
    assert {f"{k}.csv": len(v) for k, v in records.items()} == dict(summary.rows)


def test_participants_enrolment_and_arms(
    trial: Trial, generated: tuple[Path, GenerateSummary]
) -> None:
    out, summary = generated
    _, records = _read_all(trial, out)
    people = [p for p in records["participants"] if isinstance(p, Participant)]
    enrolled = [p for p in people if p.enrolled]
    assert summary.enrolled == len(enrolled) == 60
    assert summary.screen_failures == len(people) - 60 == 6
    assert [p.subject_id for p in people] == [f"S{i:03d}" for i in range(1, 67)]
    assert Counter(p.arm for p in enrolled) == {a.id: 30 for a in trial.arms}
    assert all(p.arm is None for p in people if not p.enrolled)
    assert sum(p.status == "withdrawn" for p in people) == summary.withdrawn >= 1
    for p in enrolled:
        assert p.consent_date is not None
        assert p.enrolled_on is not None
        assert p.first_treatment_on is not None
        assert p.consent_date <= p.enrolled_on <= p.first_treatment_on


def test_masi_needs_adjudication_and_third_raters(
    trial: Trial, generated: tuple[Path, GenerateSummary]
) -> None:
    out, _ = generated
    _, records = _read_all(trial, out)
    ratings = [r for r in records["masi"] if isinstance(r, MasiRating)]
    scores = score_visits(
        ratings, trial.adjudication_threshold, trial.visit_order, trial.baseline_visit
    )
    methods = Counter(s.consensus.method for s in scores)
    assert sum(s.consensus.needs_adjudication for s in scores) > 0
    assert methods[ConsensusMethod.CLOSEST_2_OF_3] + methods[ConsensusMethod.MEDIAN_OF_3] > 0
    assert methods[ConsensusMethod.SINGLE] == 0
    assert methods[ConsensusMethod.MEAN_OF_2] > 0.8 * len(scores)

    arm_of = {p.subject_id: p.arm for p in records["participants"] if isinstance(p, Participant)}
    experimental = next(a.id for a in trial.arms if a.type == "experimental")
    last = trial.visits[-1].id
    by_arm: dict[str | None, list[float]] = {}
    for s in scores:
        if s.visit == last and s.improvement_pct is not None:
            by_arm.setdefault(arm_of[s.subject_id], []).append(float(s.improvement_pct))
    means = {arm: sum(v) / len(v) for arm, v in by_arm.items()}
    assert means[experimental] > max(m for a, m in means.items() if a != experimental)


def test_bad_set_rejects_exactly_the_documented_rows(
    trial: Trial, generated: tuple[Path, GenerateSummary]
) -> None:
    out, summary = generated
    intake, _ = _read_all(trial, out / "bad")
    found = {(i.file, i.line, i.field, i.severity) for i in intake.issues}
    documented = {(r.file, r.line, r.field, r.severity) for r in bad_rows(trial, TODAY)}
    assert found == documented
    assert len(intake.issues) == len(documented)  # one issue per bad row
    assert summary.bad_rows == bad_rows(trial, TODAY)
    assert intake.rejected == sum(r.severity == "error" for r in summary.bad_rows)
    readme = (out / "bad" / "README.md").read_text(encoding="utf-8")
    for r in summary.bad_rows:
        assert f"| {r.file} | {r.line} | {r.field} |" in readme


@pytest.mark.parametrize("bad", [f for f in BAD_FILES if f.rejected], ids=lambda f: f.path)
def test_whole_bad_files_are_refused(
    trial: Trial, generated: tuple[Path, GenerateSummary], bad: BadFile
) -> None:
    out, _ = generated
    path = out / "bad" / bad.path
    intake = Intake(trial=trial, today=TODAY)
    list(intake.read_csv("participants", out / "bad" / "participants.csv"))
    with pytest.raises(InputUnreadable):
        list(Intake(trial=trial, today=TODAY).read_csv(path.stem, path))


def test_bom_crlf_files_are_accepted(trial: Trial, generated: tuple[Path, GenerateSummary]) -> None:
    out, _ = generated
    folder = out / "bad" / "bom_crlf"
    raw = (folder / "masi.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in raw
    assert b" ," in raw
    intake = Intake(trial=trial, today=TODAY)
    people = list(intake.read_csv("participants", folder / "participants.csv"))
    ratings = list(intake.read_csv("masi", folder / "masi.csv"))
    assert intake.issues == []
    assert len(people) == 3
    assert len(ratings) == len(raw.splitlines()) - 1


def test_gb18030_file_is_not_utf8(generated: tuple[Path, GenerateSummary]) -> None:
    out, _ = generated
    raw = (out / "bad" / "gb18030" / "participants.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert "退出" in raw.decode("gb18030")
    assert (out / "bad" / "empty" / "pga.csv").stat().st_size == 0


def test_scaled_and_truncated_sets_stay_valid(tmp_path: Path, trial: Trial) -> None:
    today = dt.date(2025, 6, 1)
    summary = generate(
        tmp_path, seed=3, n_participants=120, today=today, with_bad=False, elapsed_days=277
    )
    assert summary.enrolled == 120
    assert summary.screen_failures == 12
    assert summary.bad_files == ()
    intake = Intake(trial=trial, today=today)
    statuses = Counter(
        p.status
        for p in intake.read_csv("participants", tmp_path / "participants.csv")
        if isinstance(p, Participant)
    )
    for kind in list(KINDS)[1:]:
        list(intake.read_csv(kind, tmp_path / f"{kind}.csv"))
    assert intake.issues == []
    assert statuses[ParticipantStatus.ON_STUDY] > 0  # follow-up after `today` is not generated


def test_rejects_nonsense_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_participants"):
        generate(tmp_path, n_participants=0)
    with pytest.raises(ValueError, match="elapsed_days"):
        generate(tmp_path, elapsed_days=20)
    with pytest.raises(ValueError, match="elapsed_days"):
        generate(tmp_path / "short", elapsed_days=100)  # too short for the bad/ set


def _dates(path: Path) -> list[tuple[str, dt.date]]:
    out = []
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            for column, value in row.items():
                try:
                    out.append((column, dt.date.fromisoformat(value)))
                except ValueError:
                    continue  # not a date, or a deliberately impossible one of bad/
    return out


def test_every_date_is_offset_from_today(tmp_path: Path, trial: Trial) -> None:
    later = TODAY + dt.timedelta(days=400)
    generate(tmp_path / "a", today=TODAY)
    generate(tmp_path / "b", today=later)
    for name in [f"{kind}.csv" for kind in KINDS] + [f"bad/{kind}.csv" for kind in KINDS]:
        a, b = _dates(tmp_path / "a" / name), _dates(tmp_path / "b" / name)
        assert len(a) == len(b) > 0
        shifts = {(ca, (y - x).days) for (ca, x), (cb, y) in zip(a, b, strict=True)}
        # birth dates keep the age in completed years on the screening day: a leap day
        # may move them by one day more or less
        assert {d for c, d in shifts if c != "birth_date"} == {400}, name
        assert {d for c, d in shifts if c == "birth_date"} <= {399, 400, 401}, name
    # the deliberately bad set is as bad on the later day, judged against that day
    intake, _ = _read_all_on(trial, tmp_path / "b" / "bad", later)
    assert intake.rejected == sum(r.severity == "error" for r in bad_rows(trial, later))
    assert "judged against " + later.isoformat() in (
        tmp_path / "b" / "bad" / "README.md"
    ).read_text(encoding="utf-8")


def _read_all_on(trial: Trial, directory: Path, today: dt.date) -> tuple[Intake, list[object]]:
    intake = Intake(trial=trial, today=today)
    records: list[object] = []
    for kind in KINDS:
        records += list(intake.read_csv(kind, directory / f"{kind}.csv"))
    return intake, records
