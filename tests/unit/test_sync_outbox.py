"""The outbox on its own (issue 8 item 4, issue 9 item 6): no silent mass removal per source
file, one writer at a time, the schema upgrade, the dry run's copy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fhir_adapter.errors import ConfigurationError, OutboxBusy
from fhir_adapter.jsonout import dumpb
from fhir_adapter.sync.outbox import Outbox, RefusedRemoval, StageResult, lock_path, writer_lock

OBS = "urn:nct06677931:observation"
PAT = "urn:nct06677931:patient"


def obs(value: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": value,
        "meta": {"tag": [{"system": OBS, "code": value}]},
        "status": "final",
    }


def pat(value: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": value,
        "meta": {"tag": [{"system": PAT, "code": value}]},
    }


def stage(
    outbox: Outbox,
    masi: int | range,
    patients: int | range = 0,
    *,
    present: tuple[str, ...] = ("masi", "participants"),
    **kw: Any,
) -> Any:
    masi_ids = range(masi) if isinstance(masi, int) else masi
    patient_ids = range(patients) if isinstance(patients, int) else patients
    items = [("masi", obs(f"M{i}"), dumpb(obs(f"M{i}"))) for i in masi_ids]
    items += [("participants", pat(f"S{i}"), dumpb(pat(f"S{i}"))) for i in patient_ids]
    return outbox.stage(items, lambda: set(present), "R4", **kw)


def landed(outbox: Outbox) -> None:
    """Pretend every row landed (so that removals have something to remove)."""
    for row in outbox.to_send():
        outbox.mark_sent(row, f"srv-{row.local_id}", "1")


@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    with Outbox(tmp_path / "outbox.sqlite") as box:
        yield box


# -- no silent mass removal --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("held", "kept", "refused"),
    [
        (10, 7, False),  # 30 % but only 3 records: fine
        (30, 24, False),  # exactly 20 %: fine
        (30, 23, True),  # 7 of 30 (23 %): refused
        (3, 0, True),  # the file yields nothing: refused, however few
        (2590, 0, True),  # a header-only masi.csv
    ],
)
def test_a_file_may_not_remove_too_much_of_what_it_holds(
    outbox: Outbox, held: int, kept: int, refused: bool
) -> None:
    stage(outbox, held)
    landed(outbox)
    result = stage(outbox, kept)
    if refused:
        assert result.refused_removals == [RefusedRemoval("masi", held - kept, held)]
        assert result.removed_keys == []
        assert result.retracted == 0
        assert outbox.to_send() == []
    else:
        assert result.refused_removals == []
        assert len(result.removed_keys) == held - kept
        assert result.retracted == held - kept


def test_refused_removals_of_one_file_leave_the_rest_of_the_sync_alone(outbox: Outbox) -> None:
    stage(outbox, 30, 10)
    landed(outbox)
    # masi.csv lost 20 rows (refused); participants.csv lost 1 and gained 1 (staged)
    result = stage(outbox, range(10), range(1, 11))
    assert result.refused_removals == [RefusedRemoval("masi", 20, 30)]
    assert result.removed_keys == [("Patient", f"{PAT}|S0")]
    assert result.new == 1
    states = {(r.rtype, r.bkey): r.state for r in outbox.to_send()}
    assert states == {("Patient", f"{PAT}|S0"): "delete", ("Patient", f"{PAT}|S10"): "pending"}


def test_allow_removals_stages_them(outbox: Outbox) -> None:
    stage(outbox, 30)
    landed(outbox)
    result = stage(outbox, 0, allow_removals=True)
    assert result.refused_removals == []
    assert result.retracted == 30


def test_the_share_is_a_setting(outbox: Outbox) -> None:
    stage(outbox, 30)
    landed(outbox)
    assert stage(outbox, 20, max_removal_share=0.5).refused_removals == []


def test_absent_files_and_other_sources_remove_nothing(outbox: Outbox) -> None:
    items = [("webhook", obs("W1"), dumpb(obs("W1")))]
    outbox.stage(items, lambda: set(), "R4")
    stage(outbox, 30)
    landed(outbox)
    result = stage(outbox, 0, present=("participants",))  # masi.csv absent
    assert result.refused_removals == result.removed_keys == []
    result = stage(outbox, 30)  # webhook records are never removed by a directory
    assert result.removed_keys == []


# -- one writer --------------------------------------------------------------------------------
def test_a_second_writer_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with writer_lock(path, 5):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(5)
    with writer_lock(path, 5):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_second_writer_gives_up_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with writer_lock(path, 1):
        started = time.monotonic()
        with pytest.raises(OutboxBusy) as info, writer_lock(path, 0.2):
            pass
        assert 0.2 <= time.monotonic() - started < 2
    import os

    assert info.value.exit_code == 69
    assert f"in use by another writer (process {os.getpid()})" in str(info.value)
    with Outbox(path) as box, box.writer_lock(0):  # free again
        pass


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    """SIGKILL leaves no stale lock: the OS releases it."""
    path = tmp_path / "outbox.sqlite"
    code = (
        "import sys, time; from pathlib import Path;"
        "from fhir_adapter.sync.outbox import writer_lock\n"
        f"with writer_lock(Path({str(path)!r}), 1):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            with pytest.raises(OutboxBusy), writer_lock(path, 0.1):
                pass
            proc.kill()
            proc.wait(10)
            with writer_lock(path, 2):
                assert lock_path(path).exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


# -- schema and copies -------------------------------------------------------------------------
def test_a_schema_1_outbox_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE dead_letters (rtype TEXT NOT NULL, bkey TEXT NOT NULL, status INTEGER,"
        " message TEXT NOT NULL, outcome TEXT, PRIMARY KEY (rtype, bkey));"
        "INSERT INTO dead_letters VALUES ('Patient', 'k', 400, 'refused', NULL);"
    )
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert box.get_meta("schema_version") == "2"
        (letter,) = box.dead_letters()
        assert (letter["key"], letter["operation"]) == ("k", None)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    from fhir_adapter.errors import ConfigurationError

    path = tmp_path / "new.sqlite"
    with Outbox(path) as box:
        box.set_meta("schema_version", "99")
    with pytest.raises(ConfigurationError, match="newer than this adapter"):
        Outbox(path)


def test_copy_leaves_the_source_untouched(outbox: Outbox, tmp_path: Path) -> None:
    stage(outbox, 3)
    before = outbox.path.read_bytes()
    target = tmp_path / "copy.sqlite"
    Outbox.copy(outbox.path, target)
    with Outbox(target) as copy:
        assert len(copy.to_send()) == 3
        stage(copy, 5)
    assert len(outbox.to_send()) == 3
    assert outbox.path.read_bytes() == before


def test_requeue_referrers_finds_bodies_that_refer_to_a_resource(outbox: Outbox) -> None:
    referrer = {**obs("M1"), "subject": {"reference": "Patient/S1"}}
    other = {**obs("M2"), "subject": {"reference": "Patient/S2"}}
    outbox.stage([("masi", r, dumpb(r)) for r in (pat("S1"), referrer, other)], lambda: set(), "R4")
    landed(outbox)
    assert outbox.requeue_referrers("Patient", "S1") == [("Observation", f"{OBS}|M1")]
    assert [(r.rtype, r.local_id) for r in outbox.to_send()] == [("Observation", "M1")]


# -- the unchanged re-sync's record (issue 15) ---------------------------------------------------
def test_every_write_to_a_row_or_a_dead_letter_forgets_the_clean_record(outbox: Outbox) -> None:
    def recorded() -> bool:
        outbox.record_clean_stage("digest", "2026-01-10", 1)
        return outbox.unchanged_stage("digest", "2026-01-10") == 1

    assert recorded()
    stage(outbox, 2)
    assert outbox.unchanged_stage("digest", "2026-01-10") is None
    assert recorded()
    outbox.set_meta("anything", "x")  # meta is not outbox content
    assert outbox.unchanged_stage("digest", "2026-01-10") == 1
    row = outbox.to_send()[0]
    outbox.mark_dead(row, 400, "refused", None, "POST")
    assert outbox.unchanged_stage("digest", "2026-01-10") is None
    assert recorded()
    outbox.drop_dead_letter(outbox.dead_letters()[0]["id"])  # a dead letter deleted, no row
    assert outbox.unchanged_stage("digest", "2026-01-10") is None


def test_a_write_by_another_connection_forgets_it_too(outbox: Outbox) -> None:
    """The triggers live in the file: any process, any version of the adapter, plain SQL."""
    stage(outbox, 1)
    landed(outbox)
    outbox.record_clean_stage("digest", "2026-01-10", 1)
    other = sqlite3.connect(str(outbox.path))
    other.execute("UPDATE resources SET state = 'pending'")
    other.commit()
    other.close()
    assert outbox.unchanged_stage("digest", "2026-01-10") is None


def test_a_recorded_clean_stage_holds_only_while_nothing_changes(outbox: Outbox) -> None:
    stage(outbox, 3)
    landed(outbox)
    assert outbox.settled()
    outbox.record_clean_stage("digest", "2026-01-10", 3)
    assert outbox.unchanged_stage("digest", "2026-01-10") == 3
    assert outbox.unchanged_stage("digest", "2026-02-01") == 3  # a later day: still clean
    assert outbox.unchanged_stage("digest", "2026-01-09") is None  # the clock went back
    assert outbox.unchanged_stage("other", "2026-01-10") is None
    outbox.requeue(outbox.row("Observation", f"{OBS}|M0"))  # type: ignore[arg-type]
    assert outbox.unchanged_stage("digest", "2026-01-10") is None
    assert not outbox.settled()


def test_forgotten_or_garbled_records_hold_nothing(outbox: Outbox) -> None:
    outbox.record_clean_stage("digest", "2026-01-10", 0)
    outbox.forget_clean_stage()
    assert outbox.unchanged_stage("digest", "2026-01-10") is None
    outbox.set_meta("clean_stage", "{not json")
    assert outbox.unchanged_stage("digest", "2026-01-10") is None


def test_settled_means_nothing_to_send_refused_or_held(outbox: Outbox) -> None:
    assert outbox.settled()
    stage(outbox, 2)
    assert not outbox.settled()  # pending
    landed(outbox)
    assert outbox.settled()
    stage(outbox, 1, allow_removals=True)  # M1 removed: retracted, pending again
    assert not outbox.settled()


# -- never adopt another application's database ---------------------------------------------------
def _foreign(path: Path) -> bytes:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    return path.read_bytes()


@pytest.mark.parametrize("read_only", [False, True])
def test_a_database_of_another_application_is_refused_untouched(
    tmp_path: Path, read_only: bool
) -> None:
    path = tmp_path / "app.db"
    before = _foreign(path)
    with pytest.raises(ConfigurationError, match="another application, not an outbox"):
        Outbox(path, read_only=read_only)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, -shm, .lock


def test_read_only_opens_write_nothing_and_refuse_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(ConfigurationError, match="is empty, not an outbox"):
        Outbox(empty, read_only=True)
    assert empty.read_bytes() == b""
    path = tmp_path / "o.sqlite"
    with Outbox(path) as box:
        box.stage([("masi", obs("a"), dumpb(obs("a")))], lambda: set(), "R4")
    before = path.read_bytes()
    with Outbox(path, read_only=True) as box:
        assert box.counts() == {"Observation": {"pending": 1}}
    assert path.read_bytes() == before
    with Outbox(empty) as box:  # a writer may set up an empty file (a new outbox)
        assert box.counts() == {}


def test_a_database_the_inbox_set_up_first_is_an_outbox(tmp_path: Path) -> None:
    from fhir_adapter.sync.inbox import Inbox

    path = tmp_path / "o.sqlite"
    Inbox(path).close()
    with Outbox(path) as box:
        assert box.counts() == {}


def _open_at_once(path: str, barrier: Any, answers: Any) -> None:
    barrier.wait()
    try:
        Outbox(Path(path)).close()
        answers.put("ok")
    except Exception as exc:
        answers.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_outbox_at_once_all_get_it(tmp_path: Path) -> None:
    """Two syncs started together on a new outbox: SQLite answers "database is locked" at once
    while the other turns WAL on, and a half-created schema looked like another application's
    database. Neither may fail (a real race: 1 run in 5 failed before the fix)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(20):
        path = tmp_path / f"o{round_}.sqlite"
        barrier, answers = context.Barrier(3), context.Queue()
        openers = [
            context.Process(target=_open_at_once, args=(str(path), barrier, answers))
            for _ in range(3)
        ]
        for process in openers:
            process.start()
        for process in openers:
            process.join(30)
        failures += [a for a in (answers.get(timeout=5) for _ in openers) if a != "ok"]
    assert failures == []


# -- staging in batches (the streamed send) ----------------------------------------------------
def _items(masi: range, patients: range) -> list[tuple[str, dict[str, Any], bytes]]:
    items = [("masi", obs(f"M{i}"), dumpb(obs(f"M{i}"))) for i in masi]
    return items + [("participants", pat(f"S{i}"), dumpb(pat(f"S{i}"))) for i in patients]


def _rows(box: Outbox) -> list[tuple[Any, ...]]:
    return sorted(box.db.execute("SELECT * FROM resources").fetchall())


def test_staging_in_batches_stages_what_stage_does(tmp_path: Path) -> None:
    """Same rows, states, sequence and result as :meth:`Outbox.stage` — on a new outbox and on
    one that already holds a landed set (changes, unchanged rows, removals)."""
    whole, batched = Outbox(tmp_path / "whole.sqlite"), Outbox(tmp_path / "batched.sqlite")
    present = lambda: {"masi", "participants"}  # noqa: E731
    for masi, patients in [(range(7), range(3)), (range(1, 9), range(3))]:
        expected = whole.stage(_items(masi, patients), present, "R4")
        got = StageResult()
        batches = list(batched.stage_in_batches(_items(masi, patients), present, got, batch_rows=3))
        assert got == expected
        assert _rows(batched) == _rows(whole)
        yielded = [(r.rtype, r.bkey) for batch in batches for r in batch]
        assert all(len(batch) <= 3 for batch in batches)
        # every new or changed row once, in staging order; removals (retracted M0) not yielded
        staged = [r for r in whole.to_send() if not r.retracted]
        assert yielded == [(r.rtype, r.bkey) for r in staged]
        for box in (whole, batched):
            landed(box)
    assert expected.retracted == 1


def test_the_consumer_writes_between_batches(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert box.nothing_to_send()
    result = StageResult()
    for batch in box.stage_in_batches(_items(range(5), range(0)), set, result, batch_rows=2):
        assert not box.db.in_transaction  # staging holds no transaction while the consumer runs
        with box.transaction():
            box.mark_sent_many([(row, f"srv-{row.local_id}", "1") for row in batch])
    assert result.new == 5
    assert box.counts() == {"Observation": {"sent": 5}}
    assert box.nothing_to_send()


def test_a_failure_while_staging_keeps_the_committed_batches(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")

    def failing() -> Any:
        yield from _items(range(5), range(0))
        raise RuntimeError("mapping failed")

    batches = box.stage_in_batches(failing(), set, StageResult(), batch_rows=2)
    with pytest.raises(RuntimeError, match="mapping failed"):
        list(batches)
    assert not box.db.in_transaction
    assert box.counts() == {"Observation": {"pending": 4}}  # the fifth was not committed
