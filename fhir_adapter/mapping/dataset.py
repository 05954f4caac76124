"""Map a directory of source files to FHIR resources, streaming, in dependency order.

Resources come out with deterministic ids and ``Type/id`` references, each referenced resource
before the resources that refer to it: study-level resources, participants, then visits and
observations as the rows stream by, derived values once their inputs are complete.
Only per-visit summaries (scores, visit dates) are held in memory, never the rows.

Every resource is produced together with the source file kind it is removed with (SPEC §7),
passed along explicitly: ``(source, resource)``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Generator, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from fhir_adapter.domain import (
    AdverseEvent,
    EligibilityScreening,
    MasiRating,
    Participant,
    PgaAssessment,
    SatisfactionResponse,
)
from fhir_adapter.domain.records import Record
from fhir_adapter.eligibility import EligibilityResult, evaluate
from fhir_adapter.errors import InputUnreadable
from fhir_adapter.intake import KINDS, Intake, file_name
from fhir_adapter.io.csvfile import source_exists
from fhir_adapter.mapping import common, r4, r5
from fhir_adapter.mapping.common import VisitFacts
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.scoring import (
    RaterScore,
    VisitScore,
    rater_score,
    satisfaction_rates,
    score_visits,
)
from fhir_adapter.trial import Trial


def builders(ctx: MappingContext) -> ModuleType:
    return r4 if ctx.fhir_version == "R4" else r5


def study_resources(ctx: MappingContext) -> list[Resource]:
    """Resources that depend on the trial definition only."""
    b = builders(ctx)
    return [
        common.to_codesystem(ctx),
        common.to_satisfaction_measure(ctx),
        common.to_sponsor(ctx),
        *common.to_locations(ctx),
        b.to_enrollment_group(ctx),
        b.to_research_study(ctx),
        *b.to_interventions(ctx),
        b.to_adapter_device(ctx),
    ]


#: the files whose rows are assessments made at a visit (an AE's visit is where it was
#: recorded, not when: its dates never move the visit, SPEC §3)
ASSESSMENT_KINDS = ("masi", "pga", "satisfaction")
Assessment = MasiRating | PgaAssessment | SatisfactionResponse


def in_window(trial: Trial, participant: Participant | None, visit: str, day: dt.date) -> bool:
    """Whether an assessment on ``day`` lies in the visit's window (counted from the first
    treatment, SPEC §2); True when the window cannot be judged (no first_treatment_on)."""
    if participant is None or participant.first_treatment_on is None:
        return True
    earliest, latest = trial.window(visit)
    return earliest <= (day - participant.first_treatment_on).days <= latest


R = TypeVar("R", bound=Record)
Sourced = tuple[str, Resource]  # (source file kind, resource)
VisitKey = tuple[str, str]  # (subject_id, visit)


class DatasetMapper:
    """Turns the source records - one directory of the eCRF export, or the webhook's inbox
    (JSON records per kind) - into FHIR resources (a generator)."""

    def __init__(
        self,
        ctx: MappingContext,
        intake: Intake,
        *,
        threshold: Decimal | None = None,
        records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        source_prefix: str = "",
    ) -> None:
        #: JSON records per kind (the webhook's inbox) read instead of the directory's files;
        #: every kind then counts as present (the inbox is the complete set of what it holds)
        self.records = records
        #: prefixed to every source (``webhook:masi``): the outbox tells entry points apart, so
        #: a ``sync DIR`` never removes what the webhook brought, nor the reverse
        self.source_prefix = source_prefix
        self.ctx = ctx
        self.threshold = ctx.trial.adjudication_threshold if threshold is None else threshold
        self.intake = intake
        self.b = builders(ctx)
        self._encounters: set[VisitKey] = set()
        self._practitioners: set[str] = set()
        self._visits: dict[VisitKey, VisitFacts] = {}
        self.unreadable: list[str] = []
        self.present: set[str] = {"study"}

    # -- visits ---------------------------------------------------------------------------
    def visit_facts(self, directory: Path) -> dict[VisitKey, VisitFacts]:
        """Per subject x visit: the earliest date of the *accepted* assessments and whether one
        lies outside the visit window.

        A validation pass of its own (a separate Intake that reports nothing) ahead of the
        mapping pass, so that each Encounter - which must precede the Observations that refer
        to it - starts on its earliest accepted date whatever the order of the rows, and a
        rejected row never moves it. Only these two facts per visit are kept.
        """
        intake = self.intake
        probe = Intake(trial=intake.trial, today=intake.today, settings=intake.settings)
        facts: dict[VisitKey, VisitFacts] = {}
        for kind in ("participants", *ASSESSMENT_KINDS):
            for record in self._accepted(probe, directory, kind):
                if isinstance(record, Assessment):
                    self._add_visit_date(facts, probe, record)
        return facts

    def _accepted(self, intake: Intake, directory: Path, kind: str) -> Iterator[Record]:
        """The records of ``kind`` ``intake`` accepts: the inbox's, or the file's (none when the
        file is absent or unreadable: the mapping pass reports it)."""
        if self.records is not None:
            rows = self.records.get(kind, ())
            yield from intake.read_records(kind, rows, self.source_name(kind))[0]
            return
        path = directory / file_name(kind)
        if not source_exists(path):
            return
        try:
            yield from intake.read_csv(kind, path)
        except InputUnreadable:
            return

    def _add_visit_date(
        self, facts: dict[VisitKey, VisitFacts], probe: Intake, record: Assessment
    ) -> None:
        key = (record.subject_id, record.visit)
        known = facts.get(key, VisitFacts())
        participant = probe.participants.get(record.subject_id)
        outside = not in_window(self.ctx.trial, participant, record.visit, record.assessed_on)
        start = record.assessed_on if known.start is None else min(known.start, record.assessed_on)
        facts[key] = VisitFacts(start, known.out_of_window or outside)

    # -- lazily emitted shared resources -------------------------------------------------
    def _encounter(
        self, subject_id: str, visit: str, facts: VisitFacts | None = None
    ) -> Iterator[Sourced]:
        if (subject_id, visit) not in self._encounters:
            self._encounters.add((subject_id, visit))
            facts = facts or self._visits.get((subject_id, visit), VisitFacts())
            yield "shared", self.b.to_encounter(subject_id, visit, facts, self.ctx)

    def _practitioner(self, rater_id: str) -> Iterator[Sourced]:
        if rater_id not in self._practitioners:
            self._practitioners.add(rater_id)
            yield "shared", common.to_practitioner(rater_id, self.ctx)

    def _read(self, directory: Path, kind: str, model: type[R]) -> Iterator[R]:
        if self.records is not None:
            self.present.add(kind)
            accepted = self._accepted(self.intake, directory, kind)
            yield from (r for r in accepted if isinstance(r, model))
            return
        path = directory / file_name(kind)
        if not source_exists(path):  # a directory or FIFO in its place is unreadable, not absent
            return
        self.present.add(kind)
        try:
            for record in self.intake.read_csv(kind, path):
                if isinstance(record, model):  # always: KINDS[kind] is model
                    yield record
        except InputUnreadable as exc:
            if self.intake.on_issue is not None:
                self.intake.on_issue(f"error: {exc}")
            self.unreadable.append(path.name)
            self.present.discard(kind)  # an unreadable file removes nothing

    # -- the whole data set ---------------------------------------------------------------
    def sourced(self, directory: Path) -> Iterator[Sourced]:
        """(source, resource): the source file kind a resource is removed with (SPEC §7).

        Visits and raters are shared by several files: they count as removed only when every
        file was present (the ``shared`` source).
        """
        for source, resource in self._sourced(directory):
            yield self.source_prefix + source, resource
        # Retracted inbox records never remove the shared Encounters and Practitioners: the
        # retracted (entered-in-error) Observations still refer to them.
        if self.records is None and self.present >= {"study", *KINDS}:
            self.present.add("shared")

    def resources(self, directory: Path) -> Iterator[Resource]:
        for _, resource in self._sourced(directory):
            yield resource

    def complete_sources(self) -> set[str]:
        """Sources whose file was read whole with no rejected row: their absences are removals.

        A rejected row's records would look removed; with rejects, a file removes nothing.
        """
        with_rejects = {
            kind
            for kind in KINDS
            if (report := self.intake.reports.get(self.source_name(kind))) and report.rejected
        }
        complete = self.present - with_rejects
        if with_rejects:
            complete.discard("shared")
        return {self.source_prefix + source for source in complete}

    def source_name(self, kind: str) -> str:
        """Where records of ``kind`` come from, as issues name it: ``masi.csv``, ``inbox/masi``."""
        return file_name(kind) if self.records is None else f"inbox/{kind}"

    def _sourced(self, directory: Path) -> Iterator[Sourced]:
        if self.records is None and not source_exists(directory / file_name("participants")):
            raise InputUnreadable(
                f"{directory}: participants.csv is required (the other files refer to it)"
            )
        for resource in study_resources(self.ctx):
            yield "study", resource
        self._visits = self.visit_facts(directory)
        participants = list(self._read(directory, "participants", Participant))
        results = self._eligibility(directory)
        yield from self._participants(participants, results)
        yield from self._screenings(results)
        visit_scores = yield from self._masi(directory)
        yield from self._pga(directory, visit_scores)
        yield from self._satisfaction(directory)
        yield from self._adverse_events(directory)

    def _eligibility(self, directory: Path) -> dict[str, EligibilityResult]:
        results: dict[str, EligibilityResult] = {}
        for screening in self._read(directory, "eligibility", EligibilityScreening):
            participant = self.intake.participants.get(screening.subject_id)
            results[screening.subject_id] = evaluate(screening, participant, self.ctx.trial)
        return results

    def _participants(
        self, participants: list[Participant], results: dict[str, EligibilityResult]
    ) -> Iterator[Sourced]:
        ctx, b = self.ctx, self.b
        for p in participants:
            yield "participants", common.to_patient(p, ctx)
            yield "participants", b.to_consent(p, ctx)
            yield "participants", b.to_research_subject(p, results.get(p.subject_id), ctx)

    def _screenings(self, results: dict[str, EligibilityResult]) -> Iterator[Sourced]:
        ctx, b = self.ctx, self.b
        for result in results.values():
            facts = VisitFacts(start=result.screened_on)
            yield from self._encounter(result.subject_id, common.SCREENING, facts)
            yield "eligibility", common.to_eligibility_observation(result, ctx)
            yield (
                "eligibility",
                b.to_provenance(
                    ("Observation", common.eligibility_value(result.subject_id)),
                    [("Patient", result.subject_id)],
                    result.screened_on,
                    ["eligibility"],
                    ctx,
                ),
            )

    def _masi(self, directory: Path) -> Generator[Sourced, None, list[VisitScore]]:
        """Rater observations as they stream by, then the derived values; returns the scores."""
        scores: list[tuple[str, str, RaterScore]] = []
        for rating in self._read(directory, "masi", MasiRating):
            yield from self._practitioner(rating.rater_id)
            yield from self._encounter(rating.subject_id, rating.visit)
            yield "masi", common.to_rater_masi_observation(rating, self.ctx)
            scores.append((rating.subject_id, rating.visit, rater_score(rating)))
        visit_scores = score_visits(
            scores, self.threshold, self.ctx.trial.visit_order, self.ctx.trial.baseline_visit
        )
        for resource in self._derived_masi(visit_scores):
            yield "masi", resource
        return visit_scores

    def _pga(self, directory: Path, visit_scores: list[VisitScore]) -> Iterator[Sourced]:
        ctx, b = self.ctx, self.b
        by_visit = {(vs.subject_id, vs.visit): vs for vs in visit_scores}
        for assessment in self._read(directory, "pga", PgaAssessment):
            yield from self._practitioner(assessment.rater_id)
            yield from self._encounter(assessment.subject_id, assessment.visit)
            vs = by_visit.get((assessment.subject_id, assessment.visit))
            yield "pga", common.to_pga_observation(assessment, vs, ctx)
            if vs is not None and vs.pga_from_masi is not None:
                yield (
                    "pga",
                    b.to_provenance(
                        ("Observation", common.pga_value(assessment.subject_id, assessment.visit)),
                        [("Observation", common.improvement_value(vs.subject_id, vs.visit))],
                        max(assessment.assessed_on, common.consensus_date(vs)),
                        ["pga-from-masi"],
                        ctx,
                    ),
                )

    def _satisfaction(self, directory: Path) -> Iterator[Sourced]:
        ctx, b = self.ctx, self.b
        responses: list[SatisfactionResponse] = []
        for response in self._read(directory, "satisfaction", SatisfactionResponse):
            yield from self._encounter(response.subject_id, response.visit)
            yield "satisfaction", common.to_satisfaction_observation(response, ctx)
            if response.level is None:  # the level is derived from the patient's estimate
                yield (
                    "satisfaction",
                    b.to_provenance(
                        (
                            "Observation",
                            common.satisfaction_value(response.subject_id, response.visit),
                        ),
                        [("Patient", response.subject_id)],
                        response.assessed_on,
                        ["satisfaction"],
                        ctx,
                    ),
                )
            responses.append(response)
        for resource in self._satisfaction_reports(responses):
            yield "satisfaction", resource

    def _adverse_events(self, directory: Path) -> Iterator[Sourced]:
        """AEs; an AE's visit is where it was recorded: its Encounter, never its dates."""
        arm_of = {p.subject_id: p.arm for p in self.intake.participants.values()}
        for event in self._read(directory, "adverse_events", AdverseEvent):
            if event.visit:
                yield from self._encounter(event.subject_id, event.visit)
            yield (
                "adverse_events",
                self.b.to_adverse_event(event, arm_of.get(event.subject_id), self.ctx),
            )

    def derived_masi(self, visit_scores: list[VisitScore]) -> Iterator[Resource]:
        """Consensus MASI / mMASI, improvement and their Provenance, per subject x visit."""
        return self._derived_masi(visit_scores)

    def _derived_masi(self, visit_scores: list[VisitScore]) -> Iterator[Resource]:
        ctx, b = self.ctx, self.b
        for vs in visit_scores:
            recorded = common.consensus_date(vs)
            sources = [
                ("Observation", common.rater_masi_value(vs.subject_id, vs.visit, r))
                for r in vs.consensus.raters
            ]
            masi_obs, mmasi_obs = common.to_consensus_observations(vs, ctx)
            yield masi_obs
            yield b.to_provenance(
                ("Observation", common.consensus_value(vs.subject_id, vs.visit)),
                sources,
                recorded,
                ["masi", "consensus"],
                ctx,
            )
            yield mmasi_obs
            yield b.to_provenance(
                ("Observation", common.consensus_value(vs.subject_id, vs.visit, "mmasi")),
                sources,
                recorded,
                ["mmasi", "consensus"],
                ctx,
            )
            improvement = common.to_improvement_observation(vs, ctx)
            if improvement is not None and vs.baseline is not None:
                yield improvement
                yield b.to_provenance(
                    ("Observation", common.improvement_value(vs.subject_id, vs.visit)),
                    [
                        (
                            "Observation",
                            common.consensus_value(vs.subject_id, ctx.trial.baseline_visit),
                        ),
                        ("Observation", common.consensus_value(vs.subject_id, vs.visit)),
                    ],
                    recorded,
                    ["improvement"],
                    ctx,
                )

    def _satisfaction_reports(self, responses: list[SatisfactionResponse]) -> Iterator[Resource]:
        ctx, b = self.ctx, self.b
        arm_of = {p.subject_id: p.arm for p in self.intake.participants.values() if p.enrolled}
        rates = satisfaction_rates(responses, arm_of, ctx.trial.visit_order)
        for rate in rates:
            members = [
                r
                for r in responses
                if r.visit == rate.visit
                and (rate.arm is None or arm_of.get(r.subject_id) == rate.arm)
            ]
            days = [r.assessed_on for r in members]
            period = (min(days), max(days))
            report = b.to_satisfaction_report(rate, period, ctx)
            yield report
            yield b.to_provenance(
                ("MeasureReport", common.measure_report_value(rate.visit, rate.arm)),
                [
                    ("Observation", common.satisfaction_value(r.subject_id, r.visit))
                    for r in sorted(members, key=lambda r: r.subject_id)
                ],
                period[1],
                ["satisfaction"],
                ctx,
            )
