"""What GET /data/{asset_id} costs the API in process: CPU microseconds and instructions per response.

The front door (kasparro.create_app, the README's default configuration: a log line per request) answers
requests fed to it directly, WAVE at a time in one turn of the event loop as wrk's 32 connections send them,
with no server or client around it. Streams, over the store of bench/api_bench.py:
- miss: ids of all assets, each asked for once (no answer kept): an uncached lookup;
- hit: WAVE ids asked for until kept, then again and again: a kept answer;
- zipf: the bench's Zipf (s = 1.1) draws, after a warm-up of --warm draws.
With valgrind installed it also counts instructions (cachegrind, the stream minus its warm-up alone,
PYTHONHASHSEED fixed): a figure other work on the machine does not move. Under valgrind every read on the loop is
VALGRIND_SLOWDOWN times slower, so the loop's slice of reads (kasparro.LOOP_SLICE, wall-clock) is that much longer
there: a slice holds as many lookups as it does at full speed (a wave's misses), not a few.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAVE = 32  # requests a turn of the loop takes in, as wrk's connections send them
STREAMS = ("miss", "hit", "zipf")
VALGRIND_SLOWDOWN = 50  # how much slower the API runs under cachegrind (no cache simulation) than natively


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


def scope(path: str) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


def run(db: Path, stream: str, warm: int, count: int, measured: bool, slowdown: float = 1) -> float:
    """Serve the warm-up, then (when `measured`) the measured ids; CPU microseconds per measured response.
    `slowdown`: how many times slower than natively this process runs (valgrind)."""
    sys.path.insert(0, str(ROOT))
    import uvloop

    import kasparro

    kasparro.LOOP_SLICE *= slowdown
    app = kasparro.create_app(kasparro.Config(db=db, etl_max_age=10 * 365 * 86_400))
    warm_ids, ids = stream_ids(db, stream, warm, count)
    statuses: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def serve(chosen: list[str]) -> None:
        for start in range(0, len(chosen), WAVE):
            await asyncio.gather(*(app(scope(f"/data/{i}"), receive, send) for i in chosen[start : start + WAVE]))

    async def main() -> float:
        try:
            await serve(warm_ids)
            if not measured:
                return 0.0
            started = time.process_time()
            await serve(ids)
            return (time.process_time() - started) / len(ids) * 1e6
        finally:
            await app.answers.store.close()  # its readers' threads would keep the process alive

    micros = uvloop.run(main())
    if set(statuses) != {200}:
        sys.exit(f"statuses other than 200: {sorted(set(statuses))}")
    return micros


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
    parser.add_argument("--warm", type=int, default=60_000, help="requests of the zipf warm-up")
    parser.add_argument("--count", type=int, default=20_000, help="measured requests")
    parser.add_argument("--no-instructions", dest="count_instructions", action="store_false", help="CPU time only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slowdown", type=float, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        micros = run(args.db, args.stream[0], args.warm, args.count, not args.warm_only, args.slowdown)
        print(f"{micros:.2f}", file=sys.stderr)
        return
    if args.db is None:
        sys.path.insert(0, str(ROOT / "bench"))
        import api_bench

        api_bench.OUT.mkdir(parents=True, exist_ok=True)
        args.db, _ = api_bench.build_store(1_000_000, api_bench.etl_source(None))
        api_bench.sample_ids(args.db, api_bench.SAMPLE_IDS), api_bench.sample_ids(args.db, None)
        api_bench.zipf_ids(args.db)
    for stream in args.stream or STREAMS:
        argv = [sys.executable, __file__, "--child", "--db", str(args.db), "--stream", stream]
        argv += ["--warm", str(args.warm), "--count", str(args.count)]
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
        line = f"{stream}: {float(done.stderr.strip().splitlines()[-1]):.1f} us CPU per response"
        if args.count_instructions and shutil.which("valgrind"):
            cost = instructions(args.db, stream, args.warm, args.count, True)
            cost -= instructions(args.db, stream, args.warm, args.count, False)
            line += f", {cost / args.count:,.0f} instructions"
        print(line, flush=True)


if __name__ == "__main__":
    main()
