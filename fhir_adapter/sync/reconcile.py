"""`reconcile`: compare the outbox with what the server holds (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fhir_adapter.sync.engine import Sender
from fhir_adapter.sync.outbox import Outbox


@dataclass
class ReconcileReport:
    missing: list[str] = field(default_factory=list)  # landed per the outbox, absent on the server
    extra: list[str] = field(
        default_factory=list
    )  # on the server, unknown to (or removed in) the outbox
    differing: list[str] = field(
        default_factory=list
    )  # server version differs from the recorded one
    duplicated: list[str] = field(default_factory=list)  # one business key, several resources
    repaired: int = 0

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.differing or self.duplicated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing,
            "extra": self.extra,
            "differing": self.differing,
            "duplicated": self.duplicated,
            "repaired": self.repaired,
        }


def reconcile(sender: Sender, outbox: Outbox, *, repair: bool = False) -> ReconcileReport:
    report = ReconcileReport()
    sender.client.check_version(sender.fhir_version)
    for rtype in sorted(outbox.types()):
        rows = {r.bkey: r for r in outbox.sent_rows(rtype)}
        systems = sorted({k.split("|", 1)[0] for k in rows} | _tombstone_systems(outbox, rtype))
        held: dict[str, list[tuple[str, str | None]]] = {}
        for system in systems:
            for bkey, server_id, version in sender.server_index(rtype, system):
                held.setdefault(bkey, []).append((server_id, version))
        for bkey, row in sorted(rows.items()):
            label = f"{rtype} {bkey}"
            found = held.get(bkey)
            if row.state != "sent":
                continue
            if not found:
                report.missing.append(label)
                if repair:
                    outbox.mark_pending(row, forget_server=True)
                    _requeue_referrers(outbox, rtype, row.local_id)
                    report.repaired += 1
                continue
            if len(found) > 1:
                report.duplicated.append(label)
            server_id, version = found[0]
            if server_id != row.server_id or (
                version and row.version_id and version != row.version_id
            ):
                report.differing.append(label)
                if repair:
                    outbox.mark_pending(row)
                    outbox.db.execute(
                        "UPDATE resources SET server_id = ?, version_id = NULL "
                        "WHERE rtype = ? AND bkey = ?",
                        (server_id, rtype, bkey),
                    )
                    if server_id != row.server_id:
                        _requeue_referrers(outbox, rtype, row.local_id)
                    report.repaired += 1
        report.extra.extend(f"{rtype} {k}" for k in sorted(held.keys() - rows.keys()))
    if repair and report.repaired:
        sender.run()
    return report


def _requeue_referrers(outbox: Outbox, rtype: str, local_id: str) -> None:
    """Queue again the landed resources that refer to ``rtype/local_id``.

    The repaired resource gets a new server id (a re-created resource cannot keep its old one
    on a server without update-as-create), so the references to it that were sent earlier point
    at nothing; re-sent, they are rewritten to the new id (bodies keep local references).
    """
    outbox.db.execute(
        "UPDATE resources SET state = 'pending' WHERE state = 'sent' "
        "AND instr(CAST(body AS TEXT), ?) > 0",
        (f'"reference":"{rtype}/{local_id}"',),
    )


def _tombstone_systems(outbox: Outbox, rtype: str) -> set[str]:
    return {
        str(r[0]).split("|", 1)[0]
        for r in outbox.db.execute(
            "SELECT bkey FROM resources WHERE rtype = ? AND state = 'tombstone'", (rtype,)
        )
    }
