"""Version of each scoring rule. Bump a version whenever the rule's result can change."""

from types import MappingProxyType

RULE_VERSIONS = MappingProxyType(
    {
        "masi": "masi-rater/1.0",
        "mmasi": "mmasi-rater/1.0",
        "consensus": "masi-consensus/1.0",
        "improvement": "masi-improvement/1.0",
        "pga-from-masi": "pga-from-masi/1.0",
        "satisfaction": "satisfaction/1.0",
        "ae-summary": "ae-summary/1.0",
        "eligibility": "eligibility/1.0",
    }
)
