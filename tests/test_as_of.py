"""GET /data?as_of=: pages equal a brute-force unification at that instant, by the ETL's own rule (etl.unify)."""

from __future__ import annotations

import collections
import csv
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history import load

import etl
import kasparro
from conftest import SyncConductor
from etl_support import query
from kasparro import SORTS, Config, create_app
from stores import read_only_uri

HOUR, DAY = 3_600, 86_400
START = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
DAYS = 4
HEADER = "id,symbol,name,rank,price,market_cap,volume_24h,change_24h,status,last_updated\n"
# (source, symbol, name): BTC and ETH are listed by both sources (one asset each), the others by one.
LISTINGS = [
    ("a", "BTC", "Bitcoin"), ("b", "BTC", "Bitcoin"), ("a", "ETH", "Ethereum"), ("b", "ETH", "Ethereum"),
    ("a", "SOL", "Solana"), ("a", "ADA", "Cardano"), ("b", "DOGE", "Dogecoin"), ("b", "XRP", "Ripple"),
]  # fmt: skip
KEEP = {"kept": ("30d", "30d"), "pruned": ("1d", "2d")}  # KASPARRO_KEEP_RAW, KASPARRO_KEEP_HOURLY
# Source b lists Ethereum for the first two days only, loaded in a run of its own after every other (a backfill of
# a listing new to the store) that keeps it longer (LATE_KEEP): every run prunes every listing from the store's newest
# observation by its own retention, never back, so b-ethereum's history is pruned less far than the others': in the
# pruned store, ETH's two listings are read from different tiers over the second day (b raw, a from candles).
ENDED = {"b-ethereum": START + 2 * DAY}
LATE_KEEP = {"kept": ("30d", "30d"), "pruned": ("3d", "4d")}


@dataclass(frozen=True)
class Seen:
    """One observation as a source gave it; None where the source gave nothing."""

    source: str
    source_id: str
    t: int
    rank: int | None
    price: float | None
    market_cap: float | None
    volume: float | None
    change: float | None
    status: str


def utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def observations(seed: int = 17) -> list[Seen]:
    """Every listing about every 10 (source a) or 15 (b) minutes over DAYS days; some values missing."""
    chooser = random.Random(seed)
    seen = []
    for source, _, name in LISTINGS:
        step = 600 if source == "a" else 900
        price = chooser.uniform(0.05, 90_000)
        for slot in range(START, START + DAYS * DAY, step):
            t = slot + (0 if chooser.random() < 0.3 else chooser.randrange(step))
            price *= chooser.uniform(0.98, 1.02)

            def maybe(value: Any, chance: float = 0.15) -> Any:
                return None if chooser.random() < chance else value

            seen.append(
                Seen(f"csv:{source}", f"{source}-{name.lower()}", t, maybe(chooser.randrange(1, 9)),
                     maybe(round(price, 6)), maybe(round(price * 1e6, 2)), maybe(round(chooser.uniform(1, 1e9), 2)),
                     maybe(round(chooser.uniform(-20, 20), 3)), "inactive" if chooser.random() < 0.1 else "active")
            )  # fmt: skip
    first: dict[tuple, Seen] = {}
    for o in seen:  # one observation per (listing, time): a repeated one is the same observation
        if o.t < ENDED.get(o.source_id, o.t + 1):
            first.setdefault((o.source, o.source_id, o.t), o)
    return list(first.values())


def write_feed(path: Path, seen: Iterable[Seen]) -> Path:
    names = {f"{source}-{name.lower()}": (symbol, name) for source, symbol, name in LISTINGS}
    lines = [HEADER]
    for o in seen:
        cells = [
            o.source_id,
            *names[o.source_id],
            o.rank,
            o.price,
            o.market_cap,
            o.volume,
            o.change,
            o.status,
            utc(o.t),
        ]
        lines.append(",".join("" if c is None else repr(c) if isinstance(c, float) else str(c) for c in cells) + "\n")
    path.write_text("".join(lines))
    return path


def day_feeds(folder: Path, seen: Sequence[Seen]) -> list[tuple[str, Path]]:
    """`seen` as one feed a day of each source, in the order they are loaded."""
    feeds = []
    for day in range(DAYS):
        lo, hi = START + day * DAY, START + (day + 1) * DAY
        for name in ("a", "b"):
            part = [o for o in seen if o.source == f"csv:{name}" and lo <= o.t < hi]
            feeds.append((name, write_feed(folder / f"{name}{day}.csv", part)))
    return feeds


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same observations loaded day by day, source by source, into a store that keeps them all raw and into
    one that keeps a day raw and two of hourly candles; b-ethereum (ENDED) last, in a run of its own (LATE_KEEP)."""
    folder = tmp_path_factory.mktemp("as-of")
    seen = observations()
    feeds = day_feeds(folder, [o for o in seen if o.source_id not in ENDED])
    ended = [("b", write_feed(folder / "ended.csv", [o for o in seen if o.source_id in ENDED]))]
    paths = {}
    for kind, (raw, hourly) in KEEP.items():
        paths[kind] = folder / f"{kind}.db"
        load(paths[kind], feeds, KASPARRO_KEEP_RAW=raw, KASPARRO_KEEP_HOURLY=hourly)
        load(paths[kind], ended, KASPARRO_KEEP_RAW=LATE_KEEP[kind][0], KASPARRO_KEEP_HOURLY=LATE_KEEP[kind][1])
    return paths


@pytest.fixture(scope="module")
def clients(stores: dict[str, Path]) -> Any:
    with (
        SyncConductor(create_app(Config(db=stores["kept"], log_level="warning"))) as kept,
        SyncConductor(create_app(Config(db=stores["pruned"], log_level="warning"))) as pruned,
    ):
        yield {"kept": kept, "pruned": pruned}


# --- the brute force ---------------------------------------------------------------------


def state_at(listing: Sequence[Seen], instant: int, raw_before: int, hourly_before: int) -> tuple | None:
    """A listing's latest observation at or before `instant` as the store can know it: raw where kept, else the
    close of its latest hourly candle (kept ones) that ended by then, else of its latest daily one; None if none.
    (t, rank, price, cap, volume, change, status or None for the listing's current one)."""
    raw = [o for o in listing if raw_before <= o.t <= instant]
    if raw:
        o = max(raw, key=lambda o: o.t)
        return o.t, o.rank, o.price, o.market_cap, o.volume, o.change, o.status
    for width, kept_from in ((HOUR, hourly_before), (DAY, 0)):
        buckets: dict[int, list[Seen]] = collections.defaultdict(list)
        for o in listing:
            if o.price is not None and o.t // width * width >= kept_from:
                buckets[o.t // width * width].append(o)
        closed = [max(members, key=lambda o: o.t) for members in buckets.values()]
        closed = [o for o in closed if o.t <= instant]
        if closed:
            o = max(closed, key=lambda o: o.t)
            return o.t, None, o.price, o.market_cap, o.volume, None, None
    return None


def brute_force(
    db: Path, seen: Sequence[Seen], instant: int, keep: tuple[str, str], late: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """The unified record of every asset at `instant`, by etl.unify over each listing's state then: each listing
    pruned from the newest observation of all by `keep`, or by `late` for one of ENDED (loaded last, under it)."""
    newest = max(o.t for o in seen)
    identity = {
        (source, source_id): rest
        for source, source_id, *rest in query(
            db, "SELECT source, source_id, asset_id, symbol, name, status, pinned FROM source_map"
        )
    }
    by_listing: dict[tuple, list[Seen]] = collections.defaultdict(list)
    for o in seen:
        by_listing[(o.source, o.source_id)].append(o)
    rows: dict[str, list[tuple]] = collections.defaultdict(list)
    for (source, source_id), listing in by_listing.items():
        raw, hourly = late if late and source_id in ENDED else keep
        retention = etl.retention({"KASPARRO_KEEP_RAW": raw, "KASPARRO_KEEP_HOURLY": hourly})
        raw_before = (newest - retention.raw) // DAY * DAY
        hourly_before = (newest - retention.hourly) // DAY * DAY
        state = state_at(listing, instant, raw_before, hourly_before)
        if state is None:
            continue
        asset_id, symbol, name, current_status, pinned = identity[(source, source_id)]
        t, rank, price, cap, volume, change, status = state
        rows[asset_id].append(
            ((asset_id, source, symbol, name, rank, price, cap, volume, change, status or current_status, utc(t),
              pinned), source_id)
        )  # fmt: skip
    records = []
    for listings in rows.values():
        listings.sort(key=lambda row: (row[0][1], row[1]))
        listings.sort(key=lambda row: row[0][10], reverse=True)  # newest first; ties by source, source id
        unified = etl.unify([row for row, _ in listings])
        names = ("asset_id", *etl.UNIFIED_COLUMNS)
        record = dict(zip(names, unified, strict=True))
        record["sources"] = json.loads(record["sources"])
        records.append(record)
    return records


CONDITIONS = {
    "": lambda r: True,
    "active": lambda r: r["status"] == "active",
    "status:inactive": lambda r: r["status"] == "inactive",
    "source:csv:a": lambda r: "csv:a" in r["sources"],
    "symbol:btc|sol": lambda r: r["symbol"] in ("BTC", "SOL"),
    "name~o": lambda r: "o" in r["name"].lower(),
    "price_usd>100": lambda r: r["price_usd"] is not None and r["price_usd"] > 100,
    "rank<=4": lambda r: r["rank"] is not None and r["rank"] <= 4,
    "change_24h_pct>=0,active": lambda r: (
        r["change_24h_pct"] is not None and r["change_24h_pct"] >= 0 and r["status"] == "active"
    ),
}


def selected(records: list[dict[str, Any]], filter_by: str, sort: str) -> list[dict[str, Any]]:
    """filter_by and sort as SPEC states them: nulls last, ties by asset_id in the sort's direction."""
    field, descending = sort.removeprefix("-"), sort.startswith("-")
    chosen = [r for r in records if CONDITIONS[filter_by](r)]

    def value(r: dict[str, Any]) -> Any:
        return r[field].lower() if field == "name" else r[field]

    valued = sorted((r for r in chosen if r[field] is not None), key=lambda r: (value(r), r["asset_id"]),
                    reverse=descending)  # fmt: skip
    nulls = sorted((r for r in chosen if r[field] is None), key=lambda r: r["asset_id"], reverse=descending)
    return valued + nulls


SEEN = observations()
TIMES = sorted({o.t for o in SEEN})
INSTANTS = st.one_of(
    st.integers(START - HOUR, START + (DAYS + 1) * DAY),
    st.sampled_from(TIMES),  # exactly at an observation: "at or before" includes it
    st.sampled_from(TIMES).map(lambda t: t - 1),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(instant=INSTANTS, filter_by=st.sampled_from(list(CONDITIONS)), sort=st.sampled_from(SORTS),
       kind=st.sampled_from(list(KEEP)), as_text=st.booleans())  # fmt: skip
def test_as_of_pages_equal_a_brute_force_unification(
    clients: Any, stores: dict[str, Path], instant: int, filter_by: str, sort: str, kind: str, as_text: bool
) -> None:
    """Within raw retention (store 'kept', and the last two days of 'pruned') and from candles after pruning."""
    as_of = utc(instant) if as_text else str(instant)
    body = clients[kind].get("/data", params={"as_of": as_of, "filter_by": filter_by, "sort": sort, "page_size": "100"})
    assert body.status_code == 200, body.text
    expected = selected(brute_force(stores[kind], SEEN, instant, KEEP[kind], LATE_KEEP[kind]), filter_by, sort)
    assert body.json["data"] == expected
    assert (body.json["total_items"], body.json["next_cursor"]) == (len(expected), None)


def test_the_pruned_store_answers_from_candles_where_raw_observations_are_gone(stores: dict[str, Path]) -> None:
    """The premise of the test above: its instants reach the daily tier, the hourly tier and the raw one, and
    (b-ethereum, loaded last and kept longer) an asset whose listings are read from different tiers at once."""
    horizons = query(stores["pruned"], "SELECT source_id, raw_before, hourly_before FROM listing")
    ended = [(source_id, raw, hourly) for source_id, raw, hourly in horizons if source_id in ENDED]
    assert ended == [("b-ethereum", START, START - DAY)]
    assert {(raw, hourly) for source_id, raw, hourly in horizons if source_id not in ENDED} == {
        (START + 2 * DAY, START + DAY)
    }
    older = "SELECT DISTINCT l.source_id FROM {} JOIN listing l USING (listing_id) WHERE {} < ?"
    for table, time, before in (("raw_observation", "observed_at", START + 2 * DAY), ("candle", "t", START + DAY)):
        assert query(stores["pruned"], older.format(table, time) + " AND width = 3600" * (table == "candle"),
                     (before,)) == [("b-ethereum",)]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(filter_by=st.sampled_from(list(CONDITIONS)), sort=st.sampled_from(SORTS), kind=st.sampled_from(list(KEEP)))
def test_as_of_now_is_todays_data(clients: Any, filter_by: str, sort: str, kind: str) -> None:
    """The ETL's record of today (table asset) and as_of's unification of the newest observations agree."""
    params = {"filter_by": filter_by, "sort": sort, "page_size": "100"}
    today = clients[kind].get("/data", params=params).json
    now = clients[kind].get("/data", params={**params, "as_of": utc(START + 30 * DAY)}).json
    assert now["data"] == today["data"]
    assert now["total_items"] == today["total_items"]


@pytest.mark.parametrize("kind", list(KEEP))
@pytest.mark.parametrize("sort", ["rank", "-price_usd", "name", "-change_24h_pct"])
def test_cursors_and_pages_with_as_of_give_the_one_page(clients: Any, kind: str, sort: str) -> None:
    client = clients[kind]
    for instant in (START + DAY + 7 * HOUR, START + 3 * DAY + 5):
        params = {"as_of": str(instant), "sort": sort}
        whole = client.get("/data", params={**params, "page_size": "100"}).json["data"]
        assert len(whole) >= 4
        walked, cursor = [], None
        while True:
            page = client.get("/data", params={**params, "page_size": "2", **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200, page.text
            walked += page.json["data"]
            cursor = page.json["next_cursor"]
            if cursor is None:
                break
        assert walked == whole
        numbered = [client.get("/data", params={**params, "page_size": "3", "page": str(n)}).json for n in (1, 2, 3)]
        assert [a for page in numbered for a in page["data"]] == whole[:9]
        assert numbered[0]["total_pages"] == -(-len(whole) // 3)


@pytest.mark.parametrize("kind", list(KEEP))
@pytest.mark.parametrize("export_format", ["csv", "ndjson"])
def test_an_export_as_of_equals_the_pages_as_of(clients: Any, kind: str, export_format: str) -> None:
    """/data/export?as_of= reads the same market as /data?as_of=: every record, in the same order, one version."""
    client = clients[kind]
    for instant in (START + DAY + 7 * HOUR, START + 3 * DAY + 5, START - DAY):
        params = {"as_of": str(instant), "sort": "-market_cap_usd", "fields": "asset_id,price_usd,updated_at"}
        page = client.get("/data", params={**params, "page_size": "100"})
        exported = client.get("/data/export", params={**params, "format": export_format})
        assert exported.status_code == 200, exported.text
        assert exported.headers["X-Data-Version"] == page.json["data_version"]
        if export_format == "ndjson":
            records = [json.loads(line) for line in exported.text.splitlines()]
        else:
            rows = list(csv.DictReader(io.StringIO(exported.text)))
            records = [{**row, "price_usd": float(row["price_usd"]) if row["price_usd"] else None} for row in rows]
        assert records == page.json["data"]
        assert len(records) == page.json["total_items"]


def test_a_cursor_holds_only_for_its_as_of(clients: Any) -> None:
    client = clients["kept"]
    first = client.get("/data", params={"as_of": str(START + DAY), "page_size": "1"}).json
    for other in ({"as_of": str(START + DAY + 1)}, {}):
        again = client.get("/data", params={**other, "page_size": "1", "cursor": first["next_cursor"]})
        assert again.status_code == 400
        assert "cursor" in again.json["detail"]


def test_as_of_answers_carry_their_own_etag_and_304(clients: Any) -> None:
    client = clients["kept"]
    params = {"as_of": utc(START + 2 * DAY), "page_size": "5"}
    first = client.get("/data", params=params)
    etag = first.headers["ETag"]
    assert client.get("/data", params=params, headers={"If-None-Match": etag}).status_code == 304
    for other in ({**params, "as_of": utc(START + 2 * DAY + 1)}, {"page_size": "5"}):
        assert client.get("/data", params=other).headers["ETag"] != etag
        assert client.get("/data", params=other, headers={"If-None-Match": etag}).status_code == 200


def test_before_any_observation_the_market_is_empty(clients: Any) -> None:
    for kind in KEEP:
        body = clients[kind].get("/data", params={"as_of": str(START - 1)}).json
        assert (body["data"], body["total_items"], body["total_pages"], body["next_cursor"]) == ([], 0, 0, None)


def test_an_empty_as_of_is_an_absent_one(clients: Any) -> None:
    client = clients["kept"]
    assert client.get("/data", params={"as_of": ""}).json["data"] == client.get("/data").json["data"]


@pytest.mark.parametrize(
    "value",
    ["yesterday", "2026-11-01T25:00:00Z", "1.", ".5", "1e9", "2026-11-01 12:00:00 UTC", "0x10", "１２３",
     "1764072000000", "2026-W48", "2026-W48-1", "2026-330", "20261125T120000Z"],
)  # fmt: skip
def test_a_bad_as_of_is_a_400_naming_it(clients: Any, value: str) -> None:
    """ISO 8601's basic and week forms too: fromisoformat alone reads 1764072000000 (milliseconds) as 1764-07-20."""
    body = clients["kept"].get("/data", params={"as_of": value})
    assert body.status_code == 400
    assert body.json["detail"].startswith("as_of: expected an RFC 3339 time or Unix seconds")
    if value == "1764072000000":
        assert "not milliseconds" in body.json["detail"]


@pytest.mark.parametrize("kind", ["kept", "pruned"])
def test_as_of_in_unix_seconds_with_a_fraction_is_that_instant(clients: Any, kind: str) -> None:
    """Observations are whole seconds: as_of=t.5 is the market of t, and t-1 plus any fraction that of t-1 (an
    instant before an observation at t), as etl.py reads such a time. They were a 400."""
    latest = max(o.t for o in observations() if o.t < START + DAY)  # inside raw retention of both stores
    client = clients[kind]

    def market(as_of: str) -> list[dict]:
        answer = client.get("/data", params={"as_of": as_of, "page_size": 100})
        assert answer.status_code == 200, answer.json
        return answer.json["data"]

    at, before = market(str(latest)), market(str(latest - 1))
    assert at != before  # the observation at `latest` is in one and not the other
    for fraction in (".5", ".000001", ".999999999", ".0"):
        assert market(f"{latest}{fraction}") == at, fraction
        assert market(f"{latest - 1}{fraction}") == before, fraction


def test_as_of_given_twice_is_a_400(clients: Any) -> None:
    body = clients["kept"].get("/data", query_string=f"as_of={START}&as_of={START + 1}")
    assert body.status_code == 400
    assert "as_of" in body.json["detail"]


def copy_of(db: Path, copy: Path) -> Path:
    with etl.sqlite3.connect(db) as source, etl.sqlite3.connect(copy) as target:
        source.backup(target)
    return copy


def by_name(client: Any, db: Path, instant: int, kind: str) -> list[dict[str, Any]]:
    """The market at `instant` by name, as served, once it is checked equal to the brute force's."""
    body = client.get("/data", params={"as_of": str(instant), "page_size": "100", "sort": "name"})
    assert body.status_code == 200, body.text
    assert body.json["data"] == selected(brute_force(db, SEEN, instant, KEEP[kind], LATE_KEEP[kind]), "", "name")
    return body.json["data"]


def test_an_asset_with_a_listing_not_yet_observed_has_its_observed_sources(clients: Any,
                                                                          stores: dict[str, Path]) -> None:  # fmt: skip
    """Bitcoin is listed by both sources; before the second one's first observation (kept raw), its record has the
    first source alone, not the two the identity knows of."""
    firsts = sorted(min(o.t for o in SEEN if o.source_id == source_id) for source_id in ("a-bitcoin", "b-bitcoin"))
    assert firsts[0] < firsts[1]
    for instant in (firsts[0], firsts[1] - 1, firsts[1]):
        (bitcoin,) = (r for r in by_name(clients["kept"], stores["kept"], instant, "kept") if r["symbol"] == "BTC")
        assert len(bitcoin["sources"]) == (2 if instant == firsts[1] else 1)


def tied(*source_ids: str) -> list[int]:
    """The times at which every one of these listings was observed."""
    return sorted(set.intersection(*({o.t for o in SEEN if o.source_id == sid} for sid in source_ids)))


@pytest.mark.parametrize("kind", list(KEEP))
def test_a_listing_pinned_by_hand_gives_no_name_or_status(stores: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """etl.unify's rule for pins holds at any instant and in every tier: symbol, name and status come from the
    newest listing not pinned (both BTC listings are pinned by hand, then one: the other names the asset)."""
    db = copy_of(stores[kind], tmp_path / "pinned.db")
    for pinned in (("a-bitcoin", "b-bitcoin"), ("b-bitcoin",)):
        with etl.sqlite3.connect(db) as conn:
            conn.execute("UPDATE source_map SET pinned = (source_id IN (?, ?))", (*pinned, *pinned)[:2])
        with SyncConductor(create_app(Config(db=db, log_level="warning"))) as client:
            for instant in (START + DAY // 2 + 4321, START + DAY + 1234, START + 3 * DAY + 99, *tied(*pinned)[-2:]):
                by_name(client, db, instant, kind)


@pytest.mark.parametrize("kind", list(KEEP))
def test_listings_observed_at_the_same_time_unify_in_source_order(clients: Any, stores: dict[str, Path],
                                                                  kind: str) -> None:  # fmt: skip
    """A tie in time between two sources' listings of an asset goes to the first source, as etl.unify orders them."""
    instants = [t for t in tied("a-bitcoin", "b-bitcoin") if t >= START + 2 * DAY]  # raw in both stores
    assert len(instants) >= 4
    for instant in instants[:2] + instants[-2:]:
        bitcoin = next(r for r in by_name(clients[kind], stores[kind], instant, kind) if r["symbol"] == "BTC")
        (first,) = (o for o in SEEN if o.source_id == "a-bitcoin" and o.t == instant)
        assert (bitcoin["updated_at"], bitcoin["status"]) == (utc(instant), first.status)


@pytest.mark.parametrize("kind", list(KEEP))
@pytest.mark.parametrize("pinned", [0, 1])
def test_two_listings_of_one_source_tie_by_source_id(stores: dict[str, Path], tmp_path: Path, kind: str,
                                                     pinned: int) -> None:  # fmt: skip
    """An asset listed twice by one source (a-ethereum mapped to Bitcoin by hand, pinned or not): observed at the
    same time, its listings order by source id, and its sources name that source once."""
    db = copy_of(stores[kind], tmp_path / "twice.db")
    with etl.sqlite3.connect(db) as conn:
        conn.execute("UPDATE source_map SET asset_id = 'bitcoin', pinned = ? WHERE source_id = 'a-ethereum'", (pinned,))
    instants = [t for t in tied("a-bitcoin", "a-ethereum") if t >= START + 2 * DAY]  # raw in both stores
    assert len(instants) >= 4
    with SyncConductor(create_app(Config(db=db, log_level="warning"))) as client:
        for instant in instants[:2] + instants[-2:]:
            bitcoin = next(r for r in by_name(client, db, instant, kind) if r["asset_id"] == "bitcoin")
            assert bitcoin["sources"] == ["csv:a", "csv:b"]


def test_an_asset_read_from_two_tiers_takes_each_number_from_its_newest_listing_with_one(
    clients: Any, stores: dict[str, Path]
) -> None:
    """Over the second day of the pruned store, ETH's listing a is read from hourly candles (no rank, no change)
    and b (ended early, pruned less) from raw observations: where a's candle is the newer, the price is a's and the
    rank b's."""
    horizons = {sid: rest for sid, *rest in query(stores["pruned"], "SELECT source_id, raw_before, hourly_before "
                                                                     "FROM listing")}  # fmt: skip
    listings = {sid: [o for o in SEEN if o.source_id == sid] for sid in ("a-ethereum", "b-ethereum")}
    mixed = 0
    for instant in range(START + DAY + 600, START + 2 * DAY, 13 * 60):
        ethereum = next(r for r in by_name(clients["pruned"], stores["pruned"], instant, "pruned")
                        if r["symbol"] == "ETH")  # fmt: skip
        a, b = (state_at(listings[sid], instant, *horizons[sid]) for sid in listings)
        assert a is not None and b is not None and a[1] is None  # a from a candle: no rank
        if a[0] > b[0] and a[2] is not None and b[1] is not None:
            assert (ethereum["price_usd"], ethereum["rank"]) == (a[2], b[1])
            mixed += 1
    assert mixed >= 5


def market_rows(market: Any) -> list[tuple]:
    return market.conn.execute("SELECT * FROM asset ORDER BY asset_id").fetchall()


@pytest.mark.parametrize("kind", list(KEEP))
@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_a_market_built_in_parts_equals_the_brute_force(stores: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                        kind: str, parts: int) -> None:  # fmt: skip
    """However many parts a market is built in at once (MARKET_PARTS follows the machine's cores), its assets are
    the brute force's: none lost or repeated at a part's edge, and none left over from the moment its connections
    built before."""
    monkeypatch.setattr(kasparro, "MARKET_PARTS", parts)
    builders, identity = kasparro.MarketBuilders(read_only_uri(stores[kind])), None
    for instant in (START + DAY // 2 + 4321, START + 2 * DAY + 777, START + 3 * DAY + 99):
        market, identity = kasparro.build_market(builders, instant, identity)
        try:
            bounds = [asset for part in identity.parts for asset in part]  # first <= last < next first
            assert bounds == sorted(bounds) and all(a < b for a, b in zip(bounds[1::2], bounds[2::2], strict=False))
            assert 1 < len(identity.parts) <= parts or parts == len(identity.parts) == 1
            expected = selected(brute_force(stores[kind], SEEN, instant, KEEP[kind], LATE_KEEP[kind]), "", "name")
            served = [row[0] for row in market_rows(market)]
            assert served == sorted(r["asset_id"] for r in expected)
            assert market.assets == len(expected)
        finally:
            market.conn.close()


def test_a_part_read_at_another_version_builds_the_market_again(stores: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A commit between the reads of a market's parts (each its own connection) would mix two versions of the
    store: the part that sees the other version is refused (MarketMoved) and the whole market read again."""
    db = copy_of(stores["kept"], tmp_path / "moving.db")
    uri = read_only_uri(db)
    monkeypatch.setattr(kasparro, "MARKET_PARTS", 2)
    instant = START + 2 * DAY + 777
    builders = kasparro.MarketBuilders(uri)
    before, identity = kasparro.build_market(builders, instant, None)
    before_rows = market_rows(before)
    before.conn.close()
    real_part, commits = kasparro.build_part, []

    def part_after_a_commit(*args: Any) -> Any:
        if not commits:  # the ETL commits once, after the first part's read began
            with etl.sqlite3.connect(db) as conn:
                conn.execute("UPDATE asset SET name = name WHERE 0")
                conn.execute("UPDATE store_meta SET generation = generation + 1")
            commits.append(1)
        return real_part(*args)

    monkeypatch.setattr(kasparro, "build_part", part_after_a_commit)
    market, again = kasparro.build_market(builders, instant, identity)
    try:
        assert commits and market.version.generation == identity.version.generation + 1
        assert again.version == market.version != identity.version
        with pytest.raises(kasparro.MarketMoved):
            real_part(builders, instant, identity, 0)
        assert market_rows(market) == before_rows
    finally:
        market.conn.close()


# Without b-ethereum (which ends early, so its history is pruned less far), every listing has the same horizons
# when kept 12 hours raw and a day of hourly candles: a moment before them all is read from the daily tier alone,
# one before raw_before from the hourly and daily tiers, and a build leaves the others out (market_states_sql).
EVEN = [o for o in SEEN if o.source_id not in ENDED]
EVEN_KEEP = ("12h", "1d")


@pytest.mark.parametrize("special", [False, True])
def test_a_moment_before_every_listings_horizon_equals_the_brute_force(tmp_path: Path, special: bool) -> None:
    """In the daily tier alone, the hourly and daily ones, and all three; with no special asset, and with one pinned
    by hand and one listed twice by a source (whose numbers, sources and time are read again from its states)."""
    db = tmp_path / "even.db"
    load(db, day_feeds(tmp_path, EVEN), KASPARRO_KEEP_RAW=EVEN_KEEP[0], KASPARRO_KEEP_HOURLY=EVEN_KEEP[1])
    assert set(query(db, "SELECT raw_before, hourly_before FROM listing")) == {(START + 3 * DAY, START + 2 * DAY)}
    if special:
        with etl.sqlite3.connect(db) as conn:
            conn.execute("UPDATE source_map SET pinned = 1 WHERE source_id = 'b-bitcoin'")
            conn.execute("UPDATE source_map SET asset_id = 'solana' WHERE source_id = 'a-cardano'")
    instants = [START + DAY + 1234, START + DAY + DAY // 2 + 77, START + 2 * DAY - 1,  # daily candles alone
                START + 2 * DAY, START + 2 * DAY + 4321, START + 3 * DAY - 601,  # hourly candles, else daily
                START + 3 * DAY + 99, START + 4 * DAY]  # fmt: skip
    with SyncConductor(create_app(Config(db=db, log_level="warning"))) as client:
        for instant in instants:
            expected = brute_force(db, EVEN, instant, EVEN_KEEP)
            assert len(expected) >= 5
            for filter_by, sort in (("", "name"), ("active", "-price_usd"), ("source:csv:a", "rank")):
                params = {"as_of": str(instant), "filter_by": filter_by, "sort": sort, "page_size": "100"}
                body = client.get("/data", params=params)
                assert body.status_code == 200, body.text
                assert body.json["data"] == selected(expected, filter_by, sort)
