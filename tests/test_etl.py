"""The ETL: idempotent loads, crash safety, the writer lock, rejects and identity."""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etl
from etl_support import ROOT, etl_env, last_run, query, run_etl, start_etl, store_content, wait_for_event, write_csv

SAMPLE = ROOT / "data" / "sample.csv"
HEADER = "id,symbol,name,rank,price_usd,market_cap_usd,volume_24h_usd,change_24h_pct,status,last_updated\n"


def integrity(db: Path) -> str:
    return query(db, "PRAGMA integrity_check")[0][0]


# --- idempotence ------------------------------------------------------------


def test_bare_run_loads_the_shipped_sample(tmp_path):
    db = tmp_path / "kasparro.db"
    result = run_etl(db, KASPARRO_DB=str(db))
    assert result.returncode == 0, result.stderr
    run = last_run(db)
    assert run["status"] == "success"
    assert run["rows_read"] == run["rows_loaded"] == query(db, "SELECT count(*) FROM asset")[0][0] > 240
    assert query(db, "SELECT DISTINCT source FROM source_map") == [("csv:sample",)]
    assert query(db, "PRAGMA journal_mode")[0][0] == "wal"
    assert query(db, "PRAGMA user_version")[0][0] == etl.SCHEMA_VERSION


def test_loading_the_sample_twice_changes_nothing(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    first = store_content(db)
    generation = query(db, "SELECT generation FROM store_meta")[0][0]
    second = run_etl(db, f"csv:{SAMPLE}")
    assert second.returncode == 0
    assert store_content(db) == first
    assert query(db, "SELECT generation FROM store_meta")[0][0] == generation
    run = last_run(db)
    assert (run["status"], run["rows_loaded"], run["rows_rejected"]) == ("success", 0, 0)
    assert query(db, "SELECT detail FROM run_source WHERE run_id = ?", (run["run_id"],))[0][0].startswith(
        "unchanged since run"
    )


def test_same_observations_in_other_bytes_load_nothing_new(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    before = store_content(db)
    crlf = tmp_path / "sample.csv"  # same source name, different bytes: parsed again
    crlf.write_bytes(SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    assert run_etl(db, f"csv:{crlf}").returncode == 0
    after = store_content(db)
    assert after["assets"] == before["assets"]
    assert after["observations"] == before["observations"]
    run = last_run(db)
    assert (run["rows_read"], run["rows_loaded"]) == (len(before["assets"]), 0)


def test_a_newer_snapshot_moves_the_asset_and_keeps_history(tmp_path):
    db = tmp_path / "store.db"
    old = tmp_path / "feed.csv"
    old.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,90000,1,1,1,active,2026-11-25T12:00:00Z\n")
    assert run_etl(db, f"csv:{old}").returncode == 0
    old.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,91000,1,1,1,active,2026-11-25T13:00:00Z\n")
    assert run_etl(db, f"csv:{old}").returncode == 0
    assert query(db, "SELECT price_usd, updated_at FROM asset") == [(91000.0, "2026-11-25T13:00:00Z")]
    assert query(db, "SELECT count(*) FROM raw_observation")[0][0] == 2
    old.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,80000,1,1,1,active,2026-11-24T12:00:00Z\n")
    assert run_etl(db, f"csv:{old}").returncode == 0  # an older observation joins history only
    assert query(db, "SELECT price_usd FROM asset") == [(91000.0,)]
    assert query(db, "SELECT count(*) FROM raw_observation")[0][0] == 3


# --- crash safety and the lock ------------------------------------------------


def test_killed_runs_converge_to_one_clean_run(tmp_path, big_csv, big_clean):
    db = tmp_path / "killed.db"
    # Kill right after the run starts, then after 1, 3, 2 and 5 more batches.
    for batches in (0, 1, 3, 2, 5):
        proc = start_etl(db, f"csv:{big_csv}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="10000")
        wait_for_event(proc, "batch committed", batches) if batches else wait_for_event(proc, "run started")
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert integrity(db) == "ok"
    result = run_etl(db, f"csv:{big_csv}")
    assert result.returncode == 0, result.stderr
    assert integrity(db) == "ok"
    assert store_content(db) == store_content(big_clean)
    runs = query(db, "SELECT status, error FROM etl_run ORDER BY run_id")
    assert [status for status, _ in runs] == ["failed"] * 5 + ["partial"]
    assert all("died" in error for _, error in runs[:5])


def test_sigterm_rolls_back_the_batch_and_records_the_run_failed(tmp_path, big_csv):
    db = tmp_path / "store.db"
    proc = start_etl(db, f"csv:{big_csv}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="10000")
    wait_for_event(proc, "batch committed", 2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert proc.returncode == etl.EXIT_FAILED
    run = last_run(db)
    assert (run["status"], run["error"]) == ("failed", "stopped by SIGTERM")
    assert integrity(db) == "ok"
    # What was committed is exactly what the checkpoint says was read.
    line = query(db, "SELECT line FROM checkpoint")[0][0]
    stored = query(db, "SELECT count(*) FROM raw_observation")[0][0] + query(db, "SELECT count(*) FROM reject")[0][0]
    assert stored == line - 1


def test_a_second_concurrent_run_exits_75_and_writes_nothing(tmp_path, big_csv):
    db = tmp_path / "store.db"
    first = start_etl(db, f"csv:{big_csv}")
    wait_for_event(first, "run started")
    second = run_etl(db, f"csv:{SAMPLE}")
    assert second.returncode == etl.EXIT_LOCKED
    assert "another ETL run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert second.stdout == ""
    assert query(db, "SELECT count(*) FROM etl_run")[0][0] == 1
    assert query(db, "SELECT count(*) FROM source_map WHERE source = 'csv:sample'")[0][0] == 0
    first.communicate()
    assert first.returncode == 0


# --- validation ---------------------------------------------------------------


def test_bad_rows_are_rejected_with_line_and_reason(tmp_path):
    feed = tmp_path / "feed.csv"
    feed.write_text(
        HEADER
        + "bitcoin,BTC,Bitcoin,1,95000,1900000000000,1,1,active,2026-11-25T12:00:00Z\n"  # line 2
        + "nosym,,No Symbol,2,1,1,1,1,active,2026-11-25T12:00:00Z\n"  # line 3
        + "textnum,TXT,Text Number,3,abc,1,1,1,active,2026-11-25T12:00:00Z\n"  # line 4
        + "negative,NEG,Negative,4,-5,1,1,1,active,2026-11-25T12:00:00Z\n"  # line 5
        + "short,SHO,Short Row,5,1\n"  # line 6
        + "ethereum,ETH,Ethereum,2,3500,420000000000,1,1,active,2026-11-25T12:00:00Z\n"  # line 7
    )
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0
    assert last_run(db)["status"] == "partial"
    assert [a for (a,) in query(db, "SELECT asset_id FROM asset ORDER BY asset_id")] == ["bitcoin", "ethereum"]
    rejects = query(db, "SELECT line, reason FROM reject ORDER BY line")
    assert [line for line, _ in rejects] == [3, 4, 5, 6]
    reasons = dict(rejects)
    assert reasons[3].startswith("symbol:")
    assert reasons[4].startswith("price_usd:")
    assert reasons[5].startswith("price_usd:") and ">= 0" in reasons[5]
    assert reasons[6] == "expected 10 fields, got 5"
    run = last_run(db)
    assert (run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == (6, 2, 4)


def test_bom_crlf_quotes_and_header_aliases(tmp_path):
    feed = tmp_path / "aliased.csv"
    body = (
        "Ticker,Coin Name,Price,MCAP,Volume,Change 24h,Timestamp\r\n"
        'BTC,"Bitcoin",95000,1900000000000,1,1.5,2026-11-25T12:00:00Z\r\n'
        'WBTC,"Wrapped Bitcoin, Portal",95001,1,1,-1,2026-11-25T12:00:00+00:00\r\n'
        'PNUT,"Peanut ""the Squirrel""",0.2,1,1,0,1764072000\r\n'
    )
    feed.write_bytes(b"\xef\xbb\xbf" + body.encode())
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    rows = query(db, "SELECT symbol, name, price_usd, market_cap_usd, change_24h_pct, updated_at FROM asset")
    assert sorted(rows) == [
        ("BTC", "Bitcoin", 95000.0, 1900000000000.0, 1.5, "2026-11-25T12:00:00Z"),
        ("PNUT", 'Peanut "the Squirrel"', 0.2, 1.0, 0.0, "2025-11-25T12:00:00Z"),
        ("WBTC", "Wrapped Bitcoin, Portal", 95001.0, 1.0, -1.0, "2026-11-25T12:00:00Z"),
    ]
    assert last_run(db)["status"] == "success"


def test_a_file_without_required_columns_fails_the_run(tmp_path):
    feed = tmp_path / "nosymbol.csv"
    feed.write_text("name,price\nBitcoin,1\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == etl.EXIT_FAILED
    run = last_run(db)
    assert run["status"] == "failed" and "no symbol column" in run["error"]


def test_a_missing_file_fails_the_source_clearly(tmp_path):
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{tmp_path / 'absent.csv'}", f"csv:{SAMPLE}")
    assert result.returncode == 0  # the other source loaded: partial
    assert last_run(db)["status"] == "partial"
    (error,) = query(db, "SELECT error FROM run_source WHERE source = 'csv:absent'")[0]
    assert "cannot read" in error and "absent.csv" in error


@pytest.mark.parametrize(
    ("db", "args", "message"),
    [
        ("x.db", ["coinbase"], "unknown source 'coinbase'"),
        ("no/such/dir/x.db", [], "does not exist"),
        ("x.db", ["--bogus"], ""),
        ("x.db", ["--db", "/no/such/dir/x.db"], "argument --db: given twice"),  # argparse took the last one
    ],
)
def test_usage_errors_exit_2(tmp_path, db, args, message):
    result = run_etl(tmp_path / db, *args)
    assert result.returncode == etl.EXIT_USAGE
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_older_store_is_migrated_in_place(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    before = query(db, "SELECT * FROM asset ORDER BY asset_id")
    with sqlite3.connect(db) as conn:  # make it a version 2 store: the old rank index, no covering one
        conn.execute("DROP INDEX asset_rank_covering")
        conn.execute("CREATE INDEX asset_rank ON asset (rank)")
        conn.execute("PRAGMA user_version = 2")
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    assert query(db, "PRAGMA user_version") == [(etl.SCHEMA_VERSION,)]
    indexes = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "asset_rank_covering" in indexes and "asset_rank" not in indexes
    assert query(db, "SELECT * FROM asset ORDER BY asset_id") == before
    assert query(db, "PRAGMA integrity_check") == [("ok",)]


def test_a_store_from_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "store.db"
    sqlite3.connect(db).execute("PRAGMA user_version = 99").connection.close()
    result = run_etl(db, f"csv:{SAMPLE}")
    assert result.returncode == etl.EXIT_USAGE
    assert "newer than this etl.py" in result.stderr


# --- identity -----------------------------------------------------------------


def test_look_alikes_stay_separate_assets(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    for symbol in ("USDC", "WETH", "SOL"):
        names = query(db, "SELECT name FROM asset WHERE symbol = ? ORDER BY rank", (symbol,))
        assert len(names) == 2, symbol
    assert query(db, "SELECT asset_id FROM asset WHERE symbol = 'SOL' ORDER BY rank") == [
        ("solana",),
        ("wrapped-sol",),
    ]


def test_the_same_coin_in_two_files_is_one_asset(tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text(HEADER + "bitcoin,BTC,Bitcoin,1,95000,1,1,1,active,2026-11-25T12:00:00Z\n")
    second.write_text(
        "id,ticker,name,price\n"
        "btc-bitcoin,btc,BITCOIN,95010\n"  # another id, same symbol and name
        "bitcoin-cash,BTC,Bitcoin Cash,400\n"  # a look-alike symbol: not merged
    )
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{first}", f"csv:{second}").returncode == 0
    assets = query(db, "SELECT asset_id, sources FROM asset ORDER BY asset_id")
    assert assets == [("bitcoin", '["csv:first","csv:second"]'), ("bitcoin-cash", '["csv:second"]')]
    assert query(db, "SELECT source, source_id, asset_id FROM source_map ORDER BY source, source_id") == [
        ("csv:first", "bitcoin", "bitcoin"),
        ("csv:second", "bitcoin-cash", "bitcoin-cash"),
        ("csv:second", "btc-bitcoin", "bitcoin"),
    ]


def test_a_pinned_mapping_wins_over_name_matching(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO source_map (source, source_id, asset_id, pinned) VALUES ('csv:feed', 'xbt', 'bitcoin', 1)"
        )
    conn.close()
    feed = tmp_path / "feed.csv"
    feed.write_text("id,symbol,name,price\nxbt,XBT,XBT Index,95100\n")
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT sources FROM asset WHERE asset_id = 'bitcoin'") == [('["csv:feed","csv:sample"]',)]
    assert query(db, "SELECT count(*) FROM asset WHERE symbol = 'XBT'") == [(0,)]


# --- normalisation properties ---------------------------------------------------

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.text(max_size=12),
)
cell = st.one_of(st.none(), st.text(max_size=40))
row_cells = st.tuples(
    st.one_of(st.text(max_size=12), st.sampled_from(["btc", "ＵＳＤＣ", "ß", " eth "])),  # symbol
    st.one_of(st.text(max_size=60), st.sampled_from(["Bitcoin", "  USD   Coin ", "ｆｕｌｌ"])),  # name
    cell,  # source_id
    st.one_of(cell, number_text),  # rank
    *[st.one_of(cell, number_text)] * 4,  # price, market cap, volume, change
    st.one_of(cell, st.sampled_from(["active", "Inactive", "TRUE", "0", "delisted"])),  # status
    st.one_of(cell, st.sampled_from(["2026-11-25T12:00:00Z", "2026-11-25 12:00:00+02:00", "1764072000"])),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(row_cells)
def test_normalisation_is_total_and_idempotent(cells):
    intake = etl.Intake("2026-11-25T12:05:00Z", upstream=False, labels=etl.ROW_FIELDS)
    try:
        observation = etl.normalise_cells(list(cells), "2026-01-01T00:00:00Z", intake)
    except etl.Rejected as reason:
        assert str(reason)
        return
    again = etl.normalise_cells(etl.observation_cells(observation), "2026-01-01T00:00:00Z", intake)
    assert again == observation
    assert observation.symbol == observation.symbol.upper()
    assert observation.name_key and observation.status in ("active", "inactive")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=12))
def test_any_header_is_mapped_or_refused(header):
    try:
        layout = etl.csv_layout(header)
    except etl.SourceError as error:
        assert str(error)
    else:
        assert layout.columns[0] is not None and layout.columns[1] is not None


def test_a_tty_shows_a_progress_line(tmp_path):
    feed = write_csv(tmp_path / "feed.csv", 25_000)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "etl.py"), "--db", str(tmp_path / "store.db"), f"csv:{feed}"],
        cwd=ROOT,
        env=etl_env(),
        stdout=subprocess.DEVNULL,
        stderr=secondary,
    )
    os.close(secondary)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
        while chunk := os.read(primary, 4096):
            shown += chunk
    os.close(primary)
    assert proc.wait() == 0
    lines = shown.decode().split("\r")
    assert any("csv:feed:" in line and "25,000 rows" in line and "100.0%" in line for line in lines)
