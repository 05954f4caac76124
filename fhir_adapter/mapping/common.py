"""What R4 and R5 share: the builders whose output is the same in both (Observation and the
simple resources, Provenance) and the parts both version modules assemble (study core, AE
concept, suspects and causality, Encounter frame, MeasureReport group).

:mod:`.r4` and :mod:`.r5` import from here, never from each other. Pure functions: a domain
object and a :class:`MappingContext` in, a FHIR resource (a dict with ``Type/id`` references)
out. No I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from fhir_adapter.domain import (
    AdverseEvent,
    MasiRating,
    Participant,
    PgaAssessment,
    SatisfactionResponse,
)
from fhir_adapter.eligibility import CriterionState, EligibilityResult
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.mapping.terminology import Coding
from fhir_adapter.scoring import (
    RULE_VERSIONS,
    Consensus,
    SatisfactionRate,
    VisitScore,
    pga_discordant,
    rater_masi,
    response_level,
    round_half_up,
)

_MASI_REGIONS = (
    ("forehead", "forehead"),
    ("right_malar", "right-malar"),
    ("left_malar", "left-malar"),
    ("chin", "chin"),
)
_MASI_ITEMS = (("d", "darkness"), ("h", "homogeneity"), ("a", "area"))
_STATE_CODE = {
    CriterionState.MET: "met",
    CriterionState.NOT_MET: "not-met",
    CriterionState.UNKNOWN: "unknown",
}


# -- identifiers of the values (pinned, SPEC §6) --------------------------------------------
def encounter_value(subject_id: str, visit: str) -> str:
    return f"{subject_id}-{visit}"


def rater_masi_value(subject_id: str, visit: str, rater_id: str) -> str:
    return f"{subject_id}-{visit}-masi-{rater_id}"


def consensus_value(subject_id: str, visit: str, code: str = "masi") -> str:
    return f"{subject_id}-{visit}-{code}"


def improvement_value(subject_id: str, visit: str) -> str:
    return f"{subject_id}-{visit}-masi-improvement"


def pga_value(subject_id: str, visit: str) -> str:
    return f"{subject_id}-{visit}-pga"


def satisfaction_value(subject_id: str, visit: str) -> str:
    return f"{subject_id}-{visit}-satisfaction"


def eligibility_value(subject_id: str) -> str:
    return f"{subject_id}-eligibility"


SCREENING = "screening"


def masi_item_fields() -> dict[str, str]:
    """Component code -> MASI record field of the 12 items (``forehead-darkness`` ->
    ``forehead_d``): how a rater Observation's components read back into a record."""
    return {
        f"{region_code}-{item}": f"{region}_{letter}"
        for region, region_code in _MASI_REGIONS
        for letter, item in _MASI_ITEMS
    }


# -- small shared pieces -------------------------------------------------------------------
def score_quantity(ctx: MappingContext, value: Decimal) -> dict[str, Any]:
    return {
        "value": value,
        "unit": "score",
        "system": ctx.terminology.system("ucum"),
        "code": "{score}",
    }


def percent_quantity(ctx: MappingContext, value: Decimal) -> dict[str, Any]:
    return {"value": value, "unit": "%", "system": ctx.terminology.system("ucum"), "code": "%"}


def not_applicable(ctx: MappingContext) -> dict[str, Any]:
    return {
        "coding": [ctx.terminology.coding("data_absent_reason", "not-applicable", "Not Applicable")]
    }


def observation(
    ctx: MappingContext,
    value: str,
    code: str,
    *,
    subject_id: str,
    encounter: str,
    status: str,
    category: str,
    effective: dt.date,
) -> Resource:
    """The frame every Observation shares: identity, study link, subject, visit, time."""
    resource = ctx.base("Observation", value)
    resource["extension"] = [ctx.study_extension()]
    resource["status"] = status
    display = {"exam": "Exam", "survey": "Survey"}[category]
    resource["category"] = [
        {"coding": [ctx.terminology.coding("observation_category", category, display)]}
    ]
    resource["code"] = ctx.terminology.trial_concept(code)
    resource["subject"] = ctx.ref("Patient", value=subject_id)
    resource["encounter"] = ctx.ref("Encounter", encounter)
    resource["effectiveDateTime"] = effective.isoformat()
    return resource


# -- simple resources ----------------------------------------------------------------------
def to_patient(participant: Participant, ctx: MappingContext) -> Resource:
    """Pseudonymous Patient: no name; birth date and MRN only for the hospital target."""
    resource = ctx.base("Patient", participant.subject_id)
    if ctx.target == "hospital" and participant.mrn:
        resource["identifier"].append(
            {
                "use": "usual",
                "type": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR",
                            "display": "Medical record number",
                        }
                    ]
                },
                "system": ctx.mrn_system,
                "value": participant.mrn,
            }
        )
    resource["gender"] = participant.sex.value
    if ctx.target == "hospital":
        resource["birthDate"] = participant.birth_date.isoformat()
    return resource


def to_practitioner(rater_id: str, ctx: MappingContext) -> Resource:
    """A rating physician, known by the trial's rater id only (no name)."""
    resource = ctx.base("Practitioner", rater_id)
    resource["active"] = True
    return resource


def to_sponsor(ctx: MappingContext) -> Resource:
    resource = ctx.base("Organization", f"{ctx.study_value}-sponsor")
    resource["active"] = True
    resource["name"] = ctx.trial.study.sponsor
    return resource


def sponsor_ref(ctx: MappingContext) -> dict[str, str]:
    return ctx.ref("Organization", f"{ctx.study_value}-sponsor", ctx.trial.study.sponsor)


def to_locations(ctx: MappingContext) -> list[Resource]:
    locations = []
    for site in ctx.trial.study.sites:
        resource = ctx.base("Location", site.id)
        resource["status"] = "active"
        resource["name"] = site.name
        address: dict[str, Any] = {"city": site.city}
        if site.state:
            address["state"] = site.state
        if site.postal_code:
            address["postalCode"] = site.postal_code
        address["country"] = site.country
        resource["address"] = address
        resource["managingOrganization"] = sponsor_ref(ctx)
        locations.append(resource)
    return locations


def to_codesystem(ctx: MappingContext) -> Resource:
    term = ctx.terminology
    meta = term.codesystem
    resource = ctx.base("CodeSystem", str(meta["id"]))
    resource["url"] = term.trial_system
    resource["version"] = str(meta["version"])
    resource["name"] = str(meta["name"])
    resource["title"] = str(meta["title"])
    resource["status"] = "active"
    resource["experimental"] = False
    resource["publisher"] = str(meta["publisher"])
    resource["description"] = " ".join(str(meta["description"]).split())
    resource["caseSensitive"] = True
    resource["content"] = "complete"
    resource["property"] = [
        {
            "code": "body-site",
            "description": "SNOMED CT body structure the item is scored on",
            "type": "Coding",
        },
        {"code": "laterality", "description": "SNOMED CT laterality", "type": "Coding"},
    ]
    concepts = []
    for code, concept in term.concepts.items():
        entry: dict[str, Any] = {"code": code, "display": str(concept["display"])}
        if concept.get("definition"):
            entry["definition"] = " ".join(str(concept["definition"]).split())
        props = []
        if concept.get("body_site"):
            props.append(
                {"code": "body-site", "valueCoding": term.body_site_by_code(concept["body_site"])}
            )
        if concept.get("laterality"):
            props.append(
                {"code": "laterality", "valueCoding": term.body_site_by_code(concept["laterality"])}
            )
        if props:
            entry["property"] = props
        concepts.append(entry)
    resource["count"] = len(concepts)
    resource["concept"] = concepts
    return resource


SATISFACTION_MEASURE = "satisfaction-rate"


def measure_url(ctx: MappingContext) -> str:
    return f"{ctx.identifier_base}:measure:{SATISFACTION_MEASURE}"


def to_satisfaction_measure(ctx: MappingContext) -> Resource:
    resource = ctx.base("Measure", SATISFACTION_MEASURE)
    resource["url"] = measure_url(ctx)
    resource["name"] = "SatisfactionRate"
    resource["title"] = "Patient satisfaction rate"
    resource["status"] = "active"
    resource["description"] = (
        "(very satisfied + satisfied) / responses x 100, per visit and per arm x visit"
    )
    resource["scoring"] = {
        "coding": [ctx.terminology.coding("measure_scoring", "proportion", "Proportion")]
    }
    return resource


# -- observations --------------------------------------------------------------------------
def to_rater_masi_observation(rating: MasiRating, ctx: MappingContext) -> Resource:
    """One physician's MASI: score, the 12 D/H/A items with their body sites, performer."""
    value = rater_masi_value(rating.subject_id, rating.visit, rating.rater_id)
    resource = observation(
        ctx,
        value,
        "masi",
        subject_id=rating.subject_id,
        encounter=encounter_value(rating.subject_id, rating.visit),
        status="final",
        category="exam",
        effective=rating.assessed_on,
    )
    resource["performer"] = [ctx.ref("Practitioner", rating.rater_id)]
    resource["valueQuantity"] = score_quantity(ctx, rater_masi(rating))
    resource["bodySite"] = {"coding": [ctx.terminology.body_site("face")]}
    resource["component"] = [
        {
            "code": ctx.terminology.trial_concept(f"{region_code}-{item}"),
            "valueInteger": getattr(rating, f"{region}_{letter}"),
        }
        for region, region_code in _MASI_REGIONS
        for letter, item in _MASI_ITEMS
    ]
    return resource


def _consensus_observation(
    ctx: MappingContext,
    vs: VisitScore,
    code: str,
    value: Decimal,
    consensus: Consensus,
    effective: dt.date,
) -> Resource:
    resource = observation(
        ctx,
        consensus_value(vs.subject_id, vs.visit, code),
        code,
        subject_id=vs.subject_id,
        encounter=encounter_value(vs.subject_id, vs.visit),
        status=consensus.status.value,
        category="exam",
        effective=effective,
    )
    resource["valueQuantity"] = score_quantity(ctx, value)
    resource["method"] = ctx.terminology.trial_concept(consensus.method.value)
    resource["derivedFrom"] = [
        ctx.ref("Observation", rater_masi_value(vs.subject_id, vs.visit, r))
        for r in consensus.raters
    ]
    note = f"Consensus of raters {', '.join(consensus.raters)} ({consensus.method.value})"
    if consensus.needs_adjudication:
        note += (
            f"; the two raters differ by {consensus.difference} points, more than the "
            "adjudication threshold: a third physician's rating is required"
        )
    resource["note"] = [{"text": note}]
    resource["component"] = [
        {
            "code": ctx.terminology.trial_concept("needs-adjudication"),
            "valueBoolean": consensus.needs_adjudication,
        }
    ]
    return resource


def consensus_date(vs: VisitScore) -> dt.date:
    """The latest assessment date among the raters the consensus uses."""
    used = set(vs.consensus.raters)
    dates = [r.assessed_on for r in vs.raters if r.rater_id in used and r.assessed_on]
    return max(dates)


def to_consensus_observations(vs: VisitScore, ctx: MappingContext) -> list[Resource]:
    """Consensus MASI and mMASI of one subject x visit (same raters, same status)."""
    effective = consensus_date(vs)
    return [
        _consensus_observation(ctx, vs, "masi", vs.consensus.masi, vs.consensus, effective),
        _consensus_observation(ctx, vs, "mmasi", vs.consensus.mmasi, vs.consensus, effective),
    ]


def to_improvement_observation(vs: VisitScore, ctx: MappingContext) -> Resource | None:
    """MASI improvement (%) at a follow-up visit; None at baseline or without a baseline."""
    if vs.improvement_rounded is None or vs.improvement_status is None:
        return None
    resource = observation(
        ctx,
        improvement_value(vs.subject_id, vs.visit),
        "masi-improvement",
        subject_id=vs.subject_id,
        encounter=encounter_value(vs.subject_id, vs.visit),
        status=vs.improvement_status.value,
        category="exam",
        effective=consensus_date(vs),
    )
    resource["valueQuantity"] = percent_quantity(ctx, vs.improvement_rounded)
    resource["derivedFrom"] = [
        ctx.ref("Observation", consensus_value(vs.subject_id, ctx.trial.baseline_visit)),
        ctx.ref("Observation", consensus_value(vs.subject_id, vs.visit)),
    ]
    return resource


def to_pga_observation(
    assessment: PgaAssessment, vs: VisitScore | None, ctx: MappingContext
) -> Resource:
    """The physician's own PGA grade, with the MASI-implied grade and the discordance flag."""
    resource = observation(
        ctx,
        pga_value(assessment.subject_id, assessment.visit),
        "pga",
        subject_id=assessment.subject_id,
        encounter=encounter_value(assessment.subject_id, assessment.visit),
        status="final",
        category="exam",
        effective=assessment.assessed_on,
    )
    resource["performer"] = [ctx.ref("Practitioner", assessment.rater_id)]
    resource["valueInteger"] = assessment.pga
    implied = vs.pga_from_masi if vs is not None else None
    implied_component: dict[str, Any] = {"code": ctx.terminology.trial_concept("pga-from-masi")}
    if implied is None:
        implied_component["dataAbsentReason"] = not_applicable(ctx)
    else:
        implied_component["valueCodeableConcept"] = ctx.terminology.trial_concept(f"pga-{implied}")
    resource["component"] = [
        {
            "code": ctx.terminology.trial_concept("pga-grade"),
            "valueCodeableConcept": ctx.terminology.trial_concept(f"pga-{assessment.pga}"),
        },
        implied_component,
        {
            "code": ctx.terminology.trial_concept("pga-discordant"),
            "valueBoolean": pga_discordant(assessment.pga, implied),
        },
    ]
    if vs is not None and vs.improvement_pct is not None:
        resource["derivedFrom"] = [
            ctx.ref("Observation", improvement_value(assessment.subject_id, assessment.visit))
        ]
    return resource


def to_satisfaction_observation(response: SatisfactionResponse, ctx: MappingContext) -> Resource:
    resource = observation(
        ctx,
        satisfaction_value(response.subject_id, response.visit),
        "patient-satisfaction",
        subject_id=response.subject_id,
        encounter=encounter_value(response.subject_id, response.visit),
        status="final",
        category="survey",
        effective=response.assessed_on,
    )
    resource["performer"] = [ctx.ref("Patient", response.subject_id)]
    resource["valueCodeableConcept"] = ctx.terminology.trial_concept(response_level(response).value)
    if response.improvement_pct is not None:
        resource["component"] = [
            {
                "code": ctx.terminology.trial_concept("patient-improvement-estimate"),
                "valueQuantity": percent_quantity(ctx, response.improvement_pct),
            }
        ]
    if response.level is None:
        resource["note"] = [
            {"text": "Level derived from the patient's own improvement estimate (no level given)"}
        ]
    return resource


def to_eligibility_observation(result: EligibilityResult, ctx: MappingContext) -> Resource:
    resource = observation(
        ctx,
        eligibility_value(result.subject_id),
        "eligibility-assessment",
        subject_id=result.subject_id,
        encounter=encounter_value(result.subject_id, SCREENING),
        status="final" if result.result.value != "incomplete" else "preliminary",
        category="exam",
        effective=result.screened_on,
    )
    resource["valueCodeableConcept"] = ctx.terminology.trial_concept(result.result.value)
    resource["component"] = [
        {
            "code": ctx.terminology.trial_concept(criterion_id),
            "valueCodeableConcept": ctx.terminology.trial_concept(_STATE_CODE[state]),
        }
        for criterion_id, state in result.criteria
    ]
    return resource


# -- study level: the parts R4 and R5 assemble differently ---------------------------------
ADAPTER_DEVICE = "fhir-adapter"


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


def consent_policy_url(ctx: MappingContext) -> str:
    """The registry record the consent was given under (R4 policy.uri, R5 policyBasis.url)."""
    return f"https://clinicaltrials.gov/study/{ctx.study_value}"


# -- participants --------------------------------------------------------------------------
def subject_status(participant: Participant, eligibility: EligibilityResult | None) -> str:
    """ResearchSubject status (R4; the current R5 subjectState), first rule that applies."""
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


def subject_period(participant: Participant) -> dict[str, str]:
    period = {}
    start = participant.enrolled_on or participant.consent_date
    if start:
        period["start"] = start.isoformat()
    if participant.withdrawn_on:
        period["end"] = participant.withdrawn_on.isoformat()
    return period


# -- visits --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisitFacts:
    """What the accepted assessments of one subject x visit say about the visit itself."""

    start: dt.date | None = None  # earliest accepted assessment; None: no assessment
    out_of_window: bool = False  # an accepted assessment lies outside the visit window


def encounter_frame(
    ctx: MappingContext, subject_id: str, visit: str, facts: VisitFacts
) -> Resource:
    """Identity, study link, the out-of-window flag, type and subject of a visit Encounter."""
    resource = ctx.base("Encounter", encounter_value(subject_id, visit))
    resource["extension"] = [ctx.study_extension()]
    if facts.out_of_window:
        resource["extension"].append(
            {
                "url": ctx.terminology.trial_extension("visit-out-of-window"),
                "valueBoolean": True,
            }
        )
    return resource


def encounter_type(ctx: MappingContext, visit: str) -> list[dict[str, Any]]:
    return [ctx.terminology.trial_concept(f"visit-{visit}")]


# -- adverse events ------------------------------------------------------------------------
def severity_coding(ctx: MappingContext, grade: int) -> list[dict[str, str]]:
    """The R4 severity (mild / moderate / severe) and the CTCAE grade, as two codings."""
    severity = str(ctx.terminology.ae("severity_by_grade")[grade])
    return [
        ctx.terminology.coding("ae_severity", severity, severity.capitalize()),
        ctx.terminology.coding("ctcae_grade", str(grade), f"Grade {grade}"),
    ]


def ae_event_concept(ctx: MappingContext, event: AdverseEvent) -> dict[str, Any]:
    """The event: verified SNOMED CT / MedDRA codings, then the protocol's term in the trial
    code system (always: registries group on it); the source term as text.

    ``other`` has no external code: it is coded ``other`` in the trial code system. Free text
    (``term_text``) is personal data: the hospital target carries it as the text, the registry
    target the term's display ("Other" for ``other``).
    """
    term = ctx.terminology.ae_term(event.term.value)
    codings = [dict(c) for c in term.codings]
    concept: dict[str, Any] = {"coding": [*codings, ctx.terminology.trial_coding(term.token)]}
    hospital_text = event.term_text if ctx.target == "hospital" else None
    concept["text"] = hospital_text or term.display
    return concept


@dataclass(frozen=True)
class Suspect:
    """A study intervention listed as an AdverseEvent.suspectEntity."""

    resource_type: str  # Substance | Device
    intervention_id: str
    name: str
    assessed: bool  # the investigator's causality judgement concerns this intervention


def ae_suspects(ctx: MappingContext, event: AdverseEvent, arm: str | None) -> list[Suspect]:
    """The suspect entities, saying no more than the source.

    ``suspect`` given: exactly the interventions it names, each carrying the judgement.
    ``suspect`` empty: every intervention of the participant's arm, none carrying it (the
    judgement goes in :func:`ae_study_treatment_extension`); no arm: no suspect entity.
    """
    suspected = event.suspected(ctx.trial)
    if suspected:
        wanted, assessed = set(suspected), True
    else:
        arms = [a for a in ctx.trial.arms if a.id == arm]
        wanted, assessed = (set(arms[0].interventions) if arms else set()), False
    return [
        Suspect("Substance" if item.kind == "substance" else "Device", item.id, item.name, assessed)
        for item in ctx.trial.interventions
        if item.id in wanted
    ]


def ae_causality_coding(ctx: MappingContext, event: AdverseEvent) -> Coding | None:
    """The causality code of the context's FHIR version (None: the word maps to no code)."""
    return ctx.terminology.ae_causality(event.causality.value, ctx.fhir_version)


def ae_study_treatment_extension(ctx: MappingContext, event: AdverseEvent) -> dict[str, Any]:
    """The one judgement about the study treatment as a whole (``suspect`` empty)."""
    parts: list[dict[str, Any]] = []
    coding = ae_causality_coding(ctx, event)
    if coding is not None:
        parts.append({"url": "assessment", "valueCodeableConcept": {"coding": [coding]}})
    parts.append({"url": "productRelatedness", "valueString": event.causality.value})
    return {
        "url": ctx.terminology.trial_extension("ae-causality-study-treatment"),
        "extension": parts,
    }


def ae_extensions(ctx: MappingContext, event: AdverseEvent) -> list[dict[str, Any]]:
    """The trial's causality extension when the source names no suspect (else nothing)."""
    return [] if event.suspect else [ae_study_treatment_extension(ctx, event)]


def ae_action_taken(ctx: MappingContext, event: AdverseEvent) -> str | None:
    """``action_taken`` is free text: the hospital target only."""
    return event.action_taken if ctx.target == "hospital" else None


# -- derived values ------------------------------------------------------------------------
def measure_report_value(visit: str, arm: str | None) -> str:
    return f"satisfaction-{visit}-{arm or 'all'}"


def round_rate(value: Decimal) -> Decimal:
    return round_half_up(value, 1)


def report_group(rate: SatisfactionRate, ctx: MappingContext, score_key: str) -> dict[str, Any]:
    """One MeasureReport group (``score_key``: R4 measureScore, R5 measureScoreQuantity)."""
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


def satisfaction_report(
    rate: SatisfactionRate, period: tuple[dt.date, dt.date], ctx: MappingContext, score_key: str
) -> Resource:
    resource = ctx.base("MeasureReport", measure_report_value(rate.visit, rate.arm))
    resource["status"] = "complete"
    resource["type"] = "summary"
    resource["measure"] = measure_url(ctx)
    resource["date"] = period[1].isoformat()
    resource["reporter"] = sponsor_ref(ctx)
    resource["period"] = {"start": period[0].isoformat(), "end": period[1].isoformat()}
    resource["group"] = [report_group(rate, ctx, score_key)]
    return resource


def to_provenance(
    target: tuple[str, str],
    sources: Sequence[tuple[str, str]],
    recorded: dt.date,
    rules: Sequence[str],
    ctx: MappingContext,
) -> Resource:
    """Provenance of a derived value: adapter version, scoring rule versions, sources.

    The same in R4 and R5 for the elements used. ``recorded`` comes from the data (the latest
    source date), never from the clock.
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
