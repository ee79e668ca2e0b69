"""The OpenAPI document is valid 3.1, every response the API gives matches it, and schemathesis finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import OpenAPIV31SpecValidator

from conftest import SyncConductor
from kasparro import SORTS, Config, create_app

PROBLEM = "application/problem+json"
# The justfile's `schemathesis` recipe runs the same: every check, except that schema-valid /data
# queries must be accepted, which the schema cannot promise (a cursor must be one the server issued;
# a number must be finite and a time must exist).
SCHEMATHESIS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", "150"]


@pytest.fixture(scope="module")
def document(sample_store: Path) -> dict[str, Any]:
    return openapi_of(sample_store)


def openapi_of(db: Path, **config: Any) -> dict[str, Any]:
    with SyncConductor(create_app(Config(db=db, log_level="warning", **config))) as client:
        result = client.get("/openapi.json")
        assert result.status_code == 200 and result.headers["content-type"] == "application/json"
        return result.json


def response_spec(document: dict[str, Any], template: str | None, status: int) -> dict[str, Any]:
    """The response object for (path template, status); errors off any path come from the shared components."""
    shared = {404: "NotFound", 405: "MethodNotAllowed", 500: "InternalServerError"}
    operation = document["paths"].get(template or "", {}).get("get", {"responses": {}})
    spec = operation["responses"].get(str(status)) or {"$ref": f"#/components/responses/{shared[status]}"}
    if "$ref" in spec:
        spec = document["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
    return spec


def assert_conforms(document: dict[str, Any], template: str | None, result: Any) -> None:
    """The status is documented, and the body and headers match the document's schemas for it."""
    spec = response_spec(document, template, result.status_code)
    for name, header in spec.get("headers", {}).items():
        if header.get("required"):
            assert name.lower() in result.headers, (name, result.status_code)
            value = result.headers[name.lower()]
            if header["schema"].get("type") == "integer":  # a header is text: read as schemathesis does
                assert value.isascii() and value.isdigit(), (name, value)
                value = int(value)
            jsonschema.validate(value, header["schema"])
    if "content" not in spec:
        assert result.content == b""
        return
    media = result.headers["content-type"].split(";")[0]
    assert media in spec["content"], (media, list(spec["content"]))
    if media in ("application/json", PROBLEM):
        schema = {**spec["content"][media]["schema"], "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(result.json)


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    OpenAPIV31SpecValidator(document).validate()


def test_document_with_api_keys_declares_security(sample_store: Path) -> None:
    document = openapi_of(sample_store, api_keys=("k1",))
    OpenAPIV31SpecValidator(document).validate()
    assert document["paths"]["/data"]["get"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in document["paths"]["/health"]["get"]


def test_every_path_and_parameter_is_documented(document: dict[str, Any]) -> None:
    assert set(document["paths"]) == {"/", "/data", "/data/export", "/data/{asset_id}", "/data/{asset_id}/history",
                                      "/health", "/stats", "/runs", "/runs/{run_id}", "/runs/compare", "/metrics",
                                      "/openapi.json", "/docs", "/redoc"}  # fmt: skip
    data = {p["name"]: p for p in document["paths"]["/data"]["get"]["parameters"]}
    params = {"page", "page_size", "filter_by", "sort", "cursor", "as_of", "fields", "format", "If-None-Match"}
    assert set(data) == params
    assert data["format"]["schema"]["enum"] == ["json", "csv", "ndjson"]
    export = {p["name"]: p for p in document["paths"]["/data/export"]["get"]["parameters"]}
    assert set(export) == {"filter_by", "sort", "as_of", "fields", "format"}
    assert export["format"]["schema"]["enum"] == ["csv", "ndjson"]
    assert set(document["paths"]["/data/export"]["get"]["responses"]["200"]["content"]) == {
        "text/csv",
        "application/x-ndjson",
    }
    for path in ("/data", "/data/{asset_id}/history"):
        assert set(document["paths"][path]["get"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/csv",
            "application/x-ndjson",
        }
    history = {p["name"] for p in document["paths"]["/data/{asset_id}/history"]["get"]["parameters"]}
    assert "format" in history
    detail = {p["name"] for p in document["paths"]["/data/{asset_id}"]["get"]["parameters"]}
    assert detail == {"asset_id", "fields", "If-None-Match"}
    assert all(p.get("allowEmptyValue", False) == (p["in"] == "query") for p in data.values())  # empty: absent
    assert data["page_size"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}
    assert set(data["sort"]["schema"]["enum"]) == set(SORTS)
    for word in ("field:value", "field~text", ">=", "a|b", "updated_at", "price_usd", "source"):
        assert word in data["filter_by"]["description"]
    responses = document["paths"]["/data"]["get"]["responses"]
    assert set(responses) == {"200", "304", "400", "406", "500", "503"}  # 406: Accept refuses every format
    for path in ("/data/export", "/data/{asset_id}/history"):
        assert "406" in document["paths"][path]["get"]["responses"]
    for name in ("BadRequest", "Unauthorized", "NotFound", "NotAcceptable", "MethodNotAllowed", "ServiceUnavailable",
                 "InternalServerError"):  # fmt: skip
        assert set(document["components"]["responses"][name]["content"]) == {PROBLEM}


def test_examples_match_their_schemas(document: dict[str, Any]) -> None:
    for spec in [*document["components"]["responses"].values()] + [
        response for path in document["paths"].values() for response in path["get"]["responses"].values()
    ]:
        for media in spec.get("content", {}).values():
            if "example" in media:
                schema = {**media["schema"], "components": document["components"]}
                jsonschema.Draft202012Validator(schema).validate(media["example"])


@pytest.mark.parametrize(
    ("path", "params", "template", "status"),
    [
        ("/", None, "/", 200),
        ("/data", None, "/data", 200),
        ("/data", {"filter_by": "active,rank<=20", "sort": "-price_usd", "page_size": "100"}, "/data", 200),
        ("/data", {"page": "99"}, "/data", 200),
        ("/data", {"sort": "RANK"}, "/data", 400),
        ("/data", {"filter_by": "colour:red"}, "/data", 400),
        ("/data", {"filter_by": "RANK>5"}, "/data", 400),
        ("/data", {"cursor": "O0qbI0CkfJ9O4M7Dr"}, "/data", 400),
        ("/data", {"fields": "asset_id,price_usd"}, "/data", 200),
        ("/data", {"fields": "asset_id,colour"}, "/data", 400),
        ("/data", {"format": "csv", "page_size": "100"}, "/data", 200),
        ("/data", {"format": "ndjson", "fields": "sources"}, "/data", 200),
        ("/data", {"format": "xml"}, "/data", 400),
        ("/data/export", None, "/data/export", 200),
        ("/data/export", {"format": "ndjson", "filter_by": "rank<=3", "fields": "symbol"}, "/data/export", 200),
        ("/data/export", {"format": "json"}, "/data/export", 400),
        ("/data/export", {"page": "2"}, "/data/export", 400),
        ("/data/bitcoin", {"fields": "asset_id,quotes"}, "/data/{asset_id}", 200),
        ("/data/bitcoin", {"fields": "quote"}, "/data/{asset_id}", 400),
        ("/data/bitcoin/history", {"format": "csv"}, "/data/{asset_id}/history", 200),
        ("/data/bitcoin", None, "/data/{asset_id}", 200),
        ("/data/no-such-coin", None, "/data/{asset_id}", 404),
        ("/data/bitcoin/history", None, "/data/{asset_id}/history", 200),
        ("/data/bitcoin/history", {"interval": "raw"}, "/data/{asset_id}/history", 200),
        ("/data/bitcoin/history", {"interval": "1d", "from": "2026-01-01"}, "/data/{asset_id}/history", 200),
        ("/data/bitcoin/history", {"interval": "2h"}, "/data/{asset_id}/history", 400),
        ("/data/no-such-coin/history", None, "/data/{asset_id}/history", 404),
        ("/health", None, "/health", 200),
        ("/stats", None, "/stats", 200),
        ("/runs", None, "/runs", 200),
        ("/runs", {"limit": "1"}, "/runs", 200),
        ("/runs", {"limit": "101"}, "/runs", 400),
        ("/runs/1", None, "/runs/{run_id}", 200),
        ("/runs/2", None, "/runs/{run_id}", 404),
        ("/runs/compare", {"a": "1", "b": "1"}, "/runs/compare", 200),
        ("/runs/compare", {"a": "1"}, "/runs/compare", 400),
        ("/runs/compare", {"a": "1", "b": "2"}, "/runs/compare", 404),
        ("/metrics", None, "/metrics", 200),
        ("/openapi.json", None, "/openapi.json", 200),
        ("/docs", None, "/docs", 200),
        ("/redoc", None, "/redoc", 200),
        ("/nowhere", None, None, 404),
    ],
)
def test_responses_match_the_document(
    client: Any, document: dict[str, Any], path: str, params: dict | None, template: str | None, status: int
) -> None:
    result = client.get(path, params=params)
    assert result.status_code == status, result.text
    assert_conforms(document, template, result)
    if "etag" in result.headers:
        again = client.get(path, params=params, headers={"If-None-Match": result.headers["etag"]})
        assert again.status_code == 304
        assert_conforms(document, template, again)


def test_cursor_pages_match_the_document(client: Any, document: dict[str, Any]) -> None:
    first = client.get("/data", params={"page_size": "3", "sort": "name"})
    second = client.get("/data", params={"page_size": "3", "sort": "name", "cursor": first.json["next_cursor"]})
    assert second.status_code == 200 and second.json["page"] is None
    assert_conforms(document, "/data", second)


def test_wrong_method_matches_the_document(client: Any, document: dict[str, Any]) -> None:
    result = client.request("POST", "/data")
    assert result.status_code == 405
    assert_conforms(document, None, result)


def test_auth_failures_match_the_document(make_client: Any, store_path: Path) -> None:
    document = openapi_of(store_path, api_keys=("k1",))
    client = make_client(Config(db=store_path, api_keys=("k1",), log_level="warning"))
    for path, template in (("/data", "/data"), ("/data/bitcoin", "/data/{asset_id}"), ("/stats", "/stats"),
                           ("/data/bitcoin/history", "/data/{asset_id}/history"), ("/runs", "/runs"),
                           ("/runs/1", "/runs/{run_id}"), ("/data/export", "/data/export"),
                           ("/runs/compare", "/runs/compare")):  # fmt: skip
        result = client.get(path)
        assert result.status_code == 401
        assert_conforms(document, template, result)


def test_rate_limited_answers_match_the_document(make_client: Any, store_path: Path) -> None:
    """With a rate limit every operation it applies to documents its 429; the exempt ones do not."""
    document = openapi_of(store_path, rate_limit=0.5)
    OpenAPIV31SpecValidator(document).validate()
    limited = {path for path, item in document["paths"].items() if "429" in item["get"]["responses"]}
    assert limited == set(document["paths"]) - {"/health", "/metrics"}
    assert all("429" not in item["get"]["responses"] for item in openapi_of(store_path)["paths"].values())
    config = Config(db=store_path, rate_limit=0.5, log_level="warning")
    client = make_client(config, create_app(config, clock=lambda: 0.0))  # the clock stands still: no refill
    assert client.get("/health").status_code == 200 and client.get("/data").status_code == 200  # a burst of 1
    for path, template in (("/data", "/data"), ("/runs/1", "/runs/{run_id}"), ("/docs", "/docs"), ("/", "/")):
        result = client.get(path)
        assert result.status_code == 429 and int(result.headers["retry-after"]) >= 1
        assert_conforms(document, template, result)
    assert client.get("/health").status_code == 200


def test_unreadable_store_answers_match_the_document(make_client: Any, tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    document = openapi_of(db)
    client = make_client(Config(db=db, log_level="warning"))
    for path, template in (("/data", "/data"), ("/data/x", "/data/{asset_id}"), ("/stats", "/stats"),
                           ("/data/x/history", "/data/{asset_id}/history"), ("/runs", "/runs"),
                           ("/runs/1", "/runs/{run_id}"),
                           ("/runs/compare?a=1&b=2", "/runs/compare"), ("/health", "/health"),
                           ("/data/export", "/data/export"),
                           ("/metrics", "/metrics")):  # fmt: skip
        path, _, query = path.partition("?")
        result = client.get(path, query_string=query or None)
        assert result.status_code == (200 if path == "/metrics" else 503)
        assert_conforms(document, template, result)


def test_unexpected_error_matches_the_document(store_path: Path, make_client: Any) -> None:
    class Exploding:
        async def on_get(self, req: Any, resp: Any) -> None:
            raise RuntimeError("boom")

    app = create_app(Config(db=store_path, log_level="critical"))
    app.app.add_route("/explode", Exploding())  # the Falcon app inside the front door
    result = make_client(Config(), app).get("/explode")
    assert result.status_code == 500
    assert_conforms(openapi_of(store_path), None, result)


@pytest.mark.parametrize("sort", SORTS)
def test_every_documented_sort_and_bound_is_accepted(shared_client: Any, sort: str) -> None:
    for page, page_size in (("1", "1"), ("999999999", "100")):
        result = shared_client.get("/data", params={"sort": sort, "page": page, "page_size": page_size})
        assert result.status_code == 200, result.text


def test_schemathesis_finds_nothing(live_server: Any, store_path: Path, tmp_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.base}/openapi.json",
               *SCHEMATHESIS, "--no-color"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5_000:]
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]
