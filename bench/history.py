"""History at a year's length: the store's size with the default retention, and a run's cost on it.

Builds the store that a year of 10-minute runs over 15,000 listings (7,500 coins, each listed by
two CSV sources) leaves with the default KASPARRO_KEEP_RAW and KASPARRO_KEEP_HOURLY, by driving
the ETL's own Loader (identity, listings, raw observations, roll-ups, pruning) in process with a
simulated clock. Only the observations whose traces the store keeps are loaded: every 10-minute
snapshot inside raw retention, one an hour inside hourly retention, one a day before that; each
leaves the rows a full year would (a candle has one row however many observations it holds).
Consecutive snapshots of a source share a Loader commit up to --batch-rows rows (the ETL's own
batch size for a CSV file by default: a file holding several snapshots loads the same way), and
the simulation's connection has a 256 MB page cache; neither changes the rows the store ends with.

Then the real etl.py loads one more 10-minute snapshot of every listing, on that store and on one
holding a day of history, in alternation, and prints both durations and their ratio; then the
pages each store's commits write over the next hour's six runs (WAL frames, in process).
`--runs-only` measures this, and the API part, on the stores a previous run left.

Last, the API serves the year's store as the README runs it (one uvicorn worker, default log level), and wrk
(one connection: each figure is a request's own latency) times history and /data?as_of= requests that each miss
the answer cache (a random coin, and a window or moment shifted by a random number of seconds), the same
requests cached, and the bare ASGI ceiling of the same machine in the same run. `--api-only` measures only this,
on the store a previous run left.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from api_bench import DEFAULT, parse_wrk, serve  # noqa: E402

import etl  # noqa: E402

OUT = ROOT / "bench" / "out" / "history"
SOURCES = ("alpha", "beta")
STEP = 600  # seconds between runs
HEADER = "id,symbol,name,rank,price,market_cap,volume_24h,change_24h,status,last_updated\n"


class Market:
    """Prices of `coins` coins walking randomly, each listed by every source under the same id."""

    def __init__(self, coins: int, seed: int = 17) -> None:
        self.rng = random.Random(seed)
        self.coins = coins
        self.prices = [self.rng.lognormvariate(0, 3) for _ in range(coins)]

    def move(self) -> None:
        self.prices = [price * self.rng.uniform(0.99, 1.01) for price in self.prices]

    def rows(self, when: str, first_line: int = 1) -> list[tuple]:
        """One snapshot as the Loader's staged rows: (line, *Observation fields), lines from first_line."""
        return [
            (first_line + n, f"coin-{n:06d}", f"C{n}", f"Coin {n}", f"coin{n}", n + 1, price, price * 1e7, price * 1e5,
             0.5, "active", when)
            for n, price in enumerate(self.prices)
        ]  # fmt: skip

    def csv(self, path: Path, when: str) -> Path:
        lines = [HEADER] + [
            f"coin-{n:06d},C{n},Coin {n},{n + 1},{price!r},{price * 1e7!r},{price * 1e5!r},0.5,active,{when}\n"
            for n, price in enumerate(self.prices)
        ]
        path.write_text("".join(lines))
        return path


def kept_instants(end: int, days: int, retention: etl.Retention) -> list[int]:
    """The run times of `days` days of 10-minute runs up to `end` whose observations the store keeps a trace of."""
    raw_from = (end - retention.raw) // etl.DAY * etl.DAY
    hourly_from = (end - retention.hourly) // etl.DAY * etl.DAY
    instants = []
    for t in range(end - days * etl.DAY + STEP, end + 1, STEP):
        if t >= raw_from or (t >= hourly_from and t % etl.HOUR < STEP) or t % etl.DAY < STEP:
            instants.append(t)
    return instants


SOURCES_AS_CSV = [etl.CsvSource(Path(f"{name}.csv"), name) for name in SOURCES]


def commit_rows(conn: etl.sqlite3.Connection, run_id: int, rows: list[tuple], label: str, wal: Path) -> list[int]:
    """Load staged rows as every source's batch, one Loader commit each, as a run of etl.py would; return how many
    bytes the store's WAL grew by in each commit."""
    grown = []
    for source in SOURCES_AS_CSV:
        before = wal.stat().st_size if wal.exists() else 0
        batch = etl.Batch(observations=rows, read=len(rows), end=etl.ReadPosition(0, len(rows)), final=True)
        with etl.Loader(conn, run_id, source.name) as loader:
            loader.commit(batch, label, batch.end, complete=True)
        etl.prune_history(conn, run_id, etl.Retention())
        grown.append(wal.stat().st_size - before)
    return grown


def simulate(db: Path, market: Market, end: int, days: int, batch_rows: int) -> None:
    """Load the kept snapshots of `days` days of runs into a new store through etl.Loader, consecutive snapshots
    of a source in one commit up to `batch_rows` rows."""
    conn = etl.connect(db, 60)
    conn.execute("PRAGMA cache_size = -262144")  # a commit of several snapshots dirties more than 16 MB
    etl.apply_schema(conn)
    instants = kept_instants(end, days, etl.Retention())
    per_commit = max(1, batch_rows // market.coins)
    started, day, shown = time.monotonic(), None, 0
    run_id = 0
    for first in range(0, len(instants), per_commit):
        chunk = instants[first : first + per_commit]
        if chunk[0] // etl.DAY != day:  # one recorded run a simulated day: run records are not what is measured
            day = chunk[0] // etl.DAY
            if run_id:
                etl.end_run(conn, run_id, "success", 0, None)
            run_id = etl.start_run(conn, SOURCES_AS_CSV)
        if first * 10 // len(instants) > shown:
            shown = first * 10 // len(instants)
            print(f"  {shown}0 % of {len(instants):,} snapshots, {time.monotonic() - started:,.0f} s", flush=True)
        rows: list[tuple] = []
        for t in chunk:
            market.move()
            rows += market.rows(etl.format_time(datetime.fromtimestamp(t, UTC)), len(rows) + 1)
        commit_rows(conn, run_id, rows, f"simulated {chunk[0]}-{chunk[-1]}", Path(f"{db}-wal"))
    etl.end_run(conn, run_id, "success", 0, None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def store_size(db: Path) -> int:
    return sum(path.stat().st_size for path in db.parent.glob(db.name + "*") if path.is_file())


def tiers(db: Path) -> str:
    conn = etl.sqlite3.connect(db)
    try:
        raw = conn.execute("SELECT count(*) FROM raw_observation").fetchone()[0]
        hourly, daily = (
            conn.execute("SELECT (SELECT count(*) FROM candle WHERE width = ?1)"
                         " + (SELECT count(*) FROM open_candle WHERE width = ?1)", (w,)).fetchone()[0]
            for w in (etl.HOUR, etl.DAY)
        )  # fmt: skip
    finally:
        conn.close()
    return f"{raw:,} raw observations, {hourly:,} hourly candles, {daily:,} daily candles"


def newest(db: Path) -> int:
    """The time of the newest raw observation of the store at db (Unix seconds)."""
    conn = etl.sqlite3.connect(db)
    try:
        return conn.execute("SELECT max(observed_at) FROM raw_observation").fetchone()[0]
    finally:
        conn.close()


def pages_written(db: Path, market: Market, instants: Sequence[int]) -> list[int]:
    """The pages each Loader commit writes (WAL frames, no checkpoint in between) for one snapshot of every
    listing at each of `instants`, loaded in process as etl.py's runs would."""
    conn = etl.connect(db, 60)
    try:
        etl.apply_schema(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        frame = conn.execute("PRAGMA page_size").fetchone()[0] + 24
        written = []
        for t in instants:
            market.move()
            rows = market.rows(etl.format_time(datetime.fromtimestamp(t, UTC)))
            run_id = etl.start_run(conn, SOURCES_AS_CSV)
            grown = commit_rows(conn, run_id, rows, f"measured {t}", Path(f"{db}-wal"))
            written += [size // frame for size in grown]
            etl.end_run(conn, run_id, "success", 0, None)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return written


def real_run(db: Path, market: Market, t: int) -> float:
    """Wall seconds of `python etl.py` loading one snapshot of every listing at time t."""
    when = etl.format_time(datetime.fromtimestamp(t, UTC))
    feeds = [market.csv(OUT / f"{name}.csv", when) for name in SOURCES]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_")}
    argv = [sys.executable, str(ROOT / "etl.py"), "--db", str(db)]
    argv += [f"csv:{name}={feed}" for name, feed in zip(SOURCES, feeds, strict=True)]
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


# (label, path, earliest from or as_of relative to the newest observation, span, target p99 in ms)
API_SCENARIOS = (
    ("interval=1h over 30 days", "/data/coin-{coin}/history?interval=1h&from={from}&to={to}", -30 * etl.DAY,
     30 * etl.DAY, 10),
    ("interval=1d over a year", "/data/coin-{coin}/history?interval=1d&from={from}&to={to}", -365 * etl.DAY,
     365 * etl.DAY, 10),
    ("interval=raw over a day", "/data/coin-{coin}/history?interval=raw&from={from}&to={to}", -etl.DAY, etl.DAY, 5),
    ("/data?as_of=...&page_size=100, inside raw retention", "/data?as_of={from}&page_size=100", -etl.DAY, 0, 100),
    ("/data?as_of=...&page_size=100, 3 months back", "/data?as_of={from}&page_size=100", -90 * etl.DAY, 0, 100),
)  # fmt: skip
SHIFT = 6 * etl.HOUR  # seconds by which an uncached request's window or moment moves, at random
WRK_SECONDS = 15


def wrk_run(port: int, env: dict[str, str], seconds: float) -> tuple[float, float, int, int]:
    """p50 and p99 (ms), responses and failures of one wrk run of bench/history.lua, on one connection."""
    script = str(ROOT / "bench" / "history.lua")
    argv = [
        "wrk",
        "-t1",
        "-c1",
        f"-d{seconds:g}s",
        "--timeout=30s",
        "--latency",
        "-s",
        script,
        f"http://127.0.0.1:{port}/",
    ]
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    measure = parse_wrk(done.stdout)
    answered = int(done.stdout.split(" requests in ")[0].split()[-1])
    return measure.p50_ms, measure.p99_ms, answered, measure.errors


def measure_api(db: Path, listings: int, scenarios: Sequence[tuple] = API_SCENARIOS) -> None:
    """wrk p50/p99 of each of `scenarios`' requests, uncached and cached, against one worker over the store at db."""
    conn = etl.sqlite3.connect(db)
    try:
        (newest,) = conn.execute("SELECT max(observed_at) FROM raw_observation").fetchone()
    finally:
        conn.close()
    coins = listings // len(SOURCES)
    api_env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * etl.DAY)}
    with serve("ceiling", "bench.ceiling:app", {}, "/") as ceiling:
        ceiling_env = {"BENCH_PATH": "/", "BENCH_FROM": "0"}
        wrk_run(ceiling.port, ceiling_env, 3)
        p50, p99, answered, _ = wrk_run(ceiling.port, ceiling_env, WRK_SECONDS)
        print(f"ceiling (bare ASGI, constant JSON), 1 connection: p50 {p50:.2f} ms, p99 {p99:.2f} ms, {answered:,}")
    with serve("api-history", "kasparro:app", api_env, "/health", DEFAULT) as api:
        for label, path, back, span, target in scenarios:
            first = newest + back - (SHIFT if span == 0 else span // 100)
            for kind, shift, coins_drawn in (("uncached", SHIFT, coins), ("cached", 0, 1)):
                env = {"BENCH_PATH": path, "BENCH_FROM": str(first), "BENCH_SHIFT": str(shift),
                       "BENCH_SPAN": str(span), "BENCH_COINS": str(coins_drawn)}  # fmt: skip
                wrk_run(api.port, env, 3)
                p50, p99, answered, errors = wrk_run(api.port, env, WRK_SECONDS)
                verdict = (
                    "" if kind == "cached" else f" (target p99 <= {target} ms: {'PASS' if p99 <= target else 'FAIL'})"
                )
                print(f"{label}, {kind}: p50 {p50:.2f} ms, p99 {p99:.2f} ms over {answered:,} responses,"
                      f" {errors} errors{verdict}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listings", type=int, default=15_000, help="listings in all (half per source)")
    parser.add_argument("--days", type=int, default=365, help="days of history in the long store")
    parser.add_argument("--rounds", type=int, default=3, help="real runs on each store, alternating")
    parser.add_argument("--batch-rows", type=int, default=etl.EtlConfig.batch_rows,
                        help="rows a simulated commit holds at most (whole snapshots)")  # fmt: skip
    parser.add_argument("--api-only", action="store_true", help="only time the API, on the year's store left before")
    parser.add_argument("--runs-only", action="store_true", help="reuse the stores left before: no simulation")
    parser.add_argument("--no-api", action="store_true", help="leave out the API part")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.api_only:
        measure_api(OUT / "year.db", args.listings)
        return
    stores = {"year": OUT / "year.db", "day": OUT / "day.db"}
    markets = {label: Market(args.listings // len(SOURCES)) for label in stores}
    if args.runs_only:
        for store in stores.values():  # a store of an older schema is upgraded before any run is timed
            conn = etl.connect(store, 60)
            etl.apply_schema(conn)
            conn.close()
        end = max(newest(store) for store in stores.values())
    else:
        # The last simulated run is far enough before now that the real and measured runs after it are not in
        # the future (etl.py refuses observations more than 5 minutes after its start).
        end = (int(time.time()) - (args.rounds + 10) * STEP) // STEP * STEP
        for label, days in (("day", 1), ("year", args.days)):
            for path in OUT.glob(stores[label].name + "*"):
                path.unlink()
            print(f"building {label} store: {days} days of 10-minute runs over {args.listings:,} listings", flush=True)
            started = time.monotonic()
            simulate(stores[label], markets[label], end, days, args.batch_rows)
            print(f"  built in {time.monotonic() - started:,.0f} s: {store_size(stores[label]) / 1e9:.3f} GB;"
                  f" {tiers(stores[label])}", flush=True)  # fmt: skip
    seconds: dict[str, list[float]] = {"year": [], "day": []}
    for round_ in range(1, args.rounds + 1):
        for label in ("year", "day"):
            markets[label].move()
            seconds[label].append(real_run(stores[label], markets[label], end + round_ * STEP))
    year, day = statistics.median(seconds["year"]), statistics.median(seconds["day"])
    size = store_size(stores["year"])
    print(f"store after {args.days} days: {size / 1e9:.3f} GB (target <= 2 GB): {tiers(stores['year'])}")
    print(
        f"one more run of {args.listings:,} listings: {year:.2f} s on it, {day:.2f} s on a day's store"
        f" (medians of {args.rounds}): {year / day:.2f}x (target <= 1.2x)"
    )
    print("runs:", {label: [round(s, 2) for s in runs] for label, runs in seconds.items()})
    with contextlib.suppress(OSError):
        for feed in OUT.glob("*.csv"):
            feed.unlink()
    # The next hour's six runs: one of them opens a new hour (and closes the last one's candles).
    after = [end + (args.rounds + n) * STEP for n in range(1, 7)]
    for label in ("year", "day"):
        written = pages_written(stores[label], markets[label], after)
        rows = args.listings // len(SOURCES)
        print(f"pages written by a {rows:,}-row commit on the {label} store over the next hour's runs"
              f" (WAL frames): {written}, median {statistics.median(written):,.0f}", flush=True)  # fmt: skip
    if not args.no_api:
        measure_api(stores["year"], args.listings)


if __name__ == "__main__":
    main()
