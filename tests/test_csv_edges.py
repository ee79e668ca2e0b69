"""CSV cells at their edges, as a newcomer tried them. The real etl.py as a subprocess, into a real SQLite store."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import etl
from etl_support import etl_of, last_run, query, run_etl

HEADER = "id,symbol,name,price_usd,last_updated\n"


def test_a_time_cell_of_many_digits_and_a_letter_is_rejected_and_the_rest_load(tmp_path: Path) -> None:
    """Telling a Unix time from an RFC 3339 one tried every split of the digits: this one cell took about eight
    minutes of CPU (run_etl gives up after five), holding the writer's lock."""
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "a,A,Coin A,1," + "1" * 100_000 + "x\n" + "b,B,Coin B,2,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 2, 1, 1)
    assert query(db, "SELECT line, reason FROM reject") == [
        (2, f"observed_at: not an RFC 3339 time or Unix seconds or milliseconds: {'1' * 40!r}")
    ]
    assert query(db, "SELECT asset_id FROM asset") == [("coin-b",)]


def test_a_coin_named_like_a_route_gets_an_asset_id_the_api_can_serve(live_server: Any, tmp_path: Path) -> None:
    """A coin named Export was given asset_id 'export', whose /data/export is the export: its record could not be
    read. It takes a suffix, as a slug another asset holds does; a coin named History is served as any other."""
    feed = tmp_path / "routes.csv"
    feed.write_text("symbol,name,price\nEXP,Export,1.5\nHIS,History,2.5\nEXP2,export,3.5\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    ids = {name: asset_id for asset_id, name in query(db, "SELECT asset_id, name FROM asset")}
    assert "export" not in ids.values() and len(set(ids.values())) == 3
    server = live_server(db, LOG_LEVEL="warning")
    for name, asset_id in ids.items():
        status, _, body = server.get(f"/data/{asset_id}")
        assert status == 200 and json.loads(body)["name"] == name, (asset_id, body[:200])
        status, _, body = server.get(f"/data/{asset_id}/history?interval=raw")
        assert status == 200 and len(json.loads(body)["points"]) == 1, (asset_id, body[:200])
    status, headers, body = server.get("/data/export")
    assert status == 200 and headers["content-type"].startswith("text/csv") and len(body.splitlines()) == 4


BLANK_FIRST_LINE = "the first line is blank, where the header row belongs (symbol, name and the other columns)"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"\n\nsymbol,name\nBTC,Bitcoin\n", BLANK_FIRST_LINE),
        (b"   \r\n", BLANK_FIRST_LINE),
        (b"\xef\xbb\xbf", BLANK_FIRST_LINE),
        (b"\xef\xbb\xbf\r\nsymbol,name\n", BLANK_FIRST_LINE),
        (b"BTC,Bitcoin,95000\n", "header has no symbol or name column; its columns: 'BTC', 'Bitcoin', '95000'"),
        (b"ticker,title\nBTC,Bitcoin\n", "header has no name column; its columns: 'ticker', 'title'"),
    ],
    ids=["blank-lines", "spaces", "bom-only", "bom-then-blank", "no-header", "no-name"],
)
def test_a_header_that_is_not_there_is_described_in_plain_words(tmp_path: Path, content: bytes, error: str) -> None:
    """A blank first line, or only a byte-order mark, failed with "header has no symbol or name column (header:
    ['\\ufeff'])": a Python list, of a character no one sees."""
    feed = tmp_path / "feed.csv"
    feed.write_bytes(content)
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert query(db, "SELECT error FROM run_source") == [(error,)]


def test_an_accent_does_not_split_a_new_assets_slug(tmp_path: Path) -> None:
    """Each combining mark became a hyphen: 'Über' was given asset_id 'u-ber', 'Pokémon' 'poke-mon'. The source id
    made for a row without one keeps its old form ('u-ber-ub'): stored listings are keyed by it, and a new one would
    make the same coin a second asset at the next load of the file."""
    with_ids, without = tmp_path / "with.csv", tmp_path / "without.csv"
    with_ids.write_text("id,symbol,name,price\nuber,UB,Über,1\npkm,PKM,Pokémon,2\n", encoding="utf-8")
    without.write_text("symbol,name,price\nCF,Café Über,3\n", encoding="utf-8")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{with_ids}", f"csv:{without}").returncode == 0
    assert sorted(query(db, "SELECT asset_id FROM asset")) == [("cafe-uber",), ("pokemon",), ("uber",)]
    assert query(db, "SELECT source_id FROM source_map WHERE source = 'csv:without'") == [("cafe-u-ber-cf",)]


# The last commit whose slugify dropped the Latin letters that NFKD leaves whole.
LETTERS_DROPPED = "6f80c8e9a9f5d34a07e6ed5706447d34cf783649"
SPELT = [("Straße", "strasse"), ("Strae", "strae"), ("Bıtcoin", "bitcoin"), ("Øre Coin", "ore-coin"),
         ("Œuvre", "oeuvre"), ("Łódź", "lodz"), ("Đồng", "dong"), ("Þór", "thor"), ("Ærø", "aero"), ("Ŋa", "nga"),
         ("Əsas", "esas"), ("GROẞ", "gross")]  # fmt: skip


@pytest.fixture(scope="module")
def earlier_etl(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """etl.py as it was before letters were spelt, imported under another name."""
    path = etl_of(LETTERS_DROPPED, tmp_path_factory.mktemp("letters") / "etl")
    spec = importlib.util.spec_from_file_location("etl_letters_dropped", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_letters_without_an_ascii_decomposition_are_spelt_in_a_new_assets_slug(tmp_path: Path) -> None:
    """slugify dropped the letters that NFKD leaves whole: 'Straße' was given 'strae', the slug of 'Strae' (which then
    took 'strae-st'), 'Bitcoin' with a dotless i 'btcoin', 'Øre Coin' 're-coin', 'Þór' 'r'."""
    feed = tmp_path / "feed.csv"
    rows = [f"id{n},S{n},{name},1" for n, (name, _) in enumerate(SPELT)]
    feed.write_text("id,symbol,name,price\n" + "\n".join(rows) + "\n", encoding="utf-8")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    slugs = dict(query(db, "SELECT source_id, asset_id FROM source_map"))
    assert [slugs[f"id{n}"] for n in range(len(SPELT))] == [slug for _, slug in SPELT]


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40))
def test_a_name_without_such_letters_keeps_its_slug_and_made_ids_keep_theirs(earlier_etl: Any, name: str) -> None:
    """Asset ids and the source ids made for rows without one are stable: the same name makes the same slug as
    before, but where it has a letter that was dropped; the made source id is the same for every name."""
    before = earlier_etl.slugify(name)
    if not set(unicodedata.normalize("NFKD", name)) & {chr(letter) for letter in etl.ASCII_LETTERS}:
        assert etl.slugify(name) == before
    assert etl.made_source_id(name, "Ab") == earlier_etl.made_source_id(name, "Ab")


def test_a_store_made_before_keeps_its_asset_and_source_ids(tmp_path: Path) -> None:
    """A store whose assets were named when such letters were dropped ('strae') keeps every asset id, and a file
    without an id column still finds its listings by their made ids ('strae-two-st2'): no coin becomes two."""
    names = [("BTC", "Bitcoin"), ("PKM", "Pokémon"), ("ST", "Straße"), ("BI", "Bıtcoin"), ("OR", "Øre Coin")]
    with_ids, without = tmp_path / "with.csv", tmp_path / "without.csv"

    def write_feeds(price: int) -> None:
        with_ids.write_text("id,symbol,name,price\n" + "".join(f"{s.lower()},{s},{n},{price}\n" for s, n in names))
        without.write_text("symbol,name,price\n" + "".join(f"{s}2,{n} Two,{price}\n" for s, n in names))
        # Undated rows are observed at the file's mtime: each price its own second (one second, two prices, is a
        # conflict the second run rejects), both in the past.
        moment = time.time() - 300 + 60 * price
        for feed in (with_ids, without):
            os.utime(feed, (moment, moment))

    write_feeds(1)
    db = tmp_path / "store.db"
    earlier = etl_of(LETTERS_DROPPED, tmp_path / "earlier")
    for feed in (with_ids, without):
        made = subprocess.run([sys.executable, str(earlier), "--db", str(db), f"csv:{feed}"], cwd=earlier.parent,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert made.returncode == 0, made.stderr
    ids = query(db, "SELECT source, source_id, asset_id FROM source_map ORDER BY 1, 2")
    assert {("csv:with", "st", "strae"), ("csv:without", "strae-two-st2", "strae-two")} <= set(ids)
    write_feeds(2)
    for feed in (with_ids, without):
        assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT source, source_id, asset_id FROM source_map ORDER BY 1, 2") == ids
    assert query(db, "SELECT count(*), min(price_usd), max(price_usd) FROM asset") == [(2 * len(names), 2.0, 2.0)]


def test_rows_of_empty_cells_are_blank_lines_not_rejected_rows(tmp_path: Path) -> None:
    """A spreadsheet saves rows whose cells were cleared as ',,' (and ' , ,' where a space was left): each was
    read as a row and rejected ('symbol: missing'), so a clean export loaded as 'partial'. They are skipped as
    blank lines are; a row with any value in it is still read."""
    feed = tmp_path / "feed.csv"
    feed.write_bytes(b"symbol,name,price\r\n,,\r\nBTC,Bitcoin,1\r\n , ,\r\n,,\r\n,,2\r\n\r\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    run = last_run(db)
    assert (run["status"], run["rows_read"], run["rows_loaded"], run["rows_rejected"]) == ("partial", 2, 1, 1)
    assert query(db, "SELECT line, reason FROM reject") == [(6, "symbol: missing")]


@pytest.mark.parametrize(
    ("column", "cell"),
    [
        ("Last Updated (UTC)", "2026-11-20T12:00:00Z"),
        ("Timestamp (ms)", "1795176000000"),
        ("date_utc", "2026-11-20T12:00"),
    ],
)
def test_a_time_column_named_with_its_zone_or_unit_gives_the_observation_time(
    tmp_path: Path, column: str, cell: str
) -> None:
    """'Last Updated (UTC)' was an unknown column (named in the drift as a likely rename), and every row took the
    file's modification time instead of its own: the market of 2026-11-20 was stored as observed at the load."""
    feed = tmp_path / "feed.csv"
    feed.write_text(f'Symbol,Name,Price (USD),"{column}"\nBTC,Bitcoin,95000,{cell}\n')
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    assert query(db, "SELECT updated_at FROM asset") == [("2026-11-20T12:00:00Z",)]
    assert query(db, "SELECT drift FROM run_source") == [(None,)]


def test_a_time_column_with_a_plain_name_wins_over_one_named_with_its_unit(tmp_path: Path) -> None:
    """Exports that give a time twice ('timestamp' and 'timestamp_ms') load by the plain one; the other is drift."""
    feed = tmp_path / "feed.csv"
    feed.write_text("symbol,name,price,timestamp_ms,timestamp\nBTC,Bitcoin,95000,1,2026-11-20T12:00:00Z\n")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert query(db, "SELECT updated_at FROM asset") == [("2026-11-20T12:00:00Z",)]
    assert json.loads(query(db, "SELECT drift FROM run_source")[0][0]) == {"unknown column 'timestamp_ms'": 1}


@pytest.mark.parametrize(
    ("header", "ignored"),
    [("time_utc,time_unix", "time_unix"), ("Timestamp (ms),Last Updated (UTC)", "Last Updated (UTC)")],
)
def test_of_two_time_columns_named_with_a_unit_the_first_gives_the_time(
    tmp_path: Path, header: str, ignored: str
) -> None:
    """Exports that give a time twice, each with its unit, failed the file ('both give observed_at'), though either
    would do: the first one loads, and the other is drift, as one beside a plain time column is."""
    feed = tmp_path / "feed.csv"
    first, second = ("2026-11-20T12:00:00Z", "1795000000") if "utc" in header[:9] else ("1795176000000", "1")
    feed.write_text(f"symbol,name,price,{header}\nBTC,Bitcoin,95000,{first},{second}\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr
    assert last_run(db)["status"] == "success"
    assert query(db, "SELECT updated_at FROM asset") == [("2026-11-20T12:00:00Z",)]
    assert json.loads(query(db, "SELECT drift FROM run_source")[0][0]) == {f"unknown column {ignored!r}": 1}


ISO_NOT_RFC3339 = ["2026-W48-3", "2026W483", "2026-329", "20261125T120000Z", "2026-11-25T120000Z",
                   "2026-11-25T12:00:00+0100", "2026-11-25T12:00:00+01", "2026-11-25T12Z", "2026-11-25T12:00:00,5Z",
                   "2026-11-25_12:00:00Z"]  # fmt: skip


def test_iso_8601_times_that_are_not_rfc_3339_are_rejected_naming_the_value(tmp_path: Path) -> None:
    """SPEC: RFC 3339, or Unix seconds or milliseconds. fromisoformat read ISO 8601's week and ordinal dates, its basic
    format, offsets without their colon, hours alone and comma fractions, which RFC 3339 has none of (and which the
    API refuses in as_of, from and filter_by). The forms RFC 3339 allows, and its date alone, still load."""
    rows = [f'c{n},C{n},Coin {n},1,"{text}"\n' for n, text in enumerate(ISO_NOT_RFC3339)]
    kept = ["2026-11-25t12:00:00z", "2026-11-25 13:00:00+01:00", "2026-11-25T12:00", "2026-11-25"]
    rows += [f"k{n},K{n},Kept {n},1,{text}\n" for n, text in enumerate(kept)]
    feed = tmp_path / "feed.csv"
    feed.write_text(HEADER + "".join(rows))
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0, result.stderr[-2000:]
    reason = "observed_at: an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z: {!r}"
    expected = [(n + 2, reason.format(text)) for n, text in enumerate(ISO_NOT_RFC3339)]
    expected[2] = (4, "observed_at: not an RFC 3339 time or Unix seconds or milliseconds: '2026-329'")
    assert query(db, "SELECT line, reason FROM reject ORDER BY line") == expected
    assert query(db, "SELECT observed_at FROM source_map ORDER BY source_id") == [
        ("2026-11-25T12:00:00Z",), ("2026-11-25T12:00:00Z",), ("2026-11-25T12:00:00Z",), ("2026-11-25T00:00:00Z",)
    ]  # fmt: skip
