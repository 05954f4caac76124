"""What the blueprints share: settings, trial, mapping context, per-thread inbox connections."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

from flask import current_app

from fhir_adapter.intake import KINDS
from fhir_adapter.mapping.context import MappingContext
from fhir_adapter.settings import Settings
from fhir_adapter.sync.inbox import Inbox, ThreadInboxes
from fhir_adapter.trial import Trial

EXTENSION = "fhir_adapter"


@dataclass
class AppState:
    settings: Settings
    ctx: MappingContext
    threshold: Decimal
    inboxes: ThreadInboxes
    readiness: dict[str, Any] = field(default_factory=dict)
    _fields: dict[str, frozenset[str]] = field(default_factory=dict)

    def known_fields(self, kind: str) -> frozenset[str]:
        """The fields of ``kind``'s CSV file (computed once, not per request)."""
        known = self._fields.get(kind)
        if known is None:
            known = self._fields[kind] = frozenset(KINDS[kind].columns(self.trial))
        return known

    @property
    def trial(self) -> Trial:
        return self.ctx.trial

    @property
    def inbox(self) -> Inbox:
        return self.inboxes.get()


def state() -> AppState:
    return cast(AppState, current_app.extensions[EXTENSION])
