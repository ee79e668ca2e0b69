"""How fast can GET /data/{asset_id} be on ids drawn from all assets? Bounds beside the API.

Runs, each right after its own ceiling run (bench/ceiling.py), on the store of bench/api_bench.py:
- the API itself (kasparro:app), as in api_bench's `asset` scenario;
- bare/composed: the API's read of one uncached asset (kasparro.read_asset) in a bare ASGI app, with
  no framework, request ids, ETags, metrics or cache: no design that keeps reading the rows can beat it;
- bare/body: a bare app reading one stored body per asset (one B-tree search, no encoding), the bound of
  a store where etl.py writes each asset's detail. The bodies are made here once, from the store, into
  bench/out/bodies-<store>.db, and the time it takes is printed.

Prints one table and appends it to bench/results.md. `just bench-detail` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import api_bench
from api_bench import BY_NAME, CEILING, OUT, RESULTS, Result, Scenario, Server, load, serve

from stores import read_only_uri

sys.path.insert(0, str(api_bench.ROOT))  # kasparro, for its read_asset

import kasparro

ASSET = BY_NAME["asset"]


def make_bodies(db: Path) -> tuple[Path, str]:
    """A table asset_id -> the API's detail body of every asset of db, made once per store."""
    bodies = OUT / f"bodies-{db.stem}.db"
    if bodies.exists():
        return bodies, f"reused {bodies.name}"
    building = bodies.with_suffix(".building")
    building.unlink(missing_ok=True)
    started = time.perf_counter()
    with (
        contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as store,
        contextlib.closing(sqlite3.connect(building, isolation_level=None)) as out,
    ):
        out.execute("CREATE TABLE body (asset_id TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID")
        version = kasparro.DataVersion("bare", 0)
        ids = [row[0] for row in store.execute("SELECT asset_id FROM asset ORDER BY asset_id")]
        out.execute("BEGIN")
        out.executemany(
            "INSERT INTO body VALUES (?, ?)",
            ((asset_id, kasparro.encode(kasparro.read_asset(store, version, asset_id))) for asset_id in ids),
        )
        out.execute("COMMIT")
    building.rename(bodies)
    seconds = time.perf_counter() - started
    size = bodies.stat().st_size / 1e6
    return bodies, f"made {bodies.name} from the rows in {seconds:.1f} s ({size:,.0f} MB beside the store)"


def measure(server: Server, scenario: Scenario, args: argparse.Namespace, env: dict[str, str]) -> api_bench.Measure:
    print(f"{server.name}: {scenario.name} ...", flush=True)
    return load(server, scenario, args.warmup, args.duration, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=5)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    db, etl_note = api_bench.build_store(args.rows, api_bench.etl_source(None))
    bodies, bodies_note = make_bodies(db)
    print(etl_note, bodies_note, sep="\n", flush=True)
    env = {"BENCH_IDS": str(api_bench.sample_ids(db, None))}
    runs = [
        ("kasparro:app", {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}, "the API"),
        ("bench.bare_detail:app", {"KASPARRO_DB": str(db), "BARE_READ": "composed"}, "bare/composed"),
        ("bench.bare_detail:app", {"BARE_BODIES": str(bodies), "BARE_READ": "body"}, "bare/body"),
    ]
    results: list[Result] = []
    with serve("ceiling", "bench.ceiling:app", {}, "/") as ceiling:
        for app, app_env, title in runs:
            name = f"{ASSET.name}-{title.replace('/', '-').replace(' ', '-')}"
            scenario = Scenario(name, f"{title}: {ASSET.title}", script=ASSET.script, ids="all")
            with serve(name, app, app_env, "/health" if app == "kasparro:app" else "/") as server:
                paired = measure(ceiling, CEILING, args, {})
                results.append(Result(CEILING, paired, before=scenario))
                results.append(Result(scenario, measure(server, scenario, args, env), paired))
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    header = f"### bench-detail, {args.rows:,} rows, commit {api_bench.commit_id()}, {when}"
    setup = (
        f"wrk -t{api_bench.THREADS} -c{api_bench.CONNECTIONS}, warm-up {args.warmup:g} s, measured {args.duration:g} s;"
        f" ids drawn uniformly from all {args.rows:,} assets; the ceiling measured right before each; {etl_note};"
        f" {bodies_note}"
    )
    lines = [header, "", setup, "", *api_bench.table(results, None, 0)]
    print("\n" + "\n".join(lines))
    with RESULTS.open("a") as out:
        out.write("\n".join(["", *lines, ""]))


if __name__ == "__main__":
    os.chdir(api_bench.ROOT)
    main()
