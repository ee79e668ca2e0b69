"""Instructions per request of the app alone: the front door and Falcon driven by ASGI calls in one process,
without uvicorn, a socket or wrk, under cachegrind.

bench/instructions.py counts a whole server under wrk (minutes a scenario); this counts what kasparro.py itself
does for one request (half a minute), to compare two versions of it: run it on each. The figure is the
difference of two runs of `--requests` and five times as many, each after the same warm-up (up to 2,000
requests), divided by the difference in requests, so starting Python, opening the store and warming the
answer cache cancel out. The log line is written (to
/dev/null) and flushed once per turn of the loop, every BATCH requests, as under load. A path of /data/{asset_id}
may name `{ids}`: each request then takes the next id of the store, in a shuffled order (most are made, not
kept).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from api_bench import ROOT, build_store, etl_source, require

from stores import read_only_uri

BATCH = 32  # requests between two turns of the loop: the connections of one wrk run, about


def drive(path: str, requests: int, ids: list[str]) -> None:
    """In this process: answer `requests` GETs of `path` (after as many again to warm up), then exit."""
    import uvloop

    sys.path.insert(0, str(ROOT))
    import kasparro

    async def main() -> None:
        app = kasparro.app
        startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        started = asyncio.Event()
        await startup.put({"type": "lifespan.startup"})

        async def lifespan_send(message: dict[str, Any]) -> None:
            started.set()

        lifespan = asyncio.create_task(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, lifespan_send)
        )
        await started.wait()
        targets = iter(ids * 3) if ids else None
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def serve(count: int) -> None:
            for done in range(count):
                target = path if targets is None else path.replace("{ids}", next(targets))
                target_path, _, query = target.partition("?")
                scope = {
                    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                    "scheme": "http", "path": target_path, "raw_path": target_path.encode(),
                    "query_string": query.encode(), "root_path": "", "client": ("127.0.0.1", 50000),
                    "server": ("127.0.0.1", 8000), "headers": [(b"host", b"127.0.0.1:8000")],
                }  # fmt: skip
                await app(scope, receive, send)
                if done % BATCH == BATCH - 1:
                    await asyncio.sleep(0)

        await serve(min(requests, 2_000))
        await serve(requests)
        if any(status != 200 for status in statuses):
            raise SystemExit(f"{path}: answered {sorted(set(statuses))}, not only 200")
        lifespan.cancel()
        sys.stdout.flush()
        os._exit(0)  # the lifespan protocol waits for a shutdown no server sends

    uvloop.run(main())


def counted(path: str, requests: int, db: Path, ids: Path | None) -> int:
    """Instructions of a whole process answering `requests` of `path` (cachegrind)."""
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv += [sys.executable, __file__, "--drive", "--requests", str(requests), "--path", path]
    argv += ["--ids-file", str(ids)] if ids else []
    environ = {key: value for key, value in os.environ.items() if key != "LOG_LEVEL"}
    environ |= {"KASPARRO_DB": str(db), "PYTHONHASHSEED": "0"}
    with open(os.devnull, "w") as devnull:
        done = subprocess.run(argv, cwd=ROOT, env=environ, stdout=devnull, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the driven app failed:\n{done.stderr[-2000:]}")
    return int(re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", action="append", help="request path and query (repeatable; default: /health)")
    parser.add_argument("--requests", type=int, default=5_000, help="requests of the shorter run")
    parser.add_argument("--rows", type=int, default=200_000, help="assets in the generated store")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    paths = args.path or ["/health"]
    if args.drive:
        ids = args.ids_file.read_text().split() if args.ids_file else []
        return drive(paths[0], args.requests, ids)
    require("valgrind")
    db, built = build_store(args.rows, etl_source(None))
    print(built, flush=True)
    for path in paths:
        ids_file = None
        if "{ids}" in path:
            with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
                ids = [row[0] for row in conn.execute("SELECT asset_id FROM asset")]
            random.Random(0).shuffle(ids)
            ids_file = db.with_suffix(".shuffled-ids")
            ids_file.write_text("\n".join(ids))
        short = counted(path, args.requests, db, ids_file)
        long = counted(path, 5 * args.requests, db, ids_file)
        print(f"GET {path}: {(long - short) / (4 * args.requests):,.0f} instructions a request (the app alone)")


if __name__ == "__main__":
    main()
