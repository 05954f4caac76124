"""Sources of the view engine: NDJSON files and directories, search paging and Bulk Data
$export (against pytest-httpserver: the test server has no $export, and only a fake will send a
foreign or looping next link)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.client import FhirClient
from fhir_adapter.query.sources import (
    NdjsonSource,
    ServerAnswerError,
    ServerSource,
    SourceUnreadable,
    same_origin,
)
from fhir_adapter.settings import Settings

FHIR = "application/fhir+json"


def _ndjson(path: Path, resources: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    return path


def _patient(i: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p{i}"}


def test_ndjson_directory_bulk_layout_and_single_file(tmp_path: Path) -> None:
    bulk = tmp_path / "bulk"
    bulk.mkdir()
    _ndjson(bulk / "Patient.ndjson", [_patient(1), _patient(2)])
    _ndjson(bulk / "Observation.ndjson", [{"resourceType": "Observation", "id": "o1"}])
    (bulk / "notes.txt").write_text("not read", encoding="utf-8")
    mixed = _ndjson(tmp_path / "registry.ndjson", [_patient(3), {"resourceType": "Encounter"}])
    source = NdjsonSource([bulk, mixed])
    assert [r["id"] for r in source.resources(["Patient"])] == ["p1", "p2", "p3"]
    assert len(list(source.resources(None))) == 5


def test_a_file_that_only_borrows_a_bulk_name_is_read_whole(tmp_path: Path) -> None:
    """Every *.ndjson file is read (pinned): a Bulk Data file of another type is skipped only
    when it is one (its first resource is of its type), never because of its name alone."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _ndjson(mixed / "Observation.ndjson", [_patient(1), {"resourceType": "Observation"}])
    _ndjson(mixed / "Encounter.ndjson", [{"resourceType": "Encounter"}, _patient(2)])
    source = NdjsonSource([mixed])
    # Observation.ndjson starts with a Patient: read; Encounter.ndjson is a Bulk file: skipped
    assert [r["id"] for r in source.resources(["Patient"])] == ["p1"]


def test_ndjson_skips_blank_lines_and_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.ndjson"
    path.write_bytes(orjson.dumps(_patient(1)) + b"\n\n{broken\n")
    with pytest.raises(SourceUnreadable, match=r"x.ndjson:3: not a JSON object"):
        list(NdjsonSource([path]).resources(None))
    path.write_bytes(b'{"id": "no type"}\n')
    with pytest.raises(SourceUnreadable, match=r"x.ndjson:1: not a FHIR resource"):
        list(NdjsonSource([path]).resources(None))


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(SourceUnreadable, match="no such file"):
        NdjsonSource([tmp_path / "missing.ndjson"])
    with pytest.raises(SourceUnreadable, match=r"no \*\.ndjson file"):
        NdjsonSource([tmp_path])
    with pytest.raises(SourceUnreadable, match="no source"):
        NdjsonSource([])


def _client(server: HTTPServer) -> FhirClient:
    return FhirClient(Settings(max_attempts=2, max_retry_seconds=5), server.url_for("/fhir"))


def _pages(server: HTTPServer, total: int, size: int, next_url: Any = None) -> None:
    """A Patient search of ``total`` resources in pages of ``size`` with offset links."""

    def handler(request: Request) -> Response:
        assert request.args.get("_count") == str(size) or "_offset" in request.args
        offset = int(request.args.get("_offset", 0))
        entries = [{"resource": _patient(i), "search": {"mode": "match"}}
                   for i in range(offset, min(offset + size, total))]  # fmt: skip
        if offset == 0:
            entries.append({"resource": {"resourceType": "OperationOutcome"},
                            "search": {"mode": "outcome"}})  # fmt: skip
        links = []
        if offset + size < total:
            url = (
                next_url or (lambda o: server.url_for(f"/fhir/Patient?_count={size}&_offset={o}"))
            )(offset + size)
            links.append({"relation": "next", "url": url})
        bundle = {"resourceType": "Bundle", "type": "searchset", "entry": entries, "link": links}
        return Response(json.dumps(bundle), content_type=FHIR)

    server.expect_request("/fhir/metadata").respond_with_json(
        {
            "resourceType": "CapabilityStatement",
            "fhirVersion": "4.0.1",
            "rest": [{"mode": "server"}],
        }
    )
    server.expect_request("/fhir/Patient").respond_with_handler(handler)


def test_search_pages_until_no_next_link_reading_each_resource_once(httpserver: HTTPServer) -> None:
    _pages(httpserver, total=23, size=5)
    source = ServerSource(_client(httpserver), page_size=5)
    ids = [r["id"] for r in source.resources(["Patient"])]
    assert ids == [f"p{i}" for i in range(23)]
    assert source.pages_read == 5


def test_search_refuses_a_next_link_to_another_origin(httpserver: HTTPServer) -> None:
    _pages(
        httpserver,
        total=10,
        size=5,
        next_url=lambda o: f"http://evil.invalid/fhir/Patient?_offset={o}",
    )
    source = ServerSource(_client(httpserver), page_size=5)
    with pytest.raises(ServerAnswerError, match="another origin"):
        list(source.resources(["Patient"]))


def test_search_refuses_a_next_link_that_loops(httpserver: HTTPServer) -> None:
    _pages(httpserver, total=20, size=5,
           next_url=lambda o: httpserver.url_for("/fhir/Patient?_count=5&_offset=5"))  # fmt: skip
    with pytest.raises(ServerAnswerError, match="same next link twice"):
        list(ServerSource(_client(httpserver), page_size=5).resources(["Patient"]))


def test_same_origin() -> None:
    assert same_origin("https://a.org/fhir/x", "https://a.org:443/fhir")
    assert not same_origin("https://a.org/fhir/x", "http://a.org/fhir")
    assert not same_origin("https://b.a.org/fhir", "https://a.org/fhir")


def _export_server(
    server: HTTPServer, files_host: str | None = None, requires_token: bool = False
) -> None:
    server.expect_request("/fhir/metadata").respond_with_json({
        "resourceType": "CapabilityStatement", "fhirVersion": "4.0.1",
        "rest": [{"mode": "server", "operation": [
            {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}
        ]}],
    })  # fmt: skip

    def kick_off(request: Request) -> Response:
        assert request.headers["Prefer"] == "respond-async"
        assert set(request.args["_type"].split(",")) == {"Patient", "Observation"}
        return Response(status=202, headers={"Content-Location": server.url_for("/status/1")})

    state = {"polls": 0}

    def status(request: Request) -> Response:
        state["polls"] += 1
        if state["polls"] < 3:
            return Response(status=202, headers={"Retry-After": "2", "X-Progress": "working"})

        def file_url(name: str) -> str:
            url = server.url_for(f"/files/{name}")
            return url.replace("127.0.0.1", files_host) if files_host else url

        manifest = {
            "transactionTime": "2026-01-01T00:00:00Z", "request": "x",
            "requiresAccessToken": requires_token,
            "output": [
                {"type": "Patient", "url": file_url("Patient.ndjson")},
                {"type": "Observation", "url": file_url("Observation.ndjson")},
                {"type": "Encounter", "url": file_url("Encounter.ndjson")},
            ],
            "error": [],
        }  # fmt: skip
        return Response(json.dumps(manifest), content_type="application/json")

    server.expect_request("/fhir/$export").respond_with_handler(kick_off)
    server.expect_request("/status/1").respond_with_handler(status)
    body = b"".join(orjson.dumps(_patient(i)) + b"\n" for i in range(3))
    server.expect_request("/files/Patient.ndjson").respond_with_data(
        body, content_type="application/fhir+ndjson"
    )
    obs = orjson.dumps({"resourceType": "Observation", "id": "o1"}) + b"\n"
    server.expect_request("/files/Observation.ndjson").respond_with_data(obs)


def test_bulk_export_kick_off_poll_manifest_download(httpserver: HTTPServer) -> None:
    slept: list[float] = []
    _export_server(httpserver)
    source = ServerSource(_client(httpserver), sleep=slept.append)
    got = [(r["resourceType"], r["id"]) for r in source.resources(["Patient", "Observation"])]
    assert got == [("Patient", "p0"), ("Patient", "p1"), ("Patient", "p2"), ("Observation", "o1")]
    assert slept == [2.0, 2.0]  # Retry-After honoured between polls
    assert source.pages_read == 0  # no search was made


def _token_client(server: HTTPServer) -> FhirClient:
    settings = Settings(max_attempts=2, max_retry_seconds=5, fhir_auth="bearer", fhir_token="tkn")  # noqa: S106
    return FhirClient(settings, server.url_for("/fhir"))


def test_bulk_files_on_another_origin_are_read_without_the_token(httpserver: HTTPServer) -> None:
    """Cloud storage: files elsewhere, `requiresAccessToken: false` - read, and the server's
    token stays with the server."""
    _export_server(httpserver, files_host="localhost")
    source = ServerSource(_token_client(httpserver), sleep=lambda _s: None)
    got = [r["id"] for r in source.resources(["Patient", "Observation"])]
    assert got == ["p0", "p1", "p2", "o1"]
    sent = {r.path: r.headers.get("Authorization") for r, _ in httpserver.log}
    assert sent["/fhir/$export"] == "Bearer tkn"
    assert sent["/files/Patient.ndjson"] is None
    assert sent["/files/Observation.ndjson"] is None


@pytest.mark.parametrize("bulk", ["auto", "always"])
def test_bulk_files_elsewhere_that_need_the_token_are_not_fetched(
    httpserver: HTTPServer, bulk: str
) -> None:
    """The token never goes to another origin: `auto` reads the server by search instead
    (nothing was read yet), `always` refuses."""
    _export_server(httpserver, files_host="localhost", requires_token=True)
    entries = [{"resource": _patient(9), "search": {"mode": "match"}}]
    httpserver.expect_request("/fhir/Patient").respond_with_json(
        {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    )
    httpserver.expect_request("/fhir/Observation").respond_with_json(
        {"resourceType": "Bundle", "type": "searchset"}
    )
    source = ServerSource(_token_client(httpserver), sleep=lambda _s: None, bulk=bulk)
    if bulk == "always":
        with pytest.raises(ServerAnswerError, match=r"another origin .* needs the server's token"):
            list(source.resources(["Patient", "Observation"]))
    else:
        assert [r["id"] for r in source.resources(["Patient", "Observation"])] == ["p9"]
    assert not any(r.path.startswith("/files/") for r, _ in httpserver.log)


def test_bulk_always_refuses_a_server_without_export(httpserver: HTTPServer) -> None:
    _pages(httpserver, total=3, size=5)
    source = ServerSource(_client(httpserver), page_size=5, bulk="always")
    with pytest.raises(Exception, match=r"does not offer Bulk Data \$export"):
        list(source.resources(["Patient"]))
