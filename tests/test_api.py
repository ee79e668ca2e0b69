"""The HTTP API of SPEC.md over a store filled by the real etl.py."""

from __future__ import annotations

import asyncio
import operator
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import falcon
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etl
import kasparro
from conftest import run_etl, write_csv
from etl_support import query, start_etl, wait_for_event, writer_lock_held
from kasparro import Config, RequestIds, Store, create_app, new_request_id

PROBLEM = "application/problem+json"
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def problem(result: Any, status: int) -> dict[str, Any]:
    """Assert an RFC 9457 problem with the given status and return its body."""
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == PROBLEM
    body = result.json
    assert set(body) >= {"type", "title", "status", "detail", "request_id"}
    assert body["status"] == status
    assert body["request_id"] == result.headers["x-request-id"]
    return body


def store_version(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        store_id, generation = conn.execute("SELECT store_id, generation FROM store_meta").fetchone()
    finally:
        conn.close()
    return f"{store_id}-{generation}"


def nocase(text: str) -> str:
    """SQLite's NOCASE: only ASCII letters fold."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def expected_order(assets: list[dict[str, Any]], sort: str) -> list[str]:
    """asset_ids in the API's order: nulls last, ties by asset_id in the sort's direction."""
    field = sort.removeprefix("-")
    descending = sort.startswith("-")
    key = (lambda a: (nocase(a["name"]), a["asset_id"])) if field == "name" else (lambda a: (a[field], a["asset_id"]))
    valued = sorted((a for a in assets if a[field] is not None), key=key, reverse=descending)
    nulls = sorted((a for a in assets if a[field] is None), key=lambda a: a["asset_id"], reverse=descending)
    return [a["asset_id"] for a in valued + nulls]


# --- GET / ---------------------------------------------------------------


def test_index_names_the_service(client: Any) -> None:
    result = client.get("/")
    assert result.status_code == 200
    assert result.json["message"] == "Kasparro Backend Service"
    assert "GET /data" in result.json["endpoints"]
    assert result.json["version"]


# --- GET /data -----------------------------------------------------------


def test_data_first_page_by_rank(client: Any, store_path: Path) -> None:
    result = client.get("/data")
    assert result.status_code == 200
    assert result.headers["content-type"] == falcon.MEDIA_JSON
    assert result.headers["etag"].startswith('W/"')
    body = result.json
    assert set(body) == {"request_id", "api_latency_ms", "data", "page", "page_size", "total_items",
                         "total_pages", "next_cursor", "data_version"}  # fmt: skip
    assert body["request_id"] == result.headers["x-request-id"]
    assert body["api_latency_ms"] >= 0
    assert (body["page"], body["page_size"], body["total_items"], body["total_pages"]) == (1, 10, 255, 26)
    assert body["data_version"] == store_version(store_path)
    assert body["next_cursor"]
    assert [a["rank"] for a in body["data"]] == list(range(1, 11))
    assert body["data"][0] == {
        "asset_id": "bitcoin", "symbol": "BTC", "name": "Bitcoin", "rank": 1, "price_usd": 95240.12,
        "market_cap_usd": 1898218475025.0, "volume_24h_usd": 76139295205.0, "change_24h_pct": -3.22,
        "status": "active", "sources": ["csv:sample"], "updated_at": "2026-11-25T12:00:00Z",
    }  # fmt: skip


@pytest.mark.parametrize("symbol", ["USDC", "usdc", "WETH", "SOL"])
def test_lookalike_symbols_stay_separate_assets(client: Any, symbol: str) -> None:
    body = client.get("/data", params={"filter_by": f"symbol:{symbol}"}).json
    assert body["total_items"] == 2
    assert len({a["asset_id"] for a in body["data"]}) == 2
    assert {a["symbol"] for a in body["data"]} == {symbol.upper()}


@pytest.mark.parametrize(
    ("filter_by", "keep"),
    [
        ("active", lambda a: a["status"] == "active"),
        ("status:inactive", lambda a: a["status"] == "inactive"),
        ("status:ACTIVE|inactive", lambda a: True),
        ("symbol:BTC|eth", lambda a: a["symbol"] in ("BTC", "ETH")),
        ("name~bitcoin", lambda a: "bitcoin" in a["name"].lower()),
        ("name:wrapped sol", lambda a: a["name"] == "Wrapped SOL"),
        ("asset_id:USDC", lambda a: a["asset_id"] == "usdc"),
        ("name~%", lambda a: "%" in a["name"]),
        ("name~_", lambda a: "_" in a["name"]),
        ("rank<=10", lambda a: a["rank"] is not None and a["rank"] <= 10),
        ("rank:1|2|3", lambda a: a["rank"] in (1, 2, 3)),
        ("price_usd>1000,change_24h_pct<0", lambda a: (a["price_usd"] or 0) > 1000 and (a["change_24h_pct"] or 0) < 0),
        ("market_cap_usd>=1e9", lambda a: a["market_cap_usd"] is not None and a["market_cap_usd"] >= 1e9),
        ("updated_at>=2026-11-25T12:00:00Z", lambda a: a["updated_at"] >= "2026-11-25T12:00:00Z"),
        ("updated_at<2026-11-25T11:59:00+00:00", lambda a: a["updated_at"] < "2026-11-25T11:59:00Z"),
        ("source:csv:sample", lambda a: "csv:sample" in a["listed"]),
        ("source:CSV:Sample", lambda a: "csv:sample" in a["listed"]),
        ("source:coingecko", lambda a: False),
        ("source~sample", lambda a: True),
        (" active , rank<50 ", lambda a: a["status"] == "active" and a["rank"] is not None and a["rank"] < 50),
    ],
)
def test_filter_grammar(client: Any, sample_assets: list[dict[str, Any]], filter_by: str, keep: Any) -> None:
    body = client.get("/data", params={"filter_by": filter_by, "page_size": "100"}).json
    wanted = [a for a in sample_assets if keep(a)]
    assert body["total_items"] == len(wanted)
    assert [a["asset_id"] for a in body["data"]] == expected_order(wanted, "rank")[:100]


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "101"}, "page_size"),
        ({"page": "0"}, "page"),
        ({"page": "1.5"}, "page"),
        ({"page": "two"}, "page"),
        ({"sort": "price"}, "sort"),
        ({"sort": "-status"}, "sort"),
        ({"filter_by": "colour:red"}, "colour"),
        ({"filter_by": "rank>ten"}, "rank"),
        ({"filter_by": "price_usd>nan"}, "price_usd"),
        ({"filter_by": "price_usd<inf"}, "price_usd"),
        ({"filter_by": "price_usd<1e999"}, "price_usd"),
        ({"filter_by": "rank~1"}, "rank"),
        ({"filter_by": "name>a"}, "name"),
        ({"filter_by": "status:sleeping"}, "status"),
        ({"filter_by": "sleeping"}, "sleeping"),
        ({"filter_by": "active,,rank<5"}, "empty condition"),
        ({"filter_by": "symbol:"}, "symbol"),
        ({"filter_by": "symbol:BTC|"}, "symbol"),
        ({"filter_by": "updated_at>yesterday"}, "updated_at"),
        ({"filter_by": "updated_at>2026-11-25T25:00:00Z"}, "updated_at"),  # 20261125 is Unix seconds (1970)
        ({"filter_by": "updated_at<2026-W48"}, "updated_at"),
        ({"filter_by": "updated_at>=1764072000000"}, "updated_at"),
        ({"cursor": "not a cursor"}, "cursor"),
        ({"cursor": "AAAAAAAAAAAAAAAAAAAA"}, "cursor"),
        ({"pagesize": "5"}, "pagesize"),
    ],
)
def test_bad_query_is_a_400_naming_the_part(client: Any, params: dict[str, str], named: str) -> None:
    body = problem(client.get("/data", params=params), 400)
    assert named in body["detail"]


def test_tampered_cursor_is_refused(client: Any) -> None:
    cursor = client.get("/data", params={"page_size": "3"}).json["next_cursor"]
    flipped = cursor[:-3] + ("A" if cursor[-3] != "A" else "B") + cursor[-2:]
    assert "cursor" in problem(client.get("/data", params={"cursor": flipped, "page_size": "3"}), 400)["detail"]


def test_cursor_must_match_the_query(client: Any) -> None:
    cursor = client.get("/data", params={"sort": "-price_usd"}).json["next_cursor"]
    for other in ({"sort": "price_usd"}, {"sort": "-price_usd", "filter_by": "active"}):
        body = problem(client.get("/data", params={"cursor": cursor, **other}), 400)
        assert "cursor" in body["detail"]
    assert client.get("/data", params={"cursor": cursor, "sort": "-price_usd", "page_size": "7"}).status_code == 200


def test_cursor_page_has_null_page_number(client: Any) -> None:
    first = client.get("/data", params={"page_size": "5"}).json
    second = client.get("/data", params={"page_size": "5", "cursor": first["next_cursor"], "page": "9"}).json
    assert second["page"] is None
    assert [a["rank"] for a in second["data"]] == [6, 7, 8, 9, 10]
    assert second["total_items"] == 255


def test_page_past_the_end_is_empty(client: Any) -> None:
    body = client.get("/data", params={"page": "99", "page_size": "100"}).json
    assert body["data"] == [] and body["next_cursor"] is None and body["total_pages"] == 3


def test_nulls_sort_last_both_ways(client: Any, sample_assets: list[dict[str, Any]]) -> None:
    for sort in ("rank", "-rank", "market_cap_usd", "-change_24h_pct"):
        pages = [client.get("/data", params={"sort": sort, "page": str(p), "page_size": "100"}) for p in (1, 2, 3)]
        ids = [a["asset_id"] for page in pages for a in page.json["data"]]
        assert ids == expected_order(sample_assets, sort)


def test_etag_gives_304_until_the_query_changes(client: Any) -> None:
    first = client.get("/data", params={"filter_by": "active"})
    etag = first.headers["etag"]
    again = client.get("/data", params={"filter_by": "active"}, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert client.get("/data", params={"filter_by": " active"}, headers={"If-None-Match": etag}).status_code == 304
    other = client.get("/data", params={"filter_by": "inactive"}, headers={"If-None-Match": etag})
    assert other.status_code == 200
    assert other.headers["etag"] != etag


def test_data_version_moves_exactly_when_the_etl_commits(client: Any, store_path: Path, tmp_path: Path) -> None:
    before = client.get("/data")
    assert run_etl(store_path).returncode == 0  # the same sample again: nothing new
    same = client.get("/data", headers={"If-None-Match": before.headers["etag"]})
    assert same.status_code == 304
    assert run_etl(store_path, f"csv:{write_csv(tmp_path / 'more.csv', 30)}").returncode == 0
    after = client.get("/data", headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200
    assert after.json["data_version"] != before.json["data_version"]
    assert after.json["data_version"] == store_version(store_path)
    assert after.json["total_items"] == 285


# --- GET /data/{asset_id} ------------------------------------------------


def test_asset_detail_has_quotes(client: Any) -> None:
    result = client.get("/data/usdc")
    assert result.status_code == 200
    body = result.json
    assert body["asset_id"] == "usdc" and body["symbol"] == "USDC" and body["sources"] == ["csv:sample"]
    assert len(body["quotes"]) == 1
    quote = body["quotes"][0]
    assert quote["source"] == "csv:sample" and quote["price_usd"] == body["price_usd"]
    assert set(quote) == {"source", "source_id", "symbol", "name", "rank", "price_usd", "market_cap_usd",
                          "volume_24h_usd", "change_24h_pct", "status", "observed_at"}  # fmt: skip
    assert client.get("/data/usdc", headers={"If-None-Match": result.headers["etag"]}).status_code == 304


def test_asset_detail_quotes_are_every_observed_listing_in_source_and_id_order(
    make_client: Any, store_path: Path
) -> None:
    """The detail's one statement gives what reading the asset and its quotes apart gives: every listing with an
    observation, by source then source id, pinned mappings without one left out, and no quotes when none has."""
    quoted = "source, source_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct, status"
    with sqlite3.connect(store_path) as conn:
        (usdc,) = conn.execute(f"SELECT {quoted}, observed_at FROM source_map WHERE asset_id = 'usdc'").fetchall()
        extra = [  # after and before usdc's own listing in (source, source_id) order, and within one source
            ("zz-exchange", "b-usdc", *usdc[2:]),
            ("zz-exchange", "a-usdc", *usdc[2:]),
            ("aa-exchange", "z-usdc", *usdc[2:]),
            ("aa-exchange", "pinned-usdc", *(None,) * 9),  # pinned by hand: no observation
        ]
        conn.executemany(
            f"INSERT INTO source_map (asset_id, pinned, {quoted}, observed_at)"
            " VALUES ('usdc', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(int(row[-1] is None), *row) for row in extra],
        )
        conn.execute("UPDATE source_map SET observed_at = NULL, pinned = 1 WHERE asset_id = 'dai'")
    client = make_client(Config(db=store_path, log_level="warning"))
    quotes = client.get("/data/usdc").json["quotes"]
    assert [(q["source"], q["source_id"]) for q in quotes] == [
        ("aa-exchange", "z-usdc"), (usdc[0], usdc[1]), ("zz-exchange", "a-usdc"), ("zz-exchange", "b-usdc"),
    ]  # fmt: skip
    assert all(q["price_usd"] == usdc[5] and q["observed_at"] for q in quotes)
    dai = client.get("/data/dai").json
    assert (dai["asset_id"], dai["quotes"]) == ("dai", [])
    assert client.get("/data/usdc", params={"fields": "quotes"}).json == {"quotes": quotes}


def test_unknown_asset_is_a_404_problem(client: Any) -> None:
    assert "no-such-coin" in problem(client.get("/data/no-such-coin"), 404)["detail"]


# --- GET /health ---------------------------------------------------------


def test_health_is_healthy_after_a_fresh_run(client: Any) -> None:
    result = client.get("/health")
    assert result.status_code == 200
    body = result.json
    assert body["status"] == "healthy" and body["db_connected"] is True and body["etl_status"] == "success"
    assert body["etl_last_run"].endswith("Z")


def test_health_is_degraded_when_stale(make_client: Any, store_path: Path) -> None:
    client = make_client(Config(db=store_path, etl_max_age=-1, log_level="warning"))
    result = client.get("/health")
    assert result.status_code == 200
    assert result.json["status"] == "degraded" and result.json["etl_status"] == "success"


def test_health_is_degraded_after_a_failed_run(client: Any, store_path: Path, tmp_path: Path) -> None:
    assert run_etl(store_path, f"csv:{tmp_path / 'missing.csv'}").returncode == 1
    body = client.get("/health").json
    assert (body["status"], body["etl_status"]) == ("degraded", "failed")


def test_health_tells_a_live_run_from_a_dead_one(client: Any, store_path: Path) -> None:
    conn = etl.connect(store_path, busy_timeout=5)
    try:
        etl.start_run(conn, [etl.CsvSource(Path("never-read.csv"))])
    finally:
        conn.close()
    dead = client.get("/health").json
    assert (dead["status"], dead["etl_status"]) == ("degraded", "failed")
    with writer_lock_held(store_path):
        live = client.get("/health").json
    assert (live["status"], live["etl_status"]) == ("healthy", "running")


def test_health_is_unhealthy_without_a_store(make_client: Any, tmp_path: Path) -> None:
    client = make_client(Config(db=tmp_path / "absent.db", log_level="warning"))
    result = client.get("/health")
    assert (result.status_code, result.headers["retry-after"]) == (503, "1")
    assert result.json == {"status": "unhealthy", "db_connected": False, "etl_last_run": None, "etl_status": None}


# --- missing, broken and recovering stores -------------------------------


def test_missing_store_is_503_then_recovers(make_client: Any, sample_store: Path, tmp_path: Path) -> None:
    db = tmp_path / "later.db"
    client = make_client(Config(db=db, reopen_interval=0, log_level="warning"))
    for path in ("/data", "/data/bitcoin", "/stats"):
        assert "retry" in problem(client.get(path), 503)["detail"]
    assert client.get("/health").status_code == 503
    shutil.copyfile(sample_store, db)
    assert client.get("/data").json["total_items"] == 255
    assert client.get("/health").json["status"] == "healthy"


@pytest.mark.parametrize("content", [b"", b"this is not a database at all" * 100])
def test_unreadable_store_is_503(make_client: Any, tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "broken.db"
    db.write_bytes(content)
    client = make_client(Config(db=db, reopen_interval=0, log_level="warning"))
    problem(client.get("/data"), 503)
    problem(client.get("/stats"), 503)
    assert client.get("/health").json["status"] == "unhealthy"


def test_store_written_by_the_etl_after_start_is_served(make_client: Any, tmp_path: Path) -> None:
    db = tmp_path / "fresh.db"
    client = make_client(Config(db=db, reopen_interval=0, log_level="warning"))
    problem(client.get("/data"), 503)
    assert run_etl(db).returncode == 0
    assert client.get("/data").json["total_items"] == 255


# --- GET /stats ----------------------------------------------------------


def test_stats_summarises_runs(client: Any, store_path: Path, tmp_path: Path) -> None:
    assert run_etl(store_path, f"csv:{tmp_path / 'missing.csv'}").returncode == 1
    result = client.get("/stats")
    assert result.status_code == 200
    body = result.json
    overall = body["overall"]
    assert (overall["runs"], overall["successes"], overall["failures"]) == (2, 1, 1)
    assert overall["rows_loaded"] == 255 and overall["last_error"] and overall["last_failure_at"]
    assert [s["source"] for s in body["sources"]] == ["csv:missing", "csv:sample"]
    sample = body["sources"][1]
    assert (sample["runs"], sample["rows_read"], sample["rows_rejected"]) == (1, 255, 0)
    runs = body["recent_runs"]
    assert [r["status"] for r in runs] == ["failed", "success"]
    assert runs[0]["outcomes"][0]["error"] and runs[1]["outcomes"][0]["drift"] == {}
    assert runs[1]["sources"] == ["csv:sample"]


RUN_COLUMNS = "run_id, status, rows_read, rows_loaded, rows_rejected, started_at, ended_at, error, duration_ms"


def summed_by_hand(rows: list[tuple], dead: bool = False) -> dict[str, Any]:
    """RunTotals of etl_run or run_source rows, computed here from every row as SPEC states them; `dead`: a row
    recorded as running is of a run whose process is gone, failed since its start, as GET /runs reads it."""
    runs = [dict(zip(RUN_COLUMNS.split(", "), row, strict=True)) for row in rows]
    if dead:
        died = {"status": "failed", "error": kasparro.DIED["error"]}
        runs = [run | died | {"ended_at": run["started_at"]} if run["status"] == "running" else run for run in runs]
    good = [r for r in runs if r["status"] in ("success", "partial")]
    failed = sorted((r for r in runs if r["status"] == "failed"), key=operator.itemgetter("run_id"))
    durations = [r["duration_ms"] for r in runs if r["duration_ms"] is not None]
    return {
        "runs": len(runs),
        "successes": len(good),
        "partials": sum(r["status"] == "partial" for r in runs),
        "failures": len(failed),
        **{key: sum(r[key] for r in runs) for key in ("rows_read", "rows_loaded", "rows_rejected")},
        "last_success_at": max((r["ended_at"] for r in good), default=None),
        "last_failure_at": max((r["ended_at"] for r in failed), default=None),
        "last_error": failed[-1]["error"] if failed else None,
        "avg_duration_ms": sum(durations) / len(durations) if durations else None,
    }


def assert_stats_add_up(client: Any, db: Path, dead: bool = False) -> dict[str, Any]:
    body = client.get("/stats").json
    assert body["overall"] == summed_by_hand(query(db, f"SELECT {RUN_COLUMNS} FROM etl_run"), dead)
    sources = [source for (source,) in query(db, "SELECT DISTINCT source FROM run_source ORDER BY source")]
    assert [totals.pop("source") for totals in body["sources"]] == sources
    for source, totals in zip(sources, body["sources"], strict=True):
        rows = query(db, f"SELECT {RUN_COLUMNS} FROM run_source WHERE source = ?", (source,))
        assert totals == summed_by_hand(rows, dead)
    return body


def stopped_mid_run(db: Path, csv: Path) -> subprocess.Popen[str]:
    """An etl.py run of `csv` stopped (SIGSTOP) after its first batches committed, its lock still held."""
    run = start_etl(db, f"csv:{csv}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="100")
    wait_for_event(run, "batch committed")
    run.send_signal(signal.SIGSTOP)  # hundreds of batches are left: it cannot have finished
    return run


def test_stats_add_up_every_kind_of_run(make_client: Any, store_path: Path, tmp_path: Path) -> None:
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))
    bad = write_csv(tmp_path / "bad.csv", 300, bad_every=7)  # partial
    big = write_csv(tmp_path / "big.csv", 20_000)
    assert run_etl(store_path, f"csv:{bad}").returncode == 0
    assert run_etl(store_path, f"csv:{tmp_path / 'missing.csv'}", f"csv:{bad}").returncode == 0  # one source fails
    assert run_etl(store_path, f"csv:{tmp_path / 'missing.csv'}").returncode == 1
    killed = stopped_mid_run(store_path, big)
    body = assert_stats_add_up(client, store_path)  # a run in progress: counted as a run, with its rows so far
    assert body["overall"]["runs"] == 5 and body["overall"]["rows_read"] > 300  # the first run read 300
    killed.kill()
    killed.communicate()
    body = assert_stats_add_up(client, store_path, dead=True)  # no process holds the lock: failed, as /runs says
    assert (body["overall"]["runs"], body["overall"]["failures"], body["recent_runs"][0]["status"]) == (5, 2, "failed")
    assert run_etl(store_path, f"csv:{bad}").returncode == 0  # marks the killed run failed
    body = assert_stats_add_up(client, store_path)
    assert (body["overall"]["runs"], body["overall"]["failures"], body["overall"]["partials"]) == (6, 2, 2)


def test_stats_are_read_once_per_commit_and_never_kept_while_a_run_is_marked_running(
    make_client: Any, store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = []
    make = kasparro.StatsResource.make
    monkeypatch.setattr(kasparro.StatsResource, "make", lambda self, *args: reads.append(1) or make(self, *args))
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))
    first = [client.get("/stats").text for _ in range(3)]  # kept on its second read
    assert len(set(first)) == 1 and len(reads) == 2
    killed = stopped_mid_run(store_path, write_csv(tmp_path / "big.csv", 20_000))
    running = client.get("/stats").json
    assert running["recent_runs"][0]["status"] == "running" and running["overall"]["runs"] == 2
    killed.kill()
    killed.communicate()
    assert client.get("/stats").json["recent_runs"][0]["status"] == "failed"  # no commit since: read again


def test_stats_of_an_older_store_are_summed_when_it_is_upgraded(make_client: Any, store_path: Path, tmp_path: Path
                                                               ) -> None:  # fmt: skip
    assert run_etl(store_path, f"csv:{tmp_path / 'missing.csv'}").returncode == 1
    with sqlite3.connect(store_path) as conn:  # a version 3 store: runs, but no run_totals
        conn.executescript("DROP TRIGGER etl_run_totals; DROP TRIGGER run_source_totals; DROP TABLE run_totals;"
                           "PRAGMA user_version = 3;")  # fmt: skip
    assert run_etl(store_path, f"csv:{write_csv(tmp_path / 'more.csv', 50)}").returncode == 0
    assert query(store_path, "PRAGMA user_version") == [(etl.SCHEMA_VERSION,)]
    body = assert_stats_add_up(make_client(Config(db=store_path, log_level="warning")), store_path)
    assert (body["overall"]["runs"], body["overall"]["failures"]) == (3, 1)


# --- errors, request ids, auth -------------------------------------------


def test_unknown_route_is_a_404_problem(client: Any) -> None:
    assert "/nowhere" in problem(client.get("/nowhere"), 404)["detail"]


def test_wrong_method_is_a_405_problem_with_allow(client: Any) -> None:
    result = client.request("DELETE", "/data")
    problem(result, 405)
    assert "GET" in result.headers["allow"]


def test_unexpected_error_is_a_bare_500_problem(store_path: Path, make_client: Any) -> None:
    class Exploding:
        async def on_get(self, req: Any, resp: Any) -> None:
            raise RuntimeError("secret internals /etc/passwd")

    app = create_app(Config(db=store_path, log_level="critical"))
    app.app.add_route("/explode", Exploding())  # the Falcon app inside the front door
    result = make_client(Config(), app).get("/explode")
    body = problem(result, 500)
    assert "secret" not in result.text and "Traceback" not in result.text and "RuntimeError" not in result.text
    assert body["title"] == "Internal Server Error"


def test_sane_request_id_is_echoed(client: Any) -> None:
    result = client.get("/data", headers={"X-Request-ID": "abc-123_XYZ.7"})
    assert result.headers["x-request-id"] == "abc-123_XYZ.7"
    assert result.json["request_id"] == "abc-123_XYZ.7"


@pytest.mark.parametrize("offered", ["has space", "x" * 129, "é-unicode", ""])
def test_insane_request_id_is_replaced(client: Any, offered: str) -> None:
    result = client.get("/health", headers={"X-Request-ID": offered})
    assert result.headers["x-request-id"] != offered
    made = uuid.UUID(result.headers["x-request-id"])
    assert (made.version, made.variant, str(made)) == (4, uuid.RFC_4122, result.headers["x-request-id"])


def test_api_keys_guard_data_and_stats(make_client: Any, store_path: Path) -> None:
    client = make_client(Config(db=store_path, api_keys=("k1", "s3cret"), log_level="warning"))
    for path in ("/data", "/data/bitcoin", "/stats"):
        result = client.get(path)
        problem(result, 401)
        assert "Bearer" in result.headers["www-authenticate"]
        problem(client.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get(path, headers={"X-API-Key": "k1"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200


def test_lock_probe_sees_a_held_writer_lock(store_path: Path) -> None:
    store = Store(store_path)
    assert not store.etl_running()
    with writer_lock_held(store_path):
        assert store.etl_running()
    assert not store.etl_running()


# --- properties ----------------------------------------------------------

GRAMMAR = st.sampled_from([*":~<>=|,- ", "rank", "symbol", "name", "source", "price_usd", "csv:sample",
                                                "active", "nan", "1e3", "%", "_", "\\", "updated_at"])  # fmt: skip
WILD = st.one_of(st.text(max_size=40), st.lists(GRAMMAR, max_size=12).map("".join))


@PROPERTY_SETTINGS
@given(filter_by=WILD, sort=WILD, page_size=WILD, page=WILD, cursor=WILD)
def test_any_query_is_200_or_a_400_problem(
    shared_client: Any, filter_by: str, sort: str, page_size: str, page: str, cursor: str
) -> None:
    params = {"filter_by": filter_by, "sort": sort, "page_size": page_size, "page": page, "cursor": cursor}
    for subset in (params, {"filter_by": filter_by}, {"sort": sort}):
        result = shared_client.get("/data", params=subset)
        assert result.status_code in (200, 400), result.text
        if result.status_code == 400:
            assert result.headers["content-type"] == PROBLEM and result.json["detail"]


def number_condition(assets: list[dict[str, Any]]) -> st.SearchStrategy:
    ops = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}

    @st.composite
    def build(draw: Any) -> tuple[str, Any]:
        field = draw(st.sampled_from(["rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct"]))
        op = draw(st.sampled_from(sorted(ops)))
        present = sorted(a[field] for a in assets if a[field] is not None)
        value = draw(st.sampled_from(present))
        return f"{field}{op}{value!r}", lambda a: a[field] is not None and ops[op](a[field], value)

    return build()


def text_condition(assets: list[dict[str, Any]]) -> st.SearchStrategy:
    @st.composite
    def build(draw: Any) -> tuple[str, Any]:
        asset = draw(st.sampled_from(assets))
        kind = draw(st.sampled_from(["symbol", "name~", "status", "source", "updated_at"]))
        if kind == "symbol":
            return f"symbol:{asset['symbol'].lower()}", lambda a: a["symbol"] == asset["symbol"]
        if kind == "name~":
            start = draw(st.integers(0, len(asset["name"]) - 1))
            # Conditions are stripped, as users expect from "active, symbol:btc".
            part = asset["name"][start : start + draw(st.integers(1, 4))].strip() or asset["name"][0]
            return f"name~{part}", lambda a: nocase(part) in nocase(a["name"])
        if kind == "status":
            return asset["status"], lambda a: a["status"] == asset["status"]
        if kind == "source":
            return "source:csv:sample", lambda a: "csv:sample" in a["listed"]
        return f"updated_at>={asset['updated_at']}", lambda a: a["updated_at"] >= asset["updated_at"]

    return build()


@st.composite
def valid_queries(draw: Any, assets: list[dict[str, Any]]) -> tuple[dict[str, str], list[str]]:
    conditions = draw(st.lists(st.one_of(number_condition(assets), text_condition(assets)), max_size=3))
    conditions = [c for c in conditions if "," not in c[0]]
    field = draw(st.sampled_from(["rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct",
                                  "symbol", "name", "updated_at"]))  # fmt: skip
    sort = draw(st.sampled_from([field, f"-{field}"]))
    page_size = draw(st.one_of(st.integers(1, 7), st.integers(8, 100)))
    matching = [a for a in assets if all(keep(a) for _, keep in conditions)]
    params = {"filter_by": ",".join(text for text, _ in conditions), "sort": sort, "page_size": str(page_size)}
    return params, expected_order(matching, sort)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_pages_and_cursors_visit_every_match_once_in_order(
    shared_client: Any, sample_assets: list[dict[str, Any]], data: Any
) -> None:
    params, expected = data.draw(valid_queries(sample_assets))
    page_size = int(params["page_size"])
    first = shared_client.get("/data", params=params).json
    assert first["total_items"] == len(expected)
    assert first["total_pages"] == -(-len(expected) // page_size)

    by_page = []
    for page in range(1, first["total_pages"] + 1):
        body = shared_client.get("/data", params={**params, "page": str(page)}).json
        assert body["page"] == page and len(body["data"]) <= page_size
        by_page += [a["asset_id"] for a in body["data"]]
    assert by_page == expected

    by_cursor, body = [], first
    while True:
        by_cursor += [a["asset_id"] for a in body["data"]]
        if body["next_cursor"] is None:
            break
        body = shared_client.get("/data", params={**params, "cursor": body["next_cursor"]}).json
        assert body["page"] is None
    assert by_cursor == expected


def test_a_bad_number_in_the_environment_is_a_clear_exit() -> None:
    with pytest.raises(SystemExit, match="KASPARRO_ETL_MAX_AGE must be a whole number from 1 to 10,000,000,000"):
        Config.from_env({"KASPARRO_ETL_MAX_AGE": "six hours"})


def test_request_ids_made_in_batches_are_distinct_canonical_uuid4s() -> None:
    ids = [new_request_id() for _ in range(3 * RequestIds.BATCH)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        made = uuid.UUID(text)
        assert (made.version, made.variant, str(made)) == (4, uuid.RFC_4122, text)


def test_a_forked_worker_makes_request_ids_of_its_own() -> None:
    """A batch made before a fork (a preloading server's workers) is not handed out again in the child."""
    ready = new_request_id.__self__._ready
    while not ready:  # a batch begun and not used up, whatever the tests before took of it
        new_request_id()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child, which must never return into the test session
        try:
            os.write(write, "\n".join(new_request_id() for _ in range(RequestIds.BATCH)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        in_child = set(pipe.read().decode().split())
    os.waitpid(child, 0)
    in_parent = {new_request_id() for _ in range(RequestIds.BATCH)}
    assert len(in_child) == RequestIds.BATCH and not in_child & in_parent


# --- reads on the loop: one queue, in the order asked for --------------------


def run_with_store(store_path: Path, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = Store(store_path, readers=1)
        await store.open()
        await store.watch()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def reading(order: list[str], name: str, also: Callable[[], None] = lambda: None) -> Callable[..., str]:
    def read(conn: sqlite3.Connection, version: kasparro.DataVersion) -> str:
        order.append(name)
        also()
        ((assets,),) = conn.execute("SELECT count(*) FROM asset").fetchall()
        return f"{name}:{assets}:{kasparro.REQUEST_ID.get()}"

    return read


def test_reads_on_the_loop_run_in_the_order_asked_for_each_in_its_requests_context(store_path: Path) -> None:
    async def body(store: Store) -> list[str]:
        order: list[str] = []

        async def request(name: str) -> str:
            kasparro.REQUEST_ID.set(f"id-{name}")
            return await store.read(reading(order, name), on_loop=True)

        results = await asyncio.gather(*(request(str(n)) for n in range(6)))
        assert order == [str(n) for n in range(6)]
        return results

    assert run_with_store(store_path, body) == [f"{n}:255:id-{n}" for n in range(6)]


@pytest.mark.parametrize(
    ("slice_seconds", "expected"), [(0.0, ["a", "other", "b", "c"]), (60.0, ["a", "b", "c", "other"])]
)
def test_reads_on_the_loop_let_the_loop_in_between_slices(
    monkeypatch: pytest.MonkeyPatch, store_path: Path, slice_seconds: float, expected: list[str]
) -> None:
    """Past LOOP_SLICE of reads, what the loop has ready (a new request, say) runs before the next read."""
    monkeypatch.setattr(kasparro, "LOOP_SLICE", slice_seconds)

    async def body(store: Store) -> list[str]:
        order: list[str] = []
        loop = asyncio.get_running_loop()
        first = reading(order, "a", also=lambda: loop.call_soon(order.append, "other"))
        await asyncio.gather(
            *(store.read(read, on_loop=True) for read in (first, reading(order, "b"), reading(order, "c")))
        )
        await asyncio.sleep(0)
        return order

    assert run_with_store(store_path, body) == expected


def test_a_read_on_the_loop_that_fails_fails_its_request_alone(store_path: Path) -> None:
    async def body(store: Store) -> list[Any]:
        order: list[str] = []

        def broken(conn: sqlite3.Connection, version: kasparro.DataVersion) -> str:
            raise ValueError("a bug in one read")

        def failing(conn: sqlite3.Connection, version: kasparro.DataVersion) -> str:
            conn.execute("SELECT * FROM no_such_table")
            return "unreachable"

        async def cancelled() -> None:
            task = asyncio.ensure_future(store.read(reading(order, "never"), on_loop=True))
            await asyncio.sleep(0)
            task.cancel()

        reads = [
            store.read(reading(order, "before"), on_loop=True),
            store.read(broken, on_loop=True),
            store.read(failing, on_loop=True),
            cancelled(),
        ]
        outcomes = await asyncio.gather(
            *reads, store.read(reading(order, "after"), on_loop=True), return_exceptions=True
        )
        assert order == ["before", "after"]  # the cancelled request's read never ran
        return outcomes

    before, broken, failing, cancelled, after = run_with_store(store_path, body)
    assert (before.split(":")[:2], cancelled, after.split(":")[:2]) == (["before", "255"], None, ["after", "255"])
    assert isinstance(broken, ValueError)
    assert isinstance(failing, sqlite3.OperationalError) and "no such table" in str(failing)  # a bug, not a fault


@pytest.mark.parametrize(("slice_seconds", "snapshots"), [(0.0, 3), (60.0, 1)])
def test_the_reads_on_the_loop_of_one_slice_share_one_read_transaction(
    monkeypatch: pytest.MonkeyPatch, store_path: Path, slice_seconds: float, snapshots: int
) -> None:
    monkeypatch.setattr(kasparro, "LOOP_SLICE", slice_seconds)

    def version_seen(conn: sqlite3.Connection, version: kasparro.DataVersion) -> Any:
        assert conn.in_transaction
        return version

    async def body(store: Store) -> list[Any]:
        return await asyncio.gather(*(store.read(version_seen, on_loop=True) for _ in range(3)))

    versions = run_with_store(store_path, body)
    assert len({id(version) for version in versions}) == snapshots  # each read transaction reads its version
    assert len(set(versions)) == 1


@pytest.mark.parametrize("on_loop", [True, False])
def test_one_read_runs_the_same_on_the_loop_or_in_a_reader_thread(store_path: Path, on_loop: bool) -> None:
    """Store.read is the one seam: the same plain function, in a read transaction, either way."""

    def read(conn: sqlite3.Connection, version: kasparro.DataVersion) -> tuple[Any, ...]:
        ((assets,),) = conn.execute("SELECT count(*) FROM asset").fetchall()
        return conn.in_transaction, version, assets, threading.current_thread() is threading.main_thread()

    async def body(store: Store) -> tuple[Any, ...]:
        commit = await store.watch()
        fault = sqlite3.DatabaseError("database disk image is malformed")
        fault.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]

        def broken(conn: sqlite3.Connection, version: kasparro.DataVersion) -> None:
            raise fault

        outcome = await store.read(read, on_loop=on_loop)
        with pytest.raises(kasparro.StoreUnavailable, match="malformed"):
            await store.read(broken, on_loop=on_loop)  # a store fault: the store is reopened later
        return (*outcome, commit.version)

    in_transaction, version, assets, on_main_thread, watched = run_with_store(store_path, body)
    assert (in_transaction, version, assets, on_main_thread) == (True, watched, 255, on_loop)
