"""Instructions of a run's retention step (etl.prune_history) at 15,000 listings, this tree's against another commit's.

Builds stores of 7,500 coins, each listed by two sources (bench/history.py's Market), holding --hours of hourly
snapshots (loaded through etl.Loader in process, pruned with the default retention), then counts with valgrind's
cachegrind (hash seed fixed: a figure other work on the machine does not change) the instructions of a run's
retention step in a steady state: one prune_history after each source's load, nothing left to move. The commit's
etl.py (--before, default HEAD) runs against the same store; its prune_history may take the source's name.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from history import SOURCES, Market  # noqa: E402
from history_reads import cachegrind  # noqa: E402

import etl  # noqa: E402

OUT = ROOT / "bench" / "out" / "retention"
END = int(datetime(2026, 11, 20, 12, tzinfo=UTC).timestamp())
RUNS = 5  # steady runs counted, less none


def build(db: Path, hours: int) -> None:
    """A store of `hours` hourly snapshots of every listing up to END, each source's load pruned as a run's."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    conn = etl.connect(db, 60)
    etl.apply_schema(conn)
    run_id = etl.start_run(conn, [etl.CsvSource(Path(f"{name}.csv"), name) for name in SOURCES])
    market = Market(7_500)
    for t in range(END - hours * etl.HOUR, END, etl.HOUR):
        market.move()
        rows = market.rows(etl.format_time(datetime.fromtimestamp(t, UTC)))
        for name in SOURCES:
            batch = etl.Batch(observations=rows, read=len(rows), end=etl.ReadPosition(0, len(rows)), final=True)
            with etl.Loader(conn, run_id, name) as loader:
                loader.commit(batch, f"simulated {t}", batch.end, complete=True)
            etl.prune_history(conn, run_id, etl.Retention())
    etl.end_run(conn, run_id, "success", 0, None)
    conn.close()


def child(module: Path, db: Path, runs: int) -> None:
    """Open a copy of the store with `module`'s etl.py, settle it with one run's retention step, then do `runs`."""
    spec = importlib.util.spec_from_file_location("etl_measured", module)
    measured = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(measured)
    measured.SCHEMA_PATH = ROOT / "store.sql"
    conn = measured.connect(db, 60)
    measured.apply_schema(conn)
    run_id = measured.start_run(conn, [measured.CsvSource(Path(f"{name}.csv"), name) for name in SOURCES])
    by_source = "source" in inspect.signature(measured.prune_history).parameters
    for _ in range(runs + 1):
        for name in SOURCES:
            measured.prune_history(conn, run_id, *([name] if by_source else []), measured.Retention())


def instructions(module: Path, db: Path, runs: int) -> int:
    copy = OUT / "counted.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)
    shutil.copy(db, copy)
    return cachegrind([sys.executable, __file__, "--child", str(module), "--db", str(copy), "--runs", str(runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, nargs="+", default=[24, 96], help="history of each store, in hours")
    parser.add_argument("--before", default="HEAD", help="the commit whose etl.py is counted too")
    parser.add_argument("--rebuild", action="store_true", help="build the stores again even if they are there")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.db, args.runs)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        before = Path(folder) / "etl.py"
        before.write_bytes(subprocess.run(["git", "show", f"{args.before}:etl.py"], cwd=ROOT, capture_output=True,
                                          check=True).stdout)  # fmt: skip
        for hours in args.hours:
            db = OUT / f"{hours}h.db"
            if args.rebuild or not db.exists():
                build(db, hours)
            for label, module in ((args.before, before), ("this tree", ROOT / "etl.py")):
                per_run = (instructions(module, db, RUNS) - instructions(module, db, 0)) / RUNS
                print(f"{hours} h of history, {label}: {per_run / 1e6:.1f} M instructions a run's retention step"
                      f" ({len(SOURCES)} sources, 15,000 listings)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
