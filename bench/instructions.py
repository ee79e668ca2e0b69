"""The API's ratios to the ceiling in instructions: figures that other work on a shared machine does not move.

`just bench` divides req/s by the bare ASGI ceiling's, both under wrk; on a machine shared with other work the
ceiling moves by tens of percent within a run. Here each server (the ceiling, and the API as the README runs
it) runs under valgrind's cachegrind while wrk loads it at the same concurrency as `just bench`; the server's
instructions per response are those of a loaded run minus an idle run of the same length, divided by the
responses. The ratio of the ceiling's instructions per response to the API's stands for the req/s ratio with
the system calls (about the same for both) and wrk's share of the machine left out: a figure beside the req/s
ratio that explains it, not the same figure. Each server takes about a minute under valgrind.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

from api_bench import (
    BY_NAME,
    CEILING,
    CONNECTIONS,
    DEFAULT,
    HOST,
    OUT,
    QUIET,
    ROOT,
    Server,
    build_store,
    etl_source,
    free_port,
    wait_ready,
)

SCENARIOS = ("health", "first-page", "filtered-sorted")


def instructions(
    app: str, path: str, env: dict[str, str], logs: dict[str, str], seconds: float, loaded: bool
) -> tuple[int, int]:
    """Instructions and responses of a server of `app` under cachegrind: answering `path` once, then `seconds` of
    wrk on it when `loaded`, else `seconds` idle."""
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
        wait_ready(server, path, log, timeout=600)  # valgrind starts Python ~50 times slower
        responses = 0
        if loaded:
            wrk = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds:g}s", "--timeout=30s", f"http://{HOST}:{port}{path}"]
            done = subprocess.run(wrk, capture_output=True, text=True, check=True)
            responses = int(re.search(r"(\d+) requests in", done.stdout)[1])
        else:
            time.sleep(seconds)  # the idle loop's own work over as long, to subtract
    finally:
        process.terminate()
        process.wait()
    text = counts.read_text()
    counts.unlink()
    return int(re.search(r"^summary:\s+(\d+)", text, re.M)[1]), responses


def per_response(app: str, path: str, env: dict[str, str], logs: dict[str, str], seconds: float) -> float:
    loaded, responses = instructions(app, path, env, logs, seconds, loaded=True)
    idle, _ = instructions(app, path, env, logs, seconds, loaded=False)
    return (loaded - idle) / responses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="assets in the generated store")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of wrk on each server (under valgrind)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    args = parser.parse_args()
    db, _ = build_store(args.rows, etl_source(None))
    env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}
    ceiling = per_response("bench.ceiling:app", CEILING.path, {}, QUIET, args.seconds)
    print(f"ceiling (bare ASGI, constant JSON): {ceiling:,.0f} instructions per response")
    for name in args.scenario or SCENARIOS:
        scenario = BY_NAME[name]
        for label, logs in (("default", DEFAULT), ("LOG_LEVEL=warning", QUIET)):
            cost = per_response("kasparro:app", scenario.path, env, logs, args.seconds)
            target = scenario.target.min_ratio if scenario.target else None
            verdict = f" (the req/s target: {target:.0%})" if target and label == "default" else ""
            print(f"{scenario.title}, {label}: {cost:,.0f} instructions per response,"
                  f" {ceiling / cost:.1%} of the ceiling's{verdict}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
