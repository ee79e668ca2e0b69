"""`etl.py --every`: runs repeat, a held lock skips a slot, SIGTERM stops cleanly with exit 0."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import ROOT, etl_env, last_run, query, run_etl, store_content, write_csv, writer_lock_held

SAMPLE = ROOT / "data" / "sample.csv"
WITHIN_S = 120  # generous: the machine is shared; a healthy run takes well under a second


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    """Poll `condition` until it is truthy; fail after WITHIN_S seconds."""
    deadline = time.monotonic() + WITHIN_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {WITHIN_S} s: {what}"
        time.sleep(0.02)
    return value


def runs(db: Path) -> list[tuple[str, str | None]]:
    if not db.exists():
        return []
    try:
        return query(db, "SELECT status, error FROM etl_run ORDER BY run_id")
    except sqlite3.OperationalError:  # the first run has not made the tables yet
        return []


class Schedule:
    """A real `etl.py --every` subprocess whose JSON log lines go to a file (no pipe to fill up)."""

    def __init__(self, db: Path, every: str, *sources: str, **env: str) -> None:
        self.log = db.with_name(f"{db.name}.{time.monotonic_ns()}.log")
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "etl.py"), "--db", str(db), "--every", every, *sources],
                cwd=ROOT, env=etl_env(**env), stdout=out, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip

    def lines(self) -> list[dict[str, Any]]:
        """The complete log lines so far."""
        text = self.log.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]

    def wait_for(self, event: str, count: int = 1) -> dict[str, Any]:
        """The `count`-th line of `event`, once it is written."""

        def seen() -> dict[str, Any] | None:
            matches = [line for line in self.lines() if line["event"] == event]
            assert len(matches) >= count or self.proc.poll() is None, self.log.read_text()[-2000:]
            return matches[count - 1] if len(matches) >= count else None

        return wait_until(seen, f"{event!r} #{count}")

    def stop(self, signum: int = signal.SIGTERM) -> list[dict[str, Any]]:
        """Send `signum`, wait for the exit and return the lines written after the signal."""
        before = len(self.lines())
        self.proc.send_signal(signum)
        self.proc.wait(timeout=WITHIN_S)
        return self.lines()[before:]


@pytest.fixture
def schedule() -> Iterator[Callable[..., Schedule]]:
    """Start Schedules; any still running when the test ends is killed."""
    started: list[Schedule] = []

    def start(db: Path, every: str, *sources: str, **env: str) -> Schedule:
        started.append(Schedule(db, every, *sources, **env))
        return started[-1]

    yield start
    for leftover in started:
        if leftover.proc.poll() is None:
            leftover.proc.kill()
            leftover.proc.wait()


def test_runs_repeat_at_every_slot_until_sigterm(tmp_path, schedule):
    db = tmp_path / "store.db"
    feed = tmp_path / "feed.csv"
    feed.write_bytes(SAMPLE.read_bytes())
    etl_every = schedule(db, "0.2", f"csv:{feed}")
    wait_until(lambda: len(runs(db)) >= 3, "three runs")
    assert query(db, "SELECT detail FROM run_source WHERE run_id = 2")[0][0] == "unchanged since run 1"
    # A file that changes between slots is loaded by the next run.
    feed.write_bytes(SAMPLE.read_bytes().replace(b"\n", b"\r\n"))
    seen = len(runs(db))
    wait_until(lambda: query(db, "SELECT count(*) FROM run_source WHERE run_id > ? AND rows_read > 0", (seen,))[0][0],
               "a run that reads the changed file")  # fmt: skip
    after = etl_every.stop()
    assert etl_every.proc.returncode == etl.EXIT_OK
    assert after[-1]["event"] == "schedule stopped" and after[-1]["signal"] == "SIGTERM"
    *earlier, last = runs(db)
    assert set(earlier) == {("success", None)}
    assert last in (("success", None), ("failed", "stopped by SIGTERM"))  # at 0.2 s, the signal may land in a run
    waits = [line for line in etl_every.lines() if line["event"] == "waiting for the next run"]
    assert len(waits) >= 3 and all(0 <= line["wait_s"] <= 0.2 for line in waits)
    assert query(db, "PRAGMA integrity_check")[0][0] == "ok"


def test_a_slot_whose_lock_is_held_is_skipped_with_a_log_line(tmp_path, schedule):
    db = tmp_path / "store.db"
    with writer_lock_held(db) as holder:
        etl_every = schedule(db, "0.2", f"csv:{SAMPLE}")
        skipped = etl_every.wait_for("run skipped", 2)  # two slots in a row: the schedule lives on
        assert skipped["level"] == "warning"
        assert f"another ETL run (pid {holder})" in skipped["reason"]
        assert runs(db) == []  # a skipped slot writes nothing
    wait_until(lambda: runs(db) == [("success", None)], "a run once the lock is free")
    etl_every.stop()
    assert etl_every.proc.returncode == etl.EXIT_OK


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_waiting_exits_0_at_once(tmp_path, schedule, signum):
    db = tmp_path / "store.db"
    etl_every = schedule(db, "3600", f"csv:{SAMPLE}")
    assert etl_every.wait_for("waiting for the next run")["wait_s"] > 3000
    after = etl_every.stop(signum)  # an hour's wait: only the signal can end it within WITHIN_S
    assert etl_every.proc.returncode == etl.EXIT_OK
    assert [line["event"] for line in after] == ["schedule stopped"]
    assert runs(db) == [("success", None)]


def test_sigterm_between_batches_stops_the_run_and_exits_0_with_a_consistent_store(
    tmp_path, schedule, big_csv, big_clean
):
    db = tmp_path / "store.db"
    etl_every = schedule(db, "3600", f"csv:{big_csv}", LOG_LEVEL="debug", KASPARRO_BATCH_ROWS="10000")
    etl_every.wait_for("batch committed", 2)
    after = etl_every.stop()
    assert etl_every.proc.returncode == etl.EXIT_OK
    assert after[-1]["event"] == "schedule stopped"
    assert runs(db) == [("failed", "stopped by SIGTERM")]
    assert query(db, "PRAGMA integrity_check")[0][0] == "ok"
    # What was committed is exactly what the checkpoint says was read ...
    line = query(db, "SELECT line FROM checkpoint")[0][0]
    stored = query(db, "SELECT count(*) FROM raw_observation")[0][0] + query(db, "SELECT count(*) FROM reject")[0][0]
    assert stored == line - 1 >= 20_000
    # ... and the next run completes it, nothing lost or loaded twice.
    assert run_etl(db, f"csv:{big_csv}").returncode == etl.EXIT_OK
    assert store_content(db) == store_content(big_clean)


def in_write_transaction(db: Path) -> bool:
    """Another connection holds the store's write lock (a BEGIN IMMEDIATE here would wait)."""
    probe = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return True
    finally:
        probe.close()


def test_sigterm_during_a_batch_write_commits_that_batch_then_exits_0(tmp_path, schedule):
    feed = write_csv(tmp_path / "feed.csv", 50_000, bad_every=997)
    clean = tmp_path / "clean.db"
    assert run_etl(clean, f"csv:{feed}").returncode == etl.EXIT_OK
    db = tmp_path / "store.db"
    # The whole file is one batch: one transaction that writes 50k rows for a second or more.
    etl_every = schedule(db, "3600", f"csv:{feed}", KASPARRO_BATCH_ROWS="1000000")
    etl_every.wait_for("run started")  # the run's record is committed; its next write is the batch
    wait_until(lambda: in_write_transaction(db), "the batch's transaction")
    after = etl_every.stop()
    assert etl_every.proc.returncode == etl.EXIT_OK
    assert after[-1]["event"] == "schedule stopped"
    assert query(db, "PRAGMA integrity_check")[0][0] == "ok"
    # The batch in hand was committed with its checkpoint: the whole file is in.
    assert query(db, "SELECT complete FROM checkpoint") == [(1,)]
    # A stopped first load leaves the indexes it dropped to the start of the next run (SPEC, Indexes), and so its
    # retention step (etl.prune_history: the horizons move once a source's load has ended, and its next run does it).
    loaded, expected = store_content(db), store_content(clean)
    later = ("indexes", "horizons")
    assert {k: v for k, v in loaded.items() if k not in later} == {k: v for k, v in expected.items() if k not in later}
    run = last_run(db)
    assert run["status"] in ("failed", "partial") and run["rows_read"] == 50_000
    assert run_etl(db, f"csv:{feed}").returncode == etl.EXIT_OK  # the file is unchanged: nothing more to load
    assert store_content(db) == expected
