"""Sync: the adapter against the local Medplum-engine server, a fresh server per measurement.

- ``sync_fraction_of_raw_bundles``: the first sync of the 1x set in this process (the sync as
  a library call: mapping, validation, outbox, sending), its transaction bodies recorded by a
  response hook on the adapter's own Session; then the same bodies POSTed in the same order to
  a fresh server by a bare ``requests.Session``, each server id of an earlier answer replaced
  by the id the fresh server gave (as the adapter did). limit time / adapter time; the replay
  is void when one entry's status differs from the adapter's run.
- ``sync_ratio_vs_fhirpy``: adapter resources/s / fhirpy ``save()`` per resource (the first
  resources of the set in dependency order, references rewritten to the server's ids).
- ``sync_ratio_vs_put_at_20ms``: both through :class:`LatencyProxy` (20 ms per round trip):
  the adapter's first sync vs one conditional ``PUT Type?_tag=system|code`` per resource.
- ``resync_fraction``: ``fhir-adapter sync`` as a subprocess, unchanged data, second / first
  wall time (whole process) on the 10x set.
- ``sync_rss_growth``: peak RSS of the ``sync`` process at 100x (quick: 10x) / at 1x.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import orjson
import requests

from benchmarks.common import Bench, adapter_command, run_measured, timed
from benchmarks.latency_proxy import LatencyProxy
from fhir_adapter.client import FhirClient
from fhir_adapter.intake import Intake, site_today
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.settings import Settings
from fhir_adapter.sync import sync_directory
from fhir_adapter.testserver import SERVER_DIR, FhirTestServer
from fhir_adapter.trial import load_trial

FHIR_JSON = "application/fhir+json"
LATENCY_S = 0.020
# ``Type/id`` where a server id can stand: a reference, a PUT url, a fullUrl, a location
_TYPED_ID = re.compile(rb"\b([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})")
_LOCAL_REFERENCE = re.compile(rb'"reference":"([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})"')

Recorded = list[tuple[bytes, list[str], list[str]]]  # (request body, statuses, locations)


def run(bench: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {"sync_server": _server_version()}
    one = bench.data(1)
    first = _first_sync_in_process(bench, one)
    out.update(first.figures())
    out.update(_replay(bench, first))
    subset = 1000 if bench.quick else 2000
    out.update(_vs_fhirpy(bench, one, first, subset))
    out.update(_vs_put_at_latency(bench, one, subset))
    out.update(_whole_process(bench))
    return out


def _server_version() -> str:
    package = orjson.loads((SERVER_DIR / "package.json").read_bytes())
    return (
        f"Medplum engine (@medplum/fhir-router {package['dependencies']['@medplum/fhir-router']})"
    )


# -- the adapter, in this process ----------------------------------------------------------------
def _settings(base_url: str, outbox: Path) -> Settings:
    return Settings(fhir_base_url=base_url, outbox_path=outbox)


def _sync_in_process(
    directory: Path, base_url: str, outbox: Path
) -> tuple[float, int, Any, Recorded]:
    """One sync as ``fhir-adapter sync`` does it (library call): seconds, resources, result,
    and every transaction the client POSTed with the statuses and locations of its answer."""
    settings = _settings(base_url, outbox)
    trial = load_trial(settings.mappings_dir)
    timezone = settings.site_timezone or trial.study.timezone
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial, settings.mappings_dir),
        identifier_base=settings.identifier_base,
        fhir_version=settings.fhir_version,
        target="registry",
        mrn_system=settings.mrn_system,
        timezone=timezone,
    )
    intake = Intake(trial=trial, today=site_today(timezone))
    recorded: Recorded = []
    answers: list[bytes] = []  # kept as bytes: the hook runs inside the timed sync

    def record(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        if request.method == "POST" and isinstance(request.body, bytes):
            recorded.append((request.body, [], []))
            answers.append(response.content)

    with FhirClient(settings) as client:
        client.session.hooks["response"].append(record)
        with timed() as seconds:
            result = sync_directory(
                directory,
                ctx=ctx,
                intake=intake,
                client=client,
                outbox_path=outbox,
                bundle_size=settings.bundle_size,
                threshold=trial.adjudication_threshold,
            )
    for index, ((body, _, _), answer) in enumerate(zip(recorded, answers, strict=True)):
        recorded[index] = (body, *_statuses(orjson.loads(answer)))
    sent = result.send.created + result.send.updated if result.send else 0
    return seconds[0], sent, result, recorded


def _statuses(answer: dict[str, Any]) -> tuple[list[str], list[str]]:
    entries = [e.get("response", {}) for e in answer.get("entry", [])]
    return [str(r.get("status", ""))[:3] for r in entries], [
        str(r.get("location", "")) for r in entries
    ]


class FirstSync:
    def __init__(self, seconds: float, resources: int, recorded: Recorded) -> None:
        self.seconds = seconds
        self.resources = resources
        self.recorded = recorded

    @property
    def rate(self) -> float:
        return self.resources / self.seconds

    def figures(self) -> dict[str, Any]:
        return {
            "sync_first_1x_seconds": round(self.seconds, 3),
            "sync_first_1x_resources": self.resources,
            "sync_first_1x_resources_per_s": round(self.rate, 1),
            "sync_first_1x_bundles": len(self.recorded),
        }


def _first_sync_in_process(bench: Bench, directory: Path) -> FirstSync:
    work = bench.scratch("sync-first")
    shutil.rmtree(work, ignore_errors=True)
    with FhirTestServer() as server:
        seconds, resources, result, recorded = _sync_in_process(
            directory, server.base_url, work / "ob.sqlite"
        )
    if result.send is None or result.send.undelivered or result.send.dead_letters:
        raise RuntimeError(f"the first sync did not land everything: {result.as_dict()}")
    bench.say(
        f"first sync 1x: {resources} resources in {seconds:.2f} s ({resources / seconds:.0f}/s)"
    )
    return FirstSync(seconds, resources, recorded)


# -- (a) the server-bound limit: the same bodies, a bare Session ---------------------------------
def _replay(bench: Bench, first: FirstSync) -> dict[str, Any]:
    """POST the recorded bodies again, in order, to a fresh server; ids substituted."""
    with FhirTestServer() as server:
        session = requests.Session()
        session.headers.update({"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        ids: dict[bytes, bytes] = {}  # b"Type/old id" -> b"Type/new id"
        mismatches = 0

        def substitute(match: re.Match[bytes]) -> bytes:
            return ids.get(match.group(0), match.group(0))

        answers: list[tuple[list[str], list[str]]] = []
        with timed() as seconds:
            for body, _statuses_then, locations_then in first.recorded:
                sent = _TYPED_ID.sub(substitute, body) if ids else body
                answer = session.post(server.base_url, data=sent, timeout=300)
                statuses, locations = _statuses(orjson.loads(answer.content))
                answers.append((statuses, locations))
                for then, now in zip(locations_then, locations, strict=True):
                    old, new = _typed_id(then), _typed_id(now)
                    if old and new:
                        ids[old] = new
        for (_, statuses_then, _), (statuses, _) in zip(first.recorded, answers, strict=True):
            mismatches += sum(a != b for a, b in zip(statuses_then, statuses, strict=True))
        session.close()
    limit = seconds[0]
    void = mismatches > 0
    bench.say(
        f"replay of {len(first.recorded)} bundles: {limit:.2f} s"
        + (f" — VOID: {mismatches} entry statuses differ" if void else "")
    )
    return {
        "sync_fraction_of_raw_bundles": None if void else round(limit / first.seconds, 3),
        "sync_raw_bundles_seconds": round(limit, 3),
        "sync_raw_bundles_resources_per_s": round(first.resources / limit, 1),
        "sync_replay_status_mismatches": mismatches,
    }


def _typed_id(location: str) -> bytes | None:
    """``Type/id`` of an entry's ``location`` (``Type/id/_history/v``, maybe absolute)."""
    parts = location.split("?")[0].split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or not parts[-1]:
        return None
    return f"{parts[-2]}/{parts[-1]}".encode()


# -- (c) fhirpy save() per resource --------------------------------------------------------------
def _resources(directory: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` resources of the set as the adapter maps them (dependency order:
    every resource one of them refers to comes before it), as JSON values."""
    settings = Settings()
    trial = load_trial(None)
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial, None),
        identifier_base=settings.identifier_base,
        fhir_version="R4",
        target="registry",
        mrn_system=settings.mrn_system,
        timezone=trial.study.timezone,
    )
    mapper = DatasetMapper(ctx, Intake(trial=trial, today=site_today(trial.study.timezone)))
    out: list[dict[str, Any]] = []
    for resource in mapper.resources(directory):
        out.append(orjson.loads(dumpb(resource)))
        if len(out) == limit:
            break
    return out


def _rewritten(resource: dict[str, Any], server_ids: dict[str, str]) -> bytes:
    """The resource's local references (``Type/local id``) rewritten to the server's ids."""

    def rewrite(match: re.Match[bytes]) -> bytes:
        target = match.group(1).decode()
        found = server_ids.get(target)
        if found is None:
            raise RuntimeError(f"{target} is not on the server yet")
        return b'"reference":"' + found.encode() + b'"'

    return _LOCAL_REFERENCE.sub(rewrite, orjson.dumps(resource))


def _vs_fhirpy(bench: Bench, directory: Path, first: FirstSync, subset: int) -> dict[str, Any]:
    from fhirpy import SyncFHIRClient

    resources = _resources(directory, subset)
    with FhirTestServer() as server:
        client = SyncFHIRClient(server.base_url)
        server_ids: dict[str, str] = {}
        with timed() as seconds:
            for resource in resources:
                body = orjson.loads(_rewritten(resource, server_ids))
                local = f"{body['resourceType']}/{body.pop('id')}"
                saved = client.resource(body.pop("resourceType"), **body)
                saved.save()
                server_ids[local] = f"{saved.resource_type}/{saved.id}"
    rate = len(resources) / seconds[0]
    bench.say(f"fhirpy save(): {len(resources)} resources in {seconds[0]:.2f} s ({rate:.0f}/s)")
    return {
        "sync_ratio_vs_fhirpy": round(first.rate / rate, 3),
        "sync_fhirpy_resources": len(resources),
        "sync_fhirpy_resources_per_s": round(rate, 1),
    }


# -- (b) one conditional PUT per resource, 20 ms per round trip ----------------------------------
def _vs_put_at_latency(bench: Bench, directory: Path, subset: int) -> dict[str, Any]:
    work = bench.scratch("sync-latency")
    shutil.rmtree(work, ignore_errors=True)
    with FhirTestServer() as server, LatencyProxy(server.base_url, LATENCY_S) as proxy:
        adapter_s, adapter_n, _, _ = _sync_in_process(directory, proxy.base_url, work / "ob.sqlite")
        adapter_trips = proxy.round_trips
    adapter_rate = adapter_n / adapter_s
    resources = _resources(directory, subset)
    with FhirTestServer() as server, LatencyProxy(server.base_url, LATENCY_S) as proxy:
        session = requests.Session()
        session.headers.update({"Content-Type": FHIR_JSON, "Accept": FHIR_JSON})
        with timed() as seconds:
            _put_each(session, proxy.base_url, resources)
        session.close()
    put_rate = len(resources) / seconds[0]
    bench.say(
        f"at {LATENCY_S * 1000:.0f} ms: adapter {adapter_rate:.0f}/s ({adapter_trips} round trips),"
        f" conditional PUT {put_rate:.0f}/s"
    )
    return {
        "sync_ratio_vs_put_at_20ms": round(adapter_rate / put_rate, 3),
        "sync_at_20ms_adapter_resources_per_s": round(adapter_rate, 1),
        "sync_at_20ms_adapter_round_trips": adapter_trips,
        "sync_at_20ms_put_resources": len(resources),
        "sync_at_20ms_put_resources_per_s": round(put_rate, 1),
    }


def _put_each(session: requests.Session, base: str, resources: list[dict[str, Any]]) -> None:
    """``PUT Type?_tag=system|code`` per resource, references rewritten to the answers' ids."""
    server_ids: dict[str, str] = {}
    for resource in resources:
        body = orjson.loads(_rewritten(resource, server_ids))
        local = f"{body['resourceType']}/{body.pop('id')}"
        tag = body["meta"]["tag"][0]
        answer = session.put(
            f"{base}/{body['resourceType']}",
            params={"_tag": f"{tag['system']}|{tag['code']}"},
            data=orjson.dumps(body),
            timeout=60,
        )
        answer.raise_for_status()
        server_id = _typed_id(answer.headers.get("Location") or "")
        if server_id is None:
            server_id = f"{body['resourceType']}/{orjson.loads(answer.content)['id']}".encode()
        server_ids[local] = server_id.decode()


# -- the whole process: re-sync and memory -------------------------------------------------------
def _cli_sync(directory: Path, base_url: str, outbox: Path) -> tuple[float, int, dict[str, Any]]:
    seconds, rss, result = run_measured(
        adapter_command(
            "sync", str(directory), "--server", base_url, "--outbox", str(outbox), "--json"
        )
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"fhir-adapter sync exited {result.returncode}: {result.stderr.decode()[-2000:]}"
        )
    return seconds, rss, dict(orjson.loads(result.stdout))


def _whole_process(bench: Bench) -> dict[str, Any]:
    big = 10 if bench.quick else 100
    out: dict[str, Any] = {"rss_growth_scale": big}
    rss: dict[int, int] = {}
    for scale in sorted({1, 10, big}):
        directory = bench.data(scale)
        work = bench.scratch(f"sync-cli-{scale}x")
        shutil.rmtree(work, ignore_errors=True)
        with FhirTestServer() as server:
            first_s, rss[scale], summary = _cli_sync(directory, server.base_url, work / "ob.sqlite")
            again_s, again_rss, again = _cli_sync(directory, server.base_url, work / "ob.sqlite")
        if again["created"] or again["updated"] or again["new"] or again["changed"]:
            raise RuntimeError(f"the unchanged re-sync sent something: {again}")
        n = summary["created"]
        bench.say(
            f"sync {scale}x (process): {n} resources in {first_s:.2f} s, peak RSS "
            f"{rss[scale] / 1024:.0f} MiB; unchanged re-sync {again_s:.2f} s "
            f"({again_rss / 1024:.0f} MiB)"
        )
        out |= {
            f"sync_process_{scale}x_resources": n,
            f"sync_process_{scale}x_seconds": round(first_s, 3),
            f"sync_process_{scale}x_peak_rss_kib": rss[scale],
            f"resync_process_{scale}x_seconds": round(again_s, 3),
            f"resync_process_{scale}x_peak_rss_kib": again_rss,
            f"resync_process_{scale}x_inputs_unchanged": again.get("inputs_unchanged"),
        }
        if scale == 10:
            out["resync_fraction"] = round(again_s / first_s, 4)
    out["sync_rss_growth"] = round(rss[big] / rss[1], 3)
    if 10 in rss and big != 10:
        out["sync_rss_growth_1x_to_10x"] = round(rss[10] / rss[1], 3)
    return out
