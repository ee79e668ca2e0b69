"""Upstream bodies as a newcomer met them: other encodings, bodies cut short, half UTF-16 pairs, no JSON at all.
The real etl.py against a fake CoinGecko on 127.0.0.1, into a real SQLite store."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import etl_against, last_run, query
from upstream import COINGECKO_MARKETS, Reply

NAMES = ["Bitcoin", "Café Coin", "Ünïcode Tökén", "Rocket 🚀"]


def markets(names: list[str] = NAMES) -> list[dict[str, Any]]:
    """A short (so last) page of CoinGecko /coins/markets records with these names."""
    return [
        {"id": f"coin-{n}", "symbol": f"c{n}", "name": name, "current_price": 1.5 + n, "market_cap": 1000 + n,
         "market_cap_rank": n + 1, "total_volume": 10.0, "price_change_percentage_24h": 0.5,
         "last_updated": "2026-11-25T12:00:00Z"}
        for n, name in enumerate(names)
    ]  # fmt: skip


def loaded_names(db: Path) -> list[str]:
    return [name for (name,) in query(db, "SELECT name FROM source_map ORDER BY source_id")]


def source_error(db: Path) -> str:
    (error,) = query(db, "SELECT error FROM run_source WHERE source = 'coingecko' ORDER BY run_id DESC LIMIT 1")[0]
    return error


def fails_clearly(result: Any, db: Path) -> str:
    """The source's error of a run that failed with a message, not a traceback, and was recorded as failed."""
    assert result.returncode == etl.EXIT_FAILED, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_run(db)["status"] == "failed"
    return source_error(db)


# --- bodies cut short ---------------------------------------------------------------


def test_a_body_cut_short_is_fetched_again(upstream: Any, tmp_path: Path) -> None:
    """The connection closed before Content-Length: read as a whole body, it failed the source as bad JSON."""
    upstream.route(COINGECKO_MARKETS, Reply(body=markets(), truncate=100), Reply(body=markets()))
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(upstream.requests) == 2
    assert loaded_names(db) == NAMES
    size = len(json.dumps(markets()).encode())
    retries = [json.loads(line) for line in result.stdout.splitlines() if '"retrying"' in line]
    assert [r["problem"] for r in retries] == [f"the connection closed after 100 of {size:,} bytes"]


DOCUMENT = json.dumps(markets()).encode()
CUT_GZIP = gzip.compress(DOCUMENT)[:-30]  # the deflate stream's end and the gzip trailer are missing


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (Reply(body=DOCUMENT, truncate=100), f"the connection closed after 100 of {len(DOCUMENT):,} bytes"),
        (
            Reply(body=CUT_GZIP, headers={"Content-Encoding": "gzip"}),  # Content-Length is the cut body's
            f"the gzip body ends early, after {len(zlib.decompressobj(wbits=31).decompress(CUT_GZIP)):,} bytes"
            " inflated",
        ),
    ],
    ids=["content-length", "gzip-stream"],
)
def test_a_body_always_cut_short_fails_the_source_saying_so(
    upstream: Any, tmp_path: Path, reply: Reply, problem: str
) -> None:
    upstream.route(COINGECKO_MARKETS, reply)
    db = tmp_path / "store.db"
    error = fails_clearly(etl_against(upstream, db, "coingecko"), db)
    assert error.endswith(f"{problem} after {etl.HttpPolicy.attempts} attempts")
    assert len(upstream.requests) == etl.HttpPolicy.attempts
