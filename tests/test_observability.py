"""GET /metrics (one process and several uvicorn workers), GET /docs offline, and uvicorn's logs in our pipeline."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import kasparro
from conftest import http_get, referenced_urls
from kasparro import Config, HttpMetrics, LogLines, LogLinesHandler

REQUESTS = "kasparro_http_requests_total"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def count(scraped: dict[tuple[str, frozenset], float], route: str, status: str = "200") -> float:
    return scraped.get((REQUESTS, frozenset({("route", route), ("status", status)})), 0.0)


def label_values(scraped: dict[tuple[str, frozenset], float], name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in scraped if sample == name and label in dict(labels)}


# --- GET /metrics in one process -----------------------------------------


def test_requests_are_counted_by_route_template_and_status(client: Any) -> None:
    for path in ("/data/bitcoin", "/data/ethereum", "/data/no-such-coin", "/health", "/health"):
        client.get(path)
    client.get("/data", params={"page_size": "0"})
    result = client.get("/metrics")
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/plain; version=")
    scraped = samples(result.text)
    assert count(scraped, "/data/{asset_id}") == 2
    assert count(scraped, "/data/{asset_id}", "404") == 1
    assert count(scraped, "/health") == 2
    assert count(scraped, "/data", "400") == 1
    latency = frozenset({("route", "/health"), ("status", "200"), ("le", "+Inf")})
    assert scraped[("kasparro_http_request_duration_seconds_bucket", latency)] == 2
    assert scraped[("kasparro_http_requests_in_flight", frozenset())] == 1  # the scrape itself


def test_unknown_urls_share_one_label(client: Any) -> None:
    for _ in range(5):
        client.get(f"/{uuid.uuid4()}/{uuid.uuid4()}?x=<script>")
    client.request("PATCH", f"/{uuid.uuid4()}")
    scraped = samples(client.get("/metrics").text)
    routes = label_values(scraped, REQUESTS, "route")
    assert routes == {"unmatched"}
    assert count(scraped, "unmatched", "404") == 6
    assert all(not re.search(r"[0-9a-f]{8}-", key) for key in routes)


def test_store_gauges_are_read_at_scrape_time(client: Any) -> None:
    scraped = samples(client.get("/metrics").text)
    assert scraped[("kasparro_store_up", frozenset())] == 1
    by_status = {
        status: scraped[("kasparro_assets", frozenset({("status", status)}))] for status in ("active", "inactive")
    }
    assert sum(by_status.values()) == 255 and by_status["active"] > 0
    source = frozenset({("source", "csv:sample")})
    assert 0 <= scraped[("kasparro_etl_last_success_age_seconds", source)] < 3600
    assert 0 <= scraped[("kasparro_etl_run_last_success_age_seconds", frozenset())] < 3600
    assert 0 <= scraped[("kasparro_data_version_age_seconds", frozenset())] < 3600
    rows = {outcome: scraped[("kasparro_etl_last_run_rows", source | {("outcome", outcome)})]
            for outcome in ("read", "loaded", "rejected")}  # fmt: skip
    assert rows == {"read": 255, "loaded": 255, "rejected": 0}


def test_metrics_answer_without_a_store(make_client: Any, tmp_path: Path) -> None:
    client = make_client(Config(db=tmp_path / "absent.db", log_level="warning"))
    client.get("/data")
    result = client.get("/metrics")
    assert result.status_code == 200
    scraped = samples(result.text)
    assert scraped[("kasparro_store_up", frozenset())] == 0
    assert count(scraped, "/data", "503") == 1


# --- GET /metrics with two uvicorn workers -------------------------------


def test_two_workers_count_every_request_exactly_once(live_server: Any, store_path: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = live_server(store_path, "--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), LOG_LEVEL="info")
    # The server answers once one worker is up; each worker writes its in-flight gauge when it starts.
    deadline = time.monotonic() + 30
    while len(list(metrics_dir.glob("gauge_livesum_*.db"))) < 2:
        assert time.monotonic() < deadline, "the second worker never started"
        server.get("/health")  # a round trip to a worker that is up, while the other starts
    before = count(samples(server.get("/metrics")[2].decode()), "/data/{asset_id}")
    ids = ("bitcoin", "ethereum", "tether")
    n, batch = 0, 60
    deadline = time.monotonic() + 10 * HttpMetrics.FLUSH_EVERY + 60
    while True:
        # A new connection each, 8 at once: the kernel hands each to whichever worker accepts first, so a
        # worker busy with one leaves the next to the other; batches go on until both have answered some.
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda i: server.get(f"/data/{ids[i % 3]}")[0], range(batch)))
        assert statuses == [200] * batch
        n += batch
        # Each worker adds its counts to the shared files at most FLUSH_EVERY seconds later (at once when it
        # answers the scrape itself): scrape until both have.
        while count(samples(server.get("/metrics")[2].decode()), "/data/{asset_id}") - before < n:
            assert time.monotonic() < deadline, "the workers' counts never reached the shared files"
        pids = {re.sub(r"\D", "", path.name) for path in metrics_dir.glob("counter_*.db")}
        if len(pids) == 2:
            break
        assert time.monotonic() < deadline, f"one worker answered all {n} requests: {sorted(pids)}"
    server.get(f"/{uuid.uuid4()}")
    while count(samples(server.get("/metrics")[2].decode()), "unmatched", "404") < 1:
        assert time.monotonic() < deadline, "the 404 never reached the shared files"
    scrapes = [samples(server.get("/metrics")[2].decode()) for _ in range(6)]  # every later scrape agrees
    for scraped in scrapes:
        assert count(scraped, "/data/{asset_id}") - before == n
        assert count(scraped, "unmatched", "404") == 1
        assert "unmatched" in label_values(scraped, REQUESTS, "route")
        assert not any(route.startswith("/") and "-" in route for route in label_values(scraped, REQUESTS, "route"))

    lines = server.output.read_text().splitlines()
    # The supervisor never imports the app, so its few lines keep uvicorn's format; the workers' are JSON.
    supervisor = [line for line in lines if not line.startswith("{")]
    assert all(re.match(r"INFO: +(Uvicorn running|Started parent process)", line) for line in supervisor), supervisor
    records = [json.loads(line) for line in lines if line.startswith("{")]
    uvicorn_events = [r["event"] for r in records if r.get("logger", "").startswith("uvicorn")]
    assert any("Started server process" in event for event in uvicorn_events), uvicorn_events
    assert not [r for r in records if r.get("logger") == "uvicorn.access"]
    requests = [r for r in records if r["event"] == "request" and r["route"] == "/data/{asset_id}"]
    assert len(requests) == n  # one line per request, from the app only
    assert all({"request_id", "timestamp", "level", "status", "duration_ms"} <= set(r) for r in requests)


def test_log_level_quiets_uvicorn_too(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    server.get("/health")
    server.process.terminate()
    server.process.wait(timeout=10)
    records = [json.loads(line) for line in server.output.read_text().splitlines()]
    assert all(r["level"] in ("warning", "error", "critical") for r in records), records


def test_every_request_has_its_line_at_a_clean_shutdown(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="info")
    paths = ["/health", "/data?page_size=3", "/data/bitcoin", "/stats", "/nope", "/data?page_size=0"] * 20
    with ThreadPoolExecutor(8) as pool:  # concurrent: several requests end in one turn of the loop
        answers = list(pool.map(lambda path: http_get(server.base, path), paths))
    server.process.send_signal(signal.SIGTERM)  # then at once: lines still held must reach stdout
    assert server.process.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once stopped
    assert "Finished server process" in server.output.read_text()
    records = [json.loads(line) for line in server.output.read_text().splitlines() if line.startswith("{")]
    requests = {r["request_id"]: r for r in records if r["event"] == "request"}
    assert len(requests) == len([r for r in records if r["event"] == "request"]) == len(paths) + 1  # + readiness
    for path, (status, headers, _) in zip(paths, answers, strict=True):
        line = requests[headers["x-request-id"]]
        assert line["status"] == status and line["method"] == "GET" and line["level"] == "info"
        assert line["route"] == {"/nope": "(no route)"}.get(path, path.split("?")[0].replace("bitcoin", "{asset_id}"))
        assert line["duration_ms"] >= 0 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])


def test_a_rate_limited_request_is_counted_and_logged_under_its_route(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="info", KASPARRO_RATE_LIMIT="1")
    paths = {"/data": "/data", "/data/bitcoin": "/data/{asset_id}", "/runs/1": "/runs/{run_id}"}
    limited: dict[str, str] = {}  # request id -> the route template of its path
    for path, template in paths.items():
        for _ in range(20):  # a burst of 2 at 1 a second: a 429 comes within a few requests
            status, headers, _ = http_get(server.base, path)
            if status == 429:
                limited[headers["x-request-id"]] = template
                break
        assert limited and template in limited.values(), path
    scraped = samples(server.get("/metrics")[2].decode())
    for template in paths.values():
        assert count(scraped, template, "429") == 1, template
    assert count(scraped, "unmatched", "429") == 0
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=10)
    lines = [json.loads(line) for line in server.output.read_text().splitlines() if line.startswith("{")]
    routes = {line["request_id"]: line["route"] for line in lines if line["event"] == "request"}
    assert {request_id: routes[request_id] for request_id in limited} == limited


def test_lines_are_held_for_one_turn_of_the_loop_at_most() -> None:
    stream = io.BytesIO()
    lines = LogLines(stream)

    async def serve() -> list[bytes]:
        lines.msg(b'{"event": "a"}')
        lines.msg('{"event": "b"}')
        held = stream.getvalue()
        await asyncio.sleep(0)  # the end of this turn
        return [held, stream.getvalue()]

    held, written = asyncio.run(serve())
    assert held == b"" and written == b'{"event": "a"}\n{"event": "b"}\n'
    lines.msg(b"{}")  # outside a loop: at once
    assert stream.getvalue().endswith(b'"b"}\n{}\n')


def test_a_full_hold_is_written_before_the_turn_ends() -> None:
    stream = io.BytesIO()
    lines = LogLines(stream)

    async def serve() -> int:
        for n in range(LogLines.MAX_HELD):
            lines.msg(b"%d" % n)
        return stream.getvalue().count(b"\n")

    assert asyncio.run(serve()) == LogLines.MAX_HELD


def test_stdlib_records_join_the_same_lines_in_order() -> None:
    stream = io.BytesIO()
    lines = LogLines(stream)
    handler = LogLinesHandler(lines)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("kasparro.test.ordering")
    logger.addHandler(handler)
    logger.propagate = False
    try:

        async def serve() -> None:
            lines.msg(b"first")
            logger.warning("second")
            lines.msg(b"third")

        asyncio.run(serve())
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == b"first\nkasparro.test.ordering second\nthird\n"


def test_every_level_and_path_of_a_log_line_has_its_fields(monkeypatch: Any) -> None:
    """The request line takes the fast info path; every other level and %-style arguments take structlog's own:
    all of them carry level, request_id, a microsecond UTC timestamp, and a traceback when there is one."""
    stream = io.BytesIO()
    monkeypatch.setattr(kasparro.sys, "stdout", io.TextIOWrapper(stream))
    kasparro.configure_logging("debug")
    try:
        kasparro.REQUEST_ID.set("req-1")
        log = kasparro.log.bind()
        log.info("request", status=200)
        log.info("formatted %s", "here")
        log.debug("quiet")
        log.warn("warned")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        kasparro.REQUEST_ID.set(None)
        log.error("outside a request")
        kasparro.log_lines.flush()
    finally:
        kasparro.configure_logging("info")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["level"]) for e in events] == [
        ("request", "info"),
        ("formatted here", "info"),
        ("quiet", "debug"),
        ("warned", "warning"),
        ("failed", "error"),
        ("outside a request", "error"),
    ]
    assert [e.get("request_id") for e in events] == ["req-1"] * 5 + [None]
    assert events[0]["status"] == 200
    assert "ValueError: boom" in events[4]["exception"] and "Traceback" in events[4]["exception"]
    for event in events:
        stamped = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", event["timestamp"])
        assert abs((datetime.now(UTC) - stamped).total_seconds()) < 60


def test_lines_from_threads_and_the_loop_are_all_written_in_each_ones_order() -> None:
    """Reader threads hold and write lines while the loop holds its own: none is lost or written twice, and each
    writer's lines keep their order (holding a line takes no lock, only writing does)."""
    stream = io.BytesIO()
    lines = LogLines(stream)
    writers, each = 4, 3_000

    def write(writer: int) -> None:
        for n in range(each):
            (lines.warning if n % 500 == 0 else lines.info)(f"{writer} {n}".encode())  # some write at once

    async def loop_writes() -> None:
        with ThreadPoolExecutor(writers) as pool:
            done = [asyncio.get_running_loop().run_in_executor(pool, write, w) for w in range(writers)]
            for n in range(each):
                lines.info(f"loop {n}".encode())
                if n % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.gather(*done)
        lines.flush()

    asyncio.run(loop_writes())
    written = stream.getvalue().decode().splitlines()
    assert len(written) == (writers + 1) * each
    for writer in [*map(str, range(writers)), "loop"]:
        assert [int(line.split()[1]) for line in written if line.split()[0] == writer] == list(range(each))


@pytest.mark.parametrize(
    "moments",
    [
        [1_700_000_000_999_999_999, 1_700_000_001_000_000_000, 1_700_000_001_000_000_999],  # a second's edge
        [1_700_000_001_500_000_000, 1_700_000_000_000_001_000, 1_700_000_001_000_999_000],  # the clock set back
        [0, 59_000_000, 86_399_999_999_000, 253_402_300_799_123_456_000],  # the epoch to 9999-12-31
    ],
)
def test_timestamps_follow_the_clock_to_the_microsecond(monkeypatch: Any, moments: list[int]) -> None:
    """The stamp keeps each second's text and formats the digits below it from tables: it must agree with the
    clock at every moment, whichever way the clock moves."""
    clock = iter(moments)
    monkeypatch.setattr(kasparro.time, "time_ns", lambda: next(clock))
    stamp = kasparro.stamper()
    for moment in moments:
        expected = datetime.fromtimestamp(moment // 10**9, UTC).replace(microsecond=moment // 1000 % 1_000_000)
        assert stamp(None, "info", {})["timestamp"] == expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_bound_context_and_a_missing_event_take_structlogs_own_path(monkeypatch: Any) -> None:
    stream = io.BytesIO()
    monkeypatch.setattr(kasparro.sys, "stdout", io.TextIOWrapper(stream))
    kasparro.configure_logging("info")
    try:
        kasparro.log.bind(run_id=7).info("loaded", rows=3)
        kasparro.log.bind().info(rows=4)
        kasparro.log_lines.flush()
    finally:
        kasparro.configure_logging("info")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["run_id"], first["event"], first["rows"], first["level"]) == (7, "loaded", 3, "info")
    assert "event" not in second and second["rows"] == 4 and second["level"] == "info"


def test_lines_above_the_threshold_are_not_even_built(monkeypatch: Any) -> None:
    stream = io.BytesIO()
    monkeypatch.setattr(kasparro.sys, "stdout", io.TextIOWrapper(stream))
    kasparro.configure_logging("warning")
    try:
        log = kasparro.log.bind()
        log.info("request", status=200)
        log.warning("kept")
        kasparro.log_lines.flush()
    finally:
        kasparro.configure_logging("info")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["kept"]


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
def test_uvicorn_builds_no_access_line(level: str) -> None:
    """uvicorn formats its access line's arguments whenever its access logger has a handler on its way up (it
    asks hasHandlers() once per connection): the app's own request line replaces it, at every level."""
    kasparro.configure_logging(level)
    try:
        assert not logging.getLogger("uvicorn.access").hasHandlers()
        assert logging.getLogger("uvicorn.error").hasHandlers()  # uvicorn's other lines still come out as JSON
    finally:
        kasparro.configure_logging("info")


# --- GET /docs -----------------------------------------------------------


def test_docs_page_and_its_files_are_served_offline(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = referenced_urls(page.content)
    kinds = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}
    assert {Path(url).suffix for url in urls} == set(kinds)
    for url in urls:
        assert url.startswith("/docs/"), url
        result = client.get(url)
        assert result.status_code == 200, url
        assert result.headers["content-type"].startswith(kinds[Path(url).suffix]), url
        assert len(result.content) > 100
        if url.endswith("init.js"):
            assert "/openapi.json" in result.text and "validatorUrl: null" in result.text
            assert not re.search(r"https?://", result.text)
    assert not re.search(r"https?://", page.text)
    assert client.get("/docs/../kasparro.py").status_code == 404
    assert client.get("/docs/swagger-editor-bundle.js").status_code == 404


def test_index_lists_the_new_endpoints(client: Any) -> None:
    endpoints = client.get("/").json["endpoints"]
    assert {"GET /metrics", "GET /openapi.json", "GET /docs", "GET /redoc"} <= set(endpoints)
