"""Candles of a kept width (1h, 1d) merged across an asset's listings in SQL (kasparro.kept_candle_sql): the
first listing's candles lead, the others' are sought bucket by bucket. Listings with gaps of their own, a gap
all share, listings starting and ending at other times, open candles in different buckets, raw observations
pruned before the window's end: the candles equal an independent computation, per source and merged, and the
general merge in Python (merge_candles) on any set of listings."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_history import DAY, HOUR, START, Seen, candles, load, observations, unique, write_feed
from test_history_api import candle_dicts

import kasparro
from conftest import SyncConductor
from kasparro import Config, create_app
from stores import read_only_uri

END = START + 6 * DAY
SHARED_GAP = (START + 2 * DAY + 12 * HOUR, START + 2 * DAY + 15 * HOUR)  # no source observed then
ALPHA_GAP = (START + DAY + 20 * HOUR, START + DAY + 27 * HOUR)  # csv:a, the first listing, missed these hours
# Windows that the first listing (csv:a) covers and does not: csv:b starts before it and ends after it.
WINDOWS = {
    "all": (START, END),
    "covered by a": (START + 3 * DAY, START + 3 * DAY + 20 * HOUR),
    "the shared gap": (START + 2 * DAY + 4 * HOUR, START + 3 * DAY),
    "a's own gap": (START + DAY, START + 2 * DAY),
    "b's last hours": (START + 5 * DAY, END),
    "across raw retention": (START + 2 * DAY + 5 * HOUR, START + 5 * DAY + 3 * HOUR),
}
INTERVALS = {"1h": HOUR, "4h": 4 * HOUR, "1d": DAY}


def outside(seen: list[Seen], *spans: tuple[int, int]) -> list[Seen]:
    return [o for o in seen if not any(lo <= o.t < hi for lo, hi in spans)]


@pytest.fixture(scope="module")
def gapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Seen]]:
    """Three CSV sources of the same four coins (each coin one asset of three listings) over six days, raw
    observations kept two days: a from hour 5 to 3 hours before the end, b all along, c on days 2 to 4. Loaded c,
    b, a, so listing keys run against the (source, source id) order of the merge."""
    folder = tmp_path_factory.mktemp("history-merge")
    alpha = outside(observations("a", START + 5 * HOUR, END - 3 * HOUR, seed=31), ALPHA_GAP, SHARED_GAP)
    beta = outside(observations("b", START, END, seed=32, step=900), SHARED_GAP)
    gamma = outside(observations("c", START + 2 * DAY, START + 4 * DAY + 7 * HOUR, seed=33, step=1200), SHARED_GAP)
    feeds = [(name, write_feed(folder / f"{name}.csv", seen)) for name, seen in (("c", gamma), ("b", beta))]
    for day in range(6):  # day by day, so that retention prunes as a schedule would
        part = [o for o in alpha if START + day * DAY <= o.t < START + (day + 1) * DAY]
        feeds.append(("a", write_feed(folder / f"a{day}.csv", part)))
    db = folder / "kasparro.db"
    load(db, feeds, KASPARRO_KEEP_RAW="2d", KASPARRO_KEEP_HOURLY="30d")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT min(raw_before) FROM listing WHERE source = 'csv:a'").fetchone()[0] > START
    return db, unique(alpha + beta + gamma)


@pytest.fixture(scope="module")
def gapped_client(gapped: tuple[Path, list[Seen]]) -> Iterator[Any]:
    with SyncConductor(create_app(Config(db=gapped[0], log_level="warning"))) as client:
        yield client


def asset_of(client: Any, symbol: str) -> str:
    return client.get("/data", params={"filter_by": f"symbol:{symbol}"}).json["data"][0]["asset_id"]


@pytest.mark.parametrize("symbol", ["BTC", "SOL"])
@pytest.mark.parametrize("source", [None, "csv:a", "csv:b", "csv:c"])
def test_merged_candles_across_gaps_equal_an_independent_computation(
    gapped_client: Any, gapped: Any, symbol: str, source: str | None
) -> None:
    _, seen = gapped
    asset = asset_of(gapped_client, symbol)
    chosen = [o for o in seen if o.asset == symbol and (source is None or o.source == source)]
    key = "asset" if source is None else "listing"
    series = (symbol,) if source is None else (source, chosen[0].source_id)
    for window, (start, end) in WINDOWS.items():
        for interval, width in INTERVALS.items():
            params = {"interval": interval, "from": str(start), "to": str(end)} | ({"source": source} if source else {})
            body = gapped_client.get(f"/data/{asset}/history", params=params)
            assert body.status_code == 200, body.text
            expected = candle_dicts(candles(chosen, width, key), series, start, end, width)
            assert body.json["points"] == expected, (window, interval)


def test_the_windows_hold_what_they_are_named_for(gapped: Any) -> None:
    """The fixture's premises: each window's merged candles are made as its name says."""
    _, seen = gapped
    btc = [o for o in seen if o.asset == "BTC" and o.price is not None]

    def hours(source: str, window: str) -> set[int]:
        start, end = WINDOWS[window]
        return {o.t // HOUR for o in btc if o.source == source and start <= o.t < end}

    assert hours("csv:b", "covered by a") <= hours("csv:a", "covered by a")
    assert hours("csv:c", "covered by a") <= hours("csv:a", "covered by a")
    assert hours("csv:b", "a's own gap") - hours("csv:a", "a's own gap")
    assert hours("csv:b", "b's last hours") - hours("csv:a", "b's last hours")
    shared = hours("csv:a", "the shared gap")
    assert max(shared) - min(shared) + 1 > len(shared)  # a gap inside the first listing's run
    assert hours("csv:b", "the shared gap") | hours("csv:c", "the shared gap") <= shared


def test_paging_merged_candles_across_gaps_returns_the_same_points_as_one_page(gapped_client: Any) -> None:
    btc = asset_of(gapped_client, "BTC")
    hourly = [("1h", window, 5) for window in ("all", "the shared gap", "a's own gap", "across raw retention")]
    for interval, window, limit in [*hourly, ("1d", "all", 2), ("1d", "across raw retention", 2)]:
        start, end = WINDOWS[window]
        params = {"interval": interval, "from": str(start), "to": str(end)}
        whole = gapped_client.get(f"/data/{btc}/history", params=params).json["points"]
        paged, cursor = [], None
        while True:
            page = params | {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
            body = gapped_client.get(f"/data/{btc}/history", params=page).json
            paged += body["points"]
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert paged == whole and len(whole) > limit, (interval, window)


def test_kept_candles_of_any_listings_equal_the_merge_of_their_parts(gapped: Any) -> None:
    """read_candles on random sets of the store's twelve listings (coins mixed, up to more than MERGED_IN_SQL),
    random windows and cursors: the same rows as merge_candles of candle_sql's parts."""
    db, _ = gapped
    conn = sqlite3.connect(read_only_uri(db), uri=True)
    listings = [row[0] for row in conn.execute("SELECT listing_id FROM listing ORDER BY source, source_id")]
    assert len(listings) == 12
    chooser = random.Random(17)
    for _ in range(300):
        ids = sorted(chooser.sample(listings, chooser.randint(1, len(listings))), key=listings.index)
        width = chooser.choice(kasparro.KEPT_WIDTHS)
        start = chooser.randrange(START - DAY, END + DAY)
        end = start + chooser.randrange(7 * DAY)
        after = chooser.choice([None, start + chooser.randrange(DAY)])
        first = -(-start // width) * width
        if after is not None:
            first = max(first, (after // width + 1) * width)
        past = max(first, -(-end // width) * width)
        parts = conn.execute(kasparro.candle_sql(len(ids), True), (*ids, first, past, width))
        expected = kasparro.merge_candles(parts, width)
        assert kasparro.read_candles(conn, ids, width, start, end, after) == expected, (ids, width, start, end)
