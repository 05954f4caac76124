"""The delivery worker: inbox records -> mapping -> outbox -> FHIR server (SPEC §8).

One worker per outbox (a second one refuses to start). Each cycle, when the inbox changed:

1. the live inbox records are mapped by the library's mapper exactly like a directory of files
   (same intake rules, same scoring: consensus, improvement and the PGA-implied grade come from
   *all* inbox rater rows of a subject x visit, and a baseline change re-derives every visit of
   the subject), and staged into the outbox under ``webhook:<kind>`` sources. The inbox is the
   complete set of what the EHR sent: a retracted record's resources are retracted
   (entered-in-error) or deleted by the outbox's removal rules; a ``sync DIR`` never removes
   them, since its sources are the files';
2. records whose participant has not arrived wait in the inbox (state ``waiting``) and are
   mapped once it has;
3. the sync engine sends what changed (exactly-once rules, under the outbox's one-writer lock,
   taken for the send only: ingest never waits for it), then each inbox row learns whether its
   resource landed.

Queued FHIR Subscription notifications are handled in the same cycle (:mod:`.notify`).
An unreachable server leaves everything in the inbox and the outbox; the next cycles retry.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import (
    AdapterError,
    ConfigurationError,
    OutboxBusy,
    ServerError,
    ServerRejected,
    ServerUnavailable,
)
from fhir_adapter.intake import KINDS, Intake, site_today
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.settings import Settings
from fhir_adapter.sync import stage_directory
from fhir_adapter.sync.engine import Sender
from fhir_adapter.sync.inbox import PRIMARY_TYPE, Inbox, InboxRow
from fhir_adapter.sync.notify import NOTIFY_SOURCE, Recomputer
from fhir_adapter.sync.outbox import Outbox
from fhir_adapter.trial import load_trial

log = logging.getLogger(__name__)

WEBHOOK_SOURCE = "webhook:"
LOCK_WAIT_S = 1.0  # a sync holding the outbox: try again next cycle (ingest never waits)


@dataclass
class CycleReport:
    mapped: int = 0
    waiting: int = 0
    rejected: int = 0
    delivered: int = 0
    notifications: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    unavailable: bool = False
    conflicts_reread: bool = False  # changed on the server: re-read, to re-derive next cycle

    @property
    def worked(self) -> bool:
        """Something happened: look for more at once rather than sleeping."""
        writes = sum(self.sent.get(k, 0) for k in ("created", "updated", "deletes_sent"))
        return bool(self.mapped or self.notifications or writes or self.conflicts_reread)


class WorkerBusy(ConfigurationError):
    """Another delivery worker serves this outbox."""


class LockBusy(Exception):
    """The lock is held by another process."""


@contextmanager
def _flock(path: Path, *, wait_s: float | None) -> Iterator[IO[str]]:
    """An exclusive advisory lock on ``path`` (released when the process dies, even by SIGKILL).

    Raises :class:`LockBusy` when it is still held after ``wait_s`` seconds (None: at once).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+", encoding="utf-8")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is None or time.monotonic() >= deadline:
                fh.close()
                raise LockBusy(str(path)) from None
            time.sleep(0.05)
    try:
        yield fh
    finally:
        fh.close()


def worker_lock_path(outbox_path: Path) -> Path:
    return outbox_path.with_name(outbox_path.name + ".delivery.lock")


class DeliveryWorker:
    """Maps the inbox and drains the outbox to one FHIR server."""

    def __init__(
        self,
        settings: Settings,
        ctx: MappingContext,
        *,
        threshold: Decimal,
        client: FhirClient | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.threshold = threshold
        self.client = client or FhirClient(settings)
        self.inbox = Inbox(settings.outbox_path)
        self.outbox = Outbox(settings.outbox_path)
        self._mapped_seq = -1  # the inbox change counter of the last mapping
        self._remap = False  # map again although the inbox did not change (conflicts re-read)
        self._retry_at = 0.0
        self._outcomes: list[tuple[InboxRow, str]] = []  # of the last mapping, to settle
        self.recomputer = Recomputer(self)

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()
        self.client.close()

    # -- one cycle -------------------------------------------------------------------------
    def cycle(self) -> CycleReport:
        """Map what changed, handle notifications, send; never raises for a server outage."""
        report = CycleReport()
        changed = self._remap or self.inbox.last_seq() != self._mapped_seq
        events = self.inbox.pending_events()
        idle = not self._unsettled and not self.outbox.to_send()
        if not changed and not events and (idle or time.monotonic() < self._retry_at):
            return report
        try:
            with self.outbox.writer_lock(LOCK_WAIT_S):
                self.outbox.bind_server(self.client.base_url)
                seq = self.inbox.last_seq()
                if changed:
                    self._remap = False
                    self._outcomes = self._map(self.inbox.rows(), report)
                if events:
                    report.notifications = self.recomputer.handle_events()
                self._send(report)
                self._settle(self._outcomes, report)
                self._mapped_seq = seq if changed else self._mapped_seq
        except ServerUnavailable as exc:
            self._unavailable(report, f"HTTP {exc.status}" if exc.status else "no answer")
        except OutboxBusy:
            log.info("the outbox is being written by another sender (a sync); retrying")
        except ServerError as exc:
            self._unavailable(report, f"HTTP {exc.status} reading from the server")
        return report

    def _unavailable(self, report: CycleReport, why: str) -> None:
        report.unavailable = True
        self._retry_at = time.monotonic() + self.settings.delivery_retry_s
        log.warning(
            "FHIR server unavailable (%s); retrying in %ss", why, self.settings.delivery_retry_s
        )

    def _map(self, rows: list[InboxRow], report: CycleReport) -> list[tuple[InboxRow, str]]:
        """Stage the live inbox records; returns (row, provisional outcome) per row."""
        participants = {r.subject for r in rows if r.kind == "participants" and not r.retracted}
        feed: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        fed: dict[str, list[InboxRow]] = {kind: [] for kind in KINDS}
        outcomes: list[tuple[InboxRow, str]] = []
        for row in rows:
            if row.retracted:
                outcomes.append((row, "retracted"))
            elif row.kind != "participants" and row.subject not in participants:
                outcomes.append((row, "waiting"))
                report.waiting += 1
            else:
                feed[row.kind].append(row.record)
                fed[row.kind].append(row)
        intake = Intake(
            trial=self.ctx.trial, today=site_today(self.ctx.timezone), settings=self.settings
        )
        stage, mapper = stage_directory(
            self.outbox,
            self.ctx,
            intake,
            Path(),
            threshold=self.threshold,
            records=feed,
            source_prefix=WEBHOOK_SOURCE,
            # each retraction is an explicit DELETE of the EHR: the mass-removal guard of
            # `sync DIR` (a file that lost rows by mistake) does not apply
            allow_removals=True,
            strict=self.settings.strict_validation,
        )
        rejected: dict[tuple[str, int], str] = {}
        for issue in intake.issues:
            if issue.severity != "error" or issue.line is None:
                continue
            kind = issue.file.removeprefix("inbox/")
            where = (kind, issue.line)
            text = f"{issue.field}: {issue.reason}" if issue.field else issue.reason
            rejected[where] = f"{rejected[where]}; {text}" if where in rejected else text
        for kind, kind_rows in fed.items():
            for index, row in enumerate(kind_rows):
                reason = rejected.get((kind, index))
                outcomes.append((row, f"rejected:{reason}" if reason else "mapped"))
                report.rejected += reason is not None
        report.mapped = len(rows)
        log.info(
            "inbox mapped: %d records (%d waiting, %d rejected); outbox: %d new, %d changed, "
            "%d retracted, %d deleted",
            len(rows),
            report.waiting,
            report.rejected,
            stage.new,
            stage.changed,
            stage.retracted,
            stage.deleted,
        )
        del mapper
        return outcomes

    def _send(self, report: CycleReport) -> None:
        if not self.outbox.to_send():
            return
        started = time.monotonic()
        sender = Sender(
            self.client,
            self.outbox,
            fhir_version=self.ctx.fhir_version,
            bundle_size=self.settings.bundle_size,
            identity=self.settings.identity_strategy,
            defer_conflicts=True,
        )
        summary = sender.run()
        if summary.conflicts:
            self._reread_conflicts(report)
        report.sent = {k: v for k, v in summary.as_dict().items() if isinstance(v, int) and v}
        if summary.undelivered_reason is not None:
            self._unavailable(report, f"{summary.undelivered} resources undelivered")
        elif not report.worked:  # only held-back rows left: do not ask the server every cycle
            self._retry_at = time.monotonic() + self.settings.delivery_retry_s
        log.info(
            "delivered in %.2fs: %s",
            time.monotonic() - started,
            ", ".join(f"{k} {v}" for k, v in report.sent.items()) or "nothing",
        )

    def _reread_conflicts(self, report: CycleReport) -> None:
        """Resources changed on the server since the outbox saw them (409/412 to an If-Match):
        re-read each (its current version adopted), then re-derive — the inbox's subjects by
        mapping the inbox again, the others by a recompute from the server's ratings — so that
        what is sent next replaces the version it has seen. Never a blind overwrite."""
        subjects: set[str] = set()
        for row in self.outbox.conflicts():
            assert row.server_id is not None  # noqa: S101 - a conflict answers a PUT by id
            try:
                current = self.client.read(row.rtype, row.server_id)
            except ServerRejected as exc:
                if exc.status not in (404, 410):
                    raise
                # deleted on the server meanwhile: created again from the source
                self.outbox.mark_pending(row, forget_server=True)
                continue
            self.outbox.adopt(
                row.rtype,
                row.bkey,
                row.local_id,
                dumpb(current),
                str(current["id"]),
                (current.get("meta") or {}).get("versionId"),
                row.source,
            )
            log.info("%s %s changed on the server: re-read, re-derived", row.rtype, row.server_id)
            if row.source.startswith(NOTIFY_SOURCE):
                subjects.add(row.source.removeprefix(NOTIFY_SOURCE))
        self._remap = True  # map the inbox again: its content replaces the re-read copies
        if subjects:
            self.inbox.add_events(("subject", subject, None) for subject in sorted(subjects))
        report.conflicts_reread = True

    @property
    def _unsettled(self) -> bool:
        return any(state == "mapped" or state == "retracted" for _, state in self._outcomes)

    def _settle(self, outcomes: list[tuple[InboxRow, str]], report: CycleReport) -> None:
        """Each row's state from what the outbox now says about its primary resource; rows
        still on their way are settled again after the next send."""
        final: list[tuple[InboxRow, str, str | None]] = []
        still: list[tuple[InboxRow, str]] = []
        for row, outcome in outcomes:
            if outcome.startswith("rejected:"):
                final.append((row, "rejected", outcome.removeprefix("rejected:")))
                continue
            if outcome == "waiting":
                final.append((row, "waiting", "waits for its participant"))
                continue
            rtype = PRIMARY_TYPE[row.kind]
            held = self.outbox.row(rtype, f"{self.ctx.system(rtype)}|{row.ident}")
            if outcome == "retracted":
                gone = (
                    held is None
                    or held.state == "tombstone"
                    or (held.retracted and held.state == "sent")
                )
                final.append((row, "retracted" if gone else "pending", None))
                if not gone:
                    still.append((row, outcome))
            elif held is not None and held.state == "sent" and held.sent_hash == held.hash:
                final.append((row, "delivered", None))
                report.delivered += 1
            elif held is not None and held.state == "dead":
                final.append((row, "dead", "rejected by the FHIR server (see dead-letters)"))
            else:
                final.append((row, "pending", None))
                still.append((row, outcome))
        self.inbox.settle(final)
        self._outcomes = still

    # -- the loop --------------------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> None:
        """Cycle until ``should_stop()``; sleeps between cycles when there was nothing to do."""
        while not should_stop():
            try:
                report = self.cycle()
            except AdapterError as exc:
                log.error("delivery stopped: %s", exc)
                raise
            if not report.worked:
                time.sleep(self.settings.delivery_interval_s)


@contextmanager
def single_worker(outbox_path: Path) -> Iterator[None]:
    """Refuse a second delivery worker on the same outbox."""
    try:
        lock = _flock(worker_lock_path(outbox_path), wait_s=None)
        lock.__enter__()
    except LockBusy:
        raise WorkerBusy(
            f"another delivery worker is already running on the outbox {outbox_path}"
        ) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def webhook_context(settings: Settings) -> tuple[MappingContext, Decimal]:
    """The mapping context and adjudication threshold of records pushed to the webhook."""
    trial = load_trial(settings.mappings_dir)
    ctx = MappingContext(
        trial=trial,
        terminology=Terminology(trial, settings.mappings_dir),
        identifier_base=settings.identifier_base,
        fhir_version=settings.fhir_version,
        target=settings.webhook_target,
        mrn_system=settings.mrn_system,
        timezone=settings.site_timezone or trial.study.timezone,
    )
    threshold = settings.adjudication_threshold
    return ctx, trial.adjudication_threshold if threshold is None else threshold


__all__ = [
    "CycleReport",
    "DeliveryWorker",
    "LockBusy",
    "WorkerBusy",
    "single_worker",
    "webhook_context",
]
