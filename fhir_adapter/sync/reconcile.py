"""`reconcile`: compare the outbox with what the server holds (SPEC §7).

One paged search per type and identifier system (the sync's own look-up) gives every resource
the server holds under the trial's business identifiers. Where the server refuses a search by
system alone (HAPI, for ``_tag``), the look-up asks for the outbox's own keys, so resources the
outbox never knew cannot be reported as *extra* for those types. Reported: resources the outbox
says landed but the server lacks (*missing*), resources the server holds that the outbox does
not know or removed (*extra*), another id or version than recorded (*differing*), one business
key held more than once (*duplicated*), and references in those resources to nothing on the
server (*dangling*). ``--repair`` queues the missing, differing and dangling ones again and
sends them; the outbox is only changed through its own methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_adapter.errors import ServerRejected
from fhir_adapter.sync.engine import LOCAL_REFERENCE, Held, Sender, SendSummary
from fhir_adapter.sync.outbox import Outbox, Row


@dataclass
class ReconcileReport:
    missing: list[str] = field(default_factory=list)  # landed per the outbox, absent on the server
    extra: list[str] = field(default_factory=list)  # on the server, unknown to the outbox
    differing: list[str] = field(default_factory=list)  # another id or version than recorded
    duplicated: list[str] = field(default_factory=list)  # one business key, several resources
    dangling: list[str] = field(default_factory=list)  # "Type key -> Type/id" held by nothing
    repaired: int = 0  # resources queued again by --repair
    send: SendSummary | None = None
    requeued: set[tuple[str, str]] = field(default_factory=set, repr=False)

    def queued(self, keys: list[tuple[str, str]]) -> None:
        new = set(keys) - self.requeued
        self.requeued |= new
        self.repaired += len(new)

    @property
    def clean(self) -> bool:
        return not (
            self.missing or self.extra or self.differing or self.duplicated or self.dangling
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "missing": self.missing,
            "extra": self.extra,
            "differing": self.differing,
            "duplicated": self.duplicated,
            "dangling": self.dangling,
            "repaired": self.repaired,
        }
        if self.send is not None:
            out["sent"] = self.send.as_dict()
        return out


@dataclass
class _Server:
    """What the look-ups found: per type, business key -> held resources; every id seen."""

    held: dict[str, dict[str, list[Held]]] = field(default_factory=dict)
    ids: set[str] = field(default_factory=set)  # "Type/id"


def reconcile(sender: Sender, outbox: Outbox, *, repair: bool = False) -> ReconcileReport:
    report = ReconcileReport()
    sender.client.check_version(sender.fhir_version)
    server = _Server()
    rows_by_type: dict[str, dict[str, Row]] = {}
    for rtype in sorted(outbox.types()):
        rows = {r.bkey: r for r in outbox.sent_rows(rtype)}
        rows_by_type[rtype] = rows
        held = sender.look_up(rtype, [*rows, *outbox.tombstone_keys(rtype)])
        server.held[rtype] = held
        server.ids |= {f"{rtype}/{h.server_id}" for hits in held.values() for h in hits}
        _compare(report, outbox, rtype, rows, held, repair=repair)
        report.extra.extend(f"{rtype} {k}" for k in sorted(held.keys() - rows.keys()))
    _dangling(report, sender, outbox, server, rows_by_type, repair=repair)
    if repair and report.repaired:
        report.send = sender.run()
    return report


def _compare(
    report: ReconcileReport,
    outbox: Outbox,
    rtype: str,
    rows: dict[str, Row],
    held: dict[str, list[Held]],
    *,
    repair: bool,
) -> None:
    for bkey, row in sorted(rows.items()):
        if row.state != "sent":
            continue
        label = f"{rtype} {bkey}"
        found = held.get(bkey)
        if not found:
            report.missing.append(label)
            if repair:
                outbox.mark_pending(row, forget_server=True)
                report.queued([(rtype, bkey), *outbox.requeue_referrers(rtype, row.local_id)])
            continue
        if len(found) > 1:
            report.duplicated.append(label)
        first = found[0]
        if first.server_id != row.server_id or (
            first.version and row.version_id and first.version != row.version_id
        ):
            report.differing.append(label)
            if repair:
                moved = first.server_id != row.server_id
                outbox.set_server(row, first.server_id, None)
                referrers = outbox.requeue_referrers(rtype, row.local_id) if moved else []
                report.queued([(rtype, bkey), *referrers])


def _dangling(
    report: ReconcileReport,
    sender: Sender,
    outbox: Outbox,
    server: _Server,
    rows_by_type: dict[str, dict[str, Row]],
    *,
    repair: bool,
) -> None:
    """References in the trial's resources on the server to resources the server lacks.

    A target outside the searched systems is read once before it is called dangling."""
    checked: dict[str, bool] = {}
    for rtype, held in sorted(server.held.items()):
        for bkey, hits in sorted(held.items()):
            for hit in hits:
                gone = [r for r in hit.references if not _resolves(r, sender, server, checked)]
                if not gone:
                    continue
                report.dangling.extend(f"{rtype} {bkey} -> {r}" for r in gone)
                row = rows_by_type.get(rtype, {}).get(bkey)
                if repair and row is not None and (rtype, bkey) not in report.requeued:
                    outbox.requeue(row)  # re-sent with the references the outbox holds now
                    report.queued([(rtype, bkey)])


def _resolves(reference: str, sender: Sender, server: _Server, checked: dict[str, bool]) -> bool:
    if reference in server.ids or reference.startswith("#"):
        return True
    match = LOCAL_REFERENCE.match(reference)
    if match is None:  # urn:uuid:…, a conditional reference, an absolute URL: nothing to read
        return reference.startswith(("http://", "https://"))
    if reference not in checked:
        try:
            sender.client.read(match.group(1), match.group(2))
            checked[reference] = True
        except ServerRejected:  # 404 / 410
            checked[reference] = False
    return checked[reference]
