"""Every run brings every listing's history to the retention its settings state (SPEC, History and retention), also
a listing no run loads any more: a source dropped from a run's sources, a coin that stopped being listed. Retention
counts back from the newest observation the store holds. The real etl.py and SQLite files."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_history import (
    DAY,
    HOUR,
    RETENTION,
    START,
    Seen,
    as_raw,
    assert_open_candles_are_the_newest,
    candles,
    kept_raw,
    load,
    observations,
    stored_candles,
    write_feed,
)

from etl_support import query

DAYS = 8


def day(seen: list[Seen], n: int) -> list[Seen]:
    return [o for o in seen if START + n * DAY <= o.t < START + (n + 1) * DAY]


def assert_retention(db: Path, loaded: list[Seen]) -> None:
    """Raw observations from the day KEEP_RAW (1d) before the store's newest observation, hourly candles from the
    day KEEP_HOURLY (2d) before it, daily candles all: for every listing, loaded lately or not."""
    newest = max(o.t for o in loaded)
    raw_from, hourly_from = (newest - DAY) // DAY * DAY, (newest - 2 * DAY) // DAY * DAY
    assert kept_raw(db) == as_raw(o for o in loaded if o.t >= raw_from)
    hourly = candles(loaded, HOUR, "listing")
    assert stored_candles(db, HOUR) == {k: v for k, v in hourly.items() if k[2] >= hourly_from}
    assert stored_candles(db, DAY) == candles(loaded, DAY, "listing")
    assert_open_candles_are_the_newest(db)
    assert set(query(db, "SELECT raw_before, hourly_before FROM listing")) == {(raw_from, hourly_from)}


# Who stops being loaded after the second day, and how the runs after it go on without it.
STOPS = {
    "a source dropped from the run's sources": lambda seen, n: {"b": [o for o in day(seen, n) if o.source == "csv:b"]},
    "a coin the source stopped listing": lambda seen, n: {
        name: [o for o in day(seen, n) if o.source == f"csv:{name}" and o.asset != "ETH"] for name in ("a", "b")
    },
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_listing_no_longer_loaded_is_rolled_up_as_the_store_moves_on(tmp_path: Path, stop: str) -> None:
    seen = observations("a", START, START + DAYS * DAY, seed=50) + observations("b", START, START + DAYS * DAY, 51)
    db = tmp_path / "store.db"
    loaded: list[Seen] = []
    for n in range(DAYS):
        feeds = {name: [o for o in day(seen, n) if o.source == f"csv:{name}"] for name in ("a", "b")}
        if n >= 2:
            feeds = STOPS[stop](seen, n)
        for name, part in feeds.items():
            load(db, [(name, write_feed(tmp_path / f"{name}{n}.csv", part))], **RETENTION)
            loaded += part
        assert_retention(db, loaded)
    stopped = [o for o in loaded if o.t < START + 2 * DAY]
    assert query(db, "SELECT count(*) FROM raw_observation WHERE observed_at < ?", (START + 2 * DAY,)) == [(0,)]
    assert stopped, "the premise: what stopped was loaded"


def test_a_shorter_retention_applies_to_every_listing_at_the_next_run_even_with_nothing_new(tmp_path: Path) -> None:
    """Both sources kept whole (4d raw), then one run of csv:b alone, its file unchanged (nothing read), under 1d raw
    and 2d hourly: every listing, csv:a's too, is pruned to those settings from the store's newest observation."""
    seen = observations("a", START, START + 4 * DAY, seed=52) + observations("b", START, START + 4 * DAY, seed=53)
    db = tmp_path / "store.db"
    feeds = {n: write_feed(tmp_path / f"{n}.csv", [o for o in seen if o.source == f"csv:{n}"]) for n in "ab"}
    load(db, list(feeds.items()), KASPARRO_KEEP_RAW="4d", KASPARRO_KEEP_HOURLY="4d")
    assert query(db, "SELECT count(*) FROM raw_observation") == [(len(as_raw(seen)),)], "the premise: all kept raw"
    load(db, [("b", feeds["b"])], **RETENTION)
    assert query(db, "SELECT detail FROM run_source ORDER BY run_id DESC LIMIT 1")[0][0].startswith("unchanged since")
    assert_retention(db, seen)
