"""`just bench-apply-wait`: how long Litestream's follower waits for its apply lock while one process reads.

A rollback-journal copy, as deploy/litestream/follow leaves it; in this process, N threads each run read
transactions on their own connection back to back, as a replica API's readers do under load; a child
process takes the lock Litestream's follower applies a commit under (PENDING, then the SHARED range, each
write-locked and waited for, as its LockFileExclusive does), holds it 5 ms, lets go, 10 times. SQLite lets a
connection join a shared lock its process already holds without looking at PENDING, so while the readers
overlap, the process never lets go of the copy and the apply waits for a gap. Prints, per N, the waits and the
read transactions per second, for each way the readers may begin (--gate): as they please (none), one at a time in
the process (serial: a lock around each read transaction), or once no apply is pending (probe: kasparro's
after_apply, which a replica's API uses).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kasparro import after_apply

PENDING_BYTE = 0x40000000  # SQLite's lock bytes: PENDING, then the SHARED range after RESERVED
SHARED_RANGE = (PENDING_BYTE + 2, 510)
APPLIES = 10
HOLD = 0.005  # seconds an apply holds the lock
BETWEEN = 0.05  # seconds between two applies
ROWS = 200_000
GATES = ("none", "serial", "probe")


def take_lock(copy: Path, give_up: float) -> None:
    """The child: take and release the apply lock APPLIES times; print each wait in seconds (give_up: gave up)."""
    with copy.open("r+b") as file:
        for _ in range(APPLIES):
            started = time.monotonic()
            waited = None
            while waited is None and time.monotonic() - started < give_up:
                try:
                    fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, PENDING_BYTE)
                except OSError:
                    time.sleep(0.001)  # a reader's momentary read lock on PENDING: try again
                    continue
                while waited is None and time.monotonic() - started < give_up:
                    try:
                        fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, SHARED_RANGE[1], SHARED_RANGE[0])
                        waited = time.monotonic() - started
                    except OSError:
                        time.sleep(0.001)  # readers still hold the SHARED range
            print(give_up if waited is None else waited, flush=True)
            time.sleep(HOLD)
            fcntl.lockf(file, fcntl.LOCK_UN, SHARED_RANGE[1], SHARED_RANGE[0])
            fcntl.lockf(file, fcntl.LOCK_UN, 1, PENDING_BYTE)
            time.sleep(BETWEEN)


def make_copy(folder: Path) -> Path:
    copy = folder / "copy.db"
    conn = sqlite3.connect(copy)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("CREATE TABLE quote (asset_id INTEGER, price REAL)")
    conn.executemany("INSERT INTO quote VALUES (?, ?)", ((n, n * 1.5) for n in range(ROWS)))
    conn.commit()
    conn.close()
    return copy


def waits_with(copy: Path, readers: int, give_up: float, gate: str, probe: int) -> tuple[list[float], int, float]:
    """The apply's waits while `readers` threads read back to back, the read transactions they made, and seconds."""
    stop = threading.Event()
    reads = [0] * readers
    one_at_a_time = threading.Lock()

    def transaction(conn: sqlite3.Connection, slot: int) -> None:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT sum(price) FROM quote WHERE asset_id % 7 = 0").fetchone()
            reads[slot] += 1
        except sqlite3.OperationalError:  # locked past the busy timeout: the next read tries again
            pass
        conn.execute("ROLLBACK")

    def read(slot: int) -> None:
        conn = sqlite3.connect(copy, timeout=5, isolation_level=None, check_same_thread=False)
        while not stop.is_set():
            if gate == "serial":
                with one_at_a_time:
                    transaction(conn, slot)
            elif gate == "probe":
                with contextlib.suppress(sqlite3.OperationalError):  # still pending after 5 s: the next read tries
                    after_apply(probe, 5.0, transaction, conn, slot)
            else:
                transaction(conn, slot)
        conn.close()

    threads = [threading.Thread(target=read, args=(slot,)) for slot in range(readers)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        child = subprocess.run([sys.executable, __file__, "--lock", str(copy), "--give-up", str(give_up)],
                               capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return [float(line) for line in child.stdout.split()], sum(reads), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4], help="reader threads (default 1 2 4)")
    parser.add_argument("--give-up", type=float, default=10.0, help="seconds an apply waits at most (default 10)")
    parser.add_argument("--gate", choices=GATES, nargs="+", default=list(GATES), help="how reads begin (default all)")
    parser.add_argument("--lock", type=Path, help=argparse.SUPPRESS)  # the child's mode
    args = parser.parse_args()
    if args.lock:
        take_lock(args.lock, args.give_up)
        return
    with tempfile.TemporaryDirectory(prefix="kasparro-apply-wait-") as folder:
        copy = make_copy(Path(folder))
        with copy.open("rb") as probe:  # open while the readers are: closing it drops their locks
            for gate in args.gate:
                for readers in args.readers:
                    waits, reads, took = waits_with(copy, readers, args.give_up, gate, probe.fileno())
                    gave_up = sum(wait >= args.give_up for wait in waits)
                    print(f"gate {gate}, {readers} reader thread(s): {reads / took:,.1f} read transactions/s;"
                          f" apply lock waited p50 {statistics.median(waits) * 1000:,.1f} ms,"
                          f" max {max(waits) * 1000:,.1f} ms; {gave_up} of {len(waits)} gave up after"
                          f" {args.give_up:g} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
