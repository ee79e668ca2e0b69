"""History, as_of and retention at their edges, as a newcomer tried them (issue 17): times no datetime holds, leap
seconds, retention settings, forged cursors. The real etl.py, uvicorn on 127.0.0.1 and SQLite files."""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import msgspec
import pytest
from test_hostile import forge
from test_real_inputs import outcome

from etl_support import CANDLES, etl_against, last_run, query, run_etl
from upstream import coingecko_pages, load_fixture

HEADER = "id,symbol,name,price_usd,last_updated\n"
# Times a datetime cannot hold, or cannot write in UTC: a row with one was once a traceback ending the whole run.
UNHELD_TIMES = {
    "9999-12-31T23:59:59-01:00": "after 9999-12-31T23:59:59Z",
    "-99999999999": "before 2009-01-03, Bitcoin's genesis block (read as Unix seconds)",
    "-90000000000000": "before 2009-01-03, Bitcoin's genesis block (read as Unix milliseconds)",
    "1e400": "a number too large to be a time",
}


# --- observation times ---------------------------------------------------------------


def test_a_csv_time_no_datetime_holds_rejects_its_row_and_the_rest_load(tmp_path: Path) -> None:
    rows = [f"c{n},C{n},Coin {n},{n + 1},{value}\n" for n, value in enumerate(UNHELD_TIMES)]
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "".join(rows) + "good,GOOD,Good Coin,1.5,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 5, 1, 4)
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == [
        (line, f"observed_at: {why}: {value!r}") for line, (value, why) in enumerate(UNHELD_TIMES.items(), start=2)
    ]
    assert query(db, "SELECT asset_id FROM asset") == [("good-coin",)]


def test_a_time_before_the_genesis_block_is_refused_naming_that_day(tmp_path: Path) -> None:
    """The first day taken is 2009-01-03, but the reason said "before 2009": 2009-01-01 and 02 were refused as if
    they lay in 2008."""
    times = ["2009-01-01T00:00:00Z", "1230940799", "2009-01-02T23:59:59.5Z", "2009-01-03T00:00:00Z", "1230940800000"]
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "".join(f"c{n},C{n},Coin {n},1.5,{value}\n" for n, value in enumerate(times)))
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    why = "before 2009-01-03, Bitcoin's genesis block"
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == [
        (2, f"observed_at: {why}: '2009-01-01T00:00:00Z'"),
        (3, f"observed_at: {why} (read as Unix seconds): '1230940799'"),
        (4, f"observed_at: {why}: '2009-01-02T23:59:59.5Z'"),
    ]
    assert query(db, "SELECT symbol, updated_at FROM asset ORDER BY symbol") == [
        ("C3", "2009-01-03T00:00:00Z"),
        ("C4", "2009-01-03T00:00:00Z"),
    ]


NOT_RFC3339 = "an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("9999-12-31T23:59:59-01:00", "after 9999-12-31T23:59:59Z"),
        ("2026-W48-3", NOT_RFC3339),  # ISO 8601's week date: fromisoformat read it as 2026-11-25
        ("20261125T120000Z", NOT_RFC3339),  # and its basic format
        ("2026-11-25T12:00:00+0100", NOT_RFC3339),
    ],
)
def test_an_upstream_time_that_is_no_usable_rfc_3339_one_takes_the_fetch_time(
    upstream: Any, tmp_path: Path, value: str, problem: str
) -> None:
    """A time no datetime holds, or one in a form of ISO 8601 that RFC 3339 does not have (SPEC's Values: an
    upstream record is never dropped for an optional field; it takes the fetch time, and the drift counts it)."""
    record = load_fixture("coingecko_markets_hodl.json")[0]
    coingecko_pages(upstream, [[{**record, "last_updated": value}]])
    db = tmp_path / "store.db"
    result = etl_against(upstream, db, "coingecko")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_loaded"]) == ("success", 1)
    (observed,) = query(db, "SELECT strftime('%Y-%m-%dT%H:%M:%SZ', observed_at, 'unixepoch') FROM raw_observation")[0]
    assert run["started_at"] <= observed <= run["ended_at"]
    drift = outcome(db, "coingecko")["drift"]
    assert drift == {f"invalid field 'last_updated': {problem}": 1}


def test_a_leap_second_is_the_second_before_it(tmp_path: Path) -> None:
    """RFC 3339 allows 23:59:60; POSIX seconds have none, so it stays in its own minute, hour and day."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "btc,BTC,Bitcoin,1,2016-12-31T23:59:60Z\nbtc,BTC,Bitcoin,1,2016-12-31T23:59:60.5+00:00\n"
                    "eth,ETH,Ethereum,3,2017-01-01T05:29:60+05:30\n")  # fmt: skip
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert last_run(db)["rows_rejected"] == 0
    assert query(db, "SELECT asset_id, updated_at FROM asset ORDER BY asset_id") == [
        ("bitcoin", "2016-12-31T23:59:59Z"), ("ethereum", "2016-12-31T23:59:59Z")
    ]  # fmt: skip
    assert query(db, f"SELECT width, t, observations FROM {CANDLES} WHERE listing_id = 1 ORDER BY width") == [
        (3_600, 1483225200, 1), (86_400, 1483142400, 1)
    ]  # fmt: skip


# --- retention settings ------------------------------------------------------------------


def test_a_retention_longer_than_any_history_keeps_everything(tmp_path: Path) -> None:
    """A span SQLite's integers cannot hold was once an OverflowError ending the run at its first batch."""
    feed = tmp_path / "feed.csv"
    days = ["2026-11-01", "2026-11-10", "2026-11-20"]
    feed.write_text(HEADER + "".join(f"btc,BTC,Bitcoin,{n + 1},{day}T12:00:00Z\n" for n, day in enumerate(days)))
    db = tmp_path / "store.db"
    huge = "99999999999999999999d"
    result = run_etl(db, f"csv:{feed}", KASPARRO_KEEP_RAW=huge, KASPARRO_KEEP_HOURLY=huge)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last_run(db)["status"] == "success"
    assert query(db, "SELECT count(*) FROM raw_observation") == [(3,)]
    assert query(db, f"SELECT width, count(*) FROM {CANDLES} GROUP BY width") == [(3_600, 3), (86_400, 3)]
    assert query(db, "SELECT raw_before, hourly_before FROM listing") == [(0, 0)]


def test_a_raw_retention_beyond_the_default_hourly_one_says_which_is_the_default(tmp_path: Path) -> None:
    result = run_etl(tmp_path / "store.db", KASPARRO_KEEP_RAW="60d")
    assert result.returncode == 2
    assert "KASPARRO_KEEP_HOURLY (30d, the default) must be at least KASPARRO_KEEP_RAW (60d)" in result.stderr
    assert not (tmp_path / "store.db").exists()


# --- times the API reads -------------------------------------------------------------------

TIME_PARAMETERS = [
    ("/data/bitcoin/history", "from"),
    ("/data/bitcoin/history", "to"),
    ("/data", "as_of"),
    ("/data/export", "as_of"),
    ("/data", "filter_by=updated_at>"),
    ("/data", "filter_by=updated_at<"),
]
# Beyond what a datetime holds in UTC, or what RFC 3339 can write back (a history window's from and to).
FAR_TIMES = ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.5Z", "-99999999999",
             "-50000000000", "0001-01-01"]  # fmt: skip
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def time_query(path: str, name: str, value: str) -> str:
    joined = name if name.endswith(("<", ">")) else name + "="
    return f"{path}?{joined}{urllib.parse.quote(value, safe='')}"


def test_a_far_time_is_a_400_naming_its_parameter_or_an_answer_in_rfc3339(live_server: Any, store_path: Path) -> None:
    """Once a 500 (an OverflowError) in filter_by, and a history window echoed as from '-1199-02-11T10:13:21Z'."""
    server = live_server(store_path, LOG_LEVEL="warning")
    for path, name in TIME_PARAMETERS:
        for value in FAR_TIMES:
            status, headers, body = server.get(time_query(path, name, value))
            assert status in (200, 400), (path, name, value, status, body[:300])
            if status == 400:
                assert headers["content-type"] == "application/problem+json"
                assert json.loads(body)["detail"].startswith(name.split("=")[0].rstrip("<>")), body
            elif path.endswith("/history"):
                window = json.loads(body)
                assert RFC3339_UTC.fullmatch(window["from"]) and RFC3339_UTC.fullmatch(window["to"]), window


def test_the_window_a_history_echoes_is_one_the_api_reads_back(live_server: Any, store_path: Path) -> None:
    """A default from 100 intervals before an early `to` was echoed from 1969 ('1969-09-23T00:00:00Z' for to=0 and
    1d), a time every parameter refuses: the window starts at Unix time 0 at the earliest."""
    server = live_server(store_path, LOG_LEVEL="warning")
    for interval in ("raw", "5m", "1h", "1d"):
        for end in ("0", "1", "3600", "1970-01-01T01:00:00Z"):
            status, _, body = server.get(f"/data/bitcoin/history?interval={interval}&to={end}")
            assert status == 200, (interval, end, body[:300])
            window = json.loads(body)
            assert window["from"] == "1970-01-01T00:00:00Z", (interval, end, window)
            again = f"/data/bitcoin/history?interval={interval}&from={window['from']}&to={window['to']}"
            status, _, body = server.get(again)
            assert status == 200 and json.loads(body)["from"] == window["from"], (again, body[:300])


def test_a_leap_second_is_read_as_rfc3339_allows(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    for path, name in TIME_PARAMETERS:
        status, _, body = server.get(time_query(path, name, "2016-12-31T23:59:60Z"))
        assert status == 200, (path, name, body[:300])
    window = json.loads(server.get("/data/bitcoin/history?interval=raw&from=2016-12-31T23:59:60Z")[2])
    assert window["from"] == "2016-12-31T23:59:59Z"


def test_an_offset_whose_plus_the_url_made_a_space_gets_a_hint(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    for path, name in TIME_PARAMETERS:
        status, _, body = server.get(time_query(path, name, "2026-11-25T12:00:00+05:30").replace("%2B", "+"))
        assert status == 400, (path, name)
        assert "write the offset's + as %2B" in json.loads(body)["detail"], body
        assert server.get(time_query(path, name, "2026-11-25T12:00:00+05:30"))[0] == 200


# --- forged cursors ------------------------------------------------------------------------


def test_a_forged_history_cursor_is_a_400_or_harmless(live_server: Any, tmp_path: Path) -> None:
    """The tag's key is not secret (tests/test_hostile.py): a time SQLite's integers cannot hold was a 500."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "".join(f"btc,BTC,Bitcoin,{hour + 1},2026-11-25T{hour:02}:00:00Z\n" for hour in range(6)))
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    server = live_server(db, LOG_LEVEL="warning")
    for interval in ("raw", "1h"):
        window = f"/data/bitcoin/history?interval={interval}&from=2026-11-25&limit=2"
        page = json.loads(server.get(window)[2])
        cursor = page["next_cursor"]
        query_digest = msgspec.msgpack.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))[:-8])[0]
        for at in (2**63, 2**64 - 1, 2**63 - 1, -(2**63), 0):
            for source, source_id in (("csv:feed", "btc"), ("'; DROP TABLE listing; --", "\x00")):
                token = forge([query_digest, at, source, source_id], page["data_version"])
                status, _, body = server.get(f"{window}&cursor={token}")
                assert status in (200, 400), (interval, at, source, status, body[:300])
                if status == 400:
                    assert json.loads(body)["detail"].startswith("cursor:"), body
        assert json.loads(server.get(window)[2])["points"] == page["points"]
