"""Hostile requests: crafted queries, paths, cursors and headers are answered safely and change nothing."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest

import kasparro
from conftest import SyncConductor
from kasparro import Config, create_app

PROBLEM = "application/problem+json"
SAFE_STATUSES = {200, 304, 400, 404}
MARKER = "INJECTED-7f3a"  # searched for in the logs: it must never get there raw

SQL = [
    "' OR '1'='1",
    "1; DROP TABLE asset; --",
    '" OR 1=1 --',
    "1 UNION SELECT sql FROM sqlite_master",
    "rank); DELETE FROM asset; --",
    "') OR 1=1 --",
    "1' AND randomblob(1000000000)--",
    "ATTACH DATABASE '/tmp/pwned.db' AS pwned",
    "%' ESCAPE '\\",
    "*/ SELECT 1 /*",
]
SQL_FILTERS = [
    "name:' OR 1=1 --",
    "symbol:btc' UNION SELECT 1--",
    "name~%' OR '1'='1",
    "asset_id:x') OR ('1'='1",
    "source:csv:sample' --",
    "rank>1 OR 1=1",
    "price_usd<0); DROP TABLE asset; --",
    "status:active' --",
    "name~\\",
    "name~%_%",
]
NUMBERS = ["-1", "0", "-0", "1e9", "99999999999999999999", "999999999", "1000000000", "1.5", "0x10", "NaN",
           "Infinity", "-Infinity", "1_0", " 1", "+1", "１", "٣", "", "00000000001"]  # fmt: skip
NUMBER_FILTERS = [
    "rank>NaN",
    "price_usd<Infinity",
    "rank>1e999",
    "rank<-1e999",
    "market_cap_usd>=-0",
    "rank>99999999999999999999999",
    "rank:1|NaN",
    "volume_24h_usd>0x10",
    "change_24h_pct<=1e-400",
    "updated_at>9999-99-99",
    "updated_at<0000-01-01",
    "updated_at>2026-13-45T25:61:61Z",
    "updated_at>=2026-11-25T12:00:00+99:00",
    "rank>1.7976931348623157e309",
]
ODD_TEXT = ["\u202eevil", "\x00", "\x1b[31m", f"\r\nX-{MARKER}: 1", "🚀", "ǅ", "İ", "\ufeff", "\t", "Ω≈ç√"]
BAD_ESCAPES = ["%", "%z", "%zz", "%%", "%2", "%g0", "%ZZ", "%C0%AF", "%ED%A0%80", "%FF%FE", "%00"]
REPEATED = [
    "page=1&page=2",
    "page_size=1&page_size=1000",
    "filter_by=active&filter_by=rank>1",
    "sort=rank&sort=-name",
    "cursor=aaaaaaaaaaaa&cursor=bbbbbbbbbbbb",
    "&".join(["page=1"] * 100),
]
TRAVERSALS = [
    "/data/../../etc/passwd",
    "/data/..%2F..%2Fetc%2Fpasswd",
    "/data/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/data/%00",
    "/data/bitcoin%00",
    "/data/....//....//etc/passwd",
    "/data/%252e%252e%252f",
    "/data/..\\..\\windows\\win.ini",
    "/data/bitcoin/../../stats",
    "/data//bitcoin",
    "/data/.",
    "/data/~root",
    "/data/bitcoin;DROP TABLE asset",
]
PARAMS = ["page", "page_size", "filter_by", "sort", "cursor", "colour"]


def corpus() -> list[tuple[str, str, str, dict[str, str]]]:
    """(id, path, raw query string, headers) of every crafted request."""
    cases: list[tuple[str, str, str, dict[str, str]]] = []

    def add(kind: str, path: str = "/data", query: str = "", headers: dict[str, str] | None = None) -> None:
        cases.append((f"{kind}-{len(cases)}", path, query, headers or {}))

    for param in PARAMS:
        for fragment in SQL:
            add(f"sql-{param}", query=f"{param}={quote(fragment, safe='')}")
        add(f"10kB-{param}", query=f"{param}={'A' * 10_240}")
    for condition in SQL_FILTERS:
        add("sql-filter", query=f"filter_by={quote(condition, safe='')}")
    for param in ("page", "page_size"):
        for number in NUMBERS:
            add(f"number-{param}", query=f"{param}={quote(number, safe='')}")
    for condition in NUMBER_FILTERS:
        add("number-filter", query=f"filter_by={quote(condition, safe='')}")
    for text in ODD_TEXT:
        add("text-filter", query=f"filter_by={quote('name~' + text, safe='')}")
        add("text-sort", query=f"sort={quote(text, safe='')}")
        add("text-cursor", query=f"cursor={quote(text * 12, safe='')}")
        add("text-asset", path=f"/data/{text}")
    add("10kB-asset", path=f"/data/{'A' * 10_240}")
    for query in REPEATED:
        add("repeated", query=query)
    for escape in BAD_ESCAPES:
        for param in ("filter_by", "sort", "page"):
            add(f"escape-{param}", query=f"{param}={escape}")
    for path in TRAVERSALS:
        add("traversal", path=path)
    for tag in ("*", 'W/"' + "x" * 10_000 + '"', '""', ",,,,", 'W/W/W/"a"'):
        add("if-none-match", headers={"If-None-Match": tag})
    return cases


CORPUS = corpus()


def digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory, sample_store: Path) -> Iterator[Path]:
    """A copy of the sample store that must be byte-for-byte the same after every hostile request."""
    db = tmp_path_factory.mktemp("hostile") / "kasparro.db"
    shutil.copyfile(sample_store, db)
    before = digest(db)
    yield db
    assert digest(db) == before, "a request changed the store"


@pytest.fixture(scope="module")
def hostile_client(hostile_store: Path) -> Iterator[SyncConductor]:
    with SyncConductor(create_app(Config(db=hostile_store, log_level="critical"))) as conductor:
        yield conductor


def assert_safe(result: Any) -> None:
    """One of the expected statuses; every error an RFC 9457 problem with the request id; nothing leaked."""
    assert result.status_code in SAFE_STATUSES, result.text[:300]
    if result.status_code >= 400:
        assert result.headers["content-type"] == PROBLEM
        body = result.json
        assert set(body) >= {"type", "title", "status", "detail", "request_id"}
        assert body["status"] == result.status_code
        assert body["request_id"] == result.headers["x-request-id"]
    assert "Traceback" not in result.text and "sqlite3" not in result.text


def test_the_corpus_is_large() -> None:
    assert len(CORPUS) >= 200


@pytest.mark.parametrize(("path", "query", "headers"), [case[1:] for case in CORPUS], ids=[c[0] for c in CORPUS])
def test_a_hostile_request_is_answered_safely(
    hostile_client: SyncConductor, path: str, query: str, headers: dict[str, str]
) -> None:
    assert_safe(hostile_client.get(path, query_string=query, headers=headers))


# --- bogus cursors ------------------------------------------------------------------------------


def real_cursor(client: SyncConductor, query: str) -> tuple[str, str]:
    """A next_cursor the API issued for `query`, and the data_version it was issued under."""
    body = client.get("/data", query_string=query).json
    assert body["next_cursor"], body
    return body["next_cursor"], body["data_version"]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def test_random_base64_cursors_are_400(hostile_client: SyncConductor) -> None:
    chooser = random.Random(9457)
    for size in [*range(9, 40), 64, 128, 256, 383]:
        result = hostile_client.get("/data", query_string=f"cursor={b64(chooser.randbytes(size))}")
        assert_safe(result)
        assert result.status_code == 400 and "cursor" in result.json["detail"]


def test_cursors_with_a_flipped_byte_are_400(hostile_client: SyncConductor) -> None:
    cursor, _ = real_cursor(hostile_client, "sort=-price_usd&page_size=5")
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    for position in range(len(raw)):
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[position] ^= bit
            result = hostile_client.get("/data", query_string=f"sort=-price_usd&page_size=5&cursor={b64(flipped)}")
            assert_safe(result)
            assert result.status_code == 400, f"byte {position} ^ {bit:#x} was accepted"


def forge(payload: list[Any], data_version: str) -> str:
    """A cursor whose tag is right for this store, carrying whatever payload (the tag key is not secret)."""
    packed = msgspec.msgpack.encode(payload)
    version = kasparro.DataVersion(*data_version.rsplit("-", 1))
    tag = hashlib.blake2b(packed, key=kasparro.cursor_key(version), digest_size=8).digest()
    return b64(packed + tag)


def test_forged_cursors_of_the_wrong_shape_are_400(hostile_client: SyncConductor) -> None:
    query = "sort=rank&page_size=5"
    cursor, version = real_cursor(hostile_client, query)
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    query_digest = msgspec.msgpack.decode(raw[:-8])[0]
    wrong = [
        [query_digest, False, "text for a number", "bitcoin"],
        [query_digest, True, 5, "bitcoin"],
        [query_digest, False, None, "bitcoin"],
        [query_digest, False, [1, 2], "bitcoin"],
        [query_digest, False, {"a": 1}, "bitcoin"],
        [query_digest, "no", 5, "bitcoin"],
        [query_digest, False, 5, 7],
        [query_digest, False, 5],
        ["0" * 16, False, 5, "bitcoin"],
        [1, 2, 3, 4],
        {"query_digest": query_digest},
        [],
        "a string",
        None,
    ]
    for payload in wrong:
        result = hostile_client.get("/data", query_string=f"{query}&cursor={forge(payload, version)}")
        assert_safe(result)
        assert result.status_code == 400, payload


def test_forged_cursors_with_hostile_values_are_harmless(hostile_client: SyncConductor) -> None:
    query = "sort=name&page_size=5"
    cursor, version = real_cursor(hostile_client, query)
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    query_digest = msgspec.msgpack.decode(raw[:-8])[0]
    for value in ["' OR 1=1 --", "\x00", "🚀" * 20, "", "%", "Z" * 200]:
        for asset_id in ["'; DROP TABLE asset; --", "\x00", ""]:
            token = forge([query_digest, False, value, asset_id], version)
            assert_safe(hostile_client.get("/data", query_string=f"{query}&cursor={token}"))
    # Extra trailing fields are ignored by the decoder: a harmless 200.
    token = forge([query_digest, False, "m", "bitcoin", "extra"], version)
    assert_safe(hostile_client.get("/data", query_string=f"{query}&cursor={token}"))
    for number in [float("nan"), float("inf"), -float("inf"), 1e308, -0.0]:
        numeric = real_cursor(hostile_client, "sort=price_usd&page_size=5")
        raw = base64.urlsafe_b64decode(numeric[0] + "=" * (-len(numeric[0]) % 4))
        token = forge([msgspec.msgpack.decode(raw[:-8])[0], False, number, "x"], numeric[1])
        assert_safe(hostile_client.get("/data", query_string=f"sort=price_usd&page_size=5&cursor={token}"))


# --- X-Request-ID injection ----------------------------------------------------------------------

HOSTILE_REQUEST_IDS = [
    f"a\n{MARKER}",
    f"a\r\nSet-Cookie: {MARKER}=1",
    f"\x1b[31m{MARKER}\x1b[0m",
    f"{MARKER}\x00nul",
    f"{MARKER} with spaces",
    f"{MARKER}-é",
    MARKER + "x" * 10_240,
]


@pytest.mark.parametrize("offered", HOSTILE_REQUEST_IDS, ids=["lf", "crlf", "ansi", "nul", "space", "latin1", "10kB"])
def test_a_hostile_request_id_is_replaced_and_never_logged(
    capsys: pytest.CaptureFixture[str], make_client: Any, store_path: Path, offered: str
) -> None:
    client = make_client(Config(db=store_path, log_level="info"))
    for path in ("/data", "/data/no-such-asset", "/nowhere"):
        result = client.get(path, headers={"X-Request-ID": offered})
        replaced = result.headers["x-request-id"]
        assert uuid.UUID(replaced).version == 4
        assert MARKER not in result.text and MARKER not in str(result.headers)
    logged = capsys.readouterr().out
    assert replaced in logged
    assert MARKER not in logged


# --- through the real server, raw bytes the test client would normalise ----------------------------


def raw_request(base: str, target: bytes, headers: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send one request exactly as given; (status, lower-cased headers, body)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers + b"\r\n"
        )
        answer = b""
        while chunk := connection.recv(65_536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body


RAW_TARGETS = [
    b"/data?filter_by=%zz",
    b"/data?filter_by=%",
    b"/data?sort=%ff%fe",
    b"/data?filter_by=%C0%AF",
    b"/data?filter_by=" + b"A" * 10_240,
    b"/data?page=1&page=2",
    b"/data/..%2F..%2Fetc%2Fpasswd",
    b"/data/%2e%2e/%2e%2e/etc/passwd",
    b"/data/../../etc/passwd",
    b"/data/%00",
    b"/data/%ff",
    b"/data?filter_by=name~%00%1b%5b31m",
    b"/%2e%2e/%2e%2e/etc/passwd",
    b"/data?cursor=" + b"A" * 10_000,
    # Refused by uvicorn (httptools) before the app, with its own plain-text 400:
    b"/data?x=\x01\x02",
    b"/data/\x01",
    b"/\x1b[31m",
    b"/data?q=a b",
    b"/data?filter_by=" + b"A" * 100_000,
]
RAW_REQUEST_IDS = [b"\x1b[31m" + MARKER.encode(), MARKER.encode() + b"\x00", MARKER.encode() + b"x" * 10_240,
                   MARKER.encode() + b"\xff\xfe", b"a\r\n" + MARKER.encode() + b": 1"]  # fmt: skip


def test_raw_hostile_requests_through_uvicorn(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="info")
    before = digest(store_path)
    refused_by_uvicorn = []
    for target in RAW_TARGETS:
        status, headers, body = raw_request(server.base, target)
        assert status in SAFE_STATUSES, (target[:60], status, body[:200])
        if status < 400 or headers.get("content-type") == PROBLEM:
            assert json.loads(body)["request_id"] == headers["x-request-id"]
        else:  # uvicorn's own answer to a request line it cannot parse; the app never sees it
            assert (status, body) == (400, b"Invalid HTTP request received."), (target[:60], status, body[:200])
            refused_by_uvicorn.append(target[:20])
    assert len(refused_by_uvicorn) == 5, refused_by_uvicorn
    for offered in RAW_REQUEST_IDS:
        status, headers, body = raw_request(server.base, b"/data", b"X-Request-ID: " + offered + b"\r\n")
        assert status in (200, 400)
        if status == 200:  # the CRLF one arrives as X-Request-ID "a" (echoed, it is sane) plus another header
            echoed = headers["x-request-id"]
            assert echoed == "a" if offered.startswith(b"a\r\n") else uuid.UUID(echoed).version == 4
        assert MARKER.encode() not in body
    assert server.get("/health")[0] == 200
    server.process.terminate()
    server.process.wait(timeout=10)
    output = server.output.read_bytes()
    assert MARKER.encode() not in output and b"\x1b[31m" not in output
    assert b"Traceback" not in output
    assert re.search(rb'"status":404', output), "the app's own request lines are logged"
    assert digest(store_path) == before
