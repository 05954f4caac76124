"""`fhir-adapter export --server` against the real in-memory FHIR R4 server (SPEC §9, §13).

The synthetic set is synced with the hospital target (birth dates and MRNs on the server), then
exported from the server, through search paging, and compared with the export of the NDJSON the
same data maps to: same pseudonyms (they come from business keys, not from the server's ids),
same dates, same files. The server's own ids, versions and timestamps never reach the export.
"""

from __future__ import annotations

import csv
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fhir_adapter.generate import generate
from fhir_adapter.testserver import FhirTestServer
from tests import export_checks as ec

if TYPE_CHECKING:
    from conftest import AdapterCli, FhirView

pytestmark = pytest.mark.integration

KEY = "integration-key-0123456789abcdefghijklmnopqrstuvwxyz"
KEY_ENV = {"FHIR_ADAPTER_DEID_KEY": KEY}


@dataclass
class Exported:
    cli: AdapterCli
    view: FhirView
    work: Path
    from_server: Path
    from_file: Path
    hospital: Path


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def exported(
    fhir_test_server: FhirTestServer,
    tmp_path_factory: pytest.TempPathFactory,
    make_cli: type[AdapterCli],
    make_view: type[FhirView],
) -> Exported:
    fhir_test_server.reset()
    work = tmp_path_factory.mktemp("export")
    data = work / "data"
    generate(data, with_bad=False)
    cli = make_cli(fhir_test_server.base_url, work / "outbox.sqlite")
    synced = cli.sync(data, "--target", "hospital")
    assert synced.code == 0, synced
    hospital = work / "hospital.ndjson"
    mapped = cli.run(
        "map", str(data), "--target", "hospital", "--format", "ndjson", "--out", str(hospital)
    )
    assert mapped.code == 0, mapped
    server = fhir_test_server.base_url
    done = cli.run("export", "--server", server, "--out", str(work / "from-server"), env=KEY_ENV)
    assert done.code == 0, done
    done = cli.run(
        "export", "--ndjson", str(hospital), "--out", str(work / "from-file"), env=KEY_ENV
    )
    assert done.code == 0, done
    return Exported(
        cli, make_view(server), work, work / "from-server", work / "from-file", hospital
    )


def test_the_server_holds_the_personal_data_the_export_must_drop(exported: Exported) -> None:
    patients = exported.view.search("Patient")
    assert len(patients) == 66
    assert all("birthDate" in p for p in patients)
    assert any(len(p["identifier"]) == 2 for p in patients)  # with the MRN


def test_export_from_the_server_equals_the_export_of_the_same_data_as_a_file(
    exported: Exported,
) -> None:
    server_manifest, server_files = ec.load_export(exported.from_server)
    file_manifest, file_files = ec.load_export(exported.from_file)
    assert server_manifest == file_manifest
    assert server_files.keys() == file_files.keys()
    for rtype in server_files:
        # numbers compared by value: the server keeps JSON numbers as JavaScript does (6.0 -> 6)
        a = json.loads(json.dumps(server_files[rtype], default=float))
        b = json.loads(json.dumps(file_files[rtype], default=float))
        assert a == b, rtype
    assert sum(len(v) for v in server_files.values()) > 6000


def test_export_from_the_server_is_de_identified(exported: Exported) -> None:
    data = exported.work / "data"
    people = csv_rows(data / "participants.csv")
    events = csv_rows(data / "adverse_events.csv")
    tokens = {p["subject_id"] for p in people} | {e["ae_id"] for e in events}
    tokens |= {r["rater_id"] for r in csv_rows(data / "masi.csv")}
    within = {p["mrn"] for p in people if p["mrn"]} | {p["birth_date"] for p in people}
    within |= {e["term_text"] for e in events if e["term"] == "other" and e["term_text"]}
    # the server's own ids, versions and clock: they would link the export back to the server
    held = [
        r
        for t in ("Patient", "Observation", "Encounter", "AdverseEvent")
        for r in exported.view.search(t)
    ]
    exact = {r["id"] for r in held} | {r["meta"]["lastUpdated"] for r in held}
    source = ec.read_ndjson(exported.hospital)
    exact |= {str(ec.business_key(r)) for r in source if r["resourceType"] in ec.SUBJECT_TYPES}
    ec.assert_no_values(exported.from_server, tokens, within, exact)
    manifest, by_type = ec.load_export(exported.from_server)
    ec.assert_manifest(exported.from_server, manifest)
    assert ec.assert_references_resolve(by_type) > 10000
    ec.assert_all_valid(by_type)
    shifts = ec.date_shifts(source, by_type, KEY)
    assert len(shifts) == 66
    assert all(len(days) == 1 for days in shifts.values())


def test_paging_does_not_change_a_byte(exported: Exported) -> None:
    out = exported.work / "small-pages"
    server = exported.cli.server
    done = exported.cli.run(
        "export", "--server", server, "--page-size", "37", "--out", str(out), env=KEY_ENV
    )
    assert done.code == 0, done
    for path in sorted(exported.from_server.iterdir()):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_unreachable_server_exits_69_and_writes_nothing(exported: Exported) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = exported.work / "nothing"
    done = exported.cli.run(
        "export", "--server", f"http://127.0.0.1:{port}/fhir/R4", "--out", str(out),
        env={**KEY_ENV, "FHIR_ADAPTER_MAX_ATTEMPTS": "2"},
    )  # fmt: skip
    assert done.code == 69, done
    assert not out.exists()
    assert not [p for p in exported.work.iterdir() if p.name.startswith(".nothing.")]
