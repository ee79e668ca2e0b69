"""The machine fails the ETL (full disk, read-only store, a writer's lock, corruption): the run says why.

Each case runs the real etl.py (or its CLI with its own connection limited, tests/faulty_etl.py) and
reads the result the ways an operator does: exit code and message, log lines, the run record, and
/stats and /health from a real uvicorn. The store stays consistent and the next healthy run loads.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_faults import integrity, write_transaction_held

import etl
import kasparro
from etl_support import ROOT, SmallDisk, etl_env, query, run_etl, store_content, write_csv
from kasparro import Config

FAULTY_ETL = ROOT / "tests" / "faulty_etl.py"
SAMPLE = f"csv:{ROOT / 'data' / 'sample.csv'}"
FEED_ROWS = 20_000


@dataclass
class Finished:
    """An ended etl.py: exit code, stderr and its JSON log lines."""

    returncode: int
    stderr: str
    events: list[dict[str, Any]]

    def event(self, name: str) -> dict[str, Any]:
        (found,) = [e for e in self.events if e["event"] == name]
        return found


def finished(returncode: int, stdout: str, stderr: str) -> Finished:
    return Finished(returncode, stderr, [json.loads(line) for line in stdout.splitlines() if line.startswith("{")])


def run_faulty(db: Path, *sources: str, **env: str) -> Finished:
    """Run etl.py's CLI with the fault the FAULT_* variables choose (see tests/faulty_etl.py)."""
    result = subprocess.run(
        [sys.executable, str(FAULTY_ETL), "--db", str(db), *sources],
        cwd=ROOT, env=etl_env(**env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return finished(result.returncode, result.stdout, result.stderr)


def run_real(db: Path, *sources: str, **env: str) -> Finished:
    result = run_etl(db, *sources, **env)
    return finished(result.returncode, result.stdout, result.stderr)


def start_faulty(db: Path, *sources: str, **env: str) -> subprocess.Popen[str]:
    """Start the faulty CLI with a stdin to resume it from FAULT_THEN=pause."""
    return subprocess.Popen(
        [sys.executable, str(FAULTY_ETL), "--db", str(db), *sources],
        cwd=ROOT, env=etl_env(**env), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def read_events_until(proc: subprocess.Popen[str], name: str, seen: list[dict[str, Any]]) -> None:
    for line in proc.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == name:
            return
    raise AssertionError(f"etl.py ended before {name!r}")


def previous_data(db: Path) -> dict[str, Any]:
    """What the runs before the failing one stored (checkpoints aside: a failed run may move its own)."""
    content = store_content(db)
    del content["checkpoints"]
    return content


def stats(server: Any) -> dict[str, Any]:
    status, _, body = server.get("/stats")
    assert status == 200, body
    return json.loads(body)


def health(server: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = server.get("/health")
    return status, json.loads(body)


def assert_run_failed_with(db: Path, server: Any, failed: Finished, cause: str, before: dict[str, Any]) -> None:
    """The exit code, exit message, log line, run record and /stats all name `cause`; the data is as `before`."""
    assert integrity(db) == "ok"
    assert previous_data(db) == before
    assert failed.returncode == etl.EXIT_FAILED, failed.stderr
    assert cause in failed.stderr
    assert "cannot rollback" not in failed.stderr + json.dumps(failed.events)
    assert cause in failed.event("source failed")["error"]
    (status, error), *_ = query(db, "SELECT status, error FROM etl_run ORDER BY run_id DESC LIMIT 1")
    assert status == "failed" and cause in error
    assert cause in query(db, "SELECT error FROM run_source ORDER BY run_id DESC LIMIT 1")[0][0]
    summary = stats(server)
    assert cause in summary["overall"]["last_error"]
    assert cause in summary["recent_runs"][0]["error"]
    status, verdict = health(server)
    assert (status, verdict["status"], verdict["etl_status"]) == (200, "degraded", "failed")


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New assets for a store that holds the sample: about 5 MB of store."""
    return write_csv(tmp_path_factory.mktemp("feed") / "feed.csv", FEED_ROWS)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, sample_store: Path, feed: Path) -> Path:
    """The store one healthy run of the feed makes after the sample (do not write to it)."""
    db = tmp_path_factory.mktemp("loaded") / "loaded.db"
    shutil.copyfile(sample_store, db)
    assert run_real(db, f"csv:{feed}").returncode == 0
    return db


def assert_next_run_completes(db: Path, feed: Path, loaded: Path) -> None:
    again = run_real(db, f"csv:{feed}")
    assert again.returncode == 0, again.stderr
    assert integrity(db) == "ok"
    assert previous_data(db) == previous_data(loaded)


# --- a full disk ------------------------------------------------------------------------------


def test_a_full_disk_fails_the_run_saying_so_and_the_next_run_loads(
    small_disk: SmallDisk, live_server: Any, sample_store: Path, feed: Path, loaded: Path
) -> None:
    """A real ENOSPC: SQLite rolls the whole transaction back itself (the reported instance)."""
    db = small_disk.folder / "kasparro.db"
    shutil.copyfile(sample_store, db)
    before = previous_data(db)
    server = live_server(db, LOG_LEVEL="warning")
    failed = run_real(db, f"csv:{feed}")
    assert_run_failed_with(db, server, failed, f"the disk holding {db} is full", before)
    assert "SQLite: database or disk is full" in failed.stderr
    small_disk.fill()
    for path in ("/data", "/data?sort=-price_usd&page_size=100", "/data/bitcoin", "/stats", "/metrics"):
        assert server.get(path)[0] == 200, path
    assert health(server)[1]["etl_status"] == "failed"
    small_disk.remount("size=64m")
    assert_next_run_completes(db, feed, loaded)


def test_a_store_at_its_page_limit_fails_the_run_saying_the_disk_is_full(
    live_server: Any, store_path: Path, feed: Path, loaded: Path
) -> None:
    """SQLite's page limit answers as a full disk does, without mounting anything (SQLite undoes the statement)."""
    before = previous_data(store_path)
    server = live_server(store_path, LOG_LEVEL="warning")
    failed = run_faulty(store_path, f"csv:{feed}", FAULT_MAX_PAGES="20")
    assert_run_failed_with(store_path, server, failed, f"the disk holding {store_path} is full", before)
    assert_next_run_completes(store_path, feed, loaded)


# --- a read-only store ------------------------------------------------------------------------


def test_a_store_turned_read_only_between_batches_fails_the_run_and_the_next_run_records_it(
    live_server: Any, store_path: Path, feed: Path, loaded: Path
) -> None:
    """Its run record cannot be written either: the log and exit message say so; the next run marks it failed."""
    before = previous_data(store_path)
    server = live_server(store_path, LOG_LEVEL="warning")
    failed = run_faulty(
        store_path, f"csv:{feed}", KASPARRO_BATCH_ROWS="5000", FAULT_AFTER_BATCHES="1", FAULT_THEN="read-only"
    )
    cause = f"the store {store_path} is read-only"
    assert failed.returncode == etl.EXIT_FAILED
    assert cause in failed.event("source failed")["error"]
    lost = failed.event("run failed; its record was not written")
    assert cause in lost["cause"] and cause in lost["record_error"]
    assert cause in failed.stderr
    assert "could not be written to the run record for the same reason, so the next run will record it as failed" in (
        failed.stderr
    )
    assert "SQLite: attempt to write a readonly database" in failed.stderr
    assert integrity(store_path) == "ok"
    # The first batch committed with its checkpoint; what was there before is untouched.
    after = previous_data(store_path)
    assert [a for a in after["assets"] if a in before["assets"]] == before["assets"]
    assert len(after["observations"]) == len(before["observations"]) + 5000
    assert health(server)[1]["etl_status"] == "failed"  # the record says running, but no process holds the lock
    assert_next_run_completes(store_path, feed, loaded)
    statuses = query(store_path, "SELECT status, error FROM etl_run ORDER BY run_id DESC LIMIT 2")
    assert statuses[0] == ("success", None)
    assert statuses[1][0] == "failed" and "could not record its end" in statuses[1][1]
    assert "could not record its end" in stats(server)["overall"]["last_error"]


def test_a_store_on_a_read_only_disk_fails_the_run_saying_so(small_disk: SmallDisk, sample_store: Path) -> None:
    db = small_disk.folder / "kasparro.db"
    shutil.copyfile(sample_store, db)
    before = previous_data(db)
    small_disk.remount("ro")
    failed = run_real(db, SAMPLE)
    cause = f"the store {db} is read-only: make it and its directory writable for the ETL"
    assert failed.returncode == etl.EXIT_FAILED
    assert failed.stderr.startswith(f"etl.py: error: {cause} ([Errno 30] Read-only file system:")
    assert cause in failed.event("store unusable")["error"]
    small_disk.remount("rw")
    assert integrity(db) == "ok"
    assert previous_data(db) == before
    assert run_real(db, SAMPLE).returncode == 0


# --- a writer holding the lock ----------------------------------------------------------------


def test_a_writer_holding_the_lock_mid_run_fails_it_naming_the_busy_timeout(
    live_server: Any, store_path: Path, feed: Path, loaded: Path
) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    env = {"KASPARRO_BUSY_TIMEOUT": "3", "KASPARRO_BATCH_ROWS": "5000"}
    proc = start_faulty(store_path, f"csv:{feed}", **env, FAULT_AFTER_BATCHES="1", FAULT_THEN="pause")
    events: list[dict[str, Any]] = []
    read_events_until(proc, "fault paused", events)
    before = previous_data(store_path)
    with write_transaction_held(store_path):
        proc.stdin.write("\n")
        proc.stdin.flush()
        # The next batch waits out the timeout and fails; its record waits for the lock released here.
        read_events_until(proc, "source failed", events)
    stdout, stderr = proc.communicate(timeout=60)
    failed = finished(proc.returncode, "\n".join(json.dumps(e) for e in events) + "\n" + stdout, stderr)
    cause = f"the store {store_path} is locked by another writer for longer than KASPARRO_BUSY_TIMEOUT (3 s)"
    assert_run_failed_with(store_path, server, failed, cause, before)
    assert "SQLite: database is locked" in failed.stderr
    assert_next_run_completes(store_path, feed, loaded)


def test_a_writer_holding_the_lock_at_the_start_fails_the_run_before_it_begins(store_path: Path) -> None:
    before = previous_data(store_path)
    with write_transaction_held(store_path):
        failed = run_real(store_path, SAMPLE, KASPARRO_BUSY_TIMEOUT="1")
    cause = f"the store {store_path} is locked by another writer for longer than KASPARRO_BUSY_TIMEOUT (1 s)"
    assert failed.returncode == etl.EXIT_FAILED
    advice = "end that process, or raise the timeout"
    assert failed.stderr == f"etl.py: error: {cause}: {advice} (SQLite: database is locked)\n"
    assert cause in failed.event("store unusable")["error"]
    assert integrity(store_path) == "ok"
    assert previous_data(store_path) == before


# --- a corrupt store --------------------------------------------------------------------------


def garble_pages(db: Path) -> None:
    """Overwrite every page of the store but the first (its header and schema) with noise."""
    page_size = query(db, "PRAGMA page_size")[0][0]
    data = bytearray(db.read_bytes())
    for start in range(page_size, len(data), page_size):
        data[start + 8 : start + page_size] = bytes((start + i * 37) % 251 for i in range(page_size - 8))
    db.write_bytes(bytes(data))


def damage_header(db: Path) -> None:
    """Keep the header's 'SQLite format 3', garble the page size after it: SQLite says it is no database."""
    data = bytearray(db.read_bytes())
    data[16:18] = b"\x00\x03"
    db.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "sqlite_says"),
    [(damage_header, "file is not a database"), (garble_pages, "database disk image is malformed")],
    ids=["not-a-database", "garbled-pages"],
)  # a file with no SQLite header at all is named by mistake, not damaged: tests/test_cli_inputs.py
def test_a_corrupt_store_fails_the_run_saying_it_is_corrupt(
    store_path: Path, sample_store: Path, damage: Any, sqlite_says: str
) -> None:
    damage(store_path)
    failed = run_real(store_path, SAMPLE)
    cause = f"the store {store_path} is corrupt: restore it from a backup, or move it away to load anew"
    assert failed.returncode == etl.EXIT_FAILED
    assert f"{cause} (SQLite: {sqlite_says})" in failed.stderr
    logged = [e for e in failed.events if e.get("error") or e.get("cause")]
    assert logged and all(cause in (e.get("error") or e["cause"]) for e in logged)
    shutil.copyfile(sample_store, store_path)  # the operator restores the backup
    assert run_real(store_path, SAMPLE).returncode == 0
    assert integrity(store_path) == "ok"


# --- the API's side ---------------------------------------------------------------------------


def sqlite_error(code: int, name: str, message: str) -> sqlite3.OperationalError:
    """An error as SQLite's C API reports it to Python: message, result code and its name."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode, error.sqlite_errorname = code, name
    return error


@pytest.mark.parametrize(
    "error",
    [
        sqlite_error(sqlite3.SQLITE_FULL, "SQLITE_FULL", "database or disk is full"),
        sqlite_error(264, "SQLITE_READONLY_RECOVERY", "attempt to write a readonly database"),
        sqlite_error(1288, "SQLITE_READONLY_CANTINIT", "attempt to write a readonly database"),
        sqlite_error(4874, "SQLITE_IOERR_SHMSIZE", "disk I/O error"),
    ],
    ids=["full", "read-only-recovery", "read-only-cantinit", "shm-size"],
)
def test_a_full_or_read_only_disk_under_a_read_is_a_503_never_a_500(
    make_client: Any, store_path: Path, monkeypatch: pytest.MonkeyPatch, error: sqlite3.Error
) -> None:
    """Reader-side faults no test can cause on demand (SQLite's temporary files or WAL index on such a disk)."""
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))
    real_rows = kasparro.dict_rows

    def failing_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:  # inside /stats' read, in a reader thread
        raise error

    monkeypatch.setattr(kasparro, "dict_rows", failing_rows)
    answer = client.get("/stats")
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == "1"
    monkeypatch.setattr(kasparro, "dict_rows", real_rows)
    assert client.get("/stats").status_code == 200
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (PermissionError(13, "Permission denied", "x.db.etl-lock"), "the ETL's user may not open x.db or a file"),
        (PermissionError(1, "Operation not permitted", "x.db"), "the ETL's user may not open x.db or a file"),
        (OSError(30, "Read-only file system", "x.db.etl-lock"), "the store x.db is read-only"),
        (OSError(28, "No space left on device", "x.db-wal"), "the disk holding x.db is full"),
        (sqlite3.OperationalError("unable to open database file"), "the store x.db cannot be opened"),
    ],
)
def test_a_store_fault_names_its_class_beside_the_original(error: Exception, cause: str) -> None:
    """A file the ETL's user may not open was called read-only, and its fix (make it writable) did not cover an
    unreadable one. (Permission is not tested with a real run: the suite runs as root, whom it does not bind.)"""
    if isinstance(error, sqlite3.Error):
        error.sqlite_errorcode = sqlite3.SQLITE_CANTOPEN
    message = etl.store_fault(error, etl.EtlConfig(db=Path("x.db")))
    assert message.startswith(cause) and message.endswith(f" ({'SQLite: ' * isinstance(error, sqlite3.Error)}{error})")
