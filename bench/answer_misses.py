"""How many Zipf lookups miss the answer cache, and how few a cache of the same size could miss at best.

Replays the draws wrk makes in the `asset-zipf` scenario (a line of the bench's .zipf-ids file, uniformly, as
bench/random_asset.lua picks them) through kasparro.AnswerCache itself: its budget (kasparro.ANSWERS_BYTES), its
admission and each answer's real size (the detail body the API encodes for that asset, plus ENTRY_OVERHEAD).
Beside it, for as many answers as the cache held at the end: the misses of a cache that kept the most-asked ids
from the start (the draws are independent, so a cache that cannot see the next ones misses no fewer; the counts
are of these same draws, so the figure errs low), and the cache itself at twice the budget. Misses are counted
after --warm draws. Prints one line per figure; `just bench-answer-misses` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import api_bench

from stores import read_only_uri

sys.path.insert(0, str(api_bench.ROOT))

import kasparro


def body_sizes(db: Path, ids: set[str]) -> dict[str, int]:
    """The size of the detail body the API sends for each asset id (as the id file gives it, URL-quoted)."""
    sizes = {}
    with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
        version = kasparro.read_version(conn)
        for quoted in ids:
            detail = kasparro.read_asset(conn, version, unquote(quoted))
            assert detail is not None, f"{quoted} is in the id file but not in the store"
            sizes[quoted] = len(kasparro.encode(detail))
    return sizes


def replay(draws: list[str], sizes: dict[str, int], budget: int, warm: int) -> tuple[float, int]:
    """The share of draws after `warm` that AnswerCache(budget) misses, and how many answers it held at the end."""
    cache = kasparro.AnswerCache(None, budget)  # type: ignore[arg-type]  # put() and the entries alone: no store
    commit = kasparro.Commit(0, kasparro.DataVersion("bench", 1))
    answers = {asset: kasparro.Answer(0, b" " * size) for asset, size in sizes.items()}
    misses = 0
    for drawn, asset in enumerate(draws):
        key = (f"/data/{asset}", b"")
        if cache.held(key, commit) is None:
            misses += drawn >= warm
            cache.put(key, answers[asset])
    return misses / (len(draws) - warm), len(cache.entries)


def best_possible(draws: list[str], held: int, warm: int) -> float:
    """The share of draws after `warm` that a cache of the `held` most-asked ids would miss."""
    kept = {asset for asset, _ in Counter(draws).most_common(held)}
    return sum(asset not in kept for asset in draws[warm:]) / (len(draws) - warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, help="the store (default: bench/api_bench.py's 1,000,000-asset one)")
    parser.add_argument("--draws", type=int, default=1_500_000, help="lookups replayed")
    parser.add_argument("--warm", type=int, default=500_000, help="of which the first are not counted")
    args = parser.parse_args()
    if args.db is None:
        api_bench.OUT.mkdir(parents=True, exist_ok=True)
        args.db, _ = api_bench.build_store(1_000_000, api_bench.etl_source(None))
    lines = api_bench.zipf_ids(args.db).read_text().split()
    pick = random.Random(7)
    draws = [lines[pick.randrange(len(lines))] for _ in range(args.draws)]
    sizes = body_sizes(args.db, set(draws))
    print(f"{len(draws):,} draws of {len(sizes):,} distinct assets; detail bodies {min(sizes.values())} to "
          f"{max(sizes.values())} bytes, + {kasparro.ENTRY_OVERHEAD} a kept answer")  # fmt: skip
    for budget in (kasparro.ANSWERS_BYTES, 2 * kasparro.ANSWERS_BYTES):
        missed, held = replay(draws, sizes, budget, args.warm)
        best = best_possible(draws, held, args.warm)
        print(f"AnswerCache, {budget / 2**20:.0f} MiB: {missed:.2%} of lookups missed, {held:,} answers held; "
              f"the {held:,} most-asked kept from the start: {best:.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
