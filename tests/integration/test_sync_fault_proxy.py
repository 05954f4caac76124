"""`fhir-adapter sync` when the server, the network or a gateway fails halfway (issue 8).

The CLI runs as a subprocess against the fault-injecting proxy (tests/faultproxy.py) in front of
the real FHIR server of `fault_upstream`. Each test arms a fault, syncs the 6-participant
synthetic set (673 resources, Bundles of 50; 3 participants, ~340 resources, on HAPI) and
checks the exit status and summary; each ends by reading the server directly: exactly one resource per business key, all of them (the counts a clean run plans),
every reference resolving, none of them ``urn:uuid:`` or conditional.

Every test runs once per sync target (`sync_target`, tests/integration/conftest.py): Medplum,
HAPI FHIR JPA in dependency layers, HAPI with FHIR_ADAPTER_ATOMIC_TRANSACTIONS=true. The proxy's
faults are the network's and a gateway's, so they behave alike in front of either server; where
the *server* refuses an entry (`test_entry_the_server_refuses_…`) each server's own behaviour is
asserted — Medplum refuses that entry and applies the rest, HAPI refuses the whole transaction
(nothing applied) — and the adapter's guarantees on both.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest

from fhir_adapter.generate import generate
from tests.faultproxy import FaultProxy, ProxyRequest

if TYPE_CHECKING:
    from conftest import AdapterCli, CliResult, FhirView, SyncTarget

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

BUNDLE = ("--bundle-size", "50")
FAST = {"FHIR_ADAPTER_MAX_ATTEMPTS": "4", "FHIR_ADAPTER_MAX_RETRY_SECONDS": "30"}
PATIENT = "urn:nct06677931:patient"


@pytest.fixture(scope="module")
def fault_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, dict[str, int]]]:
    """Synthetic sets by participant count (generated on first use), with what a clean run
    sends of each, per type (a dry run on a fresh outbox writes nothing)."""
    return {}


@pytest.fixture
def fault_set_and_plan(
    fault_sets: dict[int, tuple[Path, dict[str, int]]],
    sync_target: SyncTarget,
    tmp_path_factory: pytest.TempPathFactory,
    make_cli: type[AdapterCli],
) -> tuple[Path, dict[str, int]]:
    """6 participants on Medplum, 3 on HAPI (~340 resources: HAPI writes several times more
    slowly; participant S003, whose Patient the refusal tests pick, is in both)."""
    n = 3 if sync_target.hapi else 6
    if n not in fault_sets:
        directory = tmp_path_factory.mktemp(f"faults{n}") / "data"
        generate(directory, n_participants=n, with_bad=False)
        cli = make_cli("http://127.0.0.1:9/fhir/R4", tmp_path_factory.mktemp("plan") / "o.sqlite")
        plan = summary(cli.sync(directory, "--dry-run"))["would_send"]
        fault_sets[n] = directory, {k.removesuffix(" create or match"): v for k, v in plan.items()}
    return fault_sets[n]


@pytest.fixture
def six(fault_set_and_plan: tuple[Path, dict[str, int]]) -> Path:
    """The data set of this run (six participants on Medplum, three on HAPI)."""
    return fault_set_and_plan[0]


@pytest.fixture
def planned(fault_set_and_plan: tuple[Path, dict[str, int]]) -> dict[str, int]:
    return fault_set_and_plan[1]


@pytest.fixture
def fault_upstream(sync_target: SyncTarget) -> str:
    """This run's (emptied) server behind the proxy: overrides the Medplum-only fixture."""
    return sync_target.base_url


@pytest.fixture
def cli(fault_proxy: FaultProxy, tmp_path: Path, sync_target: SyncTarget) -> AdapterCli:
    """The CLI talking to the server through the proxy (this run's settings), fresh outbox."""
    return sync_target.cli(tmp_path / "outbox.sqlite", server=fault_proxy.base_url)


@pytest.fixture
def server(fault_upstream: str, make_view: type[FhirView]) -> FhirView:
    """What the real server holds (read directly, not through the proxy)."""
    return make_view(fault_upstream)


def summary(result: CliResult, code: int = 0) -> dict[str, Any]:
    assert result.code == code, result
    out: dict[str, Any] = result.json
    return out


def sync(cli: AdapterCli, data: Path, *extra: str) -> CliResult:
    return cli.sync(data, *BUNDLE, *extra, env=FAST)


def assert_server_holds_exactly(server: FhirView, planned: dict[str, int], case: str) -> None:
    """One resource per business key, all of them, every reference resolving and literal."""
    types = sorted(planned)
    assert server.counts() == planned, case
    assert server.problems(types) == {}, case
    log.info("%s: the server holds %d resources, one per key", case, sum(planned.values()))


def assert_all_sent(cli: AdapterCli, planned: dict[str, int]) -> None:
    counts = cli.outbox_counts()
    assert {t: s for t, s in counts.items() if set(s) != {"sent"}} == {}
    assert {t: s["sent"] for t, s in counts.items()} == planned


def repeated_lookups(proxy: FaultProxy) -> list[str]:
    """Searches by business identity for what a search answered earlier in the run already
    covered (a whole system, or an exact key): the look-ups that resolve uncertain answers.
    The first answered search of each key learns what the server holds (a first sync makes
    those while it sends); a search retried after a 5xx, or a next page, is not a new look-up."""
    seen: dict[str, set[str]] = {}
    again: list[str] = []
    for e in proxy.requests("GET"):
        url = urlsplit(e.path)
        query = parse_qs(url.query)
        values = {v for p in ("identifier", "_tag") for q in query.get(p, []) for v in q.split(",")}
        if not values or e.status != 200 or {"_offset", "_getpages"} & query.keys():
            continue
        rtype = url.path.rstrip("/").rsplit("/", 1)[-1]
        if values & seen.setdefault(rtype, set()):
            again.append(e.path)
        seen[rtype] |= values
    return again


# -- maybe applied: the answer lies --------------------------------------------------------------
@pytest.mark.parametrize(
    ("action", "kw"),
    [
        ("applied-then-status", {"status": 500}),
        ("applied-then-status", {"status": 502}),
        ("applied-then-html", {}),
        ("applied-then-close", {}),
    ],
    ids=["500", "502", "200-html", "connection-closed"],
)
def test_applied_but_answered_badly_is_looked_up_not_resent(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
    action: str,
    kw: dict[str, Any],
) -> None:
    # the 2nd and 5th Bundles are applied by the server, the client hears nonsense
    first = fault_proxy.add(action, skip=1, times=1, **kw)
    second = fault_proxy.add(action, skip=4, times=1, **kw)
    result = summary(sync(cli, six))
    assert first.fired == second.fired == 1
    assert result["dead_lettered"] == result["blocked"] == result["undelivered"] == 0
    assert result["created"] == sum(planned.values())
    assert repeated_lookups(fault_proxy), "the uncertain Bundles were not looked up"
    assert_server_holds_exactly(server, planned, f"{action} {kw}")
    assert_all_sent(cli, planned)
    # and the outbox is right: a second sync writes nothing
    again = summary(sync(cli, six))
    assert again["created"] == again["updated"] == again["bundles"] == 0


def test_2xx_entries_without_location_are_resolved_by_look_up(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    fault_proxy.add("strip-location", times=None)  # every Bundle answer, all along
    result = summary(sync(cli, six))
    assert result["undelivered"] == result["dead_lettered"] == 0
    assert_server_holds_exactly(server, planned, "2xx entries without location")
    assert_all_sent(cli, planned)
    # the ids the outbox learned by look-up are the server's
    held = server.held(sorted(planned))
    assert {k: v[0]["id"] for k, v in held.items()} == {
        k: sid for k, (_, sid) in cli.outbox_rows().items()
    }




# -- not applied ---------------------------------------------------------------------------------
def test_503_with_retry_after_is_waited_out(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    fault = fault_proxy.add("unavailable", status=503, retry_after="1", skip=2, times=2)
    started = time.monotonic()
    result = summary(sync(cli, six))
    assert fault.fired == 2
    assert time.monotonic() - started >= 2.0  # Retry-After: 1, twice
    assert result["created"] == sum(planned.values())
    assert result["undelivered"] == 0
    assert repeated_lookups(fault_proxy) == []  # not applied: nothing to look up
    assert_server_holds_exactly(server, planned, "503 with Retry-After, twice")


def test_503_for_as_long_as_it_lasts_is_not_success_and_loses_nothing(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    fault_proxy.add("unavailable", status=503, retry_after="0", skip=3, times=None)
    down = summary(sync(cli, six), 69)
    assert 0 < down["undelivered"] < sum(planned.values())
    assert "HTTP 503" in down["undelivered_reason"]
    assert f"{down['undelivered']} records not delivered" in down_stderr(cli, six)
    held_meanwhile = sum(server.counts(sorted(planned)).values())
    assert held_meanwhile == sum(planned.values()) - down["undelivered"]
    assert server.problems(sorted(planned)) == {}  # what landed is consistent already
    log.info("503 until healed: the server held %d of %d", held_meanwhile, sum(planned.values()))

    fault_proxy.heal()
    up = summary(sync(cli, six))
    assert up["created"] == down["undelivered"]
    assert up["undelivered"] == 0
    assert_server_holds_exactly(server, planned, "503 until healed, then healed")
    assert_all_sent(cli, planned)


def down_stderr(cli: AdapterCli, data: Path) -> str:
    """The stderr of one more sync while the fault lasts (it says what is undelivered)."""
    result = sync(cli, data)
    assert result.code == 69, result
    return result.stderr


def test_refused_connections_then_healed(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    fault_proxy.refuse_connections()
    down = sync(cli, six, "--json")
    assert down.code == 69, down
    assert "cannot connect" in down.stderr
    assert server.counts() == {}
    fault_proxy.heal()
    assert summary(sync(cli, six))["created"] == sum(planned.values())
    assert_server_holds_exactly(server, planned, "connections refused, then healed")


# -- refused -------------------------------------------------------------------------------------
def _patient(value: str) -> Any:
    def pick(entry: dict[str, Any]) -> bool:
        resource = entry.get("resource") or {}
        return resource.get("resourceType") == "Patient" and any(
            i.get("system") == PATIENT and i.get("value") == value
            for i in resource.get("identifier", [])
        )

    return pick


@pytest.mark.parametrize("fault", ["refuse-entry", "corrupt-entry"])
def test_refused_entry_holds_back_its_referrers_until_it_lands(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
    sync_target: SyncTarget,
    fault: str,
) -> None:
    """One Patient refused inside a Bundle: nothing that refers to it is sent, so nothing points
    at an id that never existed; once fixed and retried, everything lands.

    ``refuse-entry``: the proxy answers that entry 400 and forwards the rest (a non-atomic
    server's way). ``corrupt-entry``: the proxy makes the Patient invalid (``birthDate``) and the
    server itself refuses it — Medplum that entry alone, the rest of the Bundle applied; HAPI the
    whole transaction (HAPI-0450), nothing of it applied, so the engine bisects it."""
    fault_proxy.add(fault, entry=_patient("S003"), times=None)
    first = summary(sync(cli, six), 65)
    assert first["dead_lettered"] == 1
    assert first["blocked"] > 10  # its Consent, ResearchSubject, Encounters, Observations, …
    assert first["undelivered"] == 0
    types = sorted(planned)
    assert server.problems(types) == {}
    held = server.held(types)
    assert ("Patient", f"{PATIENT}|S003") not in held
    assert sum(server.counts(types).values()) == sum(planned.values()) - 1 - first["blocked"]
    log.info("Patient S003 refused: %d held back, the server held %d of %d, none dangling",
             first["blocked"], sum(planned.values()) - 1 - first["blocked"], sum(planned.values()))  # fmt: skip
    if sync_target.atomic:  # whole chunks: entries refer to each other by urn:uuid
        assert [b for b in fault_proxy.bundles() if "urn:uuid:" in str(b)]
    else:  # no Bundle ever carried an entry referring to another entry of it
        assert not [b for b in fault_proxy.bundles() if "urn:uuid:" in str(b)]
    if fault == "corrupt-entry":
        pick = _patient("S003")
        refused = [
            e.status
            for e in fault_proxy.requests("POST")
            if e.request.bundle and any(pick(x) for x in e.request.bundle.get("entry", []))
        ]
        # HAPI refuses the transaction as a whole (400); Medplum answers 200, the entry 400
        assert set(refused) == ({400} if sync_target.hapi else {200}), refused

    (letter,) = [line for line in cli.run("dead-letters", "list", "--outbox", str(cli.outbox))
                 .stdout.splitlines()]  # fmt: skip
    assert '"operation":"POST"' in letter
    assert f"{PATIENT}|S003" in letter

    # fixed on the server's side; a plain sync does not resend a refused record by itself
    fault_proxy.heal()
    still = summary(sync(cli, six), 65)
    assert still["dead_letters"] == 1
    assert still["created"] == 0
    retried = cli.run("dead-letters", "retry", "--server", cli.server, "--outbox", str(cli.outbox),
                      env=FAST)  # fmt: skip
    assert retried.code == 0, retried
    assert retried.json["created"] == 1 + first["blocked"]
    assert_server_holds_exactly(server, planned, "refused entry, fixed and retried")
    assert_all_sent(cli, planned)
    assert summary(sync(cli, six))["created"] == 0


# -- look-ups refused ---------------------------------------------------------------------------
def _tag_search(request: ProxyRequest) -> bool:
    return request.method == "GET" and "_tag=" in request.path


def test_refused_look_up_leaves_records_undelivered_never_created(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    """Every ``_tag`` search refused (400), by system (as HAPI does) and by exact keys: what
    the server holds of AdverseEvent and Provenance is unknown, so nothing of them is taken for
    "not held" — the sync exits 69, those records stay pending (what was sent while staging,
    of types whose look-up was answered, landed once); healed, the rest land once each."""
    fault = fault_proxy.add("unavailable", status=400, match=_tag_search, times=None)
    down = summary(sync(cli, six), 69)
    assert fault.fired >= 2  # the system search, then the exact keys
    assert "refused the look-up of AdverseEvent by _tag (HTTP 400)" in down["undelivered_reason"]
    assert down["dead_lettered"] == 0
    assert down["undelivered"] + down["created"] + down["blocked"] == sum(planned.values())
    assert server.counts(["AdverseEvent", "Provenance"]) == {}
    assert sum(server.counts(sorted(planned)).values()) == down["created"]
    fault_proxy.heal()
    up = summary(sync(cli, six))
    assert up["created"] == sum(planned.values()) - down["created"]
    assert_server_holds_exactly(server, planned, "look-ups refused, then healed")
    assert_all_sent(cli, planned)


# -- capabilities --------------------------------------------------------------------------------
# hapi-atomic: atomic transactions configured, but the server offers only batch (or no Bundles
# at all): the adapter falls back to dependency layers
@pytest.mark.parametrize(
    ("offered", "bundle_type"),
    [({"batch"}, "batch"), (set(), None)],
    ids=["batch-only", "no-bundles"],
)
def test_without_transaction_it_uses_batch_or_single_requests(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
    offered: set[str],
    bundle_type: str | None,
) -> None:
    """The CapabilityStatement decides: only ``batch`` offered → batch Bundles; neither →
    one request per resource. (HAPI lists only ``transaction`` though it accepts batches: the
    proxy offers exactly ``offered``, so both servers see the same statement.)"""
    fault_proxy.add("offer-interactions", interactions=frozenset(offered), times=None)
    result = summary(sync(cli, six))
    assert result["created"] == sum(planned.values())
    kinds = {b["type"] for b in fault_proxy.bundles()}
    if bundle_type is None:
        assert kinds == set()
        posts = [e for e in fault_proxy.requests("POST") if e.request.bundle is None]
        assert len(posts) == sum(planned.values())  # one request each, no bisection
    else:
        assert kinds == {bundle_type}
    assert_server_holds_exactly(server, planned, f"server offering {sorted(offered)}")


# -- one writer ----------------------------------------------------------------------------------
def test_two_syncs_at_the_same_moment_send_nothing_twice(
    cli: AdapterCli,
    fault_proxy: FaultProxy,
    server: FhirView,
    six: Path,
    planned: dict[str, int],
) -> None:
    # a slow server (two 503s with Retry-After 1) so that the two runs surely overlap
    fault_proxy.add("unavailable", status=503, retry_after="1", times=2)
    args = cli.sync_args(six, *BUNDLE, "--json")
    runs = [cli.spawn(*args, env=FAST), cli.spawn(*args, env=FAST)]
    outputs = [proc.communicate(timeout=300) for proc in runs]
    assert [proc.returncode for proc in runs] == [0, 0], outputs
    results = [json_of(out) for out, _ in outputs]
    assert sorted(r["created"] for r in results) == [0, sum(planned.values())]
    assert sum("waiting for the outbox" in err for _, err in outputs) == 1, outputs
    assert_server_holds_exactly(server, planned, "two syncs at once")
    assert_all_sent(cli, planned)


def json_of(stdout: str) -> dict[str, Any]:
    import json

    out: dict[str, Any] = json.loads(stdout)
    return out


def test_proxy_forwards_untouched_without_faults(
    fault_proxy: FaultProxy, fault_upstream: str, server: FhirView
) -> None:
    """The proxy itself changes nothing but its own address in the server's URLs."""
    import requests

    direct = requests.get(f"{fault_upstream}/metadata", timeout=30).json()
    proxied = requests.get(f"{fault_proxy.base_url}/metadata", timeout=30).json()
    assert proxied["fhirVersion"] == direct["fhirVersion"]
    assert [e.status for e in fault_proxy.requests()] == [200]
    assert isinstance(fault_proxy.requests()[0].request, ProxyRequest)
    assert server.counts() == {}
