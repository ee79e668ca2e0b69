"""SPEC's rules for every route, over the real uvicorn: HEAD answers as GET without the body, an empty
parameter is an absent one, filter_by given twice means both, any other parameter given twice is a 400."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kasparro
from conftest import LiveServer, exchange, referenced_urls
from kasparro import Config

PROBLEM = "application/problem+json"
PER_REQUEST = ("request_id", "api_latency_ms")  # the body fields that differ between two equal requests
# Bodies that differ between two equal requests beyond PER_REQUEST: the counters of /metrics.
VARYING = frozenset({"/metrics"})
VALUES = {"page": "2", "page_size": "3", "filter_by": "active", "sort": "-rank"}  # a valid value of each
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def documented_routes(base: str) -> dict[str, list[str]]:
    """Every GET path of the served OpenAPI document (asset_id: bitcoin), and the files its HTML pages
    load, each with the names of its query parameters."""
    status, _, body = exchange(base, "GET", "/openapi.json")
    assert status == 200
    routes: dict[str, list[str]] = {}
    for template, operations in json.loads(body)["paths"].items():
        if "get" in operations:
            names = [p["name"] for p in operations["get"].get("parameters", ()) if p["in"] == "query"]
            routes[template.replace("{asset_id}", "bitcoin")] = names
            if "text/html" in operations["get"]["responses"]["200"].get("content", {}):
                _, _, page = exchange(base, "GET", template)
                routes.update((url, []) for url in referenced_urls(page))
    assert {"/", "/data", "/data/bitcoin", "/health", "/stats", "/metrics", "/openapi.json", "/docs",
            "/redoc", "/redoc/redoc.standalone.js"} <= set(routes)  # fmt: skip
    assert any(url.endswith(".js") for url in routes)
    return routes


def steady(path: str, headers: dict[str, str], body: bytes) -> Any:
    """What two equal requests must answer alike: the body without its per-request fields."""
    if path.split("?")[0] in VARYING:
        return None
    if headers.get("content-type", "").startswith(("application/json", PROBLEM)):
        return {k: v for k, v in json.loads(body).items() if k not in PER_REQUEST}
    return body


def latency_text(body: bytes) -> bytes:
    match = re.search(rb'"api_latency_ms":([0-9.e+-]+)', body)
    return match.group(1) if match else b""


def assert_problem(status: int, headers: dict[str, str], body: bytes, expected: int, named: str) -> None:
    assert status == expected, body
    assert headers["content-type"] == PROBLEM
    problem = json.loads(body)
    assert problem["status"] == expected and named in problem["detail"], problem
    assert problem["request_id"] == headers["x-request-id"]


@pytest.fixture
def server(live_server: Any, store_path: Path) -> LiveServer:
    return live_server(store_path, LOG_LEVEL="warning")


def test_head_answers_as_get_without_the_body_on_every_route(server: LiveServer) -> None:
    routes = documented_routes(server.base)
    for round_ in range(3):  # answers are kept on their second read: the third round is the front door's
        for path in routes:
            ids = {"X-Request-ID": f"head-{round_}-{path}"}
            get = exchange(server.base, "GET", path, ids)
            status, headers, body = exchange(server.base, "HEAD", path, ids)
            assert (status, body) == (get[0], b""), path
            assert headers["x-request-id"] == ids["X-Request-ID"]
            if get[1].get("transfer-encoding") == "chunked":  # streamed: no length before it is sent (RFC 9110 9.3.2)
                assert "content-length" not in headers, path
                framing = ("date", "transfer-encoding")
                assert {k: v for k, v in headers.items() if k not in framing} == {
                    k: v for k, v in get[1].items() if k not in framing
                }, path
                continue
            assert {**headers, "date": "", "content-length": ""} == {**get[1], "date": "", "content-length": ""}
            length, latency = int(headers["content-length"]), latency_text(get[2])
            if path in VARYING:
                assert length > 0
            elif latency:  # GET's length, up to the digits of its own api_latency_ms
                assert 0 < length - (len(get[2]) - len(latency)) < 16, path
            else:
                assert length == len(get[2]), path


def test_head_with_a_current_etag_is_a_304_on_both_paths(server: LiveServer) -> None:
    for path in ("/data", "/data?filter_by=active&page_size=3", "/data/bitcoin", "/data/ethereum"):
        etag = exchange(server.base, "GET", path)[1]["etag"]
        for _ in range(3):
            status, headers, body = exchange(server.base, "HEAD", path, {"If-None-Match": etag})
            assert (status, headers["etag"], body) == (304, etag, b""), path
            status, headers, body = exchange(server.base, "HEAD", path, {"If-None-Match": 'W/"other"'})
            assert (status, headers["etag"], body) == (200, etag, b""), path


@pytest.mark.parametrize(
    ("target", "status", "named"),
    [
        ("/data?page=0", 400, "page"),
        ("/data?filter_by=colour:red", 400, "colour"),
        ("/data?page=1&page=2", 400, "page"),
        ("/data/no-such-coin", 404, "no-such-coin"),
        ("/nowhere", 404, "/nowhere"),
    ],
)
def test_head_of_an_error_is_its_problem_without_the_body(
    server: LiveServer, target: str, status: int, named: str
) -> None:
    get = exchange(server.base, "GET", target)
    assert_problem(*get, status, named)
    for _ in range(3):
        head = exchange(server.base, "HEAD", target)
        assert (head[0], head[1]["content-type"], head[2]) == (status, PROBLEM, b"")
        assert abs(int(head[1]["content-length"]) - len(get[2])) < 16  # the problem's api_latency_ms digits


def test_head_passes_the_api_key_guard_as_get_does(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_API_KEYS="k1")
    keyed = {"Authorization": "Bearer k1"}
    for path in ("/data", "/data/bitcoin", "/stats", "/data?page=1&page=2"):  # the guard first, then the query
        for _ in range(3):
            status, headers, body = exchange(server.base, "HEAD", path)
            assert (status, body) == (401, b"") and headers["www-authenticate"].startswith("Bearer"), path
    for path in ("/data", "/data/bitcoin", "/stats"):
        for _ in range(3):
            get = exchange(server.base, "GET", path, keyed)
            status, headers, body = exchange(server.base, "HEAD", path, keyed)
            assert (status, body, headers.get("etag")) == (200, b"", get[1].get("etag")), path
    status, headers, body = exchange(server.base, "HEAD", "/data?page=1&page=2", keyed)
    assert (status, headers["content-type"], body) == (400, PROBLEM, b"")


def test_head_passes_the_rate_limit_as_get_does(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_RATE_LIMIT="1")
    statuses = []
    for _ in range(20):  # a burst of 2 at 1 a second: a 429 comes within a few requests
        status, headers, body = exchange(server.base, "HEAD", "/data/bitcoin")
        assert body == b"" and "ratelimit-limit" in headers
        statuses.append(status)
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and headers["content-type"] == PROBLEM
            break
        assert status == 200 and int(headers["content-length"]) > 0 and headers["etag"]
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert exchange(server.base, "HEAD", "/health")[0] == 200  # never limited


def test_an_empty_parameter_is_an_absent_one_on_every_route(server: LiveServer) -> None:
    for path, names in documented_routes(server.base).items():
        plain = exchange(server.base, "GET", path)
        for query in [*(f"{name}=" for name in names), "page=", "anything=", "page=&page_size=&filter_by="]:
            for _ in range(3):  # the third is a kept answer at the front door
                answer = exchange(server.base, "GET", f"{path}?{query}")
                assert answer[0] == plain[0], (path, query, answer[2][:300])
                assert answer[1].get("etag") == plain[1].get("etag"), (path, query)
                assert steady(path, answer[1], answer[2]) == steady(path, *plain[1:]), (path, query)


def test_an_empty_parameter_beside_a_given_one_changes_nothing(server: LiveServer) -> None:
    for query, same_as in (
        ("page=&page_size=2", "page_size=2"),
        ("page_size=2&page=", "page_size=2"),
        ("filter_by=&filter_by=active&sort=", "filter_by=active"),
        ("cursor=&page=2&page_size=3", "page=2&page_size=3"),
        ("page=&page=2", "page=2"),
    ):
        expected = exchange(server.base, "GET", f"/data?{same_as}")
        assert expected[0] == 200
        for _ in range(3):
            answer = exchange(server.base, "GET", f"/data?{query}")
            assert (answer[0], answer[1]["etag"]) == (200, expected[1]["etag"]), query
            assert steady("/data", answer[1], answer[2]) == steady("/data", *expected[1:]), query


def test_a_parameter_given_twice_is_a_400_naming_it_on_every_route(server: LiveServer) -> None:
    for path, names in documented_routes(server.base).items():
        for name in {*names, "page", "x"} - {"filter_by"}:
            value = VALUES.get(name, "1")
            for target in (f"{path}?{name}={value}&{name}={value}", f"{path}?a=&{name}=1&{name}=2"):
                for _ in range(3):  # never kept, never the last value silently
                    assert_problem(*exchange(server.base, "GET", target), 400, name)
                    head = exchange(server.base, "HEAD", target)
                    assert (head[0], head[2]) == (400, b""), target


@st.composite
def conditions(draw: Any) -> list[str]:
    pool = ["active", "inactive", "rank<=20", "rank>3", "price_usd>1", "symbol:btc|eth|usdt", "name~coin",
            "source:csv:sample", "updated_at>=2020-01-01", "market_cap_usd<1e12"]  # fmt: skip
    return draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4))


@PROPERTY_SETTINGS
@given(parts=conditions(), split=st.integers(1, 4), sort=st.sampled_from(["", "-rank", "name", "-price_usd"]))
def test_filter_by_given_twice_means_all_its_conditions(
    server: LiveServer, parts: list[str], split: int, sort: str
) -> None:
    groups = [",".join(parts[i::split]) for i in range(split)]
    repeated = urlencode([("filter_by", group) for group in groups] + [("sort", sort), ("page_size", "100")])
    joined = urlencode([("filter_by", ",".join(parts)), ("sort", sort), ("page_size", "100")])
    expected = exchange(server.base, "GET", f"/data?{joined}")
    answer = exchange(server.base, "GET", f"/data?{repeated}")
    assert expected[0] == 200, expected[2]
    assert (answer[0], answer[1]["etag"]) == (200, expected[1]["etag"]), repeated
    assert steady("/data", answer[1], answer[2]) == steady("/data", *expected[1:])


PARAMETER = st.sampled_from(["page", "page_size", "filter_by", "sort", "cursor"])
VALUE = st.sampled_from(["", "", "1", "2", "5", "active", "rank<10", "-rank", "name"])


@PROPERTY_SETTINGS
@given(pairs=st.lists(st.tuples(PARAMETER, VALUE), max_size=6))
def test_any_query_string_follows_the_parameter_rules(server: LiveServer, pairs: list[tuple[str, str]]) -> None:
    """Against a model of the rules: empties dropped, filter_bys joined, any other repeat a 400."""
    given_ = [(name, value) for name, value in pairs if value]
    repeated = sorted({n for n, _ in given_ if n != "filter_by" and sum(m == n for m, _ in given_) > 1})
    answer = exchange(server.base, "GET", "/data?" + urlencode(pairs))
    if repeated:
        assert answer[0] == 400 and answer[1]["content-type"] == PROBLEM
        assert json.loads(answer[2])["detail"].split(":")[0] in repeated
        return
    filters = [value for name, value in given_ if name == "filter_by"]
    canonical = [(n, v) for n, v in given_ if n != "filter_by"] + (
        [("filter_by", ",".join(filters))] if filters else []
    )
    expected = exchange(server.base, "GET", "/data?" + urlencode(canonical))
    assert answer[0] == expected[0], (pairs, answer[2][:300])
    assert answer[1].get("etag") == expected[1].get("etag")
    assert steady("/data", answer[1], answer[2]) == steady("/data", *expected[1:])


def test_head_of_a_kept_page_is_served_by_the_front_door(
    monkeypatch: pytest.MonkeyPatch, make_client: Any, store_path: Path
) -> None:
    """HEAD of a kept answer does not enter Falcon, and sends GET's headers with no body."""
    through_falcon: list[str] = []
    original = kasparro.AssetPagesResource.on_get

    async def spy(self: Any, req: Any, resp: Any) -> None:
        through_falcon.append(req.method)
        await original(self, req, resp)

    monkeypatch.setattr(kasparro.AssetPagesResource, "on_get", spy)
    client = make_client(Config(db=store_path, log_level="warning"))
    gets = [client.get("/data", params={"page_size": "4"}) for _ in range(2)]  # read twice: kept
    head = client.request("HEAD", "/data", params={"page_size": "4"})
    current = client.request(
        "HEAD", "/data", params={"page_size": "4"}, headers={"If-None-Match": head.headers["etag"]}
    )
    assert through_falcon == ["GET", "GET"]
    assert (head.status_code, head.content, head.headers["etag"]) == (200, b"", gets[1].headers["etag"])
    assert abs(int(head.headers["content-length"]) - len(gets[1].content)) < 16
    assert (current.status_code, current.content) == (304, b"")
