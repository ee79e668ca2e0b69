"""Upstream HTTP sources, driven through the real etl.py CLI against local fake servers."""

from __future__ import annotations

import copy
import gzip
import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

import etl
from etl_support import ROOT, etl_against, etl_env, last_run, query, run_etl
from stores import read_only_uri
from upstream import (
    COINGECKO_MARKETS,
    COINPAPRIKA_TICKERS,
    Reply,
    coingecko_pages,
    load_fixture,
    paprika_tickers,
)

SAMPLE = ROOT / "data" / "sample.csv"
PAPRIKA = load_fixture("coinpaprika_tickers.json")
GECKO_PAGES = [load_fixture("coingecko_markets_page1.json"), load_fixture("coingecko_markets_page2.json")]


def events(result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def source_row(db: Path, source: str) -> dict[str, Any]:
    conn = sqlite3.connect(read_only_uri(db), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM run_source WHERE source = ? ORDER BY run_id DESC", (source,)).fetchone()
        return dict(row)
    finally:
        conn.close()


# --- paging, retries, budgets -------------------------------------------------


def test_coingecko_pages_until_a_short_page(upstream, tmp_path):
    coingecko_pages(upstream, GECKO_PAGES)
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stdout + result.stderr
    pages = [seen.query for seen in upstream.requests]
    assert [q["page"] for q in pages] == [["1"], ["2"]]
    assert all(q["vs_currency"] == ["usd"] and q["per_page"] == ["250"] for q in pages)
    assert query(db, "SELECT count(*) FROM source_map WHERE source = 'coingecko'") == [(287,)]
    btc = query(db, "SELECT symbol, name, rank, price_usd, updated_at FROM asset WHERE asset_id = 'bitcoin'")[0]
    first = GECKO_PAGES[0][0]
    assert btc[:4] == ("BTC", "Bitcoin", 1, first["current_price"])
    assert btc[4] == etl.parse_time(first["last_updated"])
    assert last_run(db)["status"] == "success"


def test_gzip_answers_are_decompressed(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=PAPRIKA, gzip=True))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == 0
    assert upstream.requests[0].headers["accept-encoding"] == "gzip"
    assert query(db, "SELECT count(*) FROM source_map WHERE source = 'coinpaprika'") == [(len(PAPRIKA),)]


def test_429_with_retry_after_then_success(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(429, {"error": "slow down"}, {"Retry-After": "1"}), Reply(body=PAPRIKA))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coinpaprika")
    assert result.returncode == 0
    (retry,) = [e for e in events(result) if e["event"] == "retrying"]
    assert (retry["problem"], retry["wait_s"]) == ("HTTP 429", 1.0)
    assert len(upstream.requests) == 2
    assert last_run(db)["rows_loaded"] == len(PAPRIKA)


def test_500_twice_then_success(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(500, "boom"), Reply(502, "bad gateway"), Reply(body=PAPRIKA))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coinpaprika")
    assert result.returncode == 0
    assert [e["problem"] for e in events(result) if e["event"] == "retrying"] == ["HTTP 500", "HTTP 502"]
    assert last_run(db)["status"] == "success"


def test_a_4xx_is_not_retried(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(401, {"error": "invalid api key"}))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == etl.EXIT_FAILED
    assert len(upstream.requests) == 1
    assert "answered HTTP 401" in source_row(db, "coinpaprika")["error"]


def test_a_read_timeout_beyond_the_budget_fails_the_source_and_keeps_old_data(upstream, tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    before = query(db, "SELECT * FROM asset ORDER BY asset_id")
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=PAPRIKA, delay=30))
    result = etl_against(upstream, db, "coinpaprika", KASPARRO_HTTP_TIMEOUT="0.3", KASPARRO_HTTP_BUDGET="1")
    assert result.returncode == etl.EXIT_FAILED
    row = source_row(db, "coinpaprika")
    assert row["status"] == "failed"
    assert "no answer within 0.3 s" in row["error"]
    assert "budget" in row["error"] or "attempts" in row["error"]
    assert last_run(db)["status"] == "failed"
    assert query(db, "SELECT * FROM asset ORDER BY asset_id") == before


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        # a complete response holding half a document
        (Reply(body=json.dumps(PAPRIKA)[:5000]), "not valid JSON: it ends early, in 5,000 bytes"),
        # the connection drops before Content-Length is reached, at every attempt
        (Reply(body=PAPRIKA, truncate=5000), "the connection closed after 5,000 of"),
    ],
    ids=["truncated-json", "truncated-body"],
)
def test_truncated_json_fails_the_source_clearly(upstream, tmp_path, reply, reason):
    upstream.route(COINPAPRIKA_TICKERS, reply)
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == etl.EXIT_FAILED
    error = source_row(db, "coinpaprika")["error"]
    assert reason in error
    assert query(db, "SELECT count(*) FROM source_map") == [(0,)]


def test_not_an_array_fails_the_source(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(body={"status": {"error_code": 10005, "error_message": "plan"}}))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == etl.EXIT_FAILED
    assert "expected a JSON array of records, got an object" in source_row(db, "coinpaprika")["error"]


def test_records_of_other_json_types_are_rejected_naming_the_type_in_jsons_words(upstream, tmp_path):
    """They were named by Python's types: 'expected a JSON object, got NoneType' for a null, dict for an object."""
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=[None, 1, 2.5, "x", [1], True]))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == etl.EXIT_OK
    kinds = ["null", "a number", "a number", "a string", "an array", "true"]
    expected = [(n, f"expected a JSON object, got {kind}") for n, kind in enumerate(kinds, start=1)]
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == expected


def test_a_refused_connection_names_the_address_with_its_port_in_plain_words(tmp_path):
    """It read 'http://127.0.0.1/...: ConnectionRefusedError: [Errno 111] Connection refused after 5 attempts': the
    port asked (9) dropped from the address, and the problem in Python's words."""
    db = tmp_path / "store.db"
    assert run_etl(db, "coinpaprika").returncode == etl.EXIT_FAILED  # etl_env points it at 127.0.0.1:9
    assert source_row(db, "coinpaprika")["error"] == (
        "http://127.0.0.1:9/v1/tickers: connection refused after 5 attempts"
    )


def test_an_empty_list_fails_the_source_and_loads_nothing(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=[]))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == etl.EXIT_FAILED
    assert "returned no records" in source_row(db, "coinpaprika")["error"]


# --- schema drift ---------------------------------------------------------------


def test_a_renamed_optional_field_is_drift_and_the_records_load(upstream, tmp_path):
    renamed = copy.deepcopy(GECKO_PAGES[1])
    for record in renamed:
        record["price"] = record.pop("current_price")
    coingecko_pages(upstream, [renamed], per_page=250)
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0
    row = source_row(db, "coingecko")
    assert row["status"] == "success"
    assert json.loads(row["drift"]) == {"unknown field 'price'": 37, "missing field 'current_price'": 37}
    assert query(db, "SELECT count(*), count(price_usd) FROM asset") == [(37, 0)]
    (drift,) = [e for e in events(result) if e["event"] == "schema drift"]
    assert drift["drift"]["unknown field 'price'"] == 37


def test_a_renamed_required_field_rejects_the_records(upstream, tmp_path):
    renamed = copy.deepcopy(PAPRIKA)
    for record in renamed[:5]:
        record["ticker"] = record.pop("symbol")
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=renamed))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == 0
    row = source_row(db, "coinpaprika")
    assert (row["status"], row["rows_loaded"], row["rows_rejected"]) == ("partial", len(PAPRIKA) - 5, 5)
    assert json.loads(row["drift"]) == {"unknown field 'ticker'": 5}
    rejects = query(db, "SELECT line, reason FROM reject ORDER BY line")
    assert rejects == [(n, "missing required field 'symbol'") for n in range(1, 6)]


# --- identity, history, isolation -------------------------------------------------


def test_the_same_coins_from_three_sources_are_one_asset_each(upstream, tmp_path):
    paprika_tickers(upstream, PAPRIKA)
    coingecko_pages(upstream, GECKO_PAGES)
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika", "coingecko", f"csv:{SAMPLE}").returncode == 0
    sources = dict(query(db, "SELECT asset_id, sources FROM asset"))
    everywhere = json.dumps(["coingecko", "coinpaprika", "csv:sample"], separators=(",", ":"))
    for asset_id in ("bitcoin", "ethereum", "usdc"):
        assert sources[asset_id] == everywhere, asset_id
    assert query(db, "SELECT asset_id, sources FROM asset WHERE symbol = 'USDC' ORDER BY rank") == [
        ("usdc", everywhere),
        ("bridged-usdc-polygon-pos-bridge", '["coingecko","csv:sample"]'),
    ]
    assert query(db, "SELECT source, source_id FROM source_map WHERE asset_id = 'bitcoin' ORDER BY source") == [
        ("coingecko", "bitcoin"),
        ("coinpaprika", "btc-bitcoin"),
        ("csv:sample", "bitcoin"),
    ]
    for symbol in ("SOL", "WETH"):
        assert query(db, "SELECT count(*) FROM asset WHERE symbol = ?", (symbol,)) == [(2,)]


def test_an_unmoved_last_updated_is_not_stored_again(upstream, tmp_path):
    paprika_tickers(upstream, PAPRIKA)
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == 0
    version = query(db, "SELECT generation FROM store_meta")
    assert etl_against(upstream, db, "coinpaprika").returncode == 0
    assert last_run(db)["rows_loaded"] == 0
    assert query(db, "SELECT count(*) FROM raw_observation") == [(len(PAPRIKA),)]
    assert query(db, "SELECT generation FROM store_meta") == version


def test_one_failing_source_keeps_the_others_data(upstream, tmp_path):
    paprika_tickers(upstream, PAPRIKA)
    upstream.route(COINGECKO_MARKETS, Reply(503, "maintenance"))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coinpaprika", "coingecko", KASPARRO_HTTP_BUDGET="2")
    assert result.returncode == 0
    run = last_run(db)
    assert run["status"] == "partial"
    assert run["error"].startswith("coingecko: ")
    assert source_row(db, "coinpaprika")["status"] == "success"
    assert source_row(db, "coingecko")["status"] == "failed"
    assert query(db, "SELECT count(*) FROM asset") == [(len(PAPRIKA),)]
    (summary,) = [e for e in events(result) if e["event"] == "run finished"]
    assert summary["sources"]["coingecko"]["status"] == "failed"
    assert summary["sources"]["coinpaprika"]["rows_loaded"] == len(PAPRIKA)


# --- keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "header"), [("demo", "x-cg-demo-api-key"), ("pro", "x-cg-pro-api-key")], ids=["demo", "pro"]
)
def test_keys_go_in_their_headers_and_never_in_logs_or_the_store(upstream, tmp_path, plan, header):
    paprika_tickers(upstream, PAPRIKA)
    coingecko_pages(upstream, GECKO_PAGES)
    gecko_key, paprika_key = f"cg-{plan}-secret-1234", "paprika-secret-5678"
    db = tmp_path / "store.db"
    result = etl_against(
        upstream,
        db,
        "coingecko",
        "coinpaprika",
        COINGECKO_API_KEY=gecko_key,
        KASPARRO_COINGECKO_PLAN=plan,
        COINPAPRIKA_API_KEY=paprika_key,
        LOG_LEVEL="debug",
    )
    assert result.returncode == 0
    gecko = [r for r in upstream.requests if r.path == COINGECKO_MARKETS]
    paprika = [r for r in upstream.requests if r.path == COINPAPRIKA_TICKERS]
    assert all(r.headers.get(header) == gecko_key for r in gecko)
    assert all(r.headers.get("authorization") == paprika_key for r in paprika)
    for secret in (gecko_key, paprika_key):
        assert secret not in result.stdout + result.stderr
        assert secret.encode() not in db.read_bytes()


def test_keys_are_absent_from_captured_log_events(upstream, tmp_path):
    upstream.route(COINPAPRIKA_TICKERS, Reply(500, "boom"), Reply(body=PAPRIKA))
    env = etl_env(
        KASPARRO_COINPAPRIKA_URL=upstream.base_url, COINPAPRIKA_API_KEY="paprika-secret-5678", LOG_LEVEL="debug"
    )
    config = etl.EtlConfig.from_env(env)
    etl.configure_logging("debug")  # as main() does; other tests may have set a stricter level
    with capture_logs() as logs:
        assert etl.run(tmp_path / "store.db", [etl.parse_source("coinpaprika", config)], config) == 0
    assert {e["event"] for e in logs} >= {"run started", "retrying", "page loaded", "run finished"}
    assert "paprika-secret-5678" not in repr(logs)


# --- raw payloads ---------------------------------------------------------------------


def test_raw_payloads_are_kept_bounded_and_replayable(upstream, tmp_path):
    coingecko_pages(upstream, GECKO_PAGES)
    db = tmp_path / "store.db"
    for _ in range(3):
        assert etl_against(upstream, db, "coingecko", KASPARRO_RAW_KEEP_RUNS="2").returncode == 0
    kept = query(db, "SELECT run_id, page, url, body FROM raw_payload ORDER BY run_id, page")
    assert [(run, page) for run, page, _, _ in kept] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert json.loads(gzip.decompress(kept[0][3])) == GECKO_PAGES[0]
    assert "page=1" in kept[0][2]

    replayed = tmp_path / "replayed.db"
    with sqlite3.connect(db) as source, sqlite3.connect(replayed) as target:
        source.backup(target)
    with sqlite3.connect(replayed) as conn:
        conn.executescript("DELETE FROM raw_observation; DELETE FROM candle; DELETE FROM open_candle;")
    result = run_etl(replayed, "replay:coingecko@3")
    assert result.returncode == 0, result.stdout
    assert last_run(replayed)["rows_loaded"] == 287
    assert len(upstream.requests) == 6  # the replay fetched nothing
    assets = "SELECT * FROM asset ORDER BY asset_id"
    assert query(replayed, assets) == query(db, assets)


def test_replay_of_a_run_without_payloads_is_a_usage_error_before_anything_is_written(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    result = run_etl(db, "replay:coinpaprika@1")
    assert result.returncode == etl.EXIT_USAGE
    assert "run 1 kept no raw payload of coinpaprika" in result.stderr
    assert query(db, "SELECT count(*) FROM etl_run") == [(1,)]


@pytest.mark.parametrize("spec", ["replay:coingecko", "replay:binance@1", "coinpaprika:x", "csv:"])
def test_bad_source_specs_are_usage_errors(tmp_path, spec):
    assert run_etl(tmp_path / "x.db", spec).returncode == etl.EXIT_USAGE


def test_the_loopback_guard_refuses_other_hosts():
    with socket.socket() as sock, pytest.raises(AssertionError, match=r"outside 127\.0\.0\.1"):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed, and never reached
