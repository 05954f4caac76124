"""Durable, exactly-once-in-effect sync of the trial data to a FHIR server (SPEC §7)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapter.client import FhirClient
from fhir_adapter.intake import KINDS, Intake, file_name
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.mapping.dataset import DatasetMapper
from fhir_adapter.mapping.validation import ResourceValidator
from fhir_adapter.settings import Settings
from fhir_adapter.sync.engine import Sender, SendSummary
from fhir_adapter.sync.fingerprint import input_fingerprint
from fhir_adapter.sync.outbox import Outbox, RefusedRemoval, StageResult, content_hash


@dataclass
class SyncResult:
    stage: StageResult
    send: SendSummary | None
    rejected_rows: int
    unreadable: list[str]
    removed: list[tuple[str, str]] = field(default_factory=list)
    plan: dict[str, int] | None = None
    #: staging was skipped: the inputs and the outbox are as the last clean sync left them
    inputs_unchanged: bool = False

    @property
    def refused_removals(self) -> list[RefusedRemoval]:
        return self.stage.refused_removals

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "new": self.stage.new,
            "changed": self.stage.changed,
            "unchanged": self.stage.unchanged,
            "retracted": self.stage.retracted,
            "deleted": self.stage.deleted,
            "removed": [f"{t} {k}" for t, k in self.removed],
            "refused_removals": [
                {"file": source_label(r.source), "would_remove": r.would_remove, "held": r.held}
                for r in self.refused_removals
            ],
            "rejected_rows": self.rejected_rows,
            "unreadable": self.unreadable,
            "inputs_unchanged": self.inputs_unchanged,
        }
        if self.send is not None:
            out.update(self.send.as_dict())
        if self.plan is not None:
            out["would_send"] = self.plan
        return out


def source_label(source: str) -> str:
    """The file a source kind stands for (``masi`` -> ``masi.csv``)."""
    if source in KINDS:
        return file_name(source)
    if source == "shared":
        return "visits and raters (shared by every file)"
    return source


def _staged_items(
    mapper: DatasetMapper, directory: Path, validator: ResourceValidator, proven: set[str]
) -> Iterator[tuple[str, Resource, bytes]]:
    """Validated resources with their canonical bytes.

    A resource whose exact bytes already landed on the server was proven valid when it was
    first sent: only new or changed content pays for the validation (as ``map`` does it:
    strict validates each one whole).
    """
    for source, resource in mapper.sourced(directory):
        body = dumpb(resource)
        if content_hash(body) not in proven:
            validator.check(resource)
        yield source, resource, body


def stage_directory(
    outbox: Outbox,
    ctx: MappingContext,
    intake: Intake,
    directory: Path,
    *,
    allow_removals: bool = False,
    max_removal_share: float = 0.2,
    strict: bool = False,
    **mapper_kw: Any,
) -> tuple[StageResult, DatasetMapper]:
    mapper, items = _mapped(outbox, ctx, intake, directory, strict, mapper_kw)
    result = outbox.stage(
        items,
        mapper.complete_sources,
        ctx.fhir_version,
        allow_removals=allow_removals,
        max_removal_share=max_removal_share,
    )
    return result, mapper


def _mapped(
    outbox: Outbox,
    ctx: MappingContext,
    intake: Intake,
    directory: Path,
    strict: bool,
    mapper_kw: dict[str, Any],
) -> tuple[DatasetMapper, Iterator[tuple[str, Resource, bytes]]]:
    mapper = DatasetMapper(ctx, intake, **mapper_kw)
    validator = ResourceValidator(ctx.terminology, ctx.fhir_version, strict=strict)
    return mapper, _staged_items(mapper, directory, validator, outbox.landed_hashes())


def _stage_and_send(
    outbox: Outbox,
    sender: Sender,
    ctx: MappingContext,
    intake: Intake,
    directory: Path,
    *,
    allow_removals: bool,
    max_removal_share: float,
    strict: bool,
    **mapper_kw: Any,
) -> tuple[StageResult, SendSummary, DatasetMapper]:
    """Stage, then send; or — when the outbox has nothing else to send (a first sync, a
    settled outbox) and Bundles need not be atomic — send while staging
    (:meth:`Outbox.stage_in_batches`, :meth:`Sender.run`)."""
    if sender.atomic or not outbox.nothing_to_send():
        stage, mapper = stage_directory(
            outbox,
            ctx,
            intake,
            directory,
            allow_removals=allow_removals,
            max_removal_share=max_removal_share,
            strict=strict,
            **mapper_kw,
        )
        return stage, sender.run(), mapper
    mapper, items = _mapped(outbox, ctx, intake, directory, strict, mapper_kw)
    stage = StageResult()
    batches = outbox.stage_in_batches(
        items,
        mapper.complete_sources,
        stage,
        ctx.fhir_version,
        allow_removals=allow_removals,
        max_removal_share=max_removal_share,
    )
    return stage, sender.run(staged=batches), mapper


def sync_directory(
    directory: Path,
    *,
    ctx: MappingContext,
    intake: Intake,
    client: FhirClient,
    outbox_path: Path,
    bundle_size: int,
    identity: str = "auto",
    dry_run: bool = False,
    allow_removals: bool = False,
    on_progress: Callable[[int], None] | None = None,
    **mapper_kw: Any,
) -> SyncResult:
    """Stage a directory into the outbox and send what changed. ``dry_run`` touches nothing.

    The whole run (staging and sending) holds the outbox's writer lock: a second sync waits up
    to ``FHIR_ADAPTER_LOCK_TIMEOUT_S`` for it."""
    settings = client.settings
    stage_kw: dict[str, Any] = {
        "allow_removals": allow_removals,
        "max_removal_share": settings.max_removal_share,
        "strict": settings.strict_validation,
    }
    if dry_run:
        return _dry_run(
            directory, ctx=ctx, intake=intake, outbox_path=outbox_path, **stage_kw, **mapper_kw
        )
    options = {**stage_kw, **mapper_kw, "intake": (intake.settings or Settings()).model_dump_json()}
    fingerprint = input_fingerprint(directory, ctx=ctx, settings=settings, options=options)
    today = intake.today.isoformat() if intake.today else ""
    with Outbox(outbox_path) as outbox, outbox.writer_lock(settings.lock_timeout_s):
        outbox.bind_server(client.base_url)
        skipped = None if fingerprint is None else outbox.unchanged_stage(fingerprint, today)
        sender = Sender(
            client,
            outbox,
            fhir_version=ctx.fhir_version,
            bundle_size=bundle_size,
            identity=identity,
            on_progress=on_progress,
        )
        if skipped is not None:
            # staging these very inputs again would change nothing (fingerprint.py)
            stage, unreadable = StageResult(unchanged=skipped), []
            send = sender.run()
        else:
            outbox.forget_clean_stage()
            stage, send, mapper = _stage_and_send(
                outbox, sender, ctx, intake, directory, **stage_kw, **mapper_kw
            )
            unreadable = mapper.unreadable
        clean = not (intake.issues or intake.rejected or unreadable or stage.refused_removals)
        # the files read while staging must be the ones fingerprinted (none changed meanwhile)
        unchanged = fingerprint == input_fingerprint(
            directory, ctx=ctx, settings=settings, options=options
        )
        if fingerprint is not None and clean and unchanged and outbox.settled():
            staged = stage.new + stage.changed + stage.unchanged
            outbox.record_clean_stage(fingerprint, today, staged)
    result = SyncResult(stage, send, intake.rejected, unreadable, list(stage.removed_keys))
    result.inputs_unchanged = skipped is not None
    return result


def _dry_run(
    directory: Path, *, ctx: MappingContext, intake: Intake, outbox_path: Path, **kw: Any
) -> SyncResult:
    """Stage into a copy of the outbox (or an empty one): the real outbox is not touched, and
    not created when it does not exist."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "outbox.sqlite"
        if outbox_path.exists():
            Outbox.copy(outbox_path, copy)
        with Outbox(copy) as outbox:
            stage, mapper = stage_directory(outbox, ctx, intake, directory, **kw)
            plan: dict[str, int] = {}
            for row in outbox.to_send():
                action = (
                    "delete"
                    if row.state == "delete"
                    else "update"
                    if row.server_id
                    else "create or match"
                )
                plan[f"{row.rtype} {action}"] = plan.get(f"{row.rtype} {action}", 0) + 1
    return SyncResult(
        stage, None, intake.rejected, mapper.unreadable, list(stage.removed_keys), plan
    )


__all__ = ["SyncResult", "source_label", "stage_directory", "sync_directory"]
