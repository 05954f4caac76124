"""Commands that talk to a FHIR server: sync, reconcile, outbox, dead-letters, test-server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from fhir_adapter.cli.base import (
    AppContext,
    cli,
    echo_err,
    pass_app,
    progress_callback,
    server_url,
    user_errors,
)
from fhir_adapter.cli.fhir import mapping_context
from fhir_adapter.client import FhirClient
from fhir_adapter.errors import ConfigurationError, ExitCode
from fhir_adapter.intake import Intake, site_today
from fhir_adapter.jsonout import dumps
from fhir_adapter.mapping.context import FhirVersion, Target
from fhir_adapter.settings import Settings
from fhir_adapter.sync import SyncResult, source_label, sync_directory
from fhir_adapter.sync.engine import Sender, SendSummary
from fhir_adapter.sync.outbox import Outbox
from fhir_adapter.sync.reconcile import reconcile


def server_options(f: Any) -> Any:
    """--server, --outbox, --fhir-version and --auth (every command that talks to a server)."""
    f = click.option(
        "--server",
        default=None,
        callback=server_url,
        help="FHIR base URL (default: FHIR_ADAPTER_FHIR_BASE_URL).",
    )(f)
    f = click.option(
        "--outbox",
        type=click.Path(path_type=Path),
        default=None,
        help="Outbox SQLite file (default: FHIR_ADAPTER_OUTBOX_PATH).",
    )(f)
    f = click.option(
        "--fhir-version",
        type=click.Choice(["R4", "R5"]),
        default=None,
        help="FHIR version (default: FHIR_ADAPTER_FHIR_VERSION, R4).",
    )(f)
    return click.option(
        "--auth",
        type=click.Choice(["none", "bearer", "smart"]),
        default=None,
        help="Authentication (default: FHIR_ADAPTER_FHIR_AUTH); secrets come "
        "from the environment only.",
    )(f)


def server_settings(
    app: AppContext,  # the Settings of the environment, with the command's options applied
    server: str | None,
    auth: str | None,
    outbox: Path | None,
    fhir_version: str | None,
) -> Settings:
    update: dict[str, Any] = {}
    if server:
        update["fhir_base_url"] = server
    if auth:
        update["fhir_auth"] = auth
    if outbox:
        update["outbox_path"] = outbox
    if fhir_version:
        update["fhir_version"] = fhir_version
    return app.settings.model_copy(update=update)


def _sender(settings: Settings, outbox: Outbox, client: FhirClient) -> Sender:
    return Sender(
        client,
        outbox,
        fhir_version=settings.fhir_version,
        bundle_size=settings.bundle_size,
        identity=settings.identity_strategy,
    )


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@server_options
@click.option(
    "--target",
    type=click.Choice(["registry", "hospital"]),
    default="registry",
    show_default=True,
    help="hospital: with birth date and MRN.",
)
@click.option("--bundle-size", type=click.IntRange(1, 5000), default=None)
@click.option("--dry-run", is_flag=True, help="Show what would be sent; change nothing.")
@click.option(
    "--allow-removals",
    is_flag=True,
    help="Stage the removals of a file even when it would remove more than "
    "FHIR_ADAPTER_MAX_REMOVAL_SHARE of its records (or all of them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@pass_app
def sync(
    app: AppContext,
    directory: Path,
    server: str | None,
    outbox: Path | None,
    fhir_version: str | None,
    auth: str | None,
    target: Target,
    bundle_size: int | None,
    dry_run: bool,
    allow_removals: bool,
    as_json: bool,
) -> None:
    """Bring a FHIR server in step with a directory of source files, exactly once in effect.

    Only new or changed resources are sent; a second run of unchanged data sends nothing.
    Each file present is the complete set for its kind: records removed from it become
    entered-in-error (Observation, Encounter, Consent) or are deleted — but a file that would
    remove more than FHIR_ADAPTER_MAX_REMOVAL_SHARE of its records removes none without
    --allow-removals. Exit 0 all landed or unchanged; 65 rows rejected, records dead-lettered
    or held back, or removals refused; 66 unreadable input or configuration; 69 records still
    undelivered (server unavailable, answers uncertain) or the outbox busy.
    """
    settings = server_settings(app, server, auth, outbox, fhir_version)
    if bundle_size:
        settings = settings.model_copy(update={"bundle_size": bundle_size})
    with user_errors():
        version: FhirVersion = settings.fhir_version
        ctx = mapping_context(app, version, target)
        intake = Intake(trial=app.trial, today=site_today(app.timezone), on_issue=echo_err)
        with FhirClient(settings) as client, progress_callback("sending") as on_progress:
            result = sync_directory(
                directory,
                ctx=ctx,
                intake=intake,
                client=client,
                outbox_path=settings.outbox_path,
                bundle_size=settings.bundle_size,
                identity=settings.identity_strategy,
                dry_run=dry_run,
                allow_removals=allow_removals,
                threshold=app.threshold(None),
                on_progress=on_progress,
            )
        summary = result.as_dict()
        if as_json:
            click.echo(dumps(summary))
        else:
            for key, value in summary.items():
                if key == "removed":
                    for item in value:
                        echo_err(f"removed: {item}")
                    continue
                if isinstance(value, dict):
                    for k, v in sorted(value.items()):
                        click.echo(f"would send {k}: {v}")
                    continue
                click.echo(f"{key}: {value if not isinstance(value, list) else len(value)}")
    sys.exit(int(_sync_status(result, settings.max_removal_share)))


def _sync_status(result: SyncResult, share: float) -> ExitCode:
    """Say on stderr what is not done, and the exit status: 66 unreadable, 65 refused or held
    back (also when some records are additionally undelivered), 69 undelivered, 0 done."""
    for refused in result.refused_removals:
        why = (
            "all of them: the file yields none"
            if refused.would_remove >= refused.held
            else f"more than {share:.0%}"
        )
        echo_err(
            f"error: {source_label(refused.source)} would remove {refused.would_remove} of the "
            f"{refused.held} records the outbox holds from it ({why}): none of its removals "
            "were staged, everything else was synced; check the file, or run again with "
            "--allow-removals"
        )
    status = ExitCode.OK
    send = result.send
    if send is not None:
        status = _send_status(send)
    if result.rejected_rows or result.refused_removals:
        status = ExitCode.DATA_ERROR
    if result.unreadable:
        status = ExitCode.INPUT_UNREADABLE
    return status


def _send_status(send: SendSummary) -> ExitCode:
    if send.blocked:
        echo_err(
            f"{send.blocked} records held back: they refer to records not on the server yet "
            "(refused: `fhir-adapter dead-letters list`; or still undelivered); they are sent "
            "once those land"
        )
    if send.dead_letters:
        echo_err(
            f"{send.dead_letters} records refused by the server (dead letters): "
            "`fhir-adapter dead-letters list` shows why; correct the source and sync again, "
            "`dead-letters retry`, or acknowledge one with `dead-letters drop ID`"
        )
    if send.undelivered:
        echo_err(
            f"error: {send.undelivered} records not delivered yet: {send.undelivered_reason}; "
            "nothing is lost: run sync again when the server answers"
        )
    if send.blocked or send.dead_letters:
        return ExitCode.DATA_ERROR
    if send.undelivered:
        return ExitCode.SERVER_UNAVAILABLE
    return ExitCode.OK


@cli.command("reconcile")
@server_options
@click.option("--repair", is_flag=True, help="Re-send what is missing, differs or dangles.")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def reconcile_command(
    app: AppContext,
    server: str | None,
    outbox: Path | None,
    fhir_version: str | None,
    auth: str | None,
    repair: bool,
    as_json: bool,
) -> None:
    """Compare the outbox with what the server holds: missing, extra, differing, duplicated
    resources and dangling references. Exit 65 when something is found (without --repair)."""
    settings = server_settings(app, server, auth, outbox, fhir_version)
    with user_errors():
        _require_outbox(settings.outbox_path)
        with Outbox(settings.outbox_path) as box, FhirClient(settings) as client:
            if repair:
                with box.writer_lock(settings.lock_timeout_s):
                    report = reconcile(_sender(settings, box, client), box, repair=True)
            else:
                report = reconcile(_sender(settings, box, client), box)
        if as_json:
            click.echo(dumps(report.as_dict()))
        else:
            for kind in ("missing", "extra", "differing", "duplicated", "dangling"):
                items = getattr(report, kind)
                click.echo(f"{kind}: {len(items)}")
                for item in items[:50]:
                    click.echo(f"  {item}")
            if repair:
                click.echo(f"repaired: {report.repaired}")
    if report.send is not None:
        sys.exit(int(_send_status(report.send)))
    if not report.clean and not repair:
        sys.exit(int(ExitCode.DATA_ERROR))


def _require_outbox(path: Path) -> None:
    if not path.exists():
        raise ConfigurationError(f"no outbox at {path} (set --outbox or FHIR_ADAPTER_OUTBOX_PATH)")


@cli.group()
def outbox() -> None:
    """The durable outbox."""


@outbox.command("status")
@click.option("--outbox", "path", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_app
def outbox_status(app: AppContext, path: Path | None, as_json: bool) -> None:
    """Counts of outbox rows by type and state (pending, sending, sent, dead, tombstone…)."""
    with user_errors():
        target = path or app.settings.outbox_path
        if not target.exists():
            click.echo(f"no outbox at {target}")
            return
        with Outbox(target, read_only=True) as box:
            counts = box.counts()
            if as_json:
                click.echo(dumps({"server": box.get_meta("server"), "counts": counts}))
                return
            click.echo(f"outbox {target} (server {box.get_meta('server')})")
            for rtype, states in counts.items():
                click.echo(
                    f"  {rtype:<16}" + "  ".join(f"{s} {n}" for s, n in sorted(states.items()))
                )


@cli.group("dead-letters")
def dead_letters() -> None:
    """Resources the server rejected, with its OperationOutcome."""


@dead_letters.command("list")
@click.option("--outbox", "path", type=click.Path(path_type=Path), default=None)
@pass_app
def dead_letters_list(app: AppContext, path: Path | None) -> None:
    """One JSON line per dead letter: id, type, key, refused operation, HTTP status, message,
    the server's OperationOutcome."""
    target = path or app.settings.outbox_path
    if not target.exists():  # read-only: never create an outbox
        echo_err(f"no outbox at {target}")
        return
    with user_errors(), Outbox(target, read_only=True) as box:
        for letter in box.dead_letters():
            click.echo(dumps(letter))


@dead_letters.command("retry")
@server_options
@pass_app
def dead_letters_retry(
    app: AppContext,
    server: str | None,
    outbox: Path | None,
    fhir_version: str | None,
    auth: str | None,
) -> None:
    """Queue the dead letters again, each with the operation the server refused, and send
    them (and what was held back for them)."""
    settings = server_settings(app, server, auth, outbox, fhir_version)
    with user_errors():
        _require_outbox(settings.outbox_path)
        with (
            Outbox(settings.outbox_path) as box,
            box.writer_lock(settings.lock_timeout_s),
            FhirClient(settings) as client,
        ):
            n = box.retry_dead()
            summary = _sender(settings, box, client).run()
        click.echo(dumps({"requeued": n, **summary.as_dict()}))
    sys.exit(int(_send_status(summary)))


@dead_letters.command("drop")
@click.argument("letter_ids", metavar="ID...", type=int, nargs=-1, required=True)
@click.option("--outbox", "path", type=click.Path(path_type=Path), default=None)
@pass_app
def dead_letters_drop(app: AppContext, letter_ids: tuple[int, ...], path: Path | None) -> None:
    """Acknowledge dead letters (ids from `dead-letters list`): they are no longer sent or
    counted. A refused deletion is then left as it is on the server."""
    target = path or app.settings.outbox_path
    with user_errors():
        _require_outbox(target)
        with Outbox(target) as box, box.writer_lock(app.settings.lock_timeout_s):
            known = {letter["id"] for letter in box.dead_letters()}
            unknown = [i for i in letter_ids if i not in known]
            if unknown:
                raise click.BadParameter(
                    f"no dead letter {', '.join(map(str, unknown))} in {target} "
                    "(see `fhir-adapter dead-letters list`)",
                    param_hint="ID",
                )
            for letter_id in letter_ids:
                dropped = box.drop_dead_letter(letter_id)
                if dropped is not None:
                    click.echo(
                        f"dropped {letter_id}: {dropped['resourceType']} {dropped['key']} "
                        f"({dropped['operation'] or 'write'} refused with HTTP {dropped['status']})"
                    )


@cli.command("test-server")
@click.option("--port", type=int, default=8103, show_default=True)
def test_server(port: int) -> None:
    """Run the local in-memory FHIR R4 test server (Medplum engine) until Ctrl-C."""
    from fhir_adapter.testserver import main as run_server

    sys.exit(run_server(["--port", str(port)]))
