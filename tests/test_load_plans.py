"""The statements a load runs for every batch seek into the store's tables, never scan one: a scan's cost grows with
the store, so a load's would grow with the square of it."""

from __future__ import annotations

import inspect
import re
import sqlite3
from pathlib import Path

import etl
from etl_support import ROOT, run_etl

SAMPLE = ROOT / "data" / "sample.csv"


def per_batch_statements() -> dict[str, str]:
    """Every statement of the load section that Loader runs, by its name in etl.py."""
    names = set(re.findall(r"\.execute(?:many)?\(\s*([A-Z][A-Z_]+)\b", inspect.getsource(etl.Loader)))
    return {name: getattr(etl, name) for name in sorted(names)}


def bound(conn: sqlite3.Connection, sql: str) -> tuple:
    """Parameters enough for `sql`: numbers, which every parameter of these statements may take."""
    for count in range(16):
        try:
            conn.execute("EXPLAIN " + sql, (3600,) * count)
            return (3600,) * count
        except sqlite3.ProgrammingError:
            continue
    raise AssertionError(f"no parameter count fits {sql}")


def scanned_tables(conn: sqlite3.Connection, sql: str) -> set[str]:
    """The tables and indexes of the main database (not its schema) whose every entry the statement visits (a cursor
    on them rewound or sent to its end)."""
    roots = dict(conn.execute("SELECT rootpage, name FROM main.sqlite_schema WHERE rootpage > 0"))
    program = conn.execute("EXPLAIN " + sql, bound(conn, sql)).fetchall()
    opened = {
        p1: roots[p2]
        for _, op, p1, p2, p3, *_ in program
        if op in ("OpenRead", "OpenWrite") and p3 == 0 and p2 in roots
    }
    return {opened[p1] for _, op, p1, *_ in program if op in ("Rewind", "Last") and p1 in opened}


def test_no_statement_of_a_batch_scans_a_table_of_the_store(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{SAMPLE}").returncode == 0
    statements = per_batch_statements()
    assert {"CLOSE_CANDLES", "DROP_CLOSED", "UPSERT_LISTINGS", "INSERT_OBSERVATIONS"} <= statements.keys()
    conn = sqlite3.connect(db)
    conn.executescript(etl.STAGING_DDL)
    scans = {name: tables for name, sql in statements.items() if (tables := scanned_tables(conn, sql))}
    assert scans == {}
