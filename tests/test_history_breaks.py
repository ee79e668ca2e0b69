"""History and retention as a breaker tried them (issue 17): listings of one asset whose retention horizons differ
(one first loaded under a longer retention than the others were pruned by), read merged. The real etl.py and SQLite
files."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
from test_history import DAY, HOUR, START, Seen, candles, kill_at_random, load, observations, unique, write_feed
from test_history_api import candle_dicts, utc

from conftest import SyncConductor
from etl_support import CANDLES, query, run_etl, start_etl, store_content, wait_for_event
from kasparro import Config, create_app

END = START + 8 * DAY
INTERVALS = [("5m", 300), ("15m", 900), ("1h", HOUR), ("4h", 4 * HOUR), ("1d", DAY)]


def btc(source: str, start: int, end: int, seed: int) -> list[Seen]:
    return [o for o in observations(source, start, end, seed=seed, step=1_800) if o.asset == "BTC"]


def day_by_day(folder: Path, db: Path, feeds: dict[str, tuple[list[Seen], dict[str, str], int]]) -> None:
    """Each source's observations loaded a day at a time, the sources in turn, each with its own retention, from its
    first day of loading (whose run loads every observation of the source up to that day's end)."""
    for day in range(8):
        for name, (seen, env, first) in feeds.items():
            part = [o for o in seen if day >= first and START + day * DAY <= o.t < START + (day + 1) * DAY]
            if day == first:
                part = [o for o in seen if o.t < START + (day + 1) * DAY]
            if part:
                load(db, [(name, write_feed(folder / f"{name}{day}.csv", part))], **env)


SHORT = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "3d"}
LONG = {"KASPARRO_KEEP_RAW": "8d", "KASPARRO_KEEP_HOURLY": "8d"}
# Every run moves every listing's horizons to the store's clock by its own retention, never back: listings' horizons
# differ where one was first loaded under a longer retention than the runs that had pruned the others.
CASES = {
    # csv:a all along; csv:b's five days loaded at once on the last day, kept longer.
    "a listing first loaded under a longer retention": lambda: {"a": (btc("a", START, END, 1), SHORT, 0),
                                                              "b": (btc("b", START + 3 * DAY, END, 2), LONG, 7)},
    # csv:a stops after five days; csv:b's six days loaded at once on the last day, kept longer.
    "a listing that stopped, then one kept longer": lambda: {"a": (btc("a", START, START + 5 * DAY, 3), SHORT, 0),
                                                           "b": (btc("b", START + 2 * DAY, END, 4), LONG, 7)},
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def uneven(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("uneven")
    feeds = CASES[request.param]()
    db = folder / "kasparro.db"
    day_by_day(folder, db, feeds)
    with SyncConductor(create_app(Config(db=db, log_level="warning"))) as client:
        yield client, db, unique([o for seen, *_ in feeds.values() for o in seen])


@pytest.mark.parametrize(("interval", "width"), INTERVALS)
def test_merged_candles_cover_only_buckets_every_listing_keeps(uneven: Any, interval: str, width: int) -> None:
    """A merged candle is of every listing or absent: from the latest horizon of the asset's listings in the tier
    the interval is read from (raw for 5m and 15m, hourly for 1h and 4h; daily candles are kept forever)."""
    client, db, seen = uneven
    horizons = query(db, "SELECT raw_before, hourly_before FROM listing")
    assert len({h for h in horizons}) == 2, "the listings' horizons differ (the premise)"
    kept_from = 0 if width == DAY else max(raw if width < HOUR else hourly for raw, hourly in horizons)
    asset = client.get("/data").json["data"][0]["asset_id"]
    body = client.get(f"/data/{asset}/history", params={"interval": interval, "from": str(START), "to": str(END)})
    assert body.status_code == 200, body.text
    expected = candle_dicts(candles(seen, width, "asset"), ("BTC",), max(START, kept_from), END, width)
    assert body.json["points"] == expected
    assert expected, "the window holds candles"


def test_merged_raw_points_are_every_listing_s_kept_observations(uneven: Any) -> None:
    """Raw points are observations, each named by its source, not roll-ups: merged over listings whose raw horizons
    differ, they are every listing's observations from its own horizon on (none is part of another's point), in
    time order, then source; before the latest horizon they are the longer-kept listing's alone."""
    client, db, seen = uneven
    horizons = dict(query(db, "SELECT source, raw_before FROM listing"))
    assert len(set(horizons.values())) == 2, "the listings' raw horizons differ (the premise)"
    asset = client.get("/data").json["data"][0]["asset_id"]
    body = client.get(f"/data/{asset}/history", params={"interval": "raw", "from": str(START), "to": str(END)})
    assert body.status_code == 200, body.text
    kept = sorted((o.t, o.source, o.price, o.market_cap, o.volume) for o in seen if o.t >= horizons[o.source])
    points = [(p["observed_at"], p["source"], p["price_usd"], p["market_cap_usd"], p["volume_24h_usd"])
              for p in body.json["points"]]  # fmt: skip
    assert points == [(utc(t), *rest) for t, *rest in kept]
    assert {source for t, source, *_ in kept if t < max(horizons.values())} == {min(horizons, key=horizons.get)}


# --- retention settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0" * 5_000 + "d", "must be a positive duration"),  # a zero past the 4,300 digits Python's int() reads
        ("٧d", "must be a positive duration"),  # a digit, but not one of 0-9: '7d' is ASCII
        ("0" * 5_000 + "7d", START - 7 * DAY),  # seven days before the newest observation's day
        ("9" * 5_000 + "h", 0),  # longer than any history: everything kept, as 99999999999999999999d
    ],
    ids=["5000 zeros", "arabic-indic 7", "5000 zeros then 7", "5000 nines"],
)
def test_a_retention_of_any_length_is_read_or_refused_by_name(tmp_path: Path, value: str, says: str | int) -> None:
    """A duration's number of more than 4,300 digits was once a ValueError traceback and exit 1; a refused one
    says so, a read one sets the horizons (`says`) of a listing observed in the hour from START."""
    feed = write_feed(tmp_path / "feed.csv", btc("a", START, START + HOUR, 5))
    result = run_etl(tmp_path / "store.db", f"csv:a={feed}", KASPARRO_KEEP_RAW=value, KASPARRO_KEEP_HOURLY=value)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    if isinstance(says, int):
        assert result.returncode == 0, result.stderr[-2000:]
        assert query(tmp_path / "store.db", "SELECT raw_before, hourly_before FROM listing") == [(says, says)]
    else:
        assert result.returncode == 2
        assert f"KASPARRO_KEEP_RAW {says}" in result.stderr


# --- observations older than the raw history ----------------------------------------------


def stored(db: Path, width: int) -> dict[tuple, tuple]:
    rows = query(db, "SELECT l.source, l.source_id, c.t, c.open, c.high, c.low, c.close, c.market_cap_usd,"
                     f" c.volume_24h_usd, c.observations FROM {CANDLES} c JOIN listing l USING (listing_id)"
                     " WHERE c.width = ?", (width,))  # fmt: skip
    return {(source, source_id, t): tuple(values) for source, source_id, t, *values in rows}


GAPS = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "30d"}


def test_a_backfill_filling_hours_of_a_day_kept_as_candles_is_rolled_up(tmp_path: Path) -> None:
    """Observations older than the raw history, in hours that hold none yet but inside the span of their day's
    candle, are new (hourly candles are kept there: each hour tells what it holds); once loaded, again nothing."""
    seen = unique(btc("a", START, START + 6 * DAY, 6))
    newest = [o for o in seen if o.t >= START + 5 * DAY]
    even = [o for o in seen if o.t < START + 5 * DAY and o.t // HOUR % 2 == 0]
    odd = [o for o in seen if o.t < START + 5 * DAY and o.t // HOUR % 2 == 1]
    db = tmp_path / "store.db"
    for name, part in (("even", even), ("newest", newest), ("odd", odd), ("again", odd + even)):
        load(db, [("a", write_feed(tmp_path / f"{name}.csv", part))], **GAPS)
    assert query(db, "SELECT raw_before FROM listing") == [(START + 4 * DAY,)], "the odd hours came after pruning"
    for width in (HOUR, DAY):
        assert stored(db, width) == candles(seen, width, "listing"), width


def test_one_shuffled_file_in_many_batches_is_rolled_up_whole(tmp_path: Path) -> None:
    """A file in no time order, loaded in batches: a batch's newer rows once pruned the raw history that older rows
    of later batches then fell before (a 30-minute feed: two observations an hour, so none lay inside the span of
    its hour's candle when it came; for more, test_a_shuffled_file_makes_the_store_its_rows_in_time_order_make)."""
    seen = unique(observations("a", START, START + 6 * DAY, seed=7, step=1_800))
    db = tmp_path / "store.db"
    load(db, [("a", write_feed(tmp_path / "all.csv", seen))], **GAPS, KASPARRO_BATCH_ROWS="100")
    for width in (HOUR, DAY):
        assert stored(db, width) == candles(seen, width, "listing"), width


def test_kills_while_late_rows_roll_up_converge_to_one_clean_run(tmp_path: Path) -> None:
    """SIGKILL at random instants of a run of one file in no time order (its later batches' rows older than the
    raw history its earlier ones left), after a run under another retention: a clean finish equals a clean run."""
    first = write_feed(tmp_path / "first.csv", observations("a", START + 6 * DAY, START + 9 * DAY, seed=20))
    second = write_feed(tmp_path / "second.csv", observations("a", START, START + 12 * DAY, seed=21))
    before = {"KASPARRO_KEEP_RAW": "2d", "KASPARRO_KEEP_HOURLY": "4d", "KASPARRO_BATCH_ROWS": "100"}
    env = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "2d", "KASPARRO_BATCH_ROWS": "100"}
    clean, killed = tmp_path / "clean.db", tmp_path / "killed.db"
    for db in (clean, killed):
        load(db, [("a", first)], **before)
    load(clean, [("a", second)], **env)
    kill_at_random(killed, f"csv:a={second}", env, random.Random(20261202), kills=6, batches=3)
    load(killed, [("a", second)], **env)
    assert store_content(killed) == store_content(clean)
    assert query(clean, "SELECT count(*) FROM raw_observation WHERE observed_at < ?", (START + 10 * DAY,)) == [(0,)]


def sorted_feed(path: Path, shuffled: Path) -> Path:
    """The rows of a feed written by write_feed, in time order (then line order)."""
    header, *rows = shuffled.read_text().splitlines(keepends=True)
    path.write_text(header + "".join(sorted(rows, key=lambda row: row.rsplit(",", 1)[1])))
    return path


def history(db: Path) -> dict[str, Any]:
    """What a run of a feed makes of it, whatever the order of its rows (store_content less the checkpoint)."""
    content = store_content(db)
    return {key: content[key] for key in ("assets", "listings", "observations", "candles", "horizons", "rejects")}


RETENTIONS = {
    "raw 1d, hourly 30d": {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "30d"},
    "raw 1d, hourly 2d": {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "2d"},
    "raw 2h, hourly 1d": {"KASPARRO_KEEP_RAW": "2h", "KASPARRO_KEEP_HOURLY": "1d"},
}


@pytest.mark.parametrize("env", list(RETENTIONS.values()), ids=list(RETENTIONS))
def test_a_shuffled_file_makes_the_store_its_rows_in_time_order_make(tmp_path: Path, env: dict[str, str]) -> None:
    """A 10-minute feed spanning more than KASPARRO_KEEP_RAW, in no time order and loaded in batches of 100 rows:
    a batch's newer rows once moved the raw history past older rows of later batches, and those inside the span of
    their hour's candle (the third of an hour, and on) were taken for ones loaded before and lost. One run of it
    makes the store one run of its rows in time order makes; a second run of either changes nothing."""
    seen = unique(observations("a", START, START + 5 * DAY, seed=22))
    shuffled = write_feed(tmp_path / "shuffled.csv", seen)
    in_order = sorted_feed(tmp_path / "sorted.csv", shuffled)
    stores = {}
    for name, feed in (("shuffled", shuffled), ("sorted", in_order)):
        db = tmp_path / f"{name}.db"
        load(db, [("a", feed)], **env, KASPARRO_BATCH_ROWS="100")
        stores[name] = history(db)
        load(db, [("a", write_feed(tmp_path / f"{name}-again.csv", seen))], **env, KASPARRO_BATCH_ROWS="100")
        assert history(db) == stores[name], f"{name}: a reload changed the store"
    assert stores["shuffled"] == stores["sorted"]
    db = tmp_path / "shuffled.db"
    for width in (HOUR, DAY):
        kept = [o for o in seen if width == DAY or o.t >= query(db, "SELECT max(hourly_before) FROM listing")[0][0]]
        assert stored(db, width) == candles(kept, width, "listing"), width


@pytest.mark.parametrize("env", list(RETENTIONS.values()), ids=list(RETENTIONS))
def test_a_shuffled_backfill_makes_the_store_its_rows_in_time_order_make(tmp_path: Path, env: dict[str, str]) -> None:
    """The same after a run of newer observations: every row of the backfill lies before the raw history that run
    left, so goes straight into its candles (late). A third row of an hour came inside the span its hour's candle
    had from the run's earlier batches, was taken for one loaded before and lost."""
    seen = unique(observations("a", START, START + 5 * DAY, seed=23))
    newest = [o for o in seen if o.t >= START + 4 * DAY]
    older = [o for o in seen if o.t < START + 3 * DAY]
    shuffled = write_feed(tmp_path / "shuffled.csv", older)
    in_order = sorted_feed(tmp_path / "sorted.csv", shuffled)
    stores = {}
    for name, feed in (("shuffled", shuffled), ("sorted", in_order)):
        db = tmp_path / f"{name}.db"
        load(db, [("a", write_feed(tmp_path / f"{name}-newest.csv", newest))], **env)
        horizon = query(db, "SELECT min(raw_before) FROM listing")[0][0]
        assert horizon >= START + 3 * DAY, "the backfill lies before the raw history (the premise)"
        load(db, [("a", feed)], **env, KASPARRO_BATCH_ROWS="100")
        stores[name] = history(db)
        load(db, [("a", write_feed(tmp_path / f"{name}-again.csv", older))], **env, KASPARRO_BATCH_ROWS="100")
        assert history(db) == stores[name], f"{name}: a reload changed the store"
        assert query(db, "SELECT count(*) FROM raw_observation WHERE observed_at < ?", (horizon,)) == [(0,)]
    assert stores["shuffled"] == stores["sorted"]
    db = tmp_path / "shuffled.db"
    hourly_before = query(db, "SELECT max(hourly_before) FROM listing")[0][0]
    for width in (HOUR, DAY):
        kept = [o for o in newest + older if width == DAY or o.t >= hourly_before]
        assert stored(db, width) == candles(kept, width, "listing"), width


def test_late_rows_waiting_for_their_roll_up_are_not_served(tmp_path: Path) -> None:
    """A load's late rows wait in raw_observation, before their listing's raw history, for the end of the load: a
    run killed meanwhile leaves them there, and the API serves neither them as raw points nor a listing's state
    from them; the next run rolls them up (or drops them) and prunes them."""
    seen = unique(observations("a", START, START + 5 * DAY, seed=24))
    db = tmp_path / "store.db"
    load(db, [("a", write_feed(tmp_path / "newest.csv", [o for o in seen if o.t >= START + 4 * DAY]))], **GAPS)
    backfill = write_feed(tmp_path / "older.csv", [o for o in seen if o.t < START + 3 * DAY])
    proc = start_etl(db, f"csv:a={backfill}", LOG_LEVEL="debug", **GAPS, KASPARRO_BATCH_ROWS="100")
    wait_for_event(proc, "batch committed", count=2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    waiting = (
        "SELECT count(*) FROM raw_observation r JOIN listing l USING (listing_id) WHERE r.observed_at < l.raw_before"
    )
    assert query(db, waiting)[0][0] > 0, "the killed run left late rows waiting (the premise)"
    window = {"from": str(START), "to": str(START + 3 * DAY)}
    with SyncConductor(create_app(Config(db=db, log_level="warning"))) as client:
        for asset in ("bitcoin", "ethereum"):
            body = client.get(f"/data/{asset}/history", params={"interval": "raw", **window})
            assert body.status_code == 200, body.text
            assert body.json["points"] == [], asset
        as_of = client.get("/data", params={"as_of": str(START + 3 * DAY + HOUR), "page_size": "100"}).json["data"]
        assert {row["asset_id"]: row["updated_at"] for row in as_of} == {}, "no state from a late row"
    load(db, [("a", backfill)], **GAPS)
    assert query(db, waiting) == [(0,)]
