"""Faults found by breaking the API from outside, over the real uvicorn: each test names the rule it holds to."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import kasparro
from conftest import LiveServer, exchange, run_etl
from kasparro import Config

PROBLEM = "application/problem+json"
KEPT = ("/data", "/data?page_size=2", "/data/bitcoin", "/data/bitcoin/history", "/health", "/stats", "/runs")


@pytest.fixture
def server(live_server: Any, store_path: Path) -> LiveServer:
    return live_server(store_path, LOG_LEVEL="warning")


@pytest.mark.parametrize(
    "header", ["Accept-Encoding", "Accept", "If-None-Match", "X-Request-ID", "Origin", "Authorization"]
)
def test_a_header_value_that_is_not_utf8_is_read_as_bytes_not_a_500(server: LiveServer, header: str) -> None:
    """HTTP header values are bytes (RFC 9110 5.5: obs-text is any byte 0x80-0xFF): the front door, which answers
    a kept answer itself from the second request on, reads them as Falcon does, never as UTF-8."""
    for path in KEPT:
        plain = exchange(server.base, "GET", path)
        assert plain[0] == 200, path
        for value in (b"\xff", b"gzip\xfe", b"text/csv;q=0.\xe9"):
            for _ in range(3):  # the second and third are the front door's
                status, headers, body = exchange(server.base, "GET", path, {header: value})
                assert status == 200, (path, value, body[:200])
                assert headers["content-type"] == plain[1]["content-type"], (path, value)


def test_options_of_a_route_is_a_204_that_allows_what_its_405_allows(server: LiveServer) -> None:
    """A plain OPTIONS (no preflight) says which methods the route takes, with no body: 204, not a 200 that
    declares JSON and sends nothing, and its Allow names OPTIONS as the route's 405 does."""
    for path in ("/", "/data", "/data/bitcoin", "/data/bitcoin/history", "/data/export", "/health", "/stats",
                 "/runs", "/runs/1", "/runs/compare", "/metrics", "/openapi.json", "/docs"):  # fmt: skip
        refused = exchange(server.base, "DELETE", path)
        assert refused[0] == 405 and refused[1]["content-type"] == PROBLEM, path
        status, headers, body = exchange(server.base, "OPTIONS", path)
        assert (status, body) == (204, b""), path
        assert "content-type" not in headers, path
        allowed = {method.strip() for method in headers["allow"].split(",")}
        assert allowed == {method.strip() for method in refused[1]["allow"].split(",")} == {"GET", "HEAD", "OPTIONS"}
        assert headers["x-request-id"], path


@pytest.mark.parametrize("query", ["limit=5", "source=csv:sample", "x=1", "page=2"])
def test_stats_refuses_a_parameter_it_does_not_take_as_its_sibling_routes_do(server: LiveServer, query: str) -> None:
    """/stats takes no parameter: one given is a 400 naming it, as on /runs, /runs/{run_id} and /runs/compare,
    not silently ignored (/stats?limit=5 answered every recent run)."""
    name = query.split("=")[0]
    for _ in range(3):
        status, headers, body = exchange(server.base, "GET", f"/stats?{query}")
        assert (status, headers["content-type"]) == (400, PROBLEM), body[:200]
        assert f"unknown parameter {name!r}" in json.loads(body)["detail"]
    assert exchange(server.base, "GET", "/stats?limit=")[0] == 200  # an empty parameter is an absent one
    assert "400" in json.loads(exchange(server.base, "GET", "/openapi.json")[2])["paths"]["/stats"]["get"]["responses"]


@pytest.mark.parametrize("q", ["inf", "1e5", "1_0", "2", "-1", "nan", "0x1", "1.5", "١"])
def test_a_q_value_outside_rfc_9110s_grammar_counts_as_0(server: LiveServer, q: str) -> None:
    """A q-value is 0 to 1 in plain digits (RFC 9110 12.4.2); float() read 'inf', '1e5', '1_0' and '2' as more
    than 1, so a media range or coding with a broken q beat the one the client ranked. Unreadable is 0."""
    for path in ("/data?page_size=2", "/data/bitcoin/history", "/data/export?filter_by=rank<=2"):
        for _ in range(3):
            status, headers, _ = exchange(
                server.base, "GET", path, {"Accept": f"text/csv;q={q}, application/x-ndjson;q=0.5"}
            )
            assert (status, headers["content-type"]) == (200, "application/x-ndjson"), (path, q)
    for _ in range(3):  # the front door's, from the second on
        status, headers, _ = exchange(server.base, "GET", "/data?page_size=50", {"Accept-Encoding": f"gzip;q={q}"})
        assert status == 200 and "content-encoding" not in headers, q
        status, headers, _ = exchange(server.base, "GET", "/data?page_size=50", {"Accept-Encoding": f"gzip;q={q}, *"})
        assert status == 200 and "content-encoding" not in headers, q  # gzip named, with q 0: refused


@pytest.mark.parametrize("q", ["1", "1.0", "1.000", "0.5", "0.001", " 0.9 "])
def test_a_q_value_in_rfc_9110s_grammar_is_read(server: LiveServer, q: str) -> None:
    status, headers, _ = exchange(server.base, "GET", "/data?page_size=2", {"Accept": f"application/x-ndjson;q={q}"})
    assert (status, headers["content-type"]) == (200, "application/x-ndjson"), q
    for _ in range(3):
        status, headers, _ = exchange(server.base, "GET", "/data?page_size=50", {"Accept-Encoding": f"gzip;q={q}"})
        assert status == 200 and headers.get("content-encoding") == "gzip", q


@pytest.fixture
def feed_server(live_server: Any, tmp_path: Path) -> LiveServer:
    """A store of one CSV source named in capitals (csv:Feed) with six observations of bitcoin, an hour apart."""
    feed = tmp_path / "Feed.csv"
    rows = [f"bitcoin,BTC,Bitcoin,{95_000 + hour},2026-11-25T{hour:02}:00:00Z" for hour in range(6)]
    feed.write_text("id,symbol,name,price_usd,last_updated\n" + "\n".join(rows) + "\n")
    db = tmp_path / "feed.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    return live_server(db, LOG_LEVEL="warning")


@pytest.mark.parametrize("interval", ["raw", "1h"])
def test_a_history_cursor_holds_for_the_source_written_in_any_case(feed_server: LiveServer, interval: str) -> None:
    """source= names a source in any case and normal form (its points are the same), so the next_cursor of one
    spelling pages the other and both have one ETag: the cursor was refused as issued for another source."""
    window = f"/data/bitcoin/history?interval={interval}&from=2026-11-25T00:00:00Z&limit=2"
    pages = {}
    for spelling in ("csv:Feed", "csv:feed", "CSV:FEED"):
        status, headers, body = exchange(feed_server.base, "GET", f"{window}&source={spelling}")
        assert status == 200, body
        first = json.loads(body)
        pages[spelling] = (headers["etag"], first["points"], first["source"])
        status, _, body = exchange(feed_server.base, "GET", f"{window}&source=csv:Feed&cursor={first['next_cursor']}")
        assert status == 200, (spelling, body)
        assert [p["price_usd" if interval == "raw" else "close"] for p in json.loads(body)["points"]] == [95002, 95003]
    assert len(set(map(str, pages.values()))) == 1, pages
    assert pages["csv:feed"][2] == "csv:Feed"


@pytest.mark.parametrize(
    "target", ["/data/bitcoin%2Fhistory", "/data/bitcoin%2fhistory?interval=raw", "/data%2Fexport", "/runs%2F1"]
)
def test_an_encoded_slash_in_a_path_separates_nothing(server: LiveServer, target: str) -> None:
    """%2F is a '/' inside a segment (RFC 3986 2.2), and no asset id or run id holds one: /data/bitcoin%2Fhistory
    answered bitcoin's history and /data%2Fexport the export, so a proxy's rule for one path did not see it."""
    for method in ("GET", "GET", "GET", "HEAD"):  # the second and third: after an answer to the decoded path is kept
        exchange(server.base, "GET", target.replace("%2F", "/").replace("%2f", "/"))
        status, headers, body = exchange(server.base, method, target)
        assert (status, headers["content-type"]) == (404, PROBLEM), (method, body[:200])
        if method == "GET":
            assert "%2F" in json.loads(body)["detail"], body
    assert exchange(server.base, "GET", "/data/%62itcoin")[0] == 200  # any other escape is the character


NUMBERS = [("/data", "page"), ("/data", "page_size"), ("/data/bitcoin/history", "limit"), ("/runs", "limit"),
           ("/runs/compare?b=1", "a")]  # fmt: skip


@pytest.mark.parametrize(("path", "name"), NUMBERS)
def test_a_number_is_read_whatever_its_leading_zeros_and_a_long_one_is_out_of_range(
    server: LiveServer, path: str, name: str
) -> None:
    """A query number is its digits 0-9, as int() reads them: limit=0000000005 was a 400 'expected an integer
    from 1 to 100' (more than 9 digits), and page=1000000000 'expected an integer' where it is one, out of range."""
    joined = "&" if "?" in path else "?"
    status, headers, body = exchange(server.base, "GET", f"{path}{joined}{name}=1")
    assert status == 200, body[:200]
    for padded in ("01", "0" * 12 + "1", "0" * 1_000 + "1"):
        answer = exchange(server.base, "GET", f"{path}{joined}{name}={padded}")
        assert (answer[0], answer[1].get("etag") is None) == (200, "etag" not in headers), (padded, answer[2][:200])
    for long in ("1" + "0" * 9, "9" * 30, "1" + "0" * 5_000):
        status, headers, body = exchange(server.base, "GET", f"{path}{joined}{name}={long}")
        assert (status, headers["content-type"]) == (400, PROBLEM), body[:200]
        detail = json.loads(body)["detail"]
        assert detail.startswith(f"{name}: must be from ") and "expected" not in detail, detail
        assert len(detail) < 200, detail


def test_an_error_in_the_front_door_is_a_500_problem_with_the_request_id(
    monkeypatch: pytest.MonkeyPatch, make_client: Any, store_path: Path
) -> None:
    """The front door answers kept pages itself; an error of its own (as Accept-Encoding read as UTF-8 was) escaped
    to uvicorn, whose 500 is text/plain with no X-Request-ID. Any error before it answers is a 500 problem."""
    client = make_client(Config(db=store_path, log_level="warning"))
    for _ in range(2):  # kept on its second read: the front door's from now
        assert client.get("/data", params={"page_size": "30"}).status_code == 200

    def broken(accept_encoding: str) -> bool:
        raise RuntimeError("a fault of the front door")

    monkeypatch.setattr(kasparro, "accepts_gzip", broken)
    for method in ("GET", "HEAD"):
        answer = client.request(method, "/data", params={"page_size": "30"}, headers={"Accept-Encoding": "gzip"})
        assert (answer.status_code, answer.headers["content-type"]) == (500, PROBLEM), method
        if method == "GET":
            assert answer.json["request_id"] == answer.headers["x-request-id"]
            assert answer.json["api_latency_ms"] > 0  # measured, as every other answer's (it was 0.0)
            assert "RuntimeError" not in answer.text and "front door" not in answer.text
        else:
            assert answer.content == b""


INEXACT = ["//data", "///data", "//data?page_size=2", "//data/bitcoin", "//data/bitcoin/history", "/data//history",
           "/data//bitcoin", "/data/", "/data/bitcoin//history", "//runs/1", "/runs//1", "/runs/", "//health", "//",
           "//docs", "/data/bitcoin%2Fhistory", "/data/..", "/data/.", "/runs/./1", "/data/bitcoin/history/.",
           "/health/../data"]  # fmt: skip


@pytest.mark.parametrize("target", INEXACT)
def test_a_path_the_route_table_does_not_hold_exactly_is_a_404(live_server: Any, store_path: Path, target: str) -> None:
    """A path is routed only when it is a route's template segment for segment, as %2F already was: Falcon's matcher
    drops leading '/'s, so //data answered as /data (behind a proxy's rule for /data), and lets a field match an
    empty segment, so /data//history looked up the asset '' and /runs/ the run '' (with keys set: a 401)."""
    keyed = {"Authorization": "Bearer k1"}
    exact = "/" + target.replace("%2F", "/").replace("/..", "").replace("/.", "").lstrip("/").replace("//", "/")
    for keys in ("", "k1"):  # open: the front door answers kept routes itself; keyed: Falcon, after the guard
        server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_API_KEYS=keys)
        for method in ("GET", "GET", "GET", "HEAD"):  # the second and third: after an answer to the exact path is kept
            exchange(server.base, "GET", exact, keyed)
            for headers in (keyed, {}):
                status, answered, body = exchange(server.base, method, target, headers)
                assert (status, answered["content-type"]) == (404, PROBLEM), (keys, method, headers, body[:200])
                if method == "GET":
                    problem = json.loads(body)
                    assert target.split("?")[0].replace("%2F", "/") in problem["detail"].replace("%2F", "/"), problem
                    assert problem["request_id"] == answered["x-request-id"]
                else:
                    assert body == b""


@pytest.mark.parametrize(
    "target", ["/", "/docs/", "/redoc/", "/docs", "/data/%62itcoin", "/data/bitcoin/history", "/docs/swagger-ui.css"]
)
def test_a_path_the_route_table_holds_exactly_is_served(server: LiveServer, target: str) -> None:
    for _ in range(3):
        assert exchange(server.base, "GET", target)[0] == 200, target


ORIGIN = "https://dash.example"


def preflight(base: str, target: str, origin: str = ORIGIN, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return exchange(base, "OPTIONS", target, {"Origin": origin, "Access-Control-Request-Method": method})


@pytest.mark.parametrize("cors", ["*", ORIGIN])
def test_a_preflight_to_a_path_no_route_holds_is_the_404_problem(live_server: Any, store_path: Path, cors: str) -> None:
    """A preflight is answered for the routes there are: to /nowhere it was a 204 granting GET. It is the 404 any
    other request there gets, with the CORS headers an error to an allowed origin has (so the page can read it)."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_CORS_ORIGINS=cors, KASPARRO_API_KEYS="k1")
    for target in ("/nowhere", "/data/bitcoin/nowhere", "//data", "/data/", "/data%2Fexport"):
        status, headers, body = preflight(server.base, target)
        assert (status, headers["content-type"]) == (404, PROBLEM), (target, body[:200])
        assert headers["access-control-allow-origin"] == ("*" if cors == "*" else ORIGIN), target
        assert "access-control-allow-methods" not in headers, target
        assert json.loads(body)["request_id"] == headers["x-request-id"]
    status, headers, body = preflight(server.base, "/nowhere", origin="https://other.example")
    assert (status, headers["content-type"]) == (404, PROBLEM)
    if cors != "*":  # another origin's error is served without the header, as any other answer to it
        assert "access-control-allow-origin" not in headers
    # To a route: granted, or refused for another origin (with a list) or method, as before.
    for target in ("/data", "/data/bitcoin", "/runs/1", "/health", "/docs/"):
        status, headers, body = preflight(server.base, target)
        assert (status, body, headers["access-control-allow-methods"]) == (204, b"", "GET, HEAD"), target
    assert preflight(server.base, "/data", method="DELETE")[0] == 403
    if cors != "*":
        status, headers, body = preflight(server.base, "/data", origin="https://other.example")
        assert (status, headers["content-type"]) == (403, PROBLEM) and "other.example" in json.loads(body)["detail"]


def test_a_plain_options_needs_no_api_key_as_a_preflight_does(live_server: Any, store_path: Path) -> None:
    """OPTIONS discloses only the route's Allow, which its 405 and the OpenAPI document show anyone: with
    KASPARRO_API_KEYS set it was a 401 on the guarded routes, where a preflight (which a browser sends without
    a key) was answered. Both need none; every other method still does."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_API_KEYS="k1")
    for target in ("/data", "/data/export", "/data/bitcoin", "/data/bitcoin/history", "/stats", "/runs", "/runs/1",
                   "/runs/compare", "/health", "/"):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer k1"}):
            status, answered, body = exchange(server.base, "OPTIONS", target, headers)
            assert (status, body, answered["allow"]) == (204, b"", "GET, HEAD, OPTIONS"), (target, headers, body)
        if target.startswith(("/data", "/stats", "/runs")):
            assert exchange(server.base, "GET", target)[0] == 401, target
            assert exchange(server.base, "HEAD", target)[0] == 401, target
    assert exchange(server.base, "OPTIONS", "/nowhere")[0] == 404


def test_a_problem_the_front_door_answers_itself_reports_its_measured_latency(
    live_server: Any, store_path: Path
) -> None:
    """The front door's own problems (an encoded '/', a preflight refused or to no route) said api_latency_ms 0.0:
    they report the time measured as every other answer does, within the duration of the request's log line."""
    server = live_server(store_path, LOG_LEVEL="info", KASPARRO_CORS_ORIGINS=ORIGIN)
    answers = [
        exchange(server.base, "GET", "/data/bitcoin%2Fhistory"),
        preflight(server.base, "/data", origin="https://other.example"),
        preflight(server.base, "/data", method="DELETE"),
        preflight(server.base, "/nowhere"),
        exchange(server.base, "GET", "/nowhere"),  # Falcon's, for comparison
    ]
    server.process.terminate()
    server.process.wait(timeout=10)
    lines = [json.loads(line) for line in server.output.read_text().splitlines() if line.startswith("{")]
    durations = {line["request_id"]: line["duration_ms"] for line in lines if line["event"] == "request"}
    for status, headers, body in answers:
        assert headers["content-type"] == PROBLEM, status
        problem = json.loads(body)
        assert 0 < problem["api_latency_ms"] <= durations[headers["x-request-id"]], (problem, durations)


@pytest.mark.parametrize(
    "condition",
    ["name~coin%00zzz", "name~%00", "symbol~c%00q", "asset_id~bitcoin%00zz", "name~zzz|coin%00zzz", "name~coin%00",
     "name~%C3%9F%00zzz", "symbol~%00", "name~coin%00,rank<=100", "name~coin%00zzz&as_of=2030-01-01"],
)  # fmt: skip
def test_a_contained_text_holding_nul_is_that_whole_text(server: LiveServer, condition: str) -> None:
    """`field~text` keeps what contains the whole text: SQLite's LIKE ends its pattern at a NUL, so
    name~coin%00zzz kept every name ending in 'coin' and name~%00 every asset (wrong data). No stored name, symbol
    or id holds a NUL."""
    for _ in range(2):  # the second is the front door's
        status, _, body = exchange(server.base, "GET", f"/data?filter_by={condition}")
        assert status == 200, body[:200]
        assert json.loads(body)["total_items"] == 0, condition
    status, _, body = server.get(f"/data/export?filter_by={condition}&fields=asset_id")
    assert (status, body) == (200, b"asset_id\r\n"), (condition, body[:200])


@pytest.mark.parametrize("sent", [b"k1 ", b"k1\t", b"k1  \t "])
def test_an_x_api_key_is_read_without_the_whitespace_after_it(live_server: Any, store_path: Path, sent: bytes) -> None:
    """A field value has no whitespace at its ends (RFC 9110 5.5); uvicorn's parser keeps what follows it, so
    'X-API-Key: k1 ' was refused where 'Authorization: Bearer k1 ' was taken."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_API_KEYS="k1")
    for path in ("/data", "/stats", "/runs"):
        assert exchange(server.base, "GET", path, {"Authorization": b"Bearer " + sent})[0] == 200, path
        status, _, body = exchange(server.base, "GET", path, {"X-API-Key": sent})
        assert status == 200, (path, body[:200])
        assert exchange(server.base, "GET", path, {"X-API-Key": b"k"})[0] == 401, path


@pytest.mark.parametrize("after", [b" ", b"\t", b"  \t"])
def test_origin_and_request_id_are_read_without_the_whitespace_after_them(
    live_server: Any, store_path: Path, after: bytes
) -> None:
    """A field value has no whitespace at its ends (RFC 9110 5.5), but uvicorn's parser keeps what follows it: an
    allowed Origin with a space after it was served without Access-Control-Allow-Origin, and a sane X-Request-ID
    was replaced instead of echoed."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_CORS_ORIGINS="https://dash.example")
    for path in ("/data?page_size=2", "/data?page_size=2", "/health", "/nowhere", "/data?page_size=0"):
        status, headers, _ = exchange(
            server.base, "GET", path, {"Origin": b"https://dash.example" + after, "X-Request-ID": b"trace-42" + after}
        )
        assert headers.get("access-control-allow-origin") == "https://dash.example", (path, status)
        assert headers["x-request-id"] == "trace-42", (path, status)


def same_answer(body: bytes, other: bytes) -> bool:
    """Whether two bodies say the same, but for the request id and latency of a JSON one."""
    if not body.startswith(b"{"):
        return body == other
    ours, theirs = json.loads(body), json.loads(other)
    for answer in (ours, theirs):
        del answer["request_id"], answer["api_latency_ms"]
    return ours == theirs


@pytest.mark.parametrize(
    "path",
    ["/data?as_of={t}&fields=asset_id,price_usd", "/data/export?as_of={t}&fields=asset_id",
     "/data?filter_by=updated_at>={t}&fields=asset_id", "/data/bitcoin/history?interval=raw&from={t}",
     "/data/bitcoin/history?interval=raw&to={t}"],
)  # fmt: skip
def test_unix_seconds_are_read_whatever_their_leading_zeros(server: LiveServer, path: str) -> None:
    """A time in Unix seconds is its value, below 10**11, as the ETL reads one and as page= and limit= are read:
    as_of=000000000001795608000 was a 400 'expected an RFC 3339 time or Unix seconds' though it is Unix seconds."""
    plain = server.get(path.format(t="1795608000"))
    assert plain[0] == 200, plain[2][:200]
    for padded in ("01795608000", "0" * 12 + "1795608000", "0" * 30 + "1795608000.0"):
        answer = server.get(path.format(t=padded))
        assert answer[0] == 200, (padded, answer[2][:200])
        assert same_answer(answer[2], plain[2]), padded
    for milliseconds in ("0" * 5 + "1795608000000", "1795608000000"):
        status, _, body = server.get(path.format(t=milliseconds))
        assert status == 400 and "(Unix seconds, not milliseconds)" in json.loads(body)["detail"], body[:200]


FIELDS_VALUES = [
    "asset_id,symbol",
    "asset_id, symbol",
    " asset_id ,symbol ",
    "asset_id,\tsymbol",
    "asset_id\n",
    "asset_id,\u00a0symbol",
    " ",
    "asset_id,,symbol",
    "asset_id,",
    "quotes",
    "price_usd,quotes",
]


@pytest.mark.parametrize("path", ["/data", "/data/export", "/data/bitcoin"])
def test_the_published_fields_pattern_is_exactly_as_strict_as_the_api(server: LiveServer, path: str) -> None:
    """The OpenAPI document's pattern of `fields` is the API's rule: the API read 'asset_id, symbol' (spaces, as
    filter_by takes them) and also tabs, line breaks and no-break spaces around a name, all of which the pattern
    refused, so a client that validates by it refused what the API takes."""
    document = json.loads(exchange(server.base, "GET", "/openapi.json")[2])
    (parameter,) = [p for p in document["paths"][path.replace("bitcoin", "{asset_id}")]["get"]["parameters"]
                    if p["name"] == "fields"]  # fmt: skip
    anchored = parameter["schema"]["pattern"]
    assert anchored.startswith("^") and anchored.endswith("$"), anchored
    pattern = re.compile(anchored[1:-1])  # fullmatch: Python's $ also matches before a last line break
    for value in FIELDS_VALUES:
        status, _, body = server.get(f"{path}?fields={quote(value, safe=',')}")
        assert status in (200, 400), body[:200]
        assert (status == 200) == (pattern.fullmatch(value) is not None), (value, status, body[:200])
