"""Observations loaded after newer ones, older than the raw history kept (a backfill), go into their listing's
candles (SPEC: every observation is kept raw within KASPARRO_KEEP_RAW and rolled up after), and loading them again
changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_history import DAY, HOUR, START, candles, load, observations, unique, write_feed

from conftest import LiveServer
from etl_support import last_run

NOW = START + 20 * DAY  # the newest observation: 2026-11-21
OLD = (START + 8 * DAY, START + 10 * DAY)  # ten days before it: past KASPARRO_KEEP_RAW (2d), within KEEP_HOURLY (30d)


def api_candles(server: LiveServer, asset_id: str, interval: str) -> list[dict[str, Any]]:
    status, _, body = server.get(f"/data/{asset_id}/history?interval={interval}&from={OLD[0]}&to={OLD[1]}")
    assert status == 200, body
    return json.loads(body)["points"]


def expected(seen: list, width: int) -> list[dict[str, Any]]:
    names = ("open", "high", "low", "close", "market_cap_usd", "volume_24h_usd", "observations")
    by_bucket = {t: values for (symbol, t), values in candles(seen, width, "asset").items() if symbol == "BTC"}
    return [
        {
            "t": datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **dict(zip(names, by_bucket[t], strict=True)),
        }
        for t in sorted(by_bucket)
        if OLD[0] <= t < OLD[1]
    ]


@pytest.mark.parametrize("how", ["an older file after a newer one", "one file, newest rows first, several batches"])
def test_observations_older_than_the_raw_history_are_rolled_up_once(live_server: Any, tmp_path: Path, how: str):
    old = unique(observations("a", *OLD, seed=40))
    new = unique(observations("a", NOW - DAY, NOW, seed=41))
    db = tmp_path / "store.db"
    if how.startswith("an older file"):
        load(db, [("a", write_feed(tmp_path / "new.csv", new))])
        load(db, [("a", write_feed(tmp_path / "old.csv", old))])
    else:
        rows = sorted(old + new, key=lambda o: -o.t)
        feed = tmp_path / "all.csv"
        write_feed(feed, rows)  # shuffles; rewrite newest first
        header, *lines = feed.read_text().splitlines(keepends=True)
        feed.write_text(header + "".join(sorted(lines, key=lambda line: line.rsplit(",", 1)[1], reverse=True)))
        load(db, [("a", feed)], KASPARRO_BATCH_ROWS="100")
    server = live_server(db, LOG_LEVEL="warning")
    asset_id = json.loads(server.get("/data?filter_by=symbol:btc")[2])["data"][0]["asset_id"]
    for interval, width in (("1d", DAY), ("1h", HOUR)):
        assert api_candles(server, asset_id, interval) == expected(old, width), interval
    # The same observations again, from another file: nothing changes.
    load(db, [("a", write_feed(tmp_path / "again.csv", old[::-1]))])
    assert last_run(db)["rows_loaded"] == 0
    server = live_server(db, LOG_LEVEL="warning")
    for interval, width in (("1d", DAY), ("1h", HOUR)):
        assert api_candles(server, asset_id, interval) == expected(old, width), interval
