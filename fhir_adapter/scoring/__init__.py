"""Exact scoring (SPEC §4): pure functions on domain records, Decimal only, no I/O.

Each rule carries a version string (:data:`RULE_VERSIONS`); it goes into the Provenance of every
derived FHIR resource, so a change of rule is visible in the data it produced.
"""

from fhir_adapter.scoring.adverse_events import AeSummaryRow, summarize_adverse_events
from fhir_adapter.scoring.masi import (
    Consensus,
    ConsensusMethod,
    RaterScore,
    ScoreStatus,
    VisitScore,
    consensus,
    improvement_pct,
    pga_discordant,
    pga_from_improvement,
    rater_masi,
    rater_mmasi,
    rater_score,
    round_half_up,
    score_visits,
)
from fhir_adapter.scoring.satisfaction import (
    SatisfactionRate,
    level_from_improvement,
    response_level,
    satisfaction_rates,
)
from fhir_adapter.scoring.versions import RULE_VERSIONS

__all__ = [
    "RULE_VERSIONS",
    "AeSummaryRow",
    "Consensus",
    "ConsensusMethod",
    "RaterScore",
    "SatisfactionRate",
    "ScoreStatus",
    "VisitScore",
    "consensus",
    "improvement_pct",
    "level_from_improvement",
    "pga_discordant",
    "pga_from_improvement",
    "rater_masi",
    "rater_mmasi",
    "rater_score",
    "response_level",
    "round_half_up",
    "satisfaction_rates",
    "score_visits",
    "summarize_adverse_events",
]
