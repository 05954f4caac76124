"""``POST /ingest/<kind>`` and ``DELETE /ingest/<kind>/<key>``: the EHR pushes source records.

A body is one JSON record or a list, with the field names of the CSV files (SPEC §3), validated
by the same intake as ``validate``. A request is accepted or refused whole. Accepted records are
committed to the inbox before the ``202``; the delivery worker maps and sends them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, g, request

from fhir_adapter.errors import InvalidInput
from fhir_adapter.intake import KINDS, Intake, Issue, site_today
from fhir_adapter.io import load_json_records
from fhir_adapter.mapping import common
from fhir_adapter.sync.inbox import (
    KEY_FIELDS,
    PRIMARY_TYPE,
    InboxConflict,
    InboxUnavailable,
    Replayed,
    RetractRefused,
    cross_record_issues,
    record_ident,
)
from server.auth import Caller
from server.outcome import Problem, error_response, json_response, outcome_response
from server.state import AppState, state

log = logging.getLogger(__name__)

bp = Blueprint("ingest", __name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_ISSUE_CODE = {"is required": "required"}


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def parse_body(body: bytes) -> list[dict[str, Any]] | Response:
    """The records of a JSON body, or the error answer (415, 400)."""
    if not _is_json(request.mimetype):
        return error_response(
            415, "the body must be JSON (Content-Type: application/json)", "not-supported"
        )
    try:
        return load_json_records(body)
    except InvalidInput as exc:
        return error_response(400, f"malformed body: {exc}", "structure")
    except RecursionError:
        return error_response(400, "malformed body: JSON nested too deeply", "structure")


def _unknown_fields(kind: str, records: list[dict[str, Any]], st: AppState) -> list[Problem]:
    known = st.known_fields(kind)
    problems = []
    for index, record in enumerate(records):
        for name in record:
            if name in known:
                continue
            shown = name if _SAFE_NAME.match(name) else "(a field name)"
            problems.append(
                Problem(
                    f"unknown field {shown} (fields are those of {kind}.csv)",
                    "structure",
                    f"{kind}[{index}].{shown}",
                )
            )
    return problems


def validate(kind: str, records: list[dict[str, Any]], st: AppState) -> list[Problem]:
    """Every problem of every record, by field; never a submitted value. The rules across
    records apply where the inbox holds the records they depend on (``cross_record_issues``)."""
    problems = _unknown_fields(kind, records, st)
    intake = Intake(
        trial=st.trial, today=site_today(st.ctx.timezone), cross_file=False, settings=st.settings
    )
    _, issues = intake.read_records(kind, records, kind)
    if not problems and not any(i.severity == "error" for i in issues):
        cross = Intake(trial=st.trial, today=intake.today, settings=st.settings)
        issues = cross_record_issues(st.inbox, cross, kind, records)
    return problems + _problems(kind, issues)


def _problems(kind: str, issues: list[Issue]) -> list[Problem]:
    problems = []
    for issue in issues:
        if issue.severity != "error":
            continue
        where = f"{kind}[{issue.line}]" if issue.line is not None else kind
        if issue.field:
            where += f".{issue.field}"
        # a file's intake may drop one field and keep the row ("…; the MRN was dropped"):
        # the webhook refuses the request instead, so only the reason itself is given
        reason = issue.reason.split("; ", 1)[0]
        text = f"{issue.field}: {reason}" if issue.field else reason
        problems.append(Problem(text, _ISSUE_CODE.get(issue.reason, "value"), where))
    return problems


def identifiers(kind: str, record: Mapping[str, Any], st: AppState) -> list[dict[str, str]]:
    """The business identifiers the record's resources will carry (SPEC §6)."""
    ctx = st.ctx
    ident = record_ident(kind, record)
    primary = PRIMARY_TYPE[kind]
    out = [ctx.identifier(primary, ident)]
    subject = str(record.get("subject_id") or "")
    visit = str(record.get("visit") or "")
    if kind == "participants":
        out += [ctx.identifier("ResearchSubject", ident), ctx.identifier("Consent", ident)]
    elif kind == "masi":
        out += [
            ctx.identifier("Observation", common.consensus_value(subject, visit)),
            ctx.identifier("Observation", common.consensus_value(subject, visit, "mmasi")),
        ]
        if visit != st.trial.baseline_visit:
            out.append(ctx.identifier("Observation", common.improvement_value(subject, visit)))
    return out


def _ingest(kind: str) -> Response:
    st = state()
    records = parse_body(request.get_data(cache=True))
    if isinstance(records, Response):
        return records
    if not records:
        return error_response(422, "the body holds no record", "required")
    problems = validate(kind, records, st)
    if problems:
        st.inbox.bump(f"rejected:{kind}", len(records))
        log.info(
            "ingest %s: request refused (%d records, %d problems)",
            kind,
            len(records),
            len(problems),
        )
        return outcome_response(422, problems)
    caller: Caller | None = g.get("caller")
    claims = () if caller is None else (*caller.claims, *caller.on_success())
    try:
        accepted = st.inbox.accept(kind, records, claims=claims)
    except Replayed:
        return outcome_response(
            401, [Problem("signature already used (replayed request)", "security")]
        )
    except InboxUnavailable:
        # the commit that would have held the records failed: nothing kept, the sender retries
        log.warning("ingest %s: the inbox could not commit (%d records, 503)", kind, len(records))
        return outcome_response(
            503,
            [Problem("the records could not be stored (nothing was kept); retry", "transient")],
            {"Retry-After": "5"},
        )
    except InboxConflict as exc:
        st.inbox.bump(f"rejected:{kind}", len(records))
        return outcome_response(
            422,
            [
                Problem(f"{p.field}: {p.reason}", "business-rule", f"{kind}[{p.index}].{p.field}")
                for p in exc.problems
            ],
        )
    changed = sum(a.changed for a in accepted)
    log.info("ingest %s: %d records accepted (%d new or changed)", kind, len(accepted), changed)
    return json_response(
        202,
        {
            "accepted": len(accepted),
            "changed": changed,
            "records": [
                {
                    "kind": kind,
                    "key": a.key,
                    "status": "accepted" if a.changed else "unchanged",
                    "identifiers": identifiers(kind, record, st),
                }
                for a, record in zip(accepted, records, strict=True)
            ],
        },
    )


def _retract(kind: str, key: str) -> Response:
    st = state()
    try:
        row = st.inbox.retract(kind, key)
    except RetractRefused as exc:
        return error_response(409, f"not retracted: {exc}", "business-rule")
    if row is None:
        return error_response(
            404,
            f"no such {kind} record in the inbox (the key is "
            + "/".join(KEY_FIELDS[kind])
            + " or the record's business identifier)",
            "not-found",
        )
    log.info("ingest %s: 1 record retracted", kind)
    return json_response(
        202,
        {
            "retracted": 1,
            "records": [
                {
                    "kind": kind,
                    "key": row.key,
                    "status": "retracting",
                    "identifiers": identifiers(kind, row.record, st),
                }
            ],
        },
    )


def _register(kind: str) -> None:
    bp.add_url_rule(f"/ingest/{kind}", f"post_{kind}", lambda: _ingest(kind), methods=["POST"])
    bp.add_url_rule(
        f"/ingest/{kind}/<path:key>",
        f"delete_{kind}",
        lambda key: _retract(kind, key),
        methods=["DELETE"],
    )


for _kind in KINDS:
    _register(_kind)
