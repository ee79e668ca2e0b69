"""Two observations of one listing at one second with different values: the store keeps the one loaded first
(a reload changes nothing), and the other is rejected with its line or index and a reason naming what differs,
never dropped without a word. The real etl.py into a real SQLite store; upstreams are local fakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etl_support import etl_against, last_run, query, run_etl
from upstream import coingecko_pages, load_fixture

HEADER = "id,symbol,name,price_usd,last_updated\n"


def partial_run_rejects(db: Path, source: str, counts: tuple[int, int, int], **env: str) -> list[tuple[int, str]]:
    """Run etl.py; check that it was partial with `counts` (read, loaded, rejected); return its rejects' lines and
    reasons."""
    result = run_etl(db, source, **env)
    assert result.returncode == 0, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", *counts)
    return query(db, "SELECT line, reason FROM reject WHERE run_id = ? ORDER BY line", (run["run_id"],))


def test_a_second_observation_of_one_instant_with_other_values_is_rejected_naming_the_first(tmp_path: Path) -> None:
    feed = tmp_path / "feed.csv"
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,100,2026-11-25T12:00:00Z\n"
        + "bitcoin,BTC,Bitcoin,100,2026-11-25T12:00:00Z\n"  # the same observation again: changes nothing
        + "bitcoin,BTC,Bitcoin,101,2026-11-25T13:00:00+01:00\n"  # the same instant, another price
        + "bitcoin,BTC,Bitcoin,,2026-11-25T12:00:00.400Z\n"  # the same second, no price
    )
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 4, 1, 2)
    rejects = query(db, "SELECT line, reason, raw FROM reject ORDER BY line")
    assert [(line, reason) for line, reason, _ in rejects] == [
        (4, "another observation of bitcoin at 2026-11-25T12:00:00Z, from line 2 of this input, was loaded first:"
            " price_usd 100.0 kept, 101.0 here"),
        (5, "another observation of bitcoin at 2026-11-25T12:00:00Z, from line 2 of this input, was loaded first:"
            " price_usd 100.0 kept, null here"),
    ]  # fmt: skip
    assert json.loads(rejects[0][2])["price_usd"] == 101.0
    assert query(db, "SELECT price_usd FROM raw_observation") == [(100.0,)]
    assert query(db, "SELECT price_usd, updated_at FROM asset") == [(100.0, "2026-11-25T12:00:00Z")]


def test_a_second_row_of_one_instant_under_another_symbol_or_name_is_rejected_naming_both(tmp_path: Path) -> None:
    """Such a row, its values the same, was counted read and dropped without a word: the listing kept the first
    row's symbol and name, and nothing said another was given for that instant."""
    feed = tmp_path / "feed.csv"
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,100,2026-11-25T12:00:00Z\n"
        + "bitcoin,btc,Bitcoin,100,2026-11-25T13:00:00+01:00\n"  # the same symbol once upper-cased: the same
        + "bitcoin,XBT,Bitcoin,100,2026-11-25T12:00:00Z\n"
        + "bitcoin,BTC,Bitcoin Two,100,2026-11-25T12:00:00Z\n"
        + "bitcoin,BTC,Bitcoin Two,101,2026-11-25T12:00:00.400Z\n"
        + "bitcoin,XBT,Bitcoin Two,100,2026-11-25T12:05:00Z\n"  # a later instant: the listing is renamed
    )
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 6, 2, 3)
    first = "another observation of bitcoin at 2026-11-25T12:00:00Z, from line 2 of this input, was loaded first:"
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == [
        (4, f'{first} symbol "BTC" kept, "XBT" here'),
        (5, f'{first} name "Bitcoin" kept, "Bitcoin Two" here'),
        (6, f'{first} price_usd 100.0 kept, 101.0 here, name "Bitcoin" kept, "Bitcoin Two" here'),
    ]
    assert query(db, "SELECT symbol, name FROM source_map") == [("XBT", "Bitcoin Two")]
    assert query(db, "SELECT observed_at, price_usd FROM raw_observation ORDER BY 1") == [
        (1795608000, 100.0), (1795608300, 100.0)
    ]  # fmt: skip


def test_a_corrected_file_loaded_again_keeps_what_was_loaded_and_says_which_rows_differ(tmp_path: Path) -> None:
    """The same source's file rewritten with another value for a time already loaded: that row is rejected (the
    store's history does not change under its candles), its new rows load, and an unchanged row is no reject."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "bitcoin,BTC,Bitcoin,100,2026-11-25T12:00:00Z\nether,ETH,Ether,5,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,100,2026-11-25T12:00:00Z\n"  # unchanged
        + "ether,ETH,Ether,6,2026-11-25T12:00:00Z\n"  # corrected
        + "ether,ETH,Ether,7,2026-11-25T12:10:00Z\n"  # new
    )
    assert partial_run_rejects(db, f"csv:{feed}", (3, 1, 1)) == [
        (3, "another observation of ether at 2026-11-25T12:00:00Z, from an earlier batch or run, was loaded first:"
            " price_usd 5.0 kept, 6.0 here"),
    ]  # fmt: skip
    assert query(db, "SELECT observed_at, price_usd FROM raw_observation WHERE listing_id = 2 ORDER BY 1") == [
        (1795608000, 5.0), (1795608600, 7.0)
    ]  # fmt: skip


def test_an_upstream_record_twice_in_one_fetch_with_other_values_is_rejected_by_index(
    upstream: Any, tmp_path: Path
) -> None:
    record = load_fixture("coingecko_markets_hodl.json")[0]
    changed = {**record, "current_price": record["current_price"] * 2, "market_cap_rank": 7}
    coingecko_pages(upstream, [[record, record, changed]])
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 3, 1, 1)
    ((line, reason),) = query(db, "SELECT line, reason FROM reject")
    assert line == 3 and f"another observation of {record['id']} at " in reason and "from record 1 " in reason
    assert f"rank {record['market_cap_rank']} kept, 7 here" in reason
    assert f"price_usd {float(record['current_price'])} kept, {float(changed['current_price'])} here" in reason
    assert query(db, "SELECT price_usd FROM raw_observation") == [(float(record["current_price"]),)]


def test_a_late_observation_with_other_values_is_rejected_naming_the_first(tmp_path: Path) -> None:
    """Observations older than the raw history (a backfill after newer data) go into candles only: such a row at
    the second of another with other values was counted read and dropped without a word. In the same file, the
    first is kept and the other named; against a candle an earlier run made, its open (the first observation's
    price) and close (the last's) name the one loaded first."""
    db = tmp_path / "store.db"
    env = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "30d"}
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "bitcoin,BTC,Bitcoin,200,2026-11-25T12:00:00Z\n")
    assert run_etl(db, f"csv:a={feed}", **env).returncode == 0
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,100,2026-11-20T12:00:00Z\n"
        + "bitcoin,BTC,Bitcoin,110,2026-11-20T12:30:00Z\n"
        + "bitcoin,BTC,Bitcoin,101,2026-11-20T12:00:00Z\n"  # the first row's second, another price
    )
    assert partial_run_rejects(db, f"csv:a={feed}", (3, 2, 1), **env) == [
        (4, "another observation of bitcoin at 2026-11-20T12:00:00Z, from line 2 of this input, was loaded first:"
            " price_usd 100.0 kept, 101.0 here"),
    ]  # fmt: skip
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,100,2026-11-20T12:00:00Z\n"  # the candle's first observation again: no reject
        + "bitcoin,BTC,Bitcoin,99,2026-11-20T12:00:00Z\n"
        + "bitcoin,BTC,Bitcoin,111,2026-11-20T12:30:00Z\n"
    )
    earlier = "from an earlier run, was loaded first:"
    assert partial_run_rejects(db, f"csv:a={feed}", (3, 0, 2), **env) == [
        (3, f"another observation of bitcoin at 2026-11-20T12:00:00Z, {earlier} price_usd 100.0 kept, 99.0 here"),
        (4, f"another observation of bitcoin at 2026-11-20T12:30:00Z, {earlier} price_usd 110.0 kept, 111.0 here"),
    ]
    assert query(db, "SELECT width, open, high, low, close, observations FROM candle ORDER BY width, t") == [
        (3600, 100.0, 110.0, 100.0, 110.0, 2), (86400, 100.0, 110.0, 100.0, 110.0, 2)
    ]  # fmt: skip
