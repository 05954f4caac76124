"""R5 (5.0.0) builders for the resources whose shape differs between R4 and R5.

Same public functions and signatures as :mod:`.r4`; what both share is imported from
:mod:`.common` (the ResearchSubject status rule, the AE concept, suspects and causality, the
severity codings, the MeasureReport group, Provenance), never from :mod:`.r4`. Codes spelled
differently in R5 live in ``mappings/fhir.yaml`` (``adverse_event_r5``, ``research_r5``,
``value_sets.r5`` and ``value_sets.r5_codings``). Choices, per resource:

- **ResearchSubject**: ``individual`` -> ``subject``; ``status`` is the publication status
  ``active``; the lifecycle (R4 ``status``) goes to ``progress[]``: one entry per known state,
  ``type`` research-subject-state-type ``Enrollment``, ``subjectState`` research-subject-state
  with the R4 tokens (candidate, eligible / ineligible, on-study, withdrawn / off-study),
  ``startDate`` from the data (consent, screening, enrollment, withdrawal dates), ``endDate`` =
  the next state's start. The last entry (no ``endDate``) is the current state and always equals
  the R4 status. ``assignedArm`` / ``actualArm`` -> ``assignedComparisonGroup`` /
  ``actualComparisonGroup`` = the arm id, the ``linkId`` of ResearchStudy.comparisonGroup;
  ``consent`` is a list of Reference(Consent).
- **ResearchStudy**: ``status`` = ``fhir_status_r5`` (publication status); the registry's
  recruitment status goes to ``progressStatus.state`` (research-study-status, mapped in
  fhir.yaml ``research_r5.study_state``); ``arm`` -> ``comparisonGroup`` (``linkId`` = arm id,
  name, type, description); ``enrollment`` -> ``recruitment`` {targetNumber, eligibility =
  Reference(Group)}; ``sponsor`` -> ``associatedParty`` (role ``sponsor`` of
  research-study-party-role, party = the Organization); ``name`` = the NCT id; phase,
  primaryPurposeType, condition, site, period unchanged.
- **AdverseEvent**: ``event`` -> ``code``; ``date`` -> ``occurrenceDateTime`` (onset), or
  ``occurrencePeriod`` {onset, resolved_on} once resolved (R5 has the element R4 lacks);
  ``status`` (required) ``completed`` when ``resolved_on`` is set or the outcome says the event
  ended (recovered, recovered with sequelae, fatal), else ``in-progress``; ``seriousness``
  with the R5 codes ``serious`` / ``non-serious``;
  ``severity`` (removed in R5) -> the official cross-version extension
  ``http://hl7.org/fhir/4.0/StructureDefinition/extension-AdverseEvent.severity`` carrying the
  same codings as R4 (severity + CTCAE grade); chosen over ``contributingFactor`` /
  ``resultingEffect``, which mean something else (a cause, a consequence). ``outcome`` is a
  list, THO adverse-event-outcome codes kept (R5's example value set is SNOMED CT findings
  with no one-to-one match). ``suspectEntity.instance`` -> ``instanceReference``;
  ``causality`` (one element) only on the suspect the judgement concerns, its
  ``entityRelatedness`` the R5 (lower-case) WHO-UMC code with the source word as text (R5 has
  no ``productRelatedness``); with no suspect stated, the trial extension
  ``ae-causality-study-treatment`` as in R4. ``action_taken`` (hospital target only) ->
  ``mitigatingAction.itemCodeableConcept.text``. identifier is a list in R5 (R4: a single
  Identifier); the id stays in meta.tag.
- **Encounter**: ``status`` ``completed``; ``class`` a list of CodeableConcept;
  ``period`` -> ``actualPeriod``.
- **Consent**: ``status`` draft (no consent yet) / active / inactive (withdrawn); ``patient``
  -> ``subject``; ``dateTime`` -> ``date`` (a date); ``decision`` ``permit`` once consented;
  ``policy`` -> ``policyBasis.url`` (the registry record); no ``scope`` in R5.
- **Group**: ``actual`` -> ``membership`` ``definitional``; characteristics unchanged
  (``value[x]`` and ``exclude`` are required in R5, as emitted); ``quantity`` kept.
- **Device**: ``deviceName`` {name, type} -> ``name`` {value, type ``user-friendly-name``};
  ``version`` [{value}] unchanged.
- **Substance**: ``instance`` (required) ``false`` (the product, not a lot);
  ``code`` is a CodeableReference ``{"concept": ...}``.
- **MeasureReport**: ``group.measureScore`` -> ``group.measureScoreQuantity``; rest unchanged.
- **Provenance**: the elements used (target, recorded, policy, activity, agent.who,
  entity.what/role) are unchanged in R5: the R4 builder is reused as is.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir_adapter.domain import AdverseEvent, Outcome, Participant
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

VERSION = "R5"


# -- study level ---------------------------------------------------------------------------
def to_research_study(ctx: MappingContext) -> Resource:
    study = ctx.trial.study
    term = ctx.terminology
    resource = research_study_core(ctx, study.fhir_status_r5, name=study.nct_id)
    if study.start_date:
        resource["period"] = {"start": study.start_date.isoformat()}
    resource["site"] = [ctx.ref("Location", s.id) for s in study.sites]
    resource["associatedParty"] = [
        {
            "name": study.sponsor,
            "role": {"coding": [term.coding("party_role", "sponsor", "Sponsor")]},
            "party": sponsor_ref(ctx),
        }
    ]
    state = str(term.research_r5("study_state").get(study.registry_status, study.registry_status))
    display = term.research_r5("study_state_display").get(state)
    resource["progressStatus"] = [
        {
            "state": {"coding": [term.coding("research_study_status_r5", state, display)]},
            "actual": True,
        }
    ]
    resource["recruitment"] = {
        "targetNumber": study.target_enrollment,
        "eligibility": ctx.ref("Group", group_value(ctx)),
    }
    resource["comparisonGroup"] = [
        {"linkId": arm.id, **entry}
        for arm, entry in zip(ctx.trial.arms, arm_entries(ctx), strict=True)
    ]
    return resource


def to_enrollment_group(ctx: MappingContext) -> Resource:
    return enrollment_group(ctx, {"membership": "definitional"})


def _device_name(name: str) -> list[dict[str, str]]:
    return [{"value": name, "type": "user-friendly-name"}]


def to_interventions(ctx: MappingContext) -> list[Resource]:
    """The study interventions as Substance / Device (AdverseEvent.suspectEntity targets)."""
    resources = []
    for item in ctx.trial.interventions:
        if item.kind == "substance":
            resource = ctx.base("Substance", item.id)
            resource["instance"] = False
            resource["status"] = "active"
            resource["code"] = {"concept": {"text": item.name}}
        else:
            resource = ctx.base("Device", item.id)
            resource["status"] = "active"
            resource["name"] = _device_name(item.name)
        resources.append(resource)
    return resources


def to_adapter_device(ctx: MappingContext) -> Resource:
    """The adapter itself, the agent of every Provenance (its version is recorded here)."""
    resource = ctx.base("Device", ADAPTER_DEVICE)
    resource["status"] = "active"
    resource["name"] = _device_name("fhir-adapter")
    resource["version"] = [{"value": ctx.adapter_version}]
    return resource


# -- participants --------------------------------------------------------------------------
def to_consent(participant: Participant, ctx: MappingContext) -> Resource:
    term = ctx.terminology
    resource = ctx.base("Consent", participant.subject_id)
    consented = participant.consent_date is not None
    if not consented:
        status = "draft"
    elif participant.effective_status.value == "withdrawn":
        status = "inactive"
    else:
        status = "active"
    resource["status"] = status
    resource["category"] = [
        {"coding": [term.coding("consent_category", "research", "Research Information Access")]}
    ]
    resource["subject"] = ctx.ref("Patient", participant.subject_id)
    if participant.consent_date is not None:
        resource["date"] = participant.consent_date.isoformat()
    resource["policyBasis"] = {"url": consent_policy_url(ctx)}
    if consented:
        resource["decision"] = "permit"
    return resource


def _progress_steps(
    participant: Participant, eligibility: EligibilityResult | None
) -> list[tuple[str, dt.date | None]]:
    """The enrollment states the data shows, in lifecycle order; the last is the current one."""
    current = subject_status(participant, eligibility)
    steps: list[tuple[str, dt.date | None]] = []
    consent = participant.consent_date
    if consent is not None and (eligibility is None or consent < eligibility.screened_on):
        steps.append(("candidate", consent))
    if eligibility is not None:
        screened = eligibility.result.value
        state = screened if screened in ("eligible", "ineligible") else "candidate"
        if not steps or steps[-1][0] != state:  # an incomplete screening: still a candidate
            steps.append((state, eligibility.screened_on))
    if participant.enrolled_on is not None:
        steps.append(("on-study", participant.enrolled_on))
    if current == "withdrawn":
        steps.append(("withdrawn", participant.withdrawn_on))
    elif current == "off-study":
        steps.append(("off-study", None))
    if not steps or steps[-1][0] != current:
        steps.append((current, None))
    return steps


def subject_progress(
    participant: Participant, eligibility: EligibilityResult | None, ctx: MappingContext
) -> list[dict[str, Any]]:
    term = ctx.terminology
    kind = term.research_r5("progress_type")
    displays = term.research_r5("subject_state_display")
    steps = _progress_steps(participant, eligibility)
    progress = []
    for i, (state, start) in enumerate(steps):
        entry: dict[str, Any] = {
            "type": {
                "coding": [
                    term.coding(
                        "research_subject_state_type_r5", str(kind["code"]), str(kind["display"])
                    )
                ]
            },
            "subjectState": {
                "coding": [term.coding("research_subject_state_r5", state, displays.get(state))]
            },
        }
        if start is not None:
            entry["startDate"] = start.isoformat()
        end = steps[i + 1][1] if i + 1 < len(steps) else None
        if end is not None:
            entry["endDate"] = end.isoformat()
        progress.append(entry)
    return progress


def to_research_subject(
    participant: Participant, eligibility: EligibilityResult | None, ctx: MappingContext
) -> Resource:
    resource = ctx.base("ResearchSubject", participant.subject_id)
    resource["status"] = "active"
    resource["progress"] = subject_progress(participant, eligibility, ctx)
    period = subject_period(participant)
    if period:
        resource["period"] = period
    resource["study"] = ctx.study_ref
    resource["subject"] = ctx.ref("Patient", participant.subject_id)
    if participant.enrolled and participant.arm:
        resource["assignedComparisonGroup"] = participant.arm
        resource["actualComparisonGroup"] = participant.arm
    resource["consent"] = [ctx.ref("Consent", participant.subject_id)]
    return resource


def to_encounter(subject_id: str, visit: str, facts: VisitFacts, ctx: MappingContext) -> Resource:
    """A visit; its actualPeriod starts on the earliest accepted assessment (none: no period)."""
    resource = encounter_frame(ctx, subject_id, visit, facts)
    resource["status"] = "completed"
    resource["class"] = [{"coding": [ctx.terminology.coding("act_code", "AMB", "ambulatory")]}]
    resource["type"] = encounter_type(ctx, visit)
    resource["subject"] = ctx.ref("Patient", subject_id)
    if facts.start is not None:
        resource["actualPeriod"] = {"start": facts.start.isoformat()}
    return resource


# -- adverse events ------------------------------------------------------------------------
_ENDED = frozenset({Outcome.RECOVERED, Outcome.RECOVERED_WITH_SEQUELAE, Outcome.FATAL})


def ae_status(event: AdverseEvent) -> str:
    """R5 AdverseEvent.status (required): completed once resolved (date or outcome) or fatal."""
    if event.resolved_on is not None or event.outcome in _ENDED:
        return "completed"
    return "in-progress"


def ae_severity_extension(ctx: MappingContext, grade: int) -> dict[str, Any]:
    """R4 AdverseEvent.severity (severity + CTCAE grade) as the cross-version extension."""
    return {
        "url": ctx.terminology.external_extension("ae_severity_r5"),
        "valueCodeableConcept": {"coding": severity_coding(ctx, grade)},
    }


def ae_suspect_entities(
    ctx: MappingContext, event: AdverseEvent, arm: str | None
) -> list[dict[str, Any]]:
    """Suspect entities (the same as R4); the judgement only on the one(s) it concerns."""
    entities = []
    for suspect in ae_suspects(ctx, event, arm):
        entity: dict[str, Any] = {
            "instanceReference": ctx.ref(
                suspect.resource_type, suspect.intervention_id, suspect.name
            )
        }
        if suspect.assessed:
            relatedness: dict[str, Any] = {}
            coding = ae_causality_coding(ctx, event)
            if coding is not None:
                relatedness["coding"] = [coding]
            relatedness["text"] = event.causality.value  # the source word
            entity["causality"] = {"entityRelatedness": relatedness}
        entities.append(entity)
    return entities


def to_adverse_event(event: AdverseEvent, arm: str | None, ctx: MappingContext) -> Resource:
    term = ctx.terminology
    resource = ctx.base("AdverseEvent", event.ae_id)  # R5: identifier is a list
    resource["extension"] = [
        ae_severity_extension(ctx, event.grade),
        *ae_extensions(ctx, event),
    ]
    resource["status"] = ae_status(event)
    resource["actuality"] = "actual"
    resource["code"] = ae_event_concept(ctx, event)
    resource["subject"] = ctx.ref("Patient", event.subject_id)
    if event.visit:
        resource["encounter"] = ctx.ref("Encounter", encounter_value(event.subject_id, event.visit))
    if event.resolved_on is not None:
        resource["occurrencePeriod"] = {
            "start": event.onset_on.isoformat(),
            "end": event.resolved_on.isoformat(),
        }
    else:
        resource["occurrenceDateTime"] = event.onset_on.isoformat()
    resource["detected"] = event.onset_on.isoformat()
    if event.reported_on:
        resource["recordedDate"] = event.reported_on.isoformat()
    seriousness = str(term.ae("seriousness", VERSION)[event.serious.value])
    seriousness_display = str(term.ae("seriousness_display", VERSION)[seriousness])
    resource["seriousness"] = {
        "coding": [term.coding("ae_seriousness", seriousness, seriousness_display)]
    }
    outcome = str(term.ae("outcome", VERSION)[event.outcome.value])
    outcome_display = str(term.ae("outcome_display", VERSION)[outcome])
    resource["outcome"] = [{"coding": [term.coding("ae_outcome", outcome, outcome_display)]}]
    suspects = ae_suspect_entities(ctx, event, arm)
    if suspects:
        resource["suspectEntity"] = suspects
    action = ae_action_taken(ctx, event)
    if action:
        resource["mitigatingAction"] = [{"itemCodeableConcept": {"text": action}}]
    resource["study"] = [ctx.study_ref]
    return resource


# -- derived values ------------------------------------------------------------------------
def to_satisfaction_report(
    rate: SatisfactionRate, period: tuple[dt.date, dt.date], ctx: MappingContext
) -> Resource:
    """The R4 MeasureReport with the R5 score element (measureScoreQuantity)."""
    return satisfaction_report(rate, period, ctx, score_key="measureScoreQuantity")


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
