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
from etl_support import last_run, query

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


KEEP = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "3d"}


def test_a_backfill_the_kept_candles_cannot_take_is_named_in_the_run_record(tmp_path: Path) -> None:
    """Rows older than the raw history kept, inside the span of the candle an earlier run kept for them (their hour's
    while hourly candles are kept, else their day's), cannot be told from rows loaded before (a candle keeps no raw
    row), and one with no price has no candle to join: each is read, not loaded, and the source's record says how
    many of each, so rows read = loaded + rejected + those. The rest of the backfill is loaded and rolled up."""
    seen = unique([o for o in observations("a", START, START + 6 * DAY, seed=42) if o.asset == "BTC"])
    first = [o for o in seen if o.t // 600 % 2 == 0]
    backfill = [o for o in seen if o.t // 600 % 2 == 1]
    db = tmp_path / "store.db"
    load(db, [("a", write_feed(tmp_path / "first.csv", first))], **KEEP)
    ((raw_before, hourly_before),) = query(db, "SELECT raw_before, hourly_before FROM listing")
    assert hourly_before > START, "the premise: the backfill reaches the daily tier, the hourly one and the raw one"
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for o in first:
        if o.price is not None:
            for width in (HOUR, DAY):
                lo, hi = spans.get((width, o.t // width * width), (o.t, o.t))
                spans[width, o.t // width * width] = (min(lo, o.t), max(hi, o.t))
    inside = unpriced = 0
    for o in backfill:
        if o.t < raw_before:
            width = HOUR if o.t >= hourly_before else DAY
            lo, hi = spans.get((width, o.t // width * width), (1, 0))
            unpriced += o.price is None
            inside += o.price is not None and lo <= o.t <= hi
    assert inside and unpriced, "the premise: both kinds are in the backfill"

    load(db, [("a", write_feed(tmp_path / "backfill.csv", backfill))], **KEEP)
    run = last_run(db)
    assert (run["rows_read"], run["rows_rejected"], run["status"]) == (len(backfill), 0, "success")
    assert run["rows_loaded"] == len(backfill) - inside - unpriced
    ((detail,),) = query(db, "SELECT detail FROM run_source WHERE run_id = ?", (run["run_id"],))
    assert f"{inside:,} rows older than the raw history kept lay inside the span of a candle" in detail, detail
    assert f"{unpriced:,} rows older than the raw history kept had no price" in detail, detail
