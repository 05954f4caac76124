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
