"""Upstream bodies as a newcomer met them: other encodings, bodies cut short, half UTF-16 pairs, no JSON at all.
The real etl.py against a fake CoinGecko on 127.0.0.1, into a real SQLite store."""

from __future__ import annotations

import codecs
import contextlib
import gzip
import json
import socketserver
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import etl_against, last_run, query, run_etl
from upstream import COINGECKO_MARKETS, COINPAPRIKA_TICKERS, Reply

NAMES = ["Bitcoin", "Café Coin", "Ünïcode Tökén", "Rocket 🚀"]


def markets(names: list[str] = NAMES) -> list[dict[str, Any]]:
    """A short (so last) page of CoinGecko /coins/markets records with these names."""
    return [
        {"id": f"coin-{n}", "symbol": f"c{n}", "name": name, "current_price": 1.5 + n, "market_cap": 1000 + n,
         "market_cap_rank": n + 1, "total_volume": 10.0, "price_change_percentage_24h": 0.5,
         "last_updated": "2026-11-25T12:00:00Z"}
        for n, name in enumerate(names)
    ]  # fmt: skip


def loaded_names(db: Path) -> list[str]:
    return [name for (name,) in query(db, "SELECT name FROM source_map ORDER BY source_id")]


def source_error(db: Path) -> str:
    (error,) = query(db, "SELECT error FROM run_source WHERE source = 'coingecko' ORDER BY run_id DESC LIMIT 1")[0]
    return error


def fails_clearly(result: Any, db: Path) -> str:
    """The source's error of a run that failed with a message, not a traceback, and was recorded as failed."""
    assert result.returncode == etl.EXIT_FAILED, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_run(db)["status"] == "failed"
    return source_error(db)


# --- encodings ----------------------------------------------------------------------


def test_a_body_that_is_not_utf8_fails_the_source_naming_the_line_and_byte(upstream: Any, tmp_path: Path) -> None:
    """A Windows-1252 body was a UnicodeDecodeError traceback that left the run 'running'."""
    text = json.dumps(markets(NAMES[:3]), indent=1, ensure_ascii=False)
    line = next(n for n, content in enumerate(text.split("\n"), start=1) if "Café" in content)
    column = text.split("\n")[line - 1].encode("cp1252").index("é".encode("cp1252")) + 1
    upstream.route(COINGECKO_MARKETS, Reply(body=text.encode("cp1252")))
    db = tmp_path / "store.db"
    error = fails_clearly(etl_against(upstream, db, "coingecko"), db)
    assert error.endswith(
        f": line {line} is not UTF-8: byte 0xe9 at byte {column} of the line (Windows-1252 or Latin-1?)"
    )
    assert query(db, "SELECT count(*) FROM source_map") == [(0,)]


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: codecs.BOM_UTF8 + text.encode("utf-8"),
        lambda text: text.encode("utf-16"),  # little-endian, with its byte-order mark
        lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
        lambda text: text.encode("utf-32"),
    ],
    ids=["utf-8-bom", "utf-16-le", "utf-16-be", "utf-32"],
)
def test_a_body_with_a_byte_order_mark_loads(upstream: Any, tmp_path: Path, encode: Any) -> None:
    """SPEC's input hygiene: UTF-8 with or without a BOM, UTF-16 with one; they failed as 'not valid JSON'."""
    upstream.route(COINGECKO_MARKETS, Reply(body=encode(json.dumps(markets(), ensure_ascii=False))))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    assert loaded_names(db) == NAMES


def test_a_broken_utf16_body_fails_naming_its_line(upstream: Any, tmp_path: Path) -> None:
    body = json.dumps(markets(), indent=1).encode("utf-16")[:-1]  # the last character loses a byte
    upstream.route(COINGECKO_MARKETS, Reply(body=body))
    db = tmp_path / "store.db"
    lines = json.dumps(markets(), indent=1).count("\n") + 1
    assert fails_clearly(etl_against(upstream, db, "coingecko"), db).endswith(
        f": line {lines} is not valid UTF-16: truncated data"
    )


def test_a_record_with_half_a_utf16_pair_loads_with_a_replacement_character(upstream: Any, tmp_path: Path) -> None:
    """A name cut inside an emoji upstream ('\\ud83d' alone: valid JSON) failed the whole page as 'truncated'."""
    body = json.dumps(markets()).replace("\\ud83d\\ude80", "\\ud83d")  # json.dumps escapes the emoji as a pair
    assert "\\ud83d" in body and "\\ude80" not in body
    upstream.route(COINGECKO_MARKETS, Reply(body=body))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    assert loaded_names(db) == [*NAMES[:3], "Rocket \ufffd"]
    assert (last_run(db)["status"], last_run(db)["rows_loaded"]) == ("success", 4)


# --- bodies cut short ---------------------------------------------------------------


def test_a_body_cut_short_is_fetched_again(upstream: Any, tmp_path: Path) -> None:
    """The connection closed before Content-Length: read as a whole body, it failed the source as bad JSON."""
    upstream.route(COINGECKO_MARKETS, Reply(body=markets(), truncate=100), Reply(body=markets()))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(upstream.requests) == 2
    assert loaded_names(db) == NAMES
    size = len(json.dumps(markets()).encode())
    retries = [json.loads(line) for line in result.stdout.splitlines() if '"retrying"' in line]
    assert [r["problem"] for r in retries] == [f"the connection closed after 100 of {size:,} bytes"]


DOCUMENT = json.dumps(markets()).encode()
CUT_GZIP = gzip.compress(DOCUMENT, mtime=0)[:-30]  # the deflate stream's end and the gzip trailer are missing


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (Reply(body=DOCUMENT, truncate=100), f"the connection closed after 100 of {len(DOCUMENT):,} bytes"),
        (
            Reply(body=CUT_GZIP, headers={"Content-Encoding": "gzip"}),  # Content-Length is the cut body's
            f"the gzip body ends early, after {len(zlib.decompressobj(wbits=31).decompress(CUT_GZIP)):,} bytes"
            " inflated",
        ),
    ],
    ids=["content-length", "gzip-stream"],
)
def test_a_body_always_cut_short_fails_the_source_saying_so(
    upstream: Any, tmp_path: Path, reply: Reply, problem: str
) -> None:
    upstream.route(COINGECKO_MARKETS, reply)
    db = tmp_path / "store.db"
    error = fails_clearly(etl_against(upstream, db, "coingecko"), db)
    assert error.endswith(f"{problem} after {etl.HttpPolicy.attempts} attempts")
    assert len(upstream.requests) == etl.HttpPolicy.attempts


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        ("x-gzip", gzip.compress(DOCUMENT, mtime=0)),  # gzip's old name (RFC 9110 8.4.1.3: read it as gzip)
        ("deflate", zlib.compress(DOCUMENT)),
        ("gzip, gzip", gzip.compress(gzip.compress(DOCUMENT, mtime=0), mtime=0)),  # applied in order, undone in reverse
        ("Identity", DOCUMENT),
    ],
    ids=["x-gzip", "deflate", "gzip-twice", "Identity"],  # xdist's workers must collect the same names
)
def test_a_body_in_another_http_coding_loads(upstream: Any, tmp_path: Path, coding: str, body: bytes) -> None:
    """Only 'gzip' was inflated: an x-gzip or deflate body failed the source as 'not valid JSON ... starting
    x???'."""
    upstream.route(COINGECKO_MARKETS, Reply(body=body, headers={"Content-Encoding": coding}))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    assert loaded_names(db) == NAMES


def test_a_body_in_a_coding_the_etl_does_not_read_fails_naming_it(upstream: Any, tmp_path: Path) -> None:
    upstream.route(COINGECKO_MARKETS, Reply(body=b"\x1b\x00\xf8", headers={"Content-Encoding": "br"}))
    db = tmp_path / "store.db"
    error = fails_clearly(etl_against(upstream, db, "coingecko"), db)
    assert error.endswith(": a body in the 'br' coding, which the ETL does not read (it asks for gzip)")
    assert len(upstream.requests) == 1  # not fetched again: it would come back the same


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(301, b"", {"Location": "https://api.example/api/v3/coins/markets?x_cg_demo_api_key=secret"}),
         "answered HTTP 301, a redirect to https://api.example/api/v3/coins/markets?x_cg_demo_api_key=***, which"
         " the ETL does not follow: set KASPARRO_COINGECKO_URL to the address it moved to"),
        (Reply(302, b"<a>elsewhere</a>"), "answered HTTP 302, a redirect to no address (no Location header),"
         " which the ETL does not follow: set KASPARRO_COINGECKO_URL to the address it moved to"),
        (Reply(204, b""), "answered HTTP 204 with an empty body"),
        (Reply(404, b'{"error": "not found"}'), 'answered HTTP 404: {"error": "not found"}'),
    ],
    ids=["301", "302-no-location", "204-empty", "404-body"],
)  # fmt: skip
def test_an_answer_other_than_200_says_what_it_was(upstream: Any, tmp_path: Path, reply: Reply, reason: str) -> None:
    """A redirect read 'answered HTTP 301: ' (its empty body after the colon), not where it pointed: an http:// base
    URL that the upstream moves to https:// failed every run without saying so."""
    upstream.route(COINGECKO_MARKETS, reply)
    db = tmp_path / "store.db"
    error = fails_clearly(etl_against(upstream, db, "coingecko"), db)
    assert error.endswith(f"/api/v3/coins/markets?vs_currency=usd&order=market_cap_desc&per_page=250&page=1 {reason}")
    assert len(upstream.requests) == 1  # not retried: it would come back the same


# --- not JSON -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "an empty body, not JSON"),
        (b"<html>rate limited</html>", "not valid JSON: invalid character at line 1, column 1, in 25 bytes"
         " starting '<html>rate limited</html>'"),
        (b'[{"id": "a"},\n {"id": "b"},\n]', "not valid JSON: trailing comma in array at line 3, column 1,"
         " in 29 bytes starting '[{\"id\": \"a\"},? {\"id\": \"b\"},?]'"),
        (b'[{"id": "a"', "not valid JSON: it ends early, in 11 bytes starting '[{\"id\": \"a\"'"),
    ],
    ids=["empty", "html", "trailing-comma", "ends-early"],
)  # fmt: skip
def test_a_body_that_is_not_json_says_where_in_a_readers_words(
    upstream: Any, tmp_path: Path, body: bytes, reason: str
) -> None:
    """The parser's own words ('JSON is malformed: invalid character (byte 0)', 'Input data was truncated') were
    the error."""
    upstream.route(COINGECKO_MARKETS, Reply(body=body))
    db = tmp_path / "store.db"
    assert fails_clearly(etl_against(upstream, db, "coingecko"), db).endswith(f": {reason}")


# --- drift --------------------------------------------------------------------------


def test_drift_names_the_most_frequent_unknown_fields_and_counts_the_rest(upstream: Any, tmp_path: Path) -> None:
    """Records that each carry new keys (ids as keys) made a drift entry per key: 100,000 of them were 8 MB in the
    run record, in every /runs and /stats answer and in one log line."""
    records = markets()
    for n, record in enumerate(records):
        record["price_current"] = record.pop("current_price")  # renamed in every record
        record.update({f"coin-{n}-{k}": k for k in range(100)})  # 400 names, each once
    upstream.route(COINGECKO_MARKETS, Reply(body=records))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    (text,) = query(db, "SELECT drift FROM run_source")[0]
    drift = json.loads(text)
    named = [entry for entry in drift if entry.startswith("unknown field ")]
    assert len(named) == etl.UNKNOWN_NAMED and drift["unknown field 'price_current'"] == len(records)
    assert drift[f"{401 - etl.UNKNOWN_NAMED} more unknown fields, each rarer"] == 400 - (etl.UNKNOWN_NAMED - 1)
    assert drift["missing field 'current_price'"] == len(records)
    assert [entry for entry in drift if entry.startswith("likely rename 'current_price' \u2192 'price_current'")]
    assert len(text) < 5_000


# --- slow bodies ----------------------------------------------------------------------


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(DOCUMENT)
UNSIZED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"  # the body ends with it


@contextlib.contextmanager
def dripping_upstream(reply: bytes, at_once: int) -> Iterator[tuple[str, list[int]]]:
    """A fake CoinGecko on 127.0.0.1 that answers every GET with reply[:at_once], then the rest a byte every
    0.2 s, well within a 1 s read timeout. Yields its URL and, per request, the bytes it sent before the hang-up."""
    sent: list[int] = []
    stop = threading.Event()

    class Drip(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while self.rfile.readline() not in (b"\r\n", b""):  # the request's lines
                pass
            count = 0
            try:
                self.wfile.write(reply[:at_once])
                for byte in reply[at_once:]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    count += 1
                    if stop.wait(0.2):
                        break
            except OSError:  # the ETL hung up
                pass
            sent.append(count)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", sent
        deadline = time.monotonic() + 30
        while not sent and time.monotonic() < deadline:
            stop.wait(0.05)  # the handler sees the hang-up at its next byte
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("head", "at_once", "doing"),
    [
        (HEAD, len(HEAD), "while reading"),  # the body drips in
        (UNSIZED, len(UNSIZED), "while reading"),  # a body that the hang-up would seem to end
        (HEAD, 0, "waiting for the response"),  # the status line drips in
        (HEAD, len(HEAD) // 2, "waiting for the response"),  # the headers do
    ],
    ids=["body", "unsized-body", "status-line", "headers"],
)
def test_an_answer_that_drips_in_ends_with_the_time_budget(
    tmp_path: Path, head: bytes, at_once: int, doing: str
) -> None:
    """Each wait for bytes ended with the read timeout, not the budget: a body sent a byte every 0.4 s held a run
    with a 2 s budget for the whole body (27 s for 61 bytes), and a status line or headers that dripped in held
    it for as long as they lasted (http.client reads them in many waits)."""
    db = tmp_path / "store.db"
    reply = head + DOCUMENT
    with dripping_upstream(reply, at_once) as (url, sent):
        result = run_etl(
            db, "coingecko", KASPARRO_COINGECKO_URL=url, KASPARRO_HTTP_BUDGET="2", KASPARRO_HTTP_TIMEOUT="1"
        )
        error = fails_clearly(result, db)
    assert error.startswith(f"{url}/api/v3/coins/markets?") and error.endswith(f": time budget of 2 s spent {doing}")
    assert sent and sent[0] < (len(reply) - at_once) // 2, sent  # the ETL hung up long before the reply's end


# --- rejected records ---------------------------------------------------------------


@pytest.mark.parametrize("source", ["coingecko", "coinpaprika"])
def test_a_rejected_record_is_kept_cut_at_a_character_not_inside_one(
    upstream: Any, tmp_path: Path, source: str
) -> None:
    """A rejected record is kept as its JSON cut to 1,000 characters. It was cut at 1,000 bytes, then decoded: a
    character of two to four bytes across the cut (a name in CJK, emoji in a description) ended etl.py with a
    UnicodeDecodeError traceback, the run left 'running' and the other records of the page not loaded."""
    rejected = [{"id": "x-cj", "name": "币" * 400}, {"id": "x-emoji", "name": "Rocket", "description": "🚀" * 300}]
    if source == "coingecko":
        upstream.route(COINGECKO_MARKETS, Reply(body=[*markets(["Bitcoin"]), *rejected]))
    else:
        tickers = [{"id": "btc-bitcoin", "symbol": "BTC", "name": "Bitcoin", "quotes": {"USD": {"price": 1.5}}}]
        upstream.route(COINPAPRIKA_TICKERS, Reply(body=[*tickers, *rejected]))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, source)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 3, 1, 2)
    kept = [json.dumps(record, ensure_ascii=False, separators=(",", ":"))[:1000] for record in rejected]
    assert query(db, "SELECT line, reason, raw FROM reject ORDER BY line") == [
        (2, "missing required field 'symbol'", kept[0]),
        (3, "missing required field 'symbol'", kept[1]),
    ]


@pytest.mark.parametrize(
    ("field", "drift"),
    [
        ("market_cap", "invalid field 'market_cap': not finite"),
        ("total_volume", "invalid field 'total_volume': not finite"),
        ("last_updated", "invalid field 'last_updated': not an RFC 3339 time or Unix seconds or milliseconds"),
    ],
)
def test_an_integer_too_long_to_read_makes_its_field_null_not_the_page_fail(
    upstream: Any, tmp_path: Path, field: str, drift: str
) -> None:
    """An integer of over 4,300 digits is valid JSON that msgspec (like CPython's int()) refuses: the whole page
    failed as 'not valid JSON', its other records with it, where 1e400 only makes its own field null."""
    page = markets(["Bitcoin", "Café Coin"])
    page[1][field] = "an integer"
    upstream.route(COINGECKO_MARKETS, Reply(body=json.dumps(page).replace('"an integer"', "9" * 5000)))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stdout[-2000:]
    assert loaded_names(db) == NAMES[:2]
    ((drift_json,),) = query(db, "SELECT drift FROM run_source")
    assert json.loads(drift_json) == {drift: 1}
