"""The command line as users and acceptance checks run it: the installed console script,
in a subprocess, from a directory of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests import helpers as h

EXE = shutil.which("fhir-adapter", path=str(Path(sys.executable).parent))
assert EXE is not None, "fhir-adapter console script not installed in this environment"


def run(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_ADAPTER_")}
    full_env.update(env or {})
    return subprocess.run(
        [EXE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=full_env, check=False
    )


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line, parse_float=Decimal) for line in out.splitlines()]


def _masi_file(tmp_path: Path) -> Path:
    rows = [
        # S002 listed first: output must still start with S001
        h.masi("S002", "m1", "R1"),
        h.masi("S001", "m1", "R1", scores=(1, 1, 2, 1, 1, 2, 1, 1, 2, 0, 0, 0)),
        h.masi("S001", "m1", "R2", scores=(1, 1, 2, 1, 1, 2, 1, 1, 3, 0, 0, 0)),
        h.masi("S001", "baseline", "R2", scores=(2, 2, 3, 2, 2, 3, 2, 2, 3, 1, 1, 1)),
        h.masi("S001", "baseline", "R1", scores=(2, 2, 3, 2, 2, 3, 2, 2, 3, 1, 1, 1)),
        h.masi("S001", "m10", "R1"),  # line 7: unknown visit
        h.masi("S001", "m2", "R1", chin_a="8"),  # line 8: out of range
    ]
    return h.write_csv(tmp_path / "in" / "masi.csv", rows, h.columns("masi"))


def test_score_contract(tmp_path: Path) -> None:
    path = _masi_file(tmp_path)
    result = run("score", path, cwd=tmp_path)
    assert result.returncode == 65, result.stderr
    out = lines(result.stdout)
    assert [(o["subject_id"], o["visit"]) for o in out] == [
        ("S001", "baseline"),
        ("S001", "m1"),
        ("S002", "m1"),
    ]
    assert list(out[0]) == [
        "subject_id", "visit", "masi", "mmasi", "status", "method", "raters",
        "needs_adjudication", "improvement_pct", "pga_from_masi",
    ]  # fmt: skip
    # baseline: each rater 0.3*(2+2)*3*3 + 0.1*(1+1)*1 = 10.8 + 0.2 = 11.0; mMASI 0.3*2*3*3+0.1 = 5.5
    assert out[0] == {
        "subject_id": "S001", "visit": "baseline", "masi": Decimal("11.0"), "mmasi": Decimal("5.5"),
        "status": "final", "method": "mean-of-2", "raters": ["R1", "R2"],
        "needs_adjudication": False, "improvement_pct": None, "pga_from_masi": None,
    }  # fmt: skip
    # m1: R1 = 0.3*2*2*3 = 3.6; R2 = 0.3*2*2*2 + 0.3*2*3 = 2.4 + 1.8 = 4.2; mean 3.9
    # mMASI: R1 0.3*1*2*3 = 1.8, R2 0.3*1*2*2 + 0.3*1*3 = 1.2 + 0.9 = 2.1; mean 1.95
    # improvement (11.0 - 3.9) / 11.0 * 100 = 64.5454... -> 64.5; grade 3 = [50, 75)
    assert out[1]["masi"] == Decimal("3.9")
    assert out[1]["mmasi"] == Decimal("1.95")
    assert out[1]["improvement_pct"] == Decimal("64.5")
    assert out[1]["pga_from_masi"] == 3
    assert out[2]["status"] == "preliminary"
    assert out[2]["method"] == "single"
    assert out[2]["improvement_pct"] is None  # no baseline for S002
    # numbers are JSON numbers, never strings
    raw = json.loads(result.stdout.splitlines()[1])
    assert isinstance(raw["masi"], float)
    assert isinstance(raw["improvement_pct"], float)
    err = result.stderr.splitlines()
    assert any(line.startswith("masi.csv:7:") and "visit" in line for line in err)
    assert any(line.startswith("masi.csv:8:") and "chin_a" in line for line in err)
    assert "Traceback" not in result.stderr


def test_score_threshold_option(tmp_path: Path) -> None:
    # R1 3.6 vs R2 4.2 differ by 0.6: above a threshold of 0.5 -> preliminary, adjudication
    path = _masi_file(tmp_path)
    out = lines(run("score", path, "--threshold", "0.5", cwd=tmp_path).stdout)
    assert (out[1]["status"], out[1]["needs_adjudication"]) == ("preliminary", True)
    env = {"FHIR_ADAPTER_ADJUDICATION_THRESHOLD": "0.6"}
    out = lines(run("score", path, cwd=tmp_path, env=env).stdout)
    assert (out[1]["status"], out[1]["needs_adjudication"]) == ("final", False)


def test_score_valid_file_exits_zero_and_warnings_do_not_change_it(tmp_path: Path) -> None:
    rows = [{**h.masi(), "extra_col": "x"}]
    path = h.write_csv(tmp_path / "masi.csv", rows, [*h.columns("masi"), "extra_col"])
    result = run("score", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    assert len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"subject_id,visit\nS001,m1\n", "missing columns"),
        ("subject_id,visit,备注\n".encode("gb18030"), "not UTF-8"),
    ],
)
def test_score_unreadable_file_exits_66_with_one_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "masi.csv"
    path.write_bytes(content)
    result = run("score", path, cwd=tmp_path)
    assert result.returncode == 66
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_score_missing_file_exits_66(tmp_path: Path) -> None:
    result = run("score", tmp_path / "nope.csv", cwd=tmp_path)
    assert result.returncode == 66
    assert "Traceback" not in result.stderr


def test_read_only_commands_write_nothing(tmp_path: Path) -> None:
    src = _masi_file(tmp_path).parent
    h.write_csv(src / "participants.csv", [h.participant("S001"), h.participant("S002")])
    h.write_csv(src / "eligibility.csv", [h.screening("S001")])
    work = tmp_path / "cwd"
    work.mkdir()
    before = sorted(p.name for p in src.iterdir())
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_STATE_HOME": str(home / "state")}
    run("score", src / "masi.csv", cwd=work, env=env)
    run("validate", src, cwd=work, env=env)
    run("eligibility", src / "eligibility.csv", cwd=work, env=env)
    assert list(work.iterdir()) == []
    assert sorted(p.name for p in src.iterdir()) == before
    assert not home.exists()


def test_validate_summary_and_exit_codes(tmp_path: Path) -> None:
    d = tmp_path / "data"
    h.write_csv(d / "participants.csv", [h.participant("S001"), h.participant("S002")])
    h.write_csv(d / "pga.csv", [h.pga(), h.pga(visit="baseline")])
    result = run("validate", d, "--json", "--rejects", tmp_path / "rejects", cwd=tmp_path)
    assert result.returncode == 65
    summary = json.loads(result.stdout)
    files = {f["file"]: f for f in summary["files"]}
    assert files["pga.csv"]["accepted"] == 1
    assert files["pga.csv"]["rejected"] == 1
    assert "masi.csv" in summary["absent"]
    assert "pga.csv:3: rejected: visit:" in result.stderr
    assert (tmp_path / "rejects" / "pga.csv").is_file()
    (d / "masi.csv").write_bytes(b"")
    assert run("validate", d, cwd=tmp_path).returncode == 66
    (d / "masi.csv").unlink()
    (d / "pga.csv").unlink()
    ok = run("validate", d, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "participants.csv" in ok.stdout


def test_validate_needs_participants(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    result = run("validate", tmp_path / "d", cwd=tmp_path)
    assert result.returncode == 66
    assert "participants.csv is required" in result.stderr


def test_eligibility_command(tmp_path: Path) -> None:
    d = tmp_path / "data"
    h.write_csv(
        d / "participants.csv",
        [
            h.participant("S001"),
            h.participant("S002", birth_date="2008-01-04"),  # 16 on screening day
            h.participant("S003"),
        ],
    )
    h.write_csv(
        d / "eligibility.csv",
        [
            h.screening("S003", e4_pregnant_or_lactating="yes", e12_chronic_skin_disease=""),
            h.screening("S001"),
            h.screening("S002"),
        ],
    )
    result = run("eligibility", d / "eligibility.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [
        {"subject_id": "S001", "result": "eligible", "failed": [], "unknown": []},
        {"subject_id": "S002", "result": "ineligible", "failed": ["I1"], "unknown": []},
        {"subject_id": "S003", "result": "ineligible", "failed": ["E4"], "unknown": ["E12"]},
    ]


def test_adjudication_worklist(tmp_path: Path) -> None:
    rows = [
        h.masi("S001", "m1", "R1", scores=(0,) * 12),
        h.masi("S001", "m1", "R2", scores=(4, 4, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0)),  # 14.4
        h.masi("S002", "m1", "R1"),
        h.masi("S002", "m1", "R2"),
    ]
    path = h.write_csv(tmp_path / "masi.csv", rows, h.columns("masi"))
    result = run("adjudication", path, "--format", "jsonl", cwd=tmp_path)
    assert result.returncode == 0
    (row,) = lines(result.stdout)
    assert (row["subject_id"], row["visit"], row["difference"]) == ("S001", "m1", Decimal("14.4"))
    assert (row["rater_1"], row["rater_2"]) == ("R1", "R2")
    csv_out = run("adjudication", path, cwd=tmp_path).stdout.splitlines()
    assert csv_out[0].startswith("subject_id,visit,rater_1")
    assert len(csv_out) == 2


@pytest.mark.parametrize(
    "command", ["", "score", "validate", "eligibility", "adjudication", "generate"]
)
def test_help_everywhere(tmp_path: Path, command: str) -> None:
    result = run(*([command] if command else []), "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage:" in result.stdout


def test_version_and_log_level(tmp_path: Path) -> None:
    assert "fhir-adapter" in run("--version", cwd=tmp_path).stdout
    result = run("--log-level", "DEBUG", "score", _masi_file(tmp_path), cwd=tmp_path)
    assert result.returncode == 65


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = run("score", "x.csv", cwd=tmp_path, env={"FHIR_ADAPTER_FHIR_VERSION": "R9"})
    assert result.returncode == 66
    assert "FHIR_ADAPTER_FHIR_VERSION" in result.stderr
    assert "Traceback" not in result.stderr


# -- issue 9 -------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_output_paths_that_are_inputs_are_refused_in_one_line(tmp_path: Path) -> None:
    d = tmp_path / "data"
    h.write_csv(d / "participants.csv", [h.participant("S001")])
    h.write_csv(d / "masi.csv", [h.masi(), h.masi(rater_id="R2", chin_a="9")], h.columns("masi"))
    before = _tree(d)
    for args in (
        ["validate", d, "--rejects", d],
        ["score", d / "masi.csv", "--rejects", d / "masi.csv"],
        ["map", d, "--out", d / "participants.csv", "--format", "ndjson"],
        ["map", d, "--out", d / "masi.csv"],
    ):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ")
        assert "internal error" not in result.stderr
    assert _tree(d) == before


def test_reruns_replace_their_outputs_whole(tmp_path: Path) -> None:
    d = tmp_path / "data"
    h.write_csv(d / "participants.csv", [h.participant("S001"), h.participant("S002")])
    h.write_csv(d / "pga.csv", [h.pga(pga="9")])
    out, rejects = tmp_path / "bundles", tmp_path / "rejects"
    first = run("map", d, "--out", out, "--bundle-size", "5", "--rejects", rejects, cwd=tmp_path)
    assert first.returncode == 65, first.stderr
    assert len(list(out.glob("bundle-*.json"))) > 2
    assert [p.name for p in rejects.iterdir()] == ["pga.csv"]
    h.write_csv(d / "pga.csv", [h.pga()])
    again = run("map", d, "--out", out, "--bundle-size", "500", "--rejects", rejects, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bundle-0001.json"]  # no stale bundles
    assert list(rejects.iterdir()) == []  # no stale rejects
    single = tmp_path / "score-rejects.csv"
    assert run("score", d / "pga.csv", "--rejects", single, cwd=tmp_path).returncode == 66
    assert not single.exists()  # an unreadable input replaces nothing


def test_generate_today_keeps_the_bad_set_bad(tmp_path: Path) -> None:
    result = run("generate", tmp_path / "g", "--participants", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    check = run("validate", tmp_path / "g" / "bad", "--json", cwd=tmp_path)
    assert check.returncode == 65
    from fhir_adapter.generate import bad_rows

    documented = sum(r.severity == "error" for r in bad_rows())
    rejected = sum(f["rejected"] for f in json.loads(check.stdout)["files"])
    assert rejected == documented  # the "future" rows are in the future today
    later = run("generate", tmp_path / "h", "--today", "2031-05-04", cwd=tmp_path)
    assert later.returncode == 0
    assert "judged against 2031-05-04" in (tmp_path / "h" / "bad" / "README.md").read_text("utf-8")
    bad = run("generate", tmp_path / "i", "--today", "04/05/2031", cwd=tmp_path)
    assert bad.returncode == 2
    assert not (tmp_path / "i").exists()


def test_validate_reports_dropped_values(tmp_path: Path) -> None:
    d = tmp_path / "data"
    h.write_csv(d / "participants.csv", [h.participant("S001", mrn="not an mrn")])
    result = run("validate", d, "--json", cwd=tmp_path)
    assert result.returncode == 65
    (people,) = json.loads(result.stdout)["files"]
    assert (people["accepted"], people["rejected"], people["fields_rejected"]) == (1, 0, 1)
    assert "participants.csv:2: rejected: mrn: does not match the MRN pattern" in result.stderr
    assert "not an mrn" not in result.stderr
    table = run("validate", d, cwd=tmp_path).stdout.splitlines()
    assert table[0].split()[-1] == "dropped"
    assert table[1].split() == ["participants.csv", "1", "1", "0", "0", "1"]


def test_generate_never_writes_over_files_it_did_not_write(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "participants.csv").write_text("the hospital's own export\n", encoding="utf-8")
    refused = run("generate", real, "--participants", "2", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "did not write (participants.csv)" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert [p.name for p in real.iterdir()] == ["participants.csv"]
    assert (real / "participants.csv").read_text(encoding="utf-8") == "the hospital's own export\n"
    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    assert run("generate", a_file, cwd=tmp_path).returncode == 2
    # files of other names are left alone; a set it generated itself is written over again
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine", encoding="utf-8")
    done = run("generate", other, "--participants", "2", "--today", "2026-12-07", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (other / "notes.txt").read_text(encoding="utf-8") == "mine"
    fresh = tmp_path / "fresh"
    for _ in range(2):
        again = run("generate", fresh, "--participants", "2", "--today", "2026-12-07", cwd=tmp_path)
        assert again.returncode == 0, again.stderr


def test_an_output_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A full disk (here /dev/full as standard output) is the output's fault, not a bug (70)."""
    path = _masi_file(tmp_path)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [EXE, "score", str(path)], cwd=tmp_path, stdout=full, stderr=subprocess.PIPE,
            text=True, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "cannot write the output" in done.stderr
    assert "No space left on device" in done.stderr
    assert "Traceback" not in done.stderr
    assert "internal error" not in done.stderr


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (OSError(30, "Read-only file system", "/mnt/ro/out"), 2, "cannot write the output"),
        (OSError(28, "No space left on device"), 2, "cannot write the output"),
        (OSError(71, "Protocol error"), 66, "operating-system error"),
    ],
)
def test_user_errors_turn_os_errors_into_one_line(
    error: OSError, code: int, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fhir_adapter.cli.base import user_errors

    with pytest.raises(SystemExit) as exited, user_errors():
        raise error
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert text in err
