"""Run the real etl.py and read a store's content, for the tests."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ETL = ROOT / "etl.py"
sys.path.insert(0, str(ROOT / "bench"))

import etl  # noqa: E402
from gen_csv import write_csv  # noqa: E402
from stores import read_only_uri  # noqa: E402

__all__ = [
    "OBSERVATIONS",
    "ROOT",
    "SmallDisk",
    "etl_against",
    "etl_env",
    "etl_of",
    "kill_mid_load",
    "query",
    "run_etl",
    "start_etl",
    "store_content",
    "wait_for_event",
    "write_csv",
    "writer_lock_held",
]


def etl_env(**extra: str) -> dict[str, str]:
    """The environment of an etl.py subprocess: no inherited KASPARRO_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_") and not k.endswith("_API_KEY")}
    # A test that forgets to point an upstream at its fake gets a refused
    # connection on loopback, never the internet.
    env.update(
        {
            "LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
            "KASPARRO_COINGECKO_URL": "http://127.0.0.1:9",
            "KASPARRO_COINPAPRIKA_URL": "http://127.0.0.1:9",
            "KASPARRO_HTTP_BACKOFF": "0.01",
            # Unpaced in effect: the pacing tests set their own rates.
            "KASPARRO_COINGECKO_RATE": "600000",
            "KASPARRO_COINPAPRIKA_RATE": "600000",
        },
        **extra,
    )
    return env


def run_etl(db: Path, *sources: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run etl.py to the end and return its exit code and output."""
    return subprocess.run(
        [sys.executable, str(ETL), "--db", str(db), *sources],
        cwd=ROOT,
        env=etl_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def etl_against(upstream: Any, db: Path, *sources: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run etl.py with both upstream URLs pointing at a FakeUpstream."""
    return run_etl(
        db,
        *sources,
        KASPARRO_COINGECKO_URL=upstream.base_url,
        KASPARRO_COINPAPRIKA_URL=upstream.base_url,
        **env,
    )


def etl_of(commit: str, workdir: Path) -> Path:
    """The etl.py (and its store.sql) of an earlier commit, written into `workdir`."""
    workdir.mkdir()
    for name in ("etl.py", "store.sql"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], capture_output=True, check=True)
        (workdir / name).write_bytes(shown.stdout)
    return workdir / "etl.py"


def start_etl(db: Path, *sources: str, **env: str) -> subprocess.Popen[str]:
    """Start etl.py with its JSON log lines readable on stdout."""
    return subprocess.Popen(
        [sys.executable, str(ETL), "--db", str(db), *sources],
        cwd=ROOT,
        env=etl_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read rows from a store through a read-only connection."""
    conn = sqlite3.connect(read_only_uri(db), uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# Every kept candle, closed (candle) or open (open_candle): a candle is in exactly one of the two.
CANDLES = "(SELECT * FROM candle UNION ALL SELECT * FROM open_candle)"

# Every kept observation in the store's text form: source, source id, RFC 3339 time, values.
OBSERVATIONS = (
    "SELECT l.source, l.source_id, strftime('%Y-%m-%dT%H:%M:%SZ', o.observed_at, 'unixepoch') AS observed_at,"
    " o.rank, o.price_usd, o.market_cap_usd, o.volume_24h_usd, o.change_24h_pct, o.active"
    " FROM raw_observation o JOIN listing l USING (listing_id)"
)


def store_content(db: Path) -> dict[str, Any]:
    """Everything a run is meant to produce, independent of run ids and timing."""
    return {
        "assets": query(db, "SELECT * FROM asset ORDER BY asset_id"),
        "listings": query(db, "SELECT * FROM source_map ORDER BY source, source_id"),
        "observations": query(db, f"{OBSERVATIONS} ORDER BY l.source, l.source_id, o.observed_at"),
        "candles": query(
            db,
            "SELECT l.source, l.source_id, c.width, c.t, c.open, c.high, c.low, c.close, c.market_cap_usd,"
            f" c.volume_24h_usd, c.observations, c.first_at, c.last_at FROM {CANDLES} c"
            " JOIN listing l USING (listing_id) ORDER BY l.source, l.source_id, c.width, c.t",
        ),
        "horizons": query(
            db, "SELECT source, source_id, raw_before, hourly_before FROM listing ORDER BY source, source_id"
        ),
        "rejects": query(db, "SELECT source, line, reason, raw FROM reject ORDER BY source, line"),
        "checkpoints": query(db, "SELECT source, fingerprint, position, line, complete FROM checkpoint"),
        "indexes": query(db, "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"),
    }


def last_run(db: Path) -> dict[str, Any] | None:
    """The newest etl_run row as a dict."""
    conn = sqlite3.connect(read_only_uri(db), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM etl_run ORDER BY run_id DESC LIMIT 1").fetchone()
        return dict(row) if row else None
    finally:
        conn.close()


@contextlib.contextmanager
def writer_lock_held(db: Path) -> Iterator[int]:
    """Another process holds the ETL's writer lock on `db` (POSIX locks are per process)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import etl, sys; etl.acquire_lock(etl.Path({str(db)!r})); print('held', flush=True);"
         " sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.communicate("")


def wait_for_event(proc: subprocess.Popen[str], event: str, count: int = 1) -> dict[str, Any]:
    """Read an ETL's JSON log lines until `event` has been seen `count` times; return that line."""
    seen = 0
    for line in proc.stdout:
        record = json.loads(line)
        if record["event"] == event:
            seen += 1
            if seen == count:
                return record
    raise AssertionError(f"etl.py ended before {event!r} #{count}: {proc.stderr.read()}")


def kill_mid_load(db: Path, source: str, chooser: random.Random, commits: int, pace: float | None, **env: str) -> float:
    """Start a run of the CSV `source` into `db` and SIGKILL it at a random instant of its load: once it has
    committed `commits` batches, within `pace` seconds (what one batch takes; None: measured on this run, between its
    next two commits). Fails unless the kill landed before the load's end; returns the pace."""
    proc = start_etl(db, source, LOG_LEVEL="debug", **env)
    wait_for_event(proc, "run started")
    for _ in range(commits):
        wait_for_event(proc, "batch committed")
    if pace is None:
        wait_for_event(proc, "batch committed")
        committed = time.monotonic()
        wait_for_event(proc, "batch committed")
        pace = time.monotonic() - committed
    time.sleep(chooser.uniform(0, pace))  # where in the next batch the kill lands, the commits above being the sync
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before its kill"
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    path = Path(source.removeprefix("csv:").split("=", 1)[-1])
    with path.open("rb") as file:
        fingerprint = etl.file_fingerprint(file, path)[0]
    checkpoint = query(db, "SELECT complete FROM checkpoint WHERE fingerprint = ?", (fingerprint,))
    assert checkpoint in ([], [(0,)]), "the kill landed after the load's last batch"
    return pace


@dataclass
class SmallDisk:
    """A tmpfs mounted for one test."""

    folder: Path

    def fill(self) -> None:
        """Take every free byte: no file on the disk can grow."""
        fd = os.open(self.folder / "ballast", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(65536)):
                pass
        except OSError as error:
            assert error.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def remount(self, options: str) -> None:
        """Change the mount's options: `size=64m`, `ro`, `rw`."""
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.folder)], check=True)
