"""One filtered /data page in process, per filter_by: what a text filter costs, by the path it takes.

A store of --rows generated assets (bench/api_bench.py's, loaded by the real etl.py and reused) is copied, and
one name in a hundred is given letters beyond ASCII (Über n, GROẞ n), so that the folds of texts beyond ASCII are
read as often as a real market would make them. Each filter's page (its count, then its rows, nothing kept
between reads) is read --reads times on one connection as the API opens them; the median and the least are
printed in ms. `--api DIR` reads with the kasparro.py of another checkout (its `git worktree` or an export of
a commit), to set two versions side by side on the same store.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

from api_bench import OUT, ROOT, build_store

from stores import read_only_uri

FILTERS = (
    "name:quaneon 1|misparo 2",  # ASCII: the name index
    "name:gross 5",  # ASCII with ss: its spellings with ß and ẞ in the index
    "symbol:ssx",
    "symbol:ẞX",
    "name:Über 3",  # beyond ASCII: fold() of the names beyond ASCII
    "name~quaneon",  # no s or i: LIKE alone
    "name~coin",  # LIKE alone
    "name~coins",  # an s: LIKE, and fold() of the names beyond ASCII
    "name~über",
    "source:csv:etl-100000",
    "source:CSV:ÉTÉ",
)


def load_api(folder: Path) -> ModuleType:
    """kasparro.py of `folder`, imported as kasparro."""
    spec = importlib.util.spec_from_file_location("kasparro", folder / "kasparro.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kasparro"] = module
    spec.loader.exec_module(module)
    return module


def letters_store(rows: int) -> Path:
    """A copy of the generated store with one name in a hundred beyond ASCII."""
    source, _ = build_store(rows, ROOT)
    db = OUT / f"filter-pages-{rows}.db"
    shutil.copyfile(source, db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE asset SET name = 'Über ' || rank, symbol = 'ÜB' || (rank % 7) WHERE rank % 100 = 3")
        conn.execute("UPDATE asset SET name = 'GROẞ ' || rank WHERE rank % 1000 = 5")
    return db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=21)
    parser.add_argument("--api", type=Path, default=ROOT, help="the checkout whose kasparro.py reads")
    args = parser.parse_args()
    api = load_api(args.api)
    db = letters_store(args.rows)
    conn = sqlite3.connect(read_only_uri(db), uri=True, isolation_level=None, detect_types=api.COLUMN_TYPES)
    api.Store._read_only(conn, 1000)
    for text in FILTERS:
        query = api.parse_asset_query({"filter_by": text.replace("100000", str(args.rows))})
        times = []
        for _ in range(args.reads):
            version = api.read_version(conn)
            start = time.perf_counter()
            page = api.read_page(conn, version, query, api.Commit(0, version))
            times.append(time.perf_counter() - start)
        median, least = statistics.median(times) * 1000, min(times) * 1000
        print(f"{text:26} {median:9.2f} ms (least {least:.2f})  matching {page.total_items:,}", flush=True)


if __name__ == "__main__":
    main()
