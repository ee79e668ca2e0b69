"""Kasparro API: the unified crypto-asset store served read-only over HTTP (Falcon ASGI)."""

from __future__ import annotations

import asyncio
import atexit
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import contextvars
import csv
import fcntl
import functools
import gc
import hashlib
import hmac
import importlib.util
import io
import ipaddress
import itertools
import logging
import math
import operator
import os
import re
import sqlite3
import stat
import statistics
import struct
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, BinaryIO, ClassVar, Generic, Literal, TypeVar, overload

import aiosqlite
import falcon
import falcon.asgi
import msgspec
import structlog
from msgspec import Meta
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__version__ = "0.3.0"

log = structlog.get_logger("kasparro.api")
T = TypeVar("T")


class cached_property(Generic[T]):  # lower case, as the functools one it stands in for
    """functools.cached_property as Python 3.12 made it: computed on the first read, then kept in the instance's
    __dict__, which later reads find first. 3.11's takes an RLock on each first read, and an answer made for one
    request reads several once each. Two threads reading one first may both compute it, to the same value."""

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute = compute
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> cached_property[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...
    def __get__(self, instance: object | None, owner: type | None = None) -> T | cached_property[T]:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value


# --- config ---------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """Settings of the API, read from the environment in one place."""

    db: Path = Path("kasparro.db")
    etl_max_age: int = 21_600  # seconds after the last good run before /health says degraded
    api_keys: tuple[str, ...] = ()  # empty: the API is open
    rate_limit: float = 0.0  # requests a second per API key or client address, in each worker process; 0: off
    log_level: str = "info"
    env: str = "development"
    readers: int = 4  # read-only connections, each with its own thread
    # Seconds between attempts to open a missing store, and between checks that the open store is still
    # the file at `db` (not deleted, renamed over or overwritten): the longest a replaced store is served.
    reopen_interval: float = 1.0
    # PROMETHEUS_MULTIPROC_DIR: where uvicorn's worker processes share their request metrics. It must
    # be an empty directory made fresh for each start of the service, writable by it, and the variable
    # must be set before uvicorn starts (prometheus-client reads it when first imported): in the
    # container, e.g. `PROMETHEUS_MULTIPROC_DIR=$(mktemp -d /tmp/kasparro-metrics.XXXXXX)`, as /tmp is
    # a tmpfs there. Unset: one process, metrics kept in memory.
    metrics_dir: Path | None = None
    # replica: the store is a follower copy (Litestream) of a primary's store, whose ETL lock is out of sight.
    role: str = "primary"
    # Origins a browser may call the API from (CORS): ("*",) any, () none.
    cors_origins: tuple[str, ...] = ("*",)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Config:
        """Build the config from the variables of SPEC.md, with its defaults."""
        keys = tuple(k.strip() for k in environ.get("KASPARRO_API_KEYS", "").split(",") if k.strip())
        for place, key in enumerate(keys, 1):  # a header's bytes are read as Latin-1: 'kéy' arrives as 'kÃ©y'
            if not PRINTABLE_ASCII.fullmatch(key):
                raise SystemExit(
                    f"kasparro: KASPARRO_API_KEYS: key {place} holds a character other than printable ASCII, which"
                    " no client can send as it is; make keys of letters, digits and punctuation"
                )
        if environ.get("KASPARRO_ROLE", "primary") not in ROLES:
            raise SystemExit(f"kasparro: KASPARRO_ROLE must be primary or replica, not {environ['KASPARRO_ROLE']!r}")
        level = environ.get("LOG_LEVEL", "").strip().lower() or "info"
        if level == "notset" or level.upper() not in logging.getLevelNamesMapping():  # it would quietly mean info
            raise SystemExit(
                "kasparro: LOG_LEVEL must be debug, info, warning, error or critical (in any case),"
                f" not {environ['LOG_LEVEL']!r}"
            )
        db = environ.get("KASPARRO_DB", "kasparro.db")
        if Path(db).is_dir() or (Path(db).exists() and not Path(db).is_file()):  # '' names the current directory
            raise SystemExit(f"kasparro: KASPARRO_DB must be the path of the store's file, not {db!r}")
        origins = tuple(o.strip() for o in environ.get("KASPARRO_CORS_ORIGINS", "*").split(",") if o.strip())
        for origin in origins:  # one a browser's Origin never equals would refuse every call silently
            sent = "*" if origin == "*" else browser_origin(origin)
            if sent is None:
                raise SystemExit(
                    f"kasparro: KASPARRO_CORS_ORIGINS: {origin[:100]!r} is not an origin; expected '*' or origins"
                    " such as https://dash.example.com or http://localhost:3000 (scheme://host[:port], no path; a"
                    " host of non-empty labels with no final dot, or an IP address, IPv6 in []; a port 1-65535)"
                )
            if sent != origin:
                raise SystemExit(
                    f"kasparro: KASPARRO_CORS_ORIGINS: {origin[:100]!r} is not how a browser sends that origin:"
                    f" write {sent!r}"
                )
        return cls._read(environ, keys, origins, level)

    @classmethod
    def _read(cls, environ: Mapping[str, str], keys: tuple[str, ...], origins: tuple[str, ...], level: str) -> Config:
        return cls(
            db=Path(environ.get("KASPARRO_DB", "kasparro.db")),
            etl_max_age=setting(environ, "KASPARRO_ETL_MAX_AGE", cls.etl_max_age, (1, 10**10)),
            api_keys=keys,
            rate_limit=setting(environ, "KASPARRO_RATE_LIMIT", cls.rate_limit, (0, 10**9)),
            log_level=level,
            env=environ.get("ENV", "development"),
            metrics_dir=Path(environ["PROMETHEUS_MULTIPROC_DIR"]) if environ.get("PROMETHEUS_MULTIPROC_DIR") else None,
            role=environ.get("KASPARRO_ROLE", "primary"),
            cors_origins=origins,
        )


def setting(environ: Mapping[str, str], name: str, default: float, bounds: tuple[float, float]) -> Any:
    """A number from the environment, of the default's type and within `bounds` (unset or empty: the default), or
    SystemExit naming the variable: a negative or infinite one would otherwise pass, or stop the start with a
    traceback."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:  # int() and float() also read '_' between digits, and other scripts' digits
        value = type(default)(text) if NUMBER.fullmatch(text) else None
    except ValueError:
        value = None
    if value is None or not bounds[0] <= value <= bounds[1]:
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise SystemExit(f"kasparro: {name} must be {kind} from {bounds[0]:,} to {bounds[1]:,}, not {text[:40]!r}")
    return value


ROLES = ("primary", "replica")
ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]+")  # scheme://host[:port], the scheme in any case
NETLOC = re.compile(r"(?:[^@]*@)?(?:\[[^\]]*\]|[^:@\[\]]*)(?::[0-9]*)?")  # [user@]host[:port]; an IPv6 host in []
HOST_LABEL = re.compile(r"[a-z0-9_-]{1,63}")  # of a DNS name in a URL, after IDNA (RFC 1035's 63 octets)
IPV4_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")  # a last label a browser reads as (part of) an IPv4 address
PRINTABLE_ASCII = re.compile(r"[ -~]+")  # what an API key may hold: it comes back in a header, a byte a character
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def browser_origin(text: str) -> str | None:
    """An origin as a browser sends it in Origin (RFC 6454: host lower-case and in punycode, no user, no default
    port, the scheme lower-case), or None when `text` is no origin (no scheme or host, a path, a port that is not
    one, a host a browser would not send: url_host)."""
    if not ORIGIN.fullmatch(text):
        return None
    try:
        parts = urllib.parse.urlsplit(text)
        port, host = parts.port, parts.hostname
        host = host if host is None or host.isascii() else host.encode("idna").decode()
    except (ValueError, UnicodeError):
        return None
    if not host or port == 0 or not NETLOC.fullmatch(parts.netloc):  # no page is served from port 0
        return None
    host = url_host(host, ipv6="[" in parts.netloc)
    if host is None:
        return None
    return f"{parts.scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS.get(parts.scheme)) else f":{port}")


def url_host(host: str, ipv6: bool) -> str | None:
    """A URL's host (lower-case, ASCII) as a browser writes it: an IPv6 address in RFC 5952's form in brackets (no
    zone), an IPv4 address in dotted decimal, or a DNS name of labels of 1 to 63 letters, digits, '-' and '_', 253
    characters at most and no final dot (another origin than without it); None for any other."""
    if ipv6:
        try:
            return None if "%" in host else f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            return None
    labels = host.split(".")
    if IPV4_LABEL.fullmatch(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(host))  # dotted decimal, no leading zeros
        except ValueError:
            return None
    return host if len(host) <= 253 and all(map(HOST_LABEL.fullmatch, labels)) else None


@functools.lru_cache(maxsize=1024)
def sent_by_browser(origin: bytes) -> bool:
    """Whether an Origin header's value is one a browser sends: `null` (an opaque origin: a sandboxed frame, a
    file) or an origin as browser_origin writes it."""
    text = origin.decode("latin-1")
    return text == "null" or browser_origin(text) == text


# --- logs -----------------------------------------------------------------

LOG_HANDLER = "kasparro"


# The request id of the request being served, for every log line it causes.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


LEVEL_NAMES = {"warn": "warning", "exception": "error"}  # structlog's method names that are not level names


# The digits of a timestamp below the second, three at a time: formatting them costs more than the rest of
# the stamp.
MILLIS = tuple(f".{n:03d}" for n in range(1000))
MICROS = tuple(f"{n:03d}Z" for n in range(1000))


def stamper(render: Callable[[dict[str, Any]], bytes] | None = None) -> Callable[..., Any]:
    """A structlog processor that sets the event's `level`, the current request's `request_id` and `timestamp`
    (RFC 3339 UTC with microseconds, as TimeStamper(fmt="iso", utc=True) writes it); with `render`, it then
    formats exc_info and renders the event as well, saving the chain a step.

    A closure, not a class: calling an instance costs twice a function's call on the request log's path."""
    second = (-1 << 62, "")  # the current second's start (ns) and its text, replaced together (threads)
    get_level, get_request_id, time_ns = LEVEL_NAMES.get, REQUEST_ID.get, time.time_ns

    def stamp(logger: object, method: str, event: dict[str, Any]) -> Any:
        nonlocal second
        event["level"] = get_level(method, method)
        request_id = get_request_id()
        if request_id is not None:
            event.setdefault("request_id", request_id)
        moment, seen = time_ns(), second
        within = moment - seen[0]  # a small int: the arithmetic below stays cheap
        if not 0 <= within < 1_000_000_000:
            whole = moment // 1_000_000_000
            seen = second = (whole * 1_000_000_000, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
            within = moment - seen[0]
        event["timestamp"] = f"{seen[1]}{MILLIS[within // 1_000_000]}{MICROS[within // 1000 % 1000]}"
        if render is None:
            return event
        if "exc_info" in event:
            event = format_exc_info(logger, method, event)
        return render(event)

    return stamp


encode_log_event = msgspec.json.Encoder(enc_hook=str).encode  # a value JSON lacks (a Path, an error) as its str()


format_exc_info = structlog.processors.format_exc_info


def add_exception(logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: format_exc_info, only for the events that carry exc_info (a tenth of a line's cost)."""
    return format_exc_info(logger, method, event) if "exc_info" in event else event


def render_json_text(logger: object, method: str, event: dict[str, Any]) -> str:
    """The JSON line of a stdlib record (uvicorn), as text for its formatter: uvicorn's lines look like the app's."""
    return encode_log_event(event).decode()


class LogLines:
    """structlog's logger for the API: debug and info lines wait for the end of the event loop's turn (or for
    MAX_HELD lines) and go out in one write; a warning or worse goes out at once, with the lines before it.

    Reader threads log too. A line waits in a deque, whose append and popleft are atomic, so holding one takes
    no lock; only writing does, and a writer takes just the lines it finds, so a line held meanwhile waits for
    the next write instead of being lost."""

    MAX_HELD = 512

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._held: collections.deque[bytes] = collections.deque()
        self._due = False  # a flush is queued on the event loop
        self._writing = threading.Lock()

    def msg(self, line: bytes | str) -> None:
        held = self._held
        held.append(line if type(line) is bytes else line.encode())
        if len(held) < self.MAX_HELD:
            if self._due:
                return
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._due = True
                return
            except RuntimeError:  # not on the loop's thread
                pass
        self.flush()

    def write_now(self, line: bytes | str) -> None:
        self._held.append(line if type(line) is bytes else line.encode())
        self.flush()

    log = debug = info = msg
    warning = warn = error = critical = fatal = exception = write_now

    def flush(self) -> None:
        with self._writing:
            self._due = False  # before taking the lines: one held after this asks for a flush of its own
            held = self._held
            lines = [held.popleft() for _ in range(len(held))]
            if lines:
                lines.append(b"")
                self.stream.write(b"\n".join(lines))
                self.stream.flush()


class LogLinesHandler(logging.Handler):
    """The stdlib (uvicorn) records, formatted by structlog's ProcessorFormatter, into the same LogLines, at once:
    uvicorn's last lines come after the app's shutdown, and a signal may end the process right after them."""

    def __init__(self, lines: LogLines) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.write_now(self.format(record))
        except Exception:  # logging must never break a request; stdlib's own policy
            self.handleError(record)


log_lines = LogLines(sys.stdout.buffer)
atexit.register(log_lines.flush)


def log_level(name: str) -> int:
    """The stdlib level of a LOG_LEVEL name (Config.from_env refuses an unknown one); info for any other."""
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


def bound_logger_class(threshold: int) -> type:
    """structlog's filtering bound logger for `threshold`. When info lines are on, its info() with no bound
    context and no %-style arguments runs the configured processors itself and hands their line to the logger:
    the chains configure_logging sets end in a renderer, so `_process_event`'s copy of the context, its merge of
    the keywords and its checks of what the chain returned are work for nothing on the request log's path (two
    fifths of structlog's own cost there). Anything else takes structlog's own path."""
    filtering = structlog.make_filtering_bound_logger(threshold)
    if threshold > logging.INFO:
        return filtering

    class InfoLogger(filtering):  # type: ignore[valid-type,misc]
        def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
            if args or self._context:
                return super().info(event, *args, **kw)
            if event is not None:
                kw["event"] = event
            try:
                for processor in self._processors:
                    kw = processor(self._logger, "info", kw)
            except structlog.DropEvent:
                return None
            return self._logger.info(kw)

    return InfoLogger


def configure_logging(level: str) -> None:
    """JSON lines on stdout, or readable console lines on a TTY, for structlog and stdlib (uvicorn) alike.

    The app's own events take structlog's short path to `log_lines`; records of stdlib loggers
    (uvicorn, uvicorn.error) reach the root handler, whose ProcessorFormatter runs them through
    the same processors and renderer into the same lines.
    """
    threshold = log_level(level)
    tty = sys.stdout.isatty()
    # The request id comes from REQUEST_ID, not structlog.contextvars: the API binds nothing there.
    shared: list[Any] = [stamper()]
    log_lines.flush()
    log_lines.stream = sys.stdout.buffer
    structlog.configure(
        processors=[*shared, add_exception, structlog.dev.ConsoleRenderer()] if tty else [stamper(encode_log_event)],
        wrapper_class=bound_logger_class(threshold),
        logger_factory=lambda *args: log_lines,
        cache_logger_on_first_use=False,
    )
    handler = LogLinesHandler(log_lines)
    handler.set_name(LOG_HANDLER)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer() if tty else render_json_text,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if h.get_name() == LOG_HANDLER]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(threshold)
    # The app logs one line per request itself; uvicorn's access line would repeat it. With no handler on its
    # way up, uvicorn does not even build that line's arguments (it asks once per connection).
    access = logging.getLogger("uvicorn.access")
    access.setLevel(max(threshold, logging.WARNING))
    access.propagate = False


# --- wire types -----------------------------------------------------------


class Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Base of every response body.

    Frozen, because an encoded body is kept and shared between requests; unknown fields forbidden, so a
    client decoding with these types notices drift; defaults never omitted, so every documented field is
    always on the wire (null rather than missing); gc=False, because a body is a tree (no cycles), and
    the collector need not track the hundred rows of a page.
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


# Asset and Quote are built positionally from rows of ASSET_COLUMNS and QUOTE_COLUMNS (their own fields, in
# order); an Asset read from the store holds its sources as the stored JSON array (msgspec.Raw), written as is.
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
    page: Annotated[Annotated[int, Meta(ge=1)] | None, Meta(description="page number; null when a cursor was used")]
    page_size: PageSize
    total_items: Annotated[int, Meta(ge=0, description="assets matching filter_by")]
    total_pages: Count
    next_cursor: Annotated[str | None, Meta(description="opaque token of the next page; null on the last")]
    data_version: Annotated[str, Meta(description="moves exactly when the ETL commits new data")]


class PricePoint(Wire, frozen=True):
    """One raw observation of one of the asset's listings."""

    observed_at: Time
    source: str
    price_usd: Usd
    market_cap_usd: Usd
    volume_24h_usd: Usd


class Candle(Wire, frozen=True):
    """The priced observations of one interval: the first, highest, lowest and last price, and the last's cap
    and volume."""

    t: Annotated[str, Meta(description="RFC 3339 UTC start of the interval's bucket")]
    open: float
    high: float
    low: float
    close: float
    market_cap_usd: Usd
    volume_24h_usd: Usd
    observations: Annotated[int, Meta(ge=1, description="priced observations in the bucket")]


Interval = Literal["raw", "5m", "15m", "1h", "4h", "1d"]
POINTS_SCHEMA = {
    "items": {"oneOf": [{"$ref": "#/components/schemas/PricePoint"}, {"$ref": "#/components/schemas/Candle"}]}
}


class AssetHistory(Wire, frozen=True):
    """GET /data/{asset_id}/history: an asset's observations or candles over a window, in time order."""

    request_id: RequestId
    api_latency_ms: LatencyMs
    asset_id: str
    interval: Interval
    source: Annotated[str | None, Meta(description="the one source whose listing is read; null: every source")]
    from_: Annotated[str, Meta(description="start of the window, inclusive (RFC 3339 UTC)")] = msgspec.field(
        name="from"
    )
    to: Annotated[str, Meta(description="end of the window, exclusive (RFC 3339 UTC)")]
    points: Annotated[
        list[Any],
        Meta(
            description="raw: PricePoint objects; any other interval: Candle objects (empty buckets absent)",
            extra_json_schema=POINTS_SCHEMA,
        ),
    ]
    next_cursor: Annotated[str | None, Meta(description="opaque token of the next points; null on the last")]
    data_version: str


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


RunId = Annotated[int, Meta(ge=1, description="a run's id, as GET /runs lists it")]


class RunList(Wire, frozen=True):
    """GET /runs: the newest runs first, each with its per-source outcomes."""

    data_version: str
    limit: Annotated[int, Meta(ge=1, le=100, description="the most runs listed (the limit asked for)")]
    runs: list[Run]


class Measure(Wire, frozen=True):
    """One measure of one source in runs a and b."""

    a: Annotated[int | None, Meta(description="in run a; null when the source was not in it, or has no duration")]
    b: Annotated[int | None, Meta(description="in run b; null as for a")]
    difference: Annotated[int | None, Meta(description="b minus a; null when either is null")]


class SourceComparison(Wire, frozen=True):
    """One source's part of runs a and b side by side."""

    source: str
    status_a: Annotated[RunStatus | None, Meta(description="its outcome in run a; null when run a did not load it")]
    status_b: Annotated[RunStatus | None, Meta(description="its outcome in run b; null when run b did not load it")]
    rows_read: Measure
    rows_loaded: Annotated[Measure, Meta(description="new observations stored")]
    rows_rejected: Measure
    duration_ms: Measure
    drift_appeared: Annotated[list[str], Meta(description="drift entries run b reports and run a does not")]
    drift_disappeared: Annotated[list[str], Meta(description="drift entries run a reports and run b does not")]


class Anomaly(Wire, frozen=True):
    """A source's measure in a run far from its median over the source's previous (up to 10) finished runs."""

    run_id: Annotated[int, Meta(ge=1, description="the run judged: a or b")]
    source: str
    measure: Literal["rows_read", "rows_loaded", "duration_ms"]
    value: Annotated[int, Meta(ge=0, description="the measure in the run judged")]
    median: Annotated[float, Meta(ge=0, description="its median over the previous runs")]
    previous_runs: Annotated[list[int], Meta(description="ids of those runs, newest first")]
    previous_values: Annotated[list[int], Meta(description="the measure in each of them")]
    reason: str


class RunComparison(Wire, frozen=True):
    """GET /runs/compare: runs a and b side by side per source, and the anomalies of each."""

    data_version: str
    a: Run
    b: Run
    sources: Annotated[list[SourceComparison], Meta(description="every source of either run, by name")]
    anomalies: list[Anomaly]


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
encode_lines = msgspec.json.Encoder().encode_lines
decode_sources = msgspec.json.Decoder(list[str]).decode
decode_drift = msgspec.json.Decoder(dict[str, int]).decode
encode_cursor = msgspec.msgpack.Encoder().encode
decode_cursor = msgspec.msgpack.Decoder(CursorToken).decode

MEDIA_PROBLEM = "application/problem+json"


# --- store ----------------------------------------------------------------


class StoreUnavailable(Exception):
    """The store file is missing, unreadable, not SQLite, or has no schema yet."""


class ReadersBusy(Exception):
    """No reader of the store came free within Store.READER_WAIT seconds: the store is fine, the API is loaded."""


def sqlite_code(error: sqlite3.Error) -> int:
    """SQLite's primary result code of an error (0 when it has none)."""
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


# The primary result codes that mean the store or its machine is broken or busy, not the query: a full
# disk (no room for a temporary file or the WAL index) or a read-only one (the WAL index cannot be
# written) included.
STORE_FAULTS = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_CANTOPEN,
     sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY}
)  # fmt: skip


@dataclass(frozen=True)
class DataVersion:
    """The store's identity and data generation: it moves only when the ETL commits new data."""

    store_id: str
    generation: int

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        return f"{self.store_id}-{self.generation}"


def read_version(conn: sqlite3.Connection) -> DataVersion:
    """The data version as the connection sees the store now; StoreUnavailable when it has none yet."""
    row = conn.execute("SELECT store_id, generation FROM store_meta WHERE id = 1").fetchone()
    if row is None:
        raise StoreUnavailable("the store has no data yet")
    return DataVersion(row[0], row[1])


@dataclass(eq=False)
class Commit:
    """The store as one commit of any kind left it, and what requests learnt from it.

    All of it holds until the next commit (PRAGMA data_version moves) or until the store is reopened;
    then Store.watch() makes a new one. `number` never repeats within the process.
    """

    number: int
    version: DataVersion
    counts: dict[str, int] = field(default_factory=dict)  # assets matching a filter_by, by its text
    sources: dict[str, SourceFilter] = field(default_factory=dict)  # a filter_by's source names, by its text
    bookmarks: BookmarkSets = field(default_factory=lambda: BookmarkSets())
    facts: dict[str, Any] = field(default_factory=dict)  # reads kept by name (the metrics' store facts)


@dataclass
class ReaderPool:
    """Read-only connections opened together; discarded together when the store breaks or is replaced.

    A discarded pool's queue holds None: whoever waited for one of its connections puts it back for
    the next waiter, and goes to the new pool.
    """

    idle: asyncio.Queue[aiosqlite.Connection | None]
    identity: StoreIdentity  # of the file the connections opened
    written: tuple[int, int]  # its (size, mtime) when last read afresh
    broken: bool = False
    # A replica's descriptor of its copy, to look for a pending apply (apply_pending); closed once the pool is
    # broken and none of its connections (readers, snapshots) is left open: closing any descriptor of the file
    # drops every POSIX lock this process holds on it, SQLite's shared locks of the reads in progress included.
    probe: int | None = None
    users: int = 0  # the pool's connections not closed yet


# What a reader's statements may do: read, call functions, begin and end its transaction. Anything else
# (a write, a PRAGMA, ATTACH, which could create a file) is refused when the statement is prepared.
READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
     sqlite3.SQLITE_TRANSACTION}
)  # fmt: skip


def authorize_read(action: int, *names: str | None) -> int:
    """SQLite authorizer of the API's connections: reads only (and PRAGMA data_version, a read)."""
    if action == sqlite3.SQLITE_PRAGMA:
        return sqlite3.SQLITE_OK if names[:2] == ("data_version", None) else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK if action in READ_ACTIONS else sqlite3.SQLITE_DENY


StoreIdentity = tuple[int, int]  # (device, inode): it moves only when another file takes the path


def store_file(path: Path) -> os.stat_result | None:
    """The stat of the regular file at path, else None.

    Only stat, never open: closing any descriptor of the store file would drop every POSIX lock this
    process holds on it, SQLite's included, and let the ETL reset the WAL under live readers.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info if stat.S_ISREG(info.st_mode) else None


PENDING_BYTE = 0x40000000  # SQLite's lock bytes (os_unix.c): a writer holds PENDING while it waits for the readers
FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, length, pid
APPLY_POLL = 0.001  # seconds between two looks for an apply's end


def lock_conflicts(fd: int, lock_type: int, start: int = 0, length: int = 0) -> bool:
    """Whether another process holds a lock on fd's file that a `lock_type` lock of `length` bytes at `start` (0:
    to the end) would conflict with: F_GETLK, tested and never taken (the process's own locks never conflict)."""
    probe = struct.pack(FLOCK, lock_type, os.SEEK_SET, start, length, 0)
    return struct.unpack(FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0] != fcntl.F_UNLCK


def apply_pending(probe: int) -> bool:
    """Whether another process (Litestream's follower) holds the copy's PENDING byte: an apply waits for the
    readers to let go, or holds the copy. SQLite lets a connection join a shared lock its process already holds
    without looking at PENDING, so reads begun meanwhile would keep the apply out for as long as they overlap."""
    return lock_conflicts(probe, fcntl.F_RDLCK, PENDING_BYTE, 1)


def apply_busy() -> sqlite3.OperationalError:
    """The error a read that waits for an apply gets: SQLITE_BUSY, as when SQLite finds the copy locked."""
    error = sqlite3.OperationalError("database is locked: an apply of the replica's copy is pending")
    error.sqlite_errorcode, error.sqlite_errorname = sqlite3.SQLITE_BUSY, "SQLITE_BUSY"
    return error


def after_apply(probe: int, within: float, begin: Callable[..., T], *args: Any) -> T:
    """`begin(*args)` (what begins a read transaction) once no apply of the copy is pending, on the reader's own
    thread; apply_busy() when one still is after `within` seconds."""
    ends = time.monotonic() + within
    while apply_pending(probe):
        if time.monotonic() >= ends:
            raise apply_busy()
        time.sleep(APPLY_POLL)  # the reads in progress end, the apply takes the copy and lets go
    return begin(*args)


Read = Callable[[sqlite3.Connection, DataVersion], T]  # a read: the connection, and the data version it sees
LOOP_SLICE = 0.004  # seconds of reads on the loop run back to back before the loop takes in new requests


def pass_outcome(target: asyncio.Future[T], source: asyncio.Future[T]) -> None:
    """Give `target` the result, exception or cancellation of `source`, unless it is done already (cancelled)."""
    if source.cancelled():
        target.cancel()
    elif (error := source.exception()) is not None:  # retrieved, even when target is done
        if not target.done():
            target.set_exception(error)
    elif not target.done():
        target.set_result(source.result())


def read_in_transaction(conn: sqlite3.Connection, read: Read[T]) -> T:
    """Run `read` in a read transaction of its own, on the connection's thread."""
    conn.execute("BEGIN")
    try:
        return read(conn, read_version(conn))
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def begin_snapshot(conn: sqlite3.Connection) -> DataVersion:
    """Begin a read transaction that stays open, and read its data version (which starts it)."""
    conn.execute("BEGIN")
    return read_version(conn)


class Snapshot:
    """One read transaction held open on a connection of its own (and its thread), opened by Store.snapshot():
    every read() sees the store at `version`, however many commits come meanwhile. close() ends it."""

    def __init__(self, conn: aiosqlite.Connection, version: DataVersion, release: Callable[[], None]) -> None:
        self.conn = conn
        self.version = version
        self._release: Callable[[], None] | None = release

    async def read(self, read: Read[T]) -> T:
        """`read(conn, version)` in the held transaction, on the snapshot's thread."""
        if self._release is None:
            raise StoreUnavailable("the snapshot is closed")
        return await self.conn._execute(read, self.conn._conn, self.version)

    async def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            try:
                await self.conn.close()  # ends the transaction: the ETL may checkpoint past it
            finally:
                release()


# The page cache of each connection of the Store (pooled readers, the loop's, snapshots), in KiB. The OS page cache
# holds the store's file already, and SQLite drops a connection's cache whenever another has committed: SQLite's
# default (2 MiB each) held 8 MB more RSS after random pages and lookups, and made none of them measurably faster.
READER_CACHE_KIB = 256


class Store:
    """The store, read-only: every read goes through read(), on a pooled reader's thread or on the event
    loop's own connection; the store is opened when first needed and reopened when replaced or broken.

    `replica`: the file is a follower copy (rollback journal) that Litestream writes commits into under an
    exclusive lock. The loop's connection then never waits for that lock: watch() keeps the last commit
    until the apply ends, and a read on the loop that finds the copy locked waits on a reader's thread. No
    read transaction begins while an apply is pending (apply_pending), so the reads in progress end and leave
    the apply a moment without readers, however many requests come.
    """

    BUSY_TIMEOUT_MS = 5_000
    READER_WAIT = 2.0  # seconds a request may wait for a free reader before it is answered 503
    SNAPSHOTS = 2  # snapshots (exports) open at once, each a connection and thread beyond the pool's readers

    def __init__(self, path: Path, readers: int = 4, reopen_interval: float = 1.0, replica: bool = False) -> None:
        self.path = path
        self.readers = readers
        self.reopen_interval = reopen_interval
        self.replica = replica
        self._pool: ReaderPool | None = None
        self._opening: asyncio.Task[ReaderPool] | None = None
        self._closed = False  # the server is stopping: nothing opens the store again
        self._next_attempt = 0.0
        self._next_check = 0.0
        # A connection used from the event loop's thread, for what takes microseconds (PRAGMA data_version,
        # a point lookup, a short index range) and would cost more in a thread hop than in the query.
        self._loop_conn: sqlite3.Connection | None = None
        self._change: int | None = None  # PRAGMA data_version as last read
        self._commit: Commit | None = None
        self._commits = 0
        self._seen_this_turn = False
        # Reads waiting for the loop's connection: (result, the request's context, read).
        self._queued: collections.deque[tuple[asyncio.Future[Any], contextvars.Context, Read[Any]]] = (
            collections.deque()
        )
        self._runner: asyncio.Task[None] | None = None
        self._snapshots = asyncio.Semaphore(self.SNAPSHOTS)
        self._open_snapshots: set[Snapshot] = set()  # closed by close(): a stream cut off at shutdown may not

    @property
    def lock_path(self) -> Path:
        """The file the ETL holds an exclusive POSIX lock on while it runs: beside the store's own file, whatever
        path (a symlink) names it, as etl.acquire_lock takes it."""
        real = self.path.resolve()
        return real.with_name(real.name + ".etl-lock")

    async def open(self) -> None:
        """Open the pool now if it is not open; a failure is remembered, not raised."""
        with contextlib.suppress(StoreUnavailable):
            await self._ready_pool()

    async def close(self) -> None:
        """Close every reader; requests still waiting for one are answered 503."""
        self._closed = True
        if self._opening is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._opening  # its connections are the pool's, closed below with it
        self._forget_loop_conn()
        for snapshot in list(self._open_snapshots):
            await snapshot.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            await self._discard(pool)  # closes the idle readers; each busy one is closed by its read when it ends

    async def watch(self) -> Commit:
        """The store as its latest commit left it, looked at once per turn of the event loop.

        PRAGMA data_version moves whenever another connection commits; a request sees the store as it
        was at some instant after it arrived, because the look is forgotten by a callback queued behind
        the requests of this turn, which runs before any request whose bytes arrive later.
        """
        if self._seen_this_turn and self._commit is not None:
            return self._commit
        if self._loop_conn is None or time.monotonic() >= self._next_check:
            await self._ready_pool()  # opens the store, or notices a file changed under it
        conn = self._loop_conn
        assert conn is not None
        try:
            if self._apply_pending():
                raise apply_busy()
            change = conn.execute("PRAGMA data_version").fetchone()[0]
            if change != self._change or self._commit is None:
                self._commits += 1
                self._change, self._commit = change, Commit(self._commits, read_version(conn))
        except sqlite3.Error as error:
            if self._applying(error) and self._commit is not None:
                return self._commit  # the copy is the last commit until the apply's lock goes
            await self.fail(error)
            raise StoreUnavailable(f"store {self.path} is not readable: {error}") from None
        self._seen_this_turn = True
        asyncio.get_running_loop().call_soon(self._next_turn)
        return self._commit

    def _next_turn(self) -> None:
        self._seen_this_turn = False

    @property
    def seen(self) -> Commit | None:
        """The commit watch() found this turn of the loop, if it looked already: no await, no read."""
        return self._commit if self._seen_this_turn else None

    async def read(self, read: Read[T], *, on_loop: bool = False) -> T:
        """`read(conn, version)` in one read transaction: on the loop's own connection when `on_loop` (for reads
        of at most a few hundred microseconds: call watch() first; see read_soon()), else on a pooled reader's
        thread.

        A store fault (STORE_FAULTS) is a StoreUnavailable, and a broken store is reopened later;
        ReadersBusy when no reader comes free within READER_WAIT seconds.
        """
        if on_loop:
            return await self.read_soon(read)
        try:
            return await self._read_in_thread(read)
        except sqlite3.Error as error:
            raise await self._fault(error) from None

    def read_soon(self, read: Read[T]) -> asyncio.Future[T]:
        """read(read, on_loop=True) as a future, for a caller that shares it without a task of its own: call watch()
        first. The read is queued for the loop's connection: one task runs the queue in the order asked for, back
        to back, letting the loop take in new requests every LOOP_SLICE seconds, so no request waits more than a
        slice beyond those ahead of it. A cancelled future's read does not run."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued.append((future, contextvars.copy_context(), read))  # its log lines keep the request's id
        if self._runner is None:
            self._runner = asyncio.create_task(self._run_queued())
        return future

    async def _after_loop_failure(self, read: Read[T], error: sqlite3.Error) -> T:
        """The end of read(on_loop=True) whose read on the loop failed with a store fault, or found a replica's copy
        locked by an apply (then it reads on a reader's thread instead)."""
        try:
            if not self._applying(error):
                raise error
            return await self._read_in_thread(read)
        except sqlite3.Error as failure:
            raise await self._fault(failure) from None

    async def _fault(self, error: sqlite3.Error) -> StoreUnavailable:
        """For a store fault (STORE_FAULTS): fail() (the store is reopened later) and the StoreUnavailable to raise;
        any other SQLite error is raised again as it is."""
        if sqlite_code(error) not in STORE_FAULTS:
            raise error
        await self.fail(error)
        return StoreUnavailable(f"store {self.path} is not readable: {error}")

    def _applying(self, error: sqlite3.Error) -> bool:
        """Whether a read on the loop's connection found a replica's copy locked by an apply."""
        return self.replica and sqlite_code(error) == sqlite3.SQLITE_BUSY

    async def snapshot(self) -> Snapshot:
        """A Snapshot of the store as it is now, on a new read-only connection: close it when done. ReadersBusy
        when SNAPSHOTS are open for READER_WAIT seconds; StoreUnavailable when the store cannot be read."""
        await self._take_snapshot_slot()
        pool: ReaderPool | None = None
        try:
            pool = await self._ready_pool()
            pool.users += 1
            conn = await self._connect()
            try:
                version = await self._begin(pool, conn, begin_snapshot, conn._conn)
            except BaseException:
                await conn.close()
                raise
        except BaseException as error:
            self._snapshots.release()
            if pool is not None:
                self._let_go(pool)
            if isinstance(error, sqlite3.Error):
                raise await self._fault(error) from None
            raise
        snapshot = Snapshot(conn, version, lambda: self._snapshot_closed(snapshot, pool))
        self._open_snapshots.add(snapshot)
        return snapshot

    async def _take_snapshot_slot(self) -> None:
        """One of the SNAPSHOTS slots, within READER_WAIT seconds; else ReadersBusy."""
        try:
            async with asyncio.timeout(self.READER_WAIT):
                await self._snapshots.acquire()
        except TimeoutError:
            raise ReadersBusy(f"{self.SNAPSHOTS} exports of {self.path} are running; none ended in time") from None

    async def snapshot_possible(self) -> None:
        """What snapshot() would wait for, without a snapshot (HEAD of an export): ReadersBusy as it would."""
        await self._take_snapshot_slot()
        self._snapshots.release()

    def _snapshot_closed(self, snapshot: Snapshot, pool: ReaderPool) -> None:
        self._open_snapshots.discard(snapshot)
        self._snapshots.release()
        self._let_go(pool)

    async def _begin(self, pool: ReaderPool, conn: aiosqlite.Connection, begin: Callable[..., T], *args: Any) -> T:
        """`begin(*args)` on the connection's thread; on a replica, once no apply is pending (after_apply)."""
        # aiosqlite runs each connection's calls on that connection's thread; _execute is the door its
        # own methods use (aiosqlite is pinned): the whole read is one trip there, not one per statement.
        return await conn._execute(self._gated(pool, begin), *args)

    def _gated(self, pool: ReaderPool, begin: Callable[..., T]) -> Callable[..., T]:
        """`begin`, or on a replica `begin` once no apply is pending (after_apply, within the busy timeout)."""
        if pool.probe is None:
            return begin
        return functools.partial(after_apply, pool.probe, self.BUSY_TIMEOUT_MS / 1000, begin)

    def _let_go(self, pool: ReaderPool) -> None:
        """One of the pool's connections is closed; the last of a broken pool's closes its probe."""
        pool.users -= 1
        if pool.broken and pool.users == 0 and pool.probe is not None:
            os.close(pool.probe)
            pool.probe = None

    def _apply_pending(self) -> bool:
        """Whether an apply of the replica's copy is pending (never, on a primary)."""
        pool = self._pool
        return pool is not None and pool.probe is not None and apply_pending(pool.probe)

    async def _read_in_thread(self, read: Read[T]) -> T:
        pool, conn = await self._borrow()
        try:
            return await self._begin(pool, conn, read_in_transaction, conn._conn, read)
        finally:
            if pool.broken:  # a dropped pool's busy connection is closed by the read that had it
                await conn.close()
                self._let_go(pool)
            else:
                pool.idle.put_nowait(conn)

    async def _run_queued(self) -> None:
        try:
            while self._queued:
                self._run_slice(time.perf_counter() + LOOP_SLICE)
                if self._queued:
                    await asyncio.sleep(0)  # the loop looks for new requests, and runs what they are ready to do
        finally:
            self._runner = None
            while self._queued:  # left only when this task was cancelled (the loop closing): nobody waits on
                future = self._queued.popleft()[0]
                if not future.done():
                    future.set_exception(StoreUnavailable(f"store {self.path} is closed: the server is stopping"))

    def _run_slice(self, ends: float) -> None:
        """Run queued reads until `ends` (at least one), all in one read transaction: every read of a slice
        was asked for before the slice began, so one snapshot serves them all."""
        conn = self._loop_conn
        version: DataVersion | None = None
        try:
            while self._queued:
                future, context, read = self._queued.popleft()
                if future.done():  # its request was cancelled
                    continue
                try:
                    if conn is None:
                        raise StoreUnavailable(f"store {self.path} is not open")
                    if version is None:
                        if self._apply_pending():  # the read waits for it on a reader's thread
                            raise apply_busy()
                        conn.execute("BEGIN")
                        version = read_version(conn)
                    future.set_result(context.run(read, conn, version))
                except sqlite3.Error as error:  # the next read begins afresh, if the store still lets it
                    self._rollback(conn)
                    version = None
                    if self._applying(error) or sqlite_code(error) in STORE_FAULTS:
                        ending = self._after_loop_failure(read, error)
                        task = asyncio.get_running_loop().create_task(ending, context=context)
                        task.add_done_callback(functools.partial(pass_outcome, future))
                    else:  # the read's own (a bug), not the store's
                        future.set_exception(error)
                except Exception as error:  # the request's own task raises it
                    future.set_exception(error)
                if time.perf_counter() >= ends:
                    break
        finally:
            self._rollback(conn)

    @staticmethod
    def _rollback(conn: sqlite3.Connection | None) -> None:
        if conn is not None and conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    async def _ready_pool(self) -> ReaderPool:
        pool = self._pool
        if pool is not None and (time.monotonic() < self._next_check or await self._still_current(pool)):
            return pool
        if self._pool is not None:  # another request opened the store again while this one dropped it
            return self._pool
        if self._closed:
            raise StoreUnavailable(f"store {self.path} is closed: the server is stopping")
        if self._opening is None:
            if time.monotonic() < self._next_attempt:
                raise StoreUnavailable(f"store {self.path} is not readable; retrying shortly")
            self._opening = asyncio.get_running_loop().create_task(self._open_pool())
        # A task of its own, which every request asking meanwhile awaits: a request cancelled while it
        # waits leaves no connection half open, whose thread would keep the process from exiting.
        return await asyncio.shield(self._opening)

    async def _open_pool(self) -> ReaderPool:
        info = store_file(self.path)
        connections: list[aiosqlite.Connection] = []
        probe: int | None = None
        try:
            if info is None:
                raise OSError(f"no file at {self.path}")
            if self.replica:  # before any connection: it is closed once they all are
                probe = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(probe).st_ino != info.st_ino:
                    raise OSError(f"{self.path} was replaced while it was opened")
            for _ in range(self.readers):
                connections.append(await self._connect())
            loop_conn = self._connect_on_loop()
        except (sqlite3.Error, OSError) as error:
            for conn in connections:
                await conn.close()
            if probe is not None:
                os.close(probe)
            self._next_attempt = time.monotonic() + self.reopen_interval
            raise StoreUnavailable(f"cannot open store {self.path}: {error}") from None
        finally:
            self._opening = None
        idle: asyncio.Queue[aiosqlite.Connection | None] = asyncio.Queue()
        for conn in connections:
            idle.put_nowait(conn)
        identity, written = (info.st_dev, info.st_ino), (info.st_size, info.st_mtime_ns)
        self._pool, self._loop_conn = ReaderPool(idle, identity, written, probe=probe, users=self.readers), loop_conn
        self._next_check = time.monotonic() + self.reopen_interval
        log.info("store opened", db=str(self.path), readers=self.readers)
        return self._pool

    def _uri(self) -> str:
        return f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"  # '?', '#', '%' of a path escaped

    async def _connect(self) -> aiosqlite.Connection:
        if not self.path.is_file():
            raise OSError(f"no such file: {self.path}")
        conn = await aiosqlite.connect(
            self._uri(), uri=True, isolation_level=None, timeout=self.BUSY_TIMEOUT_MS / 1000, detect_types=COLUMN_TYPES
        )
        try:
            await conn._execute(self._read_only, conn._conn, self.BUSY_TIMEOUT_MS)
        except sqlite3.Error:
            await conn.close()
            raise
        return conn

    def _connect_on_loop(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._uri(), uri=True, isolation_level=None, detect_types=COLUMN_TYPES)
        try:
            # On a replica, SQLITE_BUSY at once: the event loop never sleeps in SQLite's busy handler.
            self._read_only(conn, busy_timeout_ms=0 if self.replica else self.BUSY_TIMEOUT_MS)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    @staticmethod
    def _read_only(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        conn.execute("PRAGMA query_only = 1")
        conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        conn.create_function("fold", 1, fold_sql, deterministic=True)
        conn.set_authorizer(authorize_read)

    def _forget_loop_conn(self) -> None:
        conn, self._loop_conn = self._loop_conn, None
        self._change = self._commit = None
        self._seen_this_turn = False
        if conn is not None:
            conn.close()

    async def _still_current(self, pool: ReaderPool) -> bool:
        """Whether the file at path is still the one the pool opened; if not, drop the pool.

        A file deleted or replaced (renamed over) has another (device, inode), or none. The ETL's commits
        and checkpoints keep the file and the pool. A file written since the last look is read afresh,
        past every cache, by a new connection: a store overwritten in place fails that read.
        """
        self._next_check = time.monotonic() + self.reopen_interval
        info = store_file(self.path)
        if info is None or (info.st_dev, info.st_ino) != pool.identity:
            log.warning("store file changed", db=str(self.path), present=info is not None)
            await self._discard(pool, retry_in=None if info is None else 0)
            return False
        written = (info.st_size, info.st_mtime_ns)
        if written != pool.written:
            pool.written = written
            try:
                await asyncio.to_thread(self._gated(pool, self._read_afresh))
            except sqlite3.Error as error:
                log.warning("store unreadable", db=str(self.path), reason=str(error))
                if sqlite_code(error) == sqlite3.SQLITE_BUSY:  # locked past the busy timeout by an apply: not broken
                    return True
                await self._discard(pool)
                return False
        return True

    def _read_afresh(self) -> None:
        """Read the store's header, schema and data version through a new connection, which has no cache."""
        with contextlib.closing(sqlite3.connect(self._uri(), uri=True, timeout=self.BUSY_TIMEOUT_MS / 1000)) as conn:
            read_version(conn)

    async def fail(self, error: sqlite3.Error) -> None:
        """A read found the store broken (corrupt, truncated, I/O error): reopen it later.

        A busy store is not broken: a lock held past the busy timeout (Litestream applying a commit to a
        replica's copy under load) fails that read only, and the pool stays.
        """
        log.warning("store unreadable", db=str(self.path), reason=str(error))
        if self._pool is not None and sqlite_code(error) != sqlite3.SQLITE_BUSY:
            await self._discard(self._pool)

    async def _discard(self, pool: ReaderPool, retry_in: float | None = None) -> None:
        """Drop a pool whose store broke or changed; a request after `retry_in` seconds opens a new one."""
        if self._pool is pool:
            self._pool = None
            self._forget_loop_conn()
            self._next_attempt = time.monotonic() + (self.reopen_interval if retry_in is None else retry_in)
        pool.broken = True
        pool.users += 1  # held while its idle readers close: a pool with none left open closes its probe below
        while not pool.idle.empty():
            conn = pool.idle.get_nowait()
            if conn is not None:
                await conn.close()
                self._let_go(pool)
        self._let_go(pool)
        pool.idle.put_nowait(None)  # wakes the requests waiting for a reader of it: they go to the new pool

    async def _borrow(self) -> tuple[ReaderPool, aiosqlite.Connection]:
        """A free reader of the current pool, waited for at most READER_WAIT seconds in all."""
        deadline = asyncio.get_running_loop().time() + self.READER_WAIT
        while True:
            pool = await self._ready_pool()
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await pool.idle.get()
            except TimeoutError:
                raise ReadersBusy(f"no reader of {self.path} came free in {self.READER_WAIT:g} s") from None
            if conn is not None:
                return pool, conn
            pool.idle.put_nowait(None)  # the pool was dropped while this request waited: on to the next one

    def etl_running(self) -> bool:
        """True while an ETL process holds the store's writer lock (tested, never taken)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return lock_conflicts(fd, fcntl.F_WRLCK)
        except OSError:
            return False
        finally:
            os.close(fd)


# --- queries --------------------------------------------------------------

TEXT_FIELDS = ("asset_id", "symbol", "name", "status", "source")
NUMBER_FIELDS = ("rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct")
TIME_FIELDS = ("updated_at",)
FILTER_FIELDS = TEXT_FIELDS + NUMBER_FIELDS + TIME_FIELDS
SORT_FIELDS = (*NUMBER_FIELDS, "symbol", "name", "updated_at")
NULLABLE_SORTS = frozenset(NUMBER_FIELDS)
COVERED_SORTS = frozenset({"rank"})  # their index holds every column (store.sql): OFFSET stays in the index
# How each sort field is ordered in SQL: the expression of its index.
SORT_EXPRESSIONS = {field: field for field in SORT_FIELDS} | {"name": "name COLLATE NOCASE"}
STATUSES = ("active", "inactive")
DATA_PARAMS = ("page", "page_size", "filter_by", "sort", "cursor", "as_of", "fields", "format")
# The selection of /data, not its paging: an export with as_of reads the moment's market (MarketSnapshot).
EXPORT_PARAMS = ("filter_by", "sort", "as_of", "fields", "format")
LIST_PARAMS = frozenset({"filter_by", "fields"})  # comma-separated, with spaces allowed around each item
# The media types of records: `format` names one, else the Accept header chooses (preferred_format).
FORMATS = {"json": falcon.MEDIA_JSON, "csv": "text/csv; charset=utf-8", "ndjson": "application/x-ndjson"}
PAGE_FORMATS = ("json", "csv", "ndjson")  # the first is the default
EXPORT_FORMATS = ("csv", "ndjson")
ASSET_FIELDS = Asset.__struct_fields__
DETAIL_FIELDS = AssetDetail.__struct_fields__
SORTS = tuple(prefix + field for field in SORT_FIELDS for prefix in ("", "-"))
MAX_PAGE = 999_999_999
CURSOR = re.compile(r"[A-Za-z0-9_-]{12,512}")

# The syntax of filter_by, in the dialect shared by Python and JSON Schema (ECMA-262): the parser's
# words, lower-case, with plain spaces. The API refuses what it does not match, so the pattern that
# the OpenAPI document publishes is exactly as strict as the API. A value (spaces, then something) has one
# way to match, so refusing a long filter costs time linear in its length, on the event loop; written
# `[^,]*[^ ,][^,]*`, the same language, it backtracks through a quadratic number of ways.
VALUE_SYNTAX = " *[^ ,][^,]*"
CONDITION_SYNTAX = (
    f"(?:{'|'.join(STATUSES)}"
    f"|(?:{'|'.join(TEXT_FIELDS)}) *[:~]{VALUE_SYNTAX}"
    f"|(?:{'|'.join(NUMBER_FIELDS + TIME_FIELDS)}) *(?::|[<>]=?){VALUE_SYNTAX})"
)
FILTER_SYNTAX = f" *(?:{CONDITION_SYNTAX} *(?:, *{CONDITION_SYNTAX} *)*)?"
CONDITION_PART = re.compile(f" *{CONDITION_SYNTAX} *")
FILTER = re.compile(FILTER_SYNTAX)

OPERATOR = re.compile(r">=|<=|[:~<>]")
NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)  # re.ASCII: \d is 0-9 only
# What one filter_by may ask, within SQLite's limits: each condition and each alternative of a `~` is a term of one
# SQL expression (at most 1,000 deep), and each `~` text a LIKE pattern (at most 50,000 bytes). Stored names are at
# most 200 characters and source names a file name's length, so a longer text matches nothing anyway.
MAX_CONDITIONS = 100
MAX_CONTAINS = 100  # alternatives of one `~` condition
MAX_CONTAINS_TEXT = 1_000  # characters of one `~` text
ASSET_COLUMNS = ", ".join(Asset.__struct_fields__)  # in the order of the Struct, which is built from the row
QUOTE_COLUMNS = ", ".join(Quote.__struct_fields__)
# A page's rows are a thousand cells, and CPython 3.11's sqlite3 lets go of the GIL and takes it back around each
# cell it converts itself (a third of the cost of reading them). A column named "x [decoded]" or "x [whole]" is
# converted by a converter instead, which holds the GIL: the text columns that are never empty (an empty text would
# read None: the ETL refuses a missing symbol or name) and the rank (an integer, whose text is exact; a REAL's is not).
DECODED_TEXT, WHOLE = "decoded", "whole"
COLUMN_TYPES = sqlite3.PARSE_COLNAMES  # how the API's connections choose converters: by a column's name
sqlite3.register_converter(DECODED_TEXT, bytes.decode)
sqlite3.register_converter(WHOLE, int)
CONVERTED = {field: DECODED_TEXT for field in ("asset_id", "symbol", "name", "status", "sources", "updated_at")}
CONVERTED["rank"] = WHOLE
PAGE_COLUMNS = ", ".join(f'{f} AS "{f} [{CONVERTED[f]}]"' if f in CONVERTED else f for f in Asset.__struct_fields__)


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
    as_of: int | None = None  # Unix seconds: the market as it was then; None: as it is
    fields: tuple[str, ...] = ()  # of each record, in this order; () all
    format: str = "json"

    @cached_property
    def filter_text(self) -> str:
        return ",".join(map(str, self.conditions))

    @property
    def offset(self) -> int:
        """Rows before the page (of `page`; a cursor's page starts after its key instead)."""
        return (self.page - 1) * self.page_size

    @cached_property
    def digest(self) -> str:
        """Fingerprint of filter, sort and as_of: what a cursor is bound to."""
        key = f"{self.filter_text}\n{self.sort}" + ("" if self.as_of is None else f"\n{self.as_of}")
        return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()

    def etag(self, data_version: str) -> str:
        key = (
            f"{data_version}\n{self.filter_text}\n{self.sort}\n{self.page_size}\n{self.cursor or self.page}"
            f"\n{','.join(self.fields)}\n{self.format}"
        )
        key += "" if self.as_of is None else f"\n{self.as_of}"
        return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def parse_asset_query(
    params: Mapping[str, str], known: Sequence[str] = DATA_PARAMS, formats: Sequence[str] = PAGE_FORMATS
) -> AssetQuery:
    """Turn the query string of GET /data (or of /data/export: `known` and `formats`) into an AssetQuery, or raise
    InvalidQuery."""
    check_params(params, known)
    cursor = params.get("cursor") or None
    page = parse_int("page", params.get("page", "1"), 1, MAX_PAGE)  # checked even when a cursor overrides it
    return AssetQuery(
        conditions=parse_filter(params.get("filter_by", "")),
        sort=parse_sort(params.get("sort")),
        page=1 if cursor else page,
        page_size=parse_int("page_size", params.get("page_size", "10"), 1, 100),
        cursor=cursor,
        as_of=parse_moment("as_of", params["as_of"], math.floor) if params.get("as_of") else None,
        fields=parse_fields(params.get("fields"), ASSET_FIELDS),
        format=parse_format(params.get("format"), formats),
    )


def parse_fields(text: str | None, known: Sequence[str]) -> tuple[str, ...]:
    """fields: comma-separated names of `known`, each once, kept in the order given; absent: () (all)."""
    if not text:
        return ()
    names = tuple(name.strip(" ") for name in text.split(","))  # spaces around a name, as filter_by takes them
    for at, name in enumerate(names):
        if name not in known:
            what = f"unknown field {name[:40]!r}" if name else "an empty name (two commas in a row, or one at an end)"
            raise InvalidQuery(f"fields: {what}; fields: {', '.join(known)}")
        if name in names[:at]:
            raise InvalidQuery(f"fields: {name!r} given twice")
    return names


def fields_pattern(known: Sequence[str]) -> str:
    """The syntax of `fields` that parse_fields reads, for the OpenAPI document (ECMA-262): names of `known`
    separated by commas, spaces around each."""
    name = f" *(?:{'|'.join(known)}) *"
    return f"^(?:{name}(?:,{name})*)?$"


def parse_format(text: str | None, formats: Sequence[str]) -> str:
    """format: one of `formats`; absent: the first."""
    if text is None:
        return formats[0]
    if text not in formats:
        raise InvalidQuery(f"format: one of {', '.join(formats)}, got {text[:20]!r}")
    return text


def check_params(params: Mapping[str, str], known: Sequence[str]) -> None:
    """InvalidQuery naming the first parameter not in `known` (in sorted order), else one whose value has whitespace
    at an end: no value is trimmed, but the items of the lists (LIST_PARAMS), which spaces may surround."""
    unknown = [name for name in params if name not in known]
    if unknown:
        raise InvalidQuery(f"unknown parameter {min(unknown)[:40]!r}; known: {', '.join(known) or 'none'}")
    for name, value in params.items():
        if (value[:1].isspace() or value[-1:].isspace()) and name not in LIST_PARAMS:
            raise InvalidQuery(
                f"{name}: {value[:40]!r} has whitespace at an end; send the value alone (a '+' in a URL reads as a"
                " space)"
            )


DIGITS = re.compile(r"[0-9]+")


def parse_int(name: str, text: str, low: int, high: int) -> int:
    """A bounded integer parameter in digits 0-9 (leading zeros or not), or InvalidQuery naming it."""
    if not DIGITS.fullmatch(text):
        raise InvalidQuery(f"{name}: expected an integer from {low} to {high}{digits_hint(text)}, got {text[:40]!r}")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(high)):  # out of range, and not worth int() (which refuses 4,300 digits and more)
        shown = digits if len(digits) <= 40 else f"{digits[:20]}…({len(digits)} digits)"
        raise InvalidQuery(f"{name}: must be from {low} to {high}, got {shown}")
    value = int(digits)
    if not low <= value <= high:
        raise InvalidQuery(f"{name}: must be from {low} to {high}, got {value}")
    return value


def parse_sort(text: str | None) -> Sort:
    """A sortable field, '-' first for descending; absent means rank."""
    if text is None:
        return Sort()
    if text not in SORTS:
        raise InvalidQuery(f"sort: unknown field {text[:40]!r}; sortable: {', '.join(SORT_FIELDS)}, '-' for descending")
    return Sort(text.removeprefix("-"), text.startswith("-"))


def parse_filter(text: str) -> tuple[Condition, ...]:
    """filter_by: comma-separated conditions, normalised, deduplicated and ordered."""
    parts = text.split(",") if text.strip() else []
    if len(parts) > MAX_CONDITIONS:
        raise InvalidQuery(f"filter_by: at most {MAX_CONDITIONS} conditions, got {len(parts)}")
    conditions = {parse_condition(part.strip()) for part in parts}
    if not FILTER.fullmatch(text):
        part = next((part for part in text.split(",") if not CONDITION_PART.fullmatch(part)), text)
        raise InvalidQuery(
            f"filter_by: {part[:60]!r} is not field, operator, value: fields and statuses are lower-case,"
            " and only plain spaces may surround them"
        )
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
        values: list[str | float] = [fold(value) for value in alternatives]
        if op == "~" and len(set(values)) > MAX_CONTAINS:
            raise InvalidQuery(f"filter_by: {field}~ takes at most {MAX_CONTAINS} alternatives, got {len(set(values))}")
        if op == "~" and (longest := max(map(len, alternatives))) > MAX_CONTAINS_TEXT:
            raise InvalidQuery(
                f"filter_by: a {field}~ text of {longest:,} characters; at most {MAX_CONTAINS_TEXT:,}"
                f" (no {field} is longer)"
            )
        if field == "status" and op == ":" and not set(values) <= set(STATUSES):
            raise InvalidQuery(f"filter_by: status is {' or '.join(STATUSES)}, got {raw[:40]!r}")
    elif op == "~":
        raise InvalidQuery(f"filter_by: {field} is not text: '~' (contains) does not apply")
    elif field in NUMBER_FIELDS:
        values = [parse_number(field, value) for value in alternatives]
    else:
        values = [parse_time(field, op, value) for value in alternatives]
    return Condition(field, op, tuple(sorted(set(values), key=str)))


def parse_number(field: str, text: str) -> float:
    value = float(text) if NUMBER.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise InvalidQuery(f"filter_by: {field} needs a finite number{digits_hint(text)}, got {text[:40]!r}")
    return value


# RFC 3339's date and date-time (seconds and offset optional: UTC when none): fromisoformat alone also takes ISO 8601's
# basic and week forms, which would read 1764072000000 (milliseconds) as 1764-07-20 and 2026-W48 as a date.
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d(?:[Tt ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:[Zz]|[+-]\d\d:\d\d)?)?", re.ASCII)


# RFC 3339's leap second (23:59:60) reads as the second before it: Unix seconds have none (etl.py does the same).
LEAP_SECOND = re.compile(r"(?<=[Tt ]\d\d:\d\d:)60(?=[.Zz+-]|$)", re.ASCII)
# A '+' written raw in a query string arrives as a space: 12:00:00 05:30 was 12:00:00+05:30.
PLUS_AS_SPACE = re.compile(r"(?<=\d\d:\d\d) (?=\d\d:\d\d$)", re.ASCII)
# The times the API reads, in Unix seconds: from Unix time 0 to the last second RFC 3339 can write, so that none
# overflows a datetime and every time it answers with (a history window's from and to) is RFC 3339.
FIRST_SECOND, LAST_SECOND = 0, 253_402_300_799
# Below 10**11, as the ETL reads seconds (more is milliseconds), whatever the leading zeros; a fraction is that
# instant, as the ETL reads it.
UNIX_SECONDS = re.compile(r"-?(?:0*[1-9][0-9]{0,10}|0+)(?:\.[0-9]+)?")
SECOND_FRACTION = re.compile(r"\.[0-9]+", re.ASCII)  # of an RFC 3339 time: the one "." it may hold


def read_rfc3339(text: str) -> tuple[int, Decimal] | None:
    """An RFC 3339 time or date as Unix seconds (UTC when it names no offset): the whole second and the exact
    fraction of the next (datetime keeps six digits: .0000001 would be 0); None when it is not one."""
    if not RFC3339.fullmatch(text):
        return None
    fraction = SECOND_FRACTION.search(text)
    plain = text if fraction is None else text[: fraction.start()] + text[fraction.end() :]
    try:
        moment = datetime.fromisoformat(LEAP_SECOND.sub("59", plain).replace("z", "Z"))
    except ValueError:
        return None
    moment = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return int(moment.timestamp()), Decimal(fraction[0]) if fraction else Decimal(0)


def read_moment(text: str) -> Decimal | None:
    """Unix seconds or an RFC 3339 time or date (read_rfc3339) as the exact instant in Unix seconds; None when it is
    neither."""
    if UNIX_SECONDS.fullmatch(text):
        return Decimal(text)
    read = read_rfc3339(text)
    return None if read is None else read[0] + read[1]


def digits_hint(text: str) -> str:
    """A hint for an unreadable number written in another script's digits (Arabic-Indic, fullwidth), which int()
    and float() would read: '' for any other."""
    return " (digits 0-9 only)" if any(char.isdigit() and not char.isascii() for char in text) else ""


def time_hint(text: str) -> str:
    """A hint for an unreadable time: digits other than 0-9, its offset's '+' the URL turned into a space, or Unix
    milliseconds ('' for any other)."""
    if hint := digits_hint(text):
        return hint
    if read_rfc3339(PLUS_AS_SPACE.sub("+", text)) is not None:
        return " (a '+' in a URL reads as a space: write the offset's + as %2B)"
    milliseconds = text.isascii() and text.isdigit() and 12 <= len(text.lstrip("0")) <= 14
    return " (Unix seconds, not milliseconds)" if milliseconds else ""


def within_range(name: str, seconds: int, text: str) -> int:
    """Unix seconds the API reads (FIRST_SECOND to LAST_SECOND), or InvalidQuery naming `name`."""
    if seconds < FIRST_SECOND:
        raise InvalidQuery(f"{name}: before 1970-01-01T00:00:00Z (Unix time 0), got {text[:40]!r}")
    if seconds > LAST_SECOND:
        raise InvalidQuery(f"{name}: after 9999-12-31T23:59:59Z, got {text[:40]!r}")
    return seconds


def parse_time(field: str, op: str, text: str) -> str:
    """An RFC 3339 time or date, or Unix seconds, in the store's text form (so text order is time order), compared
    by `op` with stored times (whole seconds) as with the instant itself: a time between two seconds is the later
    one for `>=` and `<`, the earlier for `>` and `<=`, and for `:` a text that no stored time equals."""
    exact = read_moment(text)
    if exact is None:
        raise InvalidQuery(
            f"filter_by: {field} needs an RFC 3339 time or Unix seconds{time_hint(text)}, got {text[:40]!r}"
        )
    whole = math.floor(exact)
    part = exact - whole
    fraction = format(part, "f")[1:] if part else ""  # '.5' of 1795607999.5
    seconds = within_range(f"filter_by: {field}", whole + (bool(fraction) and op in (">=", "<")), text)
    if fraction and op == ":":
        return f"{utc_text(whole)[:-1]}{fraction}Z"
    return utc_text(seconds)


def fold(text: str) -> str:
    """Text as filter_by compares it, letters in any case: ASCII lower-cased (as SQLite's NOCASE and LIKE fold it),
    anything else case-folded in NFKC (the names' stored form), Unicode's default caseless match: ẞ, ß and SS are
    one, as are İ and its lower case, i and U+0307; dotless i is a letter of its own (a ticker's is stored as I)."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def fold_sql(value: object) -> object:
    """fold() as the SQL function fold(), which the API's connections have."""
    return fold(value) if isinstance(value, str) else value


# The stored texts a folded one matches, as an index compares them. A name or symbol (stored in NFKC) beyond ASCII
# folds to ASCII only when ß or ẞ make its 'ss' (the ETL's upper-case tickers: ẞ, or SS); otherwise an ASCII text
# (NOCASE folds its letters) or a ticker (upper-cased as the ETL does: dotless i is I) has one spelling. The only
# ASCII letters in the fold of a character beyond ASCII are those of ß and ẞ (ss) and of İ (i, then U+0307): a
# contained ASCII text with no s, and no i at its end, is found by LIKE alone. Source names are matched in Python
# (SourceFilter).
SHARP_S = {"s": "ßẞ", "S": "ẞ"}  # what a pair of s may be, in a folded text and in a ticker
MAX_SPELLINGS = 64  # of one value; a value with more of them (a long run of s) is compared through fold()


def ticker(folded: str) -> str:
    """A folded text as the ETL stores a symbol: upper-case NFKC."""
    return folded.upper() if folded.isascii() else unicodedata.normalize("NFKC", folded.upper())


def spellings(text: str, letter: str) -> list[str] | None:
    """`text` with each pair of `letter` (s, or S in a ticker) also written as each sharp s that folds to it; None
    when there are more than MAX_SPELLINGS."""
    sharps = SHARP_S[letter]
    runs = re.split(f"({letter}{letter}+)", text)  # the odd parts are the runs of two or more
    count = 1
    for run in runs[1::2]:
        ways = [1, 1]  # of a run of n: its first letter as is then a run of n - 1, or a sharp s then one of n - 2
        for _ in run[1:]:
            ways.append(min(ways[-1] + len(sharps) * ways[-2], MAX_SPELLINGS + 1))
        count = min(count * ways[-1], MAX_SPELLINGS + 1)
    if count > MAX_SPELLINGS:
        return None
    options = [[part] if at % 2 == 0 else list(run_spellings(part, sharps)) for at, part in enumerate(runs)]
    return ["".join(parts) for parts in itertools.product(*options)]


def run_spellings(run: str, sharps: str) -> Iterator[str]:
    """Each spelling of a run of s: its first as is, then the rest's; or its first two as each sharp s, then the
    rest's."""
    if len(run) < 2:
        yield run
        return
    yield from (run[0] + rest for rest in run_spellings(run[1:], sharps))
    yield from (sharp + rest for sharp in sharps for rest in run_spellings(run[2:], sharps))


def beyond_ascii(column: str) -> str:
    """SQL true when a text column holds a character beyond ASCII: more bytes than characters in UTF-8 (the
    store's encoding), as SQLite counts them in C; GLOB '*[^ -~]*' takes four times as long."""
    return f"length({column}) < length(CAST({column} AS BLOB))"


@functools.lru_cache(maxsize=1_024)  # a page reads its conditions two or three times (count, rows, nulls)
def condition_sql(condition: Condition) -> tuple[str, tuple]:
    """One condition on the asset's own columns as SQL; identifiers come from the allow-lists, values are bound. A
    name or symbol is found through its index (ASCII letters in either case, as SQLite's NOCASE and LIKE fold them;
    a symbol upper-case) in each spelling its folded value has; a value beyond ASCII, which no index can serve, by
    fold() of the texts beyond ASCII."""
    field, op, values = condition.field, condition.op, condition.values
    column = field
    tests: list[str] = []
    patterns: list[object] = []
    folded: list[object] = []  # the values compared through fold()
    if op == "~":
        whole: list[object] = []  # texts holding a NUL, where LIKE would end its pattern: compared whole by instr()
        for value in map(str, values):
            if "\x00" in value:
                whole.append(value)
                continue
            if value.isascii():
                tests.append(f"{column} LIKE ? ESCAPE '\\'")
                patterns.append("%" + re.sub(r"([\\%_])", r"\\\1", value) + "%")
            if not value.isascii() or "s" in value or value.endswith("i"):
                folded.append(value)
        if folded:
            each = " OR ".join(f"instr(fold({column}), ?) > 0" for _ in folded)
            tests.append(f"({beyond_ascii(column)} AND ({each}))")
            patterns.extend(folded)
        tests.extend(f"instr(fold({column}), ?) > 0" for _ in whole)
        patterns.extend(whole)
    elif op == ":" and field in ("name", "symbol"):
        known: list[str] = []
        for value in map(str, values):
            if field == "symbol" or value.isascii():
                plain = ticker(value) if field == "symbol" else value
                found = spellings(plain, "S" if field == "symbol" else "s")
                known.extend(found or [plain])
                if found is None:  # too many spellings to list
                    folded.append(value)
            else:
                folded.append(value)
        if known:
            collation = "" if field == "symbol" else " COLLATE NOCASE"
            tests.append(f"{column}{collation} IN ({', '.join('?' * len(known))})")
            patterns.extend(known)
        if folded:
            tests.append(f"({beyond_ascii(column)} AND fold({column}) IN ({', '.join('?' * len(folded))}))")
            patterns.extend(folded)
    elif op == ":":
        tests.append(f"{field} IN ({', '.join('?' * len(values))})")
        patterns.extend(values)
    else:
        tests.append(f"{field} {op} ?")
        patterns.extend(values)
    return f"({' OR '.join(tests)})", tuple(patterns)


# filter_by=source reads the listings of the sources it names, after finding their stored names in Python: a store
# has a few sources, and fold() compares their names. An asset matches when one of its listings is of a named source
# and has been observed (source_map.observed_at). The store's names are read a seek each in source_map's key (SQLite
# reads DISTINCT by a scan of every listing).
SOURCE_NAMES = """
WITH RECURSIVE named (source) AS (
    SELECT min(source) FROM source_map
    UNION ALL
    SELECT (SELECT min(source) FROM source_map WHERE source > named.source) FROM named WHERE named.source IS NOT NULL
)
SELECT source FROM named WHERE source IS NOT NULL
"""
# Sources with at most this many listings drive a page: their listings' assets are read and sorted (a page costs
# their number, however the sort orders them). Beyond it, a page walks the sort order and looks each asset's listings
# up (a dense match fills a page at once; a rare one is found among few listings). Counting the listings stops here.
FEW_LISTINGS = 10_000
# The assets of one source condition alone, counted from the listings of its sources: their observed listings, less
# those beyond the first of each asset with several (found in source_map's asset order: no set of every asset built).
# The unary + keeps the source out of the key chosen for the lookups by asset.
LISTED_ASSETS = """
SELECT (SELECT count(*) FROM source_map WHERE source IN ({names}) AND observed_at IS NOT NULL)
     - (SELECT coalesce(sum(observed - 1), 0) FROM (
            SELECT count(*) AS observed
            FROM (SELECT asset_id FROM source_map WHERE +source IN ({names}) GROUP BY asset_id HAVING count(*) > 1) a
            JOIN source_map m ON m.asset_id = a.asset_id AND +m.source IN ({names}) AND m.observed_at IS NOT NULL
            GROUP BY a.asset_id))
"""


@dataclass(frozen=True)
class SourceFilter:
    """The source conditions of a filter as one store resolves them: the stored names each matches, and whether the
    fewest listings of one of them are FEW_LISTINGS or fewer."""

    names: Mapping[Condition, tuple[str, ...]] = field(default_factory=dict)
    few: bool = True


def source_matches(condition: Condition, name: str) -> bool:
    """Whether a stored source name meets a source condition, as filter_by compares texts (fold())."""
    folded = fold(name)
    if condition.op == ":":
        return folded in condition.values
    return any(str(value) in folded for value in condition.values)


def resolve_sources(conn: sqlite3.Connection, conditions: Sequence[Condition]) -> SourceFilter:
    """The SourceFilter of `conditions` in the store of `conn` (in its read transaction)."""
    asked = [condition for condition in conditions if condition.field == "source"]
    if not asked:
        return SourceFilter()
    stored = [name for (name,) in conn.execute(SOURCE_NAMES)]
    names = {condition: tuple(n for n in stored if source_matches(condition, n)) for condition in asked}
    fewest = FEW_LISTINGS + 1
    for matched in names.values():
        if not matched:
            return SourceFilter(names)  # nothing matches: the filter is false, and SQLite reads nothing
        marks = ", ".join("?" * len(matched))
        sql = f"SELECT count(*) FROM (SELECT 1 FROM source_map WHERE source IN ({marks}) LIMIT ?)"
        ((listings,),) = conn.execute(sql, (*matched, fewest)).fetchall()
        fewest = min(fewest, listings)
    return SourceFilter(names, fewest <= FEW_LISTINGS)


def kept_sources(conn: sqlite3.Connection, query: AssetQuery, commit: Commit) -> SourceFilter:
    """resolve_sources() of the query's conditions, once per commit for a filter by source."""
    if not any(condition.field == "source" for condition in query.conditions):
        return SourceFilter()
    kept, key = commit.sources, query.filter_text
    if key not in kept:
        if len(kept) >= COUNTS_KEPT:
            kept.clear()
        kept[key] = resolve_sources(conn, query.conditions)
    return kept[key]


def source_sql(names: Sequence[str], probe: bool) -> str:
    """A source condition resolved to stored `names` (bound in this order) as SQL: the assets of their observed
    listings, or (`probe`) a lookup of the asset's listings; the unary + keeps source_map's key (source, source_id)
    out of that lookup, where SQLite would read every listing of the source for each asset."""
    if not names:
        return "0"
    marks = ", ".join("?" * len(names))
    if probe:
        return (
            "EXISTS (SELECT 1 FROM source_map m WHERE m.asset_id = asset.asset_id"
            f" AND +m.source IN ({marks}) AND m.observed_at IS NOT NULL)"
        )
    return f"asset_id IN (SELECT asset_id FROM source_map WHERE source IN ({marks}) AND observed_at IS NOT NULL)"


def where_sql(conditions: Sequence[Condition], sources: SourceFilter) -> tuple[str, tuple]:
    """All conditions ANDed into one WHERE clause ('1' when there are none), the source ones as `sources` resolves
    them: a lookup of each asset's listings when they are not few."""
    probe = not sources.few
    parts, params = [], []
    for condition in conditions:
        if condition.field == "source":
            names = sources.names[condition]
            sql, values = source_sql(names, probe), names
        else:
            sql, values = condition_sql(condition)
        parts.append(sql)
        params.extend(values)
    return " AND ".join(parts) or "1", tuple(params)


def segment_sql(
    query: AssetQuery, sources: SourceFilter, in_nulls: bool, after: CursorToken | None, limit: int, offset: int
) -> tuple[str, tuple]:
    """One ordered run of the result: rows with a sort value, or (nullable sorts) the rows without.

    Splitting nulls-last into two index range scans lets SQLite walk the
    (column, asset_id) index in either direction instead of sorting.
    """
    where, params = where_sql(query.conditions, sources)
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
    condition = " AND ".join([where, *clauses])
    if not offset or sort.field in COVERED_SORTS:
        sql = f"SELECT {PAGE_COLUMNS} FROM asset WHERE {condition} ORDER BY {order} LIMIT ? OFFSET ?"
        return sql, (*params, *keys, limit, offset)
    # Rows skipped by OFFSET are stepped over in the (column, asset_id) index
    # alone; only the page's own rows are read from the table.
    keys_sql = f"SELECT asset_id FROM asset WHERE {condition} ORDER BY {order} LIMIT ? OFFSET ?"
    sql = f"SELECT {PAGE_COLUMNS} FROM asset WHERE asset_id IN ({keys_sql}) ORDER BY {order}"
    return sql, (*params, *keys, limit, offset)


def cursor_key(version: DataVersion) -> bytes:
    """The key of cursor tags, per store: a damaged, truncated or foreign token is refused. Not a secret: a token
    built by hand only selects a page after a key of its choosing, through bound parameters."""
    return hashlib.blake2b(version.store_id.encode(), digest_size=32, person=b"kasparro-cursor").digest()


def seal(payload: bytes, version: DataVersion) -> str:
    """A cursor's text: the payload and its tag, so a damaged or foreign token is refused."""
    tag = hashlib.blake2b(payload, key=cursor_key(version), digest_size=8).digest()
    return base64.urlsafe_b64encode(payload + tag).decode().rstrip("=")


def unseal(text: str, version: DataVersion) -> bytes:
    """The payload of a cursor made by seal() for this store, or InvalidQuery."""
    if not CURSOR.fullmatch(text):
        raise InvalidQuery("cursor: not a token given by next_cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # a length no base64 text has (4n + 1)
        raise InvalidQuery("cursor: not a token given by next_cursor") from None
    payload, tag = raw[:-8], raw[-8:]
    expected = hashlib.blake2b(payload, key=cursor_key(version), digest_size=8).digest()
    if not hmac.compare_digest(tag, expected):
        raise InvalidQuery("cursor: tampered with, or issued by another store")
    return payload


def make_cursor(query: AssetQuery, asset: Asset, version: DataVersion) -> str:
    """A keyset token after `asset`."""
    value = getattr(asset, query.sort.field)
    return seal(encode_cursor(CursorToken(query.digest, value is None, value, asset.asset_id)), version)


def read_cursor(query: AssetQuery, version: DataVersion) -> CursorToken:
    """The token of query.cursor, checked against its tag and the query, or InvalidQuery."""
    try:
        token = decode_cursor(unseal(query.cursor or "", version))
    except msgspec.DecodeError:
        raise InvalidQuery("cursor: not a token given by next_cursor") from None
    if token.query_digest != query.digest:
        raise InvalidQuery("cursor: issued for another filter_by, sort or as_of than this request's")
    numeric = query.sort.nullable
    if token.in_nulls != (token.value is None) or (token.value is not None and isinstance(token.value, str) == numeric):
        raise InvalidQuery("cursor: does not fit the sort")
    return token


# Pages of /data at any depth. Reads run on the loop or in reader threads at once: what they keep is locked.
BOOKMARK_EVERY = 100  # a deep page starts from the nearest bookmark, at most this many rows before it
COUNTS_KEPT = 4_096  # filters whose count (and source names: SourceFilter) a commit keeps
SORT_VALUE = {field: Asset.__struct_fields__.index(field) for field in SORT_FIELDS}


@dataclass
class Bookmarks:
    """Where rows stand in one filter and sort's order.

    `marks`: every BOOKMARK_EVERY-th row, found as far as asked. `page_ends`: the last row of pages
    served (so the first of the page after), by offset: a page next to one already served skips nothing.
    """

    digest: str = ""  # of the query whose order this is
    marks: list[CursorToken] = field(default_factory=list)
    complete: bool = False
    page_ends: dict[int, CursorToken] = field(default_factory=dict)

    def reaches(self, offset: int) -> bool:
        """Whether the row at `offset` is found without walking."""
        return offset in self.page_ends or self.complete or len(self.marks) >= offset // BOOKMARK_EVERY


class BookmarkSets:
    """The Bookmarks of the filter and sort orders read lately, least recently used out first: at most SETS
    sets, MARKS bookmarks and PAGE_ENDS page ends across all of them (~170 and ~200 bytes each), whatever
    clients page through. A set being walked is never pushed out by its own walk: one order over more than
    MARKS * BOOKMARK_EVERY rows holds the marks it needs."""

    SETS = 64
    MARKS = 100_000
    PAGE_ENDS = 50_000

    def __init__(self) -> None:
        self.sets: OrderedDict[str, Bookmarks] = OrderedDict()  # by query digest
        self.marks = 0  # across all sets
        self.page_ends = 0
        self._lock = threading.Lock()  # over the sets, the totals and every set's marks and complete

    def get(self, digest: str) -> Bookmarks:
        with self._lock:
            marks = self.sets.get(digest)
            if marks is not None:
                self.sets.move_to_end(digest)
                return marks
            while len(self.sets) >= self.SETS:
                self._drop_oldest()
            marks = self.sets[digest] = Bookmarks(digest)
            return marks

    def peek(self, digest: str) -> Bookmarks | None:
        """The set if there is one, without counting it as used."""
        return self.sets.get(digest)

    def found(self, marks: Bookmarks, known: int, row: CursorToken | None) -> None:
        """The walk from mark `known` found the next mark at `row`, or (None) the end of the order. Nothing
        changes when another walk got there first."""
        with self._lock:
            if len(marks.marks) != known or marks.complete:
                return
            if row is None:
                marks.complete = True
                return
            marks.marks.append(row)
            if self.sets.get(marks.digest) is not marks:  # pushed out meanwhile: it goes with its requests
                return
            self.marks += 1
            while self.marks > self.MARKS and next(iter(self.sets)) != marks.digest:
                self._drop_oldest()

    def page_served(self, marks: Bookmarks, offset: int, last: CursorToken) -> None:
        """Remember where the page after the one served at `offset` starts, while the budget lasts."""
        with self._lock:
            if offset in marks.page_ends or self.page_ends >= self.PAGE_ENDS:
                return
            marks.page_ends[offset] = last
            if self.sets.get(marks.digest) is marks:
                self.page_ends += 1

    def _drop_oldest(self) -> None:
        _, dropped = self.sets.popitem(last=False)
        self.marks -= len(dropped.marks)
        self.page_ends -= len(dropped.page_ends)


def position_of(query: AssetQuery, row: tuple) -> CursorToken:
    """Where a row stands in the query's order: the key a keyset continues after."""
    value = row[SORT_VALUE[query.sort.field]]
    return CursorToken(query.digest, value is None, value, row[0])


def page_fits_on_loop(query: AssetQuery, commit: Commit) -> bool:
    """Whether the page is a short index range at this commit: no filter (which may scan), its count known,
    and at most BOOKMARK_EVERY rows to step over (cheaper than a thread hop)."""
    if query.conditions or query.filter_text not in commit.counts:
        return False
    if query.cursor or query.offset < BOOKMARK_EVERY:
        return True
    marks = commit.bookmarks.peek(query.digest)
    return marks is not None and marks.reaches(query.offset)


def read_page(conn: sqlite3.Connection, version: DataVersion, query: AssetQuery, commit: Commit) -> AssetPage:
    """One page of the query, with blank request_id and api_latency_ms; what it learns (the count, bookmarks)
    is kept in `commit` when the read saw that commit's data."""
    if version != commit.version:  # the ETL committed since the request looked: keep nothing for it
        commit = Commit(0, version)
    after = read_cursor(query, version) if query.cursor else None
    sources = kept_sources(conn, query, commit)
    total = count_assets(conn, query, commit, sources)
    page_size, offset, skip, marks = query.page_size, query.offset, 0, None
    if after is None:
        marks = commit.bookmarks.get(query.digest)
        after, skip = nearest_bookmark(conn, query, sources, commit.bookmarks, marks, offset)
    rows = read_rows(conn, query, sources, after, skip, page_size + 1)
    if marks is not None and len(rows) > page_size:
        commit.bookmarks.page_served(marks, offset + page_size, position_of(query, rows[page_size - 1]))
    assets = assets_of(rows[:page_size])
    return AssetPage(
        request_id="",
        api_latency_ms=0.0,
        data=assets,
        page=None if query.cursor else query.page,
        page_size=page_size,
        total_items=total,
        total_pages=-(-total // page_size),
        next_cursor=make_cursor(query, assets[-1], version) if len(rows) > page_size else None,
        data_version=str(version),
    )


def assets_of(rows: Sequence[tuple]) -> list[Asset]:
    """Rows of ASSET_COLUMNS as Assets, their sources the stored JSON (written as is)."""
    raw = msgspec.Raw
    return [
        Asset(asset_id, symbol, name, rank, price, cap, volume, change, status, raw(sources), updated)
        for asset_id, symbol, name, rank, price, cap, volume, change, status, sources, updated in rows
    ]  # unpacked in the comprehension, not sliced and starred per row: half the time for a page


def count_assets(conn: sqlite3.Connection, query: AssetQuery, commit: Commit, sources: SourceFilter) -> int:
    """Assets matching the query's filter (its source conditions resolved as `sources`), counted once per commit."""
    counts, key = commit.counts, query.filter_text
    if key not in counts:
        if len(counts) >= COUNTS_KEPT:
            counts.clear()
        ((counts[key],),) = conn.execute(*count_sql(query.conditions, sources)).fetchall()
    return counts[key]


def count_sql(conditions: Sequence[Condition], sources: SourceFilter) -> tuple[str, tuple]:
    """The statement counting the assets that meet `conditions` (their source ones as `sources` resolves them)."""
    if not sources.few and len(conditions) == 1:  # one source condition, of many listings
        names = sources.names[conditions[0]]
        return LISTED_ASSETS.format(names=", ".join("?" * len(names))), names * 3
    where, params = where_sql(conditions, sources)
    return f"SELECT count(*) FROM asset WHERE {where}", params


def nearest_bookmark(
    conn: sqlite3.Connection,
    query: AssetQuery,
    sources: SourceFilter,
    bookmarks: BookmarkSets,
    marks: Bookmarks,
    offset: int,
) -> tuple[CursorToken | None, int]:
    """The nearest bookmark at or before `offset` (walking to it as needed), and how many rows lie between."""
    served = marks.page_ends.get(offset)
    if served is not None:
        return served, 0
    wanted = offset // BOOKMARK_EVERY
    while len(marks.marks) < wanted and not marks.complete:
        known = len(marks.marks)
        row = read_rows(conn, query, sources, marks.marks[known - 1] if known else None, BOOKMARK_EVERY - 1, 1)
        bookmarks.found(marks, known, position_of(query, row[0]) if row else None)
    found = min(wanted, len(marks.marks))
    if not found:
        return None, offset
    return marks.marks[found - 1], offset - found * BOOKMARK_EVERY


def read_rows(
    conn: sqlite3.Connection, query: AssetQuery, sources: SourceFilter, after: CursorToken | None, skip: int, limit: int
) -> list[tuple]:
    """`limit` rows after position `after` (the start when None), passing `skip` rows first; the query's source
    conditions as `sources` resolves them.

    Nulls sort last: the rows with a sort value, then those without.
    """
    if after is not None and after.in_nulls:
        return conn.execute(*segment_sql(query, sources, True, after, limit, skip)).fetchall()
    rows = conn.execute(*segment_sql(query, sources, False, after, limit, skip)).fetchall()
    if len(rows) < limit and query.sort.nullable:
        null_skip = 0
        if skip and not rows:  # the skip reaches past the valued rows: continue it among the nulls
            sql, params = segment_sql(query, sources, False, after, skip, 0)
            keys = sql.replace(f"SELECT {PAGE_COLUMNS} FROM", "SELECT 1 FROM", 1)
            ((valued,),) = conn.execute(f"SELECT count(*) FROM ({keys})", params).fetchall()
            null_skip = skip - valued
        rows += conn.execute(*segment_sql(query, sources, True, None, limit - len(rows), null_skip)).fetchall()
    return rows


# One statement: the asset's row once per quote (or once with NULL quote columns: source is never NULL in a
# quote), the quotes in source_map_asset's order (asset_id, source, then the key's source_id), so no sort. A
# lookup is mostly the cost of crossing into SQLite, and this crosses once instead of twice.
ASSET_DETAIL_SQL = f"""
SELECT {", ".join(f"a.{column}" for column in ASSET_FIELDS)},
       {", ".join(f"m.{column}" for column in Quote.__struct_fields__)}
FROM asset a LEFT JOIN source_map m ON m.asset_id = a.asset_id AND m.observed_at IS NOT NULL
WHERE a.asset_id = ? ORDER BY m.source, m.source_id
"""  # fmt: skip
QUOTE_AT = len(ASSET_FIELDS)  # where a row's quote columns begin


def read_asset(conn: sqlite3.Connection, version: DataVersion, asset_id: str) -> AssetDetail | None:
    """One asset with the latest quote of each source listing it; None when there is no such asset."""
    rows = conn.execute(ASSET_DETAIL_SQL, (asset_id,)).fetchall()
    if not rows:
        return None
    row = rows[0]
    quotes = [Quote(*quote[QUOTE_AT:]) for quote in rows] if row[QUOTE_AT] is not None else []
    return AssetDetail(*row[:9], msgspec.Raw(row[9]), row[10], quotes)


def asset_etag(version: DataVersion, fields: tuple[str, ...], asset_id: str) -> str:
    """The ETag of an asset's record (`fields` of it; all: ()) at a data version: 24 hex digits."""
    tag = etag_start(version.text, fields).copy()
    tag.update(asset_id.encode())
    return tag.hexdigest()


@functools.lru_cache(maxsize=64)
def etag_start(data_version: str, fields: tuple[str, ...]) -> Any:
    """The blake2b state of an asset ETag's hash once it has read all but the asset's id: copied per lookup."""
    return hashlib.blake2b(f"{data_version}\n{','.join(fields)}\n".encode(), digest_size=12)


# The market as of a moment (as_of on /data), built by one SQL statement in a connection of its own. Each
# listing's state then is its latest observation at or before the moment, from raw_observation while that is
# kept, else the close of its latest kept candle that ended by then (hourly, else daily): a seek per tier it is
# looked for in (market_states_sql). Each asset is unified from its listings' states by the ETL's rule (etl.unify;
# tests/test_as_of.py proves the two agree) as they are read, asset by asset (MARKET_UNIFY), into a TEMP table
# named asset (MARKET_ASSET), which the connection's statements read before the store's: /data's SQL filters,
# sorts, counts and pages it as it does the store's. The store keeps no history of a listing's
# symbol and name (its identity) and candles keep no rank, change or status: a listing read from a candle has its
# current symbol, name and status, and no rank or change.
# The store's columns of asset with their types, in a rowid table without its key or constraints: a market's rows
# arrive in asset_id order, one per asset (GROUP BY), so an insert appends to the table's last page, where the
# store's WITHOUT ROWID b-tree, keyed by text, checked the key and split its pages by rebalancing their neighbours
# (and a part's rows are copied into the market's table record by record, not decoded and checked again).
MARKET_ASSET = "CREATE TEMP TABLE asset AS SELECT * FROM main.asset LIMIT 0"
# What a build needs of a listing besides its history is the same at every moment of one data version: made once
# per version (MARKET_IDENTITY) and copied into each build's connection as an attached in-memory database
# (deserialize: a copy of its pages), a build reads it in key order instead of seeking source_map and listing for
# every listing. n numbers the listings asset by asset in the order of etl.unify's tie-break (source, source id);
# special marks the listings of an asset with a listing pinned by hand or two listings in one source;
# asset_listings and asset_sources are the asset's listings and their sources (a JSON array in n's order): an asset
# not special whose listings all have a state has those sources.
MARKET_IDENTITY = (
    """
CREATE TABLE identity.listing (
    asset_id TEXT NOT NULL, n INTEGER NOT NULL, listing_id INTEGER NOT NULL, raw_before INTEGER NOT NULL,
    hourly_before INTEGER NOT NULL, source TEXT NOT NULL, special INTEGER NOT NULL, pinned INTEGER NOT NULL,
    symbol TEXT, name TEXT, status TEXT, asset_listings INTEGER NOT NULL, asset_sources TEXT NOT NULL,
    PRIMARY KEY (asset_id, n)
) WITHOUT ROWID
""",
    """
INSERT INTO identity.listing
SELECT m.asset_id, row_number() OVER (ORDER BY m.asset_id, m.source, m.source_id), l.listing_id, l.raw_before,
       l.hourly_before, m.source, a.special, m.pinned, m.symbol, m.name, m.status, count(*) OVER asset,
       json_group_array(m.source) OVER asset
FROM main.source_map m CROSS JOIN main.listing l ON l.source = m.source AND l.source_id = m.source_id
JOIN (SELECT asset_id, count(*) > count(DISTINCT source) OR max(pinned) AS special
      FROM main.source_map GROUP BY asset_id) a ON a.asset_id = m.asset_id
WINDOW asset AS (PARTITION BY m.asset_id ORDER BY m.source, m.source_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
""",
)


def latest_candle_sql(width: int, looked_for: str) -> str:
    """The start of a listing's latest candle of `width` that ended by ?1, when `looked_for` (else NULL: no seek;
    always when it is empty)."""
    latest = (
        f"(SELECT t FROM main.candle WHERE listing_id = i.listing_id AND width = {width} AND t <= ?1 AND last_at <= ?1"
        " ORDER BY t DESC LIMIT 1)"
    )
    return f"CASE WHEN {looked_for} THEN {latest} END" if looked_for else latest


# Each listing's state at ?1, of the assets ?2 to ?3 (a part of the market: MARKET_PARTS): a listing whose pruned
# part of a tier (before raw_before, hourly_before) holds the moment is not looked for in it, nor is one found in
# an earlier tier (the CASEs leave the later joins' keys NULL, which SQLite does not seek). A tier that no listing
# keeps the moment in (before every listing's horizon: MarketIdentity) is left out of the statement, its join and
# the columns it adds to every listing's row with it. observed_at is in Unix seconds.
def market_states_sql(tiers: str) -> str:
    """The states, looked for in the raw tier if `tiers` holds "r", in the hourly one if it holds "h", else in the
    daily one (kept forever)."""
    raw = "r" in tiers
    earlier = ["r"] * raw + ["h"] * ("h" in tiers)  # the joins of the tiers looked in before the daily one

    def latest(raw_column: str, candle_column: str) -> str:
        """The column of the tier the listing's state was found in."""
        found = [
            f"WHEN {t}.listing_id IS NOT NULL THEN {t}.{raw_column if t == 'r' else candle_column}" for t in earlier
        ]
        return f"CASE {' '.join(found)} ELSE d.{candle_column} END" if found else f"d.{candle_column}"

    joins = [
        "LEFT JOIN main.raw_observation r ON r.listing_id = i.listing_id AND r.observed_at = CASE WHEN i.raw_before"
        " <= ?1 THEN (SELECT observed_at FROM main.raw_observation WHERE listing_id = i.listing_id AND observed_at"
        " <= ?1 AND observed_at >= i.raw_before ORDER BY observed_at DESC LIMIT 1) END"
    ] * raw
    if "h" in tiers:
        joins.append(
            "LEFT JOIN main.candle h ON h.listing_id = i.listing_id AND h.width = 3600 AND h.t ="
            f" {latest_candle_sql(3600, 'r.listing_id IS NULL AND ' * raw + 'i.hourly_before <= ?1')}"
        )
    joins.append(
        "LEFT JOIN main.candle d ON d.listing_id = i.listing_id AND d.width = 86400 AND d.t ="
        f" {latest_candle_sql(86400, ' AND '.join(f'{t}.listing_id IS NULL' for t in earlier))}"
    )
    joined = "\n".join(joins)
    return f"""
SELECT i.asset_id, i.n, i.source, i.special, i.pinned, i.symbol, i.name, i.asset_listings, i.asset_sources,
       {"r.listing_id" if raw else "NULL"} AS raw,
       {"iif(r.listing_id IS NULL, i.status, iif(r.active, 'active', 'inactive'))" if raw else "i.status"} AS status,
       {latest("observed_at", "last_at")} AS observed_at, {"r.rank" if raw else "NULL"} AS rank,
       {latest("price_usd", "close")} AS price_usd, {latest("market_cap_usd", "market_cap_usd")} AS market_cap_usd,
       {latest("volume_24h_usd", "volume_24h_usd")} AS volume_24h_usd,
       {"r.change_24h_pct" if raw else "NULL"} AS change_24h_pct
FROM identity.listing i
{joined}
WHERE i.asset_id BETWEEN ?2 AND ?3 AND {latest("observed_at", "last_at")} IS NOT NULL
"""  # ?2, ?3: the first and last asset of the part of the market built


def asset_states_sql(states: str, columns: str, condition: str = "true", order: str = "") -> str:
    """`columns` of the `states` of asset g.asset_id's listings that meet `condition`, in `order`."""
    return f"(SELECT {columns} FROM ({states}) s WHERE s.asset_id = g.asset_id AND {condition} {order})"


def newest_listing_sql(states: str, column: str) -> str:
    """An asset's `column` from its newest listing that has one (newest: by observed time, then source, source id)."""
    return asset_states_sql(
        states, f"s.{column}", f"s.{column} IS NOT NULL", "ORDER BY s.observed_at DESC, s.n LIMIT 1"
    )


# etl.unify as the states are read, asset by asset (the identity's key order, so no sort): the one max() gives the
# row of the newest listing not pinned by hand (else the newest), and SQLite takes the group's other bare columns
# (symbol, name, status, numbers, time) from that row. With no pin and no source listing the asset twice (not
# special), that row is the newest and its sources are sorted and distinct: the identity's when all its listings
# have a state. Then its number is the asset's unless it has none while another listing is there (that may have
# one: rank and change only raw observations have); only then, for a special asset, or for the sources of one
# with a listing that has no state yet, are the asset's states read again. With no raw tier looked in, no listing
# has a rank or change to take. updated_at is datetime()'s text with a T for its space and a Z: what
# strftime('%Y-%m-%dT%H:%M:%SZ') writes, for less work.
MARKET_NUMBERS = {"rank": " AND raws", "price_usd": "", "market_cap_usd": "", "volume_24h_usd": "",
                  "change_24h_pct": " AND raws"}  # fmt: skip


def market_unify_sql(tiers: str) -> str:
    """The statement above over the states looked for in `tiers` (market_states_sql)."""
    states = market_states_sql(tiers)
    return f"""
INSERT INTO temp.asset (asset_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct,
                        status, sources, updated_at)
SELECT asset_id, symbol, name,
       {", ".join(f"iif(special OR ({c} IS NULL AND listings > 1{raw}), {newest_listing_sql(states, c)}, {c})"
                  for c, raw in MARKET_NUMBERS.items())},
       status, iif(special OR listings < asset_listings,
                   {asset_states_sql(states, "json_group_array(DISTINCT s.source)")}, asset_sources),
       replace(datetime(iif(special, {asset_states_sql(states, "max(s.observed_at)")}, observed_at), 'unixepoch'),
               ' ', 'T') || 'Z'
FROM (SELECT asset_id, max(iif(pinned, 0, 1 << 62) + (observed_at << 30) - n), symbol, name, status, observed_at,
             {", ".join(MARKET_NUMBERS)}, special, count(*) AS listings, {"count(raw)" if "r" in tiers else 0} AS raws,
             asset_listings, asset_sources
      FROM ({states}) GROUP BY asset_id) g
"""  # fmt: skip


MARKET_UNIFY = {tiers: market_unify_sql(tiers) for tiers in ("rh", "r", "h", "")}
# /data's source filter reads source_map (asset_id, source, observed_at not null) by source and by asset
# (SOURCE_NAMES, source_sql): the market's holds its assets' sources, keyed the same two ways, filled when a source
# filter first reads the market (Market.list_sources) rather than by every build, which it would lengthen by a tenth.
MARKET_SOURCES = (
    """
CREATE TEMP TABLE source_map (
    asset_id TEXT NOT NULL, source TEXT NOT NULL, observed_at TEXT, PRIMARY KEY (asset_id, source)
) WITHOUT ROWID
""",
    "CREATE INDEX temp.source_map_source ON source_map (source)",
)
MARKET_LISTINGS = """
INSERT OR IGNORE INTO temp.source_map
SELECT a.asset_id, j.value, a.updated_at FROM temp.asset a, json_each(a.sources) j
"""
MARKET_ASSETS_KEPT = 100_000  # assets in the markets a commit keeps, in all
# A market is built in this many parts at once, each a range of assets holding about as many listings, each in a
# connection (MarketBuilders) and thread of its own (SQLite lets go of the GIL while it works), then copied into
# one: a build's time is its CPU divided among the machine's cores. A part's temp database comes back serialized.
MARKET_PARTS = max(1, min(4, os.cpu_count() or 1))
# The page caches of the connections that build parts, in all (each has its share): a build reads a page of every
# listing's history (~16,000-24,000 pages of 4 KiB at 15,000 listings), and a moment near one built before finds
# most of them there instead of reading each from the file (a pread). Held while a commit lasts: its Markets'
# connections close with it.
MARKET_CACHE_KIB = 131_072
MARKET_BUILDERS = concurrent.futures.ThreadPoolExecutor(max(1, MARKET_PARTS - 1), thread_name_prefix="market")


@dataclass(frozen=True)
class MarketIdentity:
    """identity.listing (MARKET_IDENTITY) of one data version, serialized, the first and last asset of each part of a
    market built from it (MARKET_PARTS), and its listings' earliest raw_before and hourly_before: a moment before
    one is in no listing's kept part of that tier (market_states_sql)."""

    version: DataVersion
    pages: bytes
    parts: tuple[tuple[str, str], ...]
    raw_from: int
    hourly_from: int

    def tiers(self, as_of: int) -> str:
        """The tiers before the daily one that a market at `as_of` looks in (market_states_sql)."""
        return "r" * (as_of >= self.raw_from) + "h" * (as_of >= self.hourly_from)


@dataclass(eq=False)
class Market:
    """The market at one moment in its own connection's TEMP tables, as of the store's data `version`. Its commit
    holds the counts and bookmarks of its pages; the lock makes one read at a time of its connection."""

    conn: sqlite3.Connection
    version: DataVersion
    assets: int  # rows of its asset table
    commit: Commit
    lock: threading.Lock = field(default_factory=threading.Lock)
    listed: bool = False  # whether its source_map is filled (MARKET_LISTINGS)

    def list_sources(self) -> None:
        """Fill its source_map from its assets' sources, once."""
        with self.lock:
            if not self.listed:
                self.conn.execute(MARKET_LISTINGS)
                self.listed = True


class MarketMoved(Exception):
    """A part of a market was read at another data version than the identity it was built from."""


def market_connection(uri: str, identity: MarketIdentity | None) -> sqlite3.Connection:
    """A connection to the store at `uri` (read-only) with `identity` attached as `identity` (empty when None) and
    an empty TEMP table asset (MARKET_ASSET)."""
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {Store.BUSY_TIMEOUT_MS}")
        # No mmap_size: a store overwritten in place under a mapping would end the process with SIGBUS (issue 22).
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.create_function("fold", 1, fold_sql, deterministic=True)
        conn.execute("ATTACH ':memory:' AS identity")  # not within a transaction
        if identity is not None:
            conn.deserialize(identity.pages, name="identity")
        conn.execute(MARKET_ASSET)
    except BaseException:
        conn.close()
        raise
    return conn


def make_identity(conn: sqlite3.Connection, version: DataVersion) -> MarketIdentity:
    """The identity of `version` made in `conn` (in its read transaction), split into MARKET_PARTS ranges of
    assets holding about as many listings each (n numbers the listings in asset order from 1)."""
    conn.execute("DROP TABLE IF EXISTS identity.listing")
    for sql in MARKET_IDENTITY:
        conn.execute(sql)
    ((listings,),) = conn.execute("SELECT count(*) FROM identity.listing").fetchall()
    marks = ", ".join(str(1 + listings * k // MARKET_PARTS) for k in range(MARKET_PARTS))
    firsts = [a for (a,) in conn.execute(f"SELECT DISTINCT asset_id FROM identity.listing WHERE n IN ({marks})")]
    firsts.sort()
    lasts = [conn.execute("SELECT max(asset_id) FROM identity.listing WHERE asset_id < ?", (after,)).fetchone()[0]
             for after in firsts[1:]]  # fmt: skip
    lasts += [a for (a,) in conn.execute("SELECT max(asset_id) FROM identity.listing")][: len(firsts)]
    ((raw_from, hourly_from),) = conn.execute(
        "SELECT coalesce(min(raw_before), 0), coalesce(min(hourly_before), 0) FROM identity.listing"
    ).fetchall()
    parts = tuple(zip(firsts, lasts, strict=True))
    return MarketIdentity(version, conn.serialize(name="identity"), parts, raw_from, hourly_from)


class MarketBuilders:
    """Connections to the store at `uri` that build the parts of markets (market_connection), kept between the builds
    of one commit (Markets): a kept one has its identity attached already and the store's pages it read last in its
    page cache (its share of MARKET_CACHE_KIB; SQLite empties it itself when the store has changed since). One is
    kept idle per part of a market (by its number in MarketIdentity.parts), so that it reads the same listings'
    pages build after build; one whose work failed is closed."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.idle: dict[int, tuple[sqlite3.Connection, MarketIdentity | None]] = {}  # and the identity attached
        self.lock = threading.Lock()

    def take(self, identity: MarketIdentity | None, number: int) -> sqlite3.Connection:
        """The idle connection that built part `number` last, with `identity` attached (when not None), else a new
        one."""
        with self.lock:
            conn, attached = self.idle.pop(number, (None, None))
        if conn is None:
            conn = market_connection(self.uri, identity)
            conn.execute(f"PRAGMA cache_size = -{MARKET_CACHE_KIB // MARKET_PARTS}")
        elif identity is not None and attached is not identity:
            conn.deserialize(identity.pages, name="identity")
        return conn

    def keep(self, conn: sqlite3.Connection, identity: MarketIdentity, number: int) -> None:
        """`conn` (out of its transaction, `identity` attached) idle again after building part `number`, its rows
        emptied; closed if another is idle for that part already."""
        conn.execute("DELETE FROM temp.asset")
        with self.lock:
            if number not in self.idle:
                self.idle[number] = (conn, identity)
                return
        conn.close()


def unify_part(conn: sqlite3.Connection, as_of: int, identity: MarketIdentity, number: int) -> tuple[bytes, int]:
    """Part `number` of the market at `as_of` made in `conn` (`identity` attached), in its read transaction, which it
    ends: the part's temp database (serialized) and its assets."""
    sql = MARKET_UNIFY[identity.tiers(as_of)]
    assets = conn.execute(sql, (as_of, *identity.parts[number])).rowcount
    conn.execute("COMMIT")
    return conn.serialize(name="temp"), assets


def build_part(builders: MarketBuilders, as_of: int, identity: MarketIdentity, number: int) -> tuple[bytes, int]:
    """Part `number` of the market at `as_of` (its temp database, serialized) and its assets; MarketMoved when the
    store is no longer at the identity's version."""
    conn = builders.take(identity, number)
    try:
        conn.execute("BEGIN")
        if read_version(conn) != identity.version:
            raise MarketMoved
        made = unify_part(conn, as_of, identity, number)
    except BaseException:
        conn.close()
        raise
    builders.keep(conn, identity, number)
    return made


def build_market(
    builders: MarketBuilders, as_of: int, identity: MarketIdentity | None
) -> tuple[Market, MarketIdentity]:
    """The market at `as_of` (Unix seconds) as the store of `builders` keeps it now, and the identity it was built
    from (`identity` when that is of the store's version now, else made afresh). Its first part is built in the
    calling thread, the others at once in MARKET_BUILDERS, each in a connection of `builders`; the parts are then
    copied into a connection of the market's own. One read at another version (the ETL committed in between)
    builds it again."""
    while True:
        conn = builders.take(identity, 0)
        others: list[concurrent.futures.Future[tuple[bytes, int]]] = []
        try:
            conn.execute("BEGIN")
            version = read_version(conn)
            if identity is None or identity.version != version:
                identity = make_identity(conn, version)
            others = [
                MARKET_BUILDERS.submit(build_part, builders, as_of, identity, number)
                for number in range(1, len(identity.parts))
            ]
            parts = [unify_part(conn, as_of, identity, 0)]
        except BaseException as error:
            conn.close()
            for other in others:
                other.cancel()
            concurrent.futures.wait(others)
            if isinstance(error, MarketMoved):
                continue  # read the store anew: its version, and the identity of it
            raise
        builders.keep(conn, identity, 0)
        market = market_connection(builders.uri, None)
        try:
            market.execute("DETACH DATABASE identity")  # the market needs none
            parts += [other.result() for other in others]
            for pages, _ in parts:
                market.execute("ATTACH ':memory:' AS part")
                market.deserialize(pages, name="part")
                market.execute("INSERT INTO temp.asset SELECT * FROM part.asset")
                market.execute("DETACH DATABASE part")
            for sql in MARKET_SOURCES:
                market.execute(sql)
        except BaseException as error:
            market.close()
            concurrent.futures.wait(others)
            if isinstance(error, MarketMoved):
                continue  # as above
            raise
        assets = sum(count for _, count in parts)
        return Market(market, version, assets, Commit(0, version)), identity


class Markets:
    """The markets of the moments read lately at one commit of the store at `uri`, least recently used out first, up
    to MARKET_ASSETS_KEPT assets in all (a larger one is not kept), the identity they are built from and the
    connections that build them. A moment's market is built once however many requests ask for it at once; other
    moments' are built meanwhile. One let go is closed when the last read of it ends (its connection is freed with
    it)."""

    def __init__(self, uri: str) -> None:
        self.kept: OrderedDict[int, Market] = OrderedDict()
        self.building: dict[int, threading.Lock] = {}
        self.identity: MarketIdentity | None = None
        self.builders = MarketBuilders(uri)
        self.lock = threading.Lock()  # over kept, building and identity

    def get(self, as_of: int, version: DataVersion) -> Market:
        """The market at `as_of`, kept if it was built from the store at `version`."""
        with self.lock:
            building = self.building.setdefault(as_of, threading.Lock())
        with building:
            with self.lock:
                market = self.kept.get(as_of)
                if market is not None:
                    self.kept.move_to_end(as_of)
                    return market
                identity = self.identity
            try:
                market, identity = build_market(self.builders, as_of, identity)
            except BaseException:
                with self.lock:
                    self.building.pop(as_of, None)
                raise
            with self.lock:
                self.building.pop(as_of, None)
                # Not one built after the ETL committed since the request looked, nor one too large to keep
                if market.version == version:
                    self.identity = identity
                    if market.assets <= MARKET_ASSETS_KEPT:
                        self.kept[as_of] = market
                        while sum(kept.assets for kept in self.kept.values()) > MARKET_ASSETS_KEPT:
                            self.kept.popitem(last=False)
            return market


def market_at(uri: str, query: AssetQuery, commit: Commit) -> Market:
    """The market at query.as_of, built from the store at `uri` unless `commit` keeps it, its source_map filled when
    the query filters by source (call in a reader's thread)."""
    assert query.as_of is not None
    markets = commit.facts.get("markets") or commit.facts.setdefault("markets", Markets(uri))
    market = markets.get(query.as_of, commit.version)
    if any(condition.field == "source" for condition in query.conditions):
        market.list_sources()
    return market


def read_page_as_of(uri: str, query: AssetQuery, commit: Commit) -> AssetPage:
    """read_page() over the market at query.as_of (blank request_id and api_latency_ms)."""
    market = market_at(uri, query, commit)
    with market.lock:
        return read_page(market.conn, market.version, query, market.commit)


class MarketSnapshot:
    """A Snapshot's reads over a moment's market: its own connection, read under its lock in a worker thread. The
    market is fixed once built, so every read sees the same `version`."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self.version = market.version

    async def read(self, read: Read[T]) -> T:
        return await asyncio.to_thread(self._read, read)

    def _read(self, read: Read[T]) -> T:
        with self.market.lock:
            return read(self.market.conn, self.market.version)

    async def close(self) -> None:
        """Nothing to end: the market's connection closes with the market, once no one holds it."""


# An asset's history: its listings' raw observations (raw_observation) and candles (candle), by store.sql's
# rule; times there are Unix seconds. Candles of a kept width are merged across listings in SQL
# (kept_candle_sql), where every listing has a candle in the buckets of the first; others (wider than an hour
# but not a day from hourly ones, narrower ones from raw observations) in Python (merge_candles).
INTERVALS = {"raw": 0, "5m": 300, "15m": 900, "1h": 3_600, "4h": 14_400, "1d": 86_400}
KEPT_WIDTHS = (3_600, 86_400)  # the candle widths store.sql keeps
BUCKET, OBSERVATIONS = operator.itemgetter(0), operator.itemgetter(7)  # of a row of read_candles
# The most listings whose candles kept_candle_sql merges: it joins two tables a listing (SQLite allows 64 in one
# join) and compares each listing's times with every other's.
MERGED_IN_SQL = 8
HISTORY_PARAMS = ("interval", "from", "to", "source", "limit", "cursor", "format")
HISTORY_LIMIT = 1_000
RAW_WINDOW = 86_400  # the default window of raw points; candles: 100 intervals


class HistoryCursor(msgspec.Struct, array_like=True, frozen=True):
    """What a history next_cursor carries: query digest and the last point's time, source and source id."""

    query_digest: str
    at: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]  # what SQLite's integers hold: a forged token's time is bound
    source: str
    source_id: str


encode_history_cursor = msgspec.msgpack.Encoder().encode
decode_history_cursor = msgspec.msgpack.Decoder(HistoryCursor).decode


@dataclass(frozen=True)
class HistoryQuery:
    """A normalised GET /data/{asset_id}/history query; `start` and `end` are Unix seconds, None for the default."""

    interval: str = "1h"
    start: int | None = None
    end: int | None = None
    source: str | None = None
    limit: int = HISTORY_LIMIT
    cursor: str | None = None
    format: str = "json"

    @property
    def width(self) -> int:
        return INTERVALS[self.interval]

    def digest(self, asset_id: str) -> str:
        """What a cursor is bound to: the source as compared (any case or normal form names it), not as written."""
        source = None if self.source is None else fold(self.source)
        key = f"{asset_id}\n{self.interval}\n{self.start}\n{self.end}\n{source}"
        return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()

    def etag(self, data_version: str, asset_id: str) -> str:
        key = f"{data_version}\n{self.digest(asset_id)}\n{self.limit}\n{self.cursor}\n{self.format}"
        return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def parse_history_query(params: Mapping[str, str]) -> HistoryQuery:
    """The query string of GET /data/{asset_id}/history as a HistoryQuery, or InvalidQuery naming the part."""
    check_params(params, HISTORY_PARAMS)
    interval = params.get("interval", "1h")
    if interval not in INTERVALS:
        raise InvalidQuery(f"interval: one of {', '.join(INTERVALS)}, got {interval[:20]!r}")
    start = parse_moment("from", params["from"]) if "from" in params else None
    end = parse_moment("to", params["to"]) if "to" in params else None
    if start is not None and end is not None and start > end:
        raise InvalidQuery(f"from: {params['from'][:40]!r} is after to {params['to'][:40]!r}")
    cursor = params.get("cursor") or None
    return HistoryQuery(
        interval=interval,
        start=start,
        end=end,
        source=params.get("source") or None,
        limit=parse_int("limit", params.get("limit", str(HISTORY_LIMIT)), 1, HISTORY_LIMIT),
        cursor=cursor,
        format=parse_format(params.get("format"), PAGE_FORMATS),
    )


def parse_moment(name: str, text: str, rounding: Callable[[Decimal | float], int] = math.ceil) -> int:
    """An RFC 3339 time (UTC when it names no offset) or Unix seconds, as Unix seconds (rounded up, or by
    `rounding`) from FIRST_SECOND to LAST_SECOND; InvalidQuery naming `name` otherwise."""
    exact = read_moment(text)
    if exact is None:
        raise InvalidQuery(f"{name}: expected an RFC 3339 time or Unix seconds{time_hint(text)}, got {text[:40]!r}")
    return within_range(name, rounding(exact), text)


@functools.lru_cache(maxsize=8_192)  # bucket starts and a run's observation times repeat across assets
def utc_text(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


LISTINGS_SQL = """
SELECT l.listing_id, l.source, l.source_id, l.raw_before, l.hourly_before FROM source_map m
JOIN listing l ON l.source = m.source AND l.source_id = m.source_id
WHERE m.asset_id = ? ORDER BY l.source, l.source_id
"""
RAW_COLUMNS = "r.observed_at, l.source, l.source_id, r.price_usd, r.market_cap_usd, r.volume_24h_usd"


def raw_sql(listings: int, after: bool) -> str:
    """Raw observations of `listings` listings in [?, ?), in point order; after: past a (time, source, id). Rows
    before a listing's raw_before are a load's late ones, waiting for etl.prune_history: not yet history."""
    marks = ", ".join("?" * listings)
    return (
        f"SELECT {RAW_COLUMNS} FROM raw_observation r"
        " JOIN listing l ON l.listing_id = r.listing_id AND r.observed_at >= l.raw_before"
        f" WHERE r.listing_id IN ({marks}) AND r.observed_at >= ? AND r.observed_at < ?"
        + (" AND (r.observed_at, l.source, l.source_id) > (?, ?, ?)" if after else "")
        + " ORDER BY r.observed_at, l.source, l.source_id"
    )


@functools.lru_cache(maxsize=MERGED_IN_SQL)  # a statement's text for each number of listings
def kept_candle_sql(listings: int) -> str:
    """Candles of the kept width ?n+3 of `listings` listings (?1 to ?n, in order of source and source id)
    merged by store.sql's rule, for the buckets in [?n+1, ?n+2) where the first listing has one, in time
    order: rows of t, open, high, low, close, cap, volume and observations. Each other listing's candle of
    the bucket is sought in candle (c), else in open_candle (o: the CASE leaves its key NULL when c has
    it, and SQLite does not seek a NULL)."""
    lower, upper, width = (f"?{listings + n}" for n in (1, 2, 3))
    columns = "t, open, high, low, close, market_cap_usd, volume_24h_usd, observations, first_at, last_at"
    first = " UNION ALL ".join(
        f"SELECT {columns} FROM {table} WHERE listing_id = ?1 AND width = {width} AND t >= {lower} AND t < {upper}"
        for table in ("candle", "open_candle")
    )
    others = range(1, listings)

    def value(place: int, column: str) -> str:  # NULL where the listing has no candle in the bucket
        return f"coalesce(c{place}.{column}, o{place}.{column})" if place else f"p.{column}"

    def spread(function: str, column: str) -> str:  # of the listings with a candle
        terms = [f"p.{column}", *(f"coalesce(c{place}.{column}, o{place}.{column}, p.{column})" for place in others)]
        return f"{function}({', '.join(terms)})" if others else terms[0]

    def pick(time: str, order: str, column: str) -> str:
        """The column of the listing whose (time, place) is the least (order '<') or the greatest ('>')."""

        def before(place: int, other: int) -> str:  # place's (time, place) comes before other's in `order`
            ties = place < other if order == "<" else place > other  # equal times: by place
            comparison = f"{value(place, time)} {order}{'=' * ties} {value(other, time)}"
            return comparison if other == 0 else f"ifnull({comparison}, 1)"  # a listing with no candle comes last

        chosen = (
            f"WHEN {' AND '.join(before(place, other) for other in range(listings) if other != place)}"
            f" THEN {value(place, column)}"
            for place in others
        )
        return f"CASE {' '.join(chosen)} ELSE p.{column} END" if others else f"p.{column}"

    observations = " + ".join(["p.observations", *(f"ifnull({value(place, 'observations')}, 0)" for place in others)])
    joins = "".join(
        f" LEFT JOIN candle c{place} ON c{place}.listing_id = ?{place + 1} AND c{place}.width = {width}"
        f" AND c{place}.t = p.t LEFT JOIN open_candle o{place} ON o{place}.listing_id ="
        f" CASE WHEN c{place}.t IS NULL THEN ?{place + 1} END AND o{place}.width = {width} AND o{place}.t = p.t"
        for place in others
    )
    closing = ", ".join(pick("last_at", ">", column) for column in ("close", "market_cap_usd", "volume_24h_usd"))
    return (
        f"SELECT p.t, {pick('first_at', '<', 'open')}, {spread('max', 'high')}, {spread('min', 'low')}, {closing},"
        f" {observations} FROM ({first}) p{joins} ORDER BY p.t"
    )


def kept_candles_where(listings: int) -> str:
    """The condition on candle and open_candle rows of `listings` listings (?1 to ?n) and the width ?n+3 whose
    buckets start in [?n+1, ?n+2)."""
    ids = ", ".join(f"?{number}" for number in range(1, listings + 1))
    return f"listing_id IN ({ids}) AND width = ?{listings + 3} AND t >= ?{listings + 1} AND t < ?{listings + 2}"


def candle_sql(listings: int, kept: bool) -> str:
    """The parts of candles of `listings` listings (?1 to ?n, in order of source and source id) in [?n+1, ?n+2):
    their kept candles of width ?n+3, closed and open (by bucket start), or (not kept) their priced raw
    observations, each a candle of its own. Rows of t, open, high, low, close, cap, volume, observations and a
    closing key, last_at * n + place of the listing (so ordered as (last_at, place) are), ordered by t, first_at
    and place (so a wider bucket's open comes first). The rows go to merge_candles as SQLite gives them: no list
    of them is made."""
    ids = [f"?{number}" for number in range(1, listings + 1)]
    place = "CASE listing_id " + " ".join(f"WHEN {mark} THEN {n}" for n, mark in enumerate(ids)) + " END"
    lower, upper = (f"?{listings + n}" for n in (1, 2))
    if kept:
        where = f"WHERE {kept_candles_where(listings)}"
        return (
            "SELECT t, open, high, low, close, market_cap_usd, volume_24h_usd, observations,"
            f" last_at * {listings} + {place}"
            f" FROM (SELECT * FROM candle {where} UNION ALL SELECT * FROM open_candle {where})"
            f" ORDER BY t, first_at, {place}"
        )
    return (
        "SELECT observed_at, price_usd, price_usd, price_usd, price_usd, market_cap_usd, volume_24h_usd, 1,"
        f" observed_at * {listings} + {place} FROM raw_observation WHERE listing_id IN ({', '.join(ids)})"
        f" AND observed_at >= {lower} AND observed_at < {upper} AND price_usd IS NOT NULL ORDER BY observed_at, {place}"
    )


@functools.lru_cache(maxsize=MERGED_IN_SQL)  # a statement's text for each number of listings
def kept_extent_sql(listings: int) -> str:
    """The first and last buckets in [?n+1, ?n+2) of the kept candles of width ?n+3 of the listings ?2 to ?n
    (NULL where a listing has none), and the bucket of each one's open candle there: a seek each."""
    lower, upper, width = (f"?{listings + n}" for n in (1, 2, 3))
    where = f"width = {width} AND t >= {lower} AND t < {upper}"
    return "SELECT " + ", ".join(
        f"(SELECT t FROM candle WHERE listing_id = ?{place + 1} AND {where} ORDER BY t LIMIT 1),"
        f" (SELECT t FROM candle WHERE listing_id = ?{place + 1} AND {where} ORDER BY t DESC LIMIT 1),"
        f" (SELECT t FROM open_candle WHERE listing_id = ?{place + 1} AND {where})"
        for place in range(1, listings)
    )


@functools.lru_cache(maxsize=MERGED_IN_SQL)  # a statement's text for each number of listings
def kept_observations_sql(listings: int) -> str:
    """The observations in the kept candles of width ?n+3 of `listings` listings (?1 to ?n) in [?n+1, ?n+2)."""
    where = kept_candles_where(listings)
    return (
        f"SELECT total(observations) FROM (SELECT observations FROM candle WHERE {where}"
        f" UNION ALL SELECT observations FROM open_candle WHERE {where})"
    )


CLOSED = (math.nan, 0.0, 0.0, 0.0, 0.0, None, None, 0, 0)  # a part after the last: its bucket equals no other


def merge_candles(parts: Iterable[tuple], width: int) -> list[tuple]:
    """Candles of `width` seconds as kept_candle_sql's rows (the bucket's start in Unix seconds first), in time
    order, from candle_sql's parts of narrower buckets or of several listings: open of the first, close, cap and
    volume of the one with the greatest closing key, the greatest high, the least low, the observations summed."""
    candles = []
    bucket, first, top, bottom, last_close, last_cap, last_volume, total, last = None, *CLOSED[1:]
    for t, opening, high, low, close, cap, volume, count, closing in itertools.chain(parts, (CLOSED,)):
        start = t - t % width
        if start == bucket:
            if closing > last:
                last, last_close, last_cap, last_volume = closing, close, cap, volume
            if high > top:
                top = high
            if low < bottom:
                bottom = low
            total += count
            continue
        if bucket is not None:
            candles.append((bucket, first, top, bottom, last_close, last_cap, last_volume, total))
        bucket, first, top, bottom, total = start, opening, high, low, count
        last, last_close, last_cap, last_volume = closing, close, cap, volume
    return candles


def read_history(
    conn: sqlite3.Connection, version: DataVersion, asset_id: str, query: HistoryQuery
) -> AssetHistory | None:
    """The history the query asks of an asset, with blank request_id and api_latency_ms; None: no such asset.
    A 404 when the asset has no listing of query.source."""
    listings = conn.execute(LISTINGS_SQL, (asset_id,)).fetchall()
    if not listings and conn.execute("SELECT 1 FROM asset WHERE asset_id = ?", (asset_id,)).fetchone() is None:
        return None
    source = query.source
    if source is not None:
        folded = fold(source)  # as filter_by=source: compares names, letters in any case and any normal form
        listings = [listing for listing in listings if fold(listing[1]) == folded]
        if not listings:
            raise falcon.HTTPNotFound(description=f"asset {asset_id[:100]!r} has no listing of {source[:60]!r}")
        source = listings[0][1]  # the stored name, as every point gives it
    ids = [listing[0] for listing in listings]
    end = query.end if query.end is not None else newest_observation(conn, ids) + 1
    start = query.start if query.start is not None else max(FIRST_SECOND, end - (query.width * 100 or RAW_WINDOW))
    if start > end:
        raise InvalidQuery(f"from: {utc_text(start)} is after to, {utc_text(end)} (the default: just after the newest"
                           " observation)")  # fmt: skip
    digest = query.digest(asset_id)
    after = None
    if query.cursor:
        try:
            after = decode_history_cursor(unseal(query.cursor, version))
        except msgspec.DecodeError:
            raise InvalidQuery("cursor: not a token given by next_cursor") from None
        if after.query_digest != digest:
            raise InvalidQuery("cursor: issued for another asset, interval, window or source than this request's")
    limit = query.limit
    if not query.width:
        position = (after.at, after.source, after.source_id) if after else ()
        rows = conn.execute(raw_sql(len(ids), after is not None) + " LIMIT ?", (*ids, start, end, *position,
                            limit + 1)).fetchall()  # fmt: skip
        points: list[Any] = [PricePoint(utc_text(t), name, *values) for t, name, _, *values in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        position = (last[0], last[1], last[2]) if last else None
    else:
        kept_from = max(tier_horizon(listing, query.width) for listing in listings)
        candles = read_candles(conn, ids, query.width, max(start, kept_from), end, after.at if after else None)
        points = [
            Candle(utc_text(t), opening, high, low, close, cap, volume, count)
            for t, opening, high, low, close, cap, volume, count in candles[:limit]
        ]
        position = (candles[limit - 1][0], "", "") if len(candles) > limit else None
    return AssetHistory(
        request_id="",
        api_latency_ms=0.0,
        asset_id=asset_id,
        interval=query.interval,  # type: ignore[arg-type]
        source=source,
        from_=utc_text(start),
        to=utc_text(end),
        points=points,
        next_cursor=None
        if position is None
        else seal(encode_history_cursor(HistoryCursor(digest, *position)), version),
        data_version=str(version),
    )


def tier_horizon(listing: Sequence, width: int) -> int:
    """Where the tier that candles of `width` are read from begins for a listing (LISTINGS_SQL's row): raw for
    5m and 15m, hourly for 1h and 4h, daily (kept forever) for 1d. Listings of one asset prune apart (one that
    stopped, retention changed between runs), so a merged candle before the latest of them would lack some."""
    if width >= KEPT_WIDTHS[1]:
        return FIRST_SECOND
    return listing[3] if width < KEPT_WIDTHS[0] else listing[4]


def read_candles(
    conn: sqlite3.Connection, ids: Sequence[int], width: int, start: int, end: int, after: int | None = None
) -> list[tuple]:
    """The candles of `width` of the listings merged, for buckets starting in [start, end) (and after `after`):
    rows of the bucket's start (Unix seconds), open, high, low, close, cap, volume and observations."""
    first, past = -(-start // width) * width, -(-end // width) * width  # the buckets that start in [start, end)
    if after is not None:
        first = min(max(first, (after // width + 1) * width), past)
    if not ids:
        return []
    if width in KEPT_WIDTHS and len(ids) <= MERGED_IN_SQL:
        candles = conn.execute(kept_candle_sql(len(ids)), (*ids, first, past, width)).fetchall()
        if kept_candles_complete(conn, candles, ids, first, past, width):
            return candles
    if width >= KEPT_WIDTHS[0]:
        kept = width if width in KEPT_WIDTHS else KEPT_WIDTHS[0]
        parts = conn.execute(candle_sql(len(ids), True), (*ids, first, past, kept))
    else:  # from raw observations, in order of time, source and source id: each one a candle of its own
        parts = conn.execute(candle_sql(len(ids), False), (*ids, first, past))
    return merge_candles(parts, width)


def kept_candles_complete(
    conn: sqlite3.Connection, candles: list[tuple], ids: Sequence[int], first: int, past: int, width: int
) -> bool:
    """Whether kept_candle_sql's candles of the listings hold every listing's candles in [first, past): whether no
    listing after the first has a candle in a bucket where the first has none. So when the first has every bucket
    from the others' first to their last; else (a gap, as when no run loaded an hour) when the candles hold as
    many observations as the listings' (every candle holds some)."""
    if len(ids) == 1:
        return True
    buckets = [
        t for t in conn.execute(kept_extent_sql(len(ids)), (*ids, first, past, width)).fetchone() if t is not None
    ]
    if not buckets:
        return True
    lowest, highest = min(buckets), max(buckets)
    held = bisect.bisect_right(candles, highest, key=BUCKET) - bisect.bisect_left(candles, lowest, key=BUCKET)
    if held == (highest - lowest) // width + 1:
        return True
    (observations,) = conn.execute(kept_observations_sql(len(ids)), (*ids, first, past, width)).fetchone()
    return sum(map(OBSERVATIONS, candles)) == observations


def newest_observation(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    """The time of the newest observation of the listings (raw, else in a kept candle); now when there is none."""
    marks = ", ".join("?" * len(ids))
    row = conn.execute(
        f"SELECT max(observed_at) FROM raw_observation WHERE listing_id IN ({marks})", ids
    ).fetchone() if ids else (None,)  # fmt: skip
    if row[0] is None and ids:
        row = conn.execute(
            f"SELECT max(last_at) FROM (SELECT last_at FROM candle WHERE listing_id IN ({marks})"
            f" UNION ALL SELECT last_at FROM open_candle WHERE listing_id IN ({marks}))", (*ids, *ids)
        ).fetchone()  # fmt: skip
    return row[0] if row[0] is not None else int(time.time())


# --- answers --------------------------------------------------------------

# What the front door leaves in the ASGI scope for the app: the request's id and start (perf_counter()).
REQUEST_ID_KEY = "kasparro.request_id"
STARTED = "kasparro.started"


def latency_ms(started: float) -> float:
    """The api_latency_ms of every answer: the time since `started` (perf_counter()), in ms to the microsecond."""
    return round((time.perf_counter() - started) * 1e6) / 1e3  # round(x, 3) costs 3 times more


BLANK_HEAD = b'{"request_id":"","api_latency_ms":0.0'  # how an AssetPage with blank per-request fields begins
ANSWERS_BYTES = 16 * 1024 * 1024  # encoded answers kept per worker (pages are ~25 kB)
ENTRY_OVERHEAD = 512  # bytes a kept answer costs beyond its body: key, node, object (tracemalloc)


GZIP_MIN = 1024  # bytes of body from which it is compressed when the client accepts gzip
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, no time, OS unknown (RFC 1952)
VARY_ENCODING = (b"vary", b"Accept-Encoding")  # gzip or not, by Accept-Encoding
VARY_FORMAT = (b"vary", b"Accept, Accept-Encoding")  # where Accept chooses the format too
Header = tuple[bytes, bytes]
# A body below GZIP_MIN is the same whatever Accept-Encoding says, and a Vary naming it would have shared caches keep
# a copy for each value clients send: such an answer's Vary names only what else chose it. A stamped answer is
# measured as kept, with a blank request_id and api_latency_ms: the same choice for every request of it.
UNCOMPRESSED_VARY: dict[Header, Header | None] = {VARY_ENCODING: None, VARY_FORMAT: (b"vary", b"Accept")}


def uncompressed_vary(headers: Sequence[Header]) -> tuple[Header, ...]:
    """`headers` as an answer below GZIP_MIN sends them: without Accept-Encoding in its Vary."""
    kept = (UNCOMPRESSED_VARY.get(header, header) for header in headers)
    return tuple(header for header in kept if header is not None)


QVALUE = re.compile(r"0(\.[0-9]*)?|1(\.0*)?")  # RFC 9110 12.4.2, any number of decimals: float() takes '1e5', 'inf'


def weighted(header: str) -> Iterator[tuple[str, float]]:
    """The items of a comma-separated header (Accept, Accept-Encoding), lower-case, each with its q (RFC 9110
    12.4.2: 1 when absent; one that is not a number from 0 to 1 in digits 0-9 is 0; a later q= is an extension)."""
    for item in header.lower().split(","):
        name, *parameters = (part.strip() for part in item.split(";"))
        q = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip() == "q":
                q = float(value) if QVALUE.fullmatch(value.strip()) else 0.0
                break
        yield name, q


@functools.lru_cache(maxsize=256)
def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header lets gzip be sent: gzip (or its alias x-gzip) with q > 0, else `*` with
    q > 0, and not below the q it gives identity by name (the client prefers the body as it is). A name given twice
    (gzip and x-gzip are one) weighs its lowest q: either gzip name with q = 0 refuses gzip whatever the other says,
    a body the client cannot read being worse than a larger one."""
    gzip_q = any_q = identity_q = None
    for name, q in weighted(accept_encoding):
        if name in ("gzip", "x-gzip"):
            gzip_q = q if gzip_q is None else min(gzip_q, q)
        elif name == "*":
            any_q = q
        elif name == "identity":
            identity_q = q if identity_q is None else min(identity_q, q)
    chosen = gzip_q if gzip_q is not None else any_q
    return chosen is not None and chosen > 0 and (identity_q is None or chosen >= identity_q)


# Which format each media range of an Accept header names (a range names the formats it covers).
MEDIA_RANGES = {
    "application/json": ("json",),
    "text/csv": ("csv",),
    "application/x-ndjson": ("ndjson",),
    "application/*": ("json", "ndjson"),
    "text/*": ("csv",),
    "*/*": ("json", "csv", "ndjson"),
}


@functools.lru_cache(maxsize=256)
def preferred_format(accept: str, formats: tuple[str, ...] = PAGE_FORMATS) -> str | None:
    """The format of `formats` an Accept header prefers (RFC 9110 12.5.1): each gets the q of the most specific range
    naming it (of one named twice, the first, or 0 if either is), and one whose q is 0 is refused; of the rest the
    highest q wins, ties and formats the header does not name going to the first in `formats` (the default).
    None: the header refuses every one (a 406)."""
    ranked: dict[str, tuple[int, float]] = {}  # format: (specificity of the range that set its q, q)
    for media, q in weighted(accept):
        specificity = 2 - media.count("*")
        for name in MEDIA_RANGES.get(media, ()):
            held, _ = ranked.get(name, (-1, 0.0))
            if held < specificity or (held == specificity and q == 0):  # a range named twice: q = 0 stands
                ranked[name] = (specificity, q)
    quality = {name: q for name, (_, q) in ranked.items()}  # the formats the header names
    offered = [name for name in formats if quality.get(name) != 0]  # one it does not name is not refused ...
    if not offered:
        return None
    return max(offered, key=lambda name: (quality.get(name, 0.0), -formats.index(name)))  # ... but ranks last


def accepted_format(accept: str, formats: tuple[str, ...]) -> str:
    """The format of `formats` an Accept header prefers (preferred_format); 406 when it refuses every one."""
    chosen = preferred_format(accept, formats)
    if chosen is None:
        raise falcon.HTTPNotAcceptable(
            description=f"Accept refuses every format of this resource ({', '.join(FORMATS[f] for f in formats)});"
            f" accept one, or name it with format= ({'|'.join(formats)})",
            headers={"Vary": "Accept"},  # and no Accept-Encoding: a problem is below GZIP_MIN (uncompressed_vary)
        )
    return chosen


class GzipTail:
    """A body's unchanging tail deflated once, so that a gzip stream of any short head followed by it is built
    per request in microseconds: the head goes in a stored deflate block before the tail's blocks, and the
    head's CRC-32 is carried over the tail by a linear map (zlib's crc32_combine, precomputed for its length)."""

    made = 0  # tails deflated by this process: each kept answer's once, whatever the requests for it

    def __init__(self, tail: bytes | memoryview) -> None:
        deflate = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate: the gzip wrapper is written here
        self.deflated = deflate.compress(tail) + deflate.flush()
        self.tail = tail
        self.crc = zlib.crc32(tail)
        self.length = len(tail)
        self.shift: list[list[int]] | None = None  # made at the second member(): most answers are sent once
        GzipTail.made += 1

    def _shift(self) -> list[list[int]]:
        """crc32(head + tail) = M(crc32(head)) ^ crc32(tail), M linear: its value on each bit, by nibble."""
        zeros = bytes(self.length)
        base = zlib.crc32(zeros)
        bits = [zlib.crc32(zeros, 1 << bit) ^ base for bit in range(32)]
        return [
            [functools.reduce(int.__xor__, (bits[4 * nibble + b] for b in range(4) if value >> b & 1), 0)
             for value in range(16)]
            for nibble in range(8)
        ]  # fmt: skip

    def member(self, head: bytes) -> bytes:
        """A gzip stream (RFC 1952) of head + tail; head at most 65,535 bytes."""
        if self.shift is None and not head:
            crc = self.crc
        elif self.shift is None:  # the first: the tail's CRC carried on by reading it once more
            crc, self.shift = zlib.crc32(self.tail, zlib.crc32(head)), []
        else:
            if not self.shift:
                self.shift = self._shift()
            head_crc, crc = zlib.crc32(head), self.crc
            for nibble, table in enumerate(self.shift):
                crc ^= table[head_crc >> 4 * nibble & 15]
        size = len(head)
        stored = b"\x00" + struct.pack("<HH", size, size ^ 0xFFFF)  # a stored block, not the last: then the tail's
        trailer = struct.pack("<II", crc, (size + self.length) & 0xFFFFFFFF)
        return b"".join((GZIP_HEADER, stored, head, self.deflated, trailer))


def picked(record: msgspec.Struct, fields: Sequence[str]) -> dict[str, Any]:
    """The record's `fields` (fields=), in that order."""
    return {name: getattr(record, name) for name in fields}


def records_body(
    format: str, records: Sequence[msgspec.Struct], fields: Sequence[str], columns: Sequence[str], header: bool = True
) -> bytes:
    """Records (Structs with `columns`) as CSV (a header row unless not `header`, then one row each; a list joined
    with '|', null empty) or NDJSON (one JSON object a line), keeping `fields` in that order (empty: all)."""
    if format == "ndjson":
        if not fields:
            return encode_lines(records)
        return encode_lines([picked(record, fields) for record in records])
    names = fields or columns
    table = [tuple(csv_cell(getattr(record, name)) for name in names) for record in records]
    return (csv_lines([names]) if header else b"") + csv_lines(table)


def csv_lines(table: Sequence[Sequence[str | int | float | None]]) -> bytes:
    """Rows of equal length as CSV lines (RFC 4180: CRLF, a field quoted only when it must be; None empty).

    Rows whose text needs no quoting (no comma, quote, backslash or line break), as market data is, are
    encoded by msgspec as one JSON array of arrays and turned into CSV by byte replacements, 3 to 4 times
    faster than the csv module (whose float formatting dominates an export); others by the csv module, with
    numbers in the same text.
    """
    if not table:
        return b""
    body = encode(table)
    width = len(table[0])
    # No escape, no comma in a text, and more than one column (a line of one null must be written "").
    if width > 1 and b"\\" not in body and body.count(b",") == len(table) * width - 1:
        lines = b"\n" + body[2:-2].replace(b"],[", b"\n") + b"\n"
        for null, empty in ((b",null,", b",,"), (b",null,", b",,"), (b"\nnull,", b"\n,"), (b",null\n", b",\n"),
                            (b"\nnull\n", b"\n\n"), (b"\nnull\n", b"\n\n")):  # fmt: skip
            lines = lines.replace(null, empty)  # twice where nulls may be next to each other
        return lines[1:].replace(b'"', b"").replace(b"\n", b"\r\n")
    out = io.StringIO()  # numbers written as msgspec writes them above, and in JSON (0.00001532, not 1.532e-05)
    csv.writer(out).writerows([encode(cell).decode() if type(cell) is float else cell for cell in row] for row in table)
    return out.getvalue().encode()


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell: a list (or a stored JSON list) joined with '|'; None is written empty."""
    if isinstance(value, msgspec.Raw):  # an asset's sources, as stored
        return joined_list(bytes(value))
    return "|".join(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=1024)
def joined_list(stored: bytes | str) -> str:
    """A stored JSON list of text (an asset's sources) joined with '|'; the few distinct ones are kept."""
    return "|".join(decode_sources(stored))


def link_next(path: str, params: Mapping[str, str], cursor: str) -> Header:
    """An RFC 8288 Link header to the next page: the same query with `cursor` for its page."""
    query = {name: value for name, value in params.items() if name not in ("page", "cursor")} | {"cursor": cursor}
    return b"link", f'<{path}?{urllib.parse.urlencode(query)}>; rel="next"'.encode()


def current_copy(if_none_match: str, tag: str) -> bool:
    """Whether an If-None-Match header names the weak ETag `tag` (or any, `*`): the client's copy is current."""
    candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return f'"{tag}"' in candidates or "*" in candidates


class Answer(msgspec.Struct, frozen=True, eq=False, dict=True):
    """The status and encoded body of a GET, kept until the store's next commit (Commit.number) or until
    `until` (wall clock). A stamped body was encoded with a blank request_id and api_latency_ms, and each
    request splices its own in. A body of GZIP_MIN bytes or more is deflated once, when first asked for
    gzip, and each such request wraps it (GzipTail). A Struct, not a dataclass: one is built for every
    answer made, and a frozen dataclass's __init__ (a call of object.__setattr__ a field) costs ~6 times
    as much. `dict`: room for the cached properties."""

    commit: int
    body: bytes
    etag: str | None = None  # weak: W/"etag"; the same for the gzip coding, a representation of equal meaning
    status: int = 200
    stamped: bool = False
    until: float = math.inf
    route: str = ""  # the route template it answers (AnswerCache sets it): the front door's label and check
    content_type: bytes = b"application/json"
    headers: tuple[Header, ...] = (VARY_ENCODING,)  # sent with it (but Content-Type, -Length and ETag), as own_headers

    def __post_init__(self) -> None:
        assert not self.stamped or self.body.startswith(BLANK_HEAD), "a stamped answer starts with BLANK_HEAD"

    @property
    def compressible(self) -> bool:
        return len(self.body) >= GZIP_MIN

    @cached_property
    def _gzip_tail(self) -> GzipTail:
        return GzipTail(self._tail if self.stamped else self.body)

    @cached_property
    def _gzipped(self) -> bytes:
        return self._gzip_tail.member(b"")

    @property
    def size(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD

    @cached_property
    def etag_header(self) -> bytes:
        return f'W/"{self.etag}"'.encode()

    @cached_property
    def own_headers(self) -> tuple[Header, ...]:
        """`headers` as sent: Vary names Accept-Encoding only when the body may be compressed (uncompressed_vary)."""
        return self.headers if self.compressible else uncompressed_vary(self.headers)

    @cached_property
    def sent_headers(self) -> tuple[Header, ...]:
        """The headers of a 200 reply (but X-Request-ID, Content-Length and Content-Encoding)."""
        etag = () if self.etag is None else ((b"etag", self.etag_header),)
        return (*self.own_headers, *etag, (b"content-type", self.content_type))

    @cached_property
    def unchanged_headers(self) -> tuple[Header, ...]:
        """The headers of its 304 reply (but X-Request-ID): those of its 200 that RFC 9110 names, Vary included."""
        return (*self.own_headers, (b"etag", self.etag_header))

    @cached_property
    def _tail(self) -> memoryview:
        return memoryview(self.body)[len(BLANK_HEAD) :]

    def reply(
        self, request_id: str, started: float, if_none_match: str | None, gzip: bool = False
    ) -> tuple[int, bytes]:
        """The status and body for one request: 304 and no body when If-None-Match names the ETag; the body
        gzip-compressed when `gzip` and the answer is compressible."""
        if self.etag is not None and if_none_match is not None and current_copy(if_none_match, self.etag):
            return 304, b""
        if not self.stamped:
            return self.status, self._gzipped if gzip and self.compressible else self.body
        stamp = (b'{"request_id":', encode(request_id), b',"api_latency_ms":', encode(latency_ms(started)))
        if gzip and self.compressible:
            return self.status, self._gzip_tail.member(b"".join(stamp))
        return self.status, b"".join((*stamp, self._tail))


def send_answer(req: falcon.asgi.Request, resp: falcon.asgi.Response, answer: Answer) -> None:
    """Falcon's side of Answer.reply: the same status, headers and body as the front door sends."""
    gzip = answer.compressible and accepts_gzip(req.get_header("Accept-Encoding") or "")
    status, body = answer.reply(req.scope[REQUEST_ID_KEY], req.scope[STARTED], req.get_header("If-None-Match"), gzip)
    resp.status = status
    resp.context.kept_answer = True  # Compression leaves it as it is: coded (or not) by its stored size
    if answer.etag is not None:
        resp.etag = f'W/"{answer.etag}"'
    for name, value in answer.own_headers:
        resp.append_header(name.decode(), value.decode())
    if status != 304:
        resp.content_type = answer.content_type.decode()
        resp.data = body
        if gzip:
            resp.set_header("Content-Encoding", "gzip")


AnswerKey = tuple[str, bytes]  # the request's path and raw query string, as the ASGI scope gives them
Make = Callable[[Commit], Awaitable[Answer | None]]


def answer_key(scope: dict[str, Any]) -> AnswerKey:
    return scope["path"], scope["query_string"]


@dataclass(eq=False, slots=True)
class Making:
    """An answer being made at one commit (Commit.number), and the requests waiting for it."""

    commit: int
    waiters: list[asyncio.Future[Answer | None]] = field(default_factory=list)


class AnswerCache:
    """Answers of GET requests by path and query string, least recently used out first within `budget` bytes.

    Between two commits an answer is a pure function of its request. An answer is kept the second time it
    is made within the last SEEN_ONCE misses, not the first: requests that never repeat (lookups across a
    million ids) do not push out those asked for again and again.
    """

    SEEN_ONCE = 16_384

    def __init__(self, store: Store, budget: int) -> None:
        self.store = store
        self.budget = budget
        self.entries: OrderedDict[AnswerKey, Answer] = OrderedDict()
        self.size = 0
        self._seen_once: OrderedDict[int, None] = OrderedDict()  # hashes of keys made once lately, oldest first
        self._making: dict[AnswerKey, Making] = {}

    def held(self, key: AnswerKey, commit: Commit | None = None) -> Answer | None:
        """The answer kept for key if it holds at `commit` (by default the one the store was seen at this turn of
        the loop): lookup() without a coroutine, for the front door's every request. One that no longer holds is
        let go. None: not kept, or the store was not seen this turn (lookup() looks)."""
        answer = self.entries.get(key)
        if answer is None:
            return None
        if commit is None:
            commit = self.store.seen
            if commit is None:
                return None
        if answer.commit != commit.number or (answer.until != math.inf and time.time() >= answer.until):
            self.size -= self.entries.pop(key).size
            return None
        self.entries.move_to_end(key)
        return answer

    async def lookup(self, key: AnswerKey) -> Answer | None:
        """The answer kept for key if it still holds; the store is looked at only when one is kept."""
        if key not in self.entries:
            return None
        return self.held(key, self.store.seen or await self.store.watch())

    async def read(self, key: AnswerKey, route: str, make: Make) -> Answer | None:
        """The answer to key: kept, else the one being made for it at this commit, else make(commit)'s, which is
        then offered to keep. None (no such thing) is shared, not kept.

        Requests that miss the same key at one commit share one making: right after a commit every answer is
        gone. Each waits on a future of its own, so a request that goes away does not cancel the making for the
        others: make(commit) runs as a task of its own, or is a future no request awaits (Store.read_soon).
        """
        answer = await self.lookup(key)
        if answer is not None:
            return answer
        commit = self.store.seen or await self.store.watch()
        making = self._making.get(key)
        if making is None or making.commit != commit.number:
            made = make(commit)
            if not isinstance(made, asyncio.Future):
                made = asyncio.get_running_loop().create_task(made)  # type: ignore[arg-type]
            making = self._making[key] = Making(commit.number)
            made.add_done_callback(functools.partial(self._made, key, route, making))
        waiter: asyncio.Future[Answer | None] = asyncio.get_running_loop().create_future()
        making.waiters.append(waiter)
        return await waiter

    def _made(self, key: AnswerKey, route: str, making: Making, made: asyncio.Future[Answer | None]) -> None:
        """Offer the answer made to keep, and give it (or the error) to every request still waiting for it."""
        if self._making.get(key) is making:
            del self._making[key]
        if made.cancelled():  # the loop is closing
            for waiter in making.waiters:
                waiter.cancel()
            return
        error, answer = made.exception(), None
        if error is None:
            answer = made.result()
            if answer is not None and answer.route != route:  # a copy costs a lookup's encoding twice over
                answer = msgspec.structs.replace(answer, route=route)
            if (
                answer is not None
                and answer.status == 200
                and answer.commit == making.commit
                and answer.until > time.time()
            ):
                self.put(key, answer)
        for waiter in making.waiters:
            if waiter.done():  # its request went away
                continue
            if error is None:
                waiter.set_result(answer)
            else:
                waiter.set_exception(error)

    def put(self, key: AnswerKey, answer: Answer) -> None:
        """Keep an answer, if its key was made before lately."""
        if not self._seen_before(key):
            return
        previous = self.entries.pop(key, None)
        if previous is not None:
            self.size -= previous.size
        self.entries[key] = answer
        self.size += answer.size
        while self.size > self.budget:
            self.size -= self.entries.popitem(last=False)[1].size

    def _seen_before(self, key: AnswerKey) -> bool:
        """Whether key was made lately (or is kept); if not, remember that it was made once."""
        if key in self.entries:
            return True
        seen = hash(key)  # a collision only keeps an answer one read early
        if self._seen_once.pop(seen, False) is None:
            return True
        self._seen_once[seen] = None
        if len(self._seen_once) > self.SEEN_ONCE:
            self._seen_once.popitem(last=False)
        return False


# --- resources ------------------------------------------------------------


class IndexResource:
    """GET /: what the service is and where its endpoints are."""

    constant_bodies = True

    def __init__(self, endpoints: list[str]) -> None:
        self.body = encode(Index(message="Kasparro Backend Service", version=__version__, endpoints=endpoints))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.body


class KeptResource:
    """A resource whose answers the AnswerCache keeps: make() builds one from the store at a commit, and GET
    (HEAD too) sends it. The front door calls answer() itself for a GET of the route with no query string."""

    formats = False  # whether its records come in FORMATS: then Accept chooses one when `format` is absent

    def __init__(self, store: Store, answers: AnswerCache) -> None:
        self.store = store
        self.answers = answers

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, **fields: str) -> None:
        key, params = answer_key(req.scope), req.params
        accept = req.get_header("Accept")
        if self.formats and accept and "format" not in params:
            chosen = accepted_format(accept, PAGE_FORMATS)
            if chosen != "json":  # the same answer as to the query with format=chosen: kept under that key
                key = (key[0], key[1] + (b"&" if key[1] else b"") + b"format=" + chosen.encode())
                params = {**params, "format": chosen}
        answer = await self.answer(req.uri_template, key, params, **fields)
        if answer is None:
            raise falcon.HTTPNotFound(description=self.missing(**fields))
        send_answer(req, resp, answer)

    async def answer(self, route: str, key: AnswerKey, params: Mapping[str, str], **fields: str) -> Answer | None:
        """The answer to a request of this route, key, query parameters and path fields; None: no such thing."""
        return await self.answers.read(key, route, lambda commit: self.make(commit, params, **fields))

    def make(self, commit: Commit, params: Mapping[str, str], **fields: str) -> Awaitable[Answer | None]:
        """The answer at `commit` (None: no such thing): a coroutine, or a read's future (Store.read_soon)."""
        raise NotImplementedError

    def missing(self, **fields: str) -> str:
        return "no such resource"


class AssetPagesResource(KeptResource):
    """GET /data: a page of unified records, read on the loop when it is a short index range. As JSON, the page
    object; as CSV or NDJSON, its records alone, with the paging in headers: X-Total-Count (total_items),
    X-Data-Version and, but on the last page, Link rel="next" (the URL of the next page, by cursor)."""

    formats = True

    async def make(self, commit: Commit, params: Mapping[str, str]) -> Answer:
        query = parse_asset_query(params)  # single values: QueryParameters saw to it

        def read(conn: sqlite3.Connection, version: DataVersion) -> Answer:
            if query.as_of is None:
                page = read_page(conn, version, query, commit)
            else:  # in a reader's thread, but from a connection of the market's own
                page = read_page_as_of(self.store._uri(), query, commit)
            etag = query.etag(page.data_version)
            if query.format == "json":
                if query.fields:
                    data = [picked(asset, query.fields) for asset in page.data]
                    page = msgspec.structs.replace(page, data=data)  # type: ignore[arg-type]
                return Answer(commit.number, encode(page), etag=etag, stamped=True, headers=(VARY_FORMAT,))
            headers = [VARY_FORMAT, (b"x-total-count", b"%d" % page.total_items)]
            headers.append((b"x-data-version", page.data_version.encode()))
            if page.next_cursor is not None:
                headers.append(link_next("/data", params, page.next_cursor))
            body = records_body(query.format, page.data, query.fields, ASSET_FIELDS)
            media = FORMATS[query.format].encode()
            return Answer(commit.number, body, etag=etag, content_type=media, headers=tuple(headers))

        on_loop = query.as_of is None and page_fits_on_loop(query, commit)
        return await self.store.read(read, on_loop=on_loop)


DETAIL_ROUTE = "/data/{asset_id}"


class AssetResource(KeptResource):
    """GET /data/{asset_id}: one unified record with the latest quote of each source (or `fields` of it)."""

    def make(self, commit: Commit, params: Mapping[str, str], asset_id: str) -> asyncio.Future[Answer | None]:
        check_params(params, ("fields",))
        fields = parse_fields(params.get("fields"), DETAIL_FIELDS)

        def read(conn: sqlite3.Connection, version: DataVersion) -> Answer | None:
            detail = read_asset(conn, version, asset_id)
            if detail is None:
                return None
            body = encode(picked(detail, fields) if fields else detail)
            etag = asset_etag(version, fields, asset_id)
            return Answer(commit.number, body, etag=etag, route=DETAIL_ROUTE)

        return self.store.read_soon(read)

    def missing(self, asset_id: str) -> str:
        return f"no asset with asset_id {asset_id[:100]!r}"


class AssetHistoryResource(KeptResource):
    """GET /data/{asset_id}/history: the asset's raw observations or candles over a window, read in a thread. As
    CSV or NDJSON: the points alone, with X-Data-Version and, when more follow, Link rel="next"."""

    formats = True

    async def make(self, commit: Commit, params: Mapping[str, str], asset_id: str) -> Answer | None:
        query = parse_history_query(params)

        def read(conn: sqlite3.Connection, version: DataVersion) -> Answer | None:
            history = read_history(conn, version, asset_id, query)
            if history is None:
                return None
            etag = query.etag(history.data_version, asset_id)
            if query.format == "json":
                return Answer(commit.number, encode(history), etag=etag, stamped=True, headers=(VARY_FORMAT,))
            headers = [VARY_FORMAT, (b"x-data-version", history.data_version.encode())]
            if history.next_cursor is not None:
                path = f"/data/{urllib.parse.quote(asset_id, safe='')}/history"
                headers.append(link_next(path, params, history.next_cursor))
            columns = (Candle if query.width else PricePoint).__struct_fields__
            body = records_body(query.format, history.points, (), columns)
            media = FORMATS[query.format].encode()
            return Answer(commit.number, body, etag=etag, content_type=media, headers=tuple(headers))

        return await self.store.read(read)

    def missing(self, asset_id: str) -> str:
        return f"no asset with asset_id {asset_id[:100]!r}"


class ClientGone(Exception):
    """The client of a streamed body went away, or stopped reading: the stream ends there."""


# Where the front door leaves the request's ASGI receive, for a streamed body to notice the client leave.
RECEIVE_KEY = "kasparro.receive"


class AssetExport:
    """The body of GET /data/export, as Falcon reads it: the query's assets in its order, CHUNK rows a read, all
    from one Snapshot (one data version), encoded (and gzip-compressed) on the snapshot's thread. Falcon closes
    it at the end; when the client leaves, the next read raises ClientGone.

    `spool` (a replica's Snapshot): every chunk is written to a temporary file first, in one trip to the snapshot's
    thread, and the snapshot closed before the client reads any: its read transaction lasts as long as reading the
    store takes, not as long as the client takes, which would keep Litestream's apply out of the copy meanwhile.
    """

    CHUNK = 5_000
    SPOOLED_READ = 256 * 1024  # bytes a read of the spooled body returns at most

    def __init__(
        self,
        snapshot: Snapshot | MarketSnapshot,
        query: AssetQuery,
        gzip: bool,
        receive: Callable[..., Any] | None,
        spool: bool = False,
    ) -> None:
        self.snapshot = snapshot
        self.spool = spool
        self.spooled: BinaryIO | None = None
        self.query = query
        self.compressor = zlib.compressobj(1, zlib.DEFLATED, 31) if gzip else None  # level 1: ~4x, and fast
        self.after: CursorToken | None = None
        self.sources: SourceFilter | None = None  # resolved by the first read (every read sees one data version)
        self.first = True
        self.done = False
        self.watcher = asyncio.get_running_loop().create_task(self._watch(receive)) if receive else None

    @staticmethod
    async def _watch(receive: Callable[..., Any]) -> None:
        """Return when the client disconnects (the request had no body: the next event is the disconnect)."""
        while (await receive())["type"] != "http.disconnect":
            pass

    async def read(self, size: int = -1) -> bytes:
        """The next encoded chunk (maybe more than `size`); b"" after the last."""
        if self.spool:
            return await self._read_spooled()
        while not self.done:
            if self.watcher is not None and self.watcher.done():
                raise ClientGone("the client disconnected during an export")
            chunk = await self.snapshot.read(self._next_chunk)
            if chunk:
                return chunk
        return b""

    async def _read_spooled(self) -> bytes:
        if self.watcher is not None and self.watcher.done():
            raise ClientGone("the client disconnected during an export")
        if self.spooled is None:
            self.spooled = await self.snapshot.read(self._spool_all)
            await self.snapshot.close()
        return await asyncio.to_thread(self.spooled.read, self.SPOOLED_READ)

    def _spool_all(self, conn: sqlite3.Connection, version: DataVersion) -> BinaryIO:
        spooled = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        try:
            while not self.done:
                spooled.write(self._next_chunk(conn, version))
            spooled.seek(0)
        except BaseException:
            spooled.close()
            raise
        return spooled

    def _next_chunk(self, conn: sqlite3.Connection, version: DataVersion) -> bytes:
        if self.sources is None:
            self.sources = resolve_sources(conn, self.query.conditions)
        rows = read_rows(conn, self.query, self.sources, self.after, 0, self.CHUNK)
        self.done = len(rows) < self.CHUNK
        if rows:
            self.after = position_of(self.query, rows[-1])
        query = self.query
        if query.format == "csv":  # from the rows themselves: an Asset apiece would cost more than the CSV
            names = query.fields or ASSET_FIELDS
            body = (csv_lines([names]) if self.first else b"") + csv_lines(csv_table(rows, names))
        else:
            body = records_body(query.format, assets_of(rows), query.fields, ASSET_FIELDS)
        self.first = False
        if self.compressor is not None:
            body = self.compressor.compress(body) + (self.compressor.flush() if self.done else b"")
        return body

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.spooled is not None:
            self.spooled.close()
        await self.snapshot.close()


SOURCES_AT = ASSET_FIELDS.index("sources")


def csv_table(rows: Sequence[tuple], names: Sequence[str]) -> list[tuple]:
    """Rows of ASSET_COLUMNS as CSV cells of the fields `names`: sources joined with '|'."""
    if tuple(names) == ASSET_FIELDS:
        return [(a, b, c, d, e, f, g, h, i, joined_list(j), k) for a, b, c, d, e, f, g, h, i, j, k in rows]
    at = [ASSET_FIELDS.index(name) for name in names]
    return [tuple(joined_list(row[i]) if i == SOURCES_AT else row[i] for i in at) for row in rows]


async def unknown_length() -> AsyncIterator[bytes]:
    """The body of a HEAD of a streamed GET: its length is known only once sent (RFC 9110 9.3.2)."""
    yield b""


class AssetExportResource:
    """GET /data/export: every asset that filter_by (and sort, as_of, fields) selects, in one CSV or NDJSON response
    streamed from one snapshot of the store or of the moment's market (X-Data-Version), in constant memory, as an
    attachment."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        params = req.params
        accept = req.get_header("Accept")
        if accept and "format" not in params:
            params = {**params, "format": accepted_format(accept, EXPORT_FORMATS)}
        query = parse_asset_query(params, EXPORT_PARAMS, EXPORT_FORMATS)
        gzip = accepts_gzip(req.get_header("Accept-Encoding") or "")
        resp.vary = ("Accept", "Accept-Encoding")
        snapshot: Snapshot | MarketSnapshot | None = None
        if req.method == "HEAD":  # GET's status and headers, without a snapshot Falcon would not close
            if query.as_of is None:
                await self.store.snapshot_possible()
            version = (await self.store.watch()).version
        elif query.as_of is None:
            snapshot = await self.store.snapshot()
            version = snapshot.version
        else:
            commit = await self.store.watch()
            uri = self.store._uri()
            snapshot = MarketSnapshot(await self.store.read(lambda conn, version: market_at(uri, query, commit)))
            version = snapshot.version
        # The file's headers only once it will be sent: an error is no attachment.
        resp.content_type = FORMATS[query.format]
        resp.downloadable_as = f"assets.{query.format}"
        if gzip:
            resp.set_header("Content-Encoding", "gzip")
        resp.set_header("X-Data-Version", str(version))
        if snapshot is None:
            resp.stream = unknown_length()  # never read: it keeps Falcon from saying Content-Length: 0
        else:
            spool = self.store.replica and isinstance(snapshot, Snapshot)
            resp.stream = AssetExport(snapshot, query, gzip, req.scope.get(RECEIVE_KEY), spool)


def run_is_live(store: Store, replica: bool) -> bool:
    """Whether the run the records say is running still runs.

    A replica cannot see the primary's writer lock, so it takes the record's word: a run that died
    there is marked failed by the primary's next run, and that record replicates too.
    """
    return replica or store.etl_running()


def read_latest_runs(conn: sqlite3.Connection, version: DataVersion) -> list[dict[str, Any]]:
    """The two newest ETL runs: the latest, and the one before it while the latest still runs."""
    rows = conn.execute("SELECT status, started_at, ended_at FROM etl_run ORDER BY run_id DESC LIMIT 2")
    return [dict(zip(("status", "started_at", "ended_at"), row, strict=True)) for row in rows]


def age_seconds(moment: str) -> float:
    return time.time() - datetime.fromisoformat(moment).timestamp()


UNHEALTHY = Health(status="unhealthy", db_connected=False, etl_last_run=None, etl_status=None)


class HealthResource(KeptResource):
    """GET /health: is the store readable and the ETL fresh."""

    def __init__(self, store: Store, answers: AnswerCache, max_age: int, replica: bool = False) -> None:
        super().__init__(store, answers)
        self.max_age = max_age
        self.replica = replica
        # Retry-After as every 503: a store being replaced or repaired reads unhealthy for a moment
        self.unhealthy = Answer(0, encode(UNHEALTHY), status=503, headers=(VARY_ENCODING, (b"retry-after", b"1")))

    async def answer(self, route: str, key: AnswerKey, params: Mapping[str, str], **fields: str) -> Answer | None:
        try:
            return await super().answer(route, key, params)
        except StoreUnavailable as error:
            log.warning("store unavailable", reason=str(error))
            return self.unhealthy

    async def make(self, commit: Commit, params: Mapping[str, str]) -> Answer:
        runs = await self.store.read(read_latest_runs, on_loop=True)
        health = self.judge(runs)
        return Answer(commit.number, encode(health), until=self.holds_until(runs, health))

    def holds_until(self, runs: Sequence[dict[str, Any]], health: Health) -> float:
        """When a verdict can change without a commit: at once while a run is marked running (its process may
        die, or a live one take the lock), else when freshness runs out."""
        if runs and runs[0]["status"] == "running":
            return 0.0
        if health.status == "healthy":
            return datetime.fromisoformat(runs[0]["ended_at"]).timestamp() + self.max_age
        return math.inf

    def judge(self, runs: Sequence[dict[str, Any]]) -> Health:
        """healthy when the latest finished run is good and recent; a live run keeps the previous verdict."""
        if not runs:
            return Health(status="degraded", db_connected=True, etl_last_run=None, etl_status="never_run")
        latest = runs[0]
        status, last_run = latest["status"], latest["ended_at"] or latest["started_at"]
        finished = latest
        if status == "running":
            if run_is_live(self.store, self.replica):
                finished = runs[1] if len(runs) > 1 else None
            else:
                status = "failed"
        good = finished is not None and finished["status"] in ("success", "partial") and finished["ended_at"]
        fresh = good and age_seconds(finished["ended_at"]) <= self.max_age
        verdict = "healthy" if status != "failed" and fresh else "degraded"
        return Health(status=verdict, db_connected=True, etl_last_run=last_run, etl_status=status)


# ETL outcomes summed over finished runs (run_totals, kept by store.sql's triggers), and the runs still running:
# two reads of a few rows each, however many runs the store holds.
TOTALS_SQL = """
SELECT scope, runs, successes, partials, failures, rows_read, rows_loaded, rows_rejected, last_success_at,
       last_failure_at, last_error, iif(durations > 0, 1.0 * duration_ms_sum / durations, NULL) AS avg_duration_ms
FROM run_totals ORDER BY scope
"""
RUNNING_SQL = """
SELECT run_id, '' AS scope, started_at, rows_read, rows_loaded, rows_rejected FROM etl_run WHERE status = 'running'
UNION ALL
SELECT run_id, source, started_at, rows_read, rows_loaded, rows_rejected FROM run_source
WHERE run_id IN (SELECT run_id FROM etl_run WHERE status = 'running') AND status = 'running'
"""
COUNTS = ("rows_read", "rows_loaded", "rows_rejected")  # what a running run adds so far
NO_RUNS = {
    **dict.fromkeys(("runs", "successes", "partials", "failures", "rows_read", "rows_loaded", "rows_rejected"), 0),
    **dict.fromkeys(("last_success_at", "last_failure_at", "last_error", "avg_duration_ms")),
}
RECENT_RUNS = 10  # runs listed by /stats
RUNS_LIMIT = 20  # runs GET /runs lists by default
PREVIOUS_RUNS = 10  # runs of a source before the judged one whose median an anomaly is measured against
MAX_RUN_ID = 999_999_999  # a run id in a URL has at most 9 digits: 19,000 years of 10-minute runs
RUN_ID = re.compile(r"[1-9][0-9]{0,8}")  # 1 to MAX_RUN_ID in plain digits: one URL per run
RUN_COLUMNS = ", ".join(name for name in Run.__struct_fields__ if name != "outcomes")
OUTCOME_COLUMNS = ", ".join(RunSourceOutcome.__struct_fields__)
# The run history, read by run id (etl_run's and run_source's keys) and, for the anomalies, by run_source_source.
RUNS_SQL = f"SELECT {RUN_COLUMNS} FROM etl_run ORDER BY run_id DESC LIMIT ?"
RUN_SQL = f"SELECT {RUN_COLUMNS} FROM etl_run WHERE run_id = ?"
NEWEST_RUN_SQL = "SELECT max(run_id) FROM etl_run"
OUTCOMES_SQL = f"SELECT run_id, {OUTCOME_COLUMNS} FROM run_source WHERE run_id BETWEEN ? AND ? ORDER BY run_id, source"
# etl.py's detail of a source it skipped because its input had not changed since a run that loaded it
UNCHANGED = "unchanged since run "
# The runs an anomaly is measured against: the source's earlier loads (finished, not failed, not skipped)
PREVIOUS_SQL = f"""
SELECT run_id, rows_read, rows_loaded, duration_ms FROM run_source
WHERE source = ? AND run_id < ? AND status IN ('success', 'partial')
  AND (detail IS NULL OR detail NOT LIKE '{UNCHANGED}%')
ORDER BY run_id DESC LIMIT {PREVIOUS_RUNS}
"""
JUDGED = ("rows_read", "rows_loaded", "duration_ms")
# A duration flagged is also this many ms or more above its median: a run's few ms vary with the disk's syncs and
# the machine's load more than 3 times over (1 ms against a median of 0 was "over 3 times").
DURATION_FLOOR_MS = 100
COMPARED = ("rows_read", "rows_loaded", "rows_rejected", "duration_ms")


def dict_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts keyed by column name, ready to become Structs."""
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


# A run recorded as running whose process is gone, as the next run will record it (etl.py adds which run found it).
DIED = {"status": "failed", "error": "the run's process died or could not record its end"}


@dataclass(frozen=True)
class RunRows:
    """Rows of etl_run (newest first) and of their run_source outcomes, as one read transaction saw them."""

    data_version: str
    runs: list[dict[str, Any]]
    outcomes: list[dict[str, Any]]
    newest: int | None  # the newest run's id in the whole store

    @classmethod
    def read(cls, conn: sqlite3.Connection, version: DataVersion, runs: list[dict[str, Any]]) -> RunRows:
        span = (runs[-1]["run_id"], runs[0]["run_id"]) if runs else (1, 0)
        outcomes = dict_rows(conn.execute(OUTCOMES_SQL, span))
        return cls(str(version), runs, outcomes, conn.execute(NEWEST_RUN_SQL).fetchone()[0])

    @property
    def running(self) -> bool:
        """Whether the newest run is recorded as running: an answer made from these rows is then not kept."""
        return any(run["run_id"] == self.newest and run["status"] == "running" for run in self.runs)

    def records(self, live: bool) -> list[Run]:
        """The runs as Runs. One recorded as running is failed with DIED's error, its running sources too, unless
        it is the newest and `live` (its process still holds the writer lock): its process is gone, and the next
        run marks it so."""
        by_run: dict[int, list[dict[str, Any]]] = {}
        for row in self.outcomes:
            by_run.setdefault(row["run_id"], []).append(row)
        records = []
        for row in self.runs:
            dead = row["status"] == "running" and not (live and row["run_id"] == self.newest)
            parts = [
                RunSourceOutcome(
                    **{name: part[name] for name in RunSourceOutcome.__struct_fields__}
                    | {"drift": decode_drift(part["drift"]) if part["drift"] else {}}
                    | (DIED if dead and part["status"] == "running" else {})
                )
                for part in by_run.get(row["run_id"], [])
            ]
            fields = row | {"sources": decode_sources(row["sources"])} | (DIED if dead else {})
            records.append(Run(**fields, outcomes=parts))
        return records


class RunHistoryResource(KeptResource):
    """A resource made of run records: not kept while the newest run is marked running (its process may die
    without a commit), and that run read as failed when no process runs it."""

    def __init__(self, store: Store, answers: AnswerCache, replica: bool = False) -> None:
        super().__init__(store, answers)
        self.replica = replica

    def live(self, rows: RunRows) -> bool:
        """Whether the newest run, recorded as running, still runs."""
        return rows.running and run_is_live(self.store, self.replica)

    def answer_of(
        self, commit: Commit, rows: RunRows, body: Callable[[list[Run]], msgspec.Struct], live: bool | None = None
    ) -> Answer:
        """The answer of `body` over the runs; `live`: self.live(rows), when the caller has judged it already."""
        runs = rows.records(live=self.live(rows) if live is None else live)
        return Answer(commit.number, encode(body(runs)), until=0.0 if rows.running else math.inf)


def run_totals(
    finished: Sequence[dict[str, Any]], running: Sequence[dict[str, Any]], live_run: int | None
) -> dict[str, dict[str, Any]]:
    """Totals by scope ('' overall, else a source): the finished runs' sums, and what the ones recorded as running
    read so far. Of those, all but `live_run` (the newest, while its process holds the writer lock) are failures
    with DIED's error, as GET /runs reads them: such a run is the newest its scope has, and its start the last
    moment known of it (the next run records the moment it finds it)."""
    totals = {"": dict(NO_RUNS)} | {row.pop("scope"): row for row in finished}
    for row in running:
        scope = totals.setdefault(row["scope"], dict(NO_RUNS))
        scope["runs"] += 1
        for count in COUNTS:
            scope[count] += row[count] or 0
        if row["run_id"] != live_run:
            scope["failures"] += 1
            scope["last_failure_at"] = max(scope["last_failure_at"] or row["started_at"], row["started_at"])
            scope["last_error"] = DIED["error"]
    return totals


class StatsResource(RunHistoryResource):
    """GET /stats: ETL outcomes overall, per source, and the last runs."""

    async def make(self, commit: Commit, params: Mapping[str, str]) -> Answer:
        check_params(params, ())

        def read(
            conn: sqlite3.Connection, version: DataVersion
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], RunRows]:
            finished, running = dict_rows(conn.execute(TOTALS_SQL)), dict_rows(conn.execute(RUNNING_SQL))
            return finished, running, RunRows.read(conn, version, dict_rows(conn.execute(RUNS_SQL, (RECENT_RUNS,))))

        finished, running, rows = await self.store.read(read)
        live = self.live(rows)
        totals = run_totals(finished, running, rows.newest if live else None)
        return self.answer_of(
            commit,
            rows,
            lambda runs: Stats(
                data_version=rows.data_version,
                overall=RunTotals(**totals.pop("")),
                sources=[SourceTotals(source=source, **row) for source, row in sorted(totals.items())],
                recent_runs=runs,
            ),
            live,
        )


class RunsResource(RunHistoryResource):
    """GET /runs: the newest runs first, each with its sources' outcomes."""

    async def make(self, commit: Commit, params: Mapping[str, str]) -> Answer:
        check_params(params, ("limit",))
        limit = parse_int("limit", params.get("limit", str(RUNS_LIMIT)), 1, 100)
        rows = await self.store.read(
            lambda conn, version: RunRows.read(conn, version, dict_rows(conn.execute(RUNS_SQL, (limit,))))
        )
        return self.answer_of(
            commit, rows, lambda runs: RunList(data_version=rows.data_version, limit=limit, runs=runs)
        )


def read_run(conn: sqlite3.Connection, version: DataVersion, run_id: int) -> RunRows:
    """One run with its outcomes; a 404 when there is no such run."""
    runs = dict_rows(conn.execute(RUN_SQL, (run_id,)))
    if not runs:
        raise falcon.HTTPNotFound(description=f"no run {run_id}; GET /runs lists the recorded runs")
    return RunRows.read(conn, version, runs)


class RunResource(RunHistoryResource):
    """GET /runs/{run_id}: one run. Its id is matched here, not by Falcon's `int` converter, which takes what
    int() takes ('+1', '1_0', non-ASCII digits): a run would have many URLs."""

    async def make(self, commit: Commit, params: Mapping[str, str], run_id: str) -> Answer:
        check_params(params, ())
        if not RUN_ID.fullmatch(run_id):
            raise falcon.HTTPNotFound(
                description=f"no run {run_id[:40]!r}: a run id is written in digits 0-9, from 1 to {MAX_RUN_ID} with"
                " no leading zero, as GET /runs lists them"
            )
        rows = await self.store.read(lambda conn, version: read_run(conn, version, int(run_id)))
        return self.answer_of(commit, rows, lambda runs: runs[0])


def measure(a: int | None, b: int | None) -> Measure:
    return Measure(a=a, b=b, difference=None if a is None or b is None else b - a)


def compare_runs(
    a: Run, b: Run, previous: Mapping[tuple[int, str], Sequence[dict[str, Any]]], data_version: str
) -> RunComparison:
    """Runs a and b side by side per source, with the anomalies of each (see anomalies_of).

    `previous` maps (run id, source) to that source's previous finished runs, rows of PREVIOUS_SQL.
    """
    parts_a = {part.source: part for part in a.outcomes}
    parts_b = {part.source: part for part in b.outcomes}
    sources = []
    for source in sorted(parts_a.keys() | parts_b.keys()):
        part_a, part_b = parts_a.get(source), parts_b.get(source)
        drift_a = set(part_a.drift) if part_a else set()
        drift_b = set(part_b.drift) if part_b else set()
        sources.append(
            SourceComparison(
                source=source,
                status_a=part_a.status if part_a else None,
                status_b=part_b.status if part_b else None,
                **{
                    name: measure(getattr(part_a, name) if part_a else None, getattr(part_b, name) if part_b else None)
                    for name in COMPARED
                },
                drift_appeared=sorted(drift_b - drift_a),
                drift_disappeared=sorted(drift_a - drift_b),
            )
        )
    judged = (a,) if a.run_id == b.run_id else (a, b)
    anomalies = [anomaly for run in judged for anomaly in anomalies_of(run, previous)]
    return RunComparison(data_version=data_version, a=a, b=b, sources=sources, anomalies=anomalies)


def anomalies_of(run: Run, previous: Mapping[tuple[int, str], Sequence[dict[str, Any]]]) -> list[Anomaly]:
    """The anomalies of each finished source of `run` against that source's previous loads (up to 10: runs that
    neither failed nor skipped it for an unchanged input, which is not judged either).

    Rows read or loaded are anomalous when they differ from their median over those runs by more than half
    of it; the duration when it is over 3 times its median and DURATION_FLOOR_MS or more above it. A source with
    no previous run is not judged.
    """
    found = []
    for part in run.outcomes:
        earlier = previous.get((run.run_id, part.source), ())
        if part.status == "running" or not earlier or (part.detail or "").startswith(UNCHANGED):
            continue
        for name in JUDGED:
            value = getattr(part, name)
            baseline = [row for row in earlier if row[name] is not None]
            if value is None or not baseline:
                continue
            median = statistics.median(row[name] for row in baseline)
            if name == "duration_ms":
                flagged = value > 3 * median and value - median >= DURATION_FLOOR_MS
                rule = f"is over 3 times, and {DURATION_FLOOR_MS} ms or more above,"
            else:
                flagged, rule = abs(value - median) > median / 2, "differs by more than half from"
            if flagged:
                found.append(
                    Anomaly(
                        run_id=run.run_id,
                        source=part.source,
                        measure=name,
                        value=value,
                        median=float(median),
                        previous_runs=[row["run_id"] for row in baseline],
                        previous_values=[row[name] for row in baseline],
                        reason=f"{name} {value} {rule} the median {median:g} of the source's previous"
                        f" {len(baseline)} run{'s' if len(baseline) > 1 else ''}",
                    )
                )
    return found


class RunComparisonResource(RunHistoryResource):
    """GET /runs/compare?a=&b=: runs a and b side by side; the anomalies judge each against the runs before it."""

    async def make(self, commit: Commit, params: Mapping[str, str]) -> Answer:
        check_params(params, ("a", "b"))
        a, b = (self.run_param(params, name) for name in ("a", "b"))

        def read(conn: sqlite3.Connection, version: DataVersion) -> tuple[RunRows, dict[tuple[int, str], list]]:
            found = [read_run(conn, version, run_id) for run_id in dict.fromkeys((a, b))]  # a, then b unless a = b
            runs = [run for one in found for run in one.runs]
            rows = RunRows(
                found[0].data_version, runs, [part for one in found for part in one.outcomes], found[0].newest
            )
            previous = {
                (part["run_id"], part["source"]): dict_rows(
                    conn.execute(PREVIOUS_SQL, (part["source"], part["run_id"]))
                )
                for part in rows.outcomes
            }
            return rows, previous

        rows, previous = await self.store.read(read)

        def comparison(runs: list[Run]) -> RunComparison:
            return compare_runs(runs[0], runs[-1], previous, rows.data_version)

        return self.answer_of(commit, rows, comparison)

    @staticmethod
    def run_param(params: Mapping[str, str], name: str) -> int:
        if name not in params:
            raise InvalidQuery(f"{name}: required: the id of a run to compare (GET /runs lists them)")
        return parse_int(name, params[name], 1, MAX_RUN_ID)


# --- metrics --------------------------------------------------------------


@dataclass(frozen=True)
class MetricFamilies:
    """Metric families read at scrape time, in the shape prometheus-client's exposition expects."""

    families: Sequence[Metric]

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


# Each source's latest finished run, and when it last succeeded.
LATEST_SOURCE_RUNS_SQL = """
SELECT source, rows_read, rows_loaded, rows_rejected, last_success_at FROM (
    SELECT source, rows_read, rows_loaded, rows_rejected,
           max(ended_at) FILTER (WHERE status IN ('success', 'partial')) OVER per_source AS last_success_at,
           row_number() OVER (per_source ORDER BY run_id DESC) AS recency
    FROM run_source WHERE status != 'running'
    WINDOW per_source AS (PARTITION BY source)
) WHERE recency = 1 ORDER BY source
"""


@dataclass(frozen=True)
class StoreFacts:
    """What the store gauges are made of, read once per commit (counting 1M assets takes a while)."""

    source_runs: list[dict[str, Any]]
    last_success_at: str | None
    assets: dict[str, int]
    committed_at: str | None
    last_commit_at: str | None  # the newest commit of any kind: new data, or a run's start or end


def read_store_facts(conn: sqlite3.Connection, version: DataVersion) -> StoreFacts:
    overall = conn.execute("SELECT max(ended_at) FROM etl_run WHERE status IN ('success', 'partial')").fetchone()
    meta = conn.execute("SELECT committed_at FROM store_meta WHERE id = 1").fetchone()
    latest = conn.execute("SELECT started_at, ended_at FROM etl_run ORDER BY run_id DESC LIMIT 1").fetchone()
    commits = [meta and meta[0], latest and (latest[1] or latest[0])]
    return StoreFacts(
        source_runs=dict_rows(conn.execute(LATEST_SOURCE_RUNS_SQL)),
        last_success_at=overall[0] if overall else None,
        assets=dict(conn.execute(ASSETS_BY_STATUS_SQL).fetchall()),
        committed_at=meta[0] if meta else None,
        last_commit_at=max((moment for moment in commits if moment), default=None),
    )


ASSETS_BY_STATUS_SQL = "SELECT status, count(*) FROM asset GROUP BY status"


def store_gauges(facts: StoreFacts) -> list[Metric]:
    """ETL freshness and rows, assets and data age; ages as of now."""
    freshness = GaugeMetricFamily(
        "kasparro_etl_last_success_age_seconds", "Seconds since the source's last successful ETL run", labels=["source"]
    )
    rows = GaugeMetricFamily(
        "kasparro_etl_last_run_rows", "Rows of the source's latest finished ETL run", labels=["source", "outcome"]
    )
    for run in facts.source_runs:
        if run["last_success_at"]:
            freshness.add_metric([run["source"]], age_seconds(run["last_success_at"]))
        for outcome in ("read", "loaded", "rejected"):
            rows.add_metric([run["source"], outcome], run[f"rows_{outcome}"])
    families: list[Metric] = [freshness, rows]
    if facts.last_success_at:
        families.append(
            GaugeMetricFamily(
                "kasparro_etl_run_last_success_age_seconds",
                "Seconds since the last successful ETL run",
                value=age_seconds(facts.last_success_at),
            )
        )
    assets = GaugeMetricFamily("kasparro_assets", "Assets in the store, by status", labels=["status"])
    for status in STATUSES:
        assets.add_metric([status], facts.assets.get(status, 0))
    families.append(assets)
    if facts.committed_at:
        families.append(
            GaugeMetricFamily(
                "kasparro_data_version_age_seconds",
                "Seconds since the ETL last committed new data",
                value=age_seconds(facts.committed_at),
            )
        )
    return families


def replication_gauges(facts: StoreFacts) -> list[Metric]:
    """A replica's lag: seconds from the newest commit it holds to now.

    Right after a run it is the replication delay; between runs it also counts the time
    since the run, so alert above the ETL's interval plus the delay allowed.
    """
    if not facts.last_commit_at:
        return []
    lag = GaugeMetricFamily(
        "kasparro_replication_lag_seconds",
        "Seconds since the newest commit this replica holds (a run's start or end, or new data)",
        value=age_seconds(facts.last_commit_at),
    )
    return [lag]


class MetricsResource:
    """GET /metrics: request metrics of every worker, and store gauges read at scrape time."""

    def __init__(self, store: Store, registry: CollectorRegistry, metrics: HttpMetrics, replica: bool = False) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.replica = replica

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.metrics.flush()  # this worker's requests so far; the others' are at most FLUSH_EVERY old
        try:
            commit = await self.store.watch()
            facts = commit.facts.get("store")
            if facts is None:
                facts = commit.facts["store"] = await self.store.read(read_store_facts)
            families, readable = store_gauges(facts), True
            if self.replica:
                families += replication_gauges(facts)
        except ReadersBusy:  # the request metrics matter most under such a load: they are sent without the facts
            families, readable = [], True
        except (StoreUnavailable, sqlite3.DatabaseError):
            families, readable = [], False
        up = GaugeMetricFamily("kasparro_store_up", "1 when the store can be read", value=float(readable))
        compressed = CounterMetricFamily(
            "kasparro_answers_compressed",
            "Kept answers gzip-compressed by this worker process: each once per data version, whatever its requests",
            value=GzipTail.made,
        )
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(self.registry) + generate_latest(MetricFamilies([up, compressed, *families]))


def metrics_registry(config: Config) -> tuple[CollectorRegistry, CollectorRegistry]:
    """Where request metrics are recorded, and what a scrape reads them from (all workers' files)."""
    recorded = CollectorRegistry()
    if config.metrics_dir is None:
        return recorded, recorded
    scraped = CollectorRegistry()
    MultiProcessCollector(scraped, path=str(config.metrics_dir))
    return recorded, scraped


# --- OpenAPI and docs -----------------------------------------------------

SCHEMA_REF = "#/components/schemas/{name}"
FILTER_GRAMMAR_TEXT = f"""Comma-separated conditions; all must hold.

    filter_by  = [condition *("," condition)]
    condition  = status | field op value
    status     = "active" | "inactive"          (shorthand for status:word)
    op         = ":" | "~" | ">" | ">=" | "<" | "<="

- `field:value` equals; on text it ignores case, and `a|b` means either.
- `field~text` contains, ignoring case (text fields only). Text is compared case-folded in NFKC, so `Straße`,
  `STRASSE` and `straße` are one name, and a composed or decomposed `é` one letter.
- `>`, `>=`, `<`, `<=` compare numbers and `updated_at` (an RFC 3339 time or date, or Unix seconds), written
  in digits 0-9.
- Text fields: {", ".join(TEXT_FIELDS)}. Number fields: {", ".join(NUMBER_FIELDS)}. Time: updated_at.
- Field names and bare statuses are lower-case; plain spaces may surround conditions.
- At most {MAX_CONDITIONS} conditions; a `~` takes at most {MAX_CONTAINS} alternatives, each of at most
  {MAX_CONTAINS_TEXT:,} characters.

Anything else (unknown field, bad number or time, empty condition) is a 400 problem naming it."""

EXAMPLE_ASSET = Asset(
    asset_id="bitcoin",
    symbol="BTC",
    name="Bitcoin",
    rank=1,
    price_usd=95240.12,
    market_cap_usd=1898218475025.0,
    volume_24h_usd=76139295205.0,
    change_24h_pct=-3.22,
    status="active",
    sources=["csv:sample"],
    updated_at="2026-11-25T12:00:00Z",
)
EXAMPLE_REQUEST_ID = "0b7e9c1e-4a8f-4d2b-9a57-2f1c3d5e6a70"
AS_OF_TEXT = """The market as it was at this moment (RFC 3339, UTC when it names no offset, or Unix seconds, a
fraction allowed): each asset unified from its listings' latest observations at or before it, by the rule of today's
record; assets with none are absent (a moment before any observation: an empty page; one in the future: today's
market). Where raw observations are no longer kept, a listing's latest candle close that ended by then stands for
it: rank and change_24h_pct are then null, and symbol, name and status are the listing's current ones (the store
keeps no history of them). filter_by, sort, paging and cursors apply as without it; a cursor holds for its as_of
only."""
HISTORY_TEXT = """Raw observations (`interval=raw`) or candles (`5m` to `1d`) of every listing of the asset,
merged, or of one `source`'s. A candle covers the priced observations of one UTC bucket: open, close =
the first and last price (by observed time, then source), high and low, and the last one's cap and
volume; buckets without any are absent. Raw observations are kept for KASPARRO_KEEP_RAW, hourly candles
for KASPARRO_KEEP_HOURLY, daily ones forever: 5m and 15m reach as far back as the raw tier, 1h and 4h as
the hourly one, of every listing merged (a candle lacking a listing's pruned part is absent). Unknown
asset, or no listing of `source`: 404; `from` after `to`, a bad interval or time: 400."""
COMPARE_TEXT = f"""Runs a and b side by side, per source of either run: each measure (rows read, loaded and
rejected, duration) in a, in b, and b minus a; the drift entries that appeared in b or disappeared from a.

`anomalies` judges each of the two runs on its own (once when a = b), each finished source of it against
that source's previous 10 loads, the ones before the run judged (fewer when there were fewer; a source with
none is not judged). A load is a run that neither failed nor skipped the source because its input was
unchanged ("unchanged since run N"); such a skip is not judged either:

- rows read or rows loaded that differ from their median over those runs by more than half of it;
- a duration over 3 times its median and {DURATION_FLOOR_MS} ms or more above it (over the runs that recorded one).

Each anomaly names the run, source and measure, with its value, the median, and the previous runs' ids
and values. a and b may come in either order. A run recorded as running whose process is gone reads as
failed. Unknown run: 404; a or b missing or not a run id: 400."""


def examples() -> dict[str, msgspec.Struct]:
    """A body of each response, from the shipped sample."""
    quote_fields = {k: v for k, v in msgspec.structs.asdict(EXAMPLE_ASSET).items() if k in Quote.__struct_fields__}
    totals = dict(
        runs=1,
        successes=1,
        partials=0,
        failures=0,
        rows_read=255,
        rows_loaded=255,
        rows_rejected=0,
        last_success_at="2026-11-25T12:00:03Z",
        last_failure_at=None,
        last_error=None,
        avg_duration_ms=412.0,
    )
    run = dict(
        status="success",
        started_at="2026-11-25T12:00:02Z",
        ended_at="2026-11-25T12:00:03Z",
        rows_read=255,
        rows_loaded=255,
        rows_rejected=0,
        duration_ms=412,
        error=None,
    )
    outcome = RunSourceOutcome(source="csv:sample", detail=None, drift={}, **run)
    first = Run(run_id=1, sources=["csv:sample"], pid=4242, host="kasparro-1", outcomes=[outcome], **run)
    later = dict(started_at="2026-11-25T12:10:02Z", ended_at="2026-11-25T12:10:03Z", duration_ms=380)
    second = msgspec.structs.replace(
        first,
        run_id=2,
        rows_read=25,
        rows_loaded=25,
        outcomes=[
            msgspec.structs.replace(
                outcome, rows_read=25, rows_loaded=25, drift={"unknown column 'colour'": 1}, **later
            )
        ],
        **later,
    )
    previous = {(2, "csv:sample"): [{"run_id": 1, "rows_read": 255, "rows_loaded": 255, "duration_ms": 412}]}
    return {
        "index": Index(message="Kasparro Backend Service", version=__version__, endpoints=endpoints()),
        "page": AssetPage(
            request_id=EXAMPLE_REQUEST_ID,
            api_latency_ms=0.42,
            data=[EXAMPLE_ASSET],
            page=1,
            page_size=1,
            total_items=255,
            total_pages=255,
            next_cursor="kpJTzBmZWM0YTg2N2I4NGQ5MDbCy3_d",
            data_version="5f0c2a-1",
        ),
        "detail": AssetDetail(
            **msgspec.structs.asdict(EXAMPLE_ASSET),
            quotes=[
                Quote(source="csv:sample", source_id="bitcoin", observed_at="2026-11-25T12:00:00Z", **quote_fields)
            ],
        ),
        "health": Health(
            status="healthy", db_connected=True, etl_last_run="2026-11-25T12:00:03Z", etl_status="success"
        ),
        "unhealthy": Health(status="unhealthy", db_connected=False, etl_last_run=None, etl_status=None),
        "stats": Stats(
            data_version="5f0c2a-1",
            overall=RunTotals(**totals),
            sources=[SourceTotals(source="csv:sample", **totals)],
            recent_runs=[first],
        ),
        "runs": RunList(data_version="5f0c2a-2", limit=20, runs=[second, first]),
        "run": first,
        "history": AssetHistory(
            request_id=EXAMPLE_REQUEST_ID,
            api_latency_ms=0.31,
            asset_id="bitcoin",
            interval="1h",
            source=None,
            from_="2026-11-21T08:00:00Z",
            to="2026-11-25T12:00:01Z",
            points=[Candle("2026-11-25T11:00:00Z", 95110.4, 95402.0, 95020.9, 95240.12, 1.898e12, 7.61e10, 12)],
            next_cursor=None,
            data_version="5f0c2a-1",
        ),
        "comparison": compare_runs(first, second, previous, "5f0c2a-2"),
        "problem": Problem(
            type="about:blank",
            title="Bad Request",
            status=400,
            request_id=EXAMPLE_REQUEST_ID,
            api_latency_ms=0.08,
            detail="filter_by: unknown field 'colour' in 'colour:red'; fields: asset_id, symbol, name, status, ...",
        ),
    }


def openapi_document(config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API, its bodies' schemas generated from the wire Structs."""
    refs, schemas = msgspec.json.schema_components(
        (Index, AssetPage, AssetDetail, AssetHistory, PricePoint, Candle, Health, Stats, RunList, Run, RunComparison,
         Problem),
        ref_template=SCHEMA_REF,
    )  # fmt: skip
    index, page, detail, history, _, _, health, stats, runs, run, comparison, problem = refs
    # With `fields`, a record holds only the fields named: the same properties, none required.
    for name, whole in (("AssetFields", "Asset"), ("AssetDetailFields", "AssetDetail")):
        schemas[name] = {key: value for key, value in schemas[whole].items() if key != "required"}
        schemas[name]["title"] = f"{whole}, the fields named by `fields` only"
    schemas["AssetPage"]["properties"]["data"]["items"] = {
        "anyOf": [{"$ref": SCHEMA_REF.format(name="Asset")}, {"$ref": SCHEMA_REF.format(name="AssetFields")}]
    }
    example = {name: msgspec.to_builtins(body) for name, body in examples().items()}
    string = {"type": "string"}
    request_id = {
        "X-Request-ID": {
            "description": "the request's id (a sane X-Request-ID sent is echoed)",
            "required": True,
            "schema": string,
        }
    }
    etag = {
        "ETag": {
            "description": "weak tag of data_version and the query; send it in If-None-Match",
            "required": True,
            "schema": {"type": "string", "pattern": '^W/"[0-9a-f]{24}"$'},
        }
    }

    def body(description: str, schema: dict, sample: Any, media: str = falcon.MEDIA_JSON, **headers: Any) -> dict:
        return {
            "description": description,
            "headers": {**request_id, **headers},
            "content": {media: {"schema": schema, "example": sample}},
        }

    def refer(name: str) -> dict:
        return {"$ref": f"#/components/responses/{name}"}

    problems = {
        "BadRequest": (400, "a query parameter cannot be understood; detail names it", {}),
        "Unauthorized": (
            401,
            "an API key is configured and none (or a wrong one) was sent",
            {"WWW-Authenticate": {"required": True, "schema": string}},
        ),
        "NotFound": (404, "no such asset or run, or no such path", {}),
        "NotAcceptable": (406, "Accept refuses (q=0) every format of the records, and no format= names one", {}),
        "MethodNotAllowed": (
            405,
            "the path does not answer this method",
            {"Allow": {"required": True, "schema": string}},
        ),
        "ServiceUnavailable": (
            503,
            "the store is not readable yet; retry shortly",
            {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}},
        ),
        "TooManyRequests": (
            429,
            "more requests than the rate limit (KASPARRO_RATE_LIMIT) allows; retry after Retry-After seconds",
            {
                "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}},
                **{
                    f"RateLimit-{name}": {"required": True, "description": meaning, "schema": {"type": "integer"}}
                    for name, meaning in (
                        ("Limit", "requests allowed in a burst"),
                        ("Remaining", "requests left now"),
                        ("Reset", "seconds until the burst is whole again"),
                    )
                },
            },
        ),
        "InternalServerError": (500, "an unexpected error; quote the request_id", {}),
    }
    responses = {
        name: body(
            description,
            problem,
            {**example["problem"], "status": status, "title": HTTPStatus(status).phrase},
            MEDIA_PROBLEM,
            **headers,
        )
        for name, (status, description, headers) in problems.items()
    }
    responses["NotModified"] = {
        "description": "the client's copy (If-None-Match) is current",
        "headers": {**request_id, **etag},
    }
    paths: dict[str, Any] = {}
    sample = [EXAMPLE_ASSET]
    csv_example = records_body("csv", sample, (), ASSET_FIELDS).decode()
    ndjson_example = records_body("ndjson", sample, (), ASSET_FIELDS).decode()
    paging = {
        "X-Total-Count": {"description": "CSV and NDJSON: total_items", "schema": {"type": "integer", "minimum": 0}},
        "Link": {
            "description": 'CSV and NDJSON: the next page\'s URL, rel="next" (absent on the last)',
            "schema": string,
        },
        "X-Data-Version": {"description": "CSV and NDJSON: data_version", "schema": string},
    }

    def with_records(response: dict, csv_sample: str, ndjson_sample: str, **headers: Any) -> dict:
        """A JSON response that CSV and NDJSON can take the place of (format=, or Accept)."""
        content = {
            **response["content"],
            "text/csv": {"schema": {**string, "description": "a header row, then a record a row"},
                         "example": csv_sample},
            "application/x-ndjson": {"schema": {**string, "description": "a JSON record a line"},
                                     "example": ndjson_sample},
        }  # fmt: skip
        return {**response, "headers": {**response["headers"], **headers}, "content": content}

    def operation(
        path: str, ok: dict, *errors: str, parameters: Sequence[dict] = (), description: str = "", **more: dict
    ) -> None:
        """Describe GET `path`, summarised, guarded and rate-limited as the route table says."""
        route = ROUTE_OF[path]
        if route.guarded and config.api_keys:
            errors = tuple(sorted({*errors, "401"}))
        names = {
            "304": "NotModified",
            "400": "BadRequest",
            "401": "Unauthorized",
            "404": "NotFound",
            "406": "NotAcceptable",
            "503": "ServiceUnavailable",
        }
        answers = {"200": ok, **more, **{status: refer(names[status]) for status in errors}}
        if route.limited and config.rate_limit:
            answers["429"] = refer("TooManyRequests")
        answers["500"] = refer("InternalServerError")
        spec: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.summary.split()[0].lower().strip(":"),
            "responses": answers,
        }
        if description:
            spec["description"] = description
        if route.guarded and config.api_keys:
            spec["security"] = [{"bearer": []}, {"apiKey": []}]
        if parameters:  # an empty query parameter is an absent one
            spec["parameters"] = [{**p, "allowEmptyValue": True} if p["in"] == "query" else p for p in parameters]
        paths[path] = {"get": spec}

    if_none_match = {
        "name": "If-None-Match",
        "in": "header",
        "schema": string,
        "description": "an ETag of an earlier answer: 304 when it is still current",
    }
    moment = {"type": "string", "examples": ["2026-11-25T12:00:00Z", "1795608000"]}  # one moment, the sample's
    data_parameters = [
        {
            "name": "page",
            "in": "query",
            "description": "page number (ignored when cursor is given)",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 1},
        },
        {
            "name": "page_size",
            "in": "query",
            "description": "assets per page",
            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        },
        {
            "name": "filter_by",
            "in": "query",
            "description": FILTER_GRAMMAR_TEXT,
            "schema": {"type": "string", "pattern": f"^{FILTER_SYNTAX}$", "default": ""},
            "examples": {
                "active top ten": {"value": "active,rank<=10"},
                "either symbol": {"value": "symbol:btc|eth"},
                "name contains": {"value": "name~coin"},
                "listed by a source": {"value": "source:csv:sample"},
            },
        },
        {
            "name": "sort",
            "in": "query",
            "schema": {"type": "string", "enum": list(SORTS), "default": "rank"},
            "description": "a sortable field, '-' first for descending; nulls last, ties by asset_id",
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string", "pattern": f"^(?:{CURSOR.pattern})?$"},
            "description": "next_cursor of the previous page, for the same filter_by, sort and as_of; page is then"
            " ignored",
        },
        {
            "name": "as_of",
            "in": "query",
            "schema": moment,
            "description": AS_OF_TEXT,
        },
        if_none_match,
    ]
    fields_parameter = {
        "name": "fields",
        "in": "query",
        "description": "keep only these fields of each record, in this order, each once; unknown field: 400",
        "schema": {"type": "string", "pattern": fields_pattern(ASSET_FIELDS)},
        "example": "asset_id,symbol,price_usd",
    }

    def format_parameter(formats: Sequence[str]) -> dict:
        return {
            "name": "format",
            "in": "query",
            "description": "media type of the records: " + ", ".join(f"{name} ({FORMATS[name].split(';')[0]})"
                           for name in formats) + "; absent: the one Accept prefers, else the default. In CSV a"
                           " list is joined with '|' and null is an empty cell",
            "schema": {"type": "string", "enum": list(formats), "default": formats[0]},
        }  # fmt: skip

    data_parameters[-1:-1] = [fields_parameter, format_parameter(PAGE_FORMATS)]
    asset_id = {
        "name": "asset_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
        "description": "the asset's stable slug",
        "example": "bitcoin",
    }
    page = {"description": "an HTML page", "headers": request_id, "content": {"text/html": {"schema": string}}}
    text = {
        "description": "Prometheus text exposition",
        "headers": request_id,
        "content": {"text/plain": {"schema": string}},
    }
    operation("/", body("the service", index, example["index"]))
    operation(
        "/data",
        with_records(body("a page of assets", page, example["page"], **etag), csv_example, ndjson_example, **paging),
        "400",
        "406",
        "503",
        parameters=data_parameters,
        description="As CSV or NDJSON the body holds the page's records alone; the paging is in headers.",
        **{"304": refer("NotModified")},
    )
    export = {
        "description": "every selected asset, streamed; gzip-compressed when Accept-Encoding allows",
        "headers": {
            **request_id,
            "Content-Disposition": {"required": True, "schema": {**string, "pattern": "^attachment"}},
            "X-Data-Version": {
                "required": True,
                "description": "the one data version every record was read at",
                "schema": string,
            },
        },
        "content": {
            "text/csv": {"schema": string, "example": csv_example},
            "application/x-ndjson": {"schema": string, "example": ndjson_example},
        },
    }
    operation(
        "/data/export",
        export,
        "400",
        "406",
        "503",
        parameters=[
            *(p for p in data_parameters if p["name"] in EXPORT_PARAMS and p["name"] != "format"),
            format_parameter(EXPORT_FORMATS),
        ],
        description="Every asset that filter_by selects (as of as_of, when given), in the sort's order, in one"
        " response read from one snapshot of the store or of that moment's market (one data version), in constant"
        " memory however many.",
    )
    detail_parameters = [
        asset_id,
        {
            **fields_parameter,
            "description": fields_parameter["description"],
            "schema": {"type": "string", "pattern": fields_pattern(DETAIL_FIELDS)},
        },
        if_none_match,
    ]
    detail_schema = {"anyOf": [detail, {"$ref": SCHEMA_REF.format(name="AssetDetailFields")}]}
    operation(
        "/data/{asset_id}",
        body("the asset with the latest quote of each source", detail_schema, example["detail"], **etag),
        "400",
        "503",
        "404",
        parameters=detail_parameters,
        **{"304": refer("NotModified")},
    )
    history_parameters = [
        asset_id,
        {
            "name": "interval",
            "in": "query",
            "description": "raw observations, or candles of this width (UTC buckets)",
            "schema": {"type": "string", "enum": list(INTERVALS), "default": "1h"},
        },
        {
            "name": "from",
            "in": "query",
            "description": "start, inclusive: RFC 3339 or Unix seconds; default: 100 intervals (raw: a day) before to",
            "schema": moment,
        },
        {
            "name": "to",
            "in": "query",
            "description": "end, exclusive: RFC 3339 or Unix seconds; default: just after the newest observation",
            "schema": moment,
        },
        {
            "name": "source",
            "in": "query",
            "description": "one source's listing only (its name's letters in either case, as in filter_by)",
            "schema": string,
        },
        {
            "name": "limit",
            "in": "query",
            "description": "points per response",
            "schema": {"type": "integer", "minimum": 1, "maximum": HISTORY_LIMIT, "default": HISTORY_LIMIT},
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string", "pattern": f"^(?:{CURSOR.pattern})?$"},
            "description": "next_cursor of the previous response, for the same window",
        },
        format_parameter(PAGE_FORMATS),
        if_none_match,
    ]
    candles = examples()["history"].points  # type: ignore[attr-defined]
    history_csv = records_body("csv", candles, (), Candle.__struct_fields__).decode()
    history_ndjson = records_body("ndjson", candles, (), Candle.__struct_fields__).decode()
    operation(
        "/data/{asset_id}/history",
        with_records(
            body("points in time order", history, example["history"], **etag),
            history_csv,
            history_ndjson,
            Link=paging["Link"],
            **{"X-Data-Version": paging["X-Data-Version"]},
        ),
        "400",
        "406",
        "503",
        "404",
        parameters=history_parameters,
        description=HISTORY_TEXT,
        **{"304": refer("NotModified")},
    )
    operation(
        "/health",
        body("healthy or degraded", health, example["health"]),
        **{"503": body("unhealthy: the store cannot be read", health, example["unhealthy"])},
    )
    operation("/stats", body("ETL runs summed", stats, example["stats"]), "400", "503")
    run_id_schema = {"type": "integer", "minimum": 1, "maximum": MAX_RUN_ID}
    limit = {
        "name": "limit",
        "in": "query",
        "description": "the most runs to list",
        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": RUNS_LIMIT},
    }
    operation("/runs", body("the newest runs first", runs, example["runs"]), "400", "503", parameters=[limit])
    operation(
        "/runs/{run_id}",
        body("the run", run, example["run"]),
        "400",
        "503",
        "404",
        parameters=[{"name": "run_id", "in": "path", "required": True, "schema": run_id_schema, "example": 1}],
    )
    operation(
        "/runs/compare",
        body("runs a and b compared", comparison, example["comparison"]),
        "400",
        "503",
        "404",
        parameters=[
            {"name": name, "in": "query", "required": True, "schema": run_id_schema, "description": f"run {name}"}
            for name in ("a", "b")
        ],
        description=COMPARE_TEXT,
    )
    operation("/metrics", text)
    operation("/openapi.json", body("OpenAPI 3.1", {"type": "object"}, {"openapi": "3.1.0"}))
    operation("/docs", page)
    operation("/redoc", page)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Kasparro",
            "version": __version__,
            "description": "Unified crypto-asset market data, loaded by the ETL and served read-only.\n\n"
            "Every GET path answers HEAD too: the same status and headers, no body. An empty query parameter"
            " is an absent one; filter_by given twice means both; any other parameter given twice is a 400.\n\n"
            "A body of 1 kB or more (without its request_id and api_latency_ms) is gzip-compressed when"
            " Accept-Encoding allows it (Vary: Accept-Encoding, which a smaller body does not name; the ETag, weak, is"
            " the same either way). Browser pages may call the API from the origins of"
            " KASPARRO_CORS_ORIGINS: an OPTIONS preflight is answered 204 (403 for another origin or a method but"
            " GET and HEAD), and every header of an answer (ETag, X-Request-ID, Retry-After, RateLimit-*, Link,"
            " X-Total-Count, X-Data-Version, Content-Disposition) is exposed: Access-Control-Expose-Headers: *, for"
            " requests without credentials, which the API never grants.\n\n"
            "Read it as [interactive docs](/docs) (Swagger UI: try each request) or as a [reference](/redoc)"
            " (ReDoc).",
        },
        "paths": {route.path: paths[route.path] for route in ROUTES if route.summary},
        "components": {"schemas": schemas, "responses": responses},
    }
    if config.api_keys:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return document


# Swagger UI's files, served by the app itself from the swagger-ui-py package, so the docs need no internet.
SWAGGER_UI_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_INIT_JS = b"""window.onload = () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
  });
};
"""
DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Kasparro API</title>
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
  <nav style="font: 14px sans-serif; padding: 8px 20px">Interactive docs &middot;
    <a href="/redoc">the same API as a reference (ReDoc)</a></nav>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

# ReDoc's standalone build, vendored from the npm package `redoc` at the version in vendor/redoc/VERSION
# with its licences (`just vendor-redoc` fetches it again and checks vendor/redoc/SHA256SUMS).
REDOC_DIR = Path(__file__).resolve().parent / "vendor" / "redoc" / "bundles"
REDOC_FILES = {
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "redoc.standalone.js.LICENSE.txt": "text/plain; charset=utf-8",
}
REDOC_HTML = b"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Kasparro API reference</title>
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body style="margin: 0">
  <nav style="font: 14px sans-serif; padding: 8px 20px">Reference &middot;
    <a href="/docs">try the API in the interactive docs (Swagger UI)</a></nav>
  <redoc spec-url="/openapi.json"></redoc>
  <script src="/redoc/redoc.standalone.js"></script>
</body>
</html>
"""


def swagger_ui_dir() -> Path:
    """The static folder of the swagger-ui-py package, found without importing it (it would pull jinja2)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed: pip install -r requirements.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


class DocsResource:
    """GET /docs (Swagger UI over /openapi.json), GET /redoc (ReDoc over it), their files by path, and
    GET /openapi.json, all held in memory."""

    constant_bodies = True  # each compressed once (Compression)
    CACHE = "public, max-age=3600"

    def __init__(self, document: dict[str, Any]) -> None:
        self.openapi = encode(document)
        shipped = (("/docs", swagger_ui_dir(), SWAGGER_UI_FILES), ("/redoc", REDOC_DIR, REDOC_FILES))
        self.files = {
            f"{page}/{name}": ((folder / name).read_bytes(), media)
            for page, folder, files in shipped
            for name, media in files.items()
        }
        self.files["/docs/init.js"] = (DOCS_INIT_JS, "text/javascript; charset=utf-8")

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = DOCS_HTML

    async def on_get_redoc(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.data = REDOC_HTML

    async def on_get_file(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, name: str) -> None:
        if req.path not in self.files:
            raise falcon.HTTPNotFound(description=f"no docs file {name[:100]!r}")
        resp.data, resp.content_type = self.files[req.path]
        resp.cache_control = [self.CACHE]

    async def on_get_openapi(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.openapi


# --- front door -----------------------------------------------------------

SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
ROUTE = "kasparro.route"  # where RouteLabel leaves the route template Falcon matched, for the front door
READS = frozenset({"GET", "HEAD"})  # a HEAD is answered as its GET, without the body (RFC 9110 9.3.2)


class RequestIds:
    """Random UUID4s in canonical text form, made BATCH at a time from one os.urandom read: the kernel's CSPRNG,
    with the version and variant bits of the whole batch set in one operation on one big integer. The batch's hex
    digits go into its lines one digit place at a time (a strided copy of BATCH digits each), and the lines are
    split into strings at once: no id is formatted by itself. A forked child starts a batch of its own."""

    BATCH = 256
    # Per id (16 bytes): keep all bits but the version nibble and the variant's two, then set those.
    KEEP = int.from_bytes(bytes.fromhex("ffffffffffff0fff3fffffffffffffff") * BATCH)
    SET = int.from_bytes(bytes.fromhex("00000000000040008000000000000000") * BATCH)  # version 4, RFC 4122
    LINE = b"00000000-0000-0000-0000-000000000000\n"
    DIGIT_AT = tuple(at for at, char in enumerate(LINE) if char == ord("0"))  # where each of the 32 hex digits goes

    def __init__(self) -> None:
        self._ready: list[str] = []
        os.register_at_fork(after_in_child=self._ready.clear)

    def next(self) -> str:
        ready = self._ready
        if not ready:
            ready += self._batch()
        return ready.pop()

    def _batch(self) -> list[str]:
        digits = (int.from_bytes(os.urandom(16 * self.BATCH)) & self.KEEP | self.SET).to_bytes(16 * self.BATCH).hex()
        hex_digits, lines = digits.encode(), bytearray(self.LINE * self.BATCH)
        for place, at in enumerate(self.DIGIT_AT):
            lines[at :: len(self.LINE)] = hex_digits[place::32]
        return lines.decode("ascii").split()


new_request_id = RequestIds().next  # a bound method: calling an instance costs twice as much


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
UNMATCHED_ROUTE = "unmatched"  # the one label of every URL that matches no route


class HttpMetrics:
    """Requests answered, their latency and those in flight, by route template and status: appended to a list,
    summed into prometheus-client's values every FLUSH_EVERY seconds, every MAX_PENDING requests and before
    every scrape (its own path per observation cost ~8 µs a request), so a scrape sees other workers' within
    FLUSH_EVERY seconds."""

    FLUSH_EVERY = 1.0
    MAX_PENDING = 1_024

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("route", "status")
        self.requests = Counter("kasparro_http_requests", "HTTP requests answered", labels, registry=registry)
        self.latency = Histogram(
            "kasparro_http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight_gauge = Gauge(
            "kasparro_http_requests_in_flight",
            "HTTP requests being answered",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.in_flight = 0
        self._answered: list[tuple[str | None, int, float]] = []  # (route, status, seconds) since the flush
        self._timer: asyncio.TimerHandle | None = None

    def observe(self, route: str | None, status: int, seconds: float) -> None:
        self._answered.append((route, status, seconds))
        if len(self._answered) >= self.MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Add the requests answered since the last flush to the exported values."""
        answered, self._answered = self._answered, []
        self.in_flight_gauge.set(self.in_flight)
        # (route, status) -> [requests, seconds in all, requests per latency bucket (the last is +Inf)]
        pending: dict[tuple[str | None, int], list[Any]] = {}
        for route, status, seconds in answered:
            series = pending.get((route, status))
            if series is None:
                series = pending[route, status] = [0, 0.0, [0] * (len(LATENCY_BUCKETS) + 1)]
            series[0] += 1
            series[1] += seconds
            series[2][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket with seconds <= le
        for (route, status), (requests, seconds, buckets) in pending.items():
            labels = (route or UNMATCHED_ROUTE, str(status))
            self.requests.labels(*labels).inc(requests)
            # prometheus-client adds one observation at a time; its values (pinned version) take sums.
            latency = self.latency.labels(*labels)
            latency._sum.inc(seconds)
            for value, count in zip(latency._buckets, buckets, strict=True):
                if count:
                    value.inc(count)

    def start(self) -> None:
        """Flush every FLUSH_EVERY seconds on the running event loop, until stop()."""
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(self.FLUSH_EVERY, self.start)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


def problem_body(status: int, detail: str, started: float) -> bytes:
    """An RFC 9457 problem the front door answers itself, before Falcon, with the request's id and the time since
    it `started` (time.perf_counter), as every other answer reports it."""
    problem = Problem(
        type="about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        request_id=REQUEST_ID.get(),
        api_latency_ms=latency_ms(started),
    )
    return encode(problem)


def inexact_path(path: str, raw_path: bytes) -> str | None:
    """Why the route table cannot hold `path` (raw_path as sent) exactly, or None when it may: a path is routed only
    to the template it is segment for segment. Falcon's matcher drops leading '/'s (//data was /data) and lets a
    field match an empty segment (/data//history was the asset '') or a dot segment (/data/.. the asset '..'),
    and %2F decodes to a '/' inside a segment (RFC 3986 2.2: /data/bitcoin%2Fhistory was bitcoin's history), each
    behind a proxy's rule for the path it is not."""
    if raw_path.find(b"%2") >= 0 and raw_path.lower().find(b"%2f") >= 0:  # find: bytes `in` raises inside (FrontDoor)
        return "%2F is a '/' inside a segment, and no asset id or run id holds one"
    if "//" in path or (path.endswith("/") and path not in ROUTE_OF):  # ROUTE_OF: '/', '/docs/', '/redoc/'
        return "an empty segment, and no route has one there"
    if "/." in path and {".", ".."} & set(path.split("/")):
        return "'.' and '..' segments name another path (RFC 3986 5.2.4), and no route has one"
    return None


class Cors:
    """Cross-origin calls from browsers (the Fetch standard's CORS) from the origins of KASPARRO_CORS_ORIGINS:
    `*` any (the API is read-only market data, and sends no cookies), a list, or none. A request with an
    allowed Origin gets Access-Control-Allow-Origin and every header exposed; a preflight (OPTIONS
    with Access-Control-Request-Method) to a route is answered here, 204, with no API key asked (browsers send none
    then), or 403 for another origin or a method but GET and HEAD."""

    METHODS = b"GET, HEAD"
    REQUEST_HEADERS = b"Authorization, X-API-Key, X-Request-ID, If-None-Match, Accept"
    # Every header the API sends (ETag, X-Request-ID, Retry-After, RateLimit-*, Link, X-Total-Count, X-Data-Version,
    # Content-Disposition): the Fetch standard's wildcard, which holds for requests without credentials, the only
    # ones a browser lets through here (no answer says Access-Control-Allow-Credentials). Under `*` every answer
    # carries it, and uvicorn checks each byte of each header in Python: a short value costs less on every answer.
    EXPOSED = b"*"
    MAX_AGE = b"600"  # seconds a browser may keep a preflight's answer

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origin.encode() for origin in origins)
        exposed = (b"access-control-expose-headers", self.EXPOSED)
        # With a list, what an answer carries depends on Origin: every answer says so, for caches.
        self.vary: list[Header] = [] if self.any or not origins else [(b"vary", b"Origin")]
        # Sent on every answer but one to an allowed origin of a list. Under `*` that is the grant itself, the same
        # whatever the Origin, so that a shared cache may hand an answer to a request without one (a server, a
        # cache's revalidation) to a browser page.
        self.always: list[Header] = [(b"access-control-allow-origin", b"*"), exposed] if self.any else self.vary
        self._of: dict[bytes, list[Header]] = {
            origin: [*self.vary, (b"access-control-allow-origin", origin), exposed] for origin in self.origins
        }

    def headers(self, origin: bytes | None) -> list[Header]:
        """The CORS headers of an answer to a request from `origin` (None: no Origin header)."""
        if origin is None or self.any:
            return self.always
        return self._of.get(origin, self.always)

    def allows(self, origin: bytes) -> bool:
        return origin in self.origins or (self.any and sent_by_browser(origin))

    def preflight(self, origin: bytes, method: bytes, started: float) -> tuple[int, list[Header], bytes]:
        """Status, headers and body of the answer to a preflight from `origin` for `method` (to a route)."""
        if not self.allows(origin) or method not in (b"GET", b"HEAD"):
            why = (f"method {method.decode('latin-1')[:20]!r}: only GET and HEAD" if self.allows(origin)
                   else f"origin {origin.decode('latin-1')[:100]!r} is not"
                   + (" one a browser sends" if self.any else " in KASPARRO_CORS_ORIGINS"))  # fmt: skip
            body = problem_body(403, f"cross-origin request refused: {why}", started)
            return 403, [*self.vary, (b"content-type", MEDIA_PROBLEM.encode())], body
        allowed = [
            (b"access-control-allow-origin", b"*" if self.any else origin),
            (b"access-control-allow-methods", self.METHODS),
            (b"access-control-allow-headers", self.REQUEST_HEADERS),
            (b"access-control-max-age", self.MAX_AGE),
        ]
        return 204, [*self.vary, *allowed], b""


class Compression:
    """Falcon middleware: a body of GZIP_MIN bytes or more gzip-compressed when Accept-Encoding allows, where
    the responder did not (a kept answer is compressed once, by send_answer). A resource whose bodies are
    constants (`constant_bodies`) has each compressed once."""

    def __init__(self) -> None:
        self.constants: dict[int, tuple[bytes, bytes]] = {}  # id of a constant body: (it, its gzip)

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, req_succeeded: bool
    ) -> None:
        data = resp.data
        if data is None or len(data) < GZIP_MIN or resp.context.get("kept_answer") or resp.get_header("Vary"):
            return  # a kept answer's (send_answer), or a responder's that chose its own coding
        resp.append_header("Vary", "Accept-Encoding")
        if not accepts_gzip(req.get_header("Accept-Encoding") or ""):
            return
        if getattr(resource, "constant_bodies", False):
            kept = self.constants.get(id(data))
            if kept is None or kept[0] is not data:
                kept = self.constants[id(data)] = (data, zlib.compress(data, 6, 31))
            resp.data = kept[1]
        else:
            resp.data = zlib.compress(data, 6, 31)
        resp.set_header("Content-Encoding", "gzip")


class Router(falcon.routing.CompiledRouter):
    """Falcon's router, with HEAD mapped to the GET responder of every route that has no on_head: Falcon then
    sends GET's status and headers, Content-Length included, and no body. OPTIONS (not a CORS preflight, which
    the front door answers) is a 204 whose Allow names what the route's 405 names: Falcon's own is a 200 that
    declares JSON and sends none, and leaves OPTIONS out of its Allow."""

    def map_http_methods(self, resource: object, **kwargs: Any) -> dict[str, Any]:
        methods = super().map_http_methods(resource, **kwargs)
        if "GET" in methods:
            methods.setdefault("HEAD", methods["GET"])
        if "OPTIONS" not in methods:
            methods["OPTIONS"] = allowed_methods_responder(", ".join([*sorted(methods), "OPTIONS"]))
        return methods


def allowed_methods_responder(allowed: str) -> Callable[..., Awaitable[None]]:
    """A route's OPTIONS responder: 204, `allowed` in Allow, no body and no Content-Type."""

    async def on_options(req: falcon.asgi.Request, resp: falcon.asgi.Response, **fields: str) -> None:
        resp.status = falcon.HTTP_204
        resp.set_header("Allow", allowed)
        resp.content_type = None

    return on_options


class FrontDoor:
    """The ASGI layer every request passes before the Falcon app, which does not know it is there.

    It gives each HTTP request its id (a sane X-Request-ID is echoed, else a new UUID4) and its clock,
    counts it and writes its one log line. A path no route holds exactly (inexact_path) is a 404 here, and so
    is a CORS preflight to a path no route holds; a preflight to a route it answers (Cors). A GET or HEAD of a
    route in `kept_routes` it answers itself: from the AnswerCache, 304 included, or, with no query string, from
    the route's KeptResource. Every other request, and every one it cannot answer (an error, a missing asset),
    goes through Falcon.
    """

    STALLED_CLIENT = 60.0  # seconds a client may leave a part of a streamed body unread before it is let go

    def __init__(
        self, app: falcon.asgi.App, *, router: Router, answers: AnswerCache, kept_routes: frozenset[str],
        metrics: HttpMetrics, log_requests: bool, cors: Cors,
    ) -> None:  # fmt: skip
        self.app = app
        self.cors = cors
        self.router = router
        self.answers = answers
        self.kept_routes = kept_routes
        self.metrics = metrics
        self.log_requests = log_requests  # False when LOG_LEVEL is above info: the line is not even built
        self.request_log = log.bind()  # bound once: the module's lazy proxy would build a logger on every line

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        offered = ""
        accept = accept_encoding = if_none_match = origin = None  # each as sent, its lines joined
        headers = scope["headers"]
        if type(headers) is not list:  # ASGI allows any iterable, even one read only once: Falcon reads it again
            headers = scope["headers"] = [(name, value) for name, value in headers]
        # uvicorn's parser keeps the whitespace after a value (not a part of it). A list header sent on several lines
        # is one list (RFC 9110, 5.3), as Falcon reads it too: the lines are joined.
        for name, value in headers:
            if name == b"x-request-id":
                offered = value.rstrip(b" \t").decode("latin-1")
            elif name == b"if-none-match":
                if_none_match = value if if_none_match is None else b"%s, %s" % (if_none_match, value)
            elif name == b"accept-encoding":
                accept_encoding = value if accept_encoding is None else b"%s, %s" % (accept_encoding, value)
            elif name == b"accept":
                accept = value if accept is None else b"%s, %s" % (accept, value)
            elif name == b"origin":
                origin = value.rstrip(b" \t")
        request_id = offered if offered and SANE_REQUEST_ID.fullmatch(offered) else new_request_id()
        REQUEST_ID.set(request_id)
        scope[REQUEST_ID_KEY], scope[STARTED] = request_id, started
        self.metrics.in_flight += 1
        responding = False  # whether a response has begun (by Falcon, or here): after that, an error is not answered
        try:
            method = scope["method"]
            path, raw_path = scope["path"], scope.get("raw_path") or b""
            # A record format chosen by Accept is Falcon's to negotiate (and key).
            kept = method in READS and (accept is None or preferred_format(accept.decode("latin-1")) == "json")
            # Answers are kept only for paths a route holds exactly: a path sent as its decoded form (no '%') that
            # has one held needs no inexact_path, and the kept answer is sent without a coroutine. bytes.find, not
            # `in`: CPython's bytes `in` first tries its operand as an int, and raises and clears a TypeError.
            answer = self.answers.held((path, scope["query_string"])) if kept and raw_path.find(b"%") < 0 else None
            if answer is not None and answer.route not in self.kept_routes:
                answer = None
            if answer is None and (why := inexact_path(path, raw_path)) is not None:  # before the kept answers
                sent = (raw_path.decode("latin-1") or path)[:200]
                responding = True
                await self.send_problem(scope, send, 404, f"{method} {sent}: not found ({why})", origin)
                return self.done(scope, None, 404, started)
            if answer is None and method == "OPTIONS" and origin is not None:
                asked = next((value for name, value in headers if name == b"access-control-request-method"), None)
                if asked is not None and self.router.find(path) is None:  # no route: any other request's 404
                    responding = True
                    await self.send_problem(scope, send, 404, f"{method} {path[:200]}: not found", origin)
                    return self.done(scope, None, 404, started)
                if asked is not None:
                    status, cors, body = self.cors.preflight(origin, asked, started)
                    cors = [(b"x-request-id", request_id.encode()), *cors, (b"content-length", b"%d" % len(body))]
                    responding = True
                    await send({"type": "http.response.start", "status": status, "headers": cors})
                    await send({"type": "http.response.body", "body": body})
                    return self.done(scope, "(preflight)", status, started)
            if answer is None and kept:
                answer = await self.kept_answer(scope)
            if answer is None:
                responding = True  # Falcon answers its own errors
                status = await self.through_falcon(scope, receive, send, origin)
                route = scope.get(ROUTE)
            else:
                gzip = (
                    accept_encoding is not None
                    and answer.compressible
                    and accepts_gzip(accept_encoding.decode("latin-1"))
                )
                validators = None if if_none_match is None else if_none_match.decode("latin-1")
                status, body = answer.reply(request_id, started, validators, gzip)
                if status == 304:
                    headers = [(b"x-request-id", request_id.encode()), *answer.unchanged_headers]
                else:
                    headers = [(b"x-request-id", request_id.encode()), *answer.sent_headers,
                               (b"content-length", b"%d" % len(body))]  # fmt: skip
                    if gzip:
                        headers.append((b"content-encoding", b"gzip"))
                if origin is not None or self.cors.always:
                    headers += self.cors.headers(origin)
                responding = True
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
                route = answer.route
            self.done(scope, route, status, started)
        except Exception:
            if responding:
                raise
            log.exception("unexpected error in the front door", path=scope["path"][:200])
            await self.send_problem(scope, send, 500, "an unexpected error occurred; quote the request_id", origin)
            self.done(scope, None, 500, started)
        finally:
            self.metrics.in_flight -= 1

    async def send_problem(
        self, scope: dict[str, Any], send: Callable[..., Any], status: int, detail: str, origin: bytes | None
    ) -> None:
        """Answer the request with a problem of its own, Falcon never asked."""
        body = problem_body(status, detail, scope[STARTED])
        headers = [(b"x-request-id", scope[REQUEST_ID_KEY].encode()), (b"content-type", MEDIA_PROBLEM.encode()),
                   (b"content-length", b"%d" % len(body)), *self.cors.headers(origin)]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def kept_answer(self, scope: dict[str, Any]) -> Answer | None:
        """The answer kept for this GET, if its route is open here; else, for one with no query string of such a
        route, its KeptResource's. None: Falcon answers (a query string needs Falcon's rules; an error, Falcon's)."""
        key = answer_key(scope)
        try:
            answer = await self.answers.lookup(key)
            if answer is not None:
                return answer if answer.route in self.kept_routes else None
            if scope["query_string"]:
                return None
            found = self.router.find(scope["path"])
            if found is None or found[3] not in self.kept_routes:
                return None
            return await found[0].answer(found[3], key, {}, **found[2])
        except Exception:  # Falcon's path meets it again, and answers it as it answers every error
            return None

    async def through_falcon(
        self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any], origin: bytes | None = None
    ) -> int:
        """Let Falcon answer, with the X-Request-ID and CORS headers added; return the status it sent. A streamed
        body's client that leaves, or reads nothing for STALLED_CLIENT seconds, ends the stream."""
        status = 0
        added = [(b"x-request-id", scope[REQUEST_ID_KEY].encode()), *self.cors.headers(origin)]
        scope[RECEIVE_KEY] = receive

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *added]
            elif message.get("more_body"):
                try:
                    async with asyncio.timeout(self.STALLED_CLIENT):
                        return await send(message)
                except TimeoutError:
                    raise ClientGone(f"the client read nothing for {self.STALLED_CLIENT:g} s") from None
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientGone as gone:  # the response started: the connection ends without the body's end
            log.info("client gone", reason=str(gone))
        return status

    def done(self, scope: dict[str, Any], route: str | None, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        self.metrics.observe(route, status, seconds)
        if self.log_requests:
            self.request_log.info(
                "request",
                method=scope["method"],
                route=route or "(no route)",
                status=status,
                duration_ms=round(seconds * 1e6) / 1e3,  # to the microsecond; round(x, 3) costs 3 times more
            )


class RouteLabel:
    """Tell the front door the route template of the request's path, the label of its metrics and log line: the
    one Falcon matched, or for a request refused before routing (RateLimit's 429) the one its path matches."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, req_succeeded: bool
    ) -> None:
        template = req.uri_template
        if template is None and (found := self.router.find(req.path)) is not None:
            template = found[3]
        req.scope[ROUTE] = template


def offered_api_key(req: falcon.asgi.Request) -> str:
    """The API key a request offers (Authorization: Bearer, else X-API-Key), or '' when none; without the
    whitespace at a field value's ends (RFC 9110 5.5), which uvicorn's parser keeps after it."""
    scheme, _, credentials = (req.get_header("Authorization") or "").partition(" ")
    offered = credentials if scheme.lower() == "bearer" else req.get_header("X-API-Key") or ""
    return offered.strip(" \t")


class ApiKeyAuth:
    """When keys are configured, the guarded routes need one (Authorization: Bearer, or X-API-Key), but for OPTIONS:
    it discloses only the route's Allow (as its 405 and the OpenAPI document do), and a CORS preflight, which a
    browser sends without a key, is answered with none as well."""

    def __init__(self, keys: Sequence[str], guarded: frozenset[str]) -> None:
        self.keys = [key.encode() for key in keys]
        self.guarded = guarded

    async def process_resource(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, params: dict
    ) -> None:
        if req.uri_template not in self.guarded or req.method == "OPTIONS":
            return
        offered = offered_api_key(req)
        matches = [hmac.compare_digest(offered.encode(), key) for key in self.keys]
        if not offered or not any(matches):
            raise falcon.HTTPUnauthorized(
                description=self.refusal(req, offered), challenges=['Bearer realm="kasparro"']
            )

    @staticmethod
    def refusal(req: falcon.asgi.Request, offered: str) -> str:
        """Why a request's key is refused: none sent, one sent in another scheme than Bearer, or not a key."""
        scheme, _, credentials = (req.get_header("Authorization") or "").partition(" ")
        if scheme and scheme.lower() != "bearer":
            if not credentials.strip():
                return "Authorization: send Bearer <key>, or the key in X-API-Key"
            return f"Authorization: {scheme[:20]} is not taken here: send Authorization: Bearer <key> or X-API-Key"
        if offered:
            return "the API key sent is not one of this service's keys"
        return "this endpoint needs an API key: Authorization: Bearer <key> or X-API-Key"


class QueryParameters:
    """SPEC's rules for every query string: an empty parameter is absent (Falcon drops it), filter_by given twice
    means both (joined with ','), any other parameter given twice is a 400, and so is one whose name or value is
    not UTF-8 once its %-escapes are decoded (Falcon would read each bad byte as U+FFFD, a filter that matches
    nothing). Runs after the guards."""

    JOINED: ClassVar[dict[str, str]] = {"filter_by": ","}

    async def process_resource(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, params: dict
    ) -> None:
        query = req.scope.get("query_string") or b""
        # find: bytes `in` raises inside (FrontDoor). The routes that ignore parameters (for monitors) ignore these.
        if (
            (query.find(b"%") >= 0 or not query.isascii())
            and req.method in READS
            and req.uri_template.startswith(READING_PARAMETERS)
        ):
            not_utf8(query)
        for name, value in list(req.params.items()):
            if type(value) is not list:
                continue
            if name not in self.JOINED:
                raise InvalidQuery(
                    f"{name[:40]}: given {len(value)} times; give it once (only filter_by may repeat: all its"
                    " conditions must hold)"
                )
            req.params[name] = self.JOINED[name].join(value)


READING_PARAMETERS = ("/data", "/stats", "/runs")  # the routes that refuse a parameter they do not take: by prefix


def not_utf8(query: bytes) -> None:
    """InvalidQuery naming the first parameter of a query string whose name or value, %-escapes decoded (and '+' a
    space), is not UTF-8: a stray byte, an overlong form, a surrogate, a code point past U+10FFFF. A parameter with an
    empty value is absent (Falcon drops it), whatever its name."""
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if not value:
            continue
        for piece, what in ((name, "a parameter's name"), (value, None)):
            try:
                urllib.parse.unquote_to_bytes(piece.replace(b"+", b" ")).decode()
            except UnicodeDecodeError as error:
                what = what or urllib.parse.unquote_plus(name.decode("latin-1"))[:40]
                bad = urllib.parse.quote_from_bytes(error.object[error.start : error.end])
                raise InvalidQuery(
                    f"{what}: not UTF-8 text once its %-escapes are decoded ({bad} at byte {error.start}); send text"
                    " as UTF-8, each byte %-escaped"
                ) from None


class RateLimit:
    """Token buckets per API key, or per client address when no valid key is offered (KASPARRO_RATE_LIMIT): each
    refills at `rate` requests a second up to a burst of max(1, 2 * rate), per worker process. The MAX_BUCKETS
    clients seen last are kept (an evicted bucket was full or nearly). Headers: the IETF draft's RateLimit-*. Every
    method counts but OPTIONS, plain or a CORS preflight (which the front door answers): it only says what a route
    allows, as it does without an API key."""

    MAX_BUCKETS = 10_000

    def __init__(
        self, rate: float, keys: Sequence[str], clock: Callable[[], float], exempt: frozenset[str] = frozenset(),
        max_buckets: int = MAX_BUCKETS,
    ) -> None:  # fmt: skip
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"KASPARRO_RATE_LIMIT: expected requests a second > 0, got {rate}")
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self.clock = clock
        self.exempt = exempt  # paths no client is limited on
        self.max_buckets = max_buckets
        self.clients = {hashlib.sha256(key.encode()).digest(): f"key {n}" for n, key in enumerate(keys)}
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, when)

    def client(self, req: falcon.asgi.Request) -> str:
        offered = offered_api_key(req)
        known = self.clients.get(hashlib.sha256(offered.encode()).digest()) if offered else None
        return known or f"address {req.remote_addr}"

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.path in self.exempt or req.method == "OPTIONS":
            return
        client, now = self.client(req), self.clock()
        tokens, then = self.buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - then) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self.buckets[client] = (tokens, now)
        if len(self.buckets) > self.max_buckets:
            self.buckets.popitem(last=False)
        headers = {
            "RateLimit-Limit": str(int(self.burst)),
            "RateLimit-Remaining": str(int(tokens)),
            "RateLimit-Reset": str(math.ceil((self.burst - tokens) / self.rate)),
        }
        if not allowed:
            raise falcon.HTTPTooManyRequests(
                description=f"more than {self.rate:g} requests a second; retry after the Retry-After seconds",
                headers=headers,
                retry_after=max(1, math.ceil((1 - tokens) / self.rate)),
            )
        resp.set_headers(headers)


class Lifespan:
    """Open the store and start flushing metrics when the server starts; when it stops, flush them,
    close the store and retire this worker's live gauges."""

    def __init__(self, store: Store, metrics: HttpMetrics, metrics_dir: Path | None) -> None:
        self.store = store
        self.metrics = metrics
        self.metrics_dir = metrics_dir

    async def process_startup(self, scope: dict, event: dict) -> None:
        self.metrics.start()
        await self.store.open()
        if not gc.get_freeze_count():  # once a process: the first app's startup (tests start many)
            # What exists once the worker is ready (modules, the app, the OpenAPI document: ~40k objects) lives as
            # long as the process. Frozen out of the collector, it is not walked again by each full collection, which
            # would stop the event loop for milliseconds to tens of them every second or two under load.
            gc.collect()
            gc.freeze()

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        self.metrics.stop()
        await self.store.close()
        if self.metrics_dir is not None:
            mark_process_dead(os.getpid(), str(self.metrics_dir))
        log_lines.flush()


def serialize_problem(req: falcon.asgi.Request, resp: falcon.asgi.Response, error: falcon.HTTPError) -> None:
    """Every HTTPError as an RFC 9457 problem+json body."""
    started = req.scope.get(STARTED, time.perf_counter())
    phrase = HTTPStatus(error.status_code).phrase
    problem = Problem(
        type="about:blank",
        title=phrase,
        status=error.status_code,
        detail=error.description or f"{req.method} {req.path}: {phrase.lower()}",
        request_id=req.scope.get(REQUEST_ID_KEY) or str(uuid.uuid4()),
        api_latency_ms=latency_ms(started),
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


async def handle_readers_busy(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: dict
) -> None:
    log.warning("readers busy", reason=str(error))
    raise falcon.HTTPServiceUnavailable(description="every reader of the store is busy; retry shortly", retry_after=1)


async def handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: dict
) -> None:
    log.exception("unexpected error", route=req.uri_template)
    raise falcon.HTTPInternalServerError(description="an unexpected error occurred; quote the request_id")


# --- create_app -----------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One route of the API, as routing, GET /, the OpenAPI document, the guards and the front door read it."""

    path: str
    resource: type
    suffix: str | None = None  # of the responders (on_get_<suffix>) when a resource serves several routes
    summary: str | None = None  # listed by GET / and the OpenAPI document; None: not listed (a docs file)
    guarded: bool = False  # needs an API key when KASPARRO_API_KEYS is set
    limited: bool = True  # counts against KASPARRO_RATE_LIMIT
    kept: bool = False  # a KeptResource: its answers are kept per commit, and the front door may answer it


ROUTES = (
    Route("/", IndexResource, summary="Index: the service and its endpoints"),
    Route("/data", AssetPagesResource, summary="Assets: a page of unified records", guarded=True, kept=True),
    Route(
        "/data/export",
        AssetExportResource,
        summary="Export: every selected asset, streamed as CSV or NDJSON",
        guarded=True,
    ),
    Route(
        DETAIL_ROUTE,
        AssetResource,
        summary="Asset: one unified record with its quotes",
        guarded=True,
        kept=True,
    ),
    Route(
        "/data/{asset_id}/history",
        AssetHistoryResource,
        summary="History: an asset's observations or candles over time",
        guarded=True,
        kept=True,
    ),
    Route("/health", HealthResource, summary="Health: store readable, ETL fresh", limited=False, kept=True),
    Route("/stats", StatsResource, summary="Stats: ETL outcomes", guarded=True, kept=True),
    Route(
        "/runs", RunsResource, summary="Runs: the newest ETL runs with their sources' outcomes", guarded=True, kept=True
    ),
    Route(
        "/runs/{run_id}", RunResource, summary="Run: one ETL run with its sources' outcomes", guarded=True, kept=True
    ),
    Route(
        "/runs/compare",
        RunComparisonResource,
        summary="Compare: two ETL runs side by side, with anomalies",
        guarded=True,
        kept=True,
    ),
    Route("/metrics", MetricsResource, summary="Metrics: Prometheus exposition", limited=False),
    Route("/openapi.json", DocsResource, "openapi", "OpenAPI: this document"),
    Route("/docs", DocsResource, summary="Docs: interactive documentation (Swagger UI)"),
    Route("/docs/", DocsResource),  # the same page: else /docs/{name} would take it, as no file
    Route("/docs/{name}", DocsResource, "file"),
    Route("/redoc", DocsResource, "redoc", "Reference: documentation in three panels (ReDoc)"),
    Route("/redoc/", DocsResource, "redoc"),
    Route("/redoc/{name}", DocsResource, "file"),
)
ROUTE_OF = {route.path: route for route in ROUTES}


def endpoints() -> list[str]:
    """What GET / lists: every documented route."""
    return [f"GET {route.path}" for route in ROUTES if route.summary]


def create_app(config: Config, clock: Callable[[], float] = time.monotonic) -> FrontDoor:
    """The API over the store at config.db: the front door around the Falcon app. `clock` drives the rate limit."""
    configure_logging(config.log_level)
    replica = config.role == "replica"
    store = Store(config.db, config.readers, config.reopen_interval, replica)
    answers = AnswerCache(store, ANSWERS_BYTES)
    recorded, scraped = metrics_registry(config)
    metrics = HttpMetrics(recorded)
    resources = {
        IndexResource: IndexResource(endpoints()),
        AssetPagesResource: AssetPagesResource(store, answers),
        AssetResource: AssetResource(store, answers),
        AssetHistoryResource: AssetHistoryResource(store, answers),
        AssetExportResource: AssetExportResource(store),
        HealthResource: HealthResource(store, answers, config.etl_max_age, replica),
        StatsResource: StatsResource(store, answers, replica),
        RunsResource: RunsResource(store, answers, replica),
        RunResource: RunResource(store, answers, replica),
        RunComparisonResource: RunComparisonResource(store, answers, replica),
        MetricsResource: MetricsResource(store, scraped, metrics, replica),
        DocsResource: DocsResource(openapi_document(config)),
    }
    # Per-client checks only where configured: without them there is nothing to pay per request.
    guards: list[object] = []
    if config.rate_limit:
        exempt = frozenset(route.path for route in ROUTES if not route.limited)
        guards.append(RateLimit(config.rate_limit, config.api_keys, clock, exempt))
    if config.api_keys:
        guards.append(ApiKeyAuth(config.api_keys, frozenset(route.path for route in ROUTES if route.guarded)))
    router = Router()
    app = falcon.asgi.App(
        router=router,
        middleware=[
            RouteLabel(router),
            *guards,
            QueryParameters(),
            Compression(),
            Lifespan(store, metrics, config.metrics_dir),
        ],
    )
    app.req_options.keep_blank_qs_values = False  # an empty parameter is an absent one (QueryParameters)
    app.resp_options.secure_cookies_by_default = config.env == "production"
    app.set_error_serializer(serialize_problem)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(InvalidQuery, handle_invalid_query)
    app.add_error_handler(StoreUnavailable, handle_store_unavailable)
    app.add_error_handler(ReadersBusy, handle_readers_busy)
    for route in ROUTES:
        app.add_route(route.path, resources[route.resource], suffix=route.suffix)
    # The front door answers a kept route only where no per-client check applies (nor would in Falcon).
    open_routes = frozenset(
        route.path for route in ROUTES if route.kept and not (config.api_keys and route.guarded)
        and not (config.rate_limit and route.limited)
    )  # fmt: skip
    return FrontDoor(
        app,
        router=router,
        answers=answers,
        kept_routes=open_routes,
        metrics=metrics,
        log_requests=log_level(config.log_level) <= logging.INFO,
        cors=Cors(config.cors_origins),
    )


app = create_app(Config.from_env())
