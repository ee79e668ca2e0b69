"""The peers `just bench` compares Kasparro with answer the benchmark's pages with Kasparro's assets, in its order."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import peers
import pytest

from etl_support import run_etl
from stores import read_only_uri

ROWS = 300  # several pages, and inactive assets among them (every 97th)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peers")


@pytest.fixture(scope="module")
def kasparro_store(out: Path) -> Path:
    db = out / "kasparro.db"
    loaded = run_etl(db, f"csv:{peers.bench_csv(ROWS, out)}")
    assert loaded.returncode == 0, loaded.stderr
    return db


def csv_pages(path: Path) -> dict[str, list[str]]:
    """The two scenarios' pages computed from the CSV itself: by rank; active ones by market cap, descending."""
    with path.open(newline="") as snapshot:
        rows = list(csv.DictReader(snapshot))
    by_rank = sorted(rows, key=lambda row: int(row["rank"]))
    active = [row for row in rows if row["status"] == "active"]
    by_cap = sorted(active, key=lambda row: -float(row["market_cap_usd"]))
    return {"first-page": [row["id"] for row in by_rank[:100]], "filtered-sorted": [row["id"] for row in by_cap[:100]]}


def test_every_peer_serves_kasparros_pages(out: Path, kasparro_store: Path, live_server: Any) -> None:
    kasparro = live_server(kasparro_store)
    expected = peers.kasparro_pages(kasparro_store, int(kasparro.base.rsplit(":", 1)[1]))
    assert expected == csv_pages(out / f"etl-{ROWS}.csv")

    for peer in peers.PEERS:
        store, _ = peer.build(ROWS, out)
        with peers.serve(peer, store, out) as server:
            assert peers.differences(peer, server.port, expected) == []
            # The comparison sees order: the same assets as another page's are not that page.
            wrong_page = dataclasses.replace(peer, paths={"first-page": peer.paths["filtered-sorted"]})
            assert len(peers.differences(wrong_page, server.port, expected)) == 1


def test_a_store_whose_path_a_bare_file_uri_misreads_is_read_where_it_is(
    out: Path, kasparro_store: Path, live_server: Any, tmp_path: Path
) -> None:
    """'?' starts a URI's query, '#' its fragment, '%' an escape: f"file:{db}?mode=ro" opened another file, made it
    (read-write: the mode was in the fragment), and found no table in it. Datasette (0.65.5) opens its store so
    too, and is left out here."""
    stores = tmp_path / "stores"
    folder = stores / "a?b#c%41 d"
    folder.mkdir(parents=True)
    db = Path(shutil.copy(kasparro_store, folder / "kasparro.db"))
    with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
        assert conn.execute("SELECT count(*) FROM source_map").fetchone() == (ROWS,)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM source_map")
    assert [path.name for path in stores.iterdir()] == [folder.name]
    shutil.copy(out / f"etl-{ROWS}.csv", folder)
    kasparro = live_server(db)
    expected = peers.kasparro_pages(db, int(kasparro.base.rsplit(":", 1)[1]))
    (fastapi,) = (peer for peer in peers.PEERS if peer.name == "fastapi")
    store, _ = fastapi.build(ROWS, folder)
    with peers.serve(fastapi, store, folder) as server:
        assert peers.differences(fastapi, server.port, expected) == []


def test_a_store_is_reused_while_its_key_holds_and_replaced_when_it_changes(tmp_path: Path) -> None:
    loads: list[Path] = []

    def load(path: Path) -> None:
        loads.append(path)
        path.write_text(path.name)

    first, note = peers.cached(tmp_path, "peer-x", "300-aaa", ".db", load)
    assert note.startswith("built peer-x-300-aaa.db") and first.read_text() == "peer-x-300-aaa.db.building"
    assert peers.cached(tmp_path, "peer-x", "300-aaa", ".db", load) == (first, "reused peer-x-300-aaa.db")
    other_rows, _ = peers.cached(tmp_path, "peer-x", "3000-aaa", ".db", load)
    changed, _ = peers.cached(tmp_path, "peer-x", "300-bbb", ".db", load)
    assert len(loads) == 3
    assert sorted(path.name for path in tmp_path.iterdir()) == [changed.name, other_rows.name]
