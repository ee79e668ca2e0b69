"""History at a year's length: the store's size with the default retention, and a run's cost on it.

Builds the store that a year of 10-minute runs over 15,000 listings (7,500 coins, each listed by
two CSV sources) leaves with the default KASPARRO_KEEP_RAW and KASPARRO_KEEP_HOURLY, by driving
the ETL's own Loader (identity, listings, raw observations, roll-ups, pruning) in process with a
simulated clock. Only the observations whose traces the store keeps are loaded: every 10-minute
snapshot inside raw retention, one an hour inside hourly retention, one a day before that; each
leaves the rows a full year would (a candle has one row however many observations it holds).

Then the real etl.py loads one more 10-minute snapshot of every listing, on that store and on one
holding a day of history, in alternation, and prints both durations and their ratio.

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

    def rows(self, when: str) -> list[tuple]:
        """One snapshot as the Loader's staged rows: (line, *Observation fields)."""
        return [
            (n + 1, f"coin-{n:06d}", f"C{n}", f"Coin {n}", f"coin{n}", n + 1, price, price * 1e7, price * 1e5,
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


def simulate(db: Path, market: Market, end: int, days: int) -> None:
    """Load the kept snapshots of `days` days of runs into a new store through etl.Loader."""
    retention = etl.Retention()
    sources = [etl.CsvSource(Path(f"{name}.csv"), name) for name in SOURCES]
    conn = etl.connect(db, 60)
    etl.apply_schema(conn)
    instants = kept_instants(end, days, retention)
    started, day, shown = time.monotonic(), None, 0
    run_id = 0
    for number, t in enumerate(instants):
        if t // etl.DAY != day:  # one recorded run a simulated day: run records are not what is measured
            day = t // etl.DAY
            if run_id:
                etl.end_run(conn, run_id, "success", 0, None)
            run_id = etl.start_run(conn, sources)
        if number * 10 // len(instants) > shown:
            shown = number * 10 // len(instants)
            print(f"  {shown}0 % of {len(instants):,} snapshots, {time.monotonic() - started:,.0f} s", flush=True)
        market.move()
        when = etl.format_time(datetime.fromtimestamp(t, UTC))
        rows = market.rows(when)
        for source in sources:
            batch = etl.Batch(observations=rows, read=len(rows), end=etl.ReadPosition(0, len(rows)), final=True)
            with etl.Loader(conn, run_id, source.name, retention) as loader:
                loader.commit(batch, f"simulated {t}", batch.end, complete=True)
    etl.end_run(conn, run_id, "success", 0, None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def store_size(db: Path) -> int:
    return sum(path.stat().st_size for path in db.parent.glob(db.name + "*") if path.is_file())


def tiers(db: Path) -> str:
    conn = etl.sqlite3.connect(db)
    try:
        raw = conn.execute("SELECT count(*) FROM raw_observation").fetchone()[0]
        hourly, daily = (conn.execute("SELECT count(*) FROM candle WHERE width = ?", (w,)).fetchone()[0]
                         for w in (etl.HOUR, etl.DAY))  # fmt: skip
    finally:
        conn.close()
    return f"{raw:,} raw observations, {hourly:,} hourly candles, {daily:,} daily candles"


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
    parser.add_argument("--api-only", action="store_true", help="only time the API, on the year's store left before")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.api_only:
        measure_api(OUT / "year.db", args.listings)
        return
    # The last simulated run is a little before now, so the real runs after it are not in the future.
    end = (int(time.time()) - 4 * STEP) // STEP * STEP
    stores = {"year": OUT / "year.db", "day": OUT / "day.db"}
    markets = {}
    for label, days in (("day", 1), ("year", args.days)):
        for path in OUT.glob(stores[label].name + "*"):
            path.unlink()
        markets[label] = Market(args.listings // len(SOURCES))
        print(f"building {label} store: {days} days of 10-minute runs over {args.listings:,} listings", flush=True)
        started = time.monotonic()
        simulate(stores[label], markets[label], end, days)
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
    measure_api(stores["year"], args.listings)


if __name__ == "__main__":
    main()
