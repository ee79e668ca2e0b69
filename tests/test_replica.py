"""Read replicas: Litestream ships the primary's commits to a follower copy served with KASPARRO_ROLE=replica.

Needs the litestream binary of requirements-replica.txt in this Python's bin directory (.ci/run installs it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_clients import dechunk, read_csv

import etl
from etl_support import ROOT, etl_against, query, run_etl, start_etl, store_content, wait_for_event, write_csv
from kasparro import Config, Store, age_seconds
from upstream import COINPAPRIKA_TICKERS, FakeUpstream, Reply, load_fixture

LITESTREAM = Path(sys.executable).parent / "litestream"
FOLLOW = ROOT / "deploy" / "litestream" / "follow"
PRIMARY_CONFIG = ROOT / "deploy" / "litestream" / "primary.yml"
# Seconds from the end of an ETL run to the replica serving its commit. The configs aim at about
# 1 s; this bound leaves room for a loaded CI machine (`just replicas` measures the percentiles).
LAG_BOUND = 15.0
PAPRIKA = load_fixture("coinpaprika_tickers.json")
PASSIVE = {"KASPARRO_WAL_CHECKPOINT": "passive"}  # as beside Litestream: a reader the test holds would stall a truncate
# Pages compared between the primary's API and the replica's: answers made of the store alone.
COMPARED = (
    "/data?page_size=100",
    "/data?sort=-price_usd&page_size=7&filter_by=active",
    "/data/coin-7",
    "/data/coin-7/history?interval=raw",
)


def write_market(path: Path, minute: int) -> Path:
    """A snapshot of 40 assets observed at 12:MM on one day, their prices moving with the minute."""
    rows = [
        f"coin-{n},C{n},Coin {n},{n},{n * (1 + minute / 100):.4f},{n * 1000},{n * 10},{minute / 10},active,"
        f"2026-11-25T12:{minute:02d}:00Z"
        for n in range(1, 41)
    ]
    path.write_text("id,symbol,name,rank,price_usd,market_cap_usd,volume_24h_usd,change_24h_pct,status,last_updated\n"
                    + "\n".join(rows) + "\n")  # fmt: skip
    return path


def poll(condition: Any, within: float, what: str) -> float:
    """Seconds until condition() is true; fail after `within` seconds."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"{what} not within {within} s"
        time.sleep(0.02)  # poll interval
    return time.monotonic() - started


def comparable(body: bytes) -> Any:
    """An answer without what differs between two servers of the same data."""
    answer = json.loads(body)
    answer.pop("request_id", None)
    answer.pop("api_latency_ms", None)
    return answer


@dataclass
class Replication:
    """A primary store shipped by `litestream replicate` to a file:// replica, and a follower copy of it."""

    primary: Path
    follower: Path
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]]

    def start(self, name: str, *command: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as sink:
            process = subprocess.Popen(command, env={**self.env, **env}, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def follow(self) -> subprocess.Popen[bytes]:
        return self.start("follow", str(FOLLOW), "-follow-interval", "100ms", KASPARRO_DB=str(self.follower))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def commit(self, market: Path, minute: int) -> None:
        result = run_etl(self.primary, f"csv:{write_market(market, minute)}", KASPARRO_WAL_CHECKPOINT="passive")
        assert result.returncode == 0, result.stderr


@pytest.fixture
def replication(tmp_path: Path) -> Iterator[Replication]:
    assert LITESTREAM.exists(), f"no {LITESTREAM}: pip install -r requirements-replica.txt"
    (tmp_path / "primary").mkdir()
    (tmp_path / "follower").mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("KASPARRO_", "LITESTREAM_"))}
    setup = Replication(
        primary=tmp_path / "primary" / "kasparro.db",
        follower=tmp_path / "follower" / "kasparro.db",
        env={**environ, "LITESTREAM": str(LITESTREAM), "LITESTREAM_REPLICA_URL": f"file://{tmp_path / 'replica'}"},
        logs=tmp_path,
        processes=[],
    )
    yield setup
    for process in setup.processes:
        process.send_signal(signal.SIGTERM)
    for process in setup.processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_a_replica_serves_the_primarys_commits_within_the_bound(
    replication: Replication, live_server: Any, tmp_path: Path
) -> None:
    market = tmp_path / "market.csv"
    replication.commit(market, 0)
    replication.start("replicate", str(LITESTREAM), "replicate", "-config", str(PRIMARY_CONFIG),
                      KASPARRO_DB=str(replication.primary))  # fmt: skip
    follower = replication.follow()
    poll(replication.follower.exists, 60, "the follower's first restore")
    primary_api = live_server(replication.primary)
    replica_api = live_server(replication.follower, KASPARRO_ROLE="replica")

    lags = []
    for minute in range(1, 6):
        if minute == 3:  # a follower that crashed starts again from a fresh copy
            os.killpg(follower.pid, signal.SIGKILL)  # the script and its litestream
            follower.wait(timeout=10)
        replication.commit(market, minute)
        if minute == 3:
            follower = replication.follow()
        version = json.loads(primary_api.get("/data")[2])["data_version"]
        lags.append(poll(lambda: json.loads(replica_api.get("/data")[2]).get("data_version") == version,  # noqa: B023
                         LAG_BOUND, f"commit {minute} on the replica"))  # fmt: skip
        for path in COMPARED:
            primary, replica = primary_api.get(path), replica_api.get(path)
            assert (replica[0], comparable(replica[2])) == (primary[0], comparable(primary[2])), path

    # A run's end is a commit of its own after its last data commit (data_version stays), and a run of a file
    # unchanged commits nothing but its records: each comes within the bound, in place of what the replica read
    for run, again in (("the run's end", False), ("a run that changed no data", True)):
        if again:
            replication.commit(market, 5)  # the file as the last run read it
        health, runs = json.loads(primary_api.get("/health")[2]), comparable(primary_api.get("/runs")[2])
        assert (health["status"], health["etl_status"]) == ("healthy", "success")
        lags.append(poll(lambda: json.loads(replica_api.get("/health")[2]) == health  # noqa: B023
                         and comparable(replica_api.get("/runs")[2]) == runs, LAG_BOUND, run))  # noqa: B023  # fmt: skip
    assert "unchanged since run" in runs["runs"][0]["outcomes"][0]["detail"]
    assert replication.log("follow").count("entering follow mode") == 2, replication.log("follow")
    assert replication.log("follow").count("did not stop cleanly") == 1
    assert max(lags) < LAG_BOUND
    assert store_content(replication.follower) == store_content(replication.primary)
    assert query(replication.follower, "PRAGMA integrity_check") == [("ok",)]
    assert query(replication.follower, "PRAGMA journal_mode") == [("delete",)]
    metrics = replica_api.get("/metrics")[2].decode()
    lag = next(line for line in metrics.splitlines() if line.startswith("kasparro_replication_lag_seconds "))
    assert 0 <= float(lag.split()[1]) < LAG_BOUND + 60, lag
    follower.send_signal(signal.SIGTERM)  # a clean stop: the next start serves this copy while it restores
    assert follower.wait(timeout=30) == 0
    assert replication.follower.exists() and not Path(f"{replication.follower}-following").exists()


def test_a_follower_starts_before_the_primary_ships_anything(replication: Replication, tmp_path: Path) -> None:
    replication.follow()
    poll(lambda: "nothing to restore" in replication.log("follow"), 30, "the follower's wait")
    replication.commit(tmp_path / "market.csv", 0)
    replication.start("replicate", str(LITESTREAM), "replicate", "-config", str(PRIMARY_CONFIG),
                      KASPARRO_DB=str(replication.primary))  # fmt: skip
    poll(replication.follower.exists, 60, "the follower's first restore")
    assert store_content(replication.follower) == store_content(replication.primary)


# --- every commit of the ETL reaches a follower's readers ------------------


def wal_commits(db: Path) -> list[list[int]]:
    """The pages each commit in the store's WAL wrote, oldest first (SQLite's WAL format: a 32-byte header, then
    frames of a 24-byte header and a page; a frame whose salts are not the header's is left from before a reset)."""
    wal = Path(f"{db}-wal").read_bytes()
    if len(wal) < 32:
        return []
    page_size, salts = int.from_bytes(wal[8:12], "big"), wal[16:24]
    commits: list[list[int]] = []
    pages: list[int] = []
    for offset in range(32, len(wal) - 24 - page_size + 1, 24 + page_size):
        if wal[offset + 8 : offset + 16] != salts:
            break
        pages.append(int.from_bytes(wal[offset : offset + 4], "big"))
        if int.from_bytes(wal[offset + 4 : offset + 8], "big"):  # the size of the database after a commit
            commits.append(pages)
            pages = []
    return commits


@contextlib.contextmanager
def commits_of(db: Path) -> Iterator[list[list[int]]]:
    """The pages of each commit made meanwhile: a read transaction held open keeps any checkpoint from resetting
    the WAL (and the ETL's last close from removing it), so the WAL holds every one of them."""
    made: list[list[int]] = []
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM etl_run").fetchone()
        yield made
        made.extend(wal_commits(db))
    finally:
        reader.close()


def test_every_commit_of_a_run_writes_page_one(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A follower's readers see a commit only through page 1's change counter (etl.transaction): every commit of
    every kind of run must write page 1, or a replica serves stale pages mixed with new ones."""
    db = tmp_path / "store.db"
    conn = etl.connect(db, busy_timeout=5)
    etl.apply_schema(conn)  # an empty store: the first load drops the sort indexes and builds them at its end
    conn.close()
    load = write_csv(tmp_path / "load.csv", 20_000, bad_every=997)  # 10 batches of 2,000 rows in stop_midway
    small = write_csv(tmp_path / "small.csv", 300, bad_every=7)
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=PAPRIKA), Reply(body=PAPRIKA), Reply(401, {"error": "no key"}))
    runs: list[tuple[str, Any]] = [
        ("a first load stopped midway", lambda: stop_midway(db, load)),
        ("the load resumed, its indexes restored", lambda: run_etl(db, f"csv:{load}", **PASSIVE)),
        ("a file unchanged since", lambda: run_etl(db, f"csv:{load}", **PASSIVE)),
        ("a file with rejects, after a dead run", lambda: (mark_running(db), run_etl(db, f"csv:{small}", **PASSIVE))),
        ("an upstream, its raw pages kept", lambda: etl_against(upstream, db, "coinpaprika", **PASSIVE)),
        ("an upstream, older raw pages pruned", lambda: etl_against(upstream, db, "coinpaprika", **PASSIVE,
                                                                   KASPARRO_RAW_KEEP_RUNS="1")),
        ("an upstream that fails", lambda: etl_against(upstream, db, "coinpaprika", **PASSIVE)),
    ]  # fmt: skip
    for what, run in runs:
        with commits_of(db) as commits:
            run()
        assert len(commits) >= 3, (what, commits)  # the run's start, its source's end, its end at least
        without = [(n, pages) for n, pages in enumerate(commits) if 1 not in pages]
        assert not without, (what, without)
    statuses = query(db, "SELECT status FROM etl_run ORDER BY run_id")
    assert [s for (s,) in statuses] == ["failed", "partial", "success", "failed", "partial", *["success"] * 2, "failed"]


def stop_midway(db: Path, csv: Path) -> None:
    """A run of `csv` stopped by SIGTERM after its first batch."""
    proc = start_etl(db, f"csv:{csv}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="2000", **PASSIVE)
    wait_for_event(proc, "batch committed")
    proc.send_signal(signal.SIGTERM)
    proc.communicate()
    assert proc.returncode == etl.EXIT_FAILED
    assert query(db, "SELECT status, error FROM etl_run ORDER BY run_id DESC LIMIT 1") == [
        ("failed", "stopped by SIGTERM")
    ]


# --- the replica role -------------------------------------------------------


def mark_running(db: Path) -> None:
    """Record a run as started, as a run in progress on the primary (or one that died there) leaves it."""
    conn = etl.connect(db, busy_timeout=5)
    try:
        etl.start_run(conn, [etl.CsvSource(Path("never-read.csv"))])
    finally:
        conn.close()


def test_a_replica_takes_a_running_record_at_its_word(make_client: Any, store_path: Path) -> None:
    mark_running(store_path)
    primary = make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))
    replica = make_client(Config(db=store_path, reopen_interval=0, log_level="warning", role="replica"))
    # No ETL holds the lock here: the primary sees a dead run; a replica cannot see the lock at all.
    dead, running = primary.get("/health").json, replica.get("/health").json
    assert (dead["status"], dead["etl_status"]) == ("degraded", "failed")
    assert (running["status"], running["etl_status"]) == ("healthy", "running")
    assert primary.get("/stats").json["recent_runs"][0]["status"] == "failed"
    assert replica.get("/stats").json["recent_runs"][0]["status"] == "running"


def test_a_replica_judges_a_running_record_by_the_run_before(make_client: Any, store_path: Path) -> None:
    mark_running(store_path)
    replica = make_client(Config(db=store_path, etl_max_age=-1, log_level="warning", role="replica"))
    body = replica.get("/health").json
    assert (body["status"], body["etl_status"]) == ("degraded", "running")


def test_only_a_replica_exports_its_lag(make_client: Any, store_path: Path) -> None:
    ended = query(store_path, "SELECT max(ended_at) FROM etl_run")[0][0]
    replica = make_client(Config(db=store_path, log_level="warning", role="replica"))
    primary = make_client(Config(db=store_path, log_level="warning"))
    lag = [line for line in replica.get("/metrics").text.splitlines() if line.startswith("kasparro_replication_lag")]
    assert len(lag) == 1
    assert abs(float(lag[0].split()[1]) - age_seconds(ended)) < 5
    assert "kasparro_replication_lag" not in primary.get("/metrics").text


def test_a_busy_copy_fails_a_read_and_not_the_next(
    make_client: Any, store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Litestream applies a commit to the rollback-journal copy under an exclusive lock."""
    conn = sqlite3.connect(store_path)
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    conn.close()
    monkeypatch.setattr(Store, "BUSY_TIMEOUT_MS", 50)
    replica = make_client(Config(db=store_path, log_level="warning", role="replica"))
    assert replica.get("/data?page=2&page_size=5").status_code == 200
    applier = sqlite3.connect(store_path, isolation_level=None)
    applier.execute("BEGIN EXCLUSIVE")
    try:
        busy = replica.get("/data?page=3&page_size=5")
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    finally:
        applier.execute("ROLLBACK")
        applier.close()
    # The store was busy, not broken: its readers stay open, and the next request reads.
    assert replica.get("/data?page=3&page_size=5").status_code == 200
    assert replica.get("/data/bitcoin").status_code == 200


PENDING_BYTE = 0x40000000  # SQLite's lock bytes: PENDING, then the SHARED range after RESERVED
SHARED_RANGE = (PENDING_BYTE + 2, 510)
STOP_WITHIN_S = 5.0  # SPEC: SIGTERM stops the server within 5 s under any load
SERVE = ("--timeout-graceful-shutdown", "3")  # as README's command
KEPT = ("/health", "/data/bitcoin", "/data?page_size=5")  # answers kept once made twice at one commit
# Answers no request made yet: each needs a read of the copy (on the loop's connection, or a reader's).
UNREAD = ("/data/ethereum", "/data?page=2&page_size=5", "/data/bitcoin/history?interval=raw")


@contextlib.contextmanager
def applying(db: Path) -> Iterator[None]:
    """Hold the lock Litestream's follower writes a commit's pages under (PENDING and SHARED write-locked, as
    its LockFileExclusive does), from this process; SQLite's connections here must stay off the file meanwhile:
    closing any descriptor of it drops this process's locks."""
    with db.open("r+b") as copy:
        fcntl.lockf(copy, fcntl.LOCK_EX, 1, PENDING_BYTE)
        fcntl.lockf(copy, fcntl.LOCK_EX, SHARED_RANGE[1], SHARED_RANGE[0])
        yield  # closing the file releases both


def rollback_journal(db: Path) -> Path:
    """The copy in the journal mode deploy/litestream/follow leaves it in."""
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    conn.close()
    return db


def test_a_replica_answers_while_its_copy_is_being_applied(live_server: Any, store_path: Path) -> None:
    """The event loop never waits for the apply: what is kept is served from the last commit, and the reads
    the copy must answer wait for the lock on readers' threads, then end in 200."""
    replica = live_server(rollback_journal(store_path), *SERVE, KASPARRO_ROLE="replica")
    for path in KEPT * 2:
        assert replica.get(path)[0] == 200, path
    with ThreadPoolExecutor(len(UNREAD)) as pool:
        with applying(store_path):
            waiting = [pool.submit(replica.get, path) for path in UNREAD]
            served = [(path, replica.get(path)[0]) for path in KEPT * 3]
            assert served == [(path, 200) for path in KEPT * 3]
            assert not any(request.done() for request in waiting)  # none read through the lock, none gave up
        assert [(path, request.result()[0]) for path, request in zip(UNREAD, waiting, strict=True)] == [
            (path, 200) for path in UNREAD
        ]
    assert "store unreadable" not in replica.output.read_text()


def test_a_replica_keeps_its_last_commit_while_an_apply_holds_the_copy(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the look for a new commit nor the check for a replaced file (an apply moves the mtime) waits on the
    loop, or takes a lock held past the busy timeout for a broken store."""
    monkeypatch.setattr(Store, "BUSY_TIMEOUT_MS", 50)

    async def scenario() -> None:
        store = Store(rollback_journal(store_path), readers=1, reopen_interval=0, replica=True)
        before = await store.watch()
        pool = store._pool
        applier = sqlite3.connect(store_path, isolation_level=None)  # this process: SQLite's own lock, not fcntl's
        applier.execute("BEGIN EXCLUSIVE")
        try:
            os.utime(store_path)
            await asyncio.sleep(0)  # the next turn of the loop looks again
            assert await store.watch() is before
            assert store._pool is pool
        finally:
            applier.execute("ROLLBACK")
            applier.close()
        await asyncio.sleep(0)
        assert (await store.watch()).version == before.version
        await store.close()

    asyncio.run(scenario())


def in_flight(server: Any) -> float:
    """Requests the server is answering, the scrape that asks included."""
    metrics = server.get("/metrics")[2].decode()
    gauge = next(line for line in metrics.splitlines() if line.startswith("kasparro_http_requests_in_flight "))
    return float(gauge.split()[1])


def test_sigterm_stops_a_replica_while_its_copy_is_locked(live_server: Any, store_path: Path) -> None:
    """An apply that does not end (a follower stopped while it held the lock) holds no server up past SPEC's bound."""
    replica = live_server(rollback_journal(store_path), *SERVE, KASPARRO_ROLE="replica")
    assert replica.get("/metrics")[0] == 200  # its store facts are kept for this commit: a scrape reads nothing
    with ThreadPoolExecutor(len(UNREAD) * 3) as pool, applying(store_path):
        waiting = [pool.submit(replica.get, path) for path in UNREAD * 3]
        poll(lambda: in_flight(replica) > len(waiting), 30, "every request waiting in the server")
        started = time.monotonic()
        replica.process.send_signal(signal.SIGTERM)
        replica.process.wait(timeout=30)
        stopped_in = time.monotonic() - started
        for request in waiting:
            with contextlib.suppress(OSError):  # an answer, or the connection closed by the stopping server
                request.result()
    print(f"stopped in {stopped_in:.2f} s")
    assert stopped_in < STOP_WITHIN_S, f"still running {stopped_in:.1f} s after SIGTERM\n{replica.output.read_text()}"


APPLIES = 5  # applies taken one after another under the flood
APPLY_WITHIN = 10.0  # seconds an apply may wait for its lock: the reads begun before it end, on a loaded machine
# Requests no answer is kept for, each a full scan of big_clean's 200,000 assets (a name filter no index serves): a
# read transaction of milliseconds on a reader's thread; asked by twice as many clients at once as the API has
# readers (4), so one is always waiting to begin.
FLOOD, FLOODING_CLIENTS = "/data?filter_by=name~{n}&page_size=5", 8


def take_apply_lock(db: Path, within: float) -> float | None:
    """Take and let go the lock Litestream's follower applies a commit under, from this process, as it does: PENDING
    write-locked first (a reader's momentary read lock on it may be in the way), then the SHARED range, waiting
    for the readers. Seconds it took, or None when `within` seconds were not enough."""
    started = time.monotonic()
    with db.open("r+b") as copy:
        for length, start in ((1, PENDING_BYTE), (SHARED_RANGE[1], SHARED_RANGE[0])):
            while True:
                try:
                    fcntl.lockf(copy, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
                    break
                except OSError:
                    if time.monotonic() - started > within:
                        return None
                    time.sleep(0.001)  # poll interval: a lock held by the API's reads
        return time.monotonic() - started  # closing the file releases both


def test_an_apply_gets_the_copy_while_uncached_reads_flood_the_replica(
    live_server: Any, big_clean: Path, tmp_path: Path
) -> None:
    """SQLite lets a connection join the shared lock its process holds without looking at another process's
    pending lock: reads that overlap without a gap would keep an apply out for as long as they come."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(big_clean, copy)
    replica = live_server(rollback_journal(copy), KASPARRO_ROLE="replica", LOG_LEVEL="warning")
    stop, answered = threading.Event(), collections.Counter[int]()

    def ask(client: int) -> None:
        for n in itertools.count(client, FLOODING_CLIENTS):  # every request its own filter: nothing kept serves it
            if stop.is_set():
                return
            answered[replica.get(FLOOD.format(n=n))[0]] += 1

    with ThreadPoolExecutor(FLOODING_CLIENTS) as pool:
        clients = [pool.submit(ask, client) for client in range(FLOODING_CLIENTS)]
        try:
            poll(lambda: answered.total() >= 2 * FLOODING_CLIENTS, 120, "the flood under way")
            waits = []
            for _ in range(APPLIES):
                waits.append(take_apply_lock(copy, APPLY_WITHIN))
                assert waits[-1] is not None, f"apply {len(waits)} kept out {APPLY_WITHIN:g} s by the reads; {waits}"
                flooded = answered.total() + FLOODING_CLIENTS  # the flood going again before the next apply
                poll(lambda: answered.total() >= flooded, 120, "the flood after an apply")  # noqa: B023
            print(f"applies waited {', '.join(f'{wait * 1000:.0f}' for wait in waits)} ms; answered {answered}")
        finally:
            stop.set()
            for client in clients:
                client.result()
    assert set(answered) == {200}, answered


def test_an_apply_gets_the_copy_while_a_client_stalls_an_export(
    live_server: Any, big_clean: Path, tmp_path: Path
) -> None:
    """An export is one read transaction: on a replica it must not last as long as its client takes, and the
    client still gets every asset of the version it began with."""
    copy = tmp_path / "copy.db"
    shutil.copyfile(big_clean, copy)
    replica = live_server(rollback_journal(copy), KASPARRO_ROLE="replica", LOG_LEVEL="warning")
    total = json.loads(replica.get("/data?page_size=1")[2])["total_items"]
    port = int(replica.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(b"GET /data/export HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = bytearray(client.recv(4096))
        assert received.startswith(b"HTTP/1.1 200 "), received[:200]
        # The client reads no more for now: every asset (~20 MB of CSV) cannot fit in the sockets' buffers.
        assert take_apply_lock(copy, APPLY_WITHIN) is not None, f"apply kept out {APPLY_WITHIN:g} s by the export"
        while chunk := client.recv(1 << 20):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert len(read_csv(dechunk(body))) == total


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(SystemExit, match="KASPARRO_ROLE must be primary or replica, not 'standby'"):
        Config.from_env({"KASPARRO_ROLE": "standby"})
    assert Config.from_env({"KASPARRO_ROLE": "replica"}).role == "replica"


# --- how a run ends its WAL ---------------------------------------------------


@pytest.fixture
def reader(store_path: Path) -> Iterator[sqlite3.Connection]:
    """A read transaction held open on the store, as Litestream holds one on the primary."""
    conn = sqlite3.connect(store_path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM asset").fetchone()
    yield conn
    conn.close()


@pytest.mark.parametrize(("mode", "waits"), [("truncate", True), ("passive", False), ("off", False)])
def test_a_run_waits_on_a_reader_only_to_truncate(
    store_path: Path, reader: sqlite3.Connection, tmp_path: Path, mode: str, waits: bool
) -> None:
    market = write_market(tmp_path / "market.csv", 1)
    result = run_etl(store_path, f"csv:{market}", KASPARRO_WAL_CHECKPOINT=mode, KASPARRO_BUSY_TIMEOUT="0.02")
    assert result.returncode == 0, result.stderr
    assert ("wal not truncated" in result.stdout) is waits
    reader.execute("ROLLBACK")


@pytest.mark.parametrize(("mode", "truncated", "copied"), [("truncate", True, True), ("passive", False, True),
                                                           ("off", False, False)])  # fmt: skip
def test_a_run_ends_the_wal_as_its_mode_says(
    store_path: Path, tmp_path: Path, mode: str, truncated: bool, copied: bool
) -> None:
    idle = sqlite3.connect(store_path)  # open, so the ETL's close is not the last one (which checkpoints)
    idle.execute("SELECT count(*) FROM asset").fetchone()
    runs = query(store_path, "SELECT count(*) FROM etl_run")[0][0]
    result = run_etl(store_path, f"csv:{write_market(tmp_path / 'market.csv', 2)}", KASPARRO_WAL_CHECKPOINT=mode)
    assert result.returncode == 0, result.stderr
    assert (Path(f"{store_path}-wal").stat().st_size == 0) is truncated
    main_file = tmp_path / "main-file-only.db"  # what the store file holds without its WAL
    main_file.write_bytes(store_path.read_bytes())
    assert (query(main_file, "SELECT count(*) FROM etl_run")[0][0] == runs + 1) is copied
    idle.close()


def test_an_unknown_checkpoint_mode_is_a_usage_error(store_path: Path) -> None:
    result = run_etl(store_path, KASPARRO_WAL_CHECKPOINT="sometimes")
    assert result.returncode == 2
    assert "KASPARRO_WAL_CHECKPOINT must be one of truncate, passive, off, not 'sometimes'" in result.stderr
