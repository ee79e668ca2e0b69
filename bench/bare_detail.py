"""Bare ASGI apps answering GET /data/{asset_id} with nothing but the read: bounds for bench/detail_bounds.py.

BARE_READ=composed: kasparro.read_asset on one connection, encoded, the read the API does for an uncached
lookup, without Falcon, request ids, ETag checks, metrics or the answer cache.
BARE_READ=body: one SELECT of a body stored per asset (BARE_BODIES, a table asset_id -> body), as if
etl.py wrote each asset's detail with its rows.

Both read KASPARRO_DB (or BARE_BODIES) in one read transaction per READS_PER_TRANSACTION requests, as the
API's inline reads share one per slice.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import kasparro
from bench import ceiling
from bench.stores import read_only_uri

READS_PER_TRANSACTION = 32
DETAIL_PREFIX = "/data/"
MODE = os.environ.get("BARE_READ", "composed")
DB = os.environ["BARE_BODIES"] if MODE == "body" else os.environ["KASPARRO_DB"]
conn = sqlite3.connect(read_only_uri(DB), uri=True, isolation_level=None, check_same_thread=False)
version = kasparro.DataVersion("bare", 0)
served = 0


def read(asset_id: str) -> bytes | None:
    if MODE == "body":
        row = conn.execute("SELECT body FROM body WHERE asset_id = ?", (asset_id,)).fetchone()
        return None if row is None else row[0]
    detail = kasparro.read_asset(conn, version, asset_id)
    return None if detail is None else kasparro.encode(detail)


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    global served
    if scope["type"] != "http" or not scope["path"].startswith(DETAIL_PREFIX):
        return await ceiling.app(scope, receive, send)  # lifespan, and the ready check on /
    if served % READS_PER_TRANSACTION == 0:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("BEGIN")
    served += 1
    body = read(scope["path"][len(DETAIL_PREFIX) :])
    status, body = (200, body) if body is not None else (404, b"{}")
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
