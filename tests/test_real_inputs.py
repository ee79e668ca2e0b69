"""What users and upstreams really send (issue 14, ETL part): values, identity, time, input hygiene, indexes, pacing.

Each test feeds the real etl.py small inputs in the real file or upstream formats and checks the
store, the run record and, where it shows, the API's answer.
"""

from __future__ import annotations

import codecs
import copy
import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import etl_against, last_run, query, run_etl, start_etl, wait_for_event, write_csv
from kasparro import Config
from stores import read_only_uri
from upstream import (
    COINGECKO_MARKETS,
    FIXTURES,
    Reply,
    coingecko_pages,
    load_fixture,
    paprika_tickers,
)

HEADER = "id,symbol,name,rank,price_usd,market_cap_usd,volume_24h_usd,change_24h_pct,status,last_updated\n"
HODL = load_fixture("coingecko_markets_hodl.json")
UNRANKED = load_fixture("coinpaprika_tickers_unranked.json")
GECKO_PAGE1 = load_fixture("coingecko_markets_page1.json")
GECKO_PAGE2 = load_fixture("coingecko_markets_page2.json")
FUTURE_REASON = "in the future (later than the run's start + 5 min)"


def outcome(db: Path, source: str) -> dict[str, Any]:
    """The newest run_source row of a source, drift decoded."""
    conn = sqlite3.connect(read_only_uri(db), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = dict(conn.execute("SELECT * FROM run_source WHERE source = ? ORDER BY run_id DESC", (source,)).fetchone())
    finally:
        conn.close()
    row["drift"] = json.loads(row["drift"]) if row["drift"] else {}
    return row


def counts(run: dict[str, Any]) -> tuple:
    return run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]


def events(result, name: str) -> list[dict[str, Any]]:
    return [e for e in map(json.loads, result.stdout.splitlines()) if e["event"] == name]


def api_get(make_client: Any, db: Path, path: str, **params: str) -> Any:
    client = make_client(Config(db=db, reopen_interval=0, log_level="warning"))
    return client.get(path, params=params)


def indexes(db: Path) -> set[str]:
    return {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


# --- 1. optional fields never void a record -------------------------------------------------------


def test_an_unranked_paprika_ticker_loads_and_bad_optional_values_become_null(upstream, tmp_path, make_client):
    paprika_tickers(upstream, UNRANKED)
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coinpaprika")
    assert result.returncode == 0, result.stdout + result.stderr
    assert counts(last_run(db)) == ("success", 3, 3, 0)
    listings = query(
        db,
        "SELECT source_id, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct FROM source_map"
        " ORDER BY source_id",
    )
    assert listings == [
        ("bad-badvalues", None, None, None, None, None),
        ("hodl-hodl", None, 0.0411, None, 1190000.0, -2.05),
        ("hodl-hodl-meme", None, 0.0000073, None, 8100.0, 14.2),
    ]
    assert outcome(db, "coinpaprika")["drift"] == {
        "invalid field 'rank': not a whole number": 1,
        "invalid field 'quotes.USD.price': negative, expected >= 0": 1,
        "invalid field 'quotes.USD.market_cap': out of bounds 0 to 1e+18": 1,
        "invalid field 'quotes.USD.percent_change_24h': out of bounds -100 to 1e+09": 1,
        f"invalid field 'last_updated': {FUTURE_REASON}": 1,
    }
    answer = api_get(make_client, db, "/data/hodl")
    assert answer.status_code == 200
    assert (answer.json["rank"], answer.json["price_usd"], answer.json["market_cap_usd"]) == (None, 0.0411, None)


def test_csv_placeholders_are_null_and_unreadable_values_reject_quoting_them(tmp_path):
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{FIXTURES / 'markets_placeholders.csv'}")
    assert result.returncode == 0, result.stderr
    assert counts(last_run(db)) == ("partial", 10, 4, 6)
    assets = query(
        db,
        "SELECT asset_id, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct, status FROM asset"
        " ORDER BY asset_id",
    )
    assert assets == [
        ("bitcoin", 1, 95240.12, None, None, -3.22, "active"),
        ("dogecoin", 9, None, None, None, None, "active"),
        ("ethereum", None, 3512.48, None, None, None, "active"),
        ("tether", None, 1.0001, None, None, None, "active"),
    ]
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == [
        (6, "price_usd: not a number: 'abc'"),
        (7, "market_cap_usd: negative, expected >= 0: '-5'"),
        (8, "rank: not a whole number: '13.5'"),
        (9, "volume_24h_usd: not finite: 'inf'"),
        (10, "status: expected active or inactive: 'maybe'"),
        (11, "symbol: missing (placeholder 'N/A')"),
    ]
    # A number out of its field's bounds is not a type error: null, and counted.
    assert outcome(db, "csv:markets_placeholders")["drift"] == {
        "invalid field 'change_24h_pct': out of bounds -100 to 1e+09": 1
    }


def test_coingecko_nulls_and_zero_market_cap_are_null(upstream, tmp_path):
    coingecko_pages(upstream, [HODL])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert query(db, "SELECT rank, market_cap_usd, price_usd FROM source_map WHERE source_id = 'hodl-meme'") == [
        (None, None, 0.00000731)
    ]
    assert outcome(db, "coingecko")["drift"] == {}


# --- 2. a source's own distinct ids are distinct assets --------------------------------------------


def test_two_coingecko_ids_with_one_symbol_and_name_are_two_assets(upstream, tmp_path, make_client):
    coingecko_pages(upstream, [HODL])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert query(db, "SELECT source_id, asset_id FROM source_map ORDER BY source_id") == [
        ("hodl", "hodl"),
        ("hodl-meme", "hodl-hodl"),
    ]
    rows = query(db, "SELECT asset_id, rank, price_usd, market_cap_usd FROM asset ORDER BY asset_id")
    assert rows == [("hodl", 812, 0.0412, 41200000.0), ("hodl-hodl", None, 0.00000731, None)]
    listed = api_get(make_client, db, "/data", filter_by="symbol:HODL", sort="-price_usd").json["data"]
    assert [(a["asset_id"], a["price_usd"]) for a in listed] == [("hodl", 0.0412), ("hodl-hodl", 0.00000731)]


def test_a_later_id_with_a_known_symbol_and_name_is_a_new_asset_across_runs(upstream, tmp_path):
    upstream.route(COINGECKO_MARKETS, Reply(body=HODL[:1]), Reply(body=HODL))
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert query(db, "SELECT source_id, asset_id FROM source_map ORDER BY source_id") == [
        ("hodl", "hodl"),
        ("hodl-meme", "hodl-hodl"),
    ]
    assert query(db, "SELECT count(*) FROM asset") == [(2,)]


def test_symbol_and_name_join_one_listing_of_a_source_to_another_sources_asset(upstream, tmp_path):
    paprika_tickers(upstream, UNRANKED[:1])  # hodl-hodl: HODL "HODL"
    coingecko_pages(upstream, [HODL])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika", "coingecko").returncode == 0
    assert query(db, "SELECT source, source_id, asset_id FROM source_map ORDER BY source, source_id") == [
        ("coingecko", "hodl", "hodl"),  # the first of the page joins CoinPaprika's coin
        ("coingecko", "hodl-meme", "hodl-hodl"),
        ("coinpaprika", "hodl-hodl", "hodl"),
    ]


def test_two_paprika_ids_and_two_csv_ids_with_one_symbol_and_name_are_two_assets_each(upstream, tmp_path):
    paprika_tickers(upstream, UNRANKED[:2])
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "hodl,HODL,HODL,,1,,,,,\nhodl-2,HODL,HODL,,2,,,,,\n")
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika", f"csv:{feed}").returncode == 0
    assert query(db, "SELECT source, source_id, asset_id FROM source_map ORDER BY source, source_id") == [
        ("coinpaprika", "hodl-hodl", "hodl"),
        ("coinpaprika", "hodl-hodl-meme", "hodl-hodl"),
        ("csv:feed", "hodl", "hodl"),
        ("csv:feed", "hodl-2", "hodl-hodl"),
    ]


# --- 3. a future observation time ---------------------------------------------------------------------


def test_a_future_csv_row_is_rejected_quoting_its_time(tmp_path):
    feed = tmp_path / "feed.csv"
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,1,95000,1,1,1,active,2062-11-25T12:00:00Z\n"
        + "ethereum,ETH,Ethereum,2,3500,1,1,1,active,2026-11-25T12:00:00Z\n"
    )
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT line, reason FROM reject") == [
        (2, f"observed_at: {FUTURE_REASON}: '2062-11-25T12:00:00Z'")
    ]
    assert query(db, "SELECT asset_id FROM asset") == [("ethereum",)]


def test_a_future_upstream_time_takes_the_fetch_time(upstream, tmp_path):
    record = {**HODL[0], "last_updated": "2062-11-25T12:00:00.000Z"}
    coingecko_pages(upstream, [[record]])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    run = last_run(db)
    (observed,) = query(db, "SELECT strftime('%Y-%m-%dT%H:%M:%SZ', observed_at, 'unixepoch') FROM raw_observation")[0]
    assert run["started_at"] <= observed <= run["ended_at"]
    assert outcome(db, "coingecko")["drift"] == {f"invalid field 'last_updated': {FUTURE_REASON}": 1}


def test_a_store_pinned_by_a_future_time_moves_back(upstream, tmp_path, make_client):
    """A store an older etl.py filled with a future time: current quotes win, and a corrected file replaces it."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,1,1,1,1,active,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    with sqlite3.connect(db) as conn:  # what the typo made of it before future times were refused
        conn.execute("UPDATE source_map SET observed_at = '2062-11-25T12:00:00Z', price_usd = 1")
        conn.execute("UPDATE raw_observation SET observed_at = unixepoch('2062-11-25T12:00:00Z')")
        conn.execute("UPDATE asset SET updated_at = '2062-11-25T12:00:00Z'")
    bitcoin = next(r for r in GECKO_PAGE1 if r["id"] == "bitcoin")
    coingecko_pages(upstream, [[bitcoin]])
    assert etl_against(upstream, db, "coingecko").returncode == 0
    expected_time = etl.parse_time(bitcoin["last_updated"])
    assert query(db, "SELECT price_usd, updated_at FROM asset WHERE asset_id = 'bitcoin'") == [
        (bitcoin["current_price"], expected_time)
    ]
    feed.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,95000,1,1,1,active,2026-11-25T12:00:00Z\n")  # corrected
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT price_usd, observed_at FROM source_map WHERE source = 'csv:feed'") == [
        (95000.0, "2026-11-25T12:00:00Z")
    ]
    answer = api_get(make_client, db, "/data/bitcoin").json
    assert (answer["price_usd"], answer["updated_at"]) == (bitcoin["current_price"], expected_time)


# --- 4. Unix seconds and milliseconds -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("1764072000000", "2025-11-25T12:00:00Z"),
        ("1764072000", "2025-11-25T12:00:00Z"),
        ("1764072000.75", "2025-11-25T12:00:00Z"),
        ("1764072000123.5", "2025-11-25T12:00:00Z"),
        ("1.764072e9", "2025-11-25T12:00:00Z"),
        ("2026-11-25T12:00:00.123456789Z", "2026-11-25T12:00:00Z"),
        ("2026-11-25 14:00:00+02:00", "2026-11-25T12:00:00Z"),
    ],
)
def test_times_are_rfc3339_or_unix_seconds_or_milliseconds(text, stored):
    assert etl.parse_time(text) == stored


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1764072000000000", "a Unix time in micro- or nanoseconds, expected seconds or milliseconds"),
        ("1764072000000000000", "a Unix time in micro- or nanoseconds, expected seconds or milliseconds"),
        ("2026", "before 2009-01-03, Bitcoin's genesis block (read as Unix seconds)"),
        ("20261125", "before 2009-01-03, Bitcoin's genesis block (read as Unix seconds)"),
        ("25/11/2026", "not an RFC 3339 time or Unix seconds or milliseconds"),
        ("2026-W48-3", "an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z"),
        ("2026-11-25T12:00:00,5Z", "an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z"),
        ("2026-11-25T12:00:00 Z", "an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z"),
    ],
)
def test_other_times_are_refused_clearly(text, problem):
    with pytest.raises(etl.ValueProblem, match=f"^{problem}$".replace("(", r"\(").replace(")", r"\)")):
        etl.parse_time(text)


def test_unix_times_in_a_csv_load_and_sub_second_units_are_rejected(tmp_path):
    feed = tmp_path / "export.csv"
    feed.write_text(
        "timestamp,symbol,name,price\n"
        "1764072000000,BTC,Bitcoin,95000\n"
        "1764072000,ETH,Ethereum,3500\n"
        "1764072000000000,SOL,Solana,140\n"
    )
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT symbol, updated_at FROM asset ORDER BY symbol") == [
        ("BTC", "2025-11-25T12:00:00Z"),
        ("ETH", "2025-11-25T12:00:00Z"),
    ]
    assert query(db, "SELECT line, reason FROM reject") == [
        (4, "observed_at: a Unix time in micro- or nanoseconds, expected seconds or milliseconds: '1764072000000000'")
    ]


# --- 5. a header row repeated in the body ---------------------------------------------------------------


def test_repeated_header_rows_are_skipped_and_counted(tmp_path):
    part = HEADER + "bitcoin,BTC,Bitcoin,1,95000,1,1,1,active,2026-11-25T12:00:00Z\n"
    second = HEADER + "ethereum,ETH,Ethereum,2,3500,1,1,1,active,2026-11-25T12:00:00Z\n"
    feed = tmp_path / "concatenated.csv"  # `cat a.csv b.csv c.csv`, the last saved with a BOM
    third = HEADER.upper().replace(",", ", ") + "solana,SOL,Solana,5,140,1,1,1,active,2026-11-25T12:00:00Z\n"
    feed.write_bytes(part.encode() + second.encode() + "\ufeff".encode() + third.encode())
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0
    assert query(db, "SELECT asset_id, symbol FROM asset ORDER BY asset_id") == [
        ("bitcoin", "BTC"),
        ("ethereum", "ETH"),
        ("solana", "SOL"),
    ]
    assert query(db, "SELECT count(*) FROM asset WHERE name = 'name' OR symbol = 'SYMBOL'") == [(0,)]
    row = outcome(db, "csv:concatenated")
    assert (row["status"], row["rows_read"], row["rows_rejected"]) == ("success", 3, 0)
    assert row["detail"] == "skipped 2 repeated header rows (line 3, 5)"
    (summary,) = events(result, "run finished")
    assert summary["sources"]["csv:concatenated"]["detail"] == row["detail"]


# --- 6. source names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "specs",
    [
        ("csv:{a}/markets.csv", "csv:{b}/markets.csv"),
        ("coingecko", "coingecko"),
        ("coingecko", "replay:coingecko@1"),
        ("csv:x={a}/markets.csv", "csv:x={b}/markets.csv"),
        ("csv:{a}/markets.csv", "csv:Markets={b}/markets.csv"),
    ],
)
def test_two_sources_with_one_name_are_a_usage_error_naming_both(tmp_path, specs):
    """Named with csv:NAME=PATH where they are CSV files; two of one upstream are told that it loads once a run
    (they were told to use csv:NAME=PATH, which names no upstream)."""
    for day in ("a", "b"):
        (tmp_path / day).mkdir()
        (tmp_path / day / "markets.csv").write_text(HEADER)
    specs = [spec.format(a=tmp_path / "a", b=tmp_path / "b") for spec in specs]
    db = tmp_path / "store.db"
    result = run_etl(db, *specs)
    assert result.returncode == etl.EXIT_USAGE
    assert specs[0] in result.stderr and specs[1] in result.stderr
    csv = specs[0].startswith("csv:")
    assert ("csv:NAME=PATH" in result.stderr, "an upstream loads once a run" in result.stderr) == (csv, not csv)
    assert not db.exists()


def test_csv_name_equals_path_names_a_source(tmp_path, make_client):
    for day, price in (("2026-11-24", 94000), ("2026-11-25", 95000)):
        (tmp_path / day).mkdir()
        (tmp_path / day / "markets.csv").write_text(
            HEADER + f"bitcoin,BTC,Bitcoin,1,{price},1,1,1,active,{day}T12:00:00Z\n"
        )
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:nov24={tmp_path}/2026-11-24/markets.csv", f"csv:nov25={tmp_path}/2026-11-25/markets.csv")
    assert result.returncode == 0, result.stderr
    assert query(db, "SELECT source FROM run_source ORDER BY source") == [("csv:nov24",), ("csv:nov25",)]
    answer = api_get(make_client, db, "/data", filter_by="source:csv:nov24").json
    assert [(a["asset_id"], a["sources"], a["price_usd"]) for a in answer["data"]] == [
        ("bitcoin", ["csv:nov24", "csv:nov25"], 95000.0)
    ]


def test_a_path_with_an_equals_sign_stays_a_path(tmp_path):
    feed = tmp_path / "a=b.csv"
    feed.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,1,1,1,1,active,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT source FROM run_source") == [("csv:a=b",)]


# --- 6b. paging ----------------------------------------------------------------------------------------------


def gecko_page(tag: str) -> list[dict[str, Any]]:
    """GECKO_PAGE1's 250 coins as other coins: each id, symbol and name marked with `tag`."""
    page = copy.deepcopy(GECKO_PAGE1)
    for coin in page:
        coin.update(id=f"{coin['id']}-{tag}", symbol=f"{coin['symbol']}{tag}", name=f"{coin['name']} {tag}")
    return page


def test_an_upstream_that_ignores_page_is_read_once_and_said(upstream, tmp_path):
    upstream.route(COINGECKO_MARKETS, Reply(body=GECKO_PAGE1))  # page 1 whatever `page` asks
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert len(upstream.requests) == 2  # page 2 was page 1 again: no page 3 asked
    row = outcome(db, "coingecko")
    assert (row["status"], row["rows_read"], row["rows_loaded"], row["rows_rejected"]) == ("success", 250, 250, 0)
    assert "page 2 held only listings read from earlier pages" in row["detail"]
    assert query(db, "SELECT count(*) FROM listing") == [(250,)]


def test_a_later_page_repeating_earlier_ones_ends_the_paging(upstream, tmp_path):
    first, second = GECKO_PAGE1, gecko_page("b")
    mixed = first[:100] + second[100:]  # every coin read before, from two pages
    coingecko_pages(upstream, [first, second, mixed, gecko_page("d")])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert len(upstream.requests) == 3
    row = outcome(db, "coingecko")
    assert (row["rows_read"], row["rows_loaded"]) == (500, 500)
    assert row["detail"].startswith("page 3 held only listings read from earlier pages")


def test_coins_moving_between_pages_keep_the_paging_going(upstream, tmp_path):
    first, second = GECKO_PAGE1, gecko_page("b")
    moved = [first[-1], *second[:-1]]  # the market moved between requests: page 1's last coin is page 2's first
    coingecko_pages(upstream, [first, moved, second[-1:]])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko").returncode == 0
    assert len(upstream.requests) == 3  # the short page 3 ended it
    row = outcome(db, "coingecko")
    assert (row["rows_read"], row["detail"]) == (501, None)
    assert query(db, "SELECT count(*) FROM listing") == [(500,)]


def test_a_load_stopped_by_the_page_limit_says_so(upstream, tmp_path):
    coingecko_pages(upstream, [GECKO_PAGE1, gecko_page("b"), gecko_page("c")])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko", KASPARRO_COINGECKO_MAX_PAGES="2").returncode == 0
    assert len(upstream.requests) == 2
    row = outcome(db, "coingecko")
    assert (row["status"], row["rows_read"], row["rows_loaded"]) == ("success", 500, 500)
    limit = "stopped at the page limit, 2 pages (KASPARRO_COINGECKO_MAX_PAGES): more listings may follow"
    assert row["detail"] == limit


# --- 7. indexes ----------------------------------------------------------------------------------------------


def test_a_capped_coingecko_load_leaves_every_index(upstream, tmp_path):
    assert len(GECKO_PAGE1) == 250  # a full page: more would follow
    coingecko_pages(upstream, [GECKO_PAGE1, GECKO_PAGE1])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko", KASPARRO_COINGECKO_MAX_PAGES="1").returncode == 0
    assert len(upstream.requests) == 1
    assert indexes(db) == set(etl.schema_indexes())
    plan = query(db, "EXPLAIN QUERY PLAN SELECT * FROM asset ORDER BY rank, asset_id LIMIT 10")
    assert any("asset_rank_covering" in row[-1] for row in plan)


def test_a_load_failing_midway_leaves_every_index(upstream, tmp_path):
    upstream.route(COINGECKO_MARKETS, Reply(body=GECKO_PAGE1), match=lambda q: q.get("page") == ["1"])
    upstream.route(COINGECKO_MARKETS, Reply(500, "boom"))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko", KASPARRO_HTTP_BUDGET="1")
    assert result.returncode == etl.EXIT_FAILED
    assert outcome(db, "coingecko")["rows_loaded"] == 250
    assert indexes(db) == set(etl.schema_indexes())


def test_a_first_load_says_it_built_the_indexes_not_that_it_restored_them(tmp_path):
    """A fresh store's first run logged 'indexes restored', as if a killed run had left it broken."""
    feed = write_csv(tmp_path / "feed.csv", 300)
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert events(result, "indexes restored") == []
    (built,) = events(result, "indexes built")
    assert built["indexes"] == sorted(etl.sort_indexes()) and built["source"] == "csv:feed"
    assert indexes(db) == set(etl.schema_indexes())


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_load_leaves_the_indexes_to_the_start_of_the_next_run(tmp_path, stop):
    feed = write_csv(tmp_path / "big.csv", 30_000)
    db = tmp_path / "store.db"
    proc = start_etl(db, f"csv:{feed}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="10000")
    wait_for_event(proc, "batch committed")
    proc.send_signal(stop)
    proc.communicate()
    assert indexes(db) < set(etl.schema_indexes())  # the bulk load had dropped the sort indexes
    other = tmp_path / "other.csv"
    other.write_text(HEADER)
    result = run_etl(db, f"csv:{other}")
    (restored,) = events(result, "indexes restored")
    assert restored["indexes"] == sorted(etl.sort_indexes())
    assert indexes(db) == set(etl.schema_indexes())


# --- encodings, delimiters, reasons ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "bom"), [("utf-16", b""), ("utf-16-be", codecs.BOM_UTF16_BE), ("utf-32", b"")], ids=str
)
def test_utf16_and_utf32_with_a_bom_are_decoded(tmp_path, encoding, bom):
    rows = "bitcoin,BTC,Bitcoin,1,95000,1,1,1,active,2026-11-25T12:00:00Z\r\nbnb,BNB,Bínance Cöin,4,650,,,,,\r\n"
    text = HEADER + rows
    feed = tmp_path / "excel.csv"
    feed.write_bytes(bom + text.encode(encoding))  # Python's utf-16 and utf-32 write their own BOM
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT name FROM asset ORDER BY rank") == [("Bitcoin",), ("Bínance Cöin",)]
    assert last_run(db)["status"] == "success"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            (HEADER + "btc,BTC,Bitcoin,1,1,1,1,1,active,\nltc,LTC,Lïtecoin,2,1,1,1,1,active,\n").encode("latin-1"),
            "line 3 is not UTF-8: byte 0xef at byte 10 of the line (Windows-1252 or Latin-1?);"
            " save the file as UTF-8, or UTF-16 with a byte-order mark",
        ),
        (
            (HEADER + "bitcoin,BTC,Bitcoin,1,1,1,1,1,active,\n").encode("utf-16-le"),
            "the header holds NUL bytes: is it UTF-16 without a byte-order mark? Save it as UTF-8",
        ),
        (
            "\ufeff".encode("utf-16-le") + HEADER.encode("utf-16-le") + b"\x00\xd8" + "x,\n".encode("utf-16-le"),
            "line 2 is not valid UTF-16: illegal UTF-16 surrogate",
        ),
        (
            (HEADER + "bitcoin,BTC,Bitcoin,1,1,1,1,1,active,\n").replace("\n", "\r").encode(),
            "unreadable header: a line break (CR) inside an unquoted field:"
            " old Mac line ends or a stray CR; line ends must be LF or CRLF",
        ),
        (
            b"id;symbol;name;price_usd\nbitcoin;BTC;Bitcoin;95000,12\n",
            "the file looks semicolon (;)-delimited: its header is one column 'id;symbol;name;price_usd';"
            " only comma-separated files are read",
        ),
    ],
    ids=["latin-1", "utf-16-without-bom", "broken-utf-16", "cr-line-ends", "semicolons"],
)
def test_unreadable_files_fail_the_source_saying_why(tmp_path, content, message):
    feed = tmp_path / "feed.csv"
    feed.write_bytes(content)
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == etl.EXIT_FAILED
    error = outcome(db, "csv:feed")["error"]
    assert error.endswith(message), error
    assert "universal-newline" not in error and "codec" not in error


def test_a_stray_quote_is_rejected_in_plain_words(tmp_path):
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + 'bitcoin,BTC,"Bit"coin,1,1,1,1,1,active,\nethereum,ETH,Ethereum,2,1,1,1,1,active,\n')
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT line, reason FROM reject") == [
        (2, "malformed CSV: a quote inside a quoted field is not doubled, or text follows a closing quote")
    ]
    assert query(db, "SELECT asset_id FROM asset") == [("ethereum",)]


# --- schema drift names a likely rename -------------------------------------------------------------------------


def test_a_renamed_upstream_field_is_named_as_a_likely_rename(upstream, tmp_path, make_client):
    renamed = copy.deepcopy(GECKO_PAGE2)
    for record in renamed:
        record["price_current"] = record.pop("current_price")
    coingecko_pages(upstream, [renamed])
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0
    rename = "likely rename 'current_price' \u2192 'price_current' (similarity 0.77)"
    n = len(renamed)
    assert outcome(db, "coingecko")["drift"] == {
        "unknown field 'price_current'": n,
        "missing field 'current_price'": n,
        rename: n,
    }
    (logged,) = events(result, "schema drift")
    assert logged["likely_renames"] == [rename]
    stats = api_get(make_client, db, "/stats").json
    (run,) = stats["recent_runs"]
    assert run["outcomes"][0]["drift"][rename] == n


@pytest.mark.parametrize(
    ("rename", "expected"),
    [
        (("price", "extra"), []),  # unrelated: only their parent path quotes.USD made them look alike (0.75)
        (("price", "delta"), []),
        (("price", "price_usd"), ["likely rename 'quotes.USD.price' \u2192 'quotes.USD.price_usd' (similarity 0.71)"]),
    ],
    ids=["unrelated", "unrelated-2", "renamed"],
)
def test_a_nested_upstream_field_is_a_likely_rename_by_its_own_name_not_its_parents(
    upstream, tmp_path, rename: tuple[str, str], expected: list[str]
):
    """CoinPaprika's numbers sit under quotes.USD: any new field there was named a likely rename of a missing one,
    as the shared 'quotes.USD.' made up most of the two paths."""
    tickers = copy.deepcopy(load_fixture("coinpaprika_tickers.json"))
    old, new = rename
    for ticker in tickers:
        ticker["quotes"]["USD"][new] = ticker["quotes"]["USD"].pop(old)
    paprika_tickers(upstream, tickers)
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coinpaprika").returncode == 0
    drift = outcome(db, "coinpaprika")["drift"]
    assert drift[f"unknown field 'quotes.USD.{new}'"] == drift[f"missing field 'quotes.USD.{old}'"] == len(tickers)
    assert [key.split(" (similarity")[0] for key in drift if key.startswith("likely rename")] == [
        e.split(" (similarity")[0] for e in expected
    ]
    assert [key for key in drift if key.startswith("likely rename")] == expected


def test_a_misspelt_csv_column_is_named_as_a_likely_rename(tmp_path):
    feed = tmp_path / "feed.csv"
    feed.write_text("symbol,name,Price USDT\nBTC,Bitcoin,95000\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    drift = outcome(db, "csv:feed")["drift"]
    assert drift["unknown column 'Price USDT'"] == 1
    assert [key for key in drift if key.startswith("likely rename 'price_usd' \u2192 'Price USDT'")]


# --- pacing ---------------------------------------------------------------------------------------------------------


def test_requests_are_spaced_to_the_rate_limit(upstream, tmp_path):
    coingecko_pages(upstream, [GECKO_PAGE1, gecko_page("b"), GECKO_PAGE2])
    db = tmp_path / "store.db"
    assert etl_against(upstream, db, "coingecko", KASPARRO_COINGECKO_RATE="240").returncode == 0
    times = [seen.at for seen in upstream.requests]
    assert len(times) == 3
    # 0.25 s apart at least; the server's recording of one request may lag a little.
    assert times[2] - times[0] >= 2 * 0.25 - 0.05
    assert last_run(db)["duration_ms"] >= 500


class FakeClock:
    """A monotonic clock that only sleeping moves."""

    def __init__(self) -> None:
        self.now, self.sleeps = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_the_client_waits_out_the_rate_limit_within_its_budget(upstream):
    upstream.route("/x", Reply(body=[1]))
    clock = FakeClock()
    policy = etl.HttpPolicy(rate=30, budget=5)  # one request every 2 s
    source = etl.CoinPaprika(upstream.base_url, {}, policy)
    client = etl.HttpClient(source, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        assert client.get(f"{upstream.base_url}/x") == b"[1]"
    assert clock.sleeps == [2.0, 2.0]
    with pytest.raises(etl.SourceError, match=r"budget of 5 s spent waiting for the rate limit of 30 requests a"):
        client.get(f"{upstream.base_url}/x")
    assert len(upstream.requests) == 3


def test_a_rate_limit_the_budget_cannot_wait_for_fails_the_source(upstream, tmp_path):
    coingecko_pages(upstream, [GECKO_PAGE1, GECKO_PAGE2])
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko", KASPARRO_COINGECKO_RATE="1", KASPARRO_HTTP_BUDGET="5")
    assert result.returncode == etl.EXIT_FAILED
    assert "waiting for the rate limit of 1 requests a minute" in outcome(db, "coingecko")["error"]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("rate", ["0", "-5", "fast", "inf"])
def test_a_bad_rate_is_a_usage_error(tmp_path, rate):
    result = run_etl(tmp_path / "store.db", "coingecko", KASPARRO_COINGECKO_RATE=rate)
    assert result.returncode == etl.EXIT_USAGE
    assert "KASPARRO_COINGECKO_RATE" in result.stderr or "bad number" in result.stderr


def test_the_default_rates_are_the_documented_ones():
    config = etl.EtlConfig.from_env({})
    assert (config.coingecko_rate, config.coinpaprika_rate) == (30.0, 60.0)
    assert etl.parse_source("coingecko", config).policy.rate == 30.0
