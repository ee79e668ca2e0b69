"""What GET /data/{asset_id} and a deep page of /data cost the API in process: CPU microseconds and instructions
per response, and the event loop's stops for full garbage collections.

The front door (kasparro.create_app, the README's default configuration: a log line per request), started as
uvicorn starts it (the ASGI lifespan), answers requests fed to it directly, WAVE at a time in one turn of the event
loop as wrk's 32 connections send them, with no server or client around it. Streams, over the store of
bench/api_bench.py:
- miss: ids of all assets, each asked for once (no answer kept): an uncached lookup;
- hit: WAVE ids asked for until kept, then again and again: a kept answer;
- zipf: the bench's Zipf (s = 1.1) draws, after a warm-up of --warm draws;
- page: /data?page={1..PAGES}&page_size=100 drawn uniformly, as bench/random_page.lua draws them (the warm-up and
  the measured run from seeds of their own), after a warm-up of --warm pages.
With valgrind installed it also counts instructions (cachegrind, the stream minus its warm-up alone,
PYTHONHASHSEED fixed): a figure other work on the machine does not move. Under valgrind every read on the loop is
VALGRIND_SLOWDOWN times slower, so the loop's slice of reads (kasparro.LOOP_SLICE, wall-clock) is that much longer
there: a slice holds as many lookups as it does at full speed (a wave's misses), not a few.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAVE = 32  # requests a turn of the loop takes in, as wrk's connections send them
STREAMS = ("miss", "hit", "zipf", "page")
PAGES = 10_000  # deep pages of 100 assets the page stream draws from, as bench/random_page.lua does
WARM = {"zipf": 60_000, "page": 2_000}  # requests of the warm-up by default (the others' warm-ups are fixed)
COUNT = {"page": 2_000}  # measured requests by default, else DEFAULT_COUNT
DEFAULT_COUNT = 20_000
VALGRIND_SLOWDOWN = 50  # how much slower the API runs under cachegrind (no cache simulation) than natively


def stream_targets(db: Path, stream: str, warm: int, count: int) -> tuple[list[str], list[str]]:
    """The warm-up's request targets and the measured ones: ids as the benchmark's id files give them, or pages."""
    if stream == "page":
        warm_pages, pages = random.Random(7), random.Random(8)
        return [page_target(warm_pages) for _ in range(warm)], [page_target(pages) for _ in range(count)]
    warm_ids, ids = stream_ids(db, stream, warm, count)
    return [f"/data/{i}" for i in warm_ids], [f"/data/{i}" for i in ids]


def page_target(draw: random.Random) -> str:
    return f"/data?page={draw.randint(1, PAGES)}&page_size=100"


def stream_ids(db: Path, stream: str, warm: int, count: int) -> tuple[list[str], list[str]]:
    """The warm-up's ids and the measured ones, as the benchmark's id files give them."""
    if stream == "hit":
        ids = Path(db.with_suffix(".ids")).read_text().split()[:WAVE]
        return ids * 3, (ids * (count // WAVE + 1))[:count]
    if stream == "miss":  # the warm-up opens the store and fills SQLite's caches with what every lookup reads
        lines = Path(db.with_suffix(".all-ids")).read_text().split()
        return lines[: WAVE * 10], lines[-count:]
    lines = Path(db.with_suffix(".zipf-ids")).read_text().split()
    return lines[:warm], lines[warm : warm + count]


def scope(target: str) -> dict:
    path, _, query = target.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


class FullCollections:
    """The garbage collector's full (generation 2) collections while `on`: how many, and each one's seconds."""

    def __init__(self) -> None:
        self.on = False
        self.pauses: list[float] = []
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.on or info["generation"] != 2:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._began)


def run(db: Path, stream: str, warm: int, count: int, measured: bool, slowdown: float = 1) -> tuple[float, list[float]]:
    """Serve the warm-up, then (when `measured`) the measured requests; CPU microseconds per measured response, and
    the seconds of each full collection among them. `slowdown`: how many times slower than natively this process
    runs (valgrind)."""
    sys.path.insert(0, str(ROOT))
    import falcon.testing
    import uvloop

    import kasparro

    kasparro.LOOP_SLICE *= slowdown
    kasparro.Store.READER_WAIT *= slowdown  # the page stream's first bookmark walks hold readers that long
    app = kasparro.create_app(kasparro.Config(db=db, etl_max_age=10 * 365 * 86_400))
    warm_targets, targets = stream_targets(db, stream, warm, count)
    statuses: list[int] = []
    collections = FullCollections()

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def serve(chosen: list[str]) -> None:
        for start in range(0, len(chosen), WAVE):
            await asyncio.gather(*(app(scope(target), receive, send) for target in chosen[start : start + WAVE]))

    async def main() -> float:
        async with falcon.testing.ASGIConductor(app):  # the ASGI lifespan's startup and shutdown, as uvicorn sends them
            await serve(warm_targets)
            if not measured:
                return 0.0
            collections.on = True
            started = time.process_time()
            await serve(targets)
            micros = (time.process_time() - started) / len(targets) * 1e6
            collections.on = False
            return micros

    micros = uvloop.run(main())
    if set(statuses) != {200}:
        sys.exit(f"statuses other than 200: {sorted(set(statuses))}")
    return micros, collections.pauses


def instructions(db: Path, stream: str, warm: int, count: int, measured: bool) -> int:
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv = [*valgrind, sys.executable, __file__, "--child", "--db", str(db), "--stream", stream, "--slowdown"]
    argv.append(str(VALGRIND_SLOWDOWN))
    argv += ["--warm", str(warm), "--count", str(count)] + ([] if measured else ["--warm-only"])
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": "0"})  # fmt: skip
    return int(re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, help="the store (default: bench/api_bench.py's 1,000,000-asset one)")
    parser.add_argument("--stream", action="append", choices=STREAMS, help="only these (repeatable)")
    parser.add_argument("--warm", type=int, help="requests of the zipf or page warm-up (default: 60,000 or 2,000)")
    parser.add_argument("--count", type=int, help="measured requests (default: 2,000 pages, else 20,000)")
    parser.add_argument("--no-instructions", dest="count_instructions", action="store_false", help="CPU time only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slowdown", type=float, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        micros, pauses = run(args.db, args.stream[0], args.warm, args.count, not args.warm_only, args.slowdown)
        print(f"{micros:.2f} {len(pauses)} {max(pauses, default=0) * 1e3:.2f} {sum(pauses) * 1e3:.2f}", file=sys.stderr)
        return
    if args.db is None:
        sys.path.insert(0, str(ROOT / "bench"))
        import api_bench

        api_bench.OUT.mkdir(parents=True, exist_ok=True)
        args.db, _ = api_bench.build_store(1_000_000, api_bench.etl_source(None))
        api_bench.sample_ids(args.db, api_bench.SAMPLE_IDS), api_bench.sample_ids(args.db, None)
        api_bench.zipf_ids(args.db)
    for stream in args.stream or STREAMS:
        warm = args.warm if args.warm is not None else WARM.get(stream, 0)
        count = args.count if args.count is not None else COUNT.get(stream, DEFAULT_COUNT)
        argv = [sys.executable, __file__, "--child", "--db", str(args.db), "--stream", stream]
        argv += ["--warm", str(warm), "--count", str(count)]
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
        micros, pauses, longest, paused = done.stderr.strip().splitlines()[-1].split()
        line = f"{stream}: {float(micros):.1f} us CPU per response"
        if args.count_instructions and shutil.which("valgrind"):
            cost = instructions(args.db, stream, warm, count, True)
            cost -= instructions(args.db, stream, warm, count, False)
            line += f", {cost / count:,.0f} instructions"
        line += f"; {pauses} full collections in {count:,} responses, {paused} ms in all, the longest {longest} ms"
        print(line, flush=True)


if __name__ == "__main__":
    main()
