"""`fhir-adapter sync` / `reconcile` against the real in-memory FHIR R4 server (SPEC §7, issue 5).

The CLI runs as a subprocess (`AdapterCli`, tests/integration/conftest.py) with ``--server`` and
``--outbox``; what the server holds is read back with plain HTTP (`FhirView`) or with a standard
client (fhirpy), never through the adapter's own client.

Data: the synthetic set of `fhir_adapter.generate` — the whole default set (60 participants,
~6,300 resources) for the whole-set checks, a 12-participant set (same generator, ~1,250
resources) for the scenarios that need several syncs, to keep the module around a minute.

Every test that syncs runs once per sync target (`sync_target`, tests/integration/conftest.py):
Medplum, HAPI FHIR JPA in dependency layers, and HAPI with FHIR_ADAPTER_ATOMIC_TRANSACTIONS=true
— the same assertions, with the identity strategy `auto` picks from each server's
CapabilityStatement. Where the servers differ the test says so and asserts each one's behaviour:

- HAPI refuses to delete a resource others refer to (409, referential integrity on delete);
  Medplum deletes it and leaves the references dangling (the reconcile test).
- HAPI answers a read of a deleted resource 410 Gone, Medplum 404.
- The whole set runs in full on Medplum and HAPI (layers); on HAPI-atomic, and for the
  scenarios on HAPI, a 6-participant set keeps `make test` inside its budget (HAPI writes
  several times more slowly: a whole-set sync takes minutes on 2 cores).
"""

from __future__ import annotations

import csv
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from fhirpy import SyncFHIRClient

from fhir_adapter.generate import generate
from fhir_adapter.testserver import FhirTestServer
from tests.integration.conftest import SYNC_TARGETS, emptied_target

if TYPE_CHECKING:
    from conftest import AdapterCli, CliResult, FhirView, SyncTarget

pytestmark = pytest.mark.integration

BASE = "urn:nct06677931"
OBS = f"{BASE}:observation"
PROV = f"{BASE}:provenance"
AE = f"{BASE}:adverse-event"
CODES = f"{BASE}:codes"
REGIONS = (("forehead", "0.3"), ("right_malar", "0.3"), ("left_malar", "0.3"), ("chin", "0.1"))
UNREACHABLE_ENV = {"FHIR_ADAPTER_MAX_ATTEMPTS": "2"}  # connection refused: fail fast


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic set (generated once per module; copy before changing it)."""
    directory = tmp_path_factory.mktemp("full") / "data"
    generate(directory, with_bad=False)
    return directory


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("small") / "data"
    generate(directory, n_participants=12, with_bad=False)
    return directory


@pytest.fixture
def fhir_view(sync_target: SyncTarget) -> FhirView:
    """What the (emptied) server of this run holds: overrides the Medplum-only fixture."""
    return sync_target.view()


@pytest.fixture
def adapter_cli(sync_target: SyncTarget, tmp_path: Path) -> AdapterCli:
    """The CLI bound to this run's server and settings, with a fresh outbox."""
    return sync_target.cli(tmp_path / "outbox.sqlite")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 participants (~670 resources): the scenarios on HAPI, which writes several times
    more slowly than Medplum (the budget of `make test`)."""
    directory = tmp_path_factory.mktemp("tiny") / "data"
    generate(directory, n_participants=6, with_bad=False)
    return directory


@pytest.fixture
def data(request: pytest.FixtureRequest, sync_target: SyncTarget, tmp_path: Path) -> Path:
    """A private copy of the small set (the tiny one on HAPI), free to edit."""
    source = request.getfixturevalue("tiny_set" if sync_target.hapi else "small_set")
    return Path(shutil.copytree(source, tmp_path / "data"))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def drop_line(path: Path, startswith: str) -> str:
    """Delete the one line starting with ``startswith``; returns it."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.startswith(startswith)]
    assert len(hits) == 1, (startswith, hits)
    removed = lines.pop(hits[0])
    path.write_text("".join(lines), encoding="utf-8")
    return removed


def set_field(path: Path, startswith: str, column: str, value: str) -> None:
    """Change one field of the one line starting with ``startswith`` (no quoted commas here)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split(",")
    hits = [i for i, line in enumerate(lines) if line.startswith(startswith)]
    assert len(hits) == 1, (startswith, hits)
    fields = lines[hits[0]].rstrip("\r\n").split(",")
    fields[header.index(column)] = value
    lines[hits[0]] = ",".join(fields) + "\n"
    path.write_text("".join(lines), encoding="utf-8")


def masi_score(row: dict[str, str]) -> Decimal:
    """The MASI formula written out again: 0.3(D+H)A for forehead and malars, 0.1(D+H)A chin."""
    return sum(
        (
            Decimal(w) * (int(row[f"{r}_d"]) + int(row[f"{r}_h"])) * int(row[f"{r}_a"])
            for r, w in REGIONS
        ),
        Decimal(0),
    )


def row_key(row: dict[str, str]) -> str:
    return f"{row['subject_id']},{row['visit']},{row['rater_id']},"


def summary_of(result: CliResult, code: int = 0) -> dict[str, Any]:
    assert result.code == code, result
    summary: dict[str, Any] = result.json
    return summary


def all_sent(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """Outbox counts per type, asserting every row is in state `sent`."""
    not_sent = {t: s for t, s in counts.items() if set(s) != {"sent"}}
    assert not not_sent, f"outbox rows not sent: {not_sent}"
    return {t: s["sent"] for t, s in counts.items()}


def changed_keys(
    before: dict[tuple[str, str], tuple[str, str]], after: dict[tuple[str, str], tuple[str, str]]
) -> set[tuple[str, str]]:
    assert before.keys() == after.keys(), before.keys() ^ after.keys()
    moved = {k: (before[k][0], after[k][0]) for k in before if before[k][0] != after[k][0]}
    assert not moved, f"server ids changed (re-created instead of updated): {moved}"
    return {k for k in before if before[k][1] != after[k][1]}


# -- the whole synthetic set, synced once for the class ------------------------------------------
@dataclass
class Synced:
    target: SyncTarget
    cli: AdapterCli
    view: FhirView
    data: Path
    first: dict[str, Any]
    first_seconds: float
    types: list[str]


@pytest.fixture(scope="class", params=SYNC_TARGETS)
def whole(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Synced:
    target = emptied_target(request, request.param)
    source = request.getfixturevalue("tiny_set" if target.atomic else "full_set")
    tmp = tmp_path_factory.mktemp("whole")
    data = Path(shutil.copytree(source, tmp / "data"))
    cli = target.cli(tmp / "outbox.sqlite")
    started = time.monotonic()
    result = cli.sync(data, timeout=1800 if target.hapi else 300)  # HAPI: minutes on 2 cores
    seconds = time.monotonic() - started
    first = summary_of(result)
    types = sorted(cli.outbox_counts())
    return Synced(target, cli, target.view(), data, first, seconds, types)


class TestWholeSet:
    """Tests of this class share one sync of the whole set (they run in this order)."""

    def test_whole_set_lands_once_per_identifier(self, whole: Synced) -> None:
        first, view = whole.first, whole.view
        outbox = all_sent(whole.cli.outbox_counts())
        total = sum(outbox.values())
        assert total > (600 if whole.target.atomic else 6000)
        assert first["new"] == first["created"] == total
        assert first["updated"] == first["dead_lettered"] == first["blocked"] == 0
        assert first["rejected_rows"] == 0
        assert first["unreadable"] == []
        assert first["removed"] == []

        # counts read back (_summary=count over every type the server knows) == outbox counts
        assert view.counts() == outbox

        # every business identifier: exactly one resource, the one the outbox recorded
        held = view.held(whole.types)
        assert {k: len(v) for k, v in held.items() if len(v) != 1} == {}
        recorded = whole.cli.outbox_rows()
        assert held.keys() == recorded.keys()
        assert {k: v[0]["id"] for k, v in held.items()} == {
            k: sid for k, (_, sid) in recorded.items()
        }
        # where the type has an identifier, it carries the same key as the tag
        for (rtype, bkey), (resource,) in held.items():
            if rtype == "AdverseEvent":
                identifiers = [resource["identifier"]]
            else:
                identifiers = resource.get("identifier", [])
            if rtype != "Provenance":
                system = bkey.split("|", 1)[0]
                assert [f"{system}|{i['value']}" for i in identifiers if i["system"] == system] == [
                    bkey
                ], resource
        # ...and a search by it finds exactly that resource (a sample of every type): by tag,
        # and by identifier where the type has that search (R4 AdverseEvent has not)
        sample = sorted(held)[::100] + sorted({t: (t, k) for t, k in held}.values())
        for rtype, bkey in sample:
            params = ["_tag"] + (
                ["identifier"] if rtype not in ("Provenance", "AdverseEvent") else []
            )
            for param in params:
                found = view.search(rtype, {param: bkey})
                assert [r["id"] for r in found] == [held[rtype, bkey][0]["id"]], (rtype, bkey)

        # counts that follow from the source files alone
        participants = len(read_rows(whole.data / "participants.csv"))
        assert outbox["Patient"] == outbox["ResearchSubject"] == outbox["Consent"] == participants
        assert outbox["AdverseEvent"] == len(read_rows(whole.data / "adverse_events.csv"))
        # every reference points at a resource the server holds (no urn:uuid, no conditional)
        assert view.dangling_references(whole.types) == []

    def test_second_sync_writes_nothing(self, whole: Synced) -> None:
        view = whole.view
        before = view.versions(whole.types)
        stamps = {
            (r["resourceType"], r["id"]): r["meta"]["lastUpdated"]
            for t in ("Provenance", "CodeSystem", "MeasureReport")
            for r in view.search(t)
        }
        assert {t for t, _ in stamps} == {"Provenance", "CodeSystem", "MeasureReport"}

        started = time.monotonic()
        second = summary_of(whole.cli.sync(whole.data))
        seconds = time.monotonic() - started
        assert second["created"] == second["updated"] == second["deleted"] == 0, second
        assert second["bundles"] == 0
        assert second["new"] == second["changed"] == 0
        assert second["unchanged"] == whole.first["new"]
        assert second["removed"] == []

        after = view.versions(whole.types)
        assert after == before  # same ids, same versionId: no new version of anything
        assert {
            (r["resourceType"], r["id"]): r["meta"]["lastUpdated"]
            for t in ("Provenance", "CodeSystem", "MeasureReport")
            for r in view.search(t)
        } == stamps
        for rtype in ("CodeSystem", "MeasureReport", "Provenance"):
            rid = next(sid for (t, _), (sid, _) in sorted(after.items()) if t == rtype)
            assert view.get(f"{rtype}/{rid}/_history")["total"] == 1, rtype
        # nothing to send: mapping and hashing only, far cheaper than the first sync (measured
        # here: ~9 s first sync, ~1.2 s second); a loose bound against sending it all again
        assert seconds < whole.first_seconds

    def test_standard_client_reads_it_back(self, whole: Synced) -> None:
        client = SyncFHIRClient(whole.view.base_url)
        rows = read_rows(whole.data / "masi.csv")
        visits = {(r["subject_id"], r["visit"]) for r in rows}

        masi = client.resources("Observation").search(code=f"{CODES}|masi").fetch_all()
        values = sorted(o["identifier"][0]["value"] for o in masi)
        assert values == sorted(
            [f"{r['subject_id']}-{r['visit']}-masi-{r['rater_id']}" for r in rows]
            + [f"{s}-{v}-masi" for s, v in visits]
        )
        # the rater scores read back are the ones the source rows give
        by_value = {o["identifier"][0]["value"]: o for o in masi}
        for row in rows:
            obs = by_value[f"{row['subject_id']}-{row['visit']}-masi-{row['rater_id']}"]
            assert Decimal(str(obs["valueQuantity"]["value"])) == masi_score(row), row

        (patient,) = (
            client.resources("Patient").search(identifier=f"{BASE}:patient|S001").fetch_all()
        )
        own = (
            client.resources("Observation")
            .search(subject=f"Patient/{patient['id']}", code=f"{CODES}|masi")
            .fetch_all()
        )
        assert len(own) == sum(r["subject_id"] == "S001" for r in rows) + len(
            {v for s, v in visits if s == "S001"}
        )

        ae_row = read_rows(whole.data / "adverse_events.csv")[-1]
        (event,) = (
            client.resources("AdverseEvent").search(_tag=f"{AE}|{ae_row['ae_id']}").fetch_all()
        )
        assert event["identifier"]["value"] == ae_row["ae_id"]
        subject = event["subject"].to_resource()
        assert subject["identifier"][0]["value"] == ae_row["subject_id"]

    def test_reconcile_after_clean_sync_is_clean(self, whole: Synced) -> None:
        report = summary_of(whole.cli.reconcile())
        assert report == {
            "missing": [],
            "extra": [],
            "differing": [],
            "duplicated": [],
            "dangling": [],
            "repaired": 0,
        }


# -- scenarios on the small set ------------------------------------------------------------------
def pick_masi_row(rows: list[dict[str, str]]) -> tuple[dict[str, str], str]:
    """A follow-up rating at a two-rater visit with a region whose area and darkness can move."""
    per_visit: dict[tuple[str, str], int] = {}
    for r in rows:
        per_visit[r["subject_id"], r["visit"]] = per_visit.get((r["subject_id"], r["visit"]), 0) + 1
    for r in rows[len(rows) // 3 :]:
        if r["visit"] in ("baseline", "screening") or per_visit[r["subject_id"], r["visit"]] != 2:
            continue
        if (r["subject_id"], "baseline") not in per_visit:
            continue
        for region, _ in REGIONS:
            if int(r[f"{region}_a"]) > 0 and int(r[f"{region}_d"]) < 4:
                return r, region
    raise AssertionError("no suitable MASI row in the synthetic set")


def test_corrected_masi_row_new_versions_no_new_resources(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    summary_of(adapter_cli.sync(data))
    types = sorted(adapter_cli.outbox_counts())
    before = fhir_view.versions(types)
    counts = fhir_view.counts()

    row, region = pick_masi_row(read_rows(data / "masi.csv"))
    subject, visit, rater = row["subject_id"], row["visit"], row["rater_id"]
    new_d = int(row[f"{region}_d"]) + 1
    set_field(data / "masi.csv", row_key(row), f"{region}_d", str(new_d))
    corrected = {**row, f"{region}_d": str(new_d)}
    rater_key = ("Observation", f"{OBS}|{subject}-{visit}-masi-{rater}")  # SPEC §6 values
    consensus = {
        ("Observation", f"{OBS}|{subject}-{visit}-masi"),
        ("Observation", f"{OBS}|{subject}-{visit}-mmasi"),  # D moved where A > 0: mMASI too
        ("Observation", f"{OBS}|{subject}-{visit}-masi-improvement"),
    }

    # --dry-run first: it shows the updates and sends nothing
    plan = summary_of(adapter_cli.sync(data, "--dry-run"))["would_send"]
    assert plan, plan
    assert all(k.endswith(" update") for k in plan), plan
    assert fhir_view.versions(types) == before

    result = summary_of(adapter_cli.sync(data))
    after = fhir_view.versions(types)
    changed = changed_keys(before, after)
    assert rater_key in changed
    assert consensus <= changed
    # only what derives from that visit's ratings moves (consensus, mMASI, improvement, PGA and
    # their Provenance); nothing of other visits or subjects
    assert all(
        t in ("Observation", "Provenance") and k.split("|", 1)[1].startswith(f"{subject}-{visit}-")
        for t, k in changed
    ), changed
    assert result["created"] == result["new"] == 0
    assert result["removed"] == []
    assert result["updated"] == result["changed"] == len(changed) == sum(plan.values())
    assert fhir_view.counts() == counts  # no new resources

    obs = fhir_view.get(f"Observation/{after[rater_key][0]}")
    assert Decimal(str(obs["valueQuantity"]["value"])) == masi_score(corrected)
    assert masi_score(corrected) != masi_score(row)
    darkness = region.replace("_", "-") + "-darkness"
    assert [
        c["valueInteger"] for c in obs["component"] if c["code"]["coding"][0]["code"] == darkness
    ] == [new_d]
    assert fhir_view.get(f"Observation/{after[rater_key][0]}/_history")["total"] == 2


def test_removed_rows_retracted_or_deleted_and_rejects_remove_nothing(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    summary_of(adapter_cli.sync(data))
    types = sorted(adapter_cli.outbox_counts())
    first = fhir_view.versions(types)
    counts = fhir_view.counts()
    masi_path, ae_path = data / "masi.csv", data / "adverse_events.csv"
    original_masi = masi_path.read_text(encoding="utf-8")
    rows = read_rows(masi_path)
    gone, corrupt = rows[len(rows) // 2], rows[len(rows) // 4]
    gone_key = (
        "Observation",
        f"{OBS}|{gone['subject_id']}-{gone['visit']}-masi-{gone['rater_id']}",
    )
    corrupt_key = (
        "Observation",
        f"{OBS}|{corrupt['subject_id']}-{corrupt['visit']}-masi-{corrupt['rater_id']}",
    )
    event = read_rows(ae_path)[-1]
    event_key = ("AdverseEvent", f"{AE}|{event['ae_id']}")

    # 1. masi.csv with a rejected row (and another row missing): the file removes nothing
    set_field(masi_path, row_key(corrupt), "forehead_d", "9")
    drop_line(masi_path, row_key(gone))
    rejected = summary_of(adapter_cli.sync(data), 65)
    assert rejected["rejected_rows"] == 1
    assert rejected["removed"] == []
    assert rejected["retracted"] == rejected["deleted"] == 0
    now = fhir_view.versions(types)
    for key in (gone_key, corrupt_key):
        assert now[key] == first[key]
        assert fhir_view.get(f"Observation/{now[key][0]}")["status"] == "final"
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 0
    assert fhir_view.counts() == counts

    # 2. the corrected file without one row, and one adverse event removed
    masi_path.write_text(original_masi, encoding="utf-8")
    drop_line(masi_path, row_key(gone))
    drop_line(ae_path, f"{event['ae_id']},")
    removal = summary_of(adapter_cli.sync(data))
    assert sorted(removal["removed"]) == sorted(f"{t} {k}" for t, k in (gone_key, event_key))
    assert removal["retracted"] == 1
    assert removal["deleted"] == 1
    assert removal["dead_lettered"] == 0

    # the rater Observation stays, as entered-in-error (a new version of the same resource)
    obs = fhir_view.get(f"Observation/{first[gone_key][0]}")
    assert obs["status"] == "entered-in-error"
    assert obs["meta"]["versionId"] != now[gone_key][1]
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 1
    # The issue says a removed AE "becomes entered-in-error", but R4 AdverseEvent has no status
    # element; SPEC §7 rules: it is deleted on the server and a tombstone stays in the outbox.
    response = requests.get(
        f"{fhir_view.base_url}/AdverseEvent/{first[event_key][0]}",
        headers={"Accept": "application/fhir+json"},
        timeout=60,
    )
    assert response.status_code in (404, 410), response.text
    assert fhir_view.search("AdverseEvent", {"_tag": event_key[1]}) == []
    assert fhir_view.counts() == {**counts, "AdverseEvent": counts["AdverseEvent"] - 1}
    recorded = adapter_cli.outbox_rows()
    assert recorded[event_key][0] == "tombstone"
    assert recorded[gone_key][0] == "sent"
    assert adapter_cli.outbox_counts()["AdverseEvent"] == {
        "sent": counts["AdverseEvent"] - 1,
        "tombstone": 1,
    }

    # 3. the same files again: the removals are remembered, not repeated; nothing is written
    settled = fhir_view.versions(types)
    again = summary_of(adapter_cli.sync(data))
    assert again["removed"] == []
    assert again["created"] == again["updated"] == 0
    assert again["deleted"] == 0
    assert fhir_view.versions(types) == settled

    # 4. the rows come back: the AE is created again (once), the Observation is final again
    masi_path.write_text(original_masi, encoding="utf-8")
    with ae_path.open("a", encoding="utf-8", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(event), lineterminator="\n").writerow(event)
    restored = summary_of(adapter_cli.sync(data))
    assert restored["dead_lettered"] == 0
    assert restored["created"] == 1  # the AdverseEvent (a deleted resource is not reused)
    back = fhir_view.search("AdverseEvent", {"_tag": event_key[1]})
    assert len(back) == 1
    obs = fhir_view.get(f"Observation/{first[gone_key][0]}")
    assert obs["status"] == "final"
    assert fhir_view.counts() == counts


def test_reconcile_finds_and_repairs_a_resource_deleted_on_the_server(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path, sync_target: SyncTarget
) -> None:
    summary_of(adapter_cli.sync(data))
    types = sorted(adapter_cli.outbox_counts())
    assert summary_of(adapter_cli.reconcile())["missing"] == []
    held = fhir_view.versions(types)
    counts = fhir_view.counts()

    # a consensus MASI: its Provenance and the improvement refer to it
    row, _ = pick_masi_row(read_rows(data / "masi.csv"))
    key = ("Observation", f"{OBS}|{row['subject_id']}-{row['visit']}-masi")
    url = f"{fhir_view.base_url}/Observation/{held[key][0]}"
    deleted = requests.delete(url, timeout=60)
    if sync_target.hapi:
        # HAPI enforces referential integrity on delete: 409 while anything refers to it
        assert deleted.status_code == 409, deleted.text
        assert fhir_view.versions(types) == held
        # what nothing refers to can go: the consensus' Provenance
        key = ("Provenance", f"{PROV}|{row['subject_id']}-{row['visit']}-masi")
        assert key in held, sorted(k for k in held if k[0] == "Provenance")[:3]
        deleted = requests.delete(f"{fhir_view.base_url}/Provenance/{held[key][0]}", timeout=60)
    assert deleted.status_code in (200, 204), deleted.text
    assert fhir_view.search(key[0], {"_tag": key[1]}) == []

    report = summary_of(adapter_cli.reconcile(), 65)
    assert report["missing"] == [f"{key[0]} {key[1]}"]
    assert report["extra"] == report["differing"] == report["duplicated"] == []
    if sync_target.hapi:  # nothing referred to the deleted Provenance
        assert report["dangling"] == [], report
    else:  # its Provenance and the improvement still point at the deleted id
        assert report["dangling"], report

    repaired = summary_of(adapter_cli.reconcile("--repair"))
    # the missing resource, and each resource that referred to its old id
    referrers = {d.split(" -> ")[0] for d in report["dangling"]}
    assert repaired["repaired"] == 1 + len(referrers)
    assert repaired["sent"]["created"] == 1
    assert repaired["sent"]["updated"] == len(referrers)
    assert summary_of(adapter_cli.reconcile()) == {
        "missing": [],
        "extra": [],
        "differing": [],
        "duplicated": [],
        "dangling": [],
        "repaired": 0,
    }
    assert len(fhir_view.search(key[0], {"_tag": key[1]})) == 1
    assert fhir_view.counts() == counts
    # the re-created resource has a new id: what refers to it must follow
    assert fhir_view.dangling_references(types) == []
    # and the outbox is consistent again: a sync of the same data writes nothing
    again = summary_of(adapter_cli.sync(data))
    assert again["created"] == again["updated"] == 0


def test_dry_run_sends_nothing_and_shows_the_plan(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    shown = adapter_cli.sync(data, "--dry-run", as_json=False)
    assert shown.code == 0, shown
    plan: dict[str, int] = {}
    for line in shown.stdout.splitlines():
        if line.startswith("would send "):
            what, n = line.removeprefix("would send ").rsplit(": ", 1)
            plan[what] = int(n)
    assert plan, shown
    assert fhir_view.counts() == {}  # the server stays empty
    assert not adapter_cli.outbox.exists()  # and no outbox was written

    as_json = summary_of(adapter_cli.sync(data, "--dry-run"))
    assert as_json["would_send"] == plan
    assert fhir_view.counts() == {}

    summary_of(adapter_cli.sync(data))
    landed = all_sent(adapter_cli.outbox_counts())
    assert {f"{t} create or match": n for t, n in landed.items()} == plan
    assert fhir_view.counts() == landed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def late_server() -> Iterator[FhirTestServer]:
    """A second FHIR test server, not started yet (the test starts it on a chosen port)."""
    server = FhirTestServer()
    try:
        yield server
    finally:
        server.close()


def test_unreachable_server_exits_69_and_loses_nothing(
    late_server: FhirTestServer,
    small_set: Path,
    tmp_path: Path,
    make_cli: type[AdapterCli],
    make_view: type[FhirView],
) -> None:
    """The client's side of an outage (a Medplum server started late): not server-specific."""
    data = Path(shutil.copytree(small_set, tmp_path / "data"))
    port = _free_port()  # nothing listens there (yet)
    cli = make_cli(f"http://127.0.0.1:{port}/fhir/R4", tmp_path / "outbox.sqlite")
    down = cli.sync(data, env=UNREACHABLE_ENV)
    assert down.code == 69, down
    assert "cannot connect" in down.stderr
    staged = cli.outbox_counts()
    assert staged, down
    assert all(set(s) == {"pending"} for s in staged.values()), staged

    late_server.start(port=port)  # the server comes up at that address
    up = summary_of(cli.sync(data))
    total = sum(s["pending"] for s in staged.values())
    assert up["created"] == total
    assert up["dead_lettered"] == 0
    landed = all_sent(cli.outbox_counts())
    assert landed == {t: s["pending"] for t, s in staged.items()}
    view = make_view(late_server.base_url)
    assert view.counts() == landed
    assert {k: len(v) for k, v in view.held(sorted(landed)).items() if len(v) != 1} == {}


def test_a_file_that_suddenly_looks_empty_removes_nothing_without_allow_removals(
    adapter_cli: AdapterCli, fhir_view: FhirView, data: Path
) -> None:
    """No silent mass removal (issue 9 item 6): a header-only masi.csv would retract every MASI
    Observation; without --allow-removals none of masi.csv's removals are staged, the rest
    still syncs, and the exit status is 65 — under --dry-run too."""
    summary_of(adapter_cli.sync(data))
    types = sorted(adapter_cli.outbox_counts())
    masi = data / "masi.csv"
    masi.write_text(masi.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")

    dry = adapter_cli.sync(data, "--dry-run")
    assert dry.code == 65, dry
    refused = {r["file"]: r for r in dry.json["refused_removals"]}
    assert "masi.csv" in refused
    held = refused["masi.csv"]["held"]
    assert refused["masi.csv"]["would_remove"] == held > 50
    assert f"masi.csv would remove {held} of the {held} records the outbox holds" in dry.stderr
    assert "--allow-removals" in dry.stderr
    before = fhir_view.versions(types)

    real = summary_of(adapter_cli.sync(data), 65)
    assert {r["file"] for r in real["refused_removals"]} == set(refused)
    assert not [k for k in real["removed"] if k.startswith("Observation") and "-masi" in k]
    assert real["dead_lettered"] == real["undelivered"] == 0
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) == 0
    after = fhir_view.versions(types)
    assert after.keys() == before.keys()  # nothing deleted on the server

    allowed = summary_of(adapter_cli.sync(data, "--allow-removals"))
    assert allowed["refused_removals"] == []
    # the MASI Observations retracted, their Provenance deleted
    assert allowed["retracted"] + allowed["deleted"] >= held
    assert fhir_view.count("Observation", {"status": "entered-in-error"}) > held // 2
