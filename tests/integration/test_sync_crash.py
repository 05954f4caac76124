"""Crash safety of `fhir-adapter sync` (SPEC §7): SIGKILL at any point loses nothing and
duplicates nothing.

`fhir-adapter sync` runs in a subprocess against the real in-memory FHIR server with small
Bundles (``--bundle-size 20``). The test polls the outbox (SQLite, read-only) and kills the
process at chosen moments — once it staged rows and before it handed a Bundle over (the first
run, on a fresh outbox, sends while it stages), with a Bundle in flight (rows in state
``sending``), right after an answer was recorded, while a re-run re-maps — then re-runs it to
the end (the re-runs find rows left to send: they stage everything, then send). The
server must then hold exactly one resource per business identifier and all of them: as many per
type as a clean run plans (``--dry-run`` on a fresh outbox).

A 30-participant synthetic set (~3,000 resources, ~150 Bundles) keeps the test under a minute.

The test runs once per sync target (Medplum; HAPI FHIR JPA in dependency layers; HAPI with
FHIR_ADAPTER_ATOMIC_TRANSACTIONS=true), on HAPI with a 6-participant set (~670 resources, ~34
Bundles: HAPI writes several times more slowly).
Medplum applies a Bundle entry by entry, so a kill can find a Bundle half applied; HAPI commits
each transaction as a whole, so there the same kill points are Bundles in flight (applied or not
at all) — the window between HAPI's commit and the outbox's record is too short to aim at.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fhir_adapter.generate import generate

if TYPE_CHECKING:
    from conftest import AdapterCli, CliResult, FhirView, SyncTarget

pytestmark = pytest.mark.integration

BUNDLE_SIZE = "20"
POLL_S = 0.003
RUN_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def crash_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Synthetic sets by participant count, generated on first use."""
    return {}


@pytest.fixture
def crash_set(
    crash_sets: dict[int, Path], sync_target: SyncTarget, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    n = 6 if sync_target.hapi else 30
    if n not in crash_sets:
        directory = tmp_path_factory.mktemp(f"crash{n}") / "data"
        generate(directory, n_participants=n, with_bad=False)
        crash_sets[n] = directory
    return crash_sets[n]


@pytest.fixture
def fhir_view(sync_target: SyncTarget) -> FhirView:
    """What the (emptied) server of this run holds: overrides the Medplum-only fixture."""
    return sync_target.view()


@pytest.fixture
def adapter_cli(sync_target: SyncTarget, tmp_path: Path) -> AdapterCli:
    """The CLI bound to this run's server and settings, with a fresh outbox."""
    return sync_target.cli(tmp_path / "outbox.sqlite")


@dataclass(frozen=True)
class Progress:
    """The outbox as another process sees it (committed state only)."""

    elapsed: float = 0.0
    rows: int = 0
    sent: int = 0
    sending: int = 0
    attempts: int = 0

    @classmethod
    def read(cls, outbox: Path, elapsed: float = 0.0) -> Progress:
        if not outbox.exists():
            return cls(elapsed)
        try:
            db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
            try:
                found = db.execute(
                    "SELECT state, COUNT(*), COALESCE(SUM(attempts), 0) FROM resources "
                    "GROUP BY state"
                ).fetchall()
            finally:
                db.close()
        except sqlite3.OperationalError:  # not created yet
            return cls(elapsed)
        by_state = {str(s): int(n) for s, n, _ in found}
        return cls(
            elapsed,
            rows=sum(by_state.values()),
            sent=by_state.get("sent", 0),
            sending=by_state.get("sending", 0),
            attempts=sum(int(a) for _, _, a in found),
        )


@dataclass
class Moment:
    """What a kill trigger sees: the outbox at the run's start and now, the set's size."""

    start: Progress
    now: Progress
    total: int
    server_total: Callable[[], int]  # resources the server holds (a few GETs: ask only if needed)

    @property
    def bundle_handed_over(self) -> bool:
        """A Bundle of this run was marked `sending` and its answer is not recorded yet."""
        return self.now.attempts > self.start.attempts and self.now.sending > 0


Trigger = Callable[[Moment], bool]


def in_flight(at: float) -> Trigger:
    """A Bundle in flight once ``at`` of the set has landed."""
    return lambda m: m.bundle_handed_over and m.now.sent >= at * m.total


def applied_not_recorded(at: float) -> Trigger:
    """The server already applied part of the Bundle in flight (its transactions are not atomic),
    the outbox does not know: the hardest moment — the re-run must match, not re-create."""
    return lambda m: (
        m.bundle_handed_over and m.now.sent >= at * m.total and m.server_total() > m.now.sent
    )


def kill_points(atomic_bundles: bool) -> list[tuple[str, Trigger]]:
    """The kill points; where Bundles are applied whole, "half applied" becomes "in flight"."""
    if not atomic_bundles:
        return KILL_POINTS
    return [
        (name.replace("half applied", "in flight (all or nothing)"), in_flight(at))
        if "half applied" in name
        else (name, trigger)
        for (name, trigger), at in zip(KILL_POINTS, KILL_AT, strict=True)
    ]


KILL_POINTS: list[tuple[str, Trigger]] = [
    # the first run sends while it stages (a fresh outbox): staged rows, no Bundle handed over
    ("staged, nothing handed over yet", lambda m: m.now.rows > 0 and m.now.attempts == 0),
    ("first Bundle handed over", lambda m: m.now.attempts > m.start.attempts),
    ("Bundle in flight at ~20 %", in_flight(0.2)),
    ("re-mapping with a quarter landed", lambda m: m.now.elapsed >= 1.2),
    ("Bundle half applied at ~40 %", applied_not_recorded(0.4)),
    ("just after an answer was recorded, ~55 %", lambda m: m.now.sent >= 0.55 * m.total),
    ("Bundle half applied at ~70 %", applied_not_recorded(0.7)),
    ("Bundle in flight at ~85 %", in_flight(0.85)),
]
KILL_AT = [0.0, 0.0, 0.2, 0.0, 0.4, 0.55, 0.7, 0.85]  # the fraction each point waits for


def run_and_kill(
    cli: AdapterCli,
    data: Path,
    trigger: Trigger,
    total: int,
    server_total: Callable[[], int],
    timeout: float = RUN_TIMEOUT_S,
) -> Progress | None:
    """Run sync and SIGKILL it when ``trigger`` fires; the outbox as the kill left it, or None if
    the run finished first."""
    start = Progress.read(cli.outbox)
    proc = cli.popen(*cli.sync_args(data, "--bundle-size", BUNDLE_SIZE, "--json"))
    began = time.monotonic()
    try:
        while proc.poll() is None:
            now = Progress.read(cli.outbox, time.monotonic() - began)
            if trigger(Moment(start, now, total, server_total)):
                proc.kill()  # SIGKILL: no cleanup, no last commit
                assert proc.wait(timeout=10) == -9
                return Progress.read(cli.outbox, now.elapsed)  # as the kill left it
            assert now.elapsed < timeout, "sync did not reach the kill point"
            time.sleep(POLL_S)
        assert proc.returncode == 0, f"sync exited {proc.returncode} before the kill point"
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def summary_of(result: CliResult) -> dict[str, Any]:
    assert result.code == 0, result
    summary: dict[str, Any] = result.json
    return summary


def test_sigkill_at_any_point_loses_nothing_and_duplicates_nothing(
    adapter_cli: AdapterCli,
    fhir_view: FhirView,
    crash_set: Path,
    tmp_path: Path,
    sync_target: SyncTarget,
) -> None:
    data = Path(shutil.copytree(crash_set, tmp_path / "data"))
    # what a clean run sends, per type (a dry run on a fresh outbox writes nothing)
    plan = summary_of(adapter_cli.sync(data, "--dry-run"))["would_send"]
    expected = {k.removesuffix(" create or match"): n for k, n in plan.items()}
    assert not adapter_cli.outbox.exists()
    types, total = sorted(expected), sum(expected.values())
    assert total > (600 if sync_target.hapi else 2500)
    timeout = RUN_TIMEOUT_S * (3 if sync_target.hapi else 1)  # HAPI writes more slowly

    def server_total() -> int:
        return sum(fhir_view.counts(types).values())

    killed: list[tuple[str, Progress, int]] = []
    for name, trigger in kill_points(atomic_bundles=sync_target.hapi):
        at = run_and_kill(adapter_cli, data, trigger, total, server_total, timeout)
        # whatever the moment, the server never holds a business identifier twice
        held = fhir_view.held(types)
        assert {k: len(v) for k, v in held.items() if len(v) > 1} == {}, name
        if at is not None:
            killed.append((name, at, sum(len(v) for v in held.values())))
    shown = "\n".join(f"{n}: {p}, server holds {h}" for n, p, h in killed)
    # the kills hit every phase: before anything landed, Bundles in flight, and (on Medplum)
    # Bundles the server applied in part while the outbox still had them `sending`
    assert len(killed) >= 6, shown
    assert any(p.sent == 0 for _, p, _ in killed), shown
    assert sum(0 < p.sent < total and p.sending > 0 for _, p, _ in killed) >= 3, shown
    if not sync_target.hapi:
        assert any(h > p.sent for _, p, h in killed), shown

    final = summary_of(adapter_cli.sync(data, "--bundle-size", BUNDLE_SIZE))
    assert final["dead_lettered"] == final["blocked"] == 0
    assert final["removed"] == []

    counts = adapter_cli.outbox_counts()
    assert {t: s for t, s in counts.items() if set(s) != {"sent"}} == {}
    assert {t: s["sent"] for t, s in counts.items()} == expected

    # exactly one resource per business identifier, all of them, the ones the outbox recorded
    assert fhir_view.counts() == expected
    held = fhir_view.held(types)
    assert {k: len(v) for k, v in held.items() if len(v) != 1} == {}
    recorded = adapter_cli.outbox_rows()
    assert held.keys() == recorded.keys()
    assert {k: v[0]["id"] for k, v in held.items()} == {k: sid for k, (_, sid) in recorded.items()}
    assert fhir_view.dangling_references(types) == []
    report = adapter_cli.reconcile()
    assert report.code == 0, report
