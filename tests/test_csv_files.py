"""CSV files as other programs leave them: written while the ETL reads them, not files at all, dated by a clock
that was never set. The real etl.py (and tests/faulty_etl.py, which pauses it between batches) as a subprocess,
into a real SQLite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import etl
from etl_support import ROOT, etl_env, last_run, query, run_etl, store_content

HEADER = "id,symbol,name,last_updated,price\n"
ROWS = "".join(f"c{i},S{i},Coin {i},2026-11-25T12:00:00Z,{i + 1}.25\n" for i in range(3000))


def run_paused_after_one_batch(db: Path, feed: Path, meanwhile: Callable[[], None]) -> subprocess.CompletedProcess:
    """etl.py loading `feed` 100 rows a batch, with `meanwhile` done to the file after its first batch commits."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "faulty_etl.py"), "--db", str(db), f"csv:{feed}"],
        cwd=ROOT,
        env=etl_env(FAULT_AFTER_BATCHES="1", FAULT_THEN="pause", KASPARRO_BATCH_ROWS="100", LOG_LEVEL="warning"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if json.loads(line)["event"] == "fault paused":
            break
    meanwhile()
    out, err = proc.communicate("\n", timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rewrite_in_place(feed: Path, content: str) -> None:
    """What `curl -o` or a spreadsheet's save does to a file: truncate it, then write it again (here, half of it)."""
    with feed.open("r+") as stream:
        stream.truncate(0)
        stream.write(content)


def append(feed: Path, text: str) -> None:
    """What a program writing rows as it gets them leaves between two writes."""
    with feed.open("a") as stream:
        stream.write(text)


LAST = "c3000,S3000,Coin 3000,2026-11-25T12:00:00Z,1234.5\n"
HALF = LAST[: LAST.index("1234.5") + 2]  # its price cut to '12'


@pytest.mark.parametrize(
    ("change", "first_run"),
    [("rewritten in place", "fails"), ("half a row appended", "loads"), ("its last row finished", "fails")],
)
def test_a_file_written_while_it_is_read_never_loads_what_was_half_written(
    tmp_path: Path, change: str, first_run: str
) -> None:
    """The fingerprint was taken before the rows were read, so a file rewritten in place (a download of the same
    snapshot) was marked complete after half its rows, and the next run said 'unchanged since run 1': 1,456 of 3,000
    coins were never loaded. A row read half-written ('12' of '1234.5') was loaded, and its whole form, read the
    next time, was rejected as a conflicting second observation: the cut price stayed. A run now reads the bytes
    its fingerprint was taken of: what is appended after them is left to the next run, a last row that was being
    written then is not read, and bytes rewritten among them fail the source after the batches committed."""
    full = HEADER + ROWS + ("" if change == "rewritten in place" else LAST)
    feed = tmp_path / "feed.csv"
    feed.write_text(full)
    clean = tmp_path / "clean.db"
    assert run_etl(clean, f"csv:{feed}").returncode == 0

    db = tmp_path / "store.db"
    if change == "rewritten in place":
        feed.write_text(full)
        result = run_paused_after_one_batch(db, feed, lambda: rewrite_in_place(feed, full[: len(full) // 2]))
    elif change == "half a row appended":
        feed.write_text(HEADER + ROWS)
        result = run_paused_after_one_batch(db, feed, lambda: append(feed, HALF))
    else:
        feed.write_text(HEADER + ROWS + HALF)
        result = run_paused_after_one_batch(db, feed, lambda: append(feed, LAST[len(HALF) :]))
    assert "Traceback" not in result.stderr, result.stderr
    if first_run == "fails":
        assert result.returncode == etl.EXIT_FAILED
        ((error,),) = query(db, "SELECT error FROM run_source")
        assert error.startswith(f"{feed} changed while it was read, after line "), error
    else:
        assert result.returncode == 0 and last_run(db)["status"] == "success"
        assert query(db, "SELECT count(*) FROM source_map") == [(3000,)]
    assert query(db, "SELECT count(*) FROM source_map WHERE price_usd = 12") == [(0,)]

    feed.write_text(full)  # the writer finishes
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    assert last_run(db)["status"] == "success"
    assert store_content(db) == store_content(clean)


def test_a_file_replaced_by_a_rename_while_it_is_read_loads_as_it_was_opened(tmp_path: Path) -> None:
    """A writer that renames a new file over the old one (an atomic save) leaves the ETL reading the old one whole,
    which is what its fingerprint says."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + ROWS)
    clean = tmp_path / "clean.db"
    assert run_etl(clean, f"csv:{feed}").returncode == 0

    def replace() -> None:
        (tmp_path / "new.csv").write_text(HEADER + ROWS.replace(".25\n", ".5\n"))
        os.replace(tmp_path / "new.csv", feed)

    db = tmp_path / "store.db"
    result = run_paused_after_one_batch(db, feed, replace)
    assert result.returncode == 0, result.stderr
    assert last_run(db)["status"] == "success"
    assert store_content(db)["observations"] == store_content(clean)["observations"]


@pytest.mark.parametrize("kind", ["pipe", "named pipe", "directory", "character device"])
def test_a_csv_that_is_not_a_regular_file_fails_the_source_saying_what_it_is(tmp_path: Path, kind: str) -> None:
    """`curl … | etl.py csv:/dev/stdin` failed with 'UnsupportedOperation: File or stream is not seekable.' after
    its fingerprint had read the whole pipe; a named pipe with no writer held the run forever."""
    db = tmp_path / "store.db"
    what = {"pipe": "a pipe", "named pipe": "a pipe", "directory": "a directory", "character device": "a device"}
    path = {"pipe": "/dev/stdin", "directory": str(tmp_path), "character device": "/dev/null"}.get(kind)
    if kind == "named pipe":
        path = str(tmp_path / "feed.csv")
        os.mkfifo(path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "--db", str(db), f"csv:feed={path}"],
        cwd=ROOT,
        env=etl_env(),
        input="symbol,name,price\nBTC,Bitcoin,1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == etl.EXIT_FAILED and "Traceback" not in result.stderr
    ((error,),) = query(db, "SELECT error FROM run_source")
    assert error.startswith(f"{path} is {what[kind]}, not a regular file:"), error


def test_rows_dated_by_a_file_modified_before_2009_are_rejected_saying_so(tmp_path: Path) -> None:
    """A row without a time takes the file's modification time, which archives and build tools set to 1970
    (Nix: 1 s after the epoch): such rows were loaded as observed in 1970, where the same time written in the row
    is refused. Rows that give their own time load."""
    feed = tmp_path / "feed.csv"
    feed.write_text(
        "symbol,name,price,last_updated\nBTC,Bitcoin,95000,2026-11-25T12:00:00Z\nETH,Ethereum,3400,\nSOL,Solana,240,-\n"
    )
    os.utime(feed, (1, 1))
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 3, 1, 2)
    reason = (
        "observed_at: missing, and the file's modification time, taken for it, is before 2009-01-03, Bitcoin's"
        " genesis block: '1970-01-01T00:00:01Z'"
    )
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == [(3, reason), (4, reason)]
    assert query(db, "SELECT asset_id, updated_at FROM asset") == [("bitcoin", "2026-11-25T12:00:00Z")]


@pytest.mark.parametrize(
    ("header", "batch_rows"),
    [("name,symbol,price", "50000"), ("\ufeffName , SYMBOL,Price", "1")],
    ids=["same-case", "bom-case-spacing-one-row-batches"],
)
def test_a_header_repeated_in_another_order_stops_the_file_before_it(tmp_path: Path, header: str, batch_rows: str):
    """Files concatenated with their headers, the second's columns in another order, were read in the first's
    order: ETH loaded as symbol ETHEREUM named 'ETH', and the header itself was rejected as "price_usd: not a
    number: 'price'". The rows before it load; the source fails there, saying why, in this run and the next."""
    feed = tmp_path / "feed.csv"
    feed.write_text(f"symbol,name,price\nBTC,Bitcoin,95000\n{header}\nEthereum,ETH,3400\nSolana,SOL,240\n")
    db = tmp_path / "store.db"
    names = ", ".join(name.strip() for name in header.lstrip("\ufeff").split(","))
    for run in (1, 2):
        result = run_etl(db, f"csv:{feed}", KASPARRO_BATCH_ROWS=batch_rows)
        assert result.returncode == etl.EXIT_FAILED and "Traceback" not in result.stderr
        (error,) = query(db, "SELECT error FROM run_source WHERE run_id = ?", (run,))[0]
        assert error == (
            f"line 3 repeats the header with its columns in another order ({names}): the"
            " rows after it would be read in the first header's order; load them as a file of their own"
        ), error
        assert query(db, "SELECT asset_id, symbol, name FROM asset") == [("bitcoin", "BTC", "Bitcoin")]
        assert query(db, "SELECT count(*) FROM reject") == [(0,)]
