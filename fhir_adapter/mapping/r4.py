"""R4 (4.0.1) builders for the resources whose shape differs between R4 and R5.

R4 code systems are used exactly as R4 defines them (``Serious`` / ``Non-serious``,
``Probably-Likely``, ``resolvedWithSequelae``...). What R4 and R5 share comes from
:mod:`.common`; the R5 counterparts live in :mod:`.r5`.

AdverseEvent in R4 has no element for the end of the event nor for the action taken: both
ride in extensions of the AE Clinical Research R4 Backport IG — ``resolve-date`` (the date of
``resolved_on``) and MitigatingAction (``action_taken``, hospital target only); URLs in
``mappings/extensions.yaml``. (Not the R5 cross-version ``AdverseEvent.occurrence``: HAPI's
validator refuses that URL.)
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir_adapter.domain import AdverseEvent, Participant
from fhir_adapter.eligibility import EligibilityResult
from fhir_adapter.mapping.common import (
    ADAPTER_DEVICE,
    SCREENING,
    VisitFacts,
    ae_action_taken,
    ae_causality_coding,
    ae_event_concept,
    ae_extensions,
    ae_suspects,
    arm_entries,
    arm_name,
    consent_policy_url,
    encounter_frame,
    encounter_type,
    encounter_value,
    enrollment_group,
    group_value,
    measure_report_value,
    research_study_core,
    satisfaction_report,
    severity_coding,
    sponsor_ref,
    subject_period,
    subject_status,
    to_provenance,
)
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.scoring import SatisfactionRate


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


def to_enrollment_group(ctx: MappingContext) -> Resource:
    return enrollment_group(ctx, {"actual": False})


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
    period = subject_period(participant)
    if period:
        resource["period"] = period
    resource["study"] = ctx.study_ref
    resource["individual"] = ctx.ref("Patient", participant.subject_id)
    if participant.enrolled and participant.arm:
        resource["assignedArm"] = arm_name(ctx, participant.arm)
        resource["actualArm"] = arm_name(ctx, participant.arm)
    resource["consent"] = ctx.ref("Consent", participant.subject_id)
    return resource


def to_encounter(subject_id: str, visit: str, facts: VisitFacts, ctx: MappingContext) -> Resource:
    """A visit; its period starts on the earliest accepted assessment (none: no period)."""
    resource = encounter_frame(ctx, subject_id, visit, facts)
    resource["status"] = "finished"
    resource["class"] = ctx.terminology.coding("act_code", "AMB", "ambulatory")
    resource["type"] = encounter_type(ctx, visit)
    resource["subject"] = ctx.ref("Patient", subject_id)
    if facts.start is not None:
        resource["period"] = {"start": facts.start.isoformat()}
    return resource


def ae_suspect_entities(
    ctx: MappingContext, event: AdverseEvent, arm: str | None
) -> list[dict[str, Any]]:
    """Suspect entities; the causality assessment only on the intervention(s) it concerns."""
    entities = []
    for suspect in ae_suspects(ctx, event, arm):
        entity: dict[str, Any] = {
            "instance": ctx.ref(suspect.resource_type, suspect.intervention_id, suspect.name)
        }
        if suspect.assessed:
            causality: dict[str, Any] = {}
            coding = ae_causality_coding(ctx, event)
            if coding is not None:
                causality["assessment"] = {"coding": [coding]}
            causality["productRelatedness"] = event.causality.value  # the source word
            entity["causality"] = [causality]
        entities.append(entity)
    return entities


def ae_r4_extensions(ctx: MappingContext, event: AdverseEvent) -> list[dict[str, Any]]:
    """The trial causality extension, the course (resolution date) and the action taken."""
    term = ctx.terminology
    extensions = ae_extensions(ctx, event)
    if event.resolved_on is not None:
        extensions.append(
            {
                "url": term.external_extension("ae_resolve_date_r4"),
                "valueDateTime": event.resolved_on.isoformat(),
            }
        )
    action = ae_action_taken(ctx, event)
    if action:
        extensions.append(
            {
                "url": term.external_extension("ae_mitigating_action_r4"),
                "extension": [{"url": "item", "valueCodeableConcept": {"text": action}}],
            }
        )
    return extensions


def to_adverse_event(event: AdverseEvent, arm: str | None, ctx: MappingContext) -> Resource:
    term = ctx.terminology
    resource = ctx.base("AdverseEvent", event.ae_id)
    extensions = ae_r4_extensions(ctx, event)
    if extensions:
        resource["extension"] = extensions
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
    suspects = ae_suspect_entities(ctx, event, arm)
    if suspects:
        resource["suspectEntity"] = suspects
    resource["study"] = [ctx.study_ref]
    return resource


def to_satisfaction_report(
    rate: SatisfactionRate, period: tuple[dt.date, dt.date], ctx: MappingContext
) -> Resource:
    return satisfaction_report(rate, period, ctx, score_key="measureScore")


__all__ = [
    "ADAPTER_DEVICE",
    "SCREENING",
    "measure_report_value",
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
