"""The API's req/s ratio to the ceiling in short alternating slices: a figure that minutes of drift do not move.

`just bench` measures the ceiling for 10 s, then a scenario for 10 s; on a machine whose other tenants move the
ceiling by half within minutes (14.3k to 30.9k req/s in one run), a ratio near its target passes or fails by the
minute it ran in. Here the ceiling and the API (as the README runs it: default log level, a line per request) both
serve the whole time, and wrk loads them in turn, --slice seconds each, in the order ceiling, API, API, ceiling
(repeated --rounds times), so that a drift during a round weighs on both alike. Each round gives a ratio (the API's
requests over the ceiling's, in equal time); the table gives their median, their range, and the ratio of all the
requests, and the median and worst of the API slices' p99. Lookups and random pages read the store: --page-cache
sets its file's state before each scenario, as in `just bench`. The figures are appended to bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
from datetime import UTC, datetime

from api_bench import (
    BY_NAME,
    CEILING,
    DEFAULT,
    OUT,
    PAGE_CACHE_STATES,
    RESULTS,
    Measure,
    Server,
    build_store,
    commit_id,
    etl_source,
    random_pages,
    require,
    scenario_envs,
    serve,
    set_page_cache,
    wrk,
)

SCENARIOS = ("health", "first-page", "filtered-sorted", "random-page", "asset-zipf", "asset")


def slice_of(server: Server, name: str, seconds: float, env: dict[str, str], seed: int) -> Measure:
    """One wrk slice of `seconds` on the server, the scenario `name`'s load (0 errors); a script that draws at random
    draws with `seed`, so no slice replays another's requests."""
    measure = wrk(server, BY_NAME[name], seconds, {**env, "BENCH_SEED": str(seed)}, "paired")
    if measure.non_2xx or measure.socket_errors:
        output = OUT / f"wrk-{name}-paired.txt"  # wrk's own account: which socket errors
        raise SystemExit(
            f"{server.name}: {measure.non_2xx} non-2xx and {measure.socket_errors} socket errors; see {output}"
        )
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="assets in the generated store")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of ceiling, API, API, ceiling")
    parser.add_argument("--slice", type=float, default=3, help="seconds of each wrk slice")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="only these (repeatable)")
    parser.add_argument("--etl-rev", help="build the store with etl.py as of this commit (default: the work tree)")
    parser.add_argument(
        "--page-cache",
        choices=("as-is", *PAGE_CACHE_STATES),
        default="as-is",
        help="the store's file before each scenario's warm-up: as the page cache holds it, read, or dropped",
    )
    args = parser.parse_args()
    require("wrk")
    db, etl_note = build_store(args.rows, etl_source(args.etl_rev))
    envs = scenario_envs(db, args.rows)
    api_env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}
    seeds = itertools.count(1)
    rows = []
    with contextlib.ExitStack() as servers:
        ceiling = servers.enter_context(serve("ceiling", "bench.ceiling:app", {}, "/"))
        api = servers.enter_context(serve("api", "kasparro:app", api_env, "/health", DEFAULT))
        for name in args.scenario or SCENARIOS:
            print(f"{name} ...", flush=True)
            scenario = BY_NAME[name]
            env = envs[scenario.ids]
            set_page_cache(db, args.page_cache)

            def on(server: Server, name: str = name, env: dict[str, str] = env) -> Measure:
                return slice_of(server, name, args.slice, env, next(seeds))

            on(ceiling, CEILING.name)  # warm-ups: the API keeps its answer on the 2nd
            on(api)
            ratios, totals, p99s = [], [0.0, 0.0], []
            for _ in range(args.rounds):
                first, api_slices, last = on(ceiling, CEILING.name), [on(api), on(api)], on(ceiling, CEILING.name)
                answered = sum(measure.requests_per_s for measure in api_slices)
                ratios.append(answered / (first.requests_per_s + last.requests_per_s))
                totals[0] += first.requests_per_s + last.requests_per_s
                totals[1] += answered
                p99s += [measure.p99_ms for measure in api_slices]
            rate, ceiling_rate = totals[1] / (2 * args.rounds), totals[0] / (2 * args.rounds)
            title = scenario.shown_title(random_pages(args.rows))
            rows.append(
                f"| {title} | {rate:,.0f} | {ceiling_rate:,.0f} | {statistics.median(ratios):.1%} |"
                f" {min(ratios):.1%} to {max(ratios):.1%} | {totals[1] / totals[0]:.1%} |"
                f" {statistics.median(p99s):.2f} ms ({max(p99s):.2f}) | {scenario.target} |"
            )
    header = f"### bench-paired, {args.rows:,} rows, commit {commit_id()}, {datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    setup = (
        f"{args.rounds} rounds of wrk slices of {args.slice:g} s: ceiling, API, API, ceiling; the API as the README"
        f" runs it (default log level, a JSON line per request to a file, from a venv of requirements.txt alone);"
        f" {etl_note}"
    )
    if args.page_cache != "as-is":
        setup += f"; the store's file {PAGE_CACHE_STATES[args.page_cache]} before each scenario's warm-up"
    lines = [
        header, "", setup, "",
        "| scenario | API req/s | ceiling req/s | median of rounds' ratios | rounds' range | all requests' ratio |"
        " API p99: median of slices (worst) | target |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]  # fmt: skip
    print("\n" + "\n".join(lines))
    with RESULTS.open("a") as out:
        out.write("\n".join(["", *lines, ""]))


if __name__ == "__main__":
    main()
