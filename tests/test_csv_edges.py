"""CSV cells at their edges, as a newcomer tried them. The real etl.py as a subprocess, into a real SQLite store."""

from __future__ import annotations

from pathlib import Path

from etl_support import last_run, query, run_etl

HEADER = "id,symbol,name,price_usd,last_updated\n"


def test_a_time_cell_of_many_digits_and_a_letter_is_rejected_and_the_rest_load(tmp_path: Path) -> None:
    """Telling a Unix time from an RFC 3339 one tried every split of the digits: this one cell took about eight
    minutes of CPU (run_etl gives up after five), holding the writer's lock."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "a,A,Coin A,1," + "1" * 100_000 + "x\n" + "b,B,Coin B,2,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 2, 1, 1)
    assert query(db, "SELECT line, reason FROM reject") == [
        (2, f"observed_at: not an RFC 3339 time or Unix seconds or milliseconds: {'1' * 40!r}")
    ]
    assert query(db, "SELECT asset_id FROM asset") == [("coin-b",)]
