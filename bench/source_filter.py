"""/data pages with filter_by=source in process: what a source filter costs, by how many listings it matches.

A store of --rows generated assets (bench/api_bench.py's, loaded by the real etl.py and reused) is copied, and
two more sources are loaded into the copy by etl.py: csv:Été (--rows / 200 listings: half of them of assets the
first source lists, so those assets have two sources) and csv:small (20 assets of its own). Each read is on one
connection as the API opens them, with nothing kept between reads (a new Commit each time), --reads times; the
median and the least are printed in ms. `--api DIR` reads with the kasparro.py of another checkout (an export
of a commit), to set two versions side by side on the same store. The as_of lines read a market at the stores'
time, built once (its build is not timed).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api_bench import OUT, ROOT, build_store
from filter_pages import load_api

from stores import read_only_uri

AS_OF = "2026-11-25T12:01:00Z"  # after every generated observation


def sources_store(rows: int) -> Path:
    """A copy of the generated store with csv:Été and csv:small loaded into it."""
    source, _ = build_store(rows, ROOT)
    db = OUT / f"source-filter-{rows}.db"
    if db.exists():
        return db
    building = OUT / f"source-filter-{rows}.building.db"
    shutil.copyfile(source, building)
    shared = OUT / "Été.csv"
    small = OUT / "small.csv"
    with (OUT / f"etl-{rows}.csv").open(encoding="utf-8") as generated:
        picked = [row for n, row in enumerate(csv.DictReader(generated), 1) if n % 400 == 0]
    header = "id,symbol,name,price,last_updated\n"
    lines = [f"e-{n},{row['symbol']},{row['name']},{n},2026-11-25T12:00:30Z\n" for n, row in enumerate(picked)]
    lines += [f"new-{n},NEW{n % 7},Fresh {n},{n + 1},2026-11-25T12:00:30Z\n" for n in range(len(picked))]
    shared.write_text(header + "".join(lines), encoding="utf-8")
    small.write_text(
        header + "".join(f"s-{n},SML{n},Small {n},{n + 1},2026-11-25T12:00:40Z\n" for n in range(20)), encoding="utf-8"
    )
    etl = [sys.executable, str(ROOT / "etl.py"), "--db", str(building), f"csv:{shared}", f"csv:small={small}"]
    subprocess.run(etl, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    for suffix in ("-wal", "-shm", ".etl-lock"):
        building.with_name(building.name + suffix).unlink(missing_ok=True)
    building.rename(db)
    return db


def timed(reads: int, read: Callable[[], Any]) -> tuple[float, float, Any]:
    times, answer = [], None
    for _ in range(reads):
        start = time.perf_counter()
        answer = read()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, min(times) * 1000, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--api", type=Path, default=ROOT, help="the checkout whose kasparro.py reads")
    parser.add_argument("--no-as-of", action="store_true", help="leave out the as_of market (its build is long)")
    parser.add_argument("--cases", help="labels of the cases to read, separated by ; (default: all)")
    args = parser.parse_args()
    api = load_api(args.api)
    db = sources_store(args.rows)
    uri = read_only_uri(db)
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, detect_types=api.COLUMN_TYPES)
    api.Store._read_only(conn, 1000)
    big = f"csv:etl-{args.rows}"
    cases = {
        "nothing": {"filter_by": "source:csv:nothing"},
        "small": {"filter_by": "source:CSV:SMALL"},
        "shared (NFD, upper)": {"filter_by": "source:CSV:E\u0301TE\u0301"},
        "all (big source)": {"filter_by": f"source:{big}"},
        "big or small": {"filter_by": f"source:{big}|csv:small"},
        "big, -price": {"filter_by": f"source:{big}", "sort": "-price_usd"},
        "big + name:": {"filter_by": f"source:{big},name~kaspa", "sort": "name"},
        "shared + active": {"filter_by": "source~été,active", "sort": "-market_cap_usd"},
        "big page 200": {"filter_by": f"source:{big}", "page": "200"},
    }
    if args.cases:
        cases = {label: params for label, params in cases.items() if label in args.cases.split(";")}
    print(f"{db.name} with {api.__file__}")

    def read(conn: sqlite3.Connection, query: Any) -> Any:
        version = api.read_version(conn)
        return api.read_page(conn, version, query, api.Commit(0, version))

    def count(conn: sqlite3.Connection, query: Any) -> int:
        version = api.read_version(conn)
        if not hasattr(api, "resolve_sources"):  # a kasparro.py before source filters were resolved
            return api.count_assets(conn, query, api.Commit(0, version))
        sources = api.resolve_sources(conn, query.conditions)
        return api.count_assets(conn, query, api.Commit(0, version), sources)

    def report(label: str, reads: int, fn: Callable[[], Any]) -> None:
        median, least, answer = timed(reads, fn)
        shown = answer.total_items if hasattr(answer, "total_items") else ("" if answer is None else answer)
        ids = [a.asset_id for a in answer.data[:3]] if hasattr(answer, "data") else ""
        print(f"{label:34} {median:9.2f} ms (least {least:8.2f})  {shown!s:>8} {ids}", flush=True)

    for label, params in cases.items():
        query = api.parse_asset_query(params)
        report(f"page  {label}", args.reads, lambda q=query: read(conn, q))
        if "page" not in params:
            report(f"count {label}", args.reads, lambda q=query: count(conn, q))
            first = read(conn, query)
            if first.next_cursor:
                cursor = api.parse_asset_query({**params, "cursor": first.next_cursor})
                report(f"next  {label}", args.reads, lambda q=cursor: read(conn, q))
    if args.no_as_of:
        return
    as_of = api.parse_moment("as_of", AS_OF)
    start = time.perf_counter()
    market, _ = api.build_market(api.MarketBuilders(uri), as_of, None)
    print(f"market of {market.assets:,} assets built in {(time.perf_counter() - start) * 1000:.0f} ms")
    if hasattr(market, "list_sources"):  # filled by the first source filter that reads the market
        report("as_of list_sources", 1, market.list_sources)
    for label, params in cases.items():
        query = api.parse_asset_query({**params, "as_of": AS_OF})
        report(f"as_of {label}", args.reads, lambda q=query: read(market.conn, q))


if __name__ == "__main__":
    main()
