"""What etl.py refuses before it writes: empty source items, bad source arguments, a --db that is no store.

Each case runs the real etl.py and checks its exit code, its message, and that the folder of the store holds
exactly what it held before (no store, lock file, -wal or -shm it made, no file changed, no run row).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_store_faults import garble_pages

import etl
from etl_support import ROOT, SmallDisk, etl_env, query, run_etl

SAMPLE = f"csv:{ROOT / 'data' / 'sample.csv'}"


def folder_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of `folder`: its content's digest and modification time."""
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.iterdir())
    }


def run_bare(db: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """etl.py with no SOURCE argument: it takes KASPARRO_SOURCES (absent unless given here)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "etl.py"), "--db", str(db)],
        cwd=ROOT, env=etl_env(**env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# --- KASPARRO_SOURCES and empty SOURCE arguments ----------------------------------------------


@pytest.mark.parametrize("value", [",", " , ", ",,", "coingecko,", ",coingecko", f"{SAMPLE},,coinpaprika", "\t,"])
def test_an_empty_item_of_kasparro_sources_is_a_usage_error_naming_it(tmp_path: Path, value: str) -> None:
    """',' loaded the shipped sample as if KASPARRO_SOURCES were unset (exit 0): the list's items were dropped."""
    db = tmp_path / "store.db"
    result = run_bare(db, KASPARRO_SOURCES=value)
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr.startswith(f"etl.py: error: KASPARRO_SOURCES {value!r} has an empty item"), result.stderr
    assert "separate its sources with single commas" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [None, "", "   "])
def test_an_unset_or_empty_kasparro_sources_loads_the_shipped_sample(tmp_path: Path, value: str | None) -> None:
    db = tmp_path / "store.db"
    result = run_bare(db) if value is None else run_bare(db, KASPARRO_SOURCES=value)
    assert result.returncode == 0, result.stderr
    assert query(db, "SELECT source, rows_loaded FROM run_source") == [("csv:sample", 255)]


@pytest.mark.parametrize("value", ["coingecko,binance", f"{SAMPLE}, replay:coingecko@0"])
def test_a_bad_item_of_kasparro_sources_is_a_usage_error_naming_the_setting(tmp_path: Path, value: str) -> None:
    db = tmp_path / "store.db"
    result = run_bare(db, KASPARRO_SOURCES=value)
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr.startswith("etl.py: error: KASPARRO_SOURCES: "), result.stderr
    assert ("'binance'" if "binance" in value else "'replay:coingecko@0'") in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["", " ", "\t"])
def test_an_empty_source_argument_is_a_usage_error_saying_so(tmp_path: Path, spec: str) -> None:
    db = tmp_path / "store.db"
    result = run_etl(db, SAMPLE, spec)
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: source {spec!r} is empty: give csv:PATH, csv:NAME=PATH, coinpaprika, coingecko or"
        " replay:NAME@RUN_ID\n",
    )
    assert list(tmp_path.iterdir()) == []


# --- source arguments refused before anything is written --------------------------------------


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("replay:coingecko@0", "RUN_ID must be a run's id, a whole number from 1, not '0'"),
        ("replay:coinpaprika@000", "RUN_ID must be a run's id, a whole number from 1, not '000'"),
        ("replay:coingecko@", "RUN_ID must be a run's id, a whole number from 1, not ''"),
        ("replay:coingecko@-1", "RUN_ID must be a run's id, a whole number from 1, not '-1'"),
        ("replay:coingecko@1.0", "RUN_ID must be a run's id, a whole number from 1, not '1.0'"),
        ("replay:coingecko@ 1", "RUN_ID must be a run's id, a whole number from 1, not ' 1'"),
        ("replay:coingecko@١", "RUN_ID must be a run's id, a whole number from 1, not '١'"),
        ("replay:coingecko", "it names no run: expected replay:NAME@RUN_ID"),
        ("replay:coingecko@99", "holds no run 99"),
        ("replay:coinpaprika@1", "run 1 kept no raw payload of coinpaprika"),
        ("coingecko:x", "unknown source"),
        ("coingecko@1", "unknown source"),
        ("CoinGecko", "unknown source"),
        (" coinpaprika", "unknown source"),
        ("replay:binance@1", "unknown source"),
        ("replay:csv:sample@1", "unknown source"),
    ],
)
def test_a_bad_source_argument_is_a_usage_error_that_writes_nothing(store_path: Path, spec: str, problem: str) -> None:
    """replay:coingecko@0 made a failed run (exit 1, a run row) out of a run id no run can have."""
    before = folder_state(store_path.parent)
    result = run_etl(store_path, spec)
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr.startswith("etl.py: error: ") and problem in result.stderr, result.stderr
    assert spec in result.stderr
    assert folder_state(store_path.parent) == before


def test_a_replay_against_a_store_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    result = run_etl(db, "replay:coingecko@1")
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: source 'replay:coingecko@1' replays a run of the store {str(db)!r}, which does not exist\n",
    )
    assert list(tmp_path.iterdir()) == []


# --- a --db that is no store ------------------------------------------------------------------


def sqlite_file(path: Path, *, wal: bool) -> Path:
    """Another program's SQLite database: a table of its own."""
    with sqlite3.connect(path) as conn:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE note (body TEXT)")
        conn.execute("INSERT INTO note VALUES ('mine')")
    conn.close()
    return path


@pytest.mark.parametrize(
    ("make", "begins"),
    [
        (lambda path: path.write_bytes((ROOT / "data" / "sample.csv").read_bytes()), "id,symbol,name,r"),
        (lambda path: path.write_bytes(b"not a store at all " * 1000), "not a store at a"),
        (lambda path: path.write_bytes(b"hello"), "hello"),
        (lambda path: path.write_bytes(b"SQLite format 2\x00" + bytes(4096)), "SQLite format 2"),
    ],
    ids=["csv", "text", "short", "near-header"],
)
def test_a_file_that_is_not_sqlite_is_a_usage_error_and_stays_untouched(tmp_path: Path, make, begins: str) -> None:
    """--db data/sample.csv said the store was corrupt (to restore from a backup) and left a lock file beside it."""
    db = tmp_path / "feed.csv"
    make(db)
    before = folder_state(tmp_path)
    for args, env in ((["--db", str(db)], {}), ([], {"KASPARRO_DB": str(db)})):
        result = subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), *args, SAMPLE],
            cwd=ROOT, env=etl_env(**env), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == etl.EXIT_USAGE, result.stderr
        assert result.stderr.startswith(
            f"etl.py: error: the store {str(db)!r} is not an SQLite database, so not a Kasparro store (it begins"
            f" {begins!r}):"
        ), result.stderr
        assert "name the store's file with --db or KASPARRO_DB" in result.stderr
        assert folder_state(tmp_path) == before


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_another_programs_sqlite_database_is_a_usage_error_and_stays_untouched(tmp_path: Path, wal: bool) -> None:
    """It got the store's tables added beside its own, and a sample load."""
    db = sqlite_file(tmp_path / "notes.db", wal=wal)
    before = folder_state(tmp_path)
    result = run_etl(db, SAMPLE)
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: the store {str(db)!r} is an SQLite database but not a Kasparro store (it holds the table"
        " note and no run records): name the store's file with --db or KASPARRO_DB\n",
    )
    assert folder_state(tmp_path) == before
    assert query(db, "SELECT name FROM sqlite_master") == [("note",)]


def test_another_programs_database_ends_a_schedule_as_a_usage_error_leaving_no_lock_file(tmp_path: Path) -> None:
    db = sqlite_file(tmp_path / "notes.db", wal=False)
    before = folder_state(tmp_path)
    result = run_etl(db, "--every", "60", SAMPLE)
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert "is an SQLite database but not a Kasparro store" in result.stderr
    assert folder_state(tmp_path) == before


def test_the_writer_lock_says_whether_it_made_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run removes the lock file it made when it ends before it begins, and only that one: it learnt whether it
    made the file by looking before it locked, and a file another run removed in between (ending early itself) was
    made again, taken for the one seen, and left behind."""
    db = tmp_path / "kasparro.db"
    lock = etl.lock_path(db)
    fd, made = etl.acquire_lock(db)
    os.close(fd)
    assert made and lock.exists()
    fd, made = etl.acquire_lock(db)
    os.close(fd)
    assert not made and lock not in etl.run_made(db, made)
    real_open = os.open

    def removed_once_seen(path: Any, flags: int, *args: Any) -> int:  # the other run's remove_created, at that moment
        try:
            return real_open(path, flags, *args)
        except FileExistsError:
            os.unlink(path)
            raise

    monkeypatch.setattr(etl.os, "open", removed_once_seen)
    fd, made = etl.acquire_lock(db)
    monkeypatch.undo()
    os.close(fd)
    assert made and lock in etl.run_made(db, made)
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere.lock")  # dangling: its target is made, and is not the run's to remove
    fd, made = etl.acquire_lock(db)
    os.close(fd)
    assert not made and (tmp_path / "elsewhere.lock").read_text() == str(os.getpid())


def test_a_store_newer_than_the_etl_is_refused_leaving_no_lock_file(store_path: Path) -> None:
    with sqlite3.connect(store_path) as conn:
        conn.execute(f"PRAGMA user_version = {etl.SCHEMA_VERSION + 1}")
    conn.close()
    before = folder_state(store_path.parent)
    result = run_etl(store_path, SAMPLE)
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: store schema version {etl.SCHEMA_VERSION + 1} is newer than this etl.py"
        f" ({etl.SCHEMA_VERSION})\n",
    )
    assert folder_state(store_path.parent) == before


def test_a_corrupt_store_fails_the_run_leaving_no_lock_file(store_path: Path) -> None:
    """A store whose pages are damaged is still a store: the run fails (exit 1) as the corrupt store's."""
    garble_pages(store_path)
    before = folder_state(store_path.parent)
    result = run_etl(store_path, SAMPLE)
    assert result.returncode == etl.EXIT_FAILED
    assert f"the store {store_path} is corrupt" in result.stderr
    assert folder_state(store_path.parent) == before


@pytest.mark.parametrize("store", ["none", "sample", "not-sqlite"])
def test_a_read_only_folder_fails_or_refuses_the_run_and_keeps_its_files(
    small_disk: SmallDisk, sample_store: Path, store: str
) -> None:
    read_only_folder = small_disk.folder
    db = read_only_folder / "kasparro.db"
    if store == "sample":
        db.write_bytes(sample_store.read_bytes())
    elif store == "not-sqlite":
        db.write_bytes(b"symbol,name\n")
    small_disk.remount("ro")
    before = folder_state(read_only_folder)
    result = run_etl(db, SAMPLE)
    if store == "not-sqlite":
        assert result.returncode == etl.EXIT_USAGE, result.stderr
        assert "is not an SQLite database" in result.stderr
    else:
        assert result.returncode == etl.EXIT_FAILED, result.stderr
        assert f"the store {db} is read-only" in result.stderr
    assert folder_state(read_only_folder) == before
