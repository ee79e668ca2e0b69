"""What etl.py refuses before it writes: empty source items, bad source arguments, a --db that is no store.

Each case runs the real etl.py and checks its exit code, its message, and that the folder of the store holds
exactly what it held before (no store, lock file, -wal or -shm it made, no file changed, no run row).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import etl
from etl_support import ROOT, etl_env, query, run_etl

SAMPLE = f"csv:{ROOT / 'data' / 'sample.csv'}"


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


@pytest.mark.parametrize("value", ["coingecko,binance", f"{SAMPLE}, binance"])
def test_a_bad_item_of_kasparro_sources_is_a_usage_error_naming_the_setting(tmp_path: Path, value: str) -> None:
    db = tmp_path / "store.db"
    result = run_bare(db, KASPARRO_SOURCES=value)
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr.startswith("etl.py: error: KASPARRO_SOURCES: "), result.stderr
    assert "'binance'" in result.stderr
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
