"""The digest behind the unchanged re-sync's shortcut (issue 15): it changes with every input
staging depends on, so that a run is never skipped when anything changed."""

from __future__ import annotations

import os
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.generate import generate
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.settings import Settings
from fhir_adapter.sync.fingerprint import input_fingerprint
from fhir_adapter.trial import default_mappings_dir, load_trial


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fp") / "data"
    generate(directory, n_participants=3, with_bad=False)
    return directory


@pytest.fixture
def data(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "data"))


def ctx_for(settings: Settings, **kw: Any) -> MappingContext:
    trial = load_trial(settings.mappings_dir)
    return MappingContext(
        trial=trial, terminology=Terminology(trial, settings.mappings_dir), **kw
    )


def digest(
    data: Path, settings: Settings | None = None, *, options: dict[str, Any] | None = None,
    **ctx: Any,
) -> str | None:  # fmt: skip
    settings = settings or Settings()
    return input_fingerprint(
        data,
        ctx=ctx_for(settings, **ctx),
        settings=settings,
        options=options if options is not None else {"allow_removals": False},
    )


def test_the_same_inputs_give_the_same_digest(data: Path, tmp_path: Path) -> None:
    first = digest(data)
    assert first is not None
    assert digest(data) == first
    os.utime(data / "masi.csv", (0, 0))  # a touched file with the same content: the same inputs
    assert digest(data) == first
    elsewhere = Path(shutil.copytree(data, tmp_path / "elsewhere"))
    assert digest(elsewhere) == first  # keyed by content, not by path


def test_a_changed_byte_changes_it(data: Path) -> None:
    first = digest(data)
    masi = data / "masi.csv"
    content = masi.read_bytes()
    masi.write_bytes(content[:-2] + (b"1" if content[-2:-1] != b"1" else b"2") + content[-1:])
    assert digest(data) != first


def test_a_removed_or_added_file_changes_it(data: Path) -> None:
    first = digest(data)
    body = (data / "adverse_events.csv").read_bytes()
    (data / "adverse_events.csv").unlink()
    removed = digest(data)
    assert removed != first
    (data / "adverse_events.csv").write_bytes(body.splitlines(keepends=True)[0])  # header only
    assert digest(data) not in (first, removed)


def test_files_the_mapper_does_not_read_change_nothing(data: Path) -> None:
    first = digest(data)
    (data / "notes.txt").write_text("not a source file", encoding="utf-8")
    assert digest(data) == first


def test_a_source_that_is_not_a_regular_file_gives_no_digest(data: Path) -> None:
    (data / "pga.csv").unlink()
    (data / "pga.csv").mkdir()
    assert digest(data) is None
    (data / "pga.csv").rmdir()
    os.symlink(data / "missing.csv", data / "pga.csv")  # a broken link: unreadable, not absent
    assert digest(data) is None
    (data / "pga.csv").unlink()
    os.mkfifo(data / "pga.csv")  # never opened for reading (that would block)
    assert digest(data) is None


def test_a_source_over_the_size_limit_gives_no_digest_and_is_not_read(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 GB masi.csv costs a stat here too (intake then refuses it): never hashed whole."""
    size = (data / "masi.csv").stat().st_size
    assert digest(data, Settings(max_file_bytes=size)) is not None
    assert digest(data, Settings(max_file_bytes=size - 1)) is None
    with open(data / "masi.csv", "r+b") as fh:  # sparse: 2 GiB that would take seconds to read
        fh.truncate(2 << 30)
    opened: list[int] = []  # the sizes of the files opened for reading
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.fstat(fd).st_size)
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr("fhir_adapter.sync.fingerprint.os.fdopen", fdopen)
    assert digest(data) is None
    assert opened
    assert max(opened) < 2 << 30


def test_settings_context_and_options_change_it(data: Path) -> None:
    first = digest(data)
    assert digest(data, Settings(adjudication_threshold=Decimal("2.5"))) != first
    assert digest(data, Settings(identifier_base="urn:other")) != first
    assert digest(data, Settings(max_removal_share=0.5)) != first
    assert digest(data, target="hospital") != first
    assert digest(data, fhir_version="R5") != first
    assert digest(data, options={"allow_removals": True}) != first
    assert digest(data, options={"allow_removals": False, "threshold": Decimal("3")}) != first


def test_the_trial_definition_changes_it(data: Path, tmp_path: Path) -> None:
    mappings = Path(shutil.copytree(default_mappings_dir(), tmp_path / "mappings"))
    settings = Settings(mappings_dir=mappings)
    first = digest(data, settings)
    assert first is not None
    study = mappings / "study.yaml"
    study.write_text(study.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    assert digest(data, settings) != first
