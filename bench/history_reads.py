"""Cost of an uncached history answer, in process: read_history and its encoding, on the store bench-history left.

Each read is a random coin's and a window shifted by up to 6 h, as bench/history.py asks them under wrk, so
SQLite and the answer cache keep nothing from one to the next (utc_text's cache of times is kept, as in a
worker). Prints the CPU milliseconds of each scenario (median, and the 99th percentile, of --reads reads), and
with valgrind installed the instructions a read costs (cachegrind, --counted reads minus none, hash seed
fixed): a figure other work on the machine does not change.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stores import read_only_uri

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "bench" / "out" / "history" / "year.db"
DAY = 86_400
SCENARIOS = {"1h/30d": ("1h", 30 * DAY), "1d/year": ("1d", 365 * DAY), "raw/day": ("raw", DAY)}  # interval, span


def measure(db: Path, coins: int, scenario: str, reads: int) -> list[float]:
    """CPU seconds of each of `reads` uncached reads of one scenario."""
    sys.path.insert(0, str(ROOT))
    import kasparro

    conn = sqlite3.connect(read_only_uri(db), uri=True, isolation_level=None)
    (newest,) = conn.execute("SELECT max(observed_at) FROM raw_observation").fetchone()
    version = kasparro.read_version(conn)
    interval, span = SCENARIOS[scenario]
    chooser = random.Random(17)
    seconds = []
    for _ in range(reads):
        start = newest - span - span // 100 + chooser.randrange(6 * 3600)
        query = kasparro.HistoryQuery(interval=interval, start=start, end=start + span)
        asset_id = f"coin-{chooser.randrange(coins)}"
        started = time.process_time()
        conn.execute("BEGIN")
        kasparro.encode(kasparro.read_history(conn, version, asset_id, query))
        conn.execute("ROLLBACK")
        seconds.append(time.process_time() - started)
    return seconds


def instructions(db: Path, coins: int, scenario: str, reads: int) -> int:
    """Instructions (valgrind's I refs) of a child making `reads` reads."""
    argv = [sys.executable, __file__, "--child", "--db", str(db), "--coins", str(coins), "--reads", str(reads)]
    return cachegrind([*argv, "--scenario", scenario])


def cachegrind(argv: list[str]) -> int:
    """Instructions (valgrind's I refs) of running `argv`, with Python's hash seed fixed."""
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    done = subprocess.run(
        [*valgrind, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    return int(re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=STORE)
    parser.add_argument("--coins", type=int, default=7_500, help="coins of the store (half its listings)")
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--counted", type=int, default=20, help="reads counted under valgrind")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scenarios = args.scenario or list(SCENARIOS)
    if args.child:
        measure(args.db, args.coins, scenarios[0], args.reads)
        return
    for scenario in scenarios:
        seconds = sorted(measure(args.db, args.coins, scenario, args.reads))
        p99 = seconds[min(len(seconds) - 1, len(seconds) * 99 // 100)]
        line = f"{scenario}: CPU {statistics.median(seconds) * 1e3:.2f} ms median, {p99 * 1e3:.2f} ms p99"
        if shutil.which("valgrind"):
            counted = instructions(args.db, args.coins, scenario, args.counted)
            per_read = (counted - instructions(args.db, args.coins, scenario, 0)) / args.counted
            line += f"; {per_read / 1e6:.1f} M instructions a read (cachegrind, {args.counted} reads minus none)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
