"""The streamed send of a first sync (issue 15): staging and sending overlap, every rule of the
engine kept — look-ups before creates, referrers after their targets, uncertain answers looked
up, refusals dead-lettered and their referrers held back, staging carried to its end whatever
the server does. Against the in-memory FHIR server of ``test_sync_faults``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import ConfigurationError
from fhir_adapter.settings import Settings
from fhir_adapter.sync.engine import Sender, SendSummary
from fhir_adapter.sync.outbox import Outbox, StageResult
from tests.unit.test_sync_faults import (
    BAD,
    OBS,
    SYSTEM,
    Answer,
    Entry,
    FakeFhir,
    fhir,
    items,
    observation,
    outcome,
    patient,
    refuse_bad,
    settings,
)

pytestmark = pytest.mark.usefixtures("no_jitter")

SUBJECTS = [f"S{n:03d}" for n in range(1, 11)]


def source() -> list[dict[str, Any]]:
    """A patient, then the observation that refers to it, ten times (mapping order)."""
    out: list[dict[str, Any]] = []
    for key in SUBJECTS:
        out += [patient(key), observation(f"O{key}", key)]
    return out


class Stream:
    """One streamed sync of ``resources`` into a new outbox; counts what staging has read."""

    def __init__(
        self, cfg: Settings, path: Path, resources: list[dict[str, Any]], pace_s: float = 0.0
    ) -> None:
        self.cfg = cfg
        self.pace_s = pace_s  # what mapping a resource costs
        self.outbox = Outbox(path)
        self.resources = resources
        self.read = 0
        self.stage = StageResult()

    def _items(self) -> Iterator[tuple[str, dict[str, Any], bytes]]:
        for item in items(self.resources):
            time.sleep(self.pace_s)
            self.read += 1
            yield item

    def run(self, *, batch_rows: int = 2, bundle_size: int = 2) -> SendSummary:
        batches = self.outbox.stage_in_batches(
            self._items(), set, self.stage, batch_rows=batch_rows
        )
        with FhirClient(self.cfg) as client:
            sender = Sender(client, self.outbox, fhir_version="R4", bundle_size=bundle_size)
            return sender.run(staged=batches)

    def states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for by_state in self.outbox.counts().values():
            for state, n in by_state.items():
                counts[state] = counts.get(state, 0) + n
        return counts


def assert_whole_and_linked(fake: FakeFhir, subjects: list[str] = SUBJECTS) -> None:
    """One resource per business key, and every reference resolves on the server."""
    assert {k: len(v) for k, v in fake.held("Patient").items()} == dict.fromkeys(subjects, 1)
    observations = fake.held("Observation")
    assert {k: len(v) for k, v in observations.items()} == {f"O{k}": 1 for k in subjects}
    patients = fake.store["Patient"]
    for (held,) in observations.values():
        rtype, _, rid = held["subject"]["reference"].partition("/")
        assert rtype == "Patient"
        assert rid in patients


@pytest.fixture
def fake(httpserver: HTTPServer) -> FakeFhir:
    return FakeFhir(httpserver)


@pytest.fixture
def cfg(httpserver: HTTPServer, tmp_path: Path) -> Settings:
    return settings(httpserver, tmp_path)


def test_sending_starts_while_staging_goes_on(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source(), pace_s=0.02)
    read_at_first_bundle: list[int] = []

    def note(_bundle: dict[str, Any], n: int) -> Response | None:
        if n == 1:
            read_at_first_bundle.append(stream.read)
        return None

    fake.before = note
    summary = stream.run()
    assert read_at_first_bundle[0] < len(source())  # the first Bundle went before the last read
    assert summary.created == len(source())
    assert summary.undelivered == summary.dead_letters == summary.blocked == 0
    assert stream.stage.new == len(source())
    assert stream.states() == {"sent": len(source())}
    assert_whole_and_linked(fake)


def test_a_referrer_never_rides_with_its_target(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    Stream(cfg, tmp_path / "outbox.sqlite", source()).run(batch_rows=4, bundle_size=4)
    for bundle in fake.bundles:
        for entry in bundle["entry"]:
            reference = entry["resource"].get("subject", {}).get("reference", "")
            assert not reference.startswith("Patient/S"), "a local id reached the server"
    assert_whole_and_linked(fake)


def test_each_type_is_looked_up_once_then_learned(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    stream.run()
    # one listing per type (by system), before the type's first Bundle, whatever the batches
    assert sorted(fake.searches) == sorted(
        [f"identifier={quote(s)}%7C&_count=1000" for s in (SYSTEM, OBS)]
    )
    assert stream.outbox.learned("Patient")
    assert stream.outbox.learned("Observation")


def test_what_the_server_already_holds_is_matched_not_created(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    held = source()[:6]  # S001..S003 with their observations, from a lost outbox
    Stream(cfg, tmp_path / "lost.sqlite", held).run()
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.matched == len(held)
    assert summary.created == len(source()) - len(held)
    assert stream.states() == {"sent": len(source())}
    assert_whole_and_linked(fake)


def test_an_answer_applied_but_lost_is_looked_up_not_resent(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    def lost(_bundle: dict[str, Any], n: int, _answer: dict[str, Any]) -> Response | None:
        return Response("<html>gateway</html>", status=502) if n == 2 else None

    fake.after = lost
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.created + summary.matched == len(source())
    assert summary.undelivered == 0
    assert stream.states() == {"sent": len(source())}
    assert_whole_and_linked(fake)


def test_503_with_retry_after_sends_the_same_bundle_again(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    def busy(_bundle: dict[str, Any], n: int) -> Response | None:
        return fhir(outcome("busy"), 503, {"Retry-After": "0"}) if n in (2, 3) else None

    fake.before = busy
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.created == len(source())
    assert (
        fake.searches.count(f"identifier={quote(SYSTEM)}%7C&_count=1000") == 1
    )  # nothing to look up
    assert stream.states() == {"sent": len(source())}
    assert_whole_and_linked(fake)


def test_a_refused_target_holds_its_referrer_back(
    fake: FakeFhir, cfg: Settings, tmp_path: Path
) -> None:
    fake.entry = refuse_bad
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.dead_lettered == 1
    assert summary.blocked == 1  # BAD's observation waits for its patient
    held = stream.outbox.row("Observation", f"{OBS}|O{BAD}")
    assert held is not None
    assert held.state == "pending"
    assert stream.states() == {"sent": len(source()) - 2, "dead": 1, "pending": 1}
    good = [k for k in SUBJECTS if k != BAD]
    assert sorted(fake.held("Patient")) == good
    assert sorted(fake.held("Observation")) == [f"O{k}" for k in good]


def test_an_entry_not_applied_is_sent_again(fake: FakeFhir, cfg: Settings, tmp_path: Path) -> None:
    tried: set[str] = set()

    def once_unavailable(entry: Entry, _n: int) -> Answer | None:
        value = entry.get("resource", {}).get("identifier", [{}])[0].get("value")
        if value == "S005" and value not in tried:
            tried.add(value)
            return {"response": {"status": "503", "outcome": outcome("busy")}}
        return None

    fake.entry = once_unavailable
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.created == len(source())
    assert stream.states() == {"sent": len(source())}
    assert_whole_and_linked(fake)


def test_staging_completes_when_the_server_is_unreachable(tmp_path: Path) -> None:
    cfg = Settings(
        fhir_base_url="http://127.0.0.1:9/fhir/R4",
        max_attempts=2,
        max_retry_seconds=1,
        connect_timeout_s=0.2,
        outbox_path=tmp_path / "outbox.sqlite",
    )
    stream = Stream(cfg, tmp_path / "outbox.sqlite", source())
    summary = stream.run()
    assert summary.undelivered == len(source())
    assert summary.undelivered_reason
    assert stream.read == len(source())
    assert stream.states() == {"pending": len(source())}


def test_a_server_of_another_fhir_version_gets_nothing_and_staging_completes(
    fake: FakeFhir, httpserver: HTTPServer, tmp_path: Path
) -> None:
    stream = Stream(settings(httpserver, tmp_path), tmp_path / "outbox.sqlite", source())
    with FhirClient(stream.cfg) as client:
        sender = Sender(client, stream.outbox, fhir_version="R5", bundle_size=2)
        batches = stream.outbox.stage_in_batches(stream._items(), set, stream.stage)
        with pytest.raises(ConfigurationError, match=r"speaks FHIR 4\.0\.1"):
            sender.run(staged=batches)
    assert fake.bundles == []
    assert stream.states() == {"pending": len(source())}
