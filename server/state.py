"""What the blueprints share: settings, trial, mapping context, per-thread inbox connections."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

from flask import current_app

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

    @property
    def trial(self) -> Trial:
        return self.ctx.trial

    @property
    def inbox(self) -> Inbox:
        return self.inboxes.get()


def state() -> AppState:
    return cast(AppState, current_app.extensions[EXTENSION])
