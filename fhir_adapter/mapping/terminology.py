"""Codes of the FHIR output, loaded from ``mappings/*.yaml`` (never Python constants)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from fhir_adapter.domain.records import AeTerm
from fhir_adapter.errors import ConfigurationError
from fhir_adapter.trial import Trial, default_mappings_dir

Coding = dict[str, str]
#: confidence and evidence strength, weakest first
CONFIDENCE_LEVELS = ("low", "medium", "high")
MEDDRA_LEVELS = frozenset({"LLT", "PT", "HLT", "HLGT", "SOC"})


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: mapping file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: expected a mapping at the top level")
    return data


def _require(data: dict[str, Any], source: str, *keys: str) -> Any:
    value: Any = data
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ConfigurationError(f"{source}: missing key {'.'.join(keys[: i + 1])}")
        value = value[key]
    return value


@dataclass(frozen=True)
class AeTermCodes:
    token: str
    display: str
    codings: tuple[Coding, ...]  # emitted codings (with evidence, not under review)
    candidates: tuple[Coding, ...]  # `review: true` codes, not emitted


def ae_code_problems(entry: Any, sources: dict[str, Any]) -> list[str]:
    """Why one code entry of adverse_events.yaml may not stand (empty: it may).

    An entry names a confidence no higher than its strongest evidence; an entry that is not
    ``review: true`` must have evidence, each naming a known source, its version and the row.
    """
    if not isinstance(entry, dict):
        return ["not a mapping"]
    problems = [f"{key} missing" for key in ("code", "display") if not entry.get(key)]
    confidence = entry.get("confidence")
    if confidence not in CONFIDENCE_LEVELS:
        return [*problems, f"confidence must be one of {', '.join(CONFIDENCE_LEVELS)}"]
    evidence = entry.get("evidence") or []
    strengths = []
    for item in evidence:
        if not isinstance(item, dict) or item.get("source") not in sources:
            problems.append("evidence names an unknown source")
            continue
        problems += [f"evidence {key} missing" for key in ("version", "row") if not item.get(key)]
        if item.get("strength") not in CONFIDENCE_LEVELS:
            problems.append("evidence strength missing")
        else:
            strengths.append(CONFIDENCE_LEVELS.index(item["strength"]))
    if not entry.get("review") and not evidence:
        problems.append("no evidence: must be review: true")
    if evidence and CONFIDENCE_LEVELS.index(confidence) > max(strengths, default=-1):
        problems.append("confidence is higher than its evidence")
    return problems


class Terminology:
    """The trial code system, external systems, AE concept map and value sets."""

    def __init__(self, trial: Trial, mappings_dir: Path | None = None) -> None:
        base = mappings_dir or default_mappings_dir()
        self.trial = trial
        self.codesystem = _load(base / "codesystem.yaml")
        self.fhir = _load(base / "fhir.yaml")
        self.ae_map = _load(base / "adverse_events.yaml")
        self.extensions = _load(base / "extensions.yaml")
        self._sources = {
            "codesystem": str(base / "codesystem.yaml"),
            "fhir": str(base / "fhir.yaml"),
            "ae": str(base / "adverse_events.yaml"),
            "extensions": str(base / "extensions.yaml"),
        }
        # fail at start-up, naming the key, rather than half-way through a run
        self.trial_system = str(_require(self.codesystem, self._sources["codesystem"], "url"))
        for key in ("systems", "condition", "body_sites", "adverse_event", "value_sets"):
            _require(self.fhir, self._sources["fhir"], key)
        for key in ("canonical_base", "trial", "external"):
            _require(self.extensions, self._sources["extensions"], key)
        self._check_ae_terms()

    # -- systems ----------------------------------------------------------------------------
    def system(self, name: str) -> str:
        return str(_require(self.fhir, self._sources["fhir"], "systems", name))

    def coding(self, system_name: str, code: str, display: str | None = None) -> Coding:
        coding = {"system": self.system(system_name), "code": code}
        if display:
            coding["display"] = display
        return coding

    # -- trial code system -------------------------------------------------------------------
    @cached_property
    def concepts(self) -> dict[str, dict[str, Any]]:
        """Every concept of the trial code system, including arms, visits and criteria."""
        out: dict[str, dict[str, Any]] = {}
        for concept in _require(self.codesystem, self._sources["codesystem"], "concepts"):
            out[str(concept["code"])] = dict(concept)
        for arm in self.trial.arms:
            out[f"arm-{arm.id}"] = {"code": f"arm-{arm.id}", "display": arm.name}
        for visit in self.trial.visits:
            out[f"visit-{visit.id}"] = {"code": f"visit-{visit.id}", "display": visit.label}
        out["visit-screening"] = {"code": "visit-screening", "display": "Screening"}
        for criterion in self.trial.criteria:
            out[criterion.id] = {
                "code": criterion.id,
                "display": f"{criterion.kind.capitalize()} criterion {criterion.id}",
                "definition": criterion.text,
            }
        return out

    def trial_coding(self, code: str) -> Coding:
        concept = self.concepts.get(code)
        if concept is None:
            raise KeyError(f"code {code!r} is not defined in the trial code system")
        return {"system": self.trial_system, "code": code, "display": str(concept["display"])}

    def trial_concept(self, code: str, text: str | None = None) -> dict[str, Any]:
        cc: dict[str, Any] = {"coding": [self.trial_coding(code)]}
        if text:
            cc["text"] = text
        return cc

    # -- SNOMED body sites, condition ---------------------------------------------------------
    def body_site(self, name: str) -> Coding:
        site = _require(self.fhir, self._sources["fhir"], "body_sites", name)
        return self.coding("snomed", str(site["code"]), str(site["display"]))

    def body_site_by_code(self, code: str) -> Coding:
        for name, site in self.fhir["body_sites"].items():
            if str(site["code"]) == code:
                return self.body_site(name)
        raise KeyError(f"SNOMED body site {code} is not in fhir.yaml body_sites")

    @cached_property
    def condition_codings(self) -> list[Coding]:
        return [
            self.coding(str(c["system"]), str(c["code"]), str(c["display"]))
            for c in self.fhir["condition"]
        ]

    # -- adverse events ---------------------------------------------------------------------
    def ae(self, key: str, version: str = "R4") -> Any:
        """An AE code table; for R5 ``adverse_event_r5`` first, then the R4 table."""
        if version.upper() == "R5":
            r5 = self.fhir.get("adverse_event_r5") or {}
            if key in r5:
                return r5[key]
        return _require(self.fhir, self._sources["fhir"], "adverse_event", key)

    def research_r5(self, key: str) -> Any:
        """R5-only research codes (ResearchSubject.progress, ResearchStudy.progressStatus)."""
        return _require(self.fhir, self._sources["fhir"], "research_r5", key)

    def _check_ae_terms(self) -> None:
        source = self._sources["ae"]
        terms = _require(self.ae_map, source, "terms")
        missing = [t.value for t in AeTerm if t.value not in terms]
        if missing:
            raise ConfigurationError(f"{source}: terms: missing {', '.join(missing)}")
        uncoded = [str(t) for t in terms if str(t) not in self.concepts]
        if uncoded:  # every event carries its term in the trial code system
            raise ConfigurationError(
                f"{self._sources['codesystem']}: concepts: no code for the adverse-event "
                f"term(s) {', '.join(uncoded)} of {source}"
            )
        _require(self.ae_map, source, "meddra_version")
        sources = self.ae_map.get("sources") or {}
        for token, entry in terms.items():
            for system_key in ("snomed", "meddra"):
                if system_key not in entry:
                    continue
                problems = ae_code_problems(entry[system_key], sources)
                if system_key == "meddra" and entry[system_key].get("level") not in MEDDRA_LEVELS:
                    problems.append("MedDRA level (LLT, PT, ...) missing")
                if problems:
                    where = f"terms.{token}.{system_key}"
                    raise ConfigurationError(f"{source}: {where}: {'; '.join(problems)}")

    def ae_term(self, token: str) -> AeTermCodes:
        """SNOMED CT and MedDRA codings of an AE token; MedDRA codings carry their version."""
        entry = self.ae_map["terms"][token]
        systems = self.ae_map["systems"]
        codings: list[Coding] = []
        candidates: list[Coding] = []
        for system_key in ("snomed", "meddra"):
            code = entry.get(system_key)
            if not code:
                continue
            coding = {"system": str(systems[system_key])}
            if system_key == "meddra":
                coding["version"] = str(self.ae_map["meddra_version"])
            coding["code"] = str(code["code"])
            coding["display"] = str(code["display"])
            (candidates if code.get("review") else codings).append(coding)
        return AeTermCodes(token, str(entry["display"]), tuple(codings), tuple(candidates))

    def ae_causality(self, word: str, version: str = "R4") -> Coding | None:
        """The adverse-event-causality-assess Coding of a source causality word (None: none)."""
        code = self.ae("causality", version)[word]
        if code is None:
            return None
        display = str(self.ae("causality_display", version)[code])
        return self.coding("ae_causality", str(code), display)

    # -- extensions ---------------------------------------------------------------------------
    def trial_extension(self, extension_id: str) -> str:
        """Canonical URL of an extension the trial defines (extensions.yaml ``trial``)."""
        _require(self.extensions, self._sources["extensions"], "trial", extension_id)
        base = _require(self.extensions, self._sources["extensions"], "canonical_base")
        return f"{base}/StructureDefinition/{extension_id}"

    def external_extension(self, key: str) -> str:
        """URL of a published extension (extensions.yaml ``external``)."""
        return str(_require(self.extensions, self._sources["extensions"], "external", key))

    # -- value sets -------------------------------------------------------------------------
    def value_sets(self, version: str) -> dict[str, frozenset[str]]:
        table = self.fhir["value_sets"][version.lower()]
        return {path: frozenset(str(c) for c in codes) for path, codes in table.items()}

    @cached_property
    def coding_value_sets(self) -> dict[str, frozenset[str]]:
        """system -> allowed codes, as R4 spells them."""
        return self.coding_value_sets_for("R4")

    def coding_value_sets_for(self, version: str) -> dict[str, frozenset[str]]:
        """system -> allowed codes for ``version``: ``codings``, replaced per system by
        ``<version>_codings`` (e.g. ``r5_codings``) where the version spells them differently."""
        tables = self.fhir["value_sets"]
        sets: dict[str, frozenset[str]] = {}
        for name in ("codings", f"{version.lower()}_codings"):
            for system, codes in (tables.get(name) or {}).items():
                sets[system] = frozenset(str(c) for c in codes)
        sets[self.trial_system] = frozenset(self.concepts)
        return sets
