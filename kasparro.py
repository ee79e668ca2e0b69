"""Kasparro API: the unified crypto-asset store served read-only over HTTP (Falcon ASGI)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import logging
import math
import os
import re
import sqlite3
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

import aiosqlite
import falcon
import falcon.asgi
import msgspec
import structlog
from msgspec import Meta

__version__ = "0.3.0"

log = structlog.get_logger("kasparro.api")


# --- config ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Settings of the API, read from the environment in one place."""

    db: Path = Path("kasparro.db")
    etl_max_age: int = 21_600  # seconds after the last good run before /health says degraded
    api_keys: tuple[str, ...] = ()  # empty: the API is open
    log_level: str = "info"
    env: str = "development"
    readers: int = 4  # read-only connections, each with its own thread
    reopen_interval: float = 1.0  # seconds between attempts to open a missing store

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Config:
        """Build the config from the variables of SPEC.md, with its defaults."""
        keys = tuple(k.strip() for k in environ.get("KASPARRO_API_KEYS", "").split(",") if k.strip())
        return cls(
            db=Path(environ.get("KASPARRO_DB", "kasparro.db")),
            etl_max_age=int(environ.get("KASPARRO_ETL_MAX_AGE", "21600")),
            api_keys=keys,
            log_level=environ.get("LOG_LEVEL", "info").lower(),
            env=environ.get("ENV", "development"),
        )


def configure_logging(level: str) -> None:
    """JSON lines on stdout, or readable console lines on a TTY, bound to contextvars."""
    renderer = structlog.dev.ConsoleRenderer() if sys.stdout.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


# --- wire types -----------------------------------------------------------


class Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every response body.

    Frozen, because a body may be cached per data_version and shared between
    requests; unknown fields forbidden, so a client or test decoding with these
    types notices drift; defaults never omitted, so every documented field is
    always present on the wire (null rather than missing).
    """


Usd = Annotated[float | None, Meta(description="US dollars; null when no source gives it")]
Time = Annotated[str, Meta(description="RFC 3339 UTC time", examples=["2026-11-25T12:00:00Z"])]
Status = Literal["active", "inactive"]
RunStatus = Literal["running", "success", "partial", "failed"]
EtlStatus = Literal["success", "partial", "failed", "running", "never_run"]
RequestId = Annotated[str, Meta(description="the request's id, also in the X-Request-ID header")]
LatencyMs = Annotated[float, Meta(ge=0, description="time spent serving the request, in milliseconds")]
PageSize = Annotated[int, Meta(ge=1, le=100, description="assets per page")]
Count = Annotated[int, Meta(ge=0)]


class Asset(Wire, frozen=True):
    """The unified record of one canonical asset."""

    asset_id: Annotated[str, Meta(description="stable slug, never reused", examples=["bitcoin"])]
    symbol: Annotated[str, Meta(description="upper-case ticker; not unique", examples=["BTC"])]
    name: str
    rank: Annotated[int | None, Meta(description="market-cap rank; null when unknown")]
    price_usd: Usd
    market_cap_usd: Usd
    volume_24h_usd: Usd
    change_24h_pct: Annotated[float | None, Meta(description="price change over 24 h, in percent")]
    status: Status
    sources: Annotated[list[str], Meta(description="names of the sources listing the asset")]
    updated_at: Annotated[str, Meta(description="RFC 3339 UTC time of the newest observation")]


class Quote(Wire, frozen=True):
    """The latest observation of an asset by one source (one listing)."""

    source: Annotated[str, Meta(examples=["coingecko", "csv:sample"])]
    source_id: Annotated[str, Meta(description="the source's own id of the coin")]
    symbol: str | None
    name: str | None
    rank: int | None
    price_usd: Usd
    market_cap_usd: Usd
    volume_24h_usd: Usd
    change_24h_pct: float | None
    status: Status | None
    observed_at: Time


class AssetDetail(Asset, frozen=True):
    """The unified record plus the latest quote of each source listing it."""

    quotes: list[Quote]


class AssetPage(Wire, frozen=True):
    """One page of GET /data."""

    request_id: RequestId
    api_latency_ms: LatencyMs
    data: list[Asset]
    page: Annotated[int | None, Meta(ge=1, description="page number; null when a cursor was used")]
    page_size: PageSize
    total_items: Annotated[int, Meta(ge=0, description="assets matching filter_by")]
    total_pages: Count
    next_cursor: Annotated[str | None, Meta(description="opaque token of the next page; null on the last")]
    data_version: Annotated[str, Meta(description="moves exactly when the ETL commits new data")]


class Health(Wire, frozen=True):
    """Readiness of the store and freshness of the ETL."""

    status: Literal["healthy", "degraded", "unhealthy"]
    db_connected: bool
    etl_last_run: Annotated[str | None, Meta(description="end (or start, while running) of the latest run")]
    etl_status: Annotated[EtlStatus | None, Meta(description="null when the store cannot be read")]


class RunTotals(Wire, frozen=True):
    """ETL outcomes summed over every recorded run (of one source, or overall)."""

    runs: Count
    successes: Annotated[int, Meta(ge=0, description="runs ending success or partial")]
    partials: Annotated[int, Meta(ge=0, description="runs ending partial (some rows rejected)")]
    failures: Count
    rows_read: Count
    rows_loaded: Annotated[int, Meta(ge=0, description="new observations stored")]
    rows_rejected: Count
    last_success_at: str | None
    last_failure_at: str | None
    last_error: str | None
    avg_duration_ms: float | None


class SourceTotals(RunTotals, frozen=True):
    """RunTotals of one source."""

    source: str


class RunSourceOutcome(Wire, frozen=True):
    """One source's part of a run."""

    source: str
    status: RunStatus
    started_at: str
    ended_at: str | None
    rows_read: Count
    rows_loaded: Count
    rows_rejected: Count
    duration_ms: int | None
    detail: str | None
    error: str | None
    drift: Annotated[dict[str, int], Meta(description="unknown or missing fields -> times seen")]


class Run(Wire, frozen=True):
    """One recorded ETL run with its per-source outcomes."""

    run_id: int
    status: RunStatus
    started_at: str
    ended_at: str | None
    sources: list[str]
    rows_read: Count
    rows_loaded: Count
    rows_rejected: Count
    duration_ms: int | None
    error: str | None
    pid: int
    host: str
    outcomes: list[RunSourceOutcome]


class Stats(Wire, frozen=True):
    """ETL summary: overall, per source, and the most recent runs."""

    data_version: str
    overall: RunTotals
    sources: list[SourceTotals]
    recent_runs: list[Run]


class Index(Wire, frozen=True):
    """What GET / says about the service."""

    message: str
    version: str
    endpoints: list[str]


class Problem(Wire, frozen=True):
    """An RFC 9457 problem: the body of every error response."""

    type: Annotated[str, Meta(description="URI of the problem type")]
    title: str
    status: Annotated[int, Meta(ge=400, le=599)]
    detail: Annotated[str, Meta(description="what went wrong, naming the offending part")]
    request_id: RequestId
    api_latency_ms: LatencyMs


class CursorToken(msgspec.Struct, array_like=True, frozen=True):
    """What a next_cursor carries: query digest, segment, last sort value and asset_id."""

    query_digest: str
    in_nulls: bool
    value: float | str | None
    asset_id: str


encode = msgspec.json.Encoder().encode
decode_sources = msgspec.json.Decoder(list[str]).decode
decode_drift = msgspec.json.Decoder(dict[str, int]).decode
encode_cursor = msgspec.msgpack.Encoder().encode
decode_cursor = msgspec.msgpack.Decoder(CursorToken).decode

MEDIA_PROBLEM = "application/problem+json"


# --- store access ---------------------------------------------------------


class StoreUnavailable(Exception):
    """The store file is missing, unreadable, not SQLite, or has no schema yet."""


@dataclass(frozen=True)
class DataVersion:
    """The store's identity and commit generation, read inside a snapshot."""

    store_id: str
    generation: int

    def __str__(self) -> str:
        return f"{self.store_id}-{self.generation}"


@dataclass
class Snapshot:
    """A read transaction: every query in it sees the same committed data."""

    conn: aiosqlite.Connection
    version: DataVersion

    async def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(await self.conn.execute_fetchall(sql, params))

    async def one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self.all(sql, params)
        return rows[0] if rows else None


def row_as_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    """Rows as dicts keyed by column name, ready to become Structs."""
    return dict(zip([column[0] for column in cursor.description], row, strict=True))


@dataclass
class ReaderPool:
    """Read-only connections opened together; discarded together when the store breaks."""

    idle: asyncio.Queue[aiosqlite.Connection]
    connections: list[aiosqlite.Connection]
    broken: bool = False


class Store:
    """Lazy, self-healing access to the store through a pool of read-only connections."""

    BUSY_TIMEOUT_MS = 5_000
    COUNT_CACHE_SIZE = 4_096

    def __init__(self, path: Path, readers: int = 4, reopen_interval: float = 1.0) -> None:
        self.path = path
        self.readers = readers
        self.reopen_interval = reopen_interval
        self._pool: ReaderPool | None = None
        self._opening: asyncio.Lock | None = None
        self._next_attempt = 0.0
        self._counts: dict[tuple[str, tuple], int] = {}
        self._counts_version: DataVersion | None = None

    @property
    def lock_path(self) -> Path:
        """The file the ETL holds an exclusive POSIX lock on while it runs."""
        return self.path.with_name(self.path.name + ".etl-lock")

    async def open(self) -> None:
        """Open the pool now if it is not open; a failure is remembered, not raised."""
        with contextlib.suppress(StoreUnavailable):
            await self._ready_pool()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.broken = True
            for conn in pool.connections:
                await conn.close()

    async def _ready_pool(self) -> ReaderPool:
        if self._pool is not None:
            return self._pool
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._pool is not None:
                return self._pool
            if time.monotonic() < self._next_attempt:
                raise StoreUnavailable(f"store {self.path} is not readable; retrying shortly")
            connections: list[aiosqlite.Connection] = []
            try:
                for _ in range(self.readers):
                    connections.append(await self._connect())
            except (sqlite3.Error, OSError) as error:
                for conn in connections:
                    await conn.close()
                self._next_attempt = time.monotonic() + self.reopen_interval
                raise StoreUnavailable(f"cannot open store {self.path}: {error}") from None
            idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
            for conn in connections:
                idle.put_nowait(conn)
            self._pool = ReaderPool(idle, connections)
            log.info("store opened", db=str(self.path), readers=self.readers)
            return self._pool

    async def _connect(self) -> aiosqlite.Connection:
        if not self.path.is_file():
            raise OSError(f"no such file: {self.path}")
        uri = f"file:{self.path.resolve()}?mode=ro"
        conn = await aiosqlite.connect(uri, uri=True, isolation_level=None, timeout=self.BUSY_TIMEOUT_MS / 1000)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA query_only = 1")
        except sqlite3.Error:
            await conn.close()
            raise
        conn.row_factory = row_as_dict
        return conn

    async def _discard(self, pool: ReaderPool) -> None:
        """Drop a pool whose store broke; the next request opens a new one."""
        if self._pool is pool:
            self._pool = None
            self._next_attempt = time.monotonic() + self.reopen_interval
        pool.broken = True
        while not pool.idle.empty():
            await pool.idle.get_nowait().close()

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Snapshot]:
        """A read transaction on a pooled connection, or StoreUnavailable."""
        pool = await self._ready_pool()
        conn = await pool.idle.get()
        try:
            version = await self._begin(pool, conn)
            try:
                yield Snapshot(conn, version)
            finally:
                await conn.execute("ROLLBACK")
        finally:
            if pool.broken:
                await conn.close()
            else:
                pool.idle.put_nowait(conn)

    async def _begin(self, pool: ReaderPool, conn: aiosqlite.Connection) -> DataVersion:
        """Start a read transaction and read the data version it sees."""
        try:
            await conn.execute("BEGIN")
            cursor = await conn.execute("SELECT store_id, generation FROM store_meta WHERE id = 1")
            row = await cursor.fetchone()
        except sqlite3.Error as error:
            await self._discard(pool)
            raise StoreUnavailable(f"store {self.path} is not readable: {error}") from None
        if row is None:
            await conn.execute("ROLLBACK")
            raise StoreUnavailable(f"store {self.path} has no data yet")
        return DataVersion(row["store_id"], row["generation"])

    async def count(self, snapshot: Snapshot, where: str, params: tuple) -> int:
        """Assets matching a WHERE clause, cached until the data version moves."""
        if self._counts_version != snapshot.version or len(self._counts) >= self.COUNT_CACHE_SIZE:
            self._counts = {}
            self._counts_version = snapshot.version
        key = (where, params)
        if key not in self._counts:
            row = await snapshot.one(f"SELECT count(*) AS n FROM asset WHERE {where}", params)
            self._counts[key] = row["n"]
        return self._counts[key]

    def etl_running(self) -> bool:
        """True while an ETL process holds the store's writer lock (tested, never taken)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            lock_type = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0]
        except OSError:
            return False
        finally:
            os.close(fd)
        return lock_type != fcntl.F_UNLCK


# --- query parsing --------------------------------------------------------

TEXT_FIELDS = ("asset_id", "symbol", "name", "status", "source")
NUMBER_FIELDS = ("rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct")
TIME_FIELDS = ("updated_at",)
FILTER_FIELDS = TEXT_FIELDS + NUMBER_FIELDS + TIME_FIELDS
SORT_FIELDS = (*NUMBER_FIELDS, "symbol", "name", "updated_at")
NULLABLE_SORTS = frozenset(NUMBER_FIELDS)
# How each sort field is ordered in SQL: the expression of its index.
SORT_EXPRESSIONS = {field: field for field in SORT_FIELDS} | {"name": "name COLLATE NOCASE"}
STATUSES = ("active", "inactive")
DATA_PARAMS = ("page", "page_size", "filter_by", "sort", "cursor")

OPERATOR = re.compile(r">=|<=|[:~<>]")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
ASSET_COLUMNS = (
    "asset_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct,"
    " status, sources, updated_at"
)


class InvalidQuery(Exception):
    """A query parameter cannot be understood; the message names the offending part."""


@dataclass(frozen=True)
class Condition:
    """One normalised condition of filter_by: field, operator and its values."""

    field: str
    op: str
    values: tuple[str | float, ...]

    def __str__(self) -> str:
        return f"{self.field}{self.op}{'|'.join(map(str, self.values))}"


@dataclass(frozen=True)
class Sort:
    """A sort field and direction."""

    field: str = "rank"
    descending: bool = False

    def __str__(self) -> str:
        return f"{'-' if self.descending else ''}{self.field}"

    @property
    def nullable(self) -> bool:
        return self.field in NULLABLE_SORTS


@dataclass(frozen=True)
class AssetQuery:
    """A normalised GET /data query: equal queries give equal pages."""

    conditions: tuple[Condition, ...] = ()
    sort: Sort = Sort()
    page: int = 1
    page_size: int = 10
    cursor: str | None = None

    @property
    def filter_text(self) -> str:
        return ",".join(map(str, self.conditions))

    @property
    def digest(self) -> str:
        """Fingerprint of filter and sort: what a cursor is bound to."""
        return hashlib.blake2b(f"{self.filter_text}\n{self.sort}".encode(), digest_size=8).hexdigest()

    def etag(self, version: DataVersion) -> str:
        key = f"{version}\n{self.filter_text}\n{self.sort}\n{self.page_size}\n{self.cursor or self.page}"
        return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def parse_asset_query(params: Mapping[str, str]) -> AssetQuery:
    """Turn the query string of GET /data into an AssetQuery, or raise InvalidQuery."""
    unknown = sorted(set(params) - set(DATA_PARAMS))
    if unknown:
        raise InvalidQuery(f"unknown parameter {unknown[0]!r}; known: {', '.join(DATA_PARAMS)}")
    cursor = params.get("cursor") or None
    return AssetQuery(
        conditions=parse_filter(params.get("filter_by", "")),
        sort=parse_sort(params.get("sort", "")),
        page=1 if cursor else parse_int("page", params.get("page", "1"), 1, None),
        page_size=parse_int("page_size", params.get("page_size", "10"), 1, 100),
        cursor=cursor,
    )


def parse_int(name: str, text: str, low: int, high: int | None) -> int:
    """A bounded integer parameter, or InvalidQuery naming it."""
    bounds = f"from {low} to {high}" if high is not None else f"{low} or more"
    if not re.fullmatch(r"\+?\d{1,9}", text.strip()):
        raise InvalidQuery(f"{name}: expected an integer {bounds}, got {text[:40]!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise InvalidQuery(f"{name}: must be {bounds}, got {value}")
    return value


def parse_sort(text: str) -> Sort:
    text = text.strip()
    if not text:
        return Sort()
    descending = text.startswith("-")
    field = text.removeprefix("-").strip().lower()
    if field not in SORT_FIELDS:
        raise InvalidQuery(f"sort: unknown field {text[:40]!r}; sortable: {', '.join(SORT_FIELDS)}")
    return Sort(field, descending)


def parse_filter(text: str) -> tuple[Condition, ...]:
    """filter_by: comma-separated conditions, normalised, deduplicated and ordered."""
    if not text.strip():
        return ()
    conditions = {parse_condition(part.strip()) for part in text.split(",")}
    return tuple(sorted(conditions, key=str))


def parse_condition(text: str) -> Condition:
    """One condition, split on its first operator; a bare word means status:word."""
    if not text:
        raise InvalidQuery("filter_by: empty condition (two commas in a row, or a trailing comma)")
    match = OPERATOR.search(text)
    if match is None:
        if text.lower() not in STATUSES:
            raise InvalidQuery(f"filter_by: {text[:40]!r} is neither field:value nor a status ({'|'.join(STATUSES)})")
        return Condition("status", ":", (text.lower(),))
    field, op, raw = text[: match.start()].strip().lower(), match.group(), text[match.end() :].strip()
    if field not in FILTER_FIELDS:
        raise InvalidQuery(
            f"filter_by: unknown field {field[:40]!r} in {text[:60]!r}; fields: {', '.join(FILTER_FIELDS)}"
        )
    if not raw:
        raise InvalidQuery(f"filter_by: {text[:60]!r} has no value")
    alternatives = [part.strip() for part in raw.split("|")] if op in ":~" else [raw]
    if not all(alternatives):
        raise InvalidQuery(f"filter_by: {text[:60]!r} has an empty alternative")
    if field in TEXT_FIELDS:
        if op not in ":~":
            raise InvalidQuery(f"filter_by: {field} is text: use {field}:value or {field}~text, not {op!r}")
        values: list[str | float] = [value.lower() for value in alternatives]
        if field == "status" and op == ":" and not set(values) <= set(STATUSES):
            raise InvalidQuery(f"filter_by: status is {' or '.join(STATUSES)}, got {raw[:40]!r}")
    elif op == "~":
        raise InvalidQuery(f"filter_by: {field} is not text: '~' (contains) does not apply")
    elif field in NUMBER_FIELDS:
        values = [parse_number(field, value) for value in alternatives]
    else:
        values = [parse_time(field, value) for value in alternatives]
    return Condition(field, op, tuple(sorted(set(values), key=str)))


def parse_number(field: str, text: str) -> float:
    value = float(text) if NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise InvalidQuery(f"filter_by: {field} needs a finite number, got {text[:40]!r}")
    return value


def parse_time(field: str, text: str) -> str:
    """An RFC 3339 time or date, in the store's text form (so text order is time order)."""
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InvalidQuery(f"filter_by: {field} needs an RFC 3339 time, got {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition_sql(condition: Condition) -> tuple[str, tuple]:
    """One condition as SQL; identifiers come from the allow-lists, values are bound."""
    field, op, values = condition.field, condition.op, condition.values
    marks = ", ".join("?" * len(values))
    if op == "~":
        patterns = tuple("%" + re.sub(r"([\\%_])", r"\\\1", str(v)) + "%" for v in values)
        column = "m.source" if field == "source" else field
        test = " OR ".join(f"{column} LIKE ? ESCAPE '\\'" for _ in values)
    elif field == "source":
        column, test, patterns = "m.source", f"m.source COLLATE NOCASE IN ({marks})", values
    elif op == ":":
        column, patterns = field, values
        if field == "symbol":
            patterns = tuple(str(v).upper() for v in values)
        test = f"{field} COLLATE NOCASE IN ({marks})" if field == "name" else f"{field} IN ({marks})"
    else:
        column, test, patterns = field, f"{field} {op} ?", values
    if column == "m.source":
        listed = "SELECT 1 FROM source_map m WHERE m.asset_id = asset.asset_id AND m.observed_at IS NOT NULL"
        return f"EXISTS ({listed} AND ({test}))", patterns
    return f"({test})", patterns


def where_sql(conditions: Sequence[Condition]) -> tuple[str, tuple]:
    """All conditions ANDed into one WHERE clause ('1' when there are none)."""
    parts, params = [], []
    for condition in conditions:
        sql, values = condition_sql(condition)
        parts.append(sql)
        params.extend(values)
    return " AND ".join(parts) or "1", tuple(params)


def segment_sql(
    query: AssetQuery, in_nulls: bool, after: CursorToken | None, limit: int, offset: int
) -> tuple[str, tuple]:
    """One ordered run of the result: rows with a sort value, or (nullable sorts) the rows without.

    Splitting nulls-last into two index range scans lets SQLite walk the
    (column, asset_id) index in either direction instead of sorting.
    """
    where, params = where_sql(query.conditions)
    sort = query.sort
    column = SORT_EXPRESSIONS[sort.field]
    direction = "DESC" if sort.descending else "ASC"
    beyond = "<" if sort.descending else ">"
    if in_nulls:
        clauses, keys = [f"{sort.field} IS NULL"], []
        if after is not None:
            clauses.append(f"asset_id {beyond} ?")
            keys = [after.asset_id]
        order = f"asset_id {direction}"
    else:
        clauses = [f"{sort.field} IS NOT NULL"] if sort.nullable else []
        keys = []
        if after is not None:
            clauses.append(f"{column} {beyond}= ? AND ({column} {beyond} ? OR asset_id {beyond} ?)")
            keys = [after.value, after.value, after.asset_id]
        order = f"{column} {direction}, asset_id {direction}"
    sql = f"SELECT {ASSET_COLUMNS} FROM asset WHERE {' AND '.join([where, *clauses])} ORDER BY {order} LIMIT ? OFFSET ?"
    return sql, (*params, *keys, limit, offset)


def cursor_key(version: DataVersion) -> bytes:
    return hashlib.blake2b(version.store_id.encode(), digest_size=32, person=b"kasparro-cursor").digest()


def make_cursor(query: AssetQuery, asset: Asset, version: DataVersion) -> str:
    """A keyset token after `asset`, tagged so a tampered token is refused."""
    value = getattr(asset, query.sort.field)
    token = CursorToken(query.digest, value is None, value, asset.asset_id)
    payload = encode_cursor(token)
    tag = hashlib.blake2b(payload, key=cursor_key(version), digest_size=8).digest()
    return base64.urlsafe_b64encode(payload + tag).decode().rstrip("=")


def read_cursor(query: AssetQuery, version: DataVersion) -> CursorToken:
    """The token of query.cursor, checked against its tag and the query, or InvalidQuery."""
    text = query.cursor or ""
    if not re.fullmatch(r"[A-Za-z0-9_-]{12,512}", text):
        raise InvalidQuery("cursor: not a token given by next_cursor")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    payload, tag = raw[:-8], raw[-8:]
    expected = hashlib.blake2b(payload, key=cursor_key(version), digest_size=8).digest()
    if not hmac.compare_digest(tag, expected):
        raise InvalidQuery("cursor: tampered with, or issued by another store")
    try:
        token = decode_cursor(payload)
    except msgspec.DecodeError:
        raise InvalidQuery("cursor: not a token given by next_cursor") from None
    if token.query_digest != query.digest:
        raise InvalidQuery("cursor: issued for another filter_by or sort than this request's")
    numeric = query.sort.nullable
    if token.in_nulls != (token.value is None) or (token.value is not None and isinstance(token.value, str) == numeric):
        raise InvalidQuery("cursor: does not fit the sort")
    return token


# --- resources ------------------------------------------------------------


def asset_from_row(row: dict[str, Any]) -> Asset:
    return Asset(
        asset_id=row["asset_id"],
        symbol=row["symbol"],
        name=row["name"],
        rank=row["rank"],
        price_usd=row["price_usd"],
        market_cap_usd=row["market_cap_usd"],
        volume_24h_usd=row["volume_24h_usd"],
        change_24h_pct=row["change_24h_pct"],
        status=row["status"],
        sources=decode_sources(row["sources"]),
        updated_at=row["updated_at"],
    )


def latency_ms(req: falcon.asgi.Request) -> float:
    return round((time.perf_counter() - req.context.started) * 1000, 3)


def send(resp: falcon.asgi.Response, body: msgspec.Struct, status: str = falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = encode(body)


def not_modified(req: falcon.asgi.Request, resp: falcon.asgi.Response, tag: str) -> bool:
    """Set the weak ETag; True (and 304) when the client's copy is current."""
    resp.etag = f'W/"{tag}"'
    candidates = {t.strip().removeprefix("W/") for t in (req.get_header("If-None-Match") or "").split(",")}
    if f'"{tag}"' in candidates or "*" in candidates:
        resp.status = falcon.HTTP_304
        return True
    return False


class IndexResource:
    """GET /: what the service is and where its endpoints are."""

    ENDPOINTS = ("GET /", "GET /data", "GET /data/{asset_id}", "GET /health", "GET /stats")

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        send(resp, Index(message="Kasparro Backend Service", version=__version__, endpoints=list(self.ENDPOINTS)))


class AssetResource:
    """GET /data (pages of unified records) and GET /data/{asset_id} (one, with quotes)."""

    protected = True

    def __init__(self, store: Store) -> None:
        self.store = store

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        query = parse_asset_query({name: req.get_param(name) or "" for name in req.params})
        async with self.store.snapshot() as snapshot:
            version = snapshot.version
            after = read_cursor(query, version) if query.cursor else None
            if not_modified(req, resp, query.etag(version)):
                return
            where, params = where_sql(query.conditions)
            total = await self.store.count(snapshot, where, params)
            rows = await self._rows(snapshot, query, after)
        page_size = query.page_size
        assets = [asset_from_row(row) for row in rows[:page_size]]
        more = len(rows) > page_size
        send(
            resp,
            AssetPage(
                request_id=req.context.request_id,
                api_latency_ms=latency_ms(req),
                data=assets,
                page=None if query.cursor else query.page,
                page_size=page_size,
                total_items=total,
                total_pages=-(-total // page_size),
                next_cursor=make_cursor(query, assets[-1], version) if more else None,
                data_version=str(version),
            ),
        )

    async def _rows(self, snapshot: Snapshot, query: AssetQuery, after: CursorToken | None) -> list[dict[str, Any]]:
        """page_size + 1 rows from the page's start, across the value and null segments."""
        wanted = query.page_size + 1
        offset = 0 if after else (query.page - 1) * query.page_size
        rows: list[dict[str, Any]] = []
        if after is None or not after.in_nulls:
            rows = await snapshot.all(*segment_sql(query, False, after, wanted, offset))
        if len(rows) < wanted and query.sort.nullable:
            null_offset = 0
            if after is None and not rows and offset:
                where, params = where_sql(query.conditions)
                valued = await self.store.count(snapshot, f"{where} AND {query.sort.field} IS NOT NULL", params)
                null_offset = max(0, offset - valued)
            null_after = after if after is not None and after.in_nulls else None
            rows += await snapshot.all(*segment_sql(query, True, null_after, wanted - len(rows), null_offset))
        return rows

    async def on_get_asset(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, asset_id: str) -> None:
        async with self.store.snapshot() as snapshot:
            tag = hashlib.blake2b(f"{snapshot.version}\n{asset_id}".encode(), digest_size=12).hexdigest()
            if not_modified(req, resp, tag):
                return
            row = await snapshot.one(f"SELECT {ASSET_COLUMNS} FROM asset WHERE asset_id = ?", (asset_id,))
            if row is None:
                raise falcon.HTTPNotFound(description=f"no asset with asset_id {asset_id[:100]!r}")
            quotes = await snapshot.all(
                "SELECT source, source_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd,"
                " change_24h_pct, status, observed_at FROM source_map"
                " WHERE asset_id = ? AND observed_at IS NOT NULL ORDER BY source, source_id",
                (asset_id,),
            )
        asset = asset_from_row(row)
        send(
            resp,
            AssetDetail(
                **msgspec.structs.asdict(asset),
                quotes=[Quote(**quote) for quote in quotes],
            ),
        )


class HealthResource:
    """GET /health: is the store readable and the ETL fresh."""

    def __init__(self, store: Store, max_age: int) -> None:
        self.store = store
        self.max_age = max_age

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            async with self.store.snapshot() as snapshot:
                runs = await snapshot.all(
                    "SELECT status, started_at, ended_at FROM etl_run ORDER BY run_id DESC LIMIT 2"
                )
        except StoreUnavailable as error:
            log.warning("store unavailable", reason=str(error))
            send(resp, Health(status="unhealthy", db_connected=False, etl_last_run=None, etl_status=None),
                 falcon.HTTP_503)  # fmt: skip
            return
        send(resp, self.judge(runs))

    def judge(self, runs: Sequence[dict[str, Any]]) -> Health:
        """healthy when the latest finished run is good and recent; a live run keeps the previous verdict."""
        if not runs:
            return Health(status="degraded", db_connected=True, etl_last_run=None, etl_status="never_run")
        latest = runs[0]
        status, last_run = latest["status"], latest["ended_at"] or latest["started_at"]
        finished = latest
        if status == "running":
            if self.store.etl_running():
                finished = runs[1] if len(runs) > 1 else None
            else:
                status = "failed"
        good = finished is not None and finished["status"] in ("success", "partial") and finished["ended_at"]
        fresh = good and age_seconds(finished["ended_at"]) <= self.max_age
        verdict = "healthy" if status != "failed" and fresh else "degraded"
        return Health(status=verdict, db_connected=True, etl_last_run=last_run, etl_status=status)


def age_seconds(moment: str) -> float:
    return time.time() - datetime.fromisoformat(moment).timestamp()


# ETL outcomes summed over runs; {table} is etl_run (overall) or run_source (per source).
TOTALS_SQL = """
SELECT {key} count(*) AS runs,
       count(*) FILTER (WHERE status IN ('success', 'partial')) AS successes,
       count(*) FILTER (WHERE status = 'partial') AS partials,
       count(*) FILTER (WHERE status = 'failed') AS failures,
       coalesce(sum(rows_read), 0) AS rows_read,
       coalesce(sum(rows_loaded), 0) AS rows_loaded,
       coalesce(sum(rows_rejected), 0) AS rows_rejected,
       max(ended_at) FILTER (WHERE status IN ('success', 'partial')) AS last_success_at,
       max(ended_at) FILTER (WHERE status = 'failed') AS last_failure_at,
       (SELECT error FROM {table} e WHERE e.status = 'failed' {same_source}
        ORDER BY e.run_id DESC LIMIT 1) AS last_error,
       avg(duration_ms) AS avg_duration_ms
FROM {table} t {group}
"""
OVERALL_SQL = TOTALS_SQL.format(key="", table="etl_run", same_source="", group="")
PER_SOURCE_SQL = TOTALS_SQL.format(
    key="source,", table="run_source", same_source="AND e.source = t.source", group="GROUP BY source ORDER BY source"
)


class StatsResource:
    """GET /stats: ETL outcomes overall, per source, and the last runs."""

    protected = True
    RECENT_RUNS = 10

    def __init__(self, store: Store) -> None:
        self.store = store

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        async with self.store.snapshot() as snapshot:
            overall = await snapshot.one(OVERALL_SQL)
            per_source = await snapshot.all(PER_SOURCE_SQL)
            runs = await snapshot.all("SELECT * FROM etl_run ORDER BY run_id DESC LIMIT ?", (self.RECENT_RUNS,))
            outcomes = await snapshot.all(
                "SELECT * FROM run_source WHERE run_id >= ? ORDER BY run_id, source",
                (runs[-1]["run_id"] if runs else 0,),
            )
            version = snapshot.version
        by_run: dict[int, list[RunSourceOutcome]] = {}
        for row in outcomes:
            run_id = row.pop("run_id")
            row["drift"] = decode_drift(row["drift"]) if row["drift"] else {}
            by_run.setdefault(run_id, []).append(RunSourceOutcome(**row))
        dead = bool(runs) and runs[0]["status"] == "running" and not self.store.etl_running()
        recent = []
        for index, row in enumerate(runs):
            row["sources"] = decode_sources(row["sources"])
            if index == 0 and dead:
                row["status"] = "failed"
            recent.append(Run(**row, outcomes=by_run.get(row["run_id"], [])))
        send(
            resp,
            Stats(
                data_version=str(version),
                overall=RunTotals(**overall),
                sources=[SourceTotals(**row) for row in per_source],
                recent_runs=recent,
            ),
        )


# --- middleware and errors ------------------------------------------------

SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


class RequestContext:
    """Request id, timing and the one log line per request."""

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.started = time.perf_counter()
        offered = req.get_header("X-Request-ID") or ""
        req.context.request_id = offered if SANE_REQUEST_ID.fullmatch(offered) else str(uuid.uuid4())
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=req.context.request_id)

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, req_succeeded: bool
    ) -> None:
        resp.set_header("X-Request-ID", req.context.request_id)
        log.info(
            "request",
            method=req.method,
            route=req.uri_template or "(no route)",
            status=resp.status_code,
            duration_ms=latency_ms(req),
        )


class ApiKeyAuth:
    """When keys are configured, protected resources need one (Bearer or X-API-Key)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = [key.encode() for key in keys]

    async def process_resource(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, params: dict
    ) -> None:
        if not self.keys or not getattr(resource, "protected", False):
            return
        scheme, _, credentials = (req.get_header("Authorization") or "").partition(" ")
        offered = credentials.strip() if scheme.lower() == "bearer" else req.get_header("X-API-Key") or ""
        matches = [hmac.compare_digest(offered.encode(), key) for key in self.keys]
        if not offered or not any(matches):
            raise falcon.HTTPUnauthorized(
                description="this endpoint needs an API key: Authorization: Bearer <key> or X-API-Key",
                challenges=['Bearer realm="kasparro"'],
            )


class Lifespan:
    """Open the store when the server starts and close it when it stops."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def process_startup(self, scope: dict, event: dict) -> None:
        await self.store.open()

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        await self.store.close()


def serialize_problem(req: falcon.asgi.Request, resp: falcon.asgi.Response, error: falcon.HTTPError) -> None:
    """Every HTTPError as an RFC 9457 problem+json body."""
    started = getattr(req.context, "started", time.perf_counter())
    phrase = HTTPStatus(error.status_code).phrase
    problem = Problem(
        type="about:blank",
        title=phrase,
        status=error.status_code,
        detail=error.description or f"{req.method} {req.path}: {phrase.lower()}",
        request_id=getattr(req.context, "request_id", "") or str(uuid.uuid4()),
        api_latency_ms=round((time.perf_counter() - started) * 1000, 3),
    )
    resp.content_type = MEDIA_PROBLEM
    resp.data = encode(problem)


async def handle_invalid_query(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: dict
) -> None:
    raise falcon.HTTPBadRequest(description=str(error))


async def handle_store_unavailable(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: dict
) -> None:
    log.warning("store unavailable", reason=str(error))
    raise falcon.HTTPServiceUnavailable(description="the store is not readable yet; retry shortly", retry_after=1)


async def handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: dict
) -> None:
    log.exception("unexpected error", route=req.uri_template)
    raise falcon.HTTPInternalServerError(description="an unexpected error occurred; quote the request_id")


# --- create_app -----------------------------------------------------------


def create_app(config: Config) -> falcon.asgi.App:
    """The API over the store at config.db."""
    configure_logging(config.log_level)
    store = Store(config.db, config.readers, config.reopen_interval)
    app = falcon.asgi.App(middleware=[RequestContext(), ApiKeyAuth(config.api_keys), Lifespan(store)])
    app.req_options.keep_blank_qs_values = True
    app.resp_options.secure_cookies_by_default = config.env == "production"
    app.set_error_serializer(serialize_problem)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(InvalidQuery, handle_invalid_query)
    app.add_error_handler(StoreUnavailable, handle_store_unavailable)
    assets = AssetResource(store)
    app.add_route("/", IndexResource())
    app.add_route("/data", assets)
    app.add_route("/data/{asset_id}", assets, suffix="asset")
    app.add_route("/health", HealthResource(store, config.etl_max_age))
    app.add_route("/stats", StatsResource(store))
    return app


app = create_app(Config.from_env())
