"""``/healthz`` (liveness), ``/readyz`` (outbox writable, FHIR server reachable), ``/metrics``.

The metrics are read from the outbox database at each scrape, so every web worker process
answers the same numbers (no per-process counters to merge) and they survive a restart.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import AdapterError
from fhir_adapter.intake import KINDS
from fhir_adapter.sync.inbox import LATENCY_BUCKETS, Inbox
from fhir_adapter.sync.outbox import Outbox
from server.outcome import json_response
from server.state import AppState, state

bp = Blueprint("ops", __name__)

_READY_CACHE_S = 5.0
_UNSENT = ("pending", "sending", "delete")


@bp.get("/healthz")
def healthz() -> Response:
    return json_response(200, {"status": "ok"})


def _fhir_reachable(st: AppState) -> bool:
    cached = st.readiness.get("fhir")
    if cached is not None and time.monotonic() - cached[0] < _READY_CACHE_S:
        return bool(cached[1])
    settings = st.settings.model_copy(update={"max_attempts": 1, "read_timeout_s": 5.0})
    try:
        with FhirClient(settings) as client:
            client.request_once("GET", "metadata")
        ok = True
    except AdapterError:
        ok = False
    st.readiness["fhir"] = (time.monotonic(), ok)
    return ok


@bp.get("/readyz")
def readyz() -> Response:
    st = state()
    checks = {
        "outbox": "ok" if st.inbox.writable() else "not writable",
        "fhir_server": "ok" if _fhir_reachable(st) else "unreachable",
    }
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        200 if ready else 503, {"status": "ok" if ready else "not ready", **checks}
    )


class DatabaseCollector(Collector):
    """Prometheus metrics read from the outbox database at scrape time."""

    def __init__(self, st: AppState) -> None:
        self.st = st

    def collect(self) -> Iterator[Metric]:
        inbox: Inbox = self.st.inbox
        counters = inbox.counters()
        for name, help_text in (
            ("accepted", "Records accepted by POST /ingest"),
            ("rejected", "Records refused by POST /ingest (422)"),
            ("retracted", "Records retracted by DELETE /ingest"),
        ):
            family = CounterMetricFamily(f"fhir_adapter_records_{name}", help_text, labels=["kind"])
            for kind in KINDS:
                family.add_metric([kind], counters.get(f"{name}:{kind}", 0))
            yield family
        yield CounterMetricFamily(
            "fhir_adapter_notifications",
            "FHIR Subscription notification events queued",
            value=counters.get("notifications", 0),
        )
        yield GaugeMetricFamily(
            "fhir_adapter_notifications_queued",
            "Notification events not handled yet",
            value=inbox.pending_events(),
        )
        by_state = GaugeMetricFamily(
            "fhir_adapter_inbox_records", "Inbox records by state", labels=["state"]
        )
        for name, n in sorted(inbox.states().items()):
            by_state.add_metric([name], n)
        yield by_state
        yield from self._outbox()
        buckets, total, count = inbox.latencies()
        yield HistogramMetricFamily(
            "fhir_adapter_delivery_latency_seconds",
            "Time from the 202 of a record to its resource landing on the FHIR server",
            buckets=[
                *((str(b), c) for b, c in zip(LATENCY_BUCKETS, buckets, strict=True)),
                ("+Inf", count),
            ],
            sum_value=total,
        )

    def _outbox(self) -> Iterator[Metric]:
        with Outbox(self.st.settings.outbox_path) as outbox:
            counts = outbox.counts()
            dead = len(outbox.dead_letters())
        depth = sum(n for states in counts.values() for s, n in states.items() if s in _UNSENT)
        yield GaugeMetricFamily(
            "fhir_adapter_outbox_depth", "Outbox resources still to send", value=depth
        )
        family = GaugeMetricFamily(
            "fhir_adapter_outbox_resources",
            "Outbox resources by type and state",
            labels=["type", "state"],
        )
        for rtype, states in sorted(counts.items()):
            for name, n in sorted(states.items()):
                family.add_metric([rtype, name], n)
        yield family
        yield GaugeMetricFamily(
            "fhir_adapter_dead_letters", "Resources the FHIR server rejected", value=dead
        )


def metrics_registry(st: AppState) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(st))
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    st = state()
    registry = st.readiness.get("registry")
    if registry is None:
        registry = st.readiness["registry"] = metrics_registry(st)
    return Response(
        generate_latest(registry),
        mimetype=CONTENT_TYPE_LATEST.split(";")[0],
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )
