"""Which listing a CSV row is when its file gains or loses an id column between runs. The real etl.py as a
subprocess, into a real SQLite store."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from etl_support import last_run, query, run_etl

WITHOUT_IDS = "symbol,name,price,last_updated\nBTC,Bitcoin,{p},{t}\nUSDC,USD Coin,1,{t}\nSOL,Wrapped SOL,{p},{t}\n"
WITH_IDS = (
    "id,symbol,name,price,last_updated\nbitcoin,BTC,Bitcoin,{p},{t}\nusd-coin,USDC,USD Coin,1,{t}\n"
    "wrapped-sol,SOL,Wrapped SOL,{p},{t}\n"
)
FIRST, SECOND, THIRD = "2026-11-25T12:00:00Z", "2026-11-25T13:00:00Z", "2026-11-25T14:00:00Z"


def load(db: Path, feed: Path, content: str) -> None:
    feed.write_text(content)
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_run(db)["status"] == "success"


@pytest.mark.parametrize(
    ("first", "then", "listings"),
    [
        (WITHOUT_IDS, WITH_IDS, ["bitcoin", "usd-coin", "wrapped-sol"]),  # an id column added: the ids are the file's
        (WITH_IDS, WITHOUT_IDS, ["bitcoin", "usd-coin", "wrapped-sol"]),  # dropped: the rows keep the stored ids
    ],
    ids=["id-column-added", "id-column-dropped"],
)
def test_a_csv_that_gains_or_loses_its_id_column_keeps_each_coin_one_asset(
    tmp_path: Path, first: str, then: str, listings: list[str]
) -> None:
    """Each coin became a second asset, its history split between them: an id-less row's source id is made from its
    name and symbol ('bitcoin-btc'), which no later id ('bitcoin') matched, and symbol + name never join a listing
    to an asset that has one of the same source already."""
    db, feed = tmp_path / "store.db", tmp_path / "feed.csv"
    load(db, feed, first.format(p=100, t=FIRST))
    assets = query(db, "SELECT asset_id FROM asset ORDER BY asset_id")
    load(db, feed, then.format(p=101, t=SECOND))
    load(db, feed, first.format(p=102, t=THIRD))
    assert assets == [("bitcoin",), ("usd-coin",), ("wrapped-sol",)]
    assert query(db, "SELECT asset_id FROM asset ORDER BY asset_id") == assets
    assert query(db, "SELECT source_id FROM source_map ORDER BY source_id") == [(i,) for i in listings]
    history = query(
        db,
        "SELECT l.source_id, count(*), max(o.price_usd) FROM raw_observation o JOIN listing l USING (listing_id)"
        " GROUP BY l.source_id ORDER BY l.source_id",
    )
    assert history == [("bitcoin", 3, 102.0), ("usd-coin", 3, 1.0), ("wrapped-sol", 3, 102.0)]


def test_two_ids_of_a_csv_for_one_symbol_and_name_stay_two_assets(tmp_path: Path) -> None:
    """A listing whose id the file gave is never taken over by another id: only a made one is."""
    db, feed = tmp_path / "store.db", tmp_path / "feed.csv"
    load(db, feed, f"id,symbol,name,price,last_updated\nhodl,HODL,HODL,1,{FIRST}\n")
    load(db, feed, f"id,symbol,name,price,last_updated\nhodl-meme,HODL,HODL,2,{SECOND}\n")
    assert query(db, "SELECT source_id, asset_id FROM source_map ORDER BY source_id") == [
        ("hodl", "hodl"),
        ("hodl-meme", "hodl-hodl"),
    ]


def test_an_id_less_row_of_a_name_written_otherwise_is_the_same_listing(tmp_path: Path) -> None:
    """'USD Coin' and 'USDCoin' are one normalised name: a file without ids that writes it either way is one coin,
    as symbol + name match across sources."""
    db, feed = tmp_path / "store.db", tmp_path / "feed.csv"
    load(db, feed, f"symbol,name,price,last_updated\nUSDC,USD Coin,1,{FIRST}\n")
    load(db, feed, f"symbol,name,price,last_updated\nUSDC,USDCoin,1,{SECOND}\n")
    assert query(db, "SELECT source_id, asset_id FROM source_map") == [("usd-coin-usdc", "usd-coin")]
    assert query(db, "SELECT count(*) FROM raw_observation") == [(2,)]


FEED = "id,symbol,name,price,last_updated\nbtc,BTC,Bitcoin,{p},{t}\n"


@pytest.mark.parametrize(
    ("first", "second"),
    [("Feed.csv", "feed.csv"), ("Été.csv", unicodedata.normalize("NFD", "été.csv")), ("ﬁnal.csv", "FINAL.csv")],
    ids=["case", "normal-form", "ligature"],
)
def test_two_csv_sources_one_filter_calls_the_same_name_a_usage_error(tmp_path: Path, first: str, second: str) -> None:
    """filter_by=source: compares names in any case and normal form (kasparro.fold): sources named apart only so were
    two sources in the ETL, one in the API, which mixed them. In one run they are a usage error naming both."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / first, tmp_path / "b" / second]
    for path in paths:
        path.write_text(FEED.format(p=1, t=FIRST))
    db = tmp_path / "store.db"
    result = run_etl(db, *(f"csv:{path}" for path in paths))
    assert result.returncode == 2, result.stderr
    assert f"'csv:{paths[0]}'" in result.stderr and f"'csv:{paths[1]}'" in result.stderr
    assert not db.exists()


@pytest.mark.parametrize(
    ("first", "second"),
    [("feed.csv", "FEED.csv"), (unicodedata.normalize("NFD", "été.csv"), "Été.csv")],
    ids=["case", "normal-form"],
)
def test_a_csv_source_named_otherwise_only_in_case_or_form_loads_as_the_stored_source(
    tmp_path: Path, first: str, second: str
) -> None:
    """Across runs, a file named again in another case or form is the source already stored, under its stored name:
    its listings, checkpoint and run records stay one source's."""
    db = tmp_path / "store.db"
    for name, price, time in ((first, 1, FIRST), (second, 2, SECOND)):
        (tmp_path / name).write_text(FEED.format(p=price, t=time))
        result = run_etl(db, f"csv:{tmp_path / name}")
        assert result.returncode == 0, result.stderr[-2000:]
    stored = f"csv:{Path(first).stem}"
    assert query(db, "SELECT DISTINCT source FROM run_source") == [(stored,)]
    assert query(db, "SELECT source, source_id, price_usd FROM source_map") == [(stored, "btc", 2.0)]
    assert [json.loads(sources) for (sources,) in query(db, "SELECT sources FROM asset")] == [[stored]]
    assert query(db, "SELECT count(*) FROM raw_observation") == [(2,)]
