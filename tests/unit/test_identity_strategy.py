"""Identity strategy per resource type, from the CapabilityStatement (SPEC §7)."""

from __future__ import annotations

import pytest

from fhir_adapter.client import Capabilities
from fhir_adapter.errors import ConfigurationError
from fhir_adapter.sync.engine import choose_strategy


def caps(**types: tuple[set[str], bool]) -> Capabilities:
    result = Capabilities("4.0.1")
    for rtype, (params, update_create) in types.items():
        result.search_params[rtype] = frozenset(params)
        result.update_create[rtype] = update_create
    return result


def test_identifier_where_supported_else_tag_else_client_ids() -> None:
    c = caps(
        Observation=({"identifier", "_tag"}, False),
        AdverseEvent=({"_tag"}, False),  # standard R4: no identifier search for AdverseEvent
        Provenance=({"identifier", "_tag"}, False),  # Provenance has no identifier element
        Basic=(set(), True),
    )
    assert choose_strategy(c, "Observation", "auto") == "identifier"
    assert choose_strategy(c, "AdverseEvent", "auto") == "tag"
    assert choose_strategy(c, "Provenance", "auto") == "tag"
    assert choose_strategy(c, "Basic", "auto") == "client-id"


def test_settings_can_force_a_strategy() -> None:
    c = caps(Observation=({"identifier", "_tag"}, True))
    assert choose_strategy(c, "Observation", "tag") == "tag"
    assert choose_strategy(c, "Observation", "client-id") == "client-id"


def test_no_way_to_find_resources_again_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no identifier or _tag search"):
        choose_strategy(caps(Observation=(set(), False)), "Observation", "auto")
