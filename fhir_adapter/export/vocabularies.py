"""Closed lists a ``{keep: NAME}`` rule of ``mappings/deidentify.yaml`` may use.

Each comes from the trial's own definitions, so a string is kept only when it is one of the
values the adapter itself writes there (a term's display, an arm's name, a causality word);
anything else in that place, e.g. the free text of an `other` adverse event, is dropped.
"""

from __future__ import annotations

from fhir_adapter.domain.records import AeTerm, Causality
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.trial import Trial


def trial_vocabularies(trial: Trial, terminology: Terminology) -> dict[str, frozenset[str]]:
    return {
        # displays of the §3 terms from mappings/adverse_events.yaml (never term_text)
        "ae_terms": frozenset(terminology.ae_term(t.value).display for t in AeTerm),
        # ResearchSubject.assignedArm / actualArm carry ResearchStudy.arm.name
        "arm_names": frozenset(arm.name for arm in trial.arms),
        # AdverseEvent.suspectEntity.instance.display: the study interventions' names
        "intervention_names": frozenset(i.name for i in trial.interventions),
        # the investigator's causality words of adverse_events.csv, as written in FHIR
        "causality_words": frozenset(
            word for c in Causality for word in (c.value, c.value.replace("_", " "))
        ),
    }


__all__ = ["trial_vocabularies"]
