"""etl.py's command line, its store connection failing the way a machine fails it (for the fault tests).

`python tests/faulty_etl.py ARGS` runs `etl.main(ARGS)` as `python etl.py ARGS` would, with the fault
that these environment variables choose set on the ETL's own connection (SQLite's page limit and
query_only belong to a connection, not to the file, so no other process can set them):

  FAULT_MAX_PAGES=N        the store can grow by N pages beyond its size at the start of the run;
                           past that SQLite answers "database or disk is full", as on a full disk
  FAULT_AFTER_BATCHES=K    after K committed batches, FAULT_THEN happens:
  FAULT_THEN=read-only     the store can no longer be written ("attempt to write a readonly database")
  FAULT_THEN=pause         log {"event": "fault paused"} and wait for a line on stdin, then go on
  FAULT_PAUSE_IN=NAME      pause so (log, then wait for a line on stdin) as etl.NAME begins: apply_schema, end_wal
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import etl


def connect(db: Path, busy_timeout: float) -> sqlite3.Connection:
    conn = real_connect(db, busy_timeout)
    if "FAULT_MAX_PAGES" in os.environ:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + int(os.environ['FAULT_MAX_PAGES'])}")
    return conn


def pause() -> None:
    print(json.dumps({"event": "fault paused"}), flush=True)
    sys.stdin.readline()


def paused(function: Callable[..., Any]) -> Callable[..., Any]:
    def pausing(*args: Any, **kwargs: Any) -> Any:
        pause()
        return function(*args, **kwargs)

    return pausing


def commit(loader: etl.Loader, *args: Any, **kwargs: Any) -> int:
    loaded = real_commit(loader, *args, **kwargs)
    committed[0] += 1
    if committed[0] == int(os.environ.get("FAULT_AFTER_BATCHES", "0")):
        if os.environ["FAULT_THEN"] == "read-only":
            loader.conn.execute("PRAGMA query_only = 1")
        else:
            pause()
    return loaded


real_connect, real_commit, committed = etl.connect, etl.Loader.commit, [0]
etl.connect = connect
etl.Loader.commit = commit
if "FAULT_PAUSE_IN" in os.environ:
    setattr(etl, os.environ["FAULT_PAUSE_IN"], paused(getattr(etl, os.environ["FAULT_PAUSE_IN"])))

if __name__ == "__main__":
    sys.exit(etl.main())
