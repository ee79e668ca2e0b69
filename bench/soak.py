"""Soak the API: wrk on /data, /stats and /health while three ETL runs commit, then an ETL kill loop.

Phase 1 builds a store of generated rows, starts uvicorn on 127.0.0.1 as README does, and runs wrk
(64 connections, 30 s, a mix of /data URLs, /stats and /health) while etl.py commits three more
generated CSVs; it prints requests, req/s, socket errors, answers other than 2xx/3xx (must be 0 but
for 503s: SPEC's answer when no reader comes free in time, counted apart),
latency p50/p99, each ETL run's duration, the requests the server is still answering after the load
(must be 0: wrk counts no error for a request still unanswered when it stops), and the seconds the
server takes to exit on SIGTERM right after the load (must be under 5, SPEC).

Phase 2 SIGKILLs etl.py at 20 random instants of a 200k-row load; after each kill it checks
PRAGMA integrity_check and that /health on the live API says etl_status "failed"; a final run must
converge to the asset table of one uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from api_bench import require

from gen_csv import write_csv
from stores import read_only_uri

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0  # seconds uvicorn may take to answer its first request
WRK_TIMEOUT = 10  # seconds; slower answers count as socket errors (timeouts)
SERVE = ("--timeout-graceful-shutdown", "3")  # as README's command
SETTLE = 5.0  # seconds after the load for requests still being answered to end (the API bounds its waits at 2 s)
STOP_WITHIN = 5.0  # seconds from SIGTERM to exit, under any load (SPEC)

# wrk: a mix of /data URLs (pages, filters, sorts, one asset), /stats and /health over ids read from $SOAK_IDS;
# each thread counts its 503s (shed with Retry-After: SPEC's answer to a reader not free in time); done() prints JSON.
WRK_SCRIPT = """
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
shed = 0
response = function(status) if status == 503 then shed = shed + 1 end end
local ids = {}
for line in io.lines(os.getenv("SOAK_IDS")) do ids[#ids + 1] = line end
local pages = tonumber(os.getenv("SOAK_PAGES"))
local queries = {
  function() return "/data" end,
  function() return "/data?page=" .. math.random(1, pages) .. "&page_size=100" end,
  function() return "/data?filter_by=active&sort=-price_usd&page=" .. math.random(1, 50) end,
  function() return "/data?filter_by=rank<=" .. math.random(1, 5000) .. "&sort=-market_cap_usd" end,
  function() return "/data?filter_by=symbol:KAS" .. math.random(0, 6) .. "&page_size=25" end,
  function() return "/data/" .. ids[math.random(1, #ids)] end,
  function() return "/stats" end,
  function() return "/health" end,
}
math.randomseed(20261126)
request = function() return wrk.format("GET", queries[math.random(1, #queries)]()) end
done = function(summary, latency, requests)
  local e, shed = summary.errors, 0
  for _, thread in ipairs(threads) do shed = shed + thread:get("shed") end
  io.write(string.format(
    'SOAK {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d,'
    .. ' "status": %d, "shed": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status, shed,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def etl_env() -> dict[str, str]:
    """etl.py's environment: no inherited store settings, upstreams pointed at a closed loopback port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_")}
    return env | {"KASPARRO_COINGECKO_URL": "http://127.0.0.1:9", "KASPARRO_COINPAPRIKA_URL": "http://127.0.0.1:9"}


def run_etl(db: Path, csv: Path) -> tuple[int, float]:
    """Run etl.py to the end: (exit code, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "--db", str(db), f"csv:{csv}"],
        cwd=ROOT, env=etl_env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode, time.monotonic() - started


def query(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
        return conn.execute(sql).fetchall()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(base: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as answer:  # noqa: S310 - 127.0.0.1
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def in_flight(base: str) -> int:
    """Requests the server is answering besides this scrape (kasparro_http_requests_in_flight of /metrics)."""
    with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:  # noqa: S310 - 127.0.0.1
        for line in answer.read().decode().splitlines():
            if line.startswith("kasparro_http_requests_in_flight "):
                return round(float(line.split()[1])) - 1
    sys.exit("/metrics has no kasparro_http_requests_in_flight")


def settle(base: str) -> int:
    """Requests still being answered once they have had SETTLE seconds to end."""
    deadline = time.monotonic() + SETTLE
    left = in_flight(base)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = in_flight(base)
    return left


def stop(server: subprocess.Popen[bytes]) -> float:
    """SIGTERM the server: seconds until it exited (inf when it had not after twice STOP_WITHIN)."""
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=2 * STOP_WITHIN)
    except subprocess.TimeoutExpired:
        return float("inf")
    return time.monotonic() - started


@contextlib.contextmanager
def serve(db: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """uvicorn kasparro:app (one worker) on a free 127.0.0.1 port: its base URL and process."""
    port = free_port()
    env = etl_env() | {"KASPARRO_DB": str(db), "LOG_LEVEL": "warning"}
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", str(port), *SERVE],
            cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"uvicorn did not start:\n{log.read_text()}")
            with contextlib.suppress(OSError):
                get(base, "/health")
                break
            time.sleep(0.05)
        yield base, server
    finally:
        if server.poll() is None and stop(server) == float("inf"):
            server.kill()
            server.wait()


def load_during_writes(work: Path, rows: int, seconds: float, connections: int) -> None:
    """Phase 1: wrk on /data while three ETL runs commit."""
    db = work / "soak.db"
    print(f"# phase 1: building a store of {rows:,} generated rows", flush=True)
    code, took = run_etl(db, write_csv(work / "base.csv", rows, seed=1))
    if code != 0:
        sys.exit("the first ETL run failed")
    print(f"  base load: {took:.1f} s")
    feeds = [write_csv(work / f"feed-{n}.csv", rows // 4, seed=100 + n) for n in range(3)]
    ids = work / "ids.txt"
    ids.write_text("\n".join(a for (a,) in query(db, "SELECT asset_id FROM asset ORDER BY random() LIMIT 10000")))
    script = work / "soak.lua"
    script.write_text(WRK_SCRIPT)
    runs: list[tuple[int, float, str]] = []

    def write_while_loaded() -> None:
        time.sleep(seconds / 10)  # let wrk ramp up first
        for feed in feeds:
            code, took = run_etl(db, feed)
            runs.append((code, took, query(db, "SELECT generation FROM store_meta")[0][0]))

    with serve(db, work / "server.log") as (base, server):
        writer = threading.Thread(target=write_while_loaded)
        env = os.environ | {"SOAK_IDS": str(ids), "SOAK_PAGES": str(max(1, rows // 100))}
        argv = ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={WRK_TIMEOUT}s", "-s", str(script)]
        writer.start()
        done = subprocess.run([*argv, base], env=env, capture_output=True, text=True, check=False)
        at_end = in_flight(base)
        writer.join()
        print(done.stdout, flush=True)
        health = get(base, "/health")[1]
        left = settle(base)
        stopped_in = stop(server)
    line = next((x for x in done.stdout.splitlines() if x.startswith("SOAK ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"wrk failed:\n{done.stdout}\n{done.stderr}")
    wrk = json.loads(line.removeprefix("SOAK "))
    sockets = wrk["connect"] + wrk["read"] + wrk["write"] + wrk["timeout"]
    print(f"  wrk -t2 -c{connections} -d{seconds:g}s, a mix of /data URLs, against uvicorn (1 worker)")
    print(f"  requests {wrk['requests']:,}, {wrk['requests'] / (wrk['duration_us'] / 1e6):,.0f} req/s")
    print(f"  socket errors {sockets} (connect {wrk['connect']}, read {wrk['read']}, write {wrk['write']},"
          f" timeout {wrk['timeout']}); answers other than 2xx/3xx: {wrk['status']}, of which 503 (load shed,"
          f" with Retry-After) {wrk['shed']}")  # fmt: skip
    p50, p99, worst = (wrk[key] / 1000 for key in ("p50_us", "p99_us", "max_us"))
    print(f"  latency p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {worst:.1f} ms")
    committed = [run for run in runs if run[0] == 0]
    print(f"  ETL runs during the load: {len(committed)} of {len(runs)} committed, "
          + ", ".join(f"{took:.1f} s (generation {generation})" for _, took, generation in runs))  # fmt: skip
    print(f"  /health after: {health}")
    print(f"  requests in flight when wrk ended: {at_end}; {SETTLE:g} s later: {left} (must be 0)")
    print(f"  SIGTERM right after the load: the server exited in {stopped_in:.2f} s (must be < {STOP_WITHIN:g})")
    if wrk["status"] != wrk["shed"] or len(committed) != 3:
        sys.exit("FAILED: errors under load, or an ETL run did not commit")
    if left or stopped_in >= STOP_WITHIN:
        sys.exit("FAILED: requests never answered, or the server did not stop in time")


def wait_for_event(proc: subprocess.Popen[str], event: str) -> bool:
    """Read etl.py's JSON lines until `event`; False if it ended first."""
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            if json.loads(line).get("event") == event:
                return True
    return False


def watch_health(base: str, within: float = 5.0) -> tuple[int, dict]:
    """/health once it is readable (the API retries a store that was missing once a second)."""
    deadline = time.monotonic() + within
    status, health = get(base, "/health")
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        status, health = get(base, "/health")
    return status, health


def kill_loop(work: Path, rows: int, kills: int) -> None:
    """Phase 2: SIGKILL etl.py at random instants while the live API watches the store."""
    print(f"# phase 2: {kills} kills of etl.py over a {rows:,}-row load", flush=True)
    feed = write_csv(work / "kill.csv", rows, seed=2, bad_every=997)
    clean = work / "clean.db"
    code, clean_took = run_etl(clean, feed)
    if code != 0:
        sys.exit("the clean run failed")
    print(f"  one uninterrupted run: {clean_took:.1f} s")
    db = work / "killed.db"
    chooser = random.Random(20261126)
    killed, healthy_reports, instants = 0, 0, []
    with serve(db, work / "kill-server.log") as (base, _):
        while killed < kills:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "etl.py"), "--db", str(db), f"csv:{feed}"],
                # 10,000-row batches, as in the tests: more commit points to land kills between.
                cwd=ROOT, env=etl_env() | {"LOG_LEVEL": "debug", "KASPARRO_BATCH_ROWS": "10000"},
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            started = time.monotonic()
            wait_for_event(proc, "run started")
            if chooser.random() < 0.5:
                wait_for_event(proc, "batch committed")
            time.sleep(chooser.uniform(0, 0.3))  # where in the run the kill lands
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            if proc.returncode != -signal.SIGKILL:
                print(f"  run ended ({proc.returncode}) before its kill: the load is complete")
                break
            killed += 1
            instants.append(time.monotonic() - started)
            integrity = query(db, "PRAGMA integrity_check")[0][0]
            status, health = watch_health(base)
            if integrity != "ok" or (status, health.get("etl_status")) != (200, "failed"):
                sys.exit(f"FAILED after kill {killed}: integrity {integrity!r}, /health {status} {health}")
            healthy_reports += 1
        code, final_took = run_etl(db, feed)
        status, health = get(base, "/health")
    assets = "SELECT * FROM asset ORDER BY asset_id"
    converged = code == 0 and query(db, assets) == query(clean, assets)
    statuses = [s for (s,) in query(db, "SELECT status FROM etl_run ORDER BY run_id")]
    print(f"  runs killed: {killed}, at {statistics.median(instants):.2f} s median after start"
          f" (range {min(instants):.2f}-{max(instants):.2f} s)")  # fmt: skip
    print(f"  after each kill: integrity_check ok and /health etl_status 'failed': {healthy_reports} of {killed}")
    print(f"  final run: exit {code}, {final_took:.1f} s; runs recorded: {statuses.count('failed')} failed,"
          f" then {statuses[-1]}; /health {status} {health['status']} {health['etl_status']}")  # fmt: skip
    print(f"  converged to the clean run's asset table: {'yes' if converged else 'NO'}")
    if not converged:
        sys.exit("FAILED: the killed store did not converge")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="generated rows of the store and of the kill load")
    parser.add_argument("--duration", type=float, default=30, help="seconds of wrk")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--skip-load", action="store_true", help="only the kill loop")
    parser.add_argument("--skip-kills", action="store_true", help="only the load during writes")
    args = parser.parse_args()
    if not args.skip_load:
        require("wrk")
    with tempfile.TemporaryDirectory(prefix="kasparro-soak-") as folder:
        work = Path(folder)
        if not args.skip_load:
            load_during_writes(work, args.rows, args.duration, args.connections)
        if not args.skip_kills:
            kill_loop(work, args.rows, args.kills)


if __name__ == "__main__":
    main()
