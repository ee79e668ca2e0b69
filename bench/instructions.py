"""The API's ratios to the ceiling in instructions: figures that other work on a shared machine does not move.

`just bench` divides req/s by the bare ASGI ceiling's, both under wrk; on a machine shared with other work the
ceiling moves by tens of percent within a run. Here each server (the ceiling, and the API as the README runs
it) runs under valgrind's cachegrind while wrk loads it at the same concurrency as `just bench`; the server's
instructions per response are those of a loaded run minus an idle run of the same length, divided by the
responses. The ratio of the ceiling's instructions per response to the API's stands for the req/s ratio with
the system calls (about the same for both) and wrk's share of the machine left out: a figure beside the req/s
ratio that explains it, not the same figure. Each server takes about a minute under valgrind.

glibc copies a block of more than a few kB (a 25 kB page into its response) with `rep movsb`, which valgrind
counts as one instruction per byte: 26.6k instructions for a copy the CPU does in about 0.6 us, as long as
4.0k instructions of the vector loop take. Every server here runs with GLIBC_TUNABLES raising that threshold,
so that such a copy counts as the vector loop's instructions (COPY_BY_VECTORS); --rep-movsb leaves glibc's own.

The /data/{asset_id} scenarios draw ids as `just bench` does (random_asset.lua over the same id files). What a
lookup costs depends on what the answer cache holds, so before the loaded and the idle run alike the server
answers the first --warm ids of the scenario's file, one after another: both runs start from the same cache.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from api_bench import (
    BENCH,
    BY_NAME,
    CEILING,
    CONNECTIONS,
    DEFAULT,
    HOST,
    OUT,
    QUIET,
    ROOT,
    SAMPLE_IDS,
    Server,
    build_store,
    etl_source,
    free_port,
    require,
    sample_ids,
    wait_ready,
    zipf_ids,
)

COPY_BY_VECTORS = {"GLIBC_TUNABLES": "glibc.cpu.x86_rep_movsb_threshold=1073741824"}  # see the docstring
SCENARIOS = ("health", "first-page", "filtered-sorted", "asset-zipf", "asset", "asset-hot")


def warm_up(port: int, ids: Path, count: int) -> None:
    """GET /data/{asset_id} for the first `count` ids of the file, one after another on one connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=600)
    with ids.open() as lines:
        for _, line in zip(range(count), lines, strict=False):
            conn.request("GET", f"/data/{line.strip()}")
            conn.getresponse().read()
    conn.close()


@dataclass(frozen=True)
class Load:
    """What wrk sends: `path`, or a request of `script` for each (ids from the file `ids`, after `warm` of them)."""

    path: str
    script: str | None = None
    ids: Path | None = None
    warm: int = 0


def instructions(
    app: str, load: Load, env: dict[str, str], logs: dict[str, str], seconds: float, loaded: bool
) -> tuple[int, int]:
    """Instructions and responses of a server of `app` under cachegrind: answering its ready path once (and the
    warm-up), then `seconds` of wrk on it when `loaded`, else `seconds` idle."""
    port = free_port()
    counts = OUT / f"cachegrind-{port}.out"
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={counts}"]
    argv += [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
    if logs is QUIET:
        argv += ["--no-access-log", "--log-level", "warning"]
    environ = {key: value for key, value in os.environ.items() if key != "LOG_LEVEL"}
    log = OUT / f"instructions-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen(argv, cwd=ROOT, env={**environ, **logs, **env, "PYTHONHASHSEED": "0"},
                                   stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        server = Server(app, process, port)
        wait_ready(server, load.path, log, timeout=600)  # valgrind starts Python ~50 times slower
        if load.ids is not None:
            warm_up(port, load.ids, load.warm)
        responses = 0
        if loaded:
            wrk = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout=30s"]
            wrk += ["-s", str(BENCH / load.script)] if load.script else []
            wrk_env = {**os.environ, "BENCH_IDS": str(load.ids)} if load.ids else None
            wrk.append(f"http://{HOST}:{port}{load.path}")
            done = subprocess.run(wrk, capture_output=True, text=True, check=True, env=wrk_env)
            responses = int(re.search(r"(\d+) requests in", done.stdout)[1])
        else:
            time.sleep(seconds)  # the idle loop's own work over as long, to subtract
    finally:
        process.terminate()
        process.wait()
    text = counts.read_text()
    counts.unlink()
    return int(re.search(r"^summary:\s+(\d+)", text, re.M)[1]), responses


def per_response(app: str, load: Load, env: dict[str, str], logs: dict[str, str], seconds: float) -> float:
    loaded, responses = instructions(app, load, env, logs, seconds, loaded=True)
    idle, _ = instructions(app, load, env, logs, seconds, loaded=False)
    return (loaded - idle) / responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="assets in the generated store")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of wrk on each server (under valgrind)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--warm", type=int, default=5_000, help="lookups before a detail scenario's runs")
    parser.add_argument("--rep-movsb", action="store_true", help="count large copies as glibc makes them")
    parser.add_argument("--no-quiet", dest="quiet", action="store_false", help="skip the LOG_LEVEL=warning runs")
    args = parser.parse_args()
    require("wrk", "valgrind")
    db, _ = build_store(args.rows, etl_source(None))
    copies = {} if args.rep_movsb else COPY_BY_VECTORS
    env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400), **copies}
    ids = {"sample": sample_ids(db, SAMPLE_IDS), "all": sample_ids(db, None), "zipf": zipf_ids(db)}
    ceiling = per_response("bench.ceiling:app", Load(CEILING.path), copies, QUIET, args.seconds)
    print(f"ceiling (bare ASGI, constant JSON): {ceiling:,.0f} instructions per response")
    for name in args.scenario or SCENARIOS:
        scenario = BY_NAME[name]
        load = Load(scenario.path)
        if scenario.script:
            load = Load("/health", scenario.script, ids[scenario.ids], args.warm)
        for label, logs in (("default", DEFAULT), ("LOG_LEVEL=warning", QUIET))[: 2 if args.quiet else 1]:
            cost = per_response("kasparro:app", load, env, logs, args.seconds)
            target = scenario.target.min_ratio if scenario.target else None
            verdict = f" (the req/s target: {target:.0%})" if target and label == "default" else ""
            print(f"{scenario.title}, {label}: {cost:,.0f} instructions per response,"
                  f" {ceiling / cost:.1%} of the ceiling's{verdict}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
