"""`fhir-adapter sync` against HAPI FHIR JPA 8.8.0 (issue 14): a first smoke test of the sync.

What it shows about HAPI (see also test_hapi_server.py):

- The whole synthetic set lands once per business identifier and every reference resolves; a
  re-run sends nothing; a sync with a fresh outbox and client ids re-sends everything as
  updates, and HAPI - unlike the Medplum test server - makes no new version of a resource
  whose content is unchanged; with looked-up ids a fresh outbox records identical content
  without a write (``matched``).
- The identity strategy: R4 AdverseEvent and Provenance have no ``identifier`` search, so
  ``auto`` matches them by ``_tag``, and HAPI refuses the learn search ``_tag=system|``
  (HAPI-1218: a token search on ``_tag`` needs a code); the sync then looks up the exact keys.
  ``auto`` on the whole set runs in test_sync.py (once per server); here the whole set runs
  with ``FHIR_ADAPTER_IDENTITY_STRATEGY=client-id`` (HAPI takes client-assigned, non-numeric
  ids on ``PUT``), and ``auto`` on a participants-only set with two outboxes.
- HAPI answers a repeated search from a 60 s cache: the adapter's searches ask for fresh results.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fhir_adapter.generate import generate

if TYPE_CHECKING:
    from conftest import AdapterCli, CliResult, FhirView

    from tests.hapi import HapiServer

pytestmark = pytest.mark.integration

CLIENT_IDS = {"FHIR_ADAPTER_IDENTITY_STRATEGY": "client-id"}


def summary_of(result: CliResult, code: int = 0) -> dict[str, Any]:
    assert result.code == code, result
    summary: dict[str, Any] = result.json
    return summary


def all_sent(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    not_sent = {t: s for t, s in counts.items() if set(s) != {"sent"}}
    assert not not_sent, f"outbox rows not sent: {not_sent}"
    return {t: s["sent"] for t, s in counts.items()}


@dataclass
class OnHapi:
    cli: AdapterCli
    view: FhirView
    data: Path
    first: dict[str, Any]
    types: list[str]


@pytest.fixture(scope="module")
def on_hapi(
    hapi_test_server: HapiServer,
    tmp_path_factory: pytest.TempPathFactory,
    make_cli: type[AdapterCli],
    make_view: type[FhirView],
) -> OnHapi:
    """A 12-participant set synced once to an emptied HAPI (client-id identity; the whole set
    runs with ``auto`` in test_sync.py)."""
    hapi_test_server.reset()
    tmp = tmp_path_factory.mktemp("hapi-whole")
    data = tmp / "data"
    generate(data, n_participants=12, with_bad=False)
    cli = make_cli(hapi_test_server.base_url, tmp / "outbox.sqlite")
    first = summary_of(cli.sync(data, env=CLIENT_IDS))
    types = sorted(cli.outbox_counts())
    return OnHapi(cli, make_view(hapi_test_server.base_url), data, first, types)


class TestWholeSetOnHapi:
    """Tests of this class share one sync of the whole set (they run in this order)."""

    def test_whole_set_lands_once_per_identifier(self, on_hapi: OnHapi) -> None:
        first, view = on_hapi.first, on_hapi.view
        outbox = all_sent(on_hapi.cli.outbox_counts())
        assert sum(outbox.values()) > 500
        assert first["new"] == first["created"] == sum(outbox.values())
        assert first["updated"] == first["dead_lettered"] == first["blocked"] == 0
        assert view.counts(on_hapi.types) == outbox
        held = view.held(on_hapi.types)
        assert {k: len(v) for k, v in held.items() if len(v) != 1} == {}
        recorded = on_hapi.cli.outbox_rows()
        assert {k: v[0]["id"] for k, v in held.items()} == {
            k: sid for k, (_, sid) in recorded.items()
        }

    def test_every_reference_resolves(self, on_hapi: OnHapi) -> None:
        assert on_hapi.view.dangling_references(on_hapi.types) == []

    def test_re_run_sends_nothing(self, on_hapi: OnHapi) -> None:
        before = on_hapi.view.versions(on_hapi.types)
        again = summary_of(on_hapi.cli.sync(on_hapi.data, env=CLIENT_IDS))
        assert again["new"] == again["changed"] == 0
        assert again["created"] == again["updated"] == again["bundles"] == 0
        assert on_hapi.view.versions(on_hapi.types) == before

    def test_fresh_outbox_updates_without_new_versions(
        self, on_hapi: OnHapi, make_cli: type[AdapterCli], tmp_path: Path
    ) -> None:
        """Identical content re-sent: HAPI keeps the version (Medplum would add one).

        With client ids a fresh outbox needs no look-up: it PUTs every resource. Three of the
        files (whose resources depend on no other file) are enough; a fresh outbox removes
        nothing from files it has not seen. Only Encounters whose period started on an
        assessment (these files hold none) really change, and they alone get a new version.
        """
        before = on_hapi.view.versions(on_hapi.types)
        data = tmp_path / "data"
        data.mkdir()
        for name in ("participants.csv", "eligibility.csv", "adverse_events.csv"):
            shutil.copy(on_hapi.data / name, data)
        fresh = make_cli(on_hapi.cli.server, tmp_path / "fresh.sqlite")
        summary = summary_of(fresh.sync(data, env=CLIENT_IDS))
        resent = all_sent(fresh.outbox_counts())
        assert {"AdverseEvent", "Encounter", "Patient", "ResearchSubject"} <= resent.keys()
        assert summary["created"] == 0
        assert summary["updated"] == sum(resent.values())
        after = on_hapi.view.versions(on_hapi.types)
        changed = {k for k in after if after[k] != before[k]}
        assert {rtype for rtype, _ in changed} == {"Encounter"}
        assert {after[k] for k in changed} == {(before[k][0], "2") for k in changed}
        assert {v for _, v in before.values()} == {"1"}
        for server_id, _ in (after[k] for k in changed):
            first, second = (
                on_hapi.view.get(f"Encounter/{server_id}/_history/{v}") for v in ("1", "2")
            )
            assert first["period"] != second.get("period")
            assert without_period_and_meta(first) == without_period_and_meta(second)


def without_period_and_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("period", "meta")}


def test_auto_identity_with_a_fresh_outbox_within_the_search_cache_minute(
    hapi_reset: str, tmp_path: Path, make_cli: type[AdapterCli], make_view: type[FhirView]
) -> None:
    """Two outboxes, one server, seconds apart: the second finds what the first wrote."""
    full = tmp_path / "full"
    generate(full, n_participants=12, with_bad=False)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(full / "participants.csv", data)  # types that all have an identifier search
    first = make_cli(hapi_reset, tmp_path / "first.sqlite")
    created = summary_of(first.sync(data))
    assert created["created"] == created["new"] > 0
    view = make_view(hapi_reset)
    types = sorted(first.outbox_counts())
    before = view.versions(types)
    second = make_cli(hapi_reset, tmp_path / "second.sqlite")
    matched = summary_of(second.sync(data))
    assert matched["created"] == matched["updated"] == 0  # identical content: no write at all
    assert matched["matched"] == created["created"]
    assert view.versions(types) == before  # one resource per key, no new version
    assert second.outbox_rows() == first.outbox_rows()
