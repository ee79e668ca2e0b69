"""One rule for each class of request detail, over the real uvicorn: a weight of 0 in Accept or Accept-Encoding
refuses (RFC 9110 12.4.2, 12.5.1), an origin is scheme://host[:port] with a host DNS or IP could name (RFC 6454),
an answer's CORS fields let a shared cache hand it to any origin (Fetch 3.2.5), OPTIONS never counts against the
rate limit, a single value with whitespace around it is a 400 naming its parameter, and the README's data versions
are what a fresh store answers."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import falcon.testing
import pytest

from conftest import ROOT, LiveServer, exchange, run_etl
from kasparro import Config, Cors, accepts_gzip, browser_origin, create_app, preferred_format

PROBLEM = "application/problem+json"
CSV, NDJSON, JSON = "text/csv; charset=utf-8", "application/x-ndjson", "application/json"


@pytest.fixture
def server(live_server: Any, store_path: Path) -> LiveServer:
    return live_server(store_path, LOG_LEVEL="warning")


# --- content negotiation ----------------------------------------------------------------------------------------

EXPORT = "/data/export?filter_by=rank<=3"
RECORDS = ("/data?page_size=3", "/data/bitcoin/history?interval=1d")  # json, csv, ndjson: json the default
NEGOTIATED = [
    (EXPORT, "text/csv;q=0", NDJSON),  # the fault: CSV answered though refused
    (EXPORT, "TEXT/CSV;Q=0", NDJSON),  # media types and parameter names in any case
    (EXPORT, "text/csv ; q=0.0", NDJSON),
    (EXPORT, "text/*;q=0", NDJSON),
    (EXPORT, "text/csv;q=0, */*", NDJSON),  # the most specific range rules csv; */* names ndjson
    (EXPORT, "text/csv;q=abc", NDJSON),  # a weight outside the grammar counts as 0
    (EXPORT, "text/csv;q=1.5", NDJSON),
    (EXPORT, "text/csv;q=-1", NDJSON),
    (EXPORT, "application/x-ndjson;q=0", CSV),
    (EXPORT, "text/csv;q=0.2, application/x-ndjson;q=0.2", CSV),  # a tie: the default
    (EXPORT, "text/csv;q=0, application/x-ndjson;q=0", 406),
    (EXPORT, "*/*;q=0", 406),
    (EXPORT, "text/csv;q=0, application/*;q=0", 406),
    (EXPORT, "text/html", CSV),  # names none of them: the default
    *((path, "text/csv;q=0", JSON) for path in RECORDS),
    *((path, "application/json;q=0", CSV) for path in RECORDS),
    *((path, "APPLICATION/JSON;q=0", CSV) for path in RECORDS),
    *((path, "application/json;q=0, text/csv;q=0", NDJSON) for path in RECORDS),
    *((path, "application/json;q=0, */*;q=0.5, application/x-ndjson", NDJSON) for path in RECORDS),
    *((path, "application/*;q=0, text/csv;q=0.1", CSV) for path in RECORDS),
    *((path, "*/*;q=0", 406) for path in RECORDS),
    *((path, "application/*;q=0, text/*;q=0", 406) for path in RECORDS),
    *((path, "application/json;q=x, text/csv;q=0, application/x-ndjson;q=0", 406) for path in RECORDS),
    *((path, "text/html, */*;q=0.8", JSON) for path in RECORDS),  # a browser's
    # Any weight above 0, however small (the grammar allows 3 decimals; more are read too), ranks a named format
    # above those the header does not name.
    *((path, f"text/csv;q={q}", CSV) for path in RECORDS for q in ("0.001", "0.0000000001")),
]


@pytest.mark.parametrize(("path", "accept", "expected"), NEGOTIATED)
def test_a_format_accept_weighs_0_is_never_sent(server: LiveServer, path: str, accept: str, expected: Any) -> None:
    """q=0 means "not acceptable" (RFC 9110 12.5.1): the format is the best one Accept does not refuse, the default
    where it names none, and a 406 problem when it refuses every one (an explicit `format` still wins)."""
    for method in ("GET", "GET", "GET", "HEAD"):  # answered, kept, then answered by the front door
        status, headers, body = exchange(server.base, method, path, {"Accept": accept})
        assert "Accept" in headers["vary"], (path, accept)
        if expected == 406:
            assert (status, headers["content-type"]) == (406, PROBLEM), (path, accept, body[:200])
            if method == "GET":
                detail = json.loads(body)["detail"]
                assert "Accept" in detail and "format=" in detail, detail
        else:
            assert (status, headers["content-type"]) == (200, expected), (path, accept, body[:200])
    given = "&format=csv" if "?" in path else "?format=csv"
    status, headers, _ = exchange(server.base, "GET", path + given, {"Accept": "text/csv;q=0"})
    assert (status, headers["content-type"]) == (200, CSV)


@pytest.mark.parametrize(
    ("accept", "formats", "chosen"),
    [
        ("", ("json", "csv", "ndjson"), "json"),
        (",,;q=0,", ("json", "csv", "ndjson"), "json"),
        ("text/csv;q=0.5;q=0", ("json", "csv", "ndjson"), "csv"),  # the first q of a range counts
        ("text/csv;charset=utf-8;q=0", ("csv", "ndjson"), "ndjson"),
        ("*/*;q=0, application/x-ndjson;q=0.001", ("csv", "ndjson"), "ndjson"),
        ("*/*;q=0, text/*;q=1", ("json", "csv", "ndjson"), "csv"),
        ("*/*;q=0", ("json", "csv", "ndjson"), None),
        ("text/csv, text/csv;q=0", ("json", "csv"), "json"),  # a range named twice: a refusal stands, in either order
        ("text/csv;q=0, TEXT/CSV", ("json", "csv"), "json"),
        ("application/json;q=0.1, text/csv;q=0.5, application/json", ("json", "csv"), "csv"),  # else the first q
        ("application/*;q=0, application/json", ("json", "ndjson"), "json"),  # the more specific range decides
    ],
)
def test_preferred_format_reads_weights_by_the_most_specific_range(
    accept: str, formats: tuple[str, ...], chosen: str | None
) -> None:
    assert preferred_format(accept, formats) == chosen


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("GZIP;Q=0", False),
        ("gzip ; q=0", False),
        ("gzip;q=0.000", False),
        ("*;q=0", False),
        ("gzip;q=abc, *", False),  # gzip named, its weight unreadable: 0
        ("x-gzip;q=0", False),
        ("gzip;q=0, x-gzip", False),  # the alias does not undo a refusal, in either order
        ("x-gzip, gzip;q=0", False),
        ("x-gzip;q=0, gzip;q=1, *", False),
        ("gzip;q=0.5, x-gzip;q=0.001", True),
        ("identity, *;q=0", False),
        ("gzip;q=0.001", True),
        ("*;q=0.1", True),
        ("br;q=0, *", True),
        ("Gzip", True),
    ],
)
def test_gzip_weighed_0_is_never_sent(server: LiveServer, accept_encoding: str, gzipped: bool) -> None:
    for path in ("/data?page_size=100", "/data?page_size=100", "/openapi.json", "/data/export"):
        status, headers, body = exchange(server.base, "GET", path, {"Accept-Encoding": accept_encoding})
        assert status == 200 and (headers.get("content-encoding") == "gzip") == gzipped, (path, accept_encoding)
        if gzipped and path != "/data/export":  # the export is chunked on the wire
            assert gzip.decompress(body)


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip;q=0.5, identity", False),  # the client prefers the body as it is
        ("identity;q=1, gzip;q=0.999", False),
        ("IDENTITY, *;q=0.5", False),
        ("identity;q=0.5, gzip", True),
        ("gzip, identity", True),  # an even weight: the smaller body
        ("identity;q=0, gzip;q=0.1", True),
        ("gzip", True),  # identity not named: it is acceptable, not preferred
        ("identity, identity;q=0, gzip;q=0.5", True),  # a name given twice weighs its lowest q
        ("gzip;q=0.5, x-gzip, identity;q=0.8", False),  # gzip and x-gzip are one name
    ],
)
def test_gzip_is_not_sent_to_a_client_that_weighs_identity_higher(accept_encoding: str, gzipped: bool) -> None:
    assert accepts_gzip(accept_encoding) is gzipped


# A list header sent on several lines means the lines joined by commas (RFC 9110 5.3): the same answer whether it
# is kept or made. CURRENT stands for the ETag of the path's answer. What each must do on the first page is given
# as (status, format, gzip).
CURRENT = "(current)"
SPLIT_HEADERS = [
    ("Accept", ("text/csv", "application/json;q=0.1"), (200, CSV, False)),
    ("Accept", ("application/json;q=0", "application/x-ndjson;q=0.5, text/csv;q=0.1"), (200, NDJSON, False)),
    ("Accept", ("text/html", "*/*;q=0.8"), (200, JSON, False)),
    ("Accept-Encoding", ("gzip", "br"), (200, JSON, True)),
    ("Accept-Encoding", ("br", "gzip;q=0"), (200, JSON, False)),
    ("Accept-Encoding", ("gzip;q=0.5", "identity"), (200, JSON, False)),
    ("If-None-Match", (CURRENT, 'W/"other"'), (304, None, False)),
    ("If-None-Match", ('W/"other"', CURRENT), (304, None, False)),
    ("If-None-Match", ('"a"', '"b"'), (200, JSON, False)),
]
SPLIT_PATHS = ("/data?page_size=100", "/data/bitcoin", "/data/bitcoin/history?interval=1d", "/stats", "/health")


@pytest.mark.parametrize(("name", "lines", "expected"), SPLIT_HEADERS)
def test_a_list_header_on_several_lines_is_one_list_kept_or_not(
    live_server: Any, store_path: Path, name: str, lines: tuple[str, ...], expected: tuple[int, str | None, bool]
) -> None:
    scout = live_server(store_path, LOG_LEVEL="warning")  # learns each path's ETag, keeping nothing in `server`
    server = live_server(store_path, LOG_LEVEL="warning")

    def seen(reply: tuple[int, dict[str, str], bytes]) -> tuple[Any, ...]:
        status, headers, _ = reply
        fields = ("content-type", "content-encoding", "etag", "vary")  # the length: a latency may take a digit more
        return (status, *(headers.get(field) for field in fields))

    for path in SPLIT_PATHS:
        etag = exchange(scout.base, "GET", path)[1].get("etag", '"none"')
        values = [etag if line == CURRENT else line for line in lines]
        split = [(name, value) for value in values]
        made = exchange(server.base, "GET", path, split)  # nothing kept for the path yet
        assert exchange(server.base, "GET", path)[0] == 200  # a plain request keeps the answer
        kept = exchange(server.base, "GET", path, split)
        joined = exchange(server.base, "GET", path, {name: ", ".join(values)})
        assert seen(made) == seen(kept) == seen(joined), (path, split)
        if path == SPLIT_PATHS[0]:
            status, media_type, gzipped = expected
            assert made[0] == status, split
            assert media_type is None or made[1]["content-type"] == media_type, split
            assert (made[1].get("content-encoding") == "gzip") == gzipped, split


@pytest.mark.parametrize(("name", "lines", "expected"), SPLIT_HEADERS)
def test_a_list_header_on_several_lines_is_one_list_in_the_front_doors_turn(
    store_path: Path, name: str, lines: tuple[str, ...], expected: tuple[int, str | None, bool]
) -> None:
    """The front door sends a kept answer itself only when the store was already looked at in this turn of the loop:
    a request right behind another, as under load. Here the split request is that one."""
    path = SPLIT_PATHS[0]

    async def requests() -> list[falcon.testing.Result]:
        app = create_app(Config(db=store_path, log_level="warning"))
        async with falcon.testing.ASGIConductor(app) as conductor:  # its lifespan: started, then shut down
            for _ in range(2):  # an answer is kept when it is made a second time
                kept = await conductor.simulate_get(path)
                assert kept.status_code == 200
            assert app.answers.entries, "nothing kept"
            split = [(name, kept.headers["etag"] if line == CURRENT else line) for line in lines]
            looked_up = app.kept_answer

            async def spied(scope: dict[str, Any]) -> Any:  # the way to a kept answer when the front door has none
                looked_up_for.append(dict(scope["headers"]).get(name.lower().encode()))
                return await looked_up(scope)

            app.kept_answer = spied
            return list(await asyncio.gather(conductor.simulate_get(path), conductor.simulate_get(path, headers=split)))

    looked_up_for: list[bytes | None] = []
    _, result = asyncio.run(requests())
    assert looked_up_for == [None], "the plain request looks its answer up; the split one is sent by the front door"
    assert (result.status_code, result.headers.get("content-encoding") == "gzip") == (expected[0], expected[2])
    assert expected[1] is None or result.headers["content-type"] == expected[1]


# --- CORS origins -----------------------------------------------------------------------------------------------

NOT_ORIGINS = [
    "https://a..example",  # the fault: an empty DNS label
    "https://.a.example",
    "https://a.example.",  # a trailing dot: another origin than without it, and surely not the one meant
    "https://a.example..",
    "https://a.example:65536",
    "https://a.example:0",
    "https://a.example?x=1",
    "https://a.example#top",
    "https://a.example/",
    f"https://{'a' * 64}.example",  # a DNS label is at most 63 octets
    f"https://{'a.' * 127}example",  # a name at most 253
    "https://a b.example",
    "https://a!b.example",
    "https://1.2.3",  # an IPv4 address a browser would read otherwise, or none
    "https://256.1.1.1",
    "https://01.2.3.4",
    "https://0x7f.0.0.1",
    "http://[1::2::3]",
    "http://[::1%25eth0]",  # a zone id: no browser sends one
    "http://[fe80::1%eth0]",
    "http://[127.0.0.1]",
    "http://[::1]x",
]


@pytest.mark.parametrize("origin", NOT_ORIGINS)
def test_an_origin_with_a_host_no_browser_sends_stops_the_start_naming_it(origin: str) -> None:
    assert browser_origin(origin) is None
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({"KASPARRO_CORS_ORIGINS": f"https://ok.example,{origin}"})
    assert str(stopped.value).startswith(f"kasparro: KASPARRO_CORS_ORIGINS: {origin[:100]!r} is not an origin")


@pytest.mark.parametrize(
    ("origin", "sent"),
    [("http://[0:0::1]", "http://[::1]"), ("http://[2001:DB8::1]:8080", "http://[2001:db8::1]:8080")],
)
def test_an_ipv6_origin_is_written_as_a_browser_sends_it(origin: str, sent: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(f"is not how a browser sends that origin: write {sent!r}")):
        Config.from_env({"KASPARRO_CORS_ORIGINS": origin})


@pytest.mark.parametrize(
    "origin",
    ["https://a-b.example:65535", "http://127.0.0.1:8080", "http://[2001:db8::1]", "https://s_1.a.example",
     "http://localhost:1", "https://xn--4ca.example", "app://desk"],
)  # fmt: skip
def test_origins_with_a_valid_host_and_port_are_taken(origin: str) -> None:
    assert browser_origin(origin) == origin
    assert Config.from_env({"KASPARRO_CORS_ORIGINS": origin}).cors_origins == (origin,)


def test_the_service_does_not_start_on_an_origin_with_an_empty_label(store_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "KASPARRO_DB": str(store_path), "KASPARRO_CORS_ORIGINS": "https://a..example"}
    started = subprocess.run(
        [sys.executable, "-c", "import kasparro"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 1
    assert "kasparro: KASPARRO_CORS_ORIGINS: 'https://a..example' is not an origin" in started.stderr
    assert "Traceback" not in started.stderr


def cors_fields(base: str, method: str, target: str, headers: dict[str, str]) -> tuple[int, set[tuple[str, str]]]:
    """Status, and the CORS fields of the response with each Vary token on its own: what a cache keys and keeps."""
    address = urlsplit(base)
    conn = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    try:
        conn.request(method, target, headers=headers)
        response = conn.getresponse()
        response.read()
        fields = {(name.lower(), value) for name, value in response.getheaders()}
    finally:
        conn.close()
    vary = {("vary", token.strip().lower()) for name, value in fields if name == "vary" for token in value.split(",")}
    return response.status, {(n, v) for n, v in fields if n.startswith("access-control-")} | vary - {("vary", "")}


# Requests of every kind of answer: kept, streamed, conditional, HEAD, errors of the resource, the front door's
# and Falcon's, the docs.
CACHED_KINDS = [
    ("GET", "/data?page_size=2", {}), ("GET", "/data/bitcoin", {}), ("HEAD", "/data?page_size=2", {}),
    ("GET", "/data/nowhere", {}), ("GET", "/data?page_size=0", {}), ("GET", "/nowhere", {}),
    ("GET", "/data/export?filter_by=rank<=2", {}), ("GET", "/health", {}), ("GET", "/openapi.json", {}),
    ("GET", "/docs/", {}), ("GET", "/stats", {}), ("GET", "/data?page_size=2", {"Accept-Encoding": "gzip"}),
    ("GET", "/data?page_size=2", {"Accept": "text/csv"}), ("POST", "/data", {}),
]  # fmt: skip


@pytest.mark.parametrize("cors", ["*", "https://a.example,https://b.example", ""])
def test_a_cache_can_hand_any_answer_to_any_origin(live_server: Any, store_path: Path, cors: str) -> None:
    """A shared cache keys an answer on its URL and the fields Vary names. Under `*` an answer to a request with no
    Origin (a server, curl, a cache's revalidation) had no Access-Control-Allow-Origin and no Vary: Origin, so a
    cache could hand it to a browser page, which then refused it. Now every answer under `*` carries the same CORS
    fields whatever the Origin; with a list, every answer says Vary: Origin; with none, none carries them."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_CORS_ORIGINS=cors)
    any_origin = [("access-control-allow-origin", "*"), ("access-control-expose-headers", Cors.EXPOSED.decode())]
    for method, target, headers in CACHED_KINDS:
        seen = {}
        for origin in (None, "https://a.example", "https://c.example", "null", "garbage"):
            sent = headers if origin is None else {**headers, "Origin": origin}
            status, fields = cors_fields(server.base, method, target, sent)
            seen[origin] = fields
            if cors == "*":
                assert set(any_origin) <= fields, (method, target, origin, status, fields)
            elif cors:
                assert ("vary", "origin") in fields, (method, target, origin, status, fields)
            else:
                assert not {f for f in fields if f[0].startswith("access-control-")}, (method, target, origin, fields)
        if cors != "https://a.example,https://b.example":  # with a list, only the allowed origin gets the grant
            assert len({frozenset(fields) for fields in seen.values()}) == 1, (method, target, seen)
        else:
            assert ("access-control-allow-origin", "https://a.example") in seen["https://a.example"], (target, seen)
        etag = exchange(server.base, "GET", target, headers)[1].get("etag") if method == "GET" else None
        if etag:  # a cache's revalidation (no Origin), and its 304
            status, fields = cors_fields(server.base, "GET", target, {**headers, "If-None-Match": etag})
            assert status == 304 and fields == seen[None], (target, fields, seen[None])


BAD_ORIGINS = [b"https://a..example", b"https://A.example", b"https://a.example/", b"https://a.example:443",
               b"garbage", b"http://[::1", b"https://a.example.", b"\xff", b"https://u@a.example"]  # fmt: skip


@pytest.mark.parametrize("cors", ["*", "https://a.example"])
def test_an_origin_header_no_browser_sends_is_granted_nothing(live_server: Any, store_path: Path, cors: str) -> None:
    """Never a 500: an answer carries what one without Origin does (under `*` the grant every answer carries, with
    a list none), a preflight gets a 403 problem; a sound Origin is still served."""
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_CORS_ORIGINS=cors)
    for origin in BAD_ORIGINS:
        for path in ("/data?page_size=2", "/data?page_size=2", "/data/nowhere", "/health"):
            status, headers, _ = exchange(server.base, "GET", path, {"Origin": origin})
            assert status in (200, 404), (origin, path)
            granted = {name: value for name, value in headers.items() if name.startswith("access-control-")}
            without = {name: value for name, value in exchange(server.base, "GET", path)[1].items()
                       if name.startswith("access-control-")}  # fmt: skip
            assert granted == without and bool(granted) == (cors == "*"), (origin, path, headers)
        preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
        status, headers, body = exchange(server.base, "OPTIONS", "/data", preflight)
        assert (status, headers["content-type"]) == (403, PROBLEM), (origin, body)
        assert "access-control-allow-origin" not in headers
    status, headers, _ = exchange(server.base, "GET", "/data?page_size=2", {"Origin": "https://a.example"})
    assert headers["access-control-allow-origin"] == ("*" if cors == "*" else "https://a.example")
    if cors == "*":  # a page of an opaque origin (a sandboxed frame, a file) sends null
        assert exchange(server.base, "GET", "/health", {"Origin": "null"})[1]["access-control-allow-origin"] == "*"


# --- rate limit -------------------------------------------------------------------------------------------------


def test_options_never_counts_against_the_rate_limit_and_every_other_method_does(
    make_client: Any, store_path: Path
) -> None:
    """OPTIONS only says what a route allows (as without a key): plain or a CORS preflight, it is never limited
    and carries no RateLimit-*; GET, HEAD and a method the route refuses each take a token."""
    config = Config(db=store_path, rate_limit=1, log_level="warning", cors_origins=("*",))  # a burst of 2
    client = make_client(config, create_app(config, clock=lambda: 1_000.0))  # the clock stands: no refill
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "GET"}
    for _ in range(5):
        for path in ("/data", "/data/bitcoin/history", "/data/export", "/stats", "/nowhere"):
            plain = client.request("OPTIONS", path)
            assert plain.status_code in (204, 404) and "ratelimit-limit" not in plain.headers, path
            asked = client.request("OPTIONS", path, headers=preflight)
            assert asked.status_code in (204, 404) and "ratelimit-limit" not in asked.headers, path
    assert client.request("HEAD", "/data").headers["ratelimit-remaining"] == "1"
    refused = client.request("DELETE", "/data")
    assert (refused.status_code, refused.headers["ratelimit-remaining"]) == (405, "0")
    assert client.get("/data").status_code == 429
    assert client.request("OPTIONS", "/data").status_code == 204


def test_options_passes_a_spent_limit_over_the_real_server(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_RATE_LIMIT="0.01")  # a burst of 1, 100 s a token
    assert exchange(server.base, "GET", "/data")[0] == 200
    assert exchange(server.base, "GET", "/data")[0] == 429
    for _ in range(3):
        status, headers, _ = exchange(server.base, "OPTIONS", "/data")
        assert (status, "ratelimit-limit" in headers) == (204, False)


# --- whitespace around a value ----------------------------------------------------------------------------------


@pytest.fixture
def feed_server(live_server: Any, tmp_path: Path) -> LiveServer:
    """The sample, and csv:feed: six observations of bitcoin, an hour apart."""
    feed, db = tmp_path / "feed.csv", tmp_path / "feed.db"
    hours = "".join(f"bitcoin,BTC,Bitcoin,{95_000 + h},2026-11-25T{h:02}:00:00Z\n" for h in range(6))
    feed.write_text(f"id,symbol,name,price_usd,last_updated\n{hours}")
    assert run_etl(db, f"csv:{ROOT / 'data' / 'sample.csv'}", f"csv:{feed}").returncode == 0
    return live_server(db, LOG_LEVEL="warning")


def first_cursor(server: LiveServer, path: str) -> str:
    status, _, body = exchange(server.base, "GET", path)
    assert status == 200, body
    return json.loads(body)["next_cursor"]


def single_values(server: LiveServer) -> list[tuple[str, str, str]]:
    """(path, parameter, a valid value) for every parameter of /data, /data/export and history that takes one
    value, and of /runs and /runs/compare."""
    data_cursor = first_cursor(server, "/data?page_size=2")
    history_cursor = first_cursor(server, "/data/bitcoin/history?interval=raw&from=0&limit=1&source=csv:feed")
    history = "/data/bitcoin/history?interval=raw&from=0&limit=1"
    return [
        ("/data?page_size=2", "page", "2"),
        ("/data", "page_size", "3"),
        ("/data", "sort", "-rank"),
        ("/data?page_size=2", "cursor", data_cursor),
        ("/data", "as_of", "2026-11-25T12:00:00Z"),
        ("/data", "as_of", "1795607999"),
        ("/data", "format", "csv"),
        ("/data/export", "sort", "name"),
        ("/data/export", "as_of", "2026-11-25T12:00:00Z"),
        ("/data/export", "format", "ndjson"),
        ("/data/bitcoin/history", "interval", "1d"),
        ("/data/bitcoin/history", "from", "2026-11-01T00:00:00Z"),
        ("/data/bitcoin/history", "to", "1795608000"),
        ("/data/bitcoin/history", "source", "csv:feed"),  # the fault: it matched no listing, and said nothing
        ("/data/bitcoin/history", "limit", "5"),
        (f"{history}&source=csv:feed", "cursor", history_cursor),
        ("/data/bitcoin/history", "format", "ndjson"),
        ("/runs", "limit", "1"),
        ("/runs/compare?b=1", "a", "1"),
    ]


def test_a_single_value_with_whitespace_around_it_is_a_400_naming_its_parameter(feed_server: LiveServer) -> None:
    server = feed_server
    for path, name, value in single_values(server):
        target = f"{path}{'&' if '?' in path else '?'}{name}="
        assert exchange(server.base, "GET", target + quote(value, safe=":"))[0] == 200, (path, name)
        for spaced in (f" {value}", f"{value} ", f"\t{value}", f"{value}\u00a0", f"  {value}  "):
            for method in ("GET", "GET", "HEAD"):
                status, headers, body = exchange(server.base, method, target + quote(spaced, safe=":"))
                assert (status, headers["content-type"]) == (400, PROBLEM), (path, name, spaced, body[:200])
                if method == "GET":
                    detail = json.loads(body)["detail"]
                    assert detail.startswith(f"{name}: ") and "whitespace" in detail, detail
    for path in ("/", "/health", "/metrics", "/openapi.json"):  # they ignore parameters, for monitors that add some
        assert exchange(server.base, "GET", f"{path}?probe=%201%20")[0] == 200, path


@pytest.mark.parametrize(
    ("path", "spaced", "plain"),
    [
        ("/data", "filter_by=%20symbol:btc%20,%20active%20", "filter_by=symbol:btc,active"),
        ("/data", "fields=%20symbol%20,rank%20", "fields=symbol,rank"),
        ("/data/export", "filter_by=%20rank<=3%20&fields=%20symbol%20", "filter_by=rank<=3&fields=symbol"),
        ("/data/bitcoin", "fields=%20symbol%20", "fields=symbol"),
    ],
)
def test_the_lists_take_spaces_around_their_items(server: LiveServer, path: str, spaced: str, plain: str) -> None:
    """filter_by and fields are lists whose published syntax lets plain spaces surround each item (and so them)."""
    expected = exchange(server.base, "GET", f"{path}?{plain}")
    assert expected[0] == 200
    answer = exchange(server.base, "GET", f"{path}?{spaced}")
    assert (answer[0], answer[1].get("etag")) == (200, expected[1].get("etag")), answer[2][:200]


# --- README -----------------------------------------------------------------------------------------------------


def test_the_readmes_first_data_version_is_what_a_fresh_store_answers(live_server: Any, tmp_path: Path) -> None:
    """The quick start loads the sample into a fresh store: its data_version ends in that store's generation."""
    db = tmp_path / "fresh.db"
    assert run_etl(db).returncode == 0
    status, _, body = exchange(live_server(db, LOG_LEVEL="warning").base, "GET", "/data")
    assert status == 200
    generation = json.loads(body)["data_version"].rsplit("-", 1)[1]
    readme = (ROOT / "README.md").read_text()
    first = re.search(r'"data_version": ?"[0-9a-f]{12}-([0-9]+)"', readme)
    assert first is not None and first.group(1) == generation, (first and first.group(0), generation)
