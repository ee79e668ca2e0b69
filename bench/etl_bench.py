"""Time etl.py on a generated snapshot against sqlite3 .import of the same file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from runtime import runtime_python

from gen_csv import write_csv

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "results.md"

# The same primary key and indexes as table asset of store.sql, on the CSV's columns.
IMPORT_SCHEMA = """
CREATE TABLE asset (id TEXT PRIMARY KEY, symbol TEXT NOT NULL, name TEXT NOT NULL, rank INTEGER,
    price_usd REAL, market_cap_usd REAL, volume_24h_usd REAL, change_24h_pct REAL,
    status TEXT NOT NULL, last_updated TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX asset_rank ON asset (rank);
CREATE INDEX asset_price ON asset (price_usd);
CREATE INDEX asset_market_cap ON asset (market_cap_usd);
CREATE INDEX asset_volume ON asset (volume_24h_usd);
CREATE INDEX asset_change ON asset (change_24h_pct);
CREATE INDEX asset_symbol ON asset (symbol);
CREATE INDEX asset_name ON asset (name COLLATE NOCASE);
CREATE INDEX asset_updated ON asset (last_updated);
"""


def timed(argv: list[str], stdin: str | None = None) -> tuple[float, int]:
    """Run a command; return its wall seconds and peak RSS in MB. The peak is at least this process's own (16 MB):
    Linux carries a process's peak RSS across exec, and the child runs in this process's memory until its exec."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    if stdin is not None:
        proc.stdin.write(stdin.encode())
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed with exit code {proc.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss // 1024


def fresh(db: Path) -> Path:
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    csv = OUT / f"etl-{args.rows}.csv"
    if not csv.exists():
        print(f"generating {csv.name} ...", flush=True)
        write_csv(csv, args.rows)

    db = fresh(OUT / "etl-bench.db")
    python = runtime_python()  # as the README installs it
    first, first_rss = timed([python, "etl.py", "--db", str(db), f"csv:{csv}"])
    again, again_rss = timed([python, "etl.py", "--db", str(db), f"csv:{csv}"])
    bare = fresh(OUT / "import-bench.db")
    script = f"{IMPORT_SCHEMA}\n.import --csv --skip 1 {csv} asset\n"
    imported, import_rss = timed(["sqlite3", str(bare)], stdin=script)

    rows = [
        ("etl.py, empty store", f"{first:.1f} s", f"{first_rss} MB", f"{first / imported:.2f} x .import", "<= 2.00 x"),
        ("etl.py, unchanged file", f"{again:.2f} s", f"{again_rss} MB", f"{again / first:.1%} of first", "<= 10 %"),
        ("sqlite3 .import", f"{imported:.1f} s", f"{import_rss} MB", "1.00 x", ""),
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    header = f"### bench-etl, {args.rows:,} rows, commit {commit.stdout.strip() or '?'}, {when}"
    table = [
        "| run | time | peak RSS | ratio | target |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
    ]
    print("\n".join([header, "", *table]))
    with RESULTS.open("a") as out:
        out.write("\n".join(["", header, "", *table, ""]))


if __name__ == "__main__":
    main()
