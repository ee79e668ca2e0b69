"""Faults and hostile input on the ETL side: kills, a stuck writer, WAL growth, poisoned data."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import (
    ROOT,
    etl_env,
    kill_mid_load,
    last_run,
    query,
    run_etl,
    start_etl,
    store_content,
    wait_for_event,
)
from kasparro import Config
from stores import read_only_uri
from upstream import COINGECKO_MARKETS, FakeUpstream, Reply, load_fixture

GECKO_PAGES = [load_fixture("coingecko_markets_page1.json"), load_fixture("coingecko_markets_page2.json")]


def integrity(db: Path) -> str:
    return query(db, "PRAGMA integrity_check")[0][0]


def served_content(db: Path) -> dict[str, Any]:
    """What a run produces, less what differs by run (ids, raw payload bookkeeping)."""
    content = store_content(db)
    del content["checkpoints"]
    return content


# --- kills --------------------------------------------------------------------------


def test_kills_at_20_random_instants_converge_to_one_clean_run(tmp_path, big_csv, big_clean, make_client):
    """SIGKILL after 0 or 1 committed batches and within one batch's time more, 20 times, each before the load's end."""
    chooser = random.Random(20261126)
    db = tmp_path / "killed.db"
    pace = None  # the seconds one batch takes, as the first run shows
    for kill in range(20):
        pace = kill_mid_load(db, f"csv:{big_csv}", chooser, chooser.randrange(2), pace, KASPARRO_BATCH_ROWS="5000")
        if kill in (0, 19):
            health = make_client(Config(db=db, reopen_interval=0, log_level="warning")).get("/health").json
            assert (health["status"], health["etl_status"]) == ("degraded", "failed")
    assert run_etl(db, f"csv:{big_csv}").returncode == 0
    assert integrity(db) == "ok"
    assert store_content(db) == store_content(big_clean)
    statuses = [status for (status,) in query(db, "SELECT status FROM etl_run ORDER BY run_id")]
    assert statuses == ["failed"] * 20 + ["partial"]


def test_a_kill_during_an_http_run_converges_to_one_clean_run(tmp_path):
    with FakeUpstream() as clean_upstream, FakeUpstream() as stuck_upstream:
        for server in (clean_upstream, stuck_upstream):
            server.route(COINGECKO_MARKETS, Reply(body=GECKO_PAGES[0]), match=lambda q: q.get("page") == ["1"])
        clean_upstream.route(COINGECKO_MARKETS, Reply(body=GECKO_PAGES[1]), match=lambda q: q.get("page") == ["2"])
        # Page 2 never comes on the first try: the run is killed while it waits.
        stuck_upstream.route(
            COINGECKO_MARKETS,
            Reply(body=GECKO_PAGES[1], delay=60),
            Reply(body=GECKO_PAGES[1]),
            match=lambda q: q.get("page") == ["2"],
        )
        clean = tmp_path / "clean.db"
        assert run_etl(clean, "coingecko", KASPARRO_COINGECKO_URL=clean_upstream.base_url).returncode == 0

        db = tmp_path / "killed.db"
        proc = start_etl(db, "coingecko", KASPARRO_COINGECKO_URL=stuck_upstream.base_url)
        assert wait_for_event(proc, "page loaded")["page"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert integrity(db) == "ok"
        assert query(db, "SELECT count(*) FROM source_map") == [(250,)]
        assert run_etl(db, "coingecko", KASPARRO_COINGECKO_URL=stuck_upstream.base_url).returncode == 0
    assert served_content(db) == served_content(clean)
    assert [s for (s,) in query(db, "SELECT status FROM etl_run ORDER BY run_id")] == ["failed", "success"]


@pytest.mark.parametrize(
    ("where", "code", "statuses"),
    [
        ("apply_schema", etl.EXIT_FAILED, ["success"]),
        ("end_run", etl.EXIT_OK, ["success"] * 3),
        ("end_wal", etl.EXIT_OK, ["success"] * 3),
    ],
    ids=["before-the-run", "as-the-run-s-end-is-recorded", "in-the-wal-checkpoint"],
)
def test_a_sigterm_outside_the_loading_ends_the_run_without_a_traceback(tmp_path, where, code, statuses):
    """SIGTERM was handled only while sources loaded. Before (the schema, the run's start) or after (the WAL
    checkpoint, which waits up to a second for the API's readers) it ended etl.py with a traceback and exit 1,
    after a run its record says succeeded. Between the loading's end and its record it left the run 'running'
    (until the next run marked it failed) and said it came before the run began: it now waits for the record."""
    db = tmp_path / "store.db"
    if where != "apply_schema":
        assert run_etl(db).returncode == 0
    feed = tmp_path / "feed.csv"
    feed.write_text("symbol,name,price\nBTC,Bitcoin,97000\n")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "faulty_etl.py"), "--db", str(db), f"csv:{feed}"],
        cwd=ROOT,
        env=etl_env(FAULT_PAUSE_IN=where),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_event(proc, "fault paused")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err, err
    if where == "apply_schema":
        assert err == "etl.py: error: stopped by SIGTERM before the run began\n"
    else:
        events = [json.loads(line) for line in out.splitlines()]
        assert [e["event"] for e in events[-2:]] == ["wal checkpoint skipped", "run finished"]
        assert events[-2]["reason"] == "stopped by SIGTERM" and events[-1]["status"] == "success"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    assert [s for (s,) in query(db, "SELECT status FROM etl_run ORDER BY run_id")] == statuses
    assert query(db, "SELECT price_usd FROM asset WHERE asset_id = 'bitcoin'") == [(97000.0,)]


# --- a stuck writer and the WAL --------------------------------------------------------


@contextlib.contextmanager
def write_transaction_held(db: Path) -> Iterator[None]:
    """Another process holds an open write transaction on `db`."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
            "conn.execute('BEGIN IMMEDIATE')\n"
            "conn.execute('UPDATE store_meta SET committed_at = committed_at')\n"
            "print('holding', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.communicate("")


def test_a_stuck_writer_makes_the_etl_fail_clearly_within_its_busy_timeout(tmp_path, sample_store):
    db = tmp_path / "store.db"
    with sqlite3.connect(sample_store) as source, sqlite3.connect(db) as target:
        source.backup(target)
    with write_transaction_held(db):
        started = time.monotonic()
        result = run_etl(db, f"csv:{ROOT / 'data' / 'sample.csv'}", KASPARRO_BUSY_TIMEOUT="1")
        waited = time.monotonic() - started
        assert result.returncode == etl.EXIT_FAILED
        assert "database is locked" in result.stderr
        assert waited < 20, "the ETL must give up after its busy timeout, not hang"
        # Readers are not blocked by the writer (WAL).
        assert query(db, "SELECT count(*) FROM asset") == [(255,)]
    assert run_etl(db, f"csv:{ROOT / 'data' / 'sample.csv'}").returncode == 0


def test_the_wal_is_small_after_a_run_under_read_load(tmp_path):
    db = tmp_path / "store.db"
    assert run_etl(db).returncode == 0
    feed = tmp_path / "feed.csv"
    from etl_support import write_csv

    write_csv(feed, 100_000)
    stop = threading.Event()
    reads = [0]

    def read_constantly() -> None:
        conn = sqlite3.connect(read_only_uri(db), uri=True)
        while not stop.is_set():
            conn.execute("SELECT count(*) FROM asset WHERE status = 'active'").fetchone()
            reads[0] += 1
        conn.close()

    readers = [threading.Thread(target=read_constantly) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        result = run_etl(db, f"csv:{feed}")
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert result.returncode == 0
    assert reads[0] > 100
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size < 4 * 1024 * 1024, f"WAL left at {wal.stat().st_size} bytes"


# --- hostile input -------------------------------------------------------------------


def test_hostile_csv_rows_are_rejected_or_stored_inertly(tmp_path):
    header = "id,symbol,name,price_usd,market_cap_usd\n"
    rows = [
        "formula,CALC,\"=cmd|' /C calc'!A0\",1,1",  # stored as text, never evaluated
        "plus,PLS,+SUM(A1:A9),1,1",
        "huge,HUG," + "x" * 1_000_000 + ",1,1",  # a 1 MB field
        "inf,INF,Infinity Coin,1e400,1",
        "nan,NAN,Not A Number,nan,1",
        "neg,NEG,Negative Cap,1,-1e20",
        "nul,NUL,Nul\x00Coin,1,1",
        "ctl,CTL,Bell\x07Coin,1,1",
        "sql,SQL,Robert'); DROP TABLE asset;--,1,1",
        "emoji,MOON,🚀 Moon Coin,0.1,1",
        "bidi,BIDI,\u202eevil\u202c coin,1,1",
    ]
    feed = tmp_path / "hostile.csv"
    feed.write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == 0
    names = dict(query(db, "SELECT symbol, name FROM asset"))
    assert names["CALC"] == "=cmd|' /C calc'!A0"
    assert names["PLS"] == "+SUM(A1:A9)"
    assert names["SQL"] == "Robert'); DROP TABLE asset;--"
    assert names["MOON"] == "🚀 Moon Coin"
    assert "BIDI" in names
    rejects = dict(query(db, "SELECT line, reason FROM reject"))
    assert set(rejects) == {4, 5, 6, 7, 8, 9}
    assert rejects[4] == "malformed CSV: a field longer than 131,072 characters"
    assert rejects[5] == "price_usd: not finite: '1e400'"
    assert rejects[6] == "price_usd: not finite: 'nan'"
    assert rejects[7] == "market_cap_usd: negative, expected >= 0: '-1e20'"
    assert rejects[8] == "name: contains a control character: 'Nul\\x00Coin'"
    assert rejects[9] == "name: contains a control character: 'Bell\\x07Coin'"
    assert max(len(raw) for (raw,) in query(db, "SELECT raw FROM reject")) <= etl.RAW_REJECT_CHARS
    assert integrity(db) == "ok"


def test_hostile_upstream_json_is_rejected_or_stored_inertly(tmp_path):
    """A bad optional value of an upstream record becomes null (and drift); a bad symbol voids it."""
    good = GECKO_PAGES[1][0]
    records = [
        {**good, "id": "inf-coin", "name": "Inf Coin", "current_price": "__INF__"},
        {**good, "id": "nested", "name": "Nested", "symbol": {"a": [[[[1]]]]}},
        {**good, "id": "formula", "name": '=HYPERLINK("http://x")', "symbol": "frm"},
        {**good, "id": "bool", "name": "Bool Coin", "symbol": "bol", "current_price": True},
        {**good, "id": "big-int", "name": "Big Int", "symbol": "bgi", "market_cap": 10**40},
        {**good, "id": "ok-coin", "name": "Ok Coin", "symbol": "okc"},
    ]
    body = json.dumps(records).replace('"__INF__"', "1e400").encode()
    with FakeUpstream() as upstream:
        upstream.route(COINGECKO_MARKETS, Reply(body=body))
        db = tmp_path / "store.db"
        result = run_etl(db, "coingecko", KASPARRO_COINGECKO_URL=upstream.base_url)
    assert result.returncode == 0, result.stdout
    loaded = query(db, "SELECT source_id, price_usd, market_cap_usd FROM source_map ORDER BY source_id")
    assert loaded == [
        ("big-int", good["current_price"], None),
        ("bool", None, good["market_cap"]),
        ("formula", good["current_price"], good["market_cap"]),
        ("inf-coin", None, good["market_cap"]),
        ("ok-coin", good["current_price"], good["market_cap"]),
    ]
    assert query(db, "SELECT name FROM asset WHERE symbol = 'FRM'") == [('=HYPERLINK("http://x")',)]
    assert query(db, "SELECT line, reason FROM reject") == [(2, 'symbol: not text: {"a":[[[[1]]]]}')]
    (drift,) = query(db, "SELECT drift FROM run_source")[0]
    assert json.loads(drift) == {
        "invalid field 'current_price': not finite": 1,
        "invalid field 'current_price': not a number": 1,
        "invalid field 'market_cap': out of bounds 0 to 1e+18": 1,
    }
    assert last_run(db)["status"] == "partial"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b"\x00\xff garbage", "not valid JSON"),
    ],
    ids=["deep-arrays", "deep-objects", "garbage"],
)
def test_hostile_upstream_documents_fail_the_source_clearly(tmp_path, body, reason):
    with FakeUpstream() as upstream:
        upstream.route(COINGECKO_MARKETS, Reply(body=body))
        db = tmp_path / "store.db"
        result = run_etl(db, "coingecko", KASPARRO_COINGECKO_URL=upstream.base_url)
    assert result.returncode == etl.EXIT_FAILED
    (error,) = query(db, "SELECT error FROM run_source WHERE source = 'coingecko'")[0]
    assert reason in error
    assert integrity(db) == "ok"
