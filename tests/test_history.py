"""History: every observation kept raw, hourly and daily candles, retention, crash safety, the upgrade."""

from __future__ import annotations

import collections
import json
import random
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import etl
from etl_support import CANDLES, etl_of, kill_mid_load, last_run, query, run_etl, store_content

HOUR, DAY = 3_600, 86_400
START = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
HEADER = "id,symbol,name,price,market_cap,volume_24h,last_updated\n"
COINS = [("BTC", "Bitcoin"), ("ETH", "Ethereum"), ("SOL", "Solana"), ("DOGE", "Dogecoin")]
# The last commit whose store has schema version 4 (the text-keyed observation table).
V4_COMMIT = "da2a157cbbc85696d50cdb8291bc52adcf6aebfc"
# The last commit whose store has schema version 5 (open candles in candle).
V5_COMMIT = "82c55e84af40d75c9d4699994c1fedde88b461ce"


@dataclass(frozen=True)
class Seen:
    """One observation as a source gave it."""

    source: str
    source_id: str
    asset: str  # the symbol: each coin here is one asset whatever its sources call it
    t: int
    price: float | None
    market_cap: float | None
    volume: float | None


def observations(source: str, start: int, end: int, seed: int, step: int = 600) -> list[Seen]:
    """A CSV source's observations of every coin from `start` to `end`, about every `step` seconds.

    Times jitter within the step; some prices are missing; source 'b' shares some instants with 'a'.
    """
    chooser = random.Random(seed)
    seen = []
    for symbol, name in COINS:
        price = chooser.uniform(0.05, 90_000)
        source_id = f"{source}-{name.lower()}"
        for slot in range(start, end, step):
            t = slot + (0 if chooser.random() < 0.2 else chooser.randrange(step))
            price *= chooser.uniform(0.98, 1.02)
            priced = chooser.random() > 0.1
            seen.append(
                Seen(f"csv:{source}", source_id, symbol, t, round(price, 6) if priced else None,
                     round(price * 1e6, 2) if chooser.random() > 0.2 else None, round(chooser.uniform(1, 1e9), 2))
            )  # fmt: skip
    return seen


def write_feed(path: Path, seen: Iterable[Seen]) -> Path:
    """The observations as a CSV file of the shipped sample's kind, in a shuffled order."""
    rows = list(seen)
    random.Random(len(rows)).shuffle(rows)
    names = dict(COINS)
    lines = [HEADER]
    for o in rows:
        when = datetime.fromtimestamp(o.t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cells = [o.source_id, o.asset, names[o.asset], o.price, o.market_cap, o.volume, when]
        lines.append(",".join("" if c is None else repr(c) if isinstance(c, float) else str(c) for c in cells) + "\n")
    path.write_text("".join(lines))
    return path


def candles(seen: Iterable[Seen], width: int, key: str) -> dict[tuple, tuple]:
    """Candles by the rule of store.sql, computed here from the observations themselves.

    key 'listing' makes one series per (source, source id), 'asset' merges an asset's listings.
    """
    buckets: dict[tuple, list[Seen]] = collections.defaultdict(list)
    for o in seen:
        if o.price is not None:
            series = (o.source, o.source_id) if key == "listing" else (o.asset,)
            buckets[(*series, o.t // width * width)].append(o)
    result = {}
    for bucket, members in buckets.items():
        members.sort(key=lambda o: (o.t, o.source, o.source_id))
        first, last = members[0], members[-1]
        prices = [o.price for o in members]
        result[bucket] = (first.price, max(prices), min(prices), last.price, last.market_cap, last.volume, len(members))
    return result


def stored_candles(db: Path, width: int) -> dict[tuple, tuple]:
    """The roll-ups of one width, by (source, source id, bucket start)."""
    rows = query(
        db,
        "SELECT l.source, l.source_id, c.t, c.open, c.high, c.low, c.close, c.market_cap_usd, c.volume_24h_usd,"
        f" c.observations FROM {CANDLES} c JOIN listing l USING (listing_id) WHERE c.width = ?",
        (width,),
    )
    return {(source, source_id, t): tuple(values) for source, source_id, t, *values in rows}


def merged_candles(db: Path, width: int) -> dict[tuple, tuple]:
    """Candles of each asset, derived from its listings' roll-ups by store.sql's merge rule."""
    rows = query(
        db,
        "SELECT m.symbol, l.source, l.source_id, c.t, c.open, c.high, c.low, c.close, c.market_cap_usd,"
        f" c.volume_24h_usd, c.observations, c.first_at, c.last_at FROM {CANDLES} c JOIN listing l USING (listing_id)"
        " JOIN source_map m ON m.source = l.source AND m.source_id = l.source_id WHERE c.width = ?",
        (width,),
    )
    grouped: dict[tuple, list] = collections.defaultdict(list)
    for symbol, source, source_id, t, *values in rows:
        grouped[(symbol, t)].append((source, source_id, *values))
    result = {}
    for bucket, parts in grouped.items():
        opening = min(parts, key=lambda p: (p[9], p[0], p[1]))
        closing = max(parts, key=lambda p: (p[10], p[0], p[1]))
        result[bucket] = (
            opening[2], max(p[3] for p in parts), min(p[4] for p in parts), closing[5], closing[6], closing[7],
            sum(p[8] for p in parts),
        )  # fmt: skip
    return result


def assert_open_candles_are_the_newest(db: Path) -> None:
    """open_candle holds each listing's candle of its newest priced observation's bucket, of each width, and
    candle only older buckets."""
    newest = query(db, "SELECT listing_id, max(observed_at) FROM raw_observation WHERE price_usd IS NOT NULL"
                       " GROUP BY listing_id")  # fmt: skip
    for width in (HOUR, DAY):
        opened = query(db, "SELECT listing_id, t FROM open_candle WHERE width = ? ORDER BY listing_id", (width,))
        assert opened == [(listing, t // width * width) for listing, t in sorted(newest)]
        assert query(db, "SELECT count(*) FROM candle c JOIN open_candle o USING (listing_id, width)"
                         " WHERE c.width = ? AND c.t >= o.t", (width,)) == [(0,)]  # fmt: skip


def kept_raw(db: Path) -> list[tuple]:
    return [row[:3] + row[4:7] for row in store_content(db)["observations"]]


def as_raw(seen: Iterable[Seen]) -> list[tuple]:
    """Observations as kept_raw gives them."""
    rows = {
        (o.source, o.source_id, datetime.fromtimestamp(o.t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")): (
            o.price, o.market_cap, o.volume,
        )
        for o in seen
    }  # fmt: skip
    return sorted((*key, *values) for key, values in rows.items())


def unique(seen: Sequence[Seen]) -> list[Seen]:
    """The first observation of each (listing, time): a repeated one is the same observation, kept once."""
    first: dict[tuple, Seen] = {}
    for o in seen:
        first.setdefault((o.source, o.source_id, o.t), o)
    return list(first.values())


def load(db: Path, feeds: Sequence[tuple[str, Path]], **env: str) -> None:
    for name, path in feeds:
        result = run_etl(db, f"csv:{name}={path}", **env)
        assert result.returncode == 0, result.stderr + result.stdout[-2000:]


# --- candles -------------------------------------------------------------------------


def test_candles_equal_an_independent_computation_per_listing_and_merged(tmp_path):
    """Two sources over two days in eight runs, batches crossing buckets; a few instants shared by both."""
    alpha = observations("a", START, START + 2 * DAY, seed=1)
    beta = observations("b", START, START + 2 * DAY, seed=2, step=900)
    taken = {(o.source_id, o.t) for o in beta}
    ties = [Seen("csv:b", f"b-{o.source_id[2:]}", o.asset, o.t, 1.5, 2.0, 3.0) for o in alpha[::50]]
    beta += [o for o in ties if (o.source_id, o.t) not in taken]
    feeds = []
    for half_day in range(4):
        lo, hi = START + half_day * DAY // 2, START + (half_day + 1) * DAY // 2
        for name, seen in (("a", alpha), ("b", beta)):
            part = [o for o in seen if lo <= o.t < hi]
            feeds.append((name, write_feed(tmp_path / f"{name}{half_day}.csv", part)))
    db = tmp_path / "store.db"
    load(db, feeds, KASPARRO_BATCH_ROWS="37")

    every = unique(alpha + beta)
    assert kept_raw(db) == as_raw(every)
    assert query(db, "SELECT count(DISTINCT asset_id) FROM asset") == [(len(COINS),)]
    for width in (HOUR, DAY):
        assert stored_candles(db, width) == candles(every, width, "listing")
        assert merged_candles(db, width) == candles(every, width, "asset")
    assert sum(v[6] for v in candles(every, DAY, "listing").values()) == sum(o.price is not None for o in every)
    assert_open_candles_are_the_newest(db)


def test_reloading_the_same_observations_changes_nothing(tmp_path):
    seen = observations("a", START, START + DAY, seed=3)
    feed = write_feed(tmp_path / "a.csv", seen)
    db = tmp_path / "store.db"
    load(db, [("a", feed)])
    before = store_content(db)
    # The same observations in another file (another fingerprint): every one is read again.
    again = write_feed(tmp_path / "again.csv", seen[::-1])
    load(db, [("a", again)])
    assert last_run(db)["rows_loaded"] == 0
    after = store_content(db)
    del before["checkpoints"], after["checkpoints"]
    assert after == before


# --- retention -----------------------------------------------------------------------


RETENTION = {"KASPARRO_KEEP_RAW": "1d", "KASPARRO_KEEP_HOURLY": "2d"}


def test_retention_keeps_the_store_bounded_while_candles_stay_exact(tmp_path):
    """Eight days in daily runs, raw kept one day and hourly two: each tier keeps only its span."""
    db = tmp_path / "store.db"
    loaded: list[Seen] = []
    raw_counts = []
    for day in range(8):
        seen = observations("a", START + day * DAY, START + (day + 1) * DAY, seed=10 + day)
        load(db, [("a", write_feed(tmp_path / f"day{day}.csv", seen))], **RETENTION)
        loaded += seen
        newest = max(o.t for o in loaded)
        raw_from = (newest - DAY) // DAY * DAY
        hourly_from = (newest - 2 * DAY) // DAY * DAY
        assert kept_raw(db) == as_raw(o for o in loaded if o.t >= raw_from)
        hourly = candles(loaded, HOUR, "listing")
        assert stored_candles(db, HOUR) == {k: v for k, v in hourly.items() if k[2] >= hourly_from}
        assert stored_candles(db, DAY) == candles(loaded, DAY, "listing")
        assert_open_candles_are_the_newest(db)
        raw_counts.append(query(db, "SELECT count(*) FROM raw_observation")[0][0])
    # Two days' worth at the most (the newest day and the one before it, whole), however many days loaded.
    per_day = len(COINS) * DAY // 600
    assert max(raw_counts) <= 2 * per_day
    assert raw_counts[-1] == raw_counts[-3]
    assert query(db, f"SELECT count(*) FROM {CANDLES} WHERE width = 3600")[0][0] <= 3 * 24 * len(COINS)

    # Observations before the pruned horizon, loaded again, change nothing: they are rolled up already.
    before = store_content(db)
    load(db, [("a", write_feed(tmp_path / "old.csv", loaded[: len(loaded) // 2]))], **RETENTION)
    assert last_run(db)["rows_loaded"] == 0
    after = store_content(db)
    del before["checkpoints"], after["checkpoints"]
    assert after == before


def test_a_first_load_into_an_empty_store_prunes_what_its_own_rows_pass(tmp_path):
    """One run of six days into an empty store (small batches), and one of its newest day only: each ends with the
    horizons, raw rows and candles that loading the days one run at a time leaves."""
    seen = observations("a", START, START + 6 * DAY, seed=21)
    for name, rows in (("span", seen), ("recent", [o for o in seen if o.t >= START + 5 * DAY])):
        db = tmp_path / f"{name}.db"
        load(db, [("a", write_feed(tmp_path / f"{name}.csv", rows))], KASPARRO_BATCH_ROWS="97", **RETENTION)
        newest = max(o.t for o in rows)
        raw_from, hourly_from = (newest - DAY) // DAY * DAY, (newest - 2 * DAY) // DAY * DAY
        assert query(db, "SELECT DISTINCT raw_before, hourly_before FROM listing") == [(raw_from, hourly_from)]
        assert kept_raw(db) == as_raw(o for o in rows if o.t >= raw_from)
        hourly = candles(rows, HOUR, "listing")
        assert stored_candles(db, HOUR) == {k: v for k, v in hourly.items() if k[2] >= hourly_from}
        assert stored_candles(db, DAY) == candles(rows, DAY, "listing")
        assert_open_candles_are_the_newest(db)


def test_open_candles_of_a_listing_whose_prices_stopped_close_as_its_raw_history_passes_them(tmp_path):
    """A coin priced for two days, then observed without a price for four: its last priced hour and day leave
    open_candle when raw retention passes them, and every candle stays exact and in one of the two tables."""
    db = tmp_path / "store.db"
    loaded: list[Seen] = []
    for day in range(6):
        seen = [
            Seen("csv:a", "a-bitcoin", "BTC", t, 100.0 + (t - START) / DAY if day < 2 else None, 1e9, 1e6)
            for t in range(START + day * DAY, START + (day + 1) * DAY, 600)
        ]  # fmt: skip
        load(db, [("a", write_feed(tmp_path / f"day{day}.csv", seen))], **RETENTION)
        loaded += seen
        hourly_from = (max(o.t for o in loaded) - 2 * DAY) // DAY * DAY
        hourly = candles(loaded, HOUR, "listing")
        assert stored_candles(db, HOUR) == {k: v for k, v in hourly.items() if k[2] >= hourly_from}
        assert stored_candles(db, DAY) == candles(loaded, DAY, "listing")
        assert_open_candles_are_the_newest(db)
    last_priced = START + 2 * DAY - 600
    assert query(db, "SELECT count(*) FROM open_candle") == [(0,)]
    assert query(db, "SELECT t, close FROM candle WHERE width = 86400 ORDER BY t DESC LIMIT 1") == [
        (START + DAY, 100.0 + (last_priced - START) / DAY)
    ]  # fmt: skip


def test_retention_settings_are_checked(tmp_path):
    db = tmp_path / "store.db"
    for env, says in (
        ({"KASPARRO_KEEP_RAW": "7 days"}, "KASPARRO_KEEP_RAW must be a positive duration"),
        ({"KASPARRO_KEEP_HOURLY": "0h"}, "KASPARRO_KEEP_HOURLY must be a positive duration"),
        ({"KASPARRO_KEEP_RAW": "3d", "KASPARRO_KEEP_HOURLY": "36h"}, "at least KASPARRO_KEEP_RAW"),
    ):
        result = run_etl(db, **env)
        assert result.returncode == 2, env
        assert says in result.stderr
    assert not db.exists()
    spans = etl.retention({"KASPARRO_KEEP_RAW": "36h", "KASPARRO_KEEP_HOURLY": "90d"})
    assert spans == etl.Retention(raw=36 * HOUR, hourly=90 * DAY)


# --- crash safety --------------------------------------------------------------------


def kill_at_random(db: Path, source: str, env: dict[str, str], chooser: random.Random, kills: int, batches: int):
    """Runs of `source` into `db`, each killed (SIGKILL) after fewer than `batches` committed batches and at most one
    more batch's time (as the first of them showed), before the load's end."""
    pace = None
    for _ in range(kills):
        pace = kill_mid_load(db, source, chooser, chooser.randrange(batches), pace, **env)


def test_kills_during_roll_up_and_pruning_converge_to_one_clean_run(tmp_path):
    """SIGKILL at random instants of a run whose batches roll up and prune, then a clean finish."""
    first = write_feed(tmp_path / "first.csv", observations("a", START, START + 3 * DAY, seed=20))
    second = write_feed(tmp_path / "second.csv", observations("a", START + 3 * DAY, START + 12 * DAY, seed=21))
    env = {**RETENTION, "KASPARRO_BATCH_ROWS": "100"}  # batches enough that each of the kills finds work left
    clean = tmp_path / "clean.db"
    load(clean, [("a", first), ("a", second)], **env)
    killed = tmp_path / "killed.db"
    load(killed, [("a", first)], **env)
    kill_at_random(killed, f"csv:a={second}", env, random.Random(20261130), kills=8, batches=2)
    load(killed, [("a", second)], **env)
    assert store_content(killed) == store_content(clean)
    assert_open_candles_are_the_newest(killed)
    assert query(killed, f"SELECT min(t) FROM {CANDLES} WHERE width = 3600") == [(START + 9 * DAY,)]  # newest - 2d


# --- upgrade -------------------------------------------------------------------------


def load_with(commit: str, db: Path, feeds: Sequence[tuple[str, Path]], workdir: Path) -> None:
    """Load the feeds with the etl.py and store.sql of an earlier commit."""
    earlier = etl_of(commit, workdir)
    for name, feed in feeds:
        made = subprocess.run(
            [sys.executable, str(earlier), "--db", str(db), f"csv:{name}={feed}"],
            cwd=workdir, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr


def test_a_store_of_version_4_is_upgraded_in_place(tmp_path):
    """main's etl.py (schema 4) makes a store; this one turns its observations into the tiers and goes on."""
    seen = observations("a", START, START + 2 * DAY, seed=30)
    feed = write_feed(tmp_path / "a.csv", seen)
    db = tmp_path / "store.db"
    load_with(V4_COMMIT, db, [("a", feed)], tmp_path / "v4")
    assert query(db, "PRAGMA user_version") == [(4,)]
    v4_rows = query(
        db,
        "SELECT source, source_id, observed_at, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct,"
        " status = 'active' FROM observation ORDER BY source, source_id, observed_at",
    )

    more = observations("a", START + 2 * DAY, START + 4 * DAY, seed=31)
    load(db, [("a", write_feed(tmp_path / "more.csv", more))])
    assert query(db, "PRAGMA user_version") == [(etl.SCHEMA_VERSION,)]
    assert query(db, "SELECT name FROM sqlite_master WHERE name = 'observation'") == []
    every = seen + more
    # The default retention pruned the upgraded raw observations older than two days; their candles stay.
    raw_from = (max(o.t for o in every) - etl.Retention.raw) // DAY * DAY
    assert START < raw_from < START + 2 * DAY
    kept = [row for row in store_content(db)["observations"] if row[2] < "2026-11-03"]
    assert kept == [row for row in v4_rows if row[2] >= etl.format_time(datetime.fromtimestamp(raw_from, UTC))]
    assert kept_raw(db) == as_raw(o for o in every if o.t >= raw_from)
    for width in (HOUR, DAY):
        assert stored_candles(db, width) == candles(every, width, "listing")
    assert json.loads(query(db, "SELECT sources FROM asset LIMIT 1")[0][0]) == ["csv:a"]
    assert_open_candles_are_the_newest(db)


def test_a_store_of_version_5_is_upgraded_in_place(tmp_path):
    """A store whose open candles are in candle (schema 5): each listing's newest ones move to open_candle, and
    later loads, retention and reads go on from there as in a store made by this etl.py."""
    first = observations("a", START, START + 3 * DAY, seed=40)
    feeds = [("a", write_feed(tmp_path / "a.csv", first))]
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    load_with(V5_COMMIT, old, feeds, tmp_path / "v5")
    assert query(old, "PRAGMA user_version") == [(5,)]
    v5_candles = query(old, "SELECT * FROM candle ORDER BY listing_id, width, t")
    load(new, feeds)
    assert query(new, f"SELECT * FROM {CANDLES} ORDER BY listing_id, width, t") == v5_candles

    more = observations("a", START + 3 * DAY, START + 5 * DAY, seed=41)
    feeds = [("a", write_feed(tmp_path / "more.csv", more))]
    load(old, feeds)
    load(new, feeds)
    assert query(old, "PRAGMA user_version") == [(etl.SCHEMA_VERSION,)]
    assert store_content(old) == store_content(new)
    assert_open_candles_are_the_newest(old)
    every = first + more
    hourly_from = (max(o.t for o in every) - etl.Retention.hourly) // DAY * DAY
    for width in (HOUR, DAY):
        assert stored_candles(old, width) == {
            key: value for key, value in candles(every, width, "listing").items() if key[2] >= hourly_from
        }
