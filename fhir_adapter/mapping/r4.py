"""R4 (4.0.1) builders for the resources whose shape differs between R4 and R5.

R4 code systems are used exactly as R4 defines them (``Serious`` / ``Non-serious``,
``Certain``, ``resolvedWithSequelae``...). The R5 counterparts live in :mod:`.r5`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from fhir_adapter.domain import AdverseEvent, Participant
from fhir_adapter.eligibility import EligibilityResult
from fhir_adapter.mapping.common import SCREENING, encounter_value, measure_url, sponsor_ref
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.scoring import RULE_VERSIONS, SatisfactionRate

ADAPTER_DEVICE = "fhir-adapter"


def subject_status(participant: Participant, eligibility: EligibilityResult | None) -> str:
    """ResearchSubject status, the first rule that applies (SPEC §6)."""
    status = participant.effective_status.value
    if status == "withdrawn":
        return "withdrawn"
    if status == "completed":
        return "off-study"
    if participant.enrolled:
        return "on-study"
    if eligibility is not None and eligibility.result.value in ("ineligible", "eligible"):
        return eligibility.result.value
    return "candidate"


def group_value(ctx: MappingContext) -> str:
    return f"{ctx.study_value}-enrollment"


def arm_name(ctx: MappingContext, arm_id: str) -> str:
    return next(a.name for a in ctx.trial.arms if a.id == arm_id)


def research_study_core(ctx: MappingContext, status: str, name: str | None = None) -> Resource:
    """What R4 and R5 ResearchStudy share: identifiers (NCT first), title, status, purpose,
    phase, condition. ``name`` (R5 only) goes before the title."""
    study = ctx.trial.study
    term = ctx.terminology
    resource = ctx.base("ResearchStudy", ctx.study_value)
    resource["identifier"].insert(0, {"system": term.system("nct"), "value": study.nct_id})
    if name is not None:
        resource["name"] = name
    resource["title"] = study.title
    resource["status"] = status
    resource["primaryPurposeType"] = {
        "coding": [term.coding("research_study_purpose", study.primary_purpose, "Treatment")]
    }
    resource["phase"] = {"coding": [term.coding("research_study_phase", study.phase, "N/A")]}
    resource["condition"] = [{"coding": term.condition_codings, "text": study.condition.text}]
    return resource


def to_research_study(ctx: MappingContext) -> Resource:
    study = ctx.trial.study
    resource = research_study_core(ctx, study.fhir_status_r4)
    resource["enrollment"] = [ctx.ref("Group", group_value(ctx))]
    if study.start_date:
        resource["period"] = {"start": study.start_date.isoformat()}
    resource["sponsor"] = sponsor_ref(ctx)
    resource["site"] = [ctx.ref("Location", s.id) for s in study.sites]
    resource["arm"] = arm_entries(ctx)
    return resource


def arm_entries(ctx: MappingContext) -> list[dict[str, Any]]:
    """The arms (R4 ResearchStudy.arm; R5 comparisonGroup adds a linkId)."""
    term = ctx.terminology
    return [
        {
            "name": arm.name,
            "type": {"coding": [term.coding("arm_type", arm.type)], "text": arm.type},
            "description": " ".join(arm.description.split()),
        }
        for arm in ctx.trial.arms
    ]


def enrollment_group(ctx: MappingContext, membership: dict[str, Any]) -> Resource:
    """The enrollment Group: its characteristics are the eligibility criteria.

    ``membership``: R4 ``{"actual": False}``, R5 ``{"membership": "definitional"}``.
    """
    resource = ctx.base("Group", group_value(ctx))
    resource["type"] = "person"
    resource.update(membership)
    resource["name"] = f"{ctx.study_value} enrollment criteria"
    resource["quantity"] = ctx.trial.study.target_enrollment
    resource["characteristic"] = [
        {
            "code": ctx.terminology.trial_concept(c.id, " ".join(c.text.split())),
            "valueBoolean": True,
            "exclude": c.kind == "exclusion",
        }
        for c in ctx.trial.criteria
    ]
    return resource


def to_enrollment_group(ctx: MappingContext) -> Resource:
    return enrollment_group(ctx, {"actual": False})


def consent_policy_url(ctx: MappingContext) -> str:
    """The registry record the consent was given under (R4 policy.uri, R5 policyBasis.url)."""
    return f"https://clinicaltrials.gov/study/{ctx.study_value}"


def to_interventions(ctx: MappingContext) -> list[Resource]:
    """The study interventions as Substance / Device (AdverseEvent.suspectEntity targets)."""
    resources = []
    for item in ctx.trial.interventions:
        if item.kind == "substance":
            resource = ctx.base("Substance", item.id)
            resource["status"] = "active"
            resource["code"] = {"text": item.name}
        else:
            resource = ctx.base("Device", item.id)
            resource["status"] = "active"
            resource["deviceName"] = [{"name": item.name, "type": "user-friendly-name"}]
        resources.append(resource)
    return resources


def to_adapter_device(ctx: MappingContext) -> Resource:
    """The adapter itself, the agent of every Provenance (its version is recorded here)."""
    resource = ctx.base("Device", ADAPTER_DEVICE)
    resource["status"] = "active"
    resource["deviceName"] = [{"name": "fhir-adapter", "type": "user-friendly-name"}]
    resource["version"] = [{"value": ctx.adapter_version}]
    return resource


def to_consent(participant: Participant, ctx: MappingContext) -> Resource:
    term = ctx.terminology
    resource = ctx.base("Consent", participant.subject_id)
    if participant.consent_date is None:
        status = "proposed"
    elif participant.effective_status.value == "withdrawn":
        status = "inactive"
    else:
        status = "active"
    resource["status"] = status
    resource["scope"] = {"coding": [term.coding("consent_scope", "research", "Research")]}
    resource["category"] = [
        {"coding": [term.coding("consent_category", "research", "Research Information Access")]}
    ]
    resource["patient"] = ctx.ref("Patient", participant.subject_id)
    if participant.consent_date is not None:
        resource["dateTime"] = participant.consent_date.isoformat()
    # ppc-1: a policy or a policyRule is required
    resource["policy"] = [{"uri": consent_policy_url(ctx)}]
    return resource


def to_research_subject(
    participant: Participant, eligibility: EligibilityResult | None, ctx: MappingContext
) -> Resource:
    resource = ctx.base("ResearchSubject", participant.subject_id)
    resource["status"] = subject_status(participant, eligibility)
    period = _subject_period(participant)
    if period:
        resource["period"] = period
    resource["study"] = ctx.study_ref
    resource["individual"] = ctx.ref("Patient", participant.subject_id)
    if participant.enrolled and participant.arm:
        resource["assignedArm"] = arm_name(ctx, participant.arm)
        resource["actualArm"] = arm_name(ctx, participant.arm)
    resource["consent"] = ctx.ref("Consent", participant.subject_id)
    return resource


def _subject_period(participant: Participant) -> dict[str, str]:
    period = {}
    start = participant.enrolled_on or participant.consent_date
    if start:
        period["start"] = start.isoformat()
    if participant.withdrawn_on:
        period["end"] = participant.withdrawn_on.isoformat()
    return period


def to_encounter(subject_id: str, visit: str, start: dt.date, ctx: MappingContext) -> Resource:
    resource = ctx.base("Encounter", encounter_value(subject_id, visit))
    resource["extension"] = [ctx.study_extension()]
    resource["status"] = "finished"
    resource["class"] = ctx.terminology.coding("act_code", "AMB", "ambulatory")
    resource["type"] = [ctx.terminology.trial_concept(f"visit-{visit}")]
    resource["subject"] = ctx.ref("Patient", subject_id)
    resource["period"] = {"start": start.isoformat()}
    return resource


def severity_coding(ctx: MappingContext, grade: int) -> list[dict[str, str]]:
    severity = str(ctx.terminology.ae("severity_by_grade")[grade])
    return [
        ctx.terminology.coding("ae_severity", severity, severity.capitalize()),
        ctx.terminology.coding("ctcae_grade", str(grade), f"Grade {grade}"),
    ]


def ae_event_concept(ctx: MappingContext, event: AdverseEvent) -> dict[str, Any]:
    term = ctx.terminology.ae_term(event.term.value)
    concept: dict[str, Any] = {}
    if term.codings:
        concept["coding"] = [dict(c) for c in term.codings]
    concept["text"] = event.term_text if event.term.value == "other" else term.display
    return concept


def ae_suspect_entities(
    ctx: MappingContext, event: AdverseEvent, arm: str | None
) -> list[dict[str, Any]]:
    """The arm's study interventions, each with the investigator's causality assessment."""
    term = ctx.terminology
    who_umc = str(term.ae("causality")[event.causality.value])
    display = str(term.ae("causality_display")[who_umc])
    interventions = ctx.trial.interventions
    if arm is not None:
        wanted = next(a.interventions for a in ctx.trial.arms if a.id == arm)
        interventions = [i for i in interventions if i.id in wanted]
    entities = []
    for item in interventions:
        kind = "Substance" if item.kind == "substance" else "Device"
        entities.append(
            {
                "instance": ctx.ref(kind, item.id, item.name),
                "causality": [
                    {
                        "assessment": {
                            "coding": [term.coding("ae_causality", who_umc, display)],
                            "text": event.causality.value.replace("_", " "),
                        }
                    }
                ],
            }
        )
    return entities


def to_adverse_event(event: AdverseEvent, arm: str | None, ctx: MappingContext) -> Resource:
    term = ctx.terminology
    resource = ctx.base("AdverseEvent", event.ae_id)
    resource["identifier"] = resource["identifier"][0]  # R4: a single Identifier
    resource["actuality"] = "actual"
    resource["event"] = ae_event_concept(ctx, event)
    resource["subject"] = ctx.ref("Patient", event.subject_id)
    if event.visit:
        resource["encounter"] = ctx.ref("Encounter", encounter_value(event.subject_id, event.visit))
    resource["date"] = event.onset_on.isoformat()
    resource["detected"] = event.onset_on.isoformat()
    if event.reported_on:
        resource["recordedDate"] = event.reported_on.isoformat()
    seriousness = str(term.ae("seriousness")[event.serious.value])
    resource["seriousness"] = {"coding": [term.coding("ae_seriousness", seriousness, seriousness)]}
    resource["severity"] = {"coding": severity_coding(ctx, event.grade)}
    outcome = str(term.ae("outcome")[event.outcome.value])
    display = str(term.ae("outcome_display")[outcome])
    resource["outcome"] = {"coding": [term.coding("ae_outcome", outcome, display)]}
    resource["suspectEntity"] = ae_suspect_entities(ctx, event, arm)
    resource["study"] = [ctx.study_ref]
    return resource


def measure_report_value(visit: str, arm: str | None) -> str:
    return f"satisfaction-{visit}-{arm or 'all'}"


def to_satisfaction_report(
    rate: SatisfactionRate, period: tuple[dt.date, dt.date], ctx: MappingContext
) -> Resource:
    resource = ctx.base("MeasureReport", measure_report_value(rate.visit, rate.arm))
    resource["status"] = "complete"
    resource["type"] = "summary"
    resource["measure"] = measure_url(ctx)
    resource["date"] = period[1].isoformat()
    resource["reporter"] = sponsor_ref(ctx)
    resource["period"] = {"start": period[0].isoformat(), "end": period[1].isoformat()}
    resource["group"] = [_report_group(rate, ctx, score_key="measureScore")]
    return resource


def _report_group(rate: SatisfactionRate, ctx: MappingContext, score_key: str) -> dict[str, Any]:
    term = ctx.terminology
    group_code = [term.trial_coding(f"visit-{rate.visit}")]
    if rate.arm is not None:
        group_code.append(term.trial_coding(f"arm-{rate.arm}"))
    label = f"{rate.visit}, {'arm ' + rate.arm if rate.arm else 'all arms'}"
    group: dict[str, Any] = {
        "code": {"coding": group_code, "text": label},
        "population": [
            {
                "code": {"coding": [term.coding("measure_population", "numerator", "Numerator")]},
                "count": rate.numerator,
            },
            {
                "code": {
                    "coding": [term.coding("measure_population", "denominator", "Denominator")]
                },
                "count": rate.denominator,
            },
        ],
    }
    if rate.rate_pct is not None:
        group[score_key] = {
            "value": round_rate(rate.rate_pct),
            "unit": "%",
            "system": term.system("ucum"),
            "code": "%",
        }
    return group


def round_rate(value: Decimal) -> Decimal:
    from fhir_adapter.scoring import round_half_up

    return round_half_up(value, 1)


def to_provenance(
    target: tuple[str, str],
    sources: Sequence[tuple[str, str]],
    recorded: dt.date,
    rules: Sequence[str],
    ctx: MappingContext,
) -> Resource:
    """Provenance of a derived value: adapter version, scoring rule versions, sources.

    ``recorded`` comes from the data (the latest source date), never from the clock.
    """
    target_type, target_value = target
    resource = ctx.base("Provenance", target_value)
    resource["target"] = [ctx.ref(target_type, target_value)]
    resource["recorded"] = ctx.instant(recorded)
    resource["policy"] = [f"{ctx.identifier_base}:rule:{RULE_VERSIONS[r]}" for r in rules]
    resource["activity"] = {
        "coding": [
            ctx.terminology.coding("w3c_provenance_activity", "Derivation", "wasDerivedFrom")
        ]
    }
    resource["agent"] = [
        {
            "type": {
                "coding": [
                    ctx.terminology.coding("provenance_agent_type", "assembler", "Assembler")
                ]
            },
            "who": ctx.ref("Device", ADAPTER_DEVICE, f"fhir-adapter {ctx.adapter_version}"),
        }
    ]
    if sources:
        resource["entity"] = [
            {"role": "source", "what": ctx.ref(kind, value)} for kind, value in sources
        ]
    return resource


__all__ = [
    "ADAPTER_DEVICE",
    "SCREENING",
    "subject_status",
    "to_adapter_device",
    "to_adverse_event",
    "to_consent",
    "to_encounter",
    "to_enrollment_group",
    "to_interventions",
    "to_provenance",
    "to_research_study",
    "to_research_subject",
    "to_satisfaction_report",
]
