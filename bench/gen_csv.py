"""Write a large, deterministic market snapshot CSV for tests and benchmarks."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

HEADER = "id,symbol,name,rank,price_usd,market_cap_usd,volume_24h_usd,change_24h_pct,status,last_updated\n"
SYLLABLES = ("ka", "spa", "ro", "li", "ne", "to", "mi", "zu", "vor", "tex", "qua", "ri", "on", "el", "bit", "coin")


def write_csv(path: Path, rows: int, seed: int = 7, bad_every: int = 0) -> Path:
    """Write `rows` assets (every `bad_every`-th row invalid when set) and return the path."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(HEADER)
        for n in range(1, rows + 1):
            word = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
            # Symbols repeat across different names on purpose: the look-alike case.
            symbol = word[:3].upper() + str(n % 7)
            price = rng.lognormvariate(0, 3)
            supply = rng.randint(10**5, 10**10)
            second = n % 60
            status = "inactive" if n % 97 == 0 else "active"
            if bad_every and n % bad_every == 0:
                price = -price  # rejected: negative price
            out.write(
                f"coin-{n:07d},{symbol},{word} {n},{n},{price:.8g},{price * supply:.2f},"
                f"{price * supply / rng.randint(5, 500):.2f},{rng.uniform(-15, 15):.2f},{status},"
                f"2026-11-25T12:00:{second:02d}Z\n"
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("rows", type=int)
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bad-every", type=int, default=0, help="make every Nth row invalid")
    args = parser.parse_args()
    write_csv(args.path, args.rows, args.seed, args.bad_every)


if __name__ == "__main__":
    main()
