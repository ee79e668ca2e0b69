"""Uncached GET /stats over a store recording a year of 10-minute runs (52,560), in the README's configuration.

The runs are recorded by etl.py's own run-record code (two sources each, one in ten failing); before each
timed request one more run is recorded, so every answer is read anew, as after each real run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from api_bench import DEFAULT, HOST, OUT, ROOT, serve

sys.path.insert(0, str(ROOT))
import etl

SOURCES = [etl.CsvSource(Path("coingecko.csv")), etl.CsvSource(Path("coinpaprika.csv"))]


def record_runs(conn: etl.sqlite3.Connection, count: int) -> None:
    """`count` finished runs, as etl.py records them, each with an outcome per source."""
    for n in range(count):
        run_id = etl.start_run(conn, SOURCES)
        failed = n % 10 == 0
        for source in SOURCES:
            tally = etl.Tally(15_000, 15_000 if not failed else 0, 0)
            status, error = ("failed", "upstream answered 503") if failed else ("success", None)
            etl.end_source(conn, run_id, etl.SourceOutcome(source.name, status, tally, 900, error=error))
        etl.end_run(conn, run_id, "partial" if failed else "success", 1_800, None)


def build_store(runs: int) -> Path:
    """The sample store with `runs` more runs recorded, reused between invocations."""
    db = OUT / f"stats-{runs}.db"
    if db.exists():
        return db
    building = OUT / "stats-building.db"
    for stale in OUT.glob("stats-building.db*"):
        stale.unlink()
    subprocess.run([sys.executable, str(ROOT / "etl.py"), "--db", str(building)], cwd=ROOT, check=True,
                   env={**os.environ, "LOG_LEVEL": "warning"}, stdout=subprocess.DEVNULL)  # fmt: skip
    started = time.perf_counter()
    with contextlib.closing(etl.connect(building, busy_timeout=5)) as conn:
        record_runs(conn, runs)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"recorded {runs:,} runs in {time.perf_counter() - started:.1f} s", flush=True)
    shutil.move(building, db)
    return db


def history(description: str) -> tuple[argparse.Namespace, Path, dict[str, str]]:
    """The command line (--runs, --requests), the store of that many runs, and the API's environment over it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=52_560)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    db = build_store(args.runs)
    return args, db, {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}


def main() -> None:
    args, db, env = history(__doc__)
    with (
        serve("api-stats", "kasparro:app", env, "/health", DEFAULT) as api,
        contextlib.closing(etl.connect(db, busy_timeout=5)) as conn,
    ):
        client = http.client.HTTPConnection(HOST, api.port, timeout=30)
        latencies = []
        for _ in range(args.requests):
            record_runs(conn, 1)  # a commit: the next answer is read anew
            sent = time.perf_counter()
            client.request("GET", "/stats")
            response = client.getresponse()
            body = response.read()
            latencies.append((time.perf_counter() - sent) * 1000)
            assert response.status == 200, body[:300]
        client.close()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    verdict = "PASS" if p99 <= 5 else "FAIL"
    print(
        f"uncached GET /stats at {args.runs:,}+ runs: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms"
        f" over {args.requests} requests, each after a new run was recorded; target p99 <= 5 ms: {verdict}"
    )


if __name__ == "__main__":
    main()
