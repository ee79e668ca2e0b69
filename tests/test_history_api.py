"""GET /data/{asset_id}/history: points equal the loaded observations, candles an independent computation."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history import DAY, HOUR, START, Seen, candles, load, observations, unique, write_feed

from conftest import SyncConductor
from kasparro import Config, create_app

END = START + 2 * DAY


def utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Seen]]:
    """Two CSV sources over two days of four coins, loaded in four runs; the observations as given. Source b is
    loaded first, so its listings' keys come before a's, against the (source, source id) order of the merge."""
    folder = tmp_path_factory.mktemp("history-api")
    alpha = observations("a", START, END, seed=11)
    beta = observations("b", START, END, seed=12, step=900)
    feeds = []
    for half in range(2):
        lo, hi = START + half * DAY, START + (half + 1) * DAY
        for name, seen in (("b", beta), ("a", alpha)):
            feeds.append((name, write_feed(folder / f"{name}{half}.csv", [o for o in seen if lo <= o.t < hi])))
    db = folder / "kasparro.db"
    load(db, feeds, KASPARRO_KEEP_RAW="7d", KASPARRO_KEEP_HOURLY="30d")
    return db, unique(alpha + beta)


@pytest.fixture(scope="module")
def history_client(market: tuple[Path, list[Seen]]) -> Any:
    with SyncConductor(create_app(Config(db=market[0], log_level="warning"))) as client:
        yield client


def asset_id(client: Any, symbol: str) -> str:
    return client.get("/data", params={"filter_by": f"symbol:{symbol}"}).json["data"][0]["asset_id"]


def candle_dicts(expected: dict[tuple, tuple], series: tuple, start: int, end: int, width: int) -> list[dict]:
    names = ("open", "high", "low", "close", "market_cap_usd", "volume_24h_usd", "observations")
    return [
        {"t": utc(t), **dict(zip(names, values, strict=True))}
        for (*key, t), values in sorted(expected.items(), key=lambda item: item[0][-1])
        if tuple(key) == series and start <= t < end
    ]


def test_raw_points_are_the_loaded_observations_in_the_window(history_client: Any, market: Any) -> None:
    _, seen = market
    btc = asset_id(history_client, "BTC")
    start, end = START + 6 * HOUR, START + 30 * HOUR
    body = history_client.get(f"/data/{btc}/history", params={"interval": "raw", "from": utc(start), "to": str(end)})
    assert body.status_code == 200, body.text
    expected = sorted((o.t, o.source, o.source_id) for o in seen if o.asset == "BTC" and start <= o.t < end)
    by_key = {(o.t, o.source, o.source_id): o for o in seen}
    points = body.json["points"]
    assert [(p["observed_at"], p["source"]) for p in points] == [(utc(t), source) for t, source, _ in expected]
    assert [(p["price_usd"], p["market_cap_usd"], p["volume_24h_usd"]) for p in points] == [
        (by_key[key].price, by_key[key].market_cap, by_key[key].volume) for key in expected
    ]
    assert (body.json["from"], body.json["to"], body.json["next_cursor"]) == (utc(start), utc(end), None)


@pytest.mark.parametrize(
    ("interval", "width"), [("5m", 300), ("15m", 900), ("1h", HOUR), ("4h", 4 * HOUR), ("1d", DAY)]
)
@pytest.mark.parametrize("source", [None, "csv:a", "csv:b"])
def test_candles_equal_an_independent_computation(
    history_client: Any, market: Any, interval: str, width: int, source: str | None
) -> None:
    _, seen = market
    eth = asset_id(history_client, "ETH")
    params = {"interval": interval, "from": str(START), "to": str(END)} | ({"source": source} if source else {})
    body = history_client.get(f"/data/{eth}/history", params=params)
    assert body.status_code == 200, body.text
    chosen = [o for o in seen if source is None or o.source == source]
    key = "asset" if source is None else "listing"
    series = ("ETH",) if source is None else (source, next(o.source_id for o in chosen if o.asset == "ETH"))
    expected = candle_dicts(candles(chosen, width, key), series, START, END, width)
    assert body.json["points"] == expected
    assert expected, "the window holds candles"


@pytest.mark.parametrize(
    ("interval", "width"), [("5m", 300), ("15m", 900), ("1h", HOUR), ("4h", 4 * HOUR), ("1d", DAY)]
)
def test_a_window_takes_the_whole_candles_whose_bucket_starts_in_it(
    history_client: Any, market: Any, interval: str, width: int
) -> None:
    """from and to cut buckets: a candle is in the window by its start t, and is its whole bucket's, observations
    after `to` included (from ≤ t < to; the README's rule)."""
    _, seen = market
    eth = asset_id(history_client, "ETH")
    start, end = START + 13 * HOUR + 7 * 60 + 30, START + 30 * HOUR + 15 * 60 + 1
    body = history_client.get(f"/data/{eth}/history", params={"interval": interval, "from": str(start), "to": str(end)})
    assert body.status_code == 200, body.text
    expected = candle_dicts(candles(seen, width, "asset"), ("ETH",), start, end, width)
    assert body.json["points"] == expected
    assert expected, "the window holds candles"
    last = datetime.fromisoformat(expected[-1]["t"]).timestamp()
    if width >= HOUR:  # its bucket holds observations after `to`, which it takes
        assert any(o.asset == "ETH" and end <= o.t < last + width for o in seen), "the last bucket is cut by to"


def test_paging_by_cursor_returns_the_same_points_as_one_page(history_client: Any) -> None:
    sol = asset_id(history_client, "SOL")
    for interval in ("raw", "15m", "1h"):
        params = {"interval": interval, "from": str(START), "to": str(END)}
        whole = history_client.get(f"/data/{sol}/history", params=params).json["points"]
        paged, cursor = [], None
        while True:
            body = history_client.get(
                f"/data/{sol}/history", params=params | {"limit": "7"} | ({"cursor": cursor} if cursor else {})
            ).json
            paged += body["points"]
            assert len(body["points"]) <= 7
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert paged == whole and len(whole) > 7, interval


def test_a_window_in_unix_seconds_with_a_fraction_bounds_at_that_instant(history_client: Any, market: Any) -> None:
    """from (inclusive) and to (exclusive) between two whole seconds take the points that instant takes: t-1 plus
    a fraction keeps an observation at t out of `to` and in `from`, as etl.py reads such a time. They were a 400."""
    _, seen = market
    btc = asset_id(history_client, "BTC")
    times = sorted({o.t for o in seen if o.asset == "BTC"})
    first, last = times[10], times[20]  # observations at both bounds
    for fraction in (".5", ".000001", ".999999999"):
        params = {"interval": "raw", "from": f"{first - 1}{fraction}", "to": f"{last}{fraction}"}
        body = history_client.get(f"/data/{btc}/history", params=params)
        assert body.status_code == 200, body.text
        got = sorted({datetime.fromisoformat(p["observed_at"]).timestamp() for p in body.json["points"]})
        assert got == times[10:21], fraction
        assert (body.json["from"], body.json["to"]) == (utc(first), utc(last + 1))


def test_the_default_window_ends_just_after_the_newest_observation(history_client: Any, market: Any) -> None:
    _, seen = market
    doge = asset_id(history_client, "DOGE")
    newest = max(o.t for o in seen if o.asset == "DOGE")
    hourly = history_client.get(f"/data/{doge}/history").json
    assert (hourly["interval"], hourly["to"], hourly["from"]) == ("1h", utc(newest + 1), utc(newest + 1 - 100 * HOUR))
    raw = history_client.get(f"/data/{doge}/history", params={"interval": "raw"}).json
    assert raw["from"] == utc(newest + 1 - DAY) and raw["points"][-1]["observed_at"] == utc(newest)


def test_kept_answers_carry_an_etag_and_answer_304(history_client: Any) -> None:
    btc = asset_id(history_client, "BTC")
    first = history_client.get(f"/data/{btc}/history", params={"interval": "1d"})
    again = history_client.get(
        f"/data/{btc}/history", params={"interval": "1d"}, headers={"If-None-Match": first.headers["etag"]}
    )
    assert (again.status_code, again.content) == (304, b"")


@pytest.mark.parametrize(
    ("query", "status", "names"),
    [
        ("interval=2h", 400, "interval"),
        ("from=2027-01-01&to=2026-01-01", 400, "from"),
        ("from=yesterday", 400, "from"),
        ("from=1764072000000", 400, "from"),
        ("to=2026-W48", 400, "to"),
        ("from=20261125T120000Z", 400, "from"),
        ("to=12:00", 400, "to"),
        ("limit=0", 400, "limit"),
        ("limit=1001", 400, "limit"),
        ("cursor=not-a-token-at-all", 400, "cursor"),
        ("colour=red", 400, "colour"),
        ("source=coingecko", 404, "coingecko"),
    ],
)
def test_bad_history_queries_are_problems_naming_the_part(
    history_client: Any, query: str, status: int, names: str
) -> None:
    btc = asset_id(history_client, "BTC")
    answer = history_client.get(f"/data/{btc}/history?{query}")
    assert answer.status_code == status and answer.headers["content-type"] == "application/problem+json"
    assert names in answer.json["detail"]


def test_an_unknown_asset_is_a_404(history_client: Any) -> None:
    answer = history_client.get("/data/no-such-coin/history")
    assert answer.status_code == 404 and "no-such-coin" in answer.json["detail"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(START - DAY, END + DAY),
    span=st.integers(0, 3 * DAY),
    interval=st.sampled_from(["raw", "5m", "15m", "1h", "4h", "1d"]),
    limit=st.integers(1, 1000),
)
def test_any_window_answers_ordered_points_inside_it(
    history_client: Any, start: int, span: int, interval: str, limit: int
) -> None:
    btc = asset_id(history_client, "BTC")
    body = history_client.get(
        f"/data/{btc}/history",
        params={"interval": interval, "from": str(start), "to": str(start + span), "limit": str(limit)},
    )
    assert body.status_code == 200, body.text
    times = [p["observed_at" if interval == "raw" else "t"] for p in body.json["points"]]
    assert times == sorted(times) and len(times) <= limit
    assert all(utc(start) <= t < utc(start + span) for t in times)


def test_an_asset_listed_twice_by_one_source_merges_both_listings(market: Any, tmp_path: Path) -> None:
    """A listing pinned by hand to another asset of its source: the asset's candles merge three listings, two of
    one source, ordered by source id where their times tie."""
    db, seen = market
    pinned = tmp_path / "pinned.db"
    with sqlite3.connect(db) as source, sqlite3.connect(pinned) as copy:
        source.backup(copy)
    with sqlite3.connect(pinned) as conn:
        (btc,) = conn.execute("SELECT asset_id FROM source_map WHERE source_id = 'a-bitcoin'").fetchone()
        conn.execute("UPDATE source_map SET asset_id = ?, pinned = 1 WHERE source_id = 'a-ethereum'", (btc,))
    merged = [dataclasses.replace(o, asset="BTC") if o.source_id == "a-ethereum" else o for o in seen]
    with SyncConductor(create_app(Config(db=pinned, log_level="warning"))) as client:
        for interval, width in (("5m", 300), ("1h", HOUR), ("4h", 4 * HOUR), ("1d", DAY)):
            params = {"interval": interval, "from": str(START), "to": str(END)}
            body = client.get(f"/data/{btc}/history", params=params)
            assert body.status_code == 200, body.text
            expected = candle_dicts(candles(merged, width, "asset"), ("BTC",), START, END, width)
            assert body.json["points"] == expected and expected, interval
