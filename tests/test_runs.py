"""GET /runs, /runs/{run_id} and /runs/compare over stores filled by real etl.py runs, served by real uvicorn."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import msgspec
import pytest

import etl
import kasparro
from conftest import LiveServer, exchange, run_etl
from etl_support import writer_lock_held
from kasparro import Anomaly, Run, RunComparison, RunList, RunSourceOutcome, compare_runs

PROBLEM = "application/problem+json"
STEADY_ROWS = 40  # rows of each steady run of csv:market
STEADY_RUNS = 11  # the first judged run has 10 before it


def market_csv(path: Path, rows: int, minute: int, bad: int = 0, colour: bool = False) -> Path:
    """`rows` assets observed at 12:`minute`, so every row is a new observation; the last `bad` rows have
    a negative price (rejected); `colour` adds a column no source knows (schema drift)."""
    lines = ["id,symbol,name,rank,price_usd,last_updated" + (",colour" if colour else "")]
    for n in range(1, rows + 1):
        price = -1 if n > rows - bad else n * 1.5
        lines.append(f"coin-{n},C{n},Coin {n},{n},{price},2026-11-25T12:{minute:02d}:00Z" + (",red" if colour else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def etl_ok(db: Path, *sources: str, code: int = 0) -> None:
    result = run_etl(db, *sources)
    assert result.returncode == code, result.stderr + result.stdout


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four runs of known counts: success, partial, failed, and one source good with one failed."""
    folder = tmp_path_factory.mktemp("history")
    db, market, missing = folder / "kasparro.db", folder / "market.csv", folder / "missing.csv"
    etl_ok(db, f"csv:{market_csv(market, 20, minute=1)}")
    etl_ok(db, f"csv:{market_csv(market, 20, minute=2, bad=3)}")
    etl_ok(db, f"csv:{missing}", code=1)
    etl_ok(db, f"csv:{market_csv(market, 10, minute=3)}", f"csv:{missing}")
    return db


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STEADY_RUNS runs of csv:market with STEADY_ROWS rows each, then one of 4 rows with a new column, then
    one of 20,000 rows (far longer)."""
    folder = tmp_path_factory.mktemp("steady")
    db, market = folder / "kasparro.db", folder / "market.csv"
    for minute in range(STEADY_RUNS):
        etl_ok(db, f"csv:{market_csv(market, STEADY_ROWS, minute)}")
    etl_ok(db, f"csv:{market_csv(market, 4, minute=20, colour=True)}")
    etl_ok(db, f"csv:{market_csv(market, 20_000, minute=21)}")
    return db


def get_json(server: LiveServer, path: str, status: int = 200, **headers: str) -> Any:
    code, answer_headers, body = server.get(path, headers)
    assert code == status, body
    assert answer_headers["content-type"] == ("application/json" if status == 200 else PROBLEM)
    return json.loads(body)


def problem_detail(server: LiveServer, path: str, status: int) -> str:
    body = get_json(server, path, status)
    assert body["status"] == status and body["type"] == "about:blank"
    return body["detail"]


def judged(anomaly: Anomaly) -> tuple[int, str]:
    return anomaly.run_id, anomaly.measure


def outcome(run: Run, source: str) -> RunSourceOutcome:
    (found,) = [part for part in run.outcomes if part.source == source]
    return found


def test_runs_are_listed_newest_first_with_their_sources_counts(live_server: Any, history: Path) -> None:
    server = live_server(history, LOG_LEVEL="warning")
    listed = msgspec.json.decode(server.get("/runs")[2], type=RunList)
    assert listed.limit == 20 and [run.run_id for run in listed.runs] == [4, 3, 2, 1]
    first, partial, failed, mixed = reversed(listed.runs)
    market, missing = "csv:market", "csv:missing"
    assert (first.status, first.sources, first.error) == ("success", [market], None)
    assert (first.rows_read, first.rows_loaded, first.rows_rejected) == (20, 20, 0)
    assert (partial.status, partial.rows_read, partial.rows_loaded, partial.rows_rejected) == ("partial", 20, 17, 3)
    part = outcome(partial, market)
    assert (part.status, part.rows_read, part.rows_loaded, part.rows_rejected) == ("partial", 20, 17, 3)
    assert failed.status == "failed" and "missing.csv" in failed.error
    assert outcome(failed, missing).status == "failed" and "missing.csv" in outcome(failed, missing).error
    assert [part.source for part in mixed.outcomes] == [market, missing] and mixed.sources == [market, missing]
    assert (outcome(mixed, market).status, outcome(mixed, market).rows_loaded) == ("success", 10)
    assert outcome(mixed, missing).status == "failed"
    for run in listed.runs:
        assert run.ended_at is not None and run.duration_ms is not None and run.duration_ms >= 0
        assert all(part.duration_ms is not None and part.drift == {} for part in run.outcomes)
        assert msgspec.json.decode(server.get(f"/runs/{run.run_id}")[2], type=Run) == run
    for limit in (1, 3, 100):
        body = get_json(server, f"/runs?limit={limit}")
        assert [run["run_id"] for run in body["runs"]] == [4, 3, 2, 1][:limit] and body["limit"] == limit
    assert get_json(server, "/runs?limit=")["limit"] == 20  # empty is absent


DIED = "the run's process died or could not record its end"


def test_a_run_whose_process_is_gone_reads_failed_and_a_live_one_running(live_server: Any, tmp_path: Path) -> None:
    db = tmp_path / "kasparro.db"
    etl_ok(db, f"csv:{market_csv(tmp_path / 'market.csv', 5, minute=1)}")
    conn = etl.connect(db, busy_timeout=5)
    try:
        etl.start_run(conn, [etl.CsvSource(Path("never-read.csv"))])  # recorded running; no process runs it
    finally:
        conn.close()
    server = live_server(db, LOG_LEVEL="warning")
    for path in ("/runs", "/runs/2", "/runs/compare?a=1&b=2"):
        dead = get_json(server, path)
        run = dead["runs"][0] if "runs" in dead else dead.get("b", dead)
        assert run["status"] == "failed" and [part["status"] for part in run["outcomes"]] == ["failed"], path
        assert [run["error"], *(part["error"] for part in run["outcomes"])] == [DIED] * 2, path
    stats = get_json(server, "/stats")["recent_runs"][0]
    assert (stats["status"], stats["error"]) == ("failed", DIED)
    with writer_lock_held(db):
        live = get_json(server, "/runs/2")
        assert (live["status"], live["error"], live["outcomes"][0]["status"]) == ("running", None, "running")
        assert get_json(server, "/runs")["runs"][0]["status"] == "running"
        assert get_json(server, "/runs/compare?a=2&b=2")["anomalies"] == []  # a running source is not judged yet
    etl_ok(db, f"csv:{market_csv(tmp_path / 'market.csv', 5, minute=2)}")  # the next run records what was read
    found = get_json(server, "/runs/2")
    assert (found["status"], found["error"]) == ("failed", f"{DIED}; found by run 3")


def test_a_store_named_through_a_symlink_has_the_one_writer_lock(live_server: Any, tmp_path: Path) -> None:
    """The lock file was named after the path given, not the file: a run given a symlink to the store took another
    lock, wrote beside the running one and recorded it 'died ... found by run N' while it ran; an API given the
    symlink read a running run as failed."""
    (tmp_path / "data").mkdir()
    db, link, market = tmp_path / "data" / "kasparro.db", tmp_path / "link.db", tmp_path / "market.csv"
    link.symlink_to(db)
    etl_ok(db, f"csv:{market_csv(market, 5, minute=1)}")
    conn = etl.connect(db, busy_timeout=5)
    try:
        etl.start_run(conn, [etl.CsvSource(market)])  # run 2, recorded running; its process holds the lock below
    finally:
        conn.close()
    server = live_server(link, LOG_LEVEL="warning")
    with writer_lock_held(db):
        result = run_etl(link, f"csv:{market_csv(tmp_path / 'other.csv', 5, minute=2)}")
        assert result.returncode == etl.EXIT_LOCKED, result.stderr + result.stdout
        assert [run["status"] for run in get_json(server, "/runs")["runs"]] == ["running", "success"]
        assert get_json(server, "/health")["etl_status"] == "running"
    with writer_lock_held(link):
        assert run_etl(db, f"csv:{market}").returncode == etl.EXIT_LOCKED
    assert not (tmp_path / "link.db.etl-lock").exists()


def test_stats_count_a_run_whose_process_is_gone_as_a_failure(live_server: Any, tmp_path: Path) -> None:
    """/stats listed such a run as failed in recent_runs while its totals counted it in runs alone: failures 0,
    last_error and last_failure_at null, beside /health's etl_status 'failed', until the next run recorded it."""
    db, market = tmp_path / "kasparro.db", tmp_path / "market.csv"
    etl_ok(db, f"csv:{market_csv(market, 5, minute=1)}")
    conn = etl.connect(db, busy_timeout=5)
    try:
        etl.start_run(conn, [etl.CsvSource(market)])  # recorded running; no process runs it
    finally:
        conn.close()
    server = live_server(db, LOG_LEVEL="warning")
    assert get_json(server, "/health")["etl_status"] == "failed"
    stats = get_json(server, "/stats")
    (source,) = stats["sources"]
    for totals in (stats["overall"], source):
        assert (totals["runs"], totals["successes"], totals["failures"]) == (2, 1, 1), totals
        assert totals["last_error"] == DIED and totals["last_failure_at"] == stats["recent_runs"][0]["started_at"]
    with writer_lock_held(db):  # its process runs: counted, neither a success nor a failure yet
        for totals in (get_json(server, "/stats")["overall"], get_json(server, "/stats")["sources"][0]):
            assert (totals["runs"], totals["successes"], totals["failures"], totals["last_error"]) == (2, 1, 0, None)
    etl_ok(db, f"csv:{market_csv(market, 5, minute=2)}")  # the next run records it: the same counts, and its own
    stats = get_json(server, "/stats")
    for totals in (stats["overall"], stats["sources"][0]):
        assert (totals["runs"], totals["successes"], totals["failures"]) == (3, 2, 1), totals
        assert totals["last_error"] == f"{DIED}; found by run 3"


def test_compare_sets_two_runs_side_by_side_and_flags_the_anomalies(live_server: Any, steady: Path) -> None:
    server = live_server(steady, LOG_LEVEL="warning")
    runs = {run.run_id: run for run in msgspec.json.decode(server.get("/runs?limit=100")[2], type=RunList).runs}
    assert len(runs) == STEADY_RUNS + 2
    steady_last, small, large = STEADY_RUNS, STEADY_RUNS + 1, STEADY_RUNS + 2
    compared = msgspec.json.decode(server.get(f"/runs/compare?a={steady_last}&b={small}")[2], type=RunComparison)
    assert (compared.a, compared.b) == (runs[steady_last], runs[small])
    (source,) = compared.sources
    assert (source.source, source.status_a, source.status_b) == ("csv:market", "success", "success")
    assert (source.rows_read.a, source.rows_read.b, source.rows_read.difference) == (STEADY_ROWS, 4, 4 - STEADY_ROWS)
    assert (source.rows_loaded.a, source.rows_loaded.b, source.rows_loaded.difference) == (STEADY_ROWS, 4, -36)
    assert (source.rows_rejected.a, source.rows_rejected.b, source.rows_rejected.difference) == (0, 0, 0)
    durations = (outcome(runs[steady_last], "csv:market").duration_ms, outcome(runs[small], "csv:market").duration_ms)
    assert (source.duration_ms.a, source.duration_ms.b) == durations
    assert source.duration_ms.difference == durations[1] - durations[0]
    assert (source.drift_appeared, source.drift_disappeared) == (["unknown column 'colour'"], [])

    # The steady runs are judged against steady runs: nothing about their rows; the small run is flagged on both.
    flagged = {(anomaly.run_id, anomaly.measure): anomaly for anomaly in compared.anomalies}
    assert not {key for key in flagged if key[1] != "duration_ms" and key[0] == steady_last}
    previous = list(range(small - 1, small - 11, -1))  # the 10 runs before it, newest first
    for measure in ("rows_read", "rows_loaded"):
        anomaly = flagged[(small, measure)]
        assert (anomaly.source, anomaly.value, anomaly.median) == ("csv:market", 4, STEADY_ROWS)
        assert anomaly.previous_runs == previous and anomaly.previous_values == [STEADY_ROWS] * 10
        assert measure in anomaly.reason and "more than half" in anomaly.reason

    backwards = msgspec.json.decode(server.get(f"/runs/compare?a={small}&b={steady_last}")[2], type=RunComparison)
    (source,) = backwards.sources
    assert source.rows_read.difference == STEADY_ROWS - 4 and source.drift_disappeared == ["unknown column 'colour'"]
    assert source.drift_appeared == []
    assert sorted(backwards.anomalies, key=judged) == sorted(compared.anomalies, key=judged)  # the same two runs judged

    # 20,000 rows take far over 3 times the median duration of the 10 runs before: flagged, with those values.
    long = msgspec.json.decode(server.get(f"/runs/compare?a={small}&b={large}")[2], type=RunComparison)
    flagged = {(anomaly.run_id, anomaly.measure): anomaly for anomaly in long.anomalies}
    before = [outcome(runs[run_id], "csv:market") for run_id in range(large - 1, large - 11, -1)]
    duration = flagged[(large, "duration_ms")]
    assert duration.value == outcome(runs[large], "csv:market").duration_ms
    assert duration.previous_values == [part.duration_ms for part in before]
    assert duration.median == statistics.median(part.duration_ms for part in before)
    assert duration.value > 3 * duration.median and "3 times" in duration.reason
    read = flagged[(large, "rows_read")]
    assert (read.value, read.previous_values) == (20_000, [part.rows_read for part in before])
    assert read.median == statistics.median(part.rows_read for part in before) == STEADY_ROWS
    assert long.sources[0].drift_disappeared == ["unknown column 'colour'"]


def test_a_run_compared_with_itself_is_judged_once(live_server: Any, steady: Path) -> None:
    server = live_server(steady, LOG_LEVEL="warning")
    small = STEADY_RUNS + 1
    same = get_json(server, f"/runs/compare?a={small}&b={small}")
    assert same["a"] == same["b"] and same["sources"][0]["rows_read"] == {"a": 4, "b": 4, "difference": 0}
    judged = [(anomaly["run_id"], anomaly["measure"]) for anomaly in same["anomalies"]]
    assert len(judged) == len(set(judged)) and {(small, "rows_read"), (small, "rows_loaded")} <= set(judged)
    first = get_json(server, "/runs/compare?a=1&b=1")
    assert first["anomalies"] == []  # no run before the first: nothing to judge it against


def steady_run(run_id: int, rows_read: int, duration_ms: int | None, status: str = "success") -> Run:
    part = RunSourceOutcome(source="csv:market", status=status, started_at="2026-11-25T12:00:00Z", ended_at=None,
                            rows_read=rows_read, rows_loaded=rows_read, rows_rejected=0, duration_ms=duration_ms,
                            detail=None, error=None, drift={})  # fmt: skip
    return Run(run_id=run_id, status=status, started_at=part.started_at, ended_at=None, sources=["csv:market"],
               rows_read=rows_read, rows_loaded=rows_read, rows_rejected=0, duration_ms=duration_ms, error=None,
               pid=1, host="h", outcomes=[part])  # fmt: skip


def flags(run: Run, previous_rows: list[tuple[int, int | None]]) -> set[str]:
    """The measures compare_runs flags in `run` after previous runs of (rows, duration), oldest first."""
    rows = [{"run_id": n + 1, "rows_read": read, "rows_loaded": read, "duration_ms": duration}
            for n, (read, duration) in enumerate(previous_rows)][::-1]  # fmt: skip
    comparison = compare_runs(run, run, {(run.run_id, "csv:market"): rows}, "v")
    assert all(isinstance(anomaly, Anomaly) and anomaly.run_id == run.run_id for anomaly in comparison.anomalies)
    return {anomaly.measure for anomaly in comparison.anomalies}


@pytest.mark.parametrize(
    ("rows_read", "duration_ms", "previous", "flagged"),
    [
        (150, 300, [(100, 100)] * 10, set()),  # exactly half more and exactly 3 times: not over
        (50, 100, [(100, 100)] * 10, set()),  # exactly half less
        (151, 301, [(100, 100)] * 10, {"rows_read", "rows_loaded", "duration_ms"}),
        (49, 100, [(100, 100)] * 10, {"rows_read", "rows_loaded"}),
        (100, 100, [(10, 10)] * 4 + [(100, 100)] * 5, set()),  # the median, not the mean
        (100, 101, [(100, 1)] * 3 + [(100, None)] * 2, {"duration_ms"}),  # runs without a duration are left out
        (100, 100, [], set()),  # no previous run: not judged
        (1, 0, [(0, 0)] * 3, {"rows_read", "rows_loaded"}),  # any rows against a median of none
        (0, 0, [(0, 0)] * 3, set()),  # none against none
        # A duration is flagged only DURATION_FLOOR_MS or more above its median: 1 ms against a median of 0 ms
        # was "over 3 times" it. Both sides of the floor, and of 3 times where that is the higher bound.
        (100, 1, [(100, 0)] * 10, set()),
        (100, 99, [(100, 0)] * 10, set()),
        (100, 100, [(100, 0)] * 10, {"duration_ms"}),
        (100, 139, [(100, 40)] * 10, set()),  # over 3 times, 99 ms above
        (100, 140, [(100, 40)] * 10, {"duration_ms"}),
        (100, 150, [(100, 50)] * 10, set()),  # 100 ms above, exactly 3 times
        (100, 151, [(100, 50)] * 10, {"duration_ms"}),
        (100, 10_000, [(100, 5)] * 10, {"duration_ms"}),
    ],
)
def test_the_anomaly_rule_at_its_bounds(
    rows_read: int, duration_ms: int, previous: list[tuple[int, int | None]], flagged: set[str]
) -> None:
    assert kasparro.DURATION_FLOOR_MS == 100  # the floor the bounds above are written for
    assert flags(steady_run(len(previous) + 1, rows_read, duration_ms), previous) == flagged


def test_anomalies_are_measured_against_loads_not_skips_or_failures(live_server: Any, tmp_path: Path) -> None:
    """A cron job re-reading an unchanged file recorded runs of 0 rows: each was flagged, and they pulled the
    medians later loads were judged against to 0."""
    db, market = tmp_path / "kasparro.db", tmp_path / "market.csv"
    for minute in range(3):  # runs 1-3: loads of 40 rows
        etl_ok(db, f"csv:{market_csv(market, 40, minute)}")
    for _ in range(3):  # runs 4-6: the file unchanged, skipped
        etl_ok(db, f"csv:{market}")
    market.write_text("id,symbol\n")  # run 7: failed (no name column), 0 rows
    etl_ok(db, f"csv:{market}", code=etl.EXIT_FAILED)
    etl_ok(db, f"csv:{market_csv(market, 4, minute=9)}")  # run 8: 4 rows
    server = live_server(db, LOG_LEVEL="warning")
    runs = {run.run_id: run for run in msgspec.json.decode(server.get("/runs")[2], type=RunList).runs}
    assert [runs[n].outcomes[0].detail for n in (4, 5, 6)] == ["unchanged since run 3"] * 3
    assert runs[7].status == "failed"
    for skipped in (4, 5, 6):
        compared = msgspec.json.decode(server.get(f"/runs/compare?a={skipped}&b={skipped}")[2], type=RunComparison)
        assert compared.anomalies == [], skipped
    compared = msgspec.json.decode(server.get("/runs/compare?a=7&b=8")[2], type=RunComparison)
    found = {(anomaly.run_id, anomaly.measure): anomaly for anomaly in compared.anomalies}
    assert set(found) == {(7, "rows_read"), (7, "rows_loaded"), (8, "rows_read"), (8, "rows_loaded")}
    for anomaly in found.values():
        assert (anomaly.median, anomaly.previous_runs, anomaly.previous_values) == (40.0, [3, 2, 1], [40, 40, 40])


def test_unknown_runs_are_404_and_bad_parameters_400_naming_them(live_server: Any, history: Path) -> None:
    server = live_server(history, LOG_LEVEL="warning")
    assert "no run 5" in problem_detail(server, "/runs/5", 404)
    for path in ("/runs/0", "/runs/01", "/runs/abc", "/runs/-1", "/runs/+1", "/runs/1_0", "/runs/%D9%A3",
                 "/runs/1.0", "/runs/%201", "/runs/1000000000", "/runs/9" + "9" * 5000, "/runs/1/",
                 "/runs/"):  # fmt: skip
        problem_detail(server, path, 404)  # one URL per run; nothing else is one
    metrics = server.get("/metrics")[2].decode()
    assert 'route="/runs/{run_id}",status="404"' in metrics and ":int" not in metrics
    assert "no run 99" in problem_detail(server, "/runs/compare?a=1&b=99", 404)
    assert "no run 98" in problem_detail(server, "/runs/compare?a=98&b=1", 404)
    for query, named in (
        ("b=1", "a:"), ("a=1", "b:"), ("a=&b=1", "a:"), ("a=x&b=1", "a:"), ("a=1&b=0", "b:"), ("a=1&b=-2", "b:"),
        ("a=1&b=1.5", "b:"), ("a=1&b=1&a=2", "a:"), ("a=1&b=1&c=3", "unknown parameter 'c'"),
    ):  # fmt: skip
        assert problem_detail(server, f"/runs/compare?{query}", 400).startswith(named), query
    for query in ("limit=0", "limit=101", "limit=x", "limit=1&limit=2", "limit=%201"):
        assert problem_detail(server, f"/runs?{query}", 400).startswith("limit:"), query
    assert "'page'" in problem_detail(server, "/runs?page=2", 400)
    assert "'limit'" in problem_detail(server, "/runs/1?limit=2", 400)


def test_runs_need_a_key_when_keys_are_configured(live_server: Any, history: Path) -> None:
    server = live_server(history, LOG_LEVEL="warning", KASPARRO_API_KEYS="k1,k2")
    for path in ("/runs", "/runs/1", "/runs/compare?a=1&b=2", "/runs/5", "/runs/compare"):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "k3"}):
            status, answer_headers, _ = server.get(path, headers)
            assert status == 401 and answer_headers["www-authenticate"].startswith("Bearer"), (path, headers)
    for headers in ({"Authorization": "Bearer k1"}, {"X-API-Key": "k2"}):
        assert server.get("/runs", headers)[0] == 200
        assert server.get("/runs/compare?a=1&b=2", headers)[0] == 200
        assert server.get("/runs/5", headers)[0] == 404


def test_index_and_document_list_the_run_endpoints_and_head_answers_as_get(live_server: Any, history: Path) -> None:
    server = live_server(history, LOG_LEVEL="warning")
    endpoints = get_json(server, "/")["endpoints"]
    assert {"GET /runs", "GET /runs/{run_id}", "GET /runs/compare"} <= set(endpoints)
    document = get_json(server, "/openapi.json")
    assert {"/runs", "/runs/{run_id}", "/runs/compare"} <= set(document["paths"])
    assert "each of the two runs" in document["paths"]["/runs/compare"]["get"]["description"]
    for path in ("/runs", "/runs/2", "/runs/compare?a=1&b=2", "/runs/9"):
        got, head = exchange(server.base, "GET", path), exchange(server.base, "HEAD", path)
        assert head[0] == got[0] and head[2] == b"", path
        length = int(head[1]["content-length"])
        if got[0] == 200:
            assert length == len(got[2]), path
        else:  # a problem: the two differ only in the digits of api_latency_ms
            assert abs(length - len(got[2])) <= 3, path
