"""/data?as_of= at full scale: the CPU of building a moment's market in each tier, then wrk against one worker.

bench/history.py builds the store a year of 10-minute runs leaves through the ETL's Loader alone, which takes
hours at 15,000 listings. This builds a store of the same shape in minutes: the listings' identity (listing,
source_map, asset, store_meta) through the Loader, from one snapshot of every listing, then the history that
the Loader leaves with the default retention written by SQL, in key order: a raw observation every 10 minutes
over the raw tier, an hourly candle per hour over the hourly tier, a daily candle per day over the year, and
each listing's pruning horizons. (Its pages are fuller than those of a store written run by run: a look-up
reads one leaf page either way.)

Then, in process, it times build_market and the first page of /data?as_of=&page_size=100 over its market
(time.process_time: CPU, which other work on the machine moves less than wall time) at distinct moments
in each tier: inside raw retention, in the hourly tier, months back in the daily tier, with the read system
calls each made (the pages its connections' caches did not hold); `--counted` adds the instructions a build
costs (valgrind cachegrind: figures other work on the machine does not move). `--api` also runs
bench/history.py's /data?as_of= scenarios under wrk on this store, beside the bare ASGI ceiling.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import history  # noqa: E402
import history_reads  # noqa: E402

import etl  # noqa: E402
import kasparro  # noqa: E402
from stores import read_only_uri  # noqa: E402

OUT = ROOT / "bench" / "out" / "as_of"
YEAR = 365 * etl.DAY
# (tier, how far back from the newest observation its moments lie); each moment is shifted by up to SHIFT
TIERS = (("raw", etl.DAY), ("hourly", 10 * etl.DAY), ("daily", 90 * etl.DAY))
SHIFT = 6 * etl.HOUR
# A moment's value columns: a price that moves with the listing and the time, the rest derived from it.
PRICE = "(1 + (listing_id * 7919 + t / 600 * 104729) % 100000) / 1000.0"


def build_store(db: Path, listings: int, end: int) -> None:
    """The store described above, at `db`, its newest observation at `end`."""
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    retention = etl.Retention()
    conn = etl.connect(db, 60)
    conn.execute("PRAGMA cache_size = -1000000")  # 1 GB: the history is written in one transaction
    etl.apply_schema(conn)
    run_id = etl.start_run(conn, [etl.CsvSource(Path(f"{name}.csv"), name) for name in history.SOURCES])
    rows = history.Market(listings // len(history.SOURCES)).rows(etl.format_time(datetime.fromtimestamp(end, UTC)))
    for name in history.SOURCES:
        batch = etl.Batch(observations=rows, read=len(rows), end=etl.ReadPosition(0, len(rows)), final=True)
        with etl.Loader(conn, run_id, name) as loader:
            loader.commit(batch, f"simulated {end}", batch.end, complete=True)
        etl.prune_history(conn, run_id, retention)
    etl.end_run(conn, run_id, "success", 0, None)
    raw_from = (end - retention.raw) // etl.DAY * etl.DAY
    hourly_from = (end - retention.hourly) // etl.DAY * etl.DAY
    started = time.monotonic()
    conn.execute("BEGIN")
    # Listing by listing (CROSS JOIN: the outer loop), its times in order: the rows come in key order.
    steps = "WITH RECURSIVE at(t) AS (SELECT ?1 UNION ALL SELECT t + ?3 FROM at WHERE t + ?3 < ?2)"
    conn.execute(
        f"{steps} INSERT INTO raw_observation SELECT listing_id, t, listing_id % 7500 + 1, {PRICE}, {PRICE} * 1e7,"
        f" {PRICE} * 1e5, 0.5, 1 FROM listing CROSS JOIN at",
        (raw_from, end, history.STEP),
    )
    for width, kept_from in ((etl.HOUR, hourly_from), (etl.DAY, (end - YEAR) // etl.DAY * etl.DAY)):
        conn.execute(
            f"{steps} INSERT OR IGNORE INTO candle SELECT listing_id, ?3, t, {PRICE}, {PRICE} * 1.01, {PRICE} * 0.99,"
            f" {PRICE}, {PRICE} * 1e7, {PRICE} * 1e5, ?3 / 600, t, t + ?3 - 600 FROM listing CROSS JOIN at",
            (kept_from, end, width),
        )
    conn.execute("UPDATE listing SET raw_before = ?, hourly_before = ?", (raw_from, hourly_from))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"built {db} in {time.monotonic() - started:,.0f} s: {history.store_size(db) / 1e9:.3f} GB;"
          f" {history.tiers(db)}", flush=True)  # fmt: skip


def read_calls() -> int:
    """The read system calls this process has made (pread: a page SQLite did not have in its cache)."""
    return int(Path("/proc/self/io").read_text().split("syscr:")[1].split()[0])


def time_builds(db: Path, builds: int, tiers: Sequence[tuple[str, int]] = TIERS) -> None:
    """CPU (all threads), wall time and read system calls of build_market plus the first page over it, at `builds`
    distinct moments in each of `tiers`, one MarketBuilders for all as in a worker between two commits; the first
    build also makes the identity a data version's builds share, and is shown apart."""
    uri = read_only_uri(db)
    conn = etl.sqlite3.connect(db)
    try:
        (newest,) = conn.execute("SELECT max(observed_at) FROM raw_observation").fetchone()
        (listings,) = conn.execute("SELECT count(*) FROM listing").fetchone()
    finally:
        conn.close()
    rng = random.Random(17)
    builders, identity = kasparro.MarketBuilders(uri), None
    for tier, back in tiers:
        seconds, walls, reads = [], [], []
        for _ in range(builds + (identity is None)):
            as_of = newest - back - rng.randrange(SHIFT)
            query = kasparro.AssetQuery(as_of=as_of, page_size=100)
            started, wall, calls = time.process_time(), time.perf_counter(), read_calls()
            market, made = kasparro.build_market(builders, as_of, identity)
            page = kasparro.read_page(market.conn, market.version, query, market.commit)
            cpu, wall = time.process_time() - started, time.perf_counter() - wall
            calls = read_calls() - calls
            market.conn.close()
            assert page.total_items * len(history.SOURCES) == listings, (page.total_items, tier)
            if identity is None:
                print(f"first build, with the identity: CPU {cpu * 1e3:.1f} ms, {calls:,} reads", flush=True)
                identity = made
            else:
                seconds.append(cpu)
                walls.append(wall)
                reads.append(calls)
        if not builds:
            continue
        median = statistics.median(seconds)
        print(
            f"{tier}: build + first page, CPU median {median * 1e3:.1f} ms, max {max(seconds) * 1e3:.1f} ms"
            f" over {builds} moments: {median / listings * 1e6:.2f} us a listing ({listings:,}); wall median"
            f" {statistics.median(walls) * 1e3:.1f} ms in {kasparro.MARKET_PARTS} parts at once; reads median"
            f" {statistics.median(reads):,.0f} (first {reads[0]:,})",
            flush=True,
        )


def instructions(db: Path, tier: str, builds: int) -> int:
    """Instructions (valgrind's I refs) of a child that makes the identity and then `builds` builds in `tier`."""
    return history_reads.cachegrind(
        [sys.executable, __file__, "--child", tier, "--db", str(db), "--builds", str(builds)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listings", type=int, default=15_000, help="listings in all (half per source)")
    parser.add_argument("--rebuild", action="store_true", help="build the store again even if one is there")
    parser.add_argument("--builds", type=int, default=20, help="moments timed in each tier")
    parser.add_argument("--db", type=Path, help="time this store of a year's shape instead (bench-history's year.db)")
    parser.add_argument(
        "--counted", type=int, default=0, help="then valgrind's instructions a build: N builds minus none"
    )
    parser.add_argument("--api", action="store_true", help="then wrk /data?as_of= against one uvicorn worker")
    parser.add_argument("--child", choices=[tier for tier, _ in TIERS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    db = args.db or OUT / f"store-{args.listings}.db"
    if args.child:
        time_builds(db, args.builds, [tier for tier in TIERS if tier[0] == args.child])
        return
    if args.db is None and (args.rebuild or not db.exists()):
        build_store(db, args.listings, (int(time.time()) - 4 * history.STEP) // history.STEP * history.STEP)
    time_builds(db, args.builds)
    for tier, _ in TIERS if args.counted else ():
        counted = instructions(db, tier, args.counted) - instructions(db, tier, 0)
        print(f"{tier}: {counted / args.counted / 1e6:.1f} M instructions a build + first page (cachegrind,"
              f" {args.counted} builds minus none)", flush=True)  # fmt: skip
    if args.api:
        history.measure_api(db, args.listings, [s for s in history.API_SCENARIOS if "as_of" in s[1]])


if __name__ == "__main__":
    main()
