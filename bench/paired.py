"""The API's req/s ratio to the ceiling in short alternating slices: a figure that minutes of drift do not move.

`just bench` measures the ceiling for 10 s, then a scenario for 10 s; on a machine whose other tenants move the
ceiling by half within minutes (14.3k to 30.9k req/s in one run), a ratio near its target passes or fails by the
minute it ran in. Here the ceiling and the API (as the README runs it: default log level, a line per request) both
serve the whole time, and wrk loads them in turn, --slice seconds each, in the order ceiling, API, API, ceiling
(repeated --rounds times), so that a drift during a round weighs on both alike. Each round gives a ratio (the API's
requests over the ceiling's, in equal time); the table gives their median, their range, and the ratio of all the
requests. The figures are appended to bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from datetime import UTC, datetime

from api_bench import (
    BY_NAME,
    CEILING,
    DEFAULT,
    RESULTS,
    Server,
    build_store,
    commit_id,
    etl_source,
    require,
    serve,
    wrk,
)

SCENARIOS = ("health", "first-page", "filtered-sorted")


def requests_in(server: Server, name: str, seconds: float, env: dict[str, str]) -> float:
    """Requests answered in one wrk slice of `seconds` on the server, the scenario `name`'s load (0 errors)."""
    measure = wrk(server, BY_NAME[name], seconds, env, "paired")
    if measure.non_2xx or measure.socket_errors:
        raise SystemExit(f"{server.name}: {measure.non_2xx} non-2xx and {measure.socket_errors} socket errors")
    return measure.requests_per_s * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="assets in the generated store")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of ceiling, API, API, ceiling")
    parser.add_argument("--slice", type=float, default=3, help="seconds of each wrk slice")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--etl-rev", help="build the store with etl.py as of this commit (default: the work tree)")
    args = parser.parse_args()
    require("wrk")
    db, etl_note = build_store(args.rows, etl_source(args.etl_rev))
    env: dict[str, str] = {}
    api_env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}
    rows = []
    with contextlib.ExitStack() as servers:
        ceiling = servers.enter_context(serve("ceiling", "bench.ceiling:app", {}, "/"))
        api = servers.enter_context(serve("api", "kasparro:app", api_env, "/health", DEFAULT))
        for name in args.scenario or SCENARIOS:
            print(f"{name} ...", flush=True)
            requests_in(ceiling, CEILING.name, args.slice, env)  # warm-ups: the API keeps its answer on the 2nd
            requests_in(api, name, args.slice, env)
            ratios, totals = [], [0.0, 0.0]
            for _ in range(args.rounds):
                first = requests_in(ceiling, CEILING.name, args.slice, env)
                answered = requests_in(api, name, args.slice, env) + requests_in(api, name, args.slice, env)
                last = requests_in(ceiling, CEILING.name, args.slice, env)
                ratios.append(answered / (first + last))
                totals[0] += first + last
                totals[1] += answered
            target = BY_NAME[name].target.min_ratio
            rate = totals[1] / (2 * args.rounds * args.slice)
            ceiling_rate = totals[0] / (2 * args.rounds * args.slice)
            rows.append(
                f"| {BY_NAME[name].title} | {rate:,.0f} | {ceiling_rate:,.0f} | {statistics.median(ratios):.1%} |"
                f" {min(ratios):.1%} to {max(ratios):.1%} | {totals[1] / totals[0]:.1%} | >= {target:.0%} |"
            )
    header = f"### bench-paired, {args.rows:,} rows, commit {commit_id()}, {datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    setup = (
        f"{args.rounds} rounds of wrk slices of {args.slice:g} s: ceiling, API, API, ceiling; the API as the README"
        f" runs it (default log level, a JSON line per request to a file, from a venv of requirements.txt alone);"
        f" {etl_note}"
    )
    lines = [
        header, "", setup, "",
        "| scenario | API req/s | ceiling req/s | median of rounds' ratios | rounds' range | all requests' ratio |"
        " target |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]  # fmt: skip
    print("\n" + "\n".join(lines))
    with RESULTS.open("a") as out:
        out.write("\n".join(["", *lines, ""]))


if __name__ == "__main__":
    main()
