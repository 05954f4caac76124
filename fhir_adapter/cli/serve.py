"""The webhook commands (SPEC §8, §13): ``serve``, ``worker``, ``subscribe``.

``serve --bind HOST:PORT`` runs the Flask app under gunicorn (worker processes, threads and
limits from Settings) and, unless ``--no-worker``, the delivery worker in a process of its own,
so one command receives and delivers. ``worker`` runs the delivery worker alone.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from fhir_adapter.cli.base import AppContext, cli, echo_err, pass_app, server_url, user_errors
from fhir_adapter.cli.sync import server_options, server_settings
from fhir_adapter.client import FhirClient
from fhir_adapter.errors import ConfigurationError, ServerError
from fhir_adapter.jsonout import dumps
from fhir_adapter.settings import Settings

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005  # the GIL hand-over interval of the web workers (default 0.005)
_BIND = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def parse_bind(bind: str) -> tuple[str, int]:
    match = _BIND.match(bind.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigurationError(f"--bind must be HOST:PORT (e.g. 127.0.0.1:8080), not {bind!r}")
    return match.group(1), int(match.group(2))


def require_credentials(settings: Settings) -> None:
    """The webhook never runs open: a secret or a token must be configured."""
    if not (settings.webhook_secret or settings.webhook_token or settings.webhook_standard_secret):
        raise ConfigurationError(
            "refusing to serve without authentication: set FHIR_ADAPTER_WEBHOOK_SECRET "
            "(HMAC), FHIR_ADAPTER_WEBHOOK_STANDARD_SECRET (Standard Webhooks, whsec_…) or "
            "FHIR_ADAPTER_WEBHOOK_TOKEN (bearer)"
        )


# -- the delivery worker ---------------------------------------------------------------------
def run_delivery(settings: Settings, parent_pid: int | None = None) -> int:
    """The delivery worker's loop until SIGTERM/SIGINT (or until its parent ``serve`` dies)."""
    from fhir_adapter.sync.delivery import DeliveryWorker, single_worker, webhook_context

    stop = {"now": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx, threshold = webhook_context(settings)
    with single_worker(settings.outbox_path):
        worker = DeliveryWorker(settings, ctx, threshold=threshold)
        log.info("delivery worker started (outbox %s)", settings.outbox_path)
        try:
            worker.run(
                lambda: stop["now"] or (parent_pid is not None and os.getppid() != parent_pid)
            )
        finally:
            worker.close()
    log.info("delivery worker stopped")
    return 0


# -- serve -----------------------------------------------------------------------------------
def gunicorn_app(
    settings: Settings,
    host: str,
    port: int,
    on_exit: Any,
    factory: Callable[[Settings], Flask] | None = None,
) -> Any:
    """The gunicorn application ``serve`` runs (``factory`` defaults to the webhook's
    ``create_app``; the benchmark passes a bare app to run it under the very same options)."""
    from gunicorn.app.base import BaseApplication  # type: ignore[import-untyped]

    from server import create_app

    make_app = factory or create_app

    options = {
        "bind": f"{host}:{port}",
        "workers": settings.webhook_workers,
        "worker_class": "gthread",
        "threads": settings.webhook_threads,
        "timeout": int(settings.webhook_timeout_s),
        "graceful_timeout": int(settings.webhook_timeout_s),
        "keepalive": 5,
        "limit_request_line": 4094,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "fhir-adapter-serve",
        "when_ready": lambda server: echo_err(f"serving on http://{host}:{port}"),
        "on_exit": lambda server: on_exit(),
    }

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25: no ~/.gunicorn
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            # A web worker's inbox commit is one writer at a time: the thread holding the write
            # lock must get the GIL back promptly after each SQLite call, not after the default
            # 5 ms another (validating) thread may keep it (+25-30 % ingest in-process, 4 threads).
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            app = make_app(settings)
            inner = app.wsgi_app

            def terminated(environ: dict[str, Any], start_response: Any) -> Any:
                # gunicorn ends a chunked body itself: let Werkzeug read it (up to the size
                # limit, then 413) instead of seeing an empty body
                environ.setdefault("wsgi.input_terminated", True)
                return inner(environ, start_response)

            app.wsgi_app = terminated  # type: ignore[method-assign]
            return app

    return Application()


def _start_delivery(settings: Settings) -> subprocess.Popen[bytes]:
    """``fhir-adapter worker`` beside the web workers, on the same server and outbox."""
    argv = [
        sys.executable,
        "-m",
        "fhir_adapter",
        "--log-level",
        logging.getLevelName(logging.getLogger("fhir_adapter").getEffectiveLevel()),
        "worker",
        "--server",
        settings.fhir_base_url,
        "--outbox",
        str(settings.outbox_path),
        "--fhir-version",
        settings.fhir_version,
        "--auth",
        settings.fhir_auth,
        "--parent-pid",
        str(os.getpid()),
    ]
    return subprocess.Popen(argv)  # noqa: S603 - our own interpreter and arguments


@cli.command()
@click.option("--bind", default=None, help="HOST:PORT (default: FHIR_ADAPTER_WEBHOOK_BIND).")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Web worker processes (default: FHIR_ADAPTER_WEBHOOK_WORKERS, 2).",
)
@click.option(
    "--no-worker",
    is_flag=True,
    help="Receive only: run `fhir-adapter worker` elsewhere to deliver.",
)
@server_options
@pass_app
def serve(
    app: AppContext,
    bind: str | None,
    workers: int | None,
    no_worker: bool,
    server: str | None,
    outbox: Path | None,
    fhir_version: str | None,
    auth: str | None,
) -> None:
    """Run the webhook (POST /ingest/<kind>, /fhir/notify, /healthz, /readyz, /metrics,
    /openapi.json) under gunicorn, and the delivery worker beside it.

    Refuses to start without FHIR_ADAPTER_WEBHOOK_SECRET, _STANDARD_SECRET or _TOKEN.
    """
    settings = server_settings(app, server, auth, outbox, fhir_version)
    if workers:
        settings = settings.model_copy(update={"webhook_workers": workers})
    with user_errors():
        require_credentials(settings)
        host, port = parse_bind(bind or settings.webhook_bind)
        app.trial  # noqa: B018 - a broken trial definition fails here, not in every worker
        delivery = None if no_worker else _start_delivery(settings)
        serve_pid = os.getpid()

        def stop_delivery() -> None:
            # gunicorn's forked web workers unwind through here too: only the master stops it
            if os.getpid() != serve_pid or delivery is None or delivery.poll() is not None:
                return
            delivery.terminate()
            try:
                delivery.wait(timeout=settings.webhook_timeout_s)
            except subprocess.TimeoutExpired:
                delivery.kill()

        try:
            gunicorn_app(settings, host, port, stop_delivery).run()
        finally:
            stop_delivery()


@cli.command()
@server_options
@click.option("--parent-pid", type=int, default=None, hidden=True)
@pass_app
def worker(
    app: AppContext,
    server: str | None,
    outbox: Path | None,
    fhir_version: str | None,
    auth: str | None,
    parent_pid: int | None,
) -> None:
    """Run the delivery worker alone: map the inbox, send the outbox, follow notifications.

    One per outbox (a second one refuses to start). Stops on SIGTERM or Ctrl-C.
    """
    settings = server_settings(app, server, auth, outbox, fhir_version)
    with user_errors():
        sys.exit(run_delivery(settings, parent_pid))


# -- subscribe -------------------------------------------------------------------------------
SUBSCRIPTION_REASON = "fhir-adapter: follow rater MASI Observations to keep the consensus right"
_WAIT_POLL_S = 0.25


def default_criteria(trial_system: str) -> str:
    """Every MASI Observation of the trial: rater and consensus alike.

    The handler tells the raters apart (business identifier and ``performer``) and ignores the
    consensus, so the wider criteria cost one ignored notification per consensus write. The
    narrower ``&performer:missing=false`` is not used: HAPI FHIR (8.8.0) cannot match it in
    memory, and its database matcher fails on it (HAPI-2223, retried without end), so nothing
    would ever be delivered.
    """
    return f"Observation?code={trial_system}|masi"


def subscription_resource(
    settings: Settings, endpoint: str, criteria: str, payload: str
) -> dict[str, Any]:
    token = settings.webhook_token
    if token is None:
        raise ConfigurationError(
            "FHIR_ADAPTER_WEBHOOK_TOKEN is not set: the Subscription needs the bearer token "
            "the webhook accepts (sent by the FHIR server in channel.header)"
        )
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "header": [f"Authorization: Bearer {token.get_secret_value()}"],
    }
    if payload != "none":
        channel["payload"] = "application/fhir+json"
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": SUBSCRIPTION_REASON,
        "criteria": criteria,
        "channel": channel,
    }


def _ours(subscription: dict[str, Any], endpoint: str) -> bool:
    """A Subscription this command made for ``endpoint`` (whatever its criteria)."""
    channel = subscription.get("channel") or {}
    return channel.get("endpoint") == endpoint and subscription.get("reason") == (
        SUBSCRIPTION_REASON
    )


def wait_until_active(client: FhirClient, subscription_id: str, timeout: float) -> str:
    """The Subscription's status once the server has activated it (HAPI does so a few seconds
    after the write, and notifies nothing before); ``ConfigurationError`` if it ends in
    ``error``/``off`` or is still ``requested`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = client.read("Subscription", subscription_id)
        status = str(held.get("status") or "")
        if status == "active":
            return status
        if status in ("error", "off"):
            reason = str(held.get("error") or "no reason given")[:300]
            raise ConfigurationError(
                f"the server set Subscription/{subscription_id} to {status!r}: {reason}"
            )
        if time.monotonic() >= deadline:
            raise ConfigurationError(
                f"Subscription/{subscription_id} is still {status or 'without a status'!r} "
                f"after {timeout:g} s: the server has not activated it (are rest-hook "
                "Subscriptions enabled on it?)"
            )
        time.sleep(_WAIT_POLL_S)


@cli.command()
@click.option(
    "--server",
    default=None,
    callback=server_url,
    help="FHIR base URL (default: FHIR_ADAPTER_FHIR_BASE_URL).",
)
@click.option(
    "--endpoint", required=True, help="URL of this adapter's /fhir/notify, as the server sees it."
)
@click.option(
    "--criteria",
    default=None,
    help="Search criteria (default: MASI Observations of the trial code system).",
)
@click.option(
    "--payload",
    type=click.Choice(["full", "none"]),
    default="full",
    show_default=True,
    help="full: the resource in the notification; none: an empty notification (query back).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server to make the Subscription active (0: do not wait).",
)
@pass_app
def subscribe(
    app: AppContext,
    server: str | None,
    endpoint: str,
    criteria: str | None,
    payload: str,
    wait_s: float,
) -> None:
    """Create (or update) the R4 rest-hook Subscription that tells the adapter when a rater's
    MASI Observation changes on the FHIR server, and wait until the server has activated it.
    Prints its id and status."""
    settings = server_settings(app, server, None, None, None)
    with user_errors():
        from fhir_adapter.sync.delivery import webhook_context

        ctx, _ = webhook_context(settings)
        criteria = criteria or default_criteria(ctx.terminology.trial_system)
        resource = subscription_resource(settings, endpoint, criteria, payload)
        with FhirClient(settings) as client:
            # this command's Subscription for the endpoint is updated, even when its criteria
            # were other ones (an upgrade replaces them instead of adding a second one)
            found = client.search_all("Subscription", {"url": endpoint})
            existing = [s for s in found if _ours(s, endpoint)]
            try:
                if existing:
                    resource["id"] = existing[0]["id"]
                    if existing[0].get("status") == "active":  # an update does not re-activate
                        resource["status"] = "active"
                    _, answer = client.request(
                        "PUT", f"Subscription/{resource['id']}", body=resource
                    )
                    action = "updated"
                else:
                    _, answer = client.request_once("POST", "Subscription", body=resource)
                    action = "created"
            except ServerError as exc:
                raise ConfigurationError(f"the server refused the Subscription: {exc}") from None
            subscription_id = str((answer or {}).get("id") or resource.get("id"))
            status = str((answer or {}).get("status") or resource["status"])
            if wait_s > 0:
                status = wait_until_active(client, subscription_id, wait_s)
        click.echo(
            dumps(
                {
                    "subscription": f"Subscription/{subscription_id}",
                    "action": action,
                    "status": status,
                    "criteria": criteria,
                    "endpoint": endpoint,
                }
            )
        )
