"""Follow rater MASI Observations changed on the FHIR server (``/fhir/notify``, SPEC §8).

A notification names a changed Observation (or only says "something changed"). For each subject
concerned the recompute re-reads the subject's MASI Observations from the server, takes the
**rater** ones (business identifier ``<subject>-<visit>-masi-<rater>`` and a ``performer``; the
adapter's own consensus Observations have neither, which is what keeps the loop from feeding
itself), reads each rating back from its 12 item components (a ``valueQuantity`` that disagrees
is a data-quality warning, never a source) and derives consensus MASI / mMASI, improvement and
the PGA-implied grade with the library's scoring and mapping:

- a subject whose participant came through the webhook is the inbox's: the server's ratings
  replace the inbox's rows (and the outbox learns that the server holds them), and the delivery
  worker re-derives the subject from the inbox like any other change;
- any other subject is derived here and staged under the source ``notify:<subject>``.

Staging is by content hash, so a repeated, duplicated or out-of-order notification writes no
new version. A derived resource changed on the server since the outbox last saw it is re-read
(its current version adopted) before the recomputed one replaces it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from fhir_adapter.domain import MasiRating, PgaAssessment, RecordContext
from fhir_adapter.errors import ServerError, ServerRejected, ServerUnavailable
from fhir_adapter.intake import Intake
from fhir_adapter.jsonout import dumpb
from fhir_adapter.mapping import common
from fhir_adapter.mapping.context import MappingContext, Resource
from fhir_adapter.mapping.dataset import DatasetMapper, builders, study_resources
from fhir_adapter.mapping.validation import ResourceValidator
from fhir_adapter.scoring import VisitScore, rater_masi, rater_score, score_visits
from fhir_adapter.sync.inbox import ORIGIN_SERVER, InboxConflict

if TYPE_CHECKING:
    from fhir_adapter.sync.delivery import DeliveryWorker

log = logging.getLogger(__name__)

_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?/?$")
_INACTIVE = frozenset({"entered-in-error", "cancelled"})
NOTIFY_SOURCE = "notify:"


def normalize_reference(reference: str) -> str | None:
    """``Type/id`` of a relative or absolute reference (``…/Observation/1/_history/2``)."""
    match = _REFERENCE.search(reference.split("?", 1)[0].split("#", 1)[0])
    return f"{match.group(1)}/{match.group(2)}" if match else None


@dataclass(frozen=True)
class RaterKey:
    subject_id: str
    visit: str
    rater_id: str


def parse_rater_value(value: str, visits: tuple[str, ...]) -> RaterKey | None:
    """``S001-m3-masi-R1`` -> (S001, m3, R1); None when it is not a rater MASI identifier."""
    head, sep, rater = value.rpartition("-masi-")
    if not sep or not rater:
        return None
    for visit in sorted(visits, key=len, reverse=True):
        suffix = f"-{visit}"
        if head.endswith(suffix) and len(head) > len(suffix):
            return RaterKey(head[: -len(suffix)], visit, rater)
    return None


def _codes(concept: Any) -> set[tuple[str, str]]:
    codings = concept.get("coding") if isinstance(concept, dict) else None
    return {
        (str(c.get("system")), str(c.get("code"))) for c in codings or [] if isinstance(c, dict)
    }


def _business_value(resource: dict[str, Any], system: str) -> str | None:
    identifiers = resource.get("identifier") or []
    for identifier in identifiers if isinstance(identifiers, list) else []:
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = identifier.get("value")
            return str(value) if value else None
    return None


def is_rater_masi(resource: Any, ctx: MappingContext) -> RaterKey | None:
    """The rater key of a rater MASI Observation of this trial; None for anything else."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Observation":
        return None
    if (ctx.terminology.trial_system, "masi") not in _codes(resource.get("code")):
        return None
    if not resource.get("performer"):
        return None  # the adapter's consensus has no performer
    value = _business_value(resource, ctx.system("Observation"))
    return None if value is None else parse_rater_value(value, ctx.trial.visit_ids)


def _local_date(value: Any, ctx: MappingContext) -> str | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    if len(value) == 10:
        return value
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(ctx.zone)
    return moment.date().isoformat()


def rating_record(
    resource: dict[str, Any], key: RaterKey, ctx: MappingContext
) -> tuple[dict[str, Any] | None, list[str]]:
    """The masi record a rater Observation holds (from its components), and warnings."""
    fields = common.masi_item_fields()
    system = ctx.terminology.trial_system
    record: dict[str, Any] = {
        "subject_id": key.subject_id,
        "visit": key.visit,
        "rater_id": key.rater_id,
        "assessed_on": _local_date(
            resource.get("effectiveDateTime")
            or (resource.get("effectivePeriod") or {}).get("start"),
            ctx,
        ),
    }
    for component in resource.get("component") or []:
        if not isinstance(component, dict):
            continue
        for sys, code in _codes(component.get("code")):
            if sys == system and code in fields:
                record[fields[code]] = component.get("valueInteger")
    missing = sorted(f for f in fields.values() if record.get(f) is None)
    if missing:
        return None, [f"components missing or not integers: {', '.join(missing)}"]
    try:
        rating = MasiRating.model_validate(record, context=RecordContext(trial=ctx.trial))
    except ValidationError as exc:
        bad = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors(include_input=False)})
        return None, [f"invalid components: {', '.join(bad)}"]
    warnings = []
    stated = _decimal((resource.get("valueQuantity") or {}).get("value"))
    if stated is not None and stated != rater_masi(rating):
        warnings.append("valueQuantity disagrees with the 12 components (the components count)")
    return record, warnings


def _decimal(value: Any) -> Decimal | None:
    """A JSON number as the Decimal it was written as (floats by their shortest repr)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        return None


class Recomputer:
    """Handles the queued notifications of one delivery worker."""

    def __init__(self, worker: DeliveryWorker) -> None:
        self.worker = worker
        self.ctx = worker.ctx

    # -- which subjects ----------------------------------------------------------------------
    def handle_events(self) -> int:
        """Recompute every subject the queued notifications concern; returns events handled.

        A server outage leaves the events queued (raised); other server errors skip the event.
        """
        inbox = self.worker.inbox
        events = inbox.events()
        subjects: dict[str, str | None] = {}
        for _, what, ref, body in events:
            try:
                for subject, patient in self._subjects(what, ref, body):
                    if subjects.get(subject) is None:
                        subjects[subject] = patient
            except ServerUnavailable:
                raise
            except ServerError as exc:
                log.warning("notification skipped: HTTP %s reading it back", exc.status)
        for subject, patient in sorted(subjects.items()):
            self.recompute(subject, patient)
        inbox.done_events(e[0] for e in events)
        return len(events)

    def _subjects(
        self, what: str, ref: str | None, body: bytes | None
    ) -> Iterator[tuple[str, str | None]]:
        client = self.worker.client
        if what == "query":
            yield from self._query_back()
            return
        if what == "subject" and ref is not None:  # a derived resource changed: re-derive
            yield ref, None
            return
        resource: Any = None
        if what == "resource" and body is not None:
            resource = orjson.loads(body)
        elif what == "ref" and ref is not None:
            rtype, rid = ref.split("/", 1)
            try:
                resource = client.read(rtype, rid)
            except ServerRejected as exc:
                if exc.status not in (404, 410):
                    raise
                what = "deleted"  # gone by the time we asked
        if what == "deleted" and ref is not None:
            rtype, rid = ref.split("/", 1)
            row = self.worker.outbox.by_server_id(rtype, rid)
            key = (
                None
                if row is None
                else parse_rater_value(row.bkey.split("|", 1)[1], self.ctx.trial.visit_ids)
            )
            if key is not None:
                yield key.subject_id, None
            return
        key = is_rater_masi(resource, self.ctx)
        if key is not None:
            yield (
                key.subject_id,
                normalize_reference(str((resource.get("subject") or {}).get("reference") or "")),
            )

    def _query_back(self) -> Iterator[tuple[str, str | None]]:
        """An empty notification: every rater MASI Observation changed since the last ask."""
        inbox = self.worker.inbox
        since = inbox.counters().get("notify_query_since")
        started = int(time.time())
        params = {"code": f"{self.ctx.terminology.trial_system}|masi", "_count": "1000"}
        if since:
            moment = dt.datetime.fromtimestamp(since - 120, dt.UTC)
            params["_lastUpdated"] = "ge" + moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        for resource in self.worker.client.search_all("Observation", params):
            key = is_rater_masi(resource, self.ctx)
            if key is not None:
                yield (
                    key.subject_id,
                    normalize_reference(
                        str((resource.get("subject") or {}).get("reference") or "")
                    ),
                )
        inbox.set_counter("notify_query_since", started)

    # -- one subject -------------------------------------------------------------------------
    def recompute(self, subject: str, patient: str | None) -> None:
        ctx, client = self.ctx, self.worker.client
        patient = patient or self._patient_reference(subject)
        if patient is None:
            log.warning("notification for a subject the server does not hold; ignored")
            return
        system = ctx.terminology.trial_system
        observations = list(
            client.search_all(
                "Observation",
                {
                    "subject": patient,
                    "code": f"{system}|masi,{system}|mmasi,{system}|masi-improvement,{system}|pga",
                    "_count": "1000",
                },
            )
        )
        raters = self._raters(observations)
        records: list[dict[str, Any]] = []
        for key, resource in sorted(raters.items(), key=lambda kv: _sort_key(kv[0])):
            record, warnings = rating_record(resource, key, ctx)
            for warning in warnings:
                log.warning("data quality: Observation %s: %s", resource.get("id"), warning)
            if record is not None:
                records.append(record)
                self._adopt_rater(record, resource)
        self._adopt_current(observations)
        if self.worker.inbox.has_participant(subject):
            self._into_inbox(subject, records)
            return
        resources = self._derived(subject, patient, records, observations)
        self._stage(subject, resources)

    def _raters(self, observations: list[dict[str, Any]]) -> dict[RaterKey, dict[str, Any]]:
        raters: dict[RaterKey, dict[str, Any]] = {}
        for resource in observations:
            key = is_rater_masi(resource, self.ctx)
            if key is None or resource.get("status") in _INACTIVE:
                continue
            if key in raters:
                log.warning("the server holds rater MASI %s-%s twice", key.visit, key.rater_id)
                newer = str((resource.get("meta") or {}).get("lastUpdated") or "")
                older = str((raters[key].get("meta") or {}).get("lastUpdated") or "")
                if newer <= older:
                    continue
            raters[key] = resource
        return raters

    def _patient_reference(self, subject: str) -> str | None:
        row = self.worker.outbox.row("Patient", f"{self.ctx.system('Patient')}|{subject}")
        if row is not None and row.server_id:
            return f"Patient/{row.server_id}"
        found = list(
            self.worker.client.search_all(
                "Patient", {"identifier": f"{self.ctx.system('Patient')}|{subject}"}
            )
        )
        return f"Patient/{found[0]['id']}" if found else None

    def _adopt(self, rtype: str, value: str, resource: dict[str, Any], body: bytes) -> None:
        self.worker.outbox.adopt(
            rtype,
            f"{self.ctx.system(rtype)}|{value}",
            MappingContext.resource_id(value),
            body,
            str(resource["id"]),
            (resource.get("meta") or {}).get("versionId"),
            "fhir-server",
        )

    def _adopt_rater(self, record: dict[str, Any], resource: dict[str, Any]) -> None:
        """The server holds this rating: a later mapping of the same rating sends nothing."""
        rating = MasiRating.model_validate(record, context=RecordContext(trial=self.ctx.trial))
        mapped = common.to_rater_masi_observation(rating, self.ctx)
        value = common.rater_masi_value(rating.subject_id, rating.visit, rating.rater_id)
        self._adopt("Observation", value, resource, dumpb(mapped))

    def _adopt_current(self, observations: list[dict[str, Any]]) -> None:
        """Derived resources changed on the server since the outbox saw them: re-read (adopt
        their current version), so the recomputed content replaces them with If-Match."""
        outbox = self.worker.outbox
        system = self.ctx.system("Observation")
        for resource in observations:
            if resource.get("performer") and is_rater_masi(resource, self.ctx):
                continue
            value = _business_value(resource, system)
            row = None if value is None else outbox.row("Observation", f"{system}|{value}")
            version = (resource.get("meta") or {}).get("versionId")
            if row is None or row.state not in ("sent", "conflict"):
                continue
            if row.state == "sent" and row.version_id == version:
                continue
            log.info("derived Observation %s changed on the server: re-read", resource.get("id"))
            outbox.adopt(
                "Observation",
                row.bkey,
                row.local_id,
                dumpb(resource),  # what the server holds now: the recomputed one replaces it
                str(resource["id"]),
                version,
                row.source,
            )

    def _into_inbox(self, subject: str, records: list[dict[str, Any]]) -> None:
        """The inbox's subject: its rater rows follow the server; the worker re-derives."""
        inbox = self.worker.inbox
        held = {r.key: r for r in inbox.rows_of_subject(subject) if r.kind == "masi"}
        changed = []
        for record in records:
            row = held.get(f"{record['subject_id']}/{record['visit']}/{record['rater_id']}")
            if row is not None and row.state not in ("delivered", "retracted", "rejected"):
                continue  # the inbox holds a newer change of its own, still to deliver
            if row is None or row.retracted or row.record != record:
                changed.append(record)
        if not changed:
            return
        try:
            inbox.accept("masi", changed, origin=ORIGIN_SERVER)
        except InboxConflict as exc:
            log.warning("ratings read back from the server not kept: %s", exc)
            return
        log.info("inbox: %d rater rows updated from the FHIR server", len(changed))

    # -- derived resources of a subject the inbox does not hold ------------------------------
    def _derived(
        self,
        subject: str,
        patient: str,
        records: list[dict[str, Any]],
        observations: list[dict[str, Any]],
    ) -> list[Resource]:
        ctx = self.ctx
        trial = ctx.trial
        context = RecordContext(trial=trial)
        ratings = [MasiRating.model_validate(r, context=context) for r in records]
        scores = score_visits(
            [(r.subject_id, r.visit, rater_score(r)) for r in ratings],
            self.worker.threshold,
            trial.visit_order,
            trial.baseline_visit,
        )
        self._adopt_references(subject, patient, observations)
        intake = Intake(trial=trial, settings=self.worker.settings)
        mapper = DatasetMapper(ctx, intake, threshold=self.worker.threshold)
        resources = list(mapper.derived_masi(scores))
        resources += self._pga(subject, scores, observations)
        return resources

    def _adopt_references(
        self, subject: str, patient: str, observations: list[dict[str, Any]]
    ) -> None:
        """Patient and Encounters the derived resources refer to, where the outbox lacks them."""
        outbox, client = self.worker.outbox, self.worker.client
        wanted: dict[tuple[str, str], str] = {("Patient", subject): patient}
        for resource in observations:
            key = is_rater_masi(resource, self.ctx)
            encounter = normalize_reference(
                str((resource.get("encounter") or {}).get("reference") or "")
            )
            if key is not None and encounter:
                value = common.encounter_value(key.subject_id, key.visit)
                wanted.setdefault(("Encounter", value), encounter)
        for (rtype, value), ref in wanted.items():
            row = outbox.row(rtype, f"{self.ctx.system(rtype)}|{value}")
            if row is not None and row.server_id:
                continue
            resource = client.read(*ref.split("/", 1))
            self._adopt(rtype, value, resource, dumpb(resource))

    def _pga(
        self, subject: str, scores: list[VisitScore], observations: list[dict[str, Any]]
    ) -> list[Resource]:
        """Each PGA Observation of the subject again, with the MASI-implied grade recomputed."""
        ctx = self.ctx
        by_visit = {vs.visit: vs for vs in scores}
        system = ctx.system("Observation")
        out: list[Resource] = []
        for resource in observations:
            if (ctx.terminology.trial_system, "pga") not in _codes(resource.get("code")):
                continue
            value = _business_value(resource, system) or ""
            visit = value.removeprefix(f"{subject}-").removesuffix("-pga")
            rater = self._performer_value(resource)
            if visit not in ctx.trial.visit_order or rater is None:
                continue
            try:
                assessment = PgaAssessment.model_validate(
                    {
                        "subject_id": subject,
                        "visit": visit,
                        "rater_id": rater,
                        "assessed_on": _local_date(resource.get("effectiveDateTime"), ctx),
                        "pga": resource.get("valueInteger"),
                    },
                    context=RecordContext(trial=ctx.trial),
                )
            except ValidationError:
                log.warning("data quality: PGA Observation %s unreadable", resource.get("id"))
                continue
            self._adopt_practitioner(rater, resource)
            vs = by_visit.get(visit)
            out.append(common.to_pga_observation(assessment, vs, ctx))
            if vs is not None and vs.pga_from_masi is not None:
                out.append(
                    builders(ctx).to_provenance(
                        ("Observation", common.pga_value(subject, visit)),
                        [("Observation", common.improvement_value(subject, visit))],
                        max(assessment.assessed_on, common.consensus_date(vs)),
                        ["pga-from-masi"],
                        ctx,
                    )
                )
        return out

    def _performer_value(self, resource: dict[str, Any]) -> str | None:
        ref = _first_reference(resource.get("performer"))
        if ref is None or not ref.startswith("Practitioner/"):
            return None
        row = self.worker.outbox.by_server_id("Practitioner", ref.split("/", 1)[1])
        if row is not None:
            return row.bkey.split("|", 1)[1]
        practitioner = self.worker.client.read(*ref.split("/", 1))
        return _business_value(practitioner, self.ctx.system("Practitioner"))

    def _adopt_practitioner(self, rater: str, pga: dict[str, Any]) -> None:
        ref = _first_reference(pga.get("performer"))
        outbox = self.worker.outbox
        bkey = f"{self.ctx.system('Practitioner')}|{rater}"
        row = outbox.row("Practitioner", bkey)
        if ref is None or (row is not None and row.server_id):
            return
        practitioner = self.worker.client.read(*ref.split("/", 1))
        self._adopt("Practitioner", rater, practitioner, dumpb(practitioner))

    def _stage(self, subject: str, resources: list[Resource]) -> None:
        ctx = self.ctx
        source = f"{NOTIFY_SOURCE}{subject}"
        validator = ResourceValidator(
            ctx.terminology, ctx.fhir_version, strict=self.worker.settings.strict_validation
        )
        items = []
        for resource in [*study_resources(ctx), *resources]:
            validator.check(resource)
            study = resource["resourceType"] not in ("Observation", "Provenance")
            items.append((f"{NOTIFY_SOURCE}study" if study else source, resource, dumpb(resource)))
        result = self.worker.outbox.stage(items, lambda: {source}, ctx.fhir_version)
        log.info(
            "recomputed from the server: %d resources (%d new, %d changed, %d retracted)",
            len(resources),
            result.new,
            result.changed,
            result.retracted,
        )


def _first_reference(references: Any) -> str | None:
    if not isinstance(references, list) or not references or not isinstance(references[0], dict):
        return None
    return normalize_reference(str(references[0].get("reference") or ""))


def _sort_key(key: RaterKey) -> tuple[str, str, str]:
    return key.subject_id, key.visit, key.rater_id


__all__ = [
    "NOTIFY_SOURCE",
    "RaterKey",
    "Recomputer",
    "is_rater_masi",
    "normalize_reference",
    "parse_rater_value",
    "rating_record",
]
