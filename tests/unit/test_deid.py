"""The pieces of the de-identified export: keys, date shifts, the allow-list, the scrubber, the
index and the Bulk writer, on small hand-made resources."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from fhir_adapter.errors import ConfigurationError
from fhir_adapter.export import BulkWriter, Exporter, Spooled, check_output, key_bytes, load_rules
from fhir_adapter.export.bulk import OutputRefused
from fhir_adapter.export.index import parse_reference
from fhir_adapter.export.keys import Keys, MissingKey, as_instant, shift_date
from fhir_adapter.export.rules import DeidRules
from fhir_adapter.export.vocabularies import trial_vocabularies
from fhir_adapter.mapping.terminology import Terminology
from fhir_adapter.trial import Trial, default_mappings_dir
from tests import export_checks as ec

KEY = b"unit-test-key-0123456789abcdefghijklmnop"
SITE = zoneinfo.ZoneInfo("Asia/Shanghai")
Resource = dict[str, Any]


# -- keys and dates -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("2024-03-01", 1, "2024-02-29"),  # leap day
        ("2025-01-05", 10, "2024-12-26"),  # across a year
        ("2024-08-28T00:00:00+08:00", 3, "2024-08-25T00:00:00+08:00"),  # time and zone kept
        ("2024-08-28T13:45:10.123Z", 365, "2023-08-29T13:45:10.123Z"),
        ("2024-03", 1, "2024-02"),  # year-month: its first day, cut back
        ("2024", 1, "2023"),
        ("2024-02-30", 1, None),
        ("not a date", 1, None),
        ("0001-01-01", 1, None),
    ],
)
def test_shift_date(value: str, days: int, expected: str | None) -> None:
    assert shift_date(value, days) == expected


def test_as_instant() -> None:
    assert as_instant("2024-08-28", SITE) == dt.datetime(2024, 8, 28, tzinfo=SITE)
    assert as_instant("2024-08-28T01:00:00Z", SITE) == dt.datetime(2024, 8, 28, 1, tzinfo=dt.UTC)
    assert as_instant("nope", SITE) is None


def test_pseudonyms_and_offsets_depend_on_the_key_only() -> None:
    keys = Keys(KEY, hex_length=32, max_shift_days=365)
    other = Keys(KEY + b"x", hex_length=32, max_shift_days=365)
    assert keys.pseudonym("S001") == ec.pseudonym(KEY.decode(), "S001")
    assert keys.pseudonym("S001") == keys.pseudonym("S001") != other.pseudonym("S001")
    assert len(keys.pseudonym("S001")) == 32
    shifts = [keys.shift_days(f"S{i:03d}") for i in range(500)]
    assert min(shifts) >= 1
    assert max(shifts) <= 365
    assert len(set(shifts)) > 200  # spread over the range, never 0
    small = Keys(KEY, hex_length=16, max_shift_days=1)
    assert {small.shift_days(f"S{i}") for i in range(20)} == {1}


def test_key_is_required_and_long() -> None:
    for secret in (None, SecretStr(""), SecretStr("short")):
        with pytest.raises(MissingKey) as caught:
            key_bytes(secret)
        assert "FHIR_ADAPTER_DEID_KEY" in str(caught.value)
        assert caught.value.exit_code == 66
    assert key_bytes(SecretStr("k" * 32)) == b"k" * 32


def test_parse_reference() -> None:
    base = "http://h/fhir/R4"
    assert parse_reference("Patient/S001") == ("Patient", "S001")
    assert parse_reference("Patient/S001/_history/3") == ("Patient", "S001")
    assert parse_reference(f"{base}/Patient/S001", base) == ("Patient", "S001")
    for ref in ("http://elsewhere/Patient/S001", "urn:uuid:1234", "#contained", "Patient/", "x/y"):
        assert parse_reference(ref, base) is None


# -- the allow-list file ------------------------------------------------------------------------
def test_packaged_rules_load(trial: Trial) -> None:
    vocabularies = trial_vocabularies(trial, Terminology(trial))
    rules = load_rules(None, vocabularies)
    assert "MeasureReport" in rules.dropped_types
    assert rules.types["Patient"].subject == "self"
    assert rules.types["ResearchStudy"].keeps_id()
    assert not rules.types["Practitioner"].subject_bound
    assert "Erythema" in vocabularies["ae_terms"]
    assert "possibly related" in vocabularies["causality_words"]
    assert "1565 nm non-ablative fractional laser" in vocabularies["intervention_names"]


def _mappings_with(tmp_path: Path, text: str) -> Path:
    target = tmp_path / "mappings"
    shutil.copytree(default_mappings_dir(), target)
    (target / "deidentify.yaml").write_text(text, encoding="utf-8")
    return target


PACKAGED = (default_mappings_dir() / "deidentify.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("      gender: keep", "      gender: publish"), "unknown action"),
        (("      gender: keep", "      gen-der: keep"), "dotted path"),
        (
            ("      status: keep\n      name: keep", "      status: keep\n      name: shift"),
            "needs a subject",
        ),
        (("{keep: ae_terms}", "{keep: star_signs}"), "unknown vocabularies"),
        (("{keep: ae_terms}", "{keep: ae_terms, also: x}"), "limited rule"),
        (("version: 1", "version: 2"), "version"),
        (("    valueBoolean: keep", "    - valueBoolean"), "mapping or 'drop'"),
        (("max_days: 365", "max_days: 0"), "max_days"),
        (("version: 1", "version: [1"), "not valid YAML"),
    ],
)
def test_broken_rules_are_refused(
    tmp_path: Path, trial: Trial, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in PACKAGED
    mappings = _mappings_with(tmp_path, PACKAGED.replace(old, new, 1))
    with pytest.raises(ConfigurationError, match=message):
        load_rules(mappings, trial_vocabularies(trial, Terminology(trial)))


def test_missing_rules_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not found"):
        load_rules(tmp_path)


# -- the scrubber, one resource at a time -------------------------------------------------------
@pytest.fixture(scope="module")
def rules(trial: Trial) -> DeidRules:
    return load_rules(None, trial_vocabularies(trial, Terminology(trial)))


def run_export(
    resources: list[Resource], rules: DeidRules, trial: Trial, tmp_path: Path
) -> tuple[dict[str, Any], dict[str, list[Resource]], list[dict[str, Any]]]:
    out = tmp_path / "out"
    exporter = Exporter(
        rules,
        KEY,
        identifier_base="urn:nct06677931",
        timezone=SITE,
        base_url="http://h/fhir/R4",
        vocabularies=trial_vocabularies(trial, Terminology(trial)),
    )
    exporter.run(lambda: iter(resources), BulkWriter(out))
    manifest, by_type = ec.load_export(out)
    issues = [
        issue
        for item in manifest["error"]
        for outcome in ec.read_ndjson(out / item["url"])
        for issue in outcome["issue"]
    ]
    return manifest, by_type, issues


def tag(kind: str, code: str) -> dict[str, Any]:
    return {"tag": [{"system": f"urn:nct06677931:{kind}", "code": code}]}


def patient(pid: str = "S001", **extra: Any) -> Resource:
    return {"resourceType": "Patient", "id": pid, "meta": tag("patient", pid), **extra}


def observation(oid: str, subject: str = "S001", **extra: Any) -> Resource:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": tag("observation", oid),
        "status": "final",
        "code": {"coding": [{"system": "urn:nct06677931:codes", "code": "masi"}]},
        "subject": {"reference": f"Patient/{subject}"},
        **extra,
    }


P = Keys(KEY, hex_length=32, max_shift_days=365).pseudonym


def test_rules_longest_path_wins_and_defaults_drop(
    rules: DeidRules, trial: Trial, tmp_path: Path
) -> None:
    obs = observation(
        "S001-m1-masi",
        meta={
            "versionId": "3",
            "lastUpdated": "2026-01-01T00:00:00Z",
            "tag": [
                {"system": "urn:nct06677931:observation", "code": "S001-m1-masi", "display": "x"},
                {"system": "http://other/tags", "code": "S001"},
            ],
        },
        valueQuantity={"value": 1.5, "unit": "score", "_value": {"id": "x"}},
        note=[{"text": "rater R1 says S001 is fine"}],
        interpretation=[{"coding": [{"system": "http://x", "code": "H"}], "text": "High for S001"}],
        focus=[{"reference": "Patient/S001"}],
        effectiveDateTime="2024-09-27",
        bodySite={
            "coding": [{"system": "http://snomed.info/sct", "code": "89545001"}],
            "text": "f",
        },
    )
    _, by_type, _ = run_export([patient(), obs], rules, trial, tmp_path)
    (clean,) = by_type["Observation"]
    assert clean["meta"] == {
        "tag": [{"system": "urn:nct06677931:observation", "code": P("S001-m1-masi")}]
    }
    assert clean["valueQuantity"] == {"value": 1.5, "unit": "score"}  # _value dropped
    assert "note" not in clean
    assert "focus" not in clean  # not listed
    assert clean["interpretation"] == [{"coding": [{"code": "H", "system": "http://x"}]}]
    assert clean["bodySite"] == {
        "coding": [{"code": "89545001", "system": "http://snomed.info/sct"}]
    }
    assert clean["subject"] == {"reference": f"Patient/{P('S001')}"}
    assert list(clean)[:3] == ["resourceType", "id", "meta"]
    assert list(clean)[3:] == sorted(list(clean)[3:])


def test_kept_values_that_look_like_dates_or_keys_are_removed(
    rules: DeidRules, trial: Trial, tmp_path: Path
) -> None:
    obs = observation(
        "S001-m1-pga",
        component=[
            {"code": {"coding": [{"system": "urn:nct06677931:codes", "code": "S001-note"}]}},
            {"code": {"coding": [{"system": "urn:nct06677931:codes", "code": "on 2024-09-01"}]}},
            {"code": {"coding": [{"system": "urn:nct06677931:codes", "code": "S0012 is fine"}]}},
        ],
    )
    _, by_type, issues = run_export([patient(), obs], rules, trial, tmp_path)
    codes = [c["code"]["coding"][0].get("code") for c in by_type["Observation"][0]["component"]]
    assert codes == [None, None, "S0012 is fine"]  # S001 as a word goes, inside S0012 not
    assert any("looked like a date or a business key" in i["diagnostics"] for i in issues)


def test_identifiers_outside_the_trial_base_and_mrns_are_dropped(
    rules: DeidRules, trial: Trial, tmp_path: Path
) -> None:
    person = patient(
        identifier=[
            {"system": "urn:nct06677931:patient", "value": "S001", "use": "official"},
            {"system": "urn:fhir-adapter:hospital-mrn", "value": "MRN-1"},
            {"value": "no system"},
        ],
        birthDate="1990-01-01",
        gender="female",
        name=[{"text": "Jane"}],
    )
    _, by_type, _ = run_export([person], rules, trial, tmp_path)
    assert by_type["Patient"] == [
        {
            "resourceType": "Patient",
            "id": P("S001"),
            "meta": {"tag": [{"system": "urn:nct06677931:patient", "code": P("S001")}]},
            "gender": "female",
            "identifier": [{"system": "urn:nct06677931:patient", "value": P("S001")}],
        }
    ]


def test_extensions_by_url_with_their_own_rules(
    rules: DeidRules, trial: Trial, tmp_path: Path
) -> None:
    causality = "urn:nct06677931/StructureDefinition/ae-causality-study-treatment"
    occurrence = "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/resolve-date"
    event = {
        "resourceType": "AdverseEvent",
        "id": "AE0001",
        "meta": tag("adverse-event", "AE0001"),
        "actuality": "actual",
        "subject": {"reference": "Patient/S001"},
        "date": "2024-09-10",
        "extension": [
            {"url": occurrence, "valueDateTime": "2024-09-20"},
            {
                "url": causality,
                "extension": [
                    {"url": "productRelatedness", "valueString": "possibly_related"},
                    {"url": "productRelatedness", "valueString": "my neighbour did it"},
                    {"url": "assessment", "valueCodeableConcept": {"text": "free"}},
                    {"url": "unknown-part", "valueString": "x"},
                ],
            },
            {
                "url": "http://hl7.org/fhir/uv/ae-research-backport-ig/StructureDefinition/mitigating-action",
                "extension": [{"url": "item", "valueCodeableConcept": {"text": "stopped cream"}}],
            },
            {"url": "http://example.org/unknown", "valueString": "secret"},
        ],
        "event": {"text": "my own words"},
    }
    _, by_type, issues = run_export([patient(), event], rules, trial, tmp_path)
    (clean,) = by_type["AdverseEvent"]
    days = Keys(KEY, hex_length=32, max_shift_days=365).shift_days("S001")
    start = (dt.date(2024, 9, 10) - dt.timedelta(days=days)).isoformat()
    end = (dt.date(2024, 9, 20) - dt.timedelta(days=days)).isoformat()
    assert clean["date"] == start
    assert clean["extension"] == [
        {"url": occurrence, "valueDateTime": end},
        {
            "url": causality,
            "extension": [{"url": "productRelatedness", "valueString": "possibly_related"}],
        },
    ]
    assert "event" not in clean  # free text where a term's display belongs
    text = " ".join(i["diagnostics"] for i in issues)
    assert "http://example.org/unknown" in text
    assert "mitigating-action" not in text  # known and dropped on purpose: no message
    assert "AdverseEvent.event.text" in text


def test_references_follow_their_targets(rules: DeidRules, trial: Trial, tmp_path: Path) -> None:
    study = {
        "resourceType": "ResearchStudy",
        "id": "server-uuid-1",
        "meta": tag("research-study", "NCT06677931"),
        "status": "active",
        "sponsor": {"reference": "Organization/gone", "display": "Sponsor"},
        "site": [{"reference": "http://h/fhir/R4/Location/loc-uuid"}],
    }
    site = {
        "resourceType": "Location",
        "id": "loc-uuid",
        "meta": tag("location", "site-1"),
        "name": "L",
    }
    obs = observation(
        "obs-uuid",
        meta=tag("observation", "S001-m1-masi"),
        derivedFrom=[{"reference": "Observation/obs-uuid/_history/2"}, {"reference": "urn:uuid:1"}],
        extension=[
            {
                "url": "http://hl7.org/fhir/StructureDefinition/workflow-researchStudy",
                "valueReference": {"reference": "ResearchStudy/server-uuid-1"},
            }
        ],
    )
    obs["subject"] = {"reference": "http://h/fhir/R4/Patient/pat-uuid", "display": "Jane"}
    _, by_type, issues = run_export(
        [study, site, patient("pat-uuid", meta=tag("patient", "S001")), obs], rules, trial, tmp_path
    )
    assert by_type["ResearchStudy"][0]["id"] == "NCT06677931"  # ids from the business key
    assert by_type["ResearchStudy"][0]["site"] == [{"reference": "Location/site-1"}]
    assert "sponsor" not in by_type["ResearchStudy"][0]  # its target is not in the export
    (clean,) = by_type["Observation"]
    assert clean["id"] == P("S001-m1-masi")
    assert clean["subject"] == {"reference": f"Patient/{P('S001')}"}  # display dropped
    assert clean["derivedFrom"] == [{"reference": f"Observation/{P('S001-m1-masi')}"}]
    assert clean["extension"][0]["valueReference"] == {"reference": "ResearchStudy/NCT06677931"}
    dangling = [i["diagnostics"] for i in issues if "outside the export" in i["diagnostics"]]
    assert len(dangling) == 2  # the sponsor, the urn:uuid


def test_who_is_withheld_and_why(rules: DeidRules, trial: Trial, tmp_path: Path) -> None:
    both = {
        "resourceType": "Provenance",
        "id": "two-subjects",
        "meta": tag("provenance", "two-subjects"),
        "target": [{"reference": "Observation/a"}, {"reference": "Observation/b"}],
        "recorded": "2024-09-01T00:00:00+08:00",
    }
    orphan = observation("orphan", subject="nobody")
    no_target = {
        "resourceType": "Provenance",
        "id": "p3",
        "meta": tag("provenance", "p3"),
        "target": [{"reference": "MeasureReport/m"}],
        "recorded": "2024-09-01T00:00:00+08:00",
    }
    twin = observation("a-copy", meta=tag("observation", "a"))
    outside = {"resourceType": "Observation", "id": "foreign", "status": "final"}
    resources = [
        patient("S001"),
        patient("S002"),
        observation("a"),
        observation("b", subject="S002"),
        observation("a"),  # the same resource twice: exported once
        both,
        orphan,
        no_target,
        twin,
        outside,
        {"resourceType": "MeasureReport", "id": "m"},
    ]
    manifest, by_type, issues = run_export(resources, rules, trial, tmp_path)
    assert {r["id"] for r in by_type["Observation"]} == {P("a"), P("b")}
    assert "Provenance" not in by_type
    errors = sorted(i["diagnostics"] for i in issues if i["severity"] == "error")
    assert errors == sorted(
        [
            f"Provenance/{P('two-subjects')} withheld: it refers to two subjects",
            f"Observation/{P('orphan')} withheld: its subject cannot be found",
            f"Observation/{P('a')} withheld: another resource of this type has the same business key",
        ]
    )
    assert manifest["error"][0]["count"] == len(issues)


def test_an_invalid_result_is_withheld_not_written(
    rules: DeidRules, trial: Trial, tmp_path: Path
) -> None:
    def refuse_observations(resource: Resource) -> None:
        if resource["resourceType"] == "Observation":
            raise ConfigurationError("Observation: status: Field required")

    exporter = Exporter(
        rules, KEY, identifier_base="urn:nct06677931", timezone=SITE, validate=refuse_observations
    )
    result = exporter.run(lambda: iter([patient(), observation("o")]), BulkWriter(tmp_path / "o"))
    assert result.withheld == 1
    assert result.counts == {"Patient": 1}
    text = (tmp_path / "o" / "OperationOutcome.ndjson").read_text()
    assert "not valid after de-identification" in text


def test_the_source_is_read_twice_or_spooled_once() -> None:
    calls = []

    def once() -> Iterator[Resource]:
        calls.append(1)
        yield {"resourceType": "Patient", "id": "S001", "x": 1.25}

    spool = Spooled(once)
    first, second = list(spool()), list(spool())
    spool.close()
    assert len(calls) == 1
    assert json.loads(json.dumps(first)) == [{"resourceType": "Patient", "id": "S001", "x": 1.25}]
    assert str(second[0]["x"]) == "1.25"  # read back exactly (Decimal)


# -- the output directory -----------------------------------------------------------------------
def test_check_output(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    (source / "Patient.ndjson").write_text("{}\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (source, source / "sub", tmp_path, busy, a_file):
        with pytest.raises(OutputRefused):
            check_output(out, [source])
    check_output(tmp_path / "new", [source])
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "manifest.json").write_text("{}")
    check_output(earlier, [source])


def test_a_failed_run_leaves_the_earlier_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("earlier")
    writer = BulkWriter(out)
    writer.add({"resourceType": "Patient", "id": "x"})
    writer.abort()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "manifest.json").read_text() == "earlier"
