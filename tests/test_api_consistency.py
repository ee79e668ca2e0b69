"""One rule for each class of request detail, over the real uvicorn: a weight of 0 in Accept or Accept-Encoding
refuses (RFC 9110 12.4.2, 12.5.1), an origin is scheme://host[:port] with a host DNS or IP could name (RFC 6454),
OPTIONS never counts against the rate limit, a single value with whitespace around it is a 400 naming its
parameter, and the README's data versions are what a fresh store answers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import LiveServer, exchange
from kasparro import preferred_format

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
