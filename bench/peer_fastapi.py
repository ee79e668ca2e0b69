"""The seed's stack, as a peer for `just bench`: FastAPI + pydantic + aiosqlite over its own SQLite table.

A plain FastAPI app as a developer of that stack writes it: pydantic models, one aiosqlite connection
opened at startup, COUNT + LIMIT/OFFSET per request, indexes on the two sort orders the benchmark asks
for. `load_csv` is its loader. Serve: `PEER_DB=path uvicorn peer_fastapi:app --app-dir bench`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import aiosqlite
from fastapi import FastAPI, HTTPException, Query, Request
from pydantic import BaseModel

from stores import read_only_uri

SCHEMA = """
CREATE TABLE assets (
    asset_id       TEXT PRIMARY KEY,
    symbol         TEXT NOT NULL,
    name           TEXT NOT NULL,
    rank           INTEGER,
    price_usd      REAL,
    market_cap_usd REAL,
    volume_24h_usd REAL,
    change_24h_pct REAL,
    status         TEXT NOT NULL,
    source         TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE INDEX ix_assets_rank ON assets (rank);
CREATE INDEX ix_assets_market_cap ON assets (market_cap_usd);
"""
COLUMNS = """asset_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct, status,
    source, updated_at"""
SORTABLE = {"rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct", "symbol", "name", "updated_at"}
FILTERABLE = {"asset_id", "symbol", "name", "status", "source"}


# --- loading --------------------------------------------------------------


def number(text: str) -> float | None:
    return float(text) if text else None


def load_csv(csv_path: Path, db_path: Path) -> int:
    """Load a market snapshot CSV (bench/gen_csv.py's columns) into a new store at db_path; return the rows."""
    source = f"csv:{csv_path.stem}"
    with csv_path.open(newline="", encoding="utf-8") as snapshot, contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.executescript(SCHEMA)
        rows = (
            (
                row["id"], row["symbol"].upper(), row["name"], int(row["rank"]) if row["rank"] else None,
                number(row["price_usd"]), number(row["market_cap_usd"]), number(row["volume_24h_usd"]),
                number(row["change_24h_pct"]), row["status"], source, row["last_updated"],
            )
            for row in csv.DictReader(snapshot)
        )  # fmt: skip
        with conn:
            return conn.executemany(f"INSERT INTO assets ({COLUMNS}) VALUES ({', '.join('?' * 11)})", rows).rowcount


# --- API ------------------------------------------------------------------


class Asset(BaseModel):
    asset_id: str
    symbol: str
    name: str
    rank: int | None
    price_usd: float | None
    market_cap_usd: float | None
    volume_24h_usd: float | None
    change_24h_pct: float | None
    status: str
    sources: list[str]
    updated_at: str


class AssetPage(BaseModel):
    request_id: str
    api_latency_ms: float
    data: list[Asset]
    page: int
    page_size: int
    total_items: int
    total_pages: int


def to_asset(row: sqlite3.Row) -> Asset:
    fields = dict(row)
    source = fields.pop("source")
    return Asset(**fields, sources=[source])


def where_clause(filter_by: str | None) -> tuple[str, list[str]]:
    """`status:active,symbol:BTC` (a bare word means status) as a WHERE clause and its parameters."""
    clauses, params = [], []
    for condition in filter(None, (filter_by or "").split(",")):
        field, colon, value = condition.partition(":")
        if not colon:
            field, value = "status", condition
        if field not in FILTERABLE:
            raise HTTPException(400, f"cannot filter by {field!r}; use one of {sorted(FILTERABLE)}")
        clauses.append(f"{field} = ?")
        params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def order_clause(sort: str) -> str:
    column = sort.removeprefix("-")
    if column not in SORTABLE:
        raise HTTPException(400, f"cannot sort by {column!r}; use one of {sorted(SORTABLE)}")
    return f"{column} {'DESC' if sort.startswith('-') else 'ASC'}, asset_id"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with aiosqlite.connect(read_only_uri(app.state.db_path), uri=True) as db:
        db.row_factory = aiosqlite.Row
        app.state.db = db
        yield


def create_app(db_path: str) -> FastAPI:
    app = FastAPI(title="Market data (FastAPI peer)", lifespan=lifespan)
    app.state.db_path = db_path

    @app.get("/data")
    async def list_assets(
        request: Request,
        page: Annotated[int, Query(ge=1)] = 1,
        page_size: Annotated[int, Query(ge=1, le=100)] = 10,
        filter_by: str | None = None,
        sort: str = "rank",
    ) -> AssetPage:
        started = time.perf_counter()
        where, params = where_clause(filter_by)
        order = order_clause(sort)
        db: aiosqlite.Connection = request.app.state.db
        async with db.execute(f"SELECT COUNT(*) FROM assets{where}", params) as cursor:
            (total,) = await cursor.fetchone()
        query = f"SELECT {COLUMNS} FROM assets{where} ORDER BY {order} LIMIT ? OFFSET ?"
        async with db.execute(query, [*params, page_size, (page - 1) * page_size]) as cursor:
            rows = await cursor.fetchall()
        return AssetPage(
            request_id=str(uuid.uuid4()),
            api_latency_ms=round((time.perf_counter() - started) * 1000, 3),
            data=[to_asset(row) for row in rows],
            page=page,
            page_size=page_size,
            total_items=total,
            total_pages=math.ceil(total / page_size),
        )

    return app


app = create_app(os.environ.get("PEER_DB", "peer.db"))
