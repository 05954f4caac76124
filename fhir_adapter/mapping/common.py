"""Builders whose output is the same in R4 and R5 (Observation and the simple resources).

Pure functions: a domain object and a :class:`MappingContext` in, a FHIR resource (a dict with
``Type/id`` references) out. No I/O, no clock.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from fhir_adapter.domain import (
    MasiRating,
    Participant,
    PgaAssessment,
    SatisfactionResponse,
)
from fhir_adapter.eligibility import CriterionState, EligibilityResult
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.scoring import (
    Consensus,
    VisitScore,
    pga_discordant,
    response_level,
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
    from fhir_adapter.scoring import rater_masi

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
