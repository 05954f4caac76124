"""The de-identified export end to end: index, scrub, validate, write (SPEC §9, §13).

Two passes over the source: the first builds the :class:`ResourceIndex` (business keys,
subjects, what is exported), the second rewrites each resource through the allow-list and
validates it. A source that cannot be read twice (a FHIR server) is spooled during the first
pass to an anonymous temporary file, so both passes see the same data. Memory holds the index
(a few strings per resource), never the resources.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO, Any

from fhir_adapter import __version__
from fhir_adapter.errors import AdapterError
from fhir_adapter.export.bulk import BulkWriter
from fhir_adapter.export.index import ResourceIndex
from fhir_adapter.export.keys import Keys
from fhir_adapter.export.rules import DeidRules
from fhir_adapter.export.scrub import Findings, Scrubber, ScrubContext, Withheld
from fhir_adapter.jsonout import dumpb

Resource = dict[str, Any]
ResourceSource = Callable[[], Iterable[Resource]]  # called once per pass
Validator = Callable[[Resource], None]  # raises AdapterError for an invalid resource

EXTENSION_URL = "urn:fhir-adapter:deidentification"
_EPOCH = "1970-01-01T00:00:00Z"


@dataclass
class ExportResult:
    counts: dict[str, int]
    manifest: dict[str, Any]
    withheld: int
    findings: Findings
    outside_trial: Counter[str] = field(default_factory=Counter)
    not_exported: Counter[str] = field(default_factory=Counter)


class Spooled:
    """A one-shot source made readable twice: the first read copies it to a temporary file."""

    def __init__(self, source: Callable[[], Iterable[Resource]]) -> None:
        self.source = source
        self._file: IO[bytes] | None = None

    def __call__(self) -> Iterator[Resource]:
        if self._file is None:
            return self._first()
        return self._again()

    def _first(self) -> Iterator[Resource]:
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        for resource in self.source():
            spool.write(dumpb(resource) + b"\n")
            yield resource
        self._file = spool

    def _again(self) -> Iterator[Resource]:
        assert self._file is not None  # noqa: S101 - only reached after _first
        self._file.seek(0)
        for line in self._file:
            yield json.loads(line, parse_float=Decimal)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _outcome(severity: str, code: str, text: str) -> Resource:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}],
    }


class Exporter:
    """One export run: the rules, the key and where the resources go."""

    def __init__(
        self,
        rules: DeidRules,
        key: bytes,
        *,
        identifier_base: str,
        timezone: dt.tzinfo,
        base_url: str | None = None,
        validate: Validator | None = None,
        vocabularies: dict[str, frozenset[str]] | None = None,
        on_resource: Callable[[], None] | None = None,
    ) -> None:
        self.rules = rules
        self.keys = Keys(key, hex_length=rules.hex_length, max_shift_days=rules.max_shift_days)
        self.index = ResourceIndex(rules, self.keys, identifier_base, base_url)
        self.scrubber = Scrubber(rules, self.keys, identifier_base, timezone, vocabularies)
        self.validate = validate
        self.on_resource = on_resource
        self.withheld = 0

    def run(self, source: ResourceSource, writer: BulkWriter) -> ExportResult:
        for resource in source():
            self.index.add(resource)
        self.index.finish()
        for resource in source():
            self._one(resource, writer)
            if self.on_resource is not None:
                self.on_resource()
        self._report_findings(writer)
        manifest = writer.finish(
            transaction_time=self._transaction_time(),
            request="$export?_type=" + ",".join(self.rules.exported_types),
            extension={EXTENSION_URL: self._description()},
        )
        return ExportResult(
            counts={o["type"]: o["count"] for o in manifest["output"]},
            manifest=manifest,
            withheld=self.withheld,
            findings=self.scrubber.findings,
            outside_trial=self.index.outside_trial,
            not_exported=self.index.not_exported,
        )

    def _one(self, resource: Resource, writer: BulkWriter) -> None:
        rtype, sid = str(resource.get("resourceType", "")), resource.get("id")
        key = (rtype, sid) if isinstance(sid, str) else None
        entry = self.index.entries.get(key) if key else None
        if key is None or entry is None or entry.written:
            return
        entry.written = True
        new_id = self.keys.pseudonym(entry.identity)
        if entry.problem is not None:
            self._withhold(writer, rtype, new_id, entry.problem, "processing")
            return
        if not entry.exported:
            return
        new_id = self.index.new_id(key)
        ctx = ScrubContext(
            rtype=rtype,
            new_id=new_id,
            identity=entry.identity,
            subject=entry.subject,
            shift_days=self.keys.shift_days(entry.subject) if entry.subject else None,
            resolve=self.index.resolve,
        )
        try:
            clean = self.scrubber.scrub(resource, ctx)
            if self.validate is not None:
                self.validate(clean)
        except Withheld as exc:
            self._withhold(writer, rtype, new_id, str(exc), "extension")
            return
        except AdapterError as exc:  # invalid after scrubbing: a gap in the allow-list
            self._withhold(
                writer, rtype, new_id, f"not valid after de-identification: {exc}", "invalid"
            )
            return
        writer.add(clean)

    def _withhold(self, writer: BulkWriter, rtype: str, new_id: str, why: str, code: str) -> None:
        self.withheld += 1
        writer.add_issue(_outcome("error", code, f"{rtype}/{new_id} withheld: {why}"))

    def _report_findings(self, writer: BulkWriter) -> None:
        f = self.scrubber.findings
        tables = (
            (
                f.unknown_extensions,
                "extension",
                "extensions with URL {1} not on the allow-list were removed from {0}",
            ),
            (
                f.guarded,
                "suppressed",
                "kept values at {1} looked like a date or a business key and were removed",
            ),
            (f.unparsable_dates, "suppressed", "values at {1} are not FHIR dates and were removed"),
            (
                f.dangling,
                "suppressed",
                "references at {1} point outside the export and were removed",
            ),
            (
                f.unlisted,
                "suppressed",
                "values at {1} are not in their closed list and were removed",
            ),
        )
        for counter, code, text in tables:
            for (rtype, where), n in sorted(counter.items()):
                writer.add_issue(_outcome("warning", code, f"{n} " + text.format(rtype, where)))

    def _transaction_time(self) -> str:
        latest = self.scrubber.findings.latest
        if latest is None:
            return _EPOCH  # nothing dated in the export
        return latest.astimezone(self.scrubber.tz).isoformat(timespec="seconds")

    def _description(self) -> dict[str, Any]:
        return {
            "kind": "limited data set: pseudonymized, dates shifted per subject "
            "(not HIPAA Safe Harbor)",
            "pseudonyms": f"HMAC-SHA256, first {self.rules.hex_length} hex characters",
            "dateShift": "every date of a subject moved back by the same 1 to "
            f"{self.rules.max_shift_days} days",
            "allowList": "mappings/deidentify.yaml",
            "allowListSha256": self.rules.digest,
            "adapterVersion": __version__,
        }


__all__ = ["EXTENSION_URL", "ExportResult", "Exporter", "ResourceSource", "Spooled", "Validator"]
