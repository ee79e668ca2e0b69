"""The peers `just bench` sets beside Kasparro: the seed's stack (FastAPI) and Datasette, over the same rows.

Each peer loads bench/out/etl-<rows>.csv its own way into a store of its own, kept in bench/out while the
rows and the peer's loading code are unchanged, and is served in its default configuration (uvicorn's access
log on, as Kasparro's request log line is) by its own command on 127.0.0.1. Run as a script, it checks that
each peer's pages hold the same assets in the same order as Kasparro's, and prints single-request latencies.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import importlib.metadata
import json
import os
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peer_fastapi import load_csv
from sqlite_utils.cli import cli as sqlite_utils_cli

from gen_csv import write_csv
from stores import read_only_uri

# bench/api_bench.py imports this module, so this one imports api_bench only inside the check's functions.
if TYPE_CHECKING:
    from api_bench import Server

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
HOST = "127.0.0.1"
# The pages every peer serves, by api_bench's names of those scenarios, as Kasparro's /data is asked for them.
KASPARRO_PATHS = {
    "first-page": "/data?page_size=100",
    "filtered-sorted": "/data?filter_by=active&page_size=100&sort=-market_cap_usd",
}
LATENCY_SAMPLES = 20  # sequential requests whose median is a scenario's single-request latency


@dataclass(frozen=True)
class Command:
    """How to serve a peer: argv run in the repository's root, env added to the inherited environment."""

    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class Peer:
    """A service Kasparro is compared with: how its store is built and served, and its scenarios' URL paths."""

    name: str
    title: str
    build: Callable[[int, Path], tuple[Path, str]]  # (rows, folder) -> (store, what was done), reused when current
    command: Callable[[Path, int], Command]  # (store, port) -> how to serve it there
    paths: dict[str, str]  # scenario name (as in KASPARRO_PATHS) -> URL path of the same page
    ready_path: str  # answers 200 once the server is up
    ids: Callable[[bytes], list[str]]  # a page's response body -> its assets' CSV ids, in order


# --- stores ---------------------------------------------------------------


def bench_csv(rows: int, out: Path = OUT) -> Path:
    """out/etl-<rows>.csv, the file bench/api_bench.py and bench/etl_bench.py load, generated if missing."""
    path = out / f"etl-{rows}.csv"
    if not path.exists():
        print(f"generating {path.name} ...", flush=True)
        partial = path.with_suffix(".partial")
        write_csv(partial, rows)
        partial.rename(path)
    return path


def store_key(rows: int, *code: bytes) -> str:
    """What a peer's store depends on: the row count, the CSV generator and the peer's loading code."""
    digest = hashlib.blake2b((BENCH / "gen_csv.py").read_bytes(), digest_size=6)
    for part in code:
        digest.update(part)
    return f"{rows}-{digest.hexdigest()}"


def cached(out: Path, prefix: str, key: str, suffix: str, load: Callable[[Path], None]) -> tuple[Path, str]:
    """out/<prefix>-<key><suffix>, made by `load` into a temporary path and renamed, or reused.

    Another key's store of the same row count (or what a killed build left) is removed first.
    """
    done = out / f"{prefix}-{key}{suffix}"
    if done.exists():
        return done, f"reused {done.name}"
    for stale in out.glob(f"{prefix}-{key.split('-')[0]}-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()
    building = done.with_name(done.name + ".building")
    started = time.perf_counter()
    load(building)
    building.rename(done)
    return done, f"built {done.name} in {time.perf_counter() - started:.1f} s"


def build_fastapi(rows: int, out: Path = OUT) -> tuple[Path, str]:
    """The FastAPI peer's SQLite store of `rows` generated assets, loaded by its own peer_fastapi.load_csv."""
    csv = bench_csv(rows, out)
    key = store_key(rows, (BENCH / "peer_fastapi.py").read_bytes())

    def load(db: Path) -> None:
        print(f"loading {rows:,} assets for the FastAPI peer ...", flush=True)
        db.unlink(missing_ok=True)
        load_csv(csv, db)

    return cached(out, "peer-fastapi", key, ".db", load)


DATASETTE_DB = "market.db"  # Datasette names a database by its file's stem: /market/assets.json
SQLITE_UTILS_LOAD = (  # sqlite-utils command lines, run in-process by its own CLI code
    ("insert", "{db}", "assets", "{csv}", "--csv", "--pk", "id"),  # column types detected, as by default
    ("create-index", "{db}", "assets", "rank"),
    ("create-index", "{db}", "assets", "market_cap_usd"),
)


def build_datasette(rows: int, out: Path = OUT) -> tuple[Path, str]:
    """Datasette's store of `rows` generated assets (a folder holding DATASETTE_DB), loaded with sqlite-utils."""
    csv = bench_csv(rows, out)
    recipe = json.dumps([SQLITE_UTILS_LOAD, importlib.metadata.version("sqlite-utils")]).encode()

    def load(folder: Path) -> None:
        print(f"loading {rows:,} assets for Datasette with sqlite-utils ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for step in SQLITE_UTILS_LOAD:
            args = [arg.format(db=folder / DATASETTE_DB, csv=csv) for arg in step]
            sqlite_utils_cli.main(args, prog_name="sqlite-utils", standalone_mode=False)

    folder, note = cached(out, "peer-datasette", store_key(rows, recipe), "", load)
    return folder / DATASETTE_DB, note


# --- serving --------------------------------------------------------------


def fastapi_command(db: Path, port: int) -> Command:
    """`uvicorn peer_fastapi:app` with uvicorn's defaults (access log on; uvloop and httptools, being installed)."""
    argv = [sys.executable, "-m", "uvicorn", "peer_fastapi:app", "--app-dir", str(BENCH)]
    return Command([*argv, "--host", HOST, "--port", str(port)], {"PEER_DB": str(db)})


def datasette_command(db: Path, port: int) -> Command:
    """`datasette serve -i` (immutable) with suggested facets off; no facet is configured or asked for."""
    argv = [sys.executable, "-m", "datasette", "serve", "-i", str(db), "--host", HOST, "--port", str(port)]
    return Command([*argv, "--setting", "suggest_facets", "off"], {})


def data_ids(body: bytes) -> list[str]:
    return [asset["asset_id"] for asset in json.loads(body)["data"]]


def row_ids(body: bytes) -> list[str]:
    return [row["id"] for row in json.loads(body)["rows"]]


FASTAPI = Peer(
    name="fastapi",
    title="FastAPI + pydantic + aiosqlite (the seed's stack)",
    build=build_fastapi,
    command=fastapi_command,
    paths=KASPARRO_PATHS,  # the same /data API
    ready_path="/data?page_size=1",
    ids=data_ids,
)
DATASETTE = Peer(
    name="datasette",
    title=f"Datasette {importlib.metadata.version('datasette')} (-i, facets off)",
    build=build_datasette,
    command=datasette_command,
    paths={  # rows as objects, as Kasparro sends them
        "first-page": "/market/assets.json?_sort=rank&_size=100&_shape=objects",
        "filtered-sorted": "/market/assets.json?status=active&_sort_desc=market_cap_usd&_size=100&_shape=objects",
    },
    ready_path="/-/versions.json",
    ids=row_ids,
)
PEERS = (FASTAPI, DATASETTE)


@contextlib.contextmanager
def serve(peer: Peer, store: Path, out: Path = OUT) -> Iterator[Server]:
    """Run the peer on a free port until the block ends (output in out/peer-<name>.log); ready when yielded."""
    from api_bench import free_port, running

    port = free_port()
    command = peer.command(store, port)
    env = {**os.environ, **command.env}
    with running(peer.name, command.argv, env, port, peer.ready_path, out / f"peer-{peer.name}.log") as server:
        yield server


# --- the check ------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def kasparro_ids(db: Path, body: bytes) -> list[str]:
    """The CSV ids of the assets of a Kasparro /data page, in order (Kasparro's asset ids are slugs of names)."""
    asset_ids = data_ids(body)
    query = "SELECT asset_id, source_id FROM source_map WHERE asset_id IN (SELECT value FROM json_each(?))"
    with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
        csv_id = dict(conn.execute(query, (json.dumps(asset_ids),)))
    return [csv_id[asset_id] for asset_id in asset_ids]


def kasparro_pages(db: Path, port: int) -> dict[str, list[str]]:
    """Each scenario's page from a Kasparro serving `db` on `port`, as CSV ids."""
    pages = {}
    for scenario, path in KASPARRO_PATHS.items():
        status, body = get(port, path)
        if status != 200:
            raise AssertionError(f"Kasparro answered {status} to {scenario}: {body[:300]!r}")
        pages[scenario] = kasparro_ids(db, body)
    return pages


def differences(peer: Peer, port: int, expected: dict[str, list[str]]) -> list[str]:
    """How the peer's scenario pages differ from `expected` (CSV ids per scenario); empty when they agree."""
    found = []
    for scenario, path in peer.paths.items():
        status, body = get(port, path)
        if status != 200:
            found.append(f"{peer.name} {scenario}: {path} answered {status}: {body[:300]!r}")
        elif (ids := peer.ids(body)) != expected[scenario]:
            found.append(f"{peer.name} {scenario}: {ids[:5]}... (len {len(ids)}), Kasparro {expected[scenario][:5]}...")
    return found


def latency_ms(port: int, path: str) -> float:
    """Median milliseconds of LATENCY_SAMPLES sequential GETs on one connection, after one unmeasured."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    times = []
    try:
        for _ in range(LATENCY_SAMPLES + 1):
            started = time.perf_counter()
            conn.request("GET", path)
            conn.getresponse().read()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        conn.close()
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000, help="assets in the generated CSV every store loads")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    import api_bench

    OUT.mkdir(parents=True, exist_ok=True)
    bench_csv(args.rows)
    db, note = api_bench.build_store(args.rows, ROOT)
    print(note, flush=True)
    stores = {}
    for peer in PEERS:
        stores[peer.name], note = peer.build(args.rows, OUT)
        print(note, flush=True)
    api_env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400), "LOG_LEVEL": "info"}
    with api_bench.serve("api", "kasparro:app", api_env, "/health") as api:
        expected = kasparro_pages(db, api.port)
        latencies = {("kasparro", s): latency_ms(api.port, path) for s, path in KASPARRO_PATHS.items()}
    problems = []
    for peer in PEERS:
        with serve(peer, stores[peer.name]) as server:
            problems += differences(peer, server.port, expected)
            latencies |= {(peer.name, s): latency_ms(server.port, path) for s, path in peer.paths.items()}
    print(f"\nsingle-request latency (median of {LATENCY_SAMPLES}), {args.rows:,} rows, default configurations:")
    for (name, scenario), ms in latencies.items():
        print(f"  {name:10} {scenario:16} {ms:8.2f} ms")
    if problems:
        sys.exit("peers differ from Kasparro:\n" + "\n".join(problems))
    print(f"\nevery peer's {' and '.join(KASPARRO_PATHS)} pages hold Kasparro's assets, in Kasparro's order")


if __name__ == "__main__":
    main()
