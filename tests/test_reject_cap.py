"""A source's rejects are all counted, and the first etl.REJECTS_KEPT of a run stored: a hostile page of tiny records
or a file of bad rows cannot grow the store without bound. The real etl.py (against a fake CoinPaprika on 127.0.0.1)
into a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import etl
from etl_support import etl_against, last_run, query, run_etl
from upstream import paprika_tickers

MORE = 2_500
NOTE = f"stored the first {etl.REJECTS_KEPT:,} of {MORE:,} rejected records in reject; the rest were counted only"


def test_a_page_of_tiny_non_object_records_stores_a_capped_number_of_rejects(upstream: Any, tmp_path: Path) -> None:
    """Each of a page's records `1` (two bytes of body) stored a reject row of about 100 bytes, without limit."""
    ticker = {"id": "btc-bitcoin", "symbol": "BTC", "name": "Bitcoin", "last_updated": "2026-11-25T12:00:00Z"}
    paprika_tickers(upstream, [ticker, *[1] * MORE])
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coinpaprika")
    assert result.returncode == 0, result.stderr[-2000:]
    assert query(db, "SELECT rows_read, rows_loaded, rows_rejected, detail FROM run_source") == [
        (MORE + 1, 1, MORE, NOTE)
    ]
    assert query(db, "SELECT count(*), min(line), max(line) FROM reject") == [
        (etl.REJECTS_KEPT, 2, etl.REJECTS_KEPT + 1)
    ]
    assert "rejects not all stored" in result.stdout


def test_a_csv_of_bad_rows_stores_a_capped_number_of_rejects_across_batches(tmp_path: Path) -> None:
    feed = tmp_path / "feed.csv"
    feed.write_text("symbol,name,price\nBTC,Bitcoin,1\n" + "X,Coin,abc\n" * MORE)
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}", KASPARRO_BATCH_ROWS="700")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (last_run(db)["status"], last_run(db)["rows_rejected"]) == ("partial", MORE)
    assert query(db, "SELECT detail FROM run_source") == [(NOTE.replace("records", "rows"),)]
    assert query(db, "SELECT count(*), min(line), max(line) FROM reject") == [
        (etl.REJECTS_KEPT, 3, etl.REJECTS_KEPT + 2)
    ]
