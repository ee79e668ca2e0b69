"""What clients other than a JSON reader need, over a real uvicorn: CSV and NDJSON, the streamed export, gzip,
CORS and field selection (issue 18)."""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import valid_queries

from conftest import exchange, http_get, run_etl, write_csv
from kasparro import ASSET_FIELDS, DETAIL_FIELDS, Config, Store, csv_lines

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NUMBERS = {"price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct"}


def typed(field: str, cell: str) -> Any:
    """A CSV cell read back as the JSON value of its field (SPEC: null is empty, a list is joined with '|')."""
    if field == "sources":
        return cell.split("|") if cell else []
    if cell == "":
        return None
    if field == "rank":
        return int(cell)
    if field in NUMBERS:
        return float(cell)
    return cell


def read_csv(body: bytes) -> list[dict[str, Any]]:
    rows = list(csv.reader(io.StringIO(body.decode())))
    header, records = rows[0], rows[1:]
    return [{name: typed(name, cell) for name, cell in zip(header, row, strict=True)} for row in records]


def read_ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines()]


def get(server: Any, path: str, params: dict[str, str] | None = None, **headers: str) -> tuple[int, dict, bytes]:
    return http_get(server.base, path + ("?" + urlencode(params) if params else ""), headers)


@pytest.fixture
def server(live_server: Any, store_path: Path) -> Any:
    return live_server(store_path, LOG_LEVEL="warning")


def test_csv_and_ndjson_hold_exactly_the_json_records(server: Any, sample_assets: list[dict[str, Any]]) -> None:
    """Over filters, sorts, page sizes and fields: the same records, in the same order, whatever the format; the
    paging of CSV and NDJSON is in headers (X-Total-Count, X-Data-Version, Link to the next page)."""

    @PROPERTY_SETTINGS
    @given(data=st.data())
    def check(data: Any) -> None:
        params, _ = data.draw(valid_queries(sample_assets))
        fields = data.draw(st.lists(st.sampled_from(ASSET_FIELDS), unique=True, max_size=len(ASSET_FIELDS)))
        if fields:
            params["fields"] = ",".join(fields)
        status, _, body = get(server, "/data", params)
        assert status == 200, body
        page = json.loads(body)
        for format, read in (("csv", read_csv), ("ndjson", read_ndjson)):
            status, headers, body = get(server, "/data", {**params, "format": format})
            assert status == 200, body
            assert read(body) == page["data"], format
            assert headers["x-total-count"] == str(page["total_items"])
            assert headers["x-data-version"] == page["data_version"]
            if page["next_cursor"] is None:
                assert "link" not in headers
            else:
                target = re.fullmatch(r'<([^>]+)>; rel="next"', headers["link"]).group(1)
                assert parse_qs(urlsplit(target).query)["cursor"] == [page["next_cursor"]]
        if not page["data"]:  # a CSV of no records still names its columns
            body = get(server, "/data", {**params, "format": "csv"})[2]
            assert body.decode().splitlines() == [",".join(fields or ASSET_FIELDS)]

    check()


CELLS = st.one_of(
    st.none(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["null", "", ",", '"', "a,b", "x\ny", "\\", "[1]", "],[", " pad "]),
)


@given(
    st.integers(1, 5).flatmap(lambda width: st.lists(st.tuples(*[CELLS] * width), min_size=1, max_size=8)),
)
def test_csv_lines_reads_back_as_the_csv_module_writes(table: list[tuple]) -> None:
    """The fast path (msgspec and byte replacements) and the csv module's give the same cells back: the same text,
    or, for a number, the same value (1e16 and 1e+16)."""
    expected = io.StringIO()
    csv.writer(expected).writerows(table)
    written = list(csv.reader(io.StringIO(csv_lines(table).decode())))
    wanted = list(csv.reader(io.StringIO(expected.getvalue())))
    assert [len(row) for row in written] == [len(row) for row in wanted]
    for got, want in zip(itertools.chain(*written), itertools.chain(*wanted), strict=True):
        assert got == want or float(got) == float(want), (got, want)


def test_accept_chooses_the_format_when_format_is_absent(server: Any) -> None:
    json_page = json.loads(get(server, "/data", {"page_size": "5"})[2])
    for accept, media in (
        ("text/csv", "text/csv; charset=utf-8"),
        ("application/x-ndjson", "application/x-ndjson"),
        ("text/csv;q=0.5, application/json", "application/json"),
        ("application/json;q=0.1, text/*", "text/csv; charset=utf-8"),
        ("*/*", "application/json"),
        ("text/html", "application/json"),
    ):
        for _ in range(3):  # answered, kept, then answered from the kept ones: the same each time
            status, headers, body = get(server, "/data", {"page_size": "5"}, Accept=accept)
            assert status == 200 and headers["content-type"] == media, (accept, headers)
            assert "Accept" in headers["vary"]
            if media.startswith("text/csv"):
                assert read_csv(body) == json_page["data"]
    status, headers, _ = get(server, "/data", {"page_size": "5", "format": "ndjson"}, Accept="text/csv")
    assert headers["content-type"] == "application/x-ndjson"  # format wins
    status, headers, body = get(server, "/data/bitcoin/history", {"interval": "raw"}, Accept="text/csv")
    history = json.loads(get(server, "/data/bitcoin/history", {"interval": "raw"})[2])
    assert headers["content-type"].startswith("text/csv")
    assert read_csv(body) == history["points"]
    ndjson = get(server, "/data/bitcoin/history", {"interval": "1d", "format": "ndjson"})[2]
    assert read_ndjson(ndjson) == json.loads(get(server, "/data/bitcoin/history", {"interval": "1d"})[2])["points"]


def walk(server: Any, params: dict[str, str]) -> tuple[list[dict[str, Any]], str]:
    """Every record of the query, page after page by cursor, and the data version."""
    records, cursor = [], None
    while True:
        query = {**params, "page_size": "100", **({"cursor": cursor} if cursor else {})}
        page = json.loads(get(server, "/data", query)[2])
        records += page["data"]
        cursor = page["next_cursor"]
        if cursor is None:
            return records, page["data_version"]


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"filter_by": "active", "sort": "-price_usd"},
        {"filter_by": "name~coin", "sort": "name", "fields": "name,asset_id,sources"},
        {"sort": "-change_24h_pct", "fields": "change_24h_pct"},
        {"filter_by": "symbol:no-such-symbol"},
    ],
)
def test_export_equals_a_walk_of_every_page(server: Any, params: dict[str, str]) -> None:
    records, version = walk(server, params)
    for format, read in (("csv", read_csv), ("ndjson", read_ndjson)):
        status, headers, body = get(server, "/data/export", {**params, "format": format})
        assert status == 200
        assert headers["content-disposition"] == f'attachment; filename="assets.{format}"'
        assert headers["x-data-version"] == version
        assert (read(body) if body or format == "csv" else []) == records
    status, headers, body = get(server, "/data/export", params)  # CSV unless asked otherwise
    assert headers["content-type"] == "text/csv; charset=utf-8" and read_csv(body) == records
    status, headers, body = get(server, "/data/export", params, Accept="application/x-ndjson")
    assert headers["content-type"] == "application/x-ndjson"


def test_export_in_many_chunks_equals_a_walk_and_is_one_data_version(live_server: Any, big_clean: Path) -> None:
    """20,000+ rows: several chunks of the one snapshot, in order, none twice; gzip-compressed as it streams."""
    server = live_server(big_clean, LOG_LEVEL="warning")
    params = {"filter_by": "rank<=21000", "sort": "-market_cap_usd", "fields": "asset_id,market_cap_usd"}
    records, version = walk(server, params)
    assert len(records) > 20_000
    status, headers, body = get(server, "/data/export", params, **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and headers["x-data-version"] == version
    assert read_csv(gzip.decompress(body)) == records


def test_an_export_is_one_data_version_while_the_etl_commits(live_server: Any, big_clean: Path, tmp_path: Path) -> None:
    """An export paused by its client (after its first rows) while an ETL run commits new assets goes on, when the
    client reads again, from the snapshot it began with: every asset of that version, none of the new ones."""
    db = tmp_path / "store.db"
    shutil.copyfile(big_clean, db)
    server = live_server(db, LOG_LEVEL="warning")
    before = json.loads(get(server, "/data", {"page_size": "1"})[2])
    address = urlsplit(server.base)
    with socket.create_connection((address.hostname, address.port), timeout=30) as conn:
        conn.sendall(b"GET /data/export HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = bytearray(conn.recv(65536))  # ~24 MB in all: far more than the socket buffers hold
        feed = write_csv(tmp_path / "late.csv", 12, seed=99)  # csv:late, 12 coins the store has not seen
        result = run_etl(db, f"csv:{feed}", KASPARRO_WAL_CHECKPOINT="passive")
        assert result.returncode == 0, result.stderr
        after = json.loads(get(server, "/data", {"page_size": "1"})[2])
        assert after["data_version"] != before["data_version"]
        assert after["total_items"] == before["total_items"] + 12
        while chunk := conn.recv(1 << 20):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert f"x-data-version: {before['data_version']}".encode() in head.lower()
    exported = read_csv(dechunk(body))
    assert len(exported) == before["total_items"]
    late = {row["asset_id"] for row in read_csv(get(server, "/data/export", {"filter_by": "source:csv:late"})[2])}
    assert len(late) == 12 and late.isdisjoint(record["asset_id"] for record in exported)


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    content, at = bytearray(), 0
    while True:
        size_end = body.index(b"\r\n", at)
        size = int(body[at:size_end].split(b";")[0], 16)
        if size == 0:
            return bytes(content)
        content += body[size_end + 2 : size_end + 2 + size]
        at = size_end + 2 + size + 2


def test_an_export_left_by_its_client_lets_go_of_its_snapshot(live_server: Any, big_clean: Path) -> None:
    """Clients that leave mid-export (three, more than the snapshots open at once) free theirs: a later export
    is served at once, not refused as busy."""
    server = live_server(big_clean, LOG_LEVEL="info")
    address = urlsplit(server.base)
    for _ in range(3):
        with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
            conn.sendall(b"GET /data/export HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 20
    while True:  # each export stops at its next chunk after the disconnect, and says so
        gone = server.output.read_text().count("the client disconnected during an export")
        if gone == 3:
            break
        assert time.monotonic() < deadline, server.output.read_text()[-3000:]
        time.sleep(0.05)  # poll interval of the log
    status, _, body = get(server, "/data/export", {"filter_by": "rank<=3"})
    assert status == 200 and len(read_csv(body)) == 3


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_refused_export_is_a_problem_and_no_attachment(
    make_client: Any, store_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Every export slot taken (none here): GET and HEAD alike wait READER_WAIT, then a 503 problem with Retry-After,
    and without the file's headers, which would have curl -OJ or a browser save the problem as assets.csv."""
    monkeypatch.setattr(Store, "SNAPSHOTS", 0)
    monkeypatch.setattr(Store, "READER_WAIT", 0.05)
    client = make_client(Config(db=store_path, log_level="warning"))
    refused = client.request(method, "/data/export", params={"format": "ndjson"})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert not {"content-disposition", "content-encoding", "x-data-version"} & {h.lower() for h in refused.headers}
    monkeypatch.setattr(Store, "SNAPSHOTS", 2)
    served = make_client(Config(db=store_path, log_level="warning")).request(method, "/data/export")
    assert served.status_code == 200 and served.headers["content-disposition"] == 'attachment; filename="assets.csv"'


@pytest.mark.parametrize("origins", ["a.example", "https://a.example/", "https://a.example, dash", "https://x/y"])
def test_an_origin_a_browser_cannot_send_is_refused_at_start(origins: str) -> None:
    """An origin without its scheme, or with a path, would match no browser's Origin header: every call refused."""
    with pytest.raises(SystemExit, match=r"KASPARRO_CORS_ORIGINS: .* is not an origin"):
        Config.from_env({"KASPARRO_CORS_ORIGINS": origins})


@pytest.mark.parametrize(
    ("origin", "sent"),
    [
        ("https://A.Example", "https://a.example"),
        ("https://a.example:443", "https://a.example"),
        ("http://localhost:80", "http://localhost"),
        ("https://user@a.example", "https://a.example"),
        ("https://ä.example", "https://xn--4ca.example"),
        ("http://[::1]:08080", "http://[::1]:8080"),
        ("HTTPS://a.example", "https://a.example"),  # was 'not an origin': a browser lower-cases the scheme too
        ("Http://A.example:80", "http://a.example"),
    ],
)
def test_an_origin_written_otherwise_than_a_browser_sends_it_is_refused_naming_that(origin: str, sent: str) -> None:
    """Taken as written, these matched no browser's Origin (lower-case host, no default port, no user, an IDN in
    punycode): every call from that page was refused, with nothing said."""
    with pytest.raises(SystemExit) as stopped:
        Config.from_env({"KASPARRO_CORS_ORIGINS": f"https://ok.example,{origin}"})
    assert str(stopped.value) == (
        f"kasparro: KASPARRO_CORS_ORIGINS: {origin!r} is not how a browser sends that origin: write {sent!r}"
    )


@pytest.mark.parametrize(
    "origins", ["https://a.example:99999", "https://a.example:x", "https://[::1", "http://:80", "https://a.example:0"]
)
def test_an_origin_with_no_host_or_a_bad_port_is_refused(origins: str) -> None:
    """Port 0 is no port a page can be served from (a browser refuses to fetch it)."""
    with pytest.raises(SystemExit, match=r"KASPARRO_CORS_ORIGINS: .* is not an origin"):
        Config.from_env({"KASPARRO_CORS_ORIGINS": origins})


@pytest.mark.parametrize(
    "origins",
    [
        "*",
        "",
        " ",
        "https://a.example, http://localhost:3000",
        "app://desk",
        "http://[::1]:8080",
        "https://xn--4ca.example",
    ],
)
def test_origins_a_browser_sends_are_taken(origins: str) -> None:
    assert set(Config.from_env({"KASPARRO_CORS_ORIGINS": origins}).cors_origins) == {
        o.strip() for o in origins.split(",") if o.strip()
    }


LONG_ID = {"X-Request-ID": "r" * 128}  # the longest the API echoes: a stamped body grows by it, its kept size does not


def kept_size(body: bytes) -> int:
    """A body's size as the API keeps it: a stamped one with a blank request_id and api_latency_ms of 0.0."""
    stamp = re.match(rb'\{"request_id":("(?:[^"\\]|\\.)*"),"api_latency_ms":([-+.\deE]+)', body)
    return len(body) if stamp is None else len(body) - len(stamp[1]) + len(b'""') - len(stamp[2]) + len(b"0.0")


def without_latency(body: bytes) -> dict[str, Any]:
    return {k: v for k, v in json.loads(body).items() if k != "api_latency_ms"}


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/data", {"page_size": "100"}),
        ("/data", {"page_size": "100", "format": "csv"}),
        ("/data", {"page_size": "50", "fields": "asset_id,sources", "format": "ndjson"}),
        ("/data/bitcoin", None),
        ("/data/bitcoin/history", {"interval": "raw"}),
        ("/stats", None),
        ("/openapi.json", None),
        ("/docs/swagger-ui.css", None),
    ],
)
def test_gzip_bodies_decompress_to_the_plain_ones(server: Any, path: str, params: dict[str, str] | None) -> None:
    rid = {"X-Request-ID": "same-id"}
    for _ in range(3):  # made, made and kept, then from the front door's kept answers
        status, plain_headers, plain = get(server, path, params, **rid)
        status, headers, packed = get(server, path, params, **rid, **{"Accept-Encoding": "gzip, br"})
        assert status == 200 and "content-encoding" not in plain_headers
        compressible = kept_size(plain) >= 1024  # the API's rule, for the coding and the Vary alike
        varies = ["Accept-Encoding" in h.get("vary", "") for h in (headers, plain_headers)]
        assert varies == [compressible] * 2, (len(plain), headers, plain_headers)
        if not compressible:
            assert "content-encoding" not in headers
        else:
            assert headers["content-encoding"] == "gzip" and int(headers["content-length"]) == len(packed)
            assert len(packed) < len(plain)
            packed = gzip.decompress(packed)
        if plain_headers["content-type"] == "application/json" and b'"api_latency_ms"' in plain[:60]:
            assert without_latency(packed) == without_latency(plain)
        else:
            assert packed == plain
        assert headers.get("etag") == plain_headers.get("etag")  # weak: the same meaning either way


# Every kind of answer: kept (made, kept, then from the front door), through Falcon (a query string, a HEAD), small
# and large, problems of the resource, of Falcon and of the front door, 406, constants, docs files and streams.
VARY_TARGETS = [
    ("GET", "/health"), ("GET", "/data/bitcoin"), ("GET", "/data/bitcoin?fields=asset_id"),
    ("GET", "/data?page_size=1"), ("GET", "/data?page_size=1&format=csv"), ("GET", "/data?page_size=20"),
    ("HEAD", "/data?page_size=20"), ("GET", "/data?page_size=20&format=ndjson"), ("GET", "/data/bitcoin/history"),
    ("GET", "/stats"), ("GET", "/"), ("GET", "/openapi.json"), ("GET", "/docs/swagger-ui.css"),
    ("GET", "/data/nowhere"), ("GET", "/data?page=x"), ("GET", "/nowhere"), ("GET", "/data//x"), ("POST", "/data"),
    ("GET", "/data/export?filter_by=rank<=2"), ("GET", "/data?page_size=13&fields=asset_id,symbol,name"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "target"), VARY_TARGETS, ids=[f"{m} {t}" for m, t in VARY_TARGETS])
def test_vary_names_accept_encoding_where_the_body_may_be_compressed(server: Any, method: str, target: str) -> None:
    """A body below 1 kB as kept (a stamped one without the request_id and latency each request adds) is sent as it
    is whatever Accept-Encoding says, so Vary does not name it (a shared cache would keep a copy per value clients
    send); a larger or streamed one's Vary does, plain or gzip, and its 304's Vary is its 200's, whatever the
    request id's length. Accept stays in Vary where Accept chose the format."""
    formats = urlsplit(target).path in ("/data", "/data/bitcoin/history", "/data/export")  # Accept chooses one
    for _ in range(3):  # made, made and kept, then from the front door's kept answers
        status, plain, body = exchange(server.base, "GET" if method == "HEAD" else method, target, LONG_ID)
        _, packed, _ = exchange(server.base, method, target, {"Accept-Encoding": "gzip", **LONG_ID})
        _, sent, _ = exchange(server.base, method, target)
        may_compress = plain.get("transfer-encoding") == "chunked" or kept_size(body) >= 1024
        for headers in (plain, packed, sent):
            vary = {token.strip() for token in headers.get("vary", "").split(",")} - {""}
            assert ("Accept-Encoding" in vary) == may_compress, (len(body), headers)
            assert ("Accept" in vary) == (formats and status < 400), (status, headers)
        if not may_compress:
            assert "content-encoding" not in packed, packed
        if "etag" in plain:
            unchanged, headers, _ = exchange(server.base, "GET", target, {"If-None-Match": plain["etag"]})
            assert unchanged == 304 and headers.get("vary") == plain.get("vary"), (headers, plain)


@pytest.mark.parametrize("target", ["/data?page_size=1", "/data/export", "/data/bitcoin/history"])
def test_a_406_varies_by_accept_alone(server: Any, target: str) -> None:
    """Accept chose it; its problem body is below 1 kB, the same whatever Accept-Encoding says."""
    for method in ("GET", "HEAD"):
        status, headers, _ = exchange(server.base, method, target, {"Accept": "*/*;q=0", "Accept-Encoding": "gzip"})
        assert status == 406 and headers["vary"] == "Accept" and "content-encoding" not in headers, (method, headers)


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("GZIP;q=0.3", True),
        ("deflate, x-gzip", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0, *", False),
        ("identity", False),
        ("br, *;q=0", False),
        ("", False),
    ],
)
def test_gzip_only_where_accept_encoding_allows_it(server: Any, accept_encoding: str, gzipped: bool) -> None:
    for path in ("/data?page_size=100", "/openapi.json", "/data?page_size=100"):
        status, headers, _ = http_get(server.base, path, {"Accept-Encoding": accept_encoding})
        assert status == 200 and (headers.get("content-encoding") == "gzip") == gzipped, (path, headers)


def compressed_so_far(server: Any) -> float:
    metrics = get(server, "/metrics")[2].decode()
    return float(re.search(r"^kasparro_answers_compressed_total (\S+)$", metrics, re.MULTILINE).group(1))


def test_a_kept_answer_is_compressed_once_however_many_ask(server: Any) -> None:
    for _ in range(2):  # made twice: kept the second time
        assert get(server, "/data", {"page_size": "100", "sort": "name"})[0] == 200
    before = compressed_so_far(server)
    bodies = {get(server, "/data", {"page_size": "100", "sort": "name"}, **{"Accept-Encoding": "gzip"})[2]
              for _ in range(20)}  # fmt: skip
    assert compressed_so_far(server) == before + 1
    assert len(bodies) == 20  # each its own request_id and latency, spliced into the one compressed tail
    assert len({without_latency(gzip.decompress(body))["data_version"] for body in bodies}) == 1


def cors_server(live_server: Any, store_path: Path, origins: str) -> Any:
    return live_server(store_path, LOG_LEVEL="warning", KASPARRO_CORS_ORIGINS=origins, KASPARRO_API_KEYS="k1")


PREFLIGHT = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
KEY = {"Authorization": "Bearer k1"}


def test_cors_from_an_allowed_and_a_refused_origin(live_server: Any, store_path: Path) -> None:
    server = cors_server(live_server, store_path, "https://dash.example, https://other.example")
    allowed, refused = {"Origin": "https://dash.example"}, {"Origin": "https://evil.example"}
    status, headers, body = exchange(server.base, "OPTIONS", "/data?page_size=3", {**allowed, **PREFLIGHT})
    assert status == 204 and body == b""  # no API key asked of a preflight
    assert headers["access-control-allow-origin"] == "https://dash.example"
    assert {m.strip() for m in headers["access-control-allow-methods"].split(",")} == {"GET", "HEAD"}
    assert "authorization" in headers["access-control-allow-headers"].lower()
    assert "Origin" in headers["vary"]
    status, headers, body = exchange(server.base, "OPTIONS", "/data", {**refused, **PREFLIGHT})
    assert status == 403 and "access-control-allow-origin" not in headers
    assert "https://evil.example" in json.loads(body)["detail"]
    status, headers, _ = exchange(server.base, "OPTIONS", "/data", {**allowed, "Access-Control-Request-Method": "PUT"})
    assert status == 403
    for path in ("/data?page_size=3", "/data/bitcoin", "/health", "/data/export?filter_by=rank%3C%3D2", "/nowhere"):
        for _ in range(3):  # Falcon's path, then the front door's kept answers
            status, headers, _ = http_get(server.base, path, {**allowed, **KEY})
            assert headers["access-control-allow-origin"] == "https://dash.example", (path, status)
            # Every header, for a request without credentials (test_browser_cors reads them in a browser).
            assert headers["access-control-expose-headers"] == "*", (path, status)
            assert "access-control-allow-credentials" not in headers, (path, status)
            assert "Origin" in headers["vary"]
            status, headers, _ = http_get(server.base, path, {**refused, **KEY})
            assert "access-control-allow-origin" not in headers and "Origin" in headers["vary"]
            status, headers, _ = http_get(server.base, path, KEY)
            assert "access-control-allow-origin" not in headers and "Origin" in headers["vary"]
    status, headers, _ = http_get(server.base, "/data", allowed)  # the key is still needed for the request
    assert status == 401 and headers["access-control-allow-origin"] == "https://dash.example"


@pytest.mark.parametrize(("origins", "allow"), [("*", "*"), ("", None)])
def test_cors_any_origin_and_none(live_server: Any, store_path: Path, origins: str, allow: str | None) -> None:
    server = cors_server(live_server, store_path, origins)
    status, headers, _ = exchange(server.base, "OPTIONS", "/data", {"Origin": "https://a.example", **PREFLIGHT})
    assert status == (204 if allow else 403) and headers.get("access-control-allow-origin") == allow
    for _ in range(3):
        status, headers, _ = http_get(server.base, "/health", {"Origin": "https://a.example"})
        assert headers.get("access-control-allow-origin") == allow and "Origin" not in headers.get("vary", "")


def test_fields_keep_only_the_fields_named_in_that_order(server: Any) -> None:
    full = json.loads(get(server, "/data", {"page_size": "20", "sort": "-volume_24h_usd"})[2])["data"]
    detail = json.loads(get(server, "/data/bitcoin")[2])
    for field in ASSET_FIELDS:
        params = {"page_size": "20", "sort": "-volume_24h_usd", "fields": field}
        page = json.loads(get(server, "/data", params)[2])
        assert page["data"] == [{field: record[field]} for record in full]
        selection = {"sort": "-volume_24h_usd", "fields": field, "format": "ndjson"}
        exported = read_ndjson(get(server, "/data/export", selection)[2])
        assert exported[:20] == page["data"]
    for field in DETAIL_FIELDS:
        assert json.loads(get(server, "/data/bitcoin", {"fields": field})[2]) == {field: detail[field]}
    two = json.loads(get(server, "/data/bitcoin", {"fields": "quotes,asset_id"})[2])
    assert list(two) == ["quotes", "asset_id"] and two == {"quotes": detail["quotes"], "asset_id": "bitcoin"}
    first, second = (get(server, "/data", {"fields": f})[1]["etag"] for f in ("asset_id", "symbol"))
    assert first != second  # a selection is its own representation


@pytest.mark.parametrize("path", ["/data", "/data/export", "/data/bitcoin"])
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ("asset_id,colour", "'colour'"),
        ("price", "'price'"),
        ("symbol,,name", "empty"),
        ("symbol,symbol", "twice"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(server: Any, path: str, fields: str, named: str) -> None:
    status, headers, body = get(server, path, {"fields": fields})
    assert status == 400 and headers["content-type"] == "application/problem+json"
    assert "fields" in json.loads(body)["detail"] and named in json.loads(body)["detail"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/data", {"format": "xml"}),
        ("/data/export", {"format": "json"}),
        ("/data/bitcoin/history", {"format": "tsv"}),
        ("/data/export", {"page_size": "5"}),
        ("/data/bitcoin", {"format": "csv"}),
    ],
)
def test_an_unknown_format_or_parameter_is_a_400(server: Any, path: str, params: dict[str, str]) -> None:
    status, _, body = get(server, path, params)
    assert status == 400 and next(iter(params)) in json.loads(body)["detail"]
