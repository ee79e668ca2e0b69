"""Kasparro ETL: load market snapshots into the SQLite store, crash-safe and idempotent."""

from __future__ import annotations

import argparse
import codecs
import collections
import contextlib
import csv
import dataclasses
import difflib
import email.utils
import errno
import fcntl
import functools
import gzip
import hashlib
import http.client
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, BinaryIO, ClassVar, TypeVar

import msgspec
import structlog
from msgspec import Meta

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "store.sql"
SCHEMA_VERSION = 6
SAMPLE_CSV = HERE / "data" / "sample.csv"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75
RAW_REJECT_CHARS = 1_000
REJECTS_KEPT = 1_000  # stored rejects of one source in one run; the others are counted only

log = structlog.get_logger("kasparro.etl")


# --- config ---------------------------------------------------------------

COINGECKO_URL = "https://api.coingecko.com"
COINGECKO_PRO_URL = "https://pro-api.coingecko.com"
COINPAPRIKA_URL = "https://api.coinpaprika.com"
COINPAPRIKA_PRO_URL = "https://api-pro.coinpaprika.com"


@dataclass(frozen=True)
class HttpPolicy:
    """How carefully an HTTP source talks to its upstream: timeouts, retries, budget."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    attempts: int = 5  # per request, the first included
    backoff: float = 1.0  # seconds; the n-th retry waits up to backoff * 2**n, fully jittered
    backoff_cap: float = 30.0
    retry_after_cap: float = 120.0  # a longer Retry-After fails the source instead
    max_requests: int = 40  # per source and run
    budget: float = 300.0  # wall seconds per source and run
    max_body: int = 64 * 1024 * 1024  # bytes after decompression
    rate: float = 0.0  # requests a minute, evenly spaced; 0: unpaced


HOUR, DAY = 3_600, 86_400


@dataclass(frozen=True)
class Retention:
    """How long each tier of history is kept, in seconds (store.sql: history)."""

    # A year of 10-minute runs over 15,000 listings stays under 2 GB with these (bench/history.py).
    raw: int = 2 * DAY  # raw observations: raw points, 5m and 15m candles (100 of them span 25 h)
    hourly: int = 30 * DAY  # hourly candles: 1h and 4h candles over the last month


@dataclass(frozen=True)
class EtlConfig:
    """Settings of one ETL invocation, read from the environment in one place."""

    db: Path = Path("kasparro.db")
    sources: tuple[str, ...] = ()
    log_level: str = "info"
    env: str = "development"
    coingecko_url: str = COINGECKO_URL
    coingecko_key: str | None = field(default=None, repr=False)
    coingecko_plan: str = "demo"  # demo or pro: which header and default URL the key takes
    coingecko_max_pages: int = 20
    # Requests a minute. CoinGecko documents 30 a minute for its public (demo) tier; CoinPaprika
    # documents only a monthly quota for its free plan, and a run sends it one request (README).
    coingecko_rate: float = 30.0
    coinpaprika_rate: float = 60.0
    coinpaprika_url: str = COINPAPRIKA_URL
    coinpaprika_key: str | None = field(default=None, repr=False)
    raw_keep_runs: int = 48
    retention: Retention = Retention()
    busy_timeout: float = 15.0  # seconds to wait for another writer's transaction
    # How a run ends: truncate the WAL, or (beside Litestream, which holds a read transaction and
    # checkpoints itself) only copy what no reader needs (passive), or leave it (off).
    wal_checkpoint: str = "truncate"
    # CSV rows per transaction: bigger batches rewrite fewer index pages per row
    # (a 1M-row load: 65 s at 10,000 rows, 46 s at 50,000 with a 16 MB page
    # cache, peak RSS 131 MB), at ~3 MB of memory per 10,000 rows.
    batch_rows: int = 50_000
    http: HttpPolicy = HttpPolicy()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EtlConfig:
        """Build the config from the variables of SPEC.md (and a few HTTP knobs), with defaults."""
        sources = source_list(environ)
        plan = environ.get("KASPARRO_COINGECKO_PLAN", "").strip().lower() or "demo"
        if plan not in ("demo", "pro"):  # another word would send a paid key in the demo header, to the public URL
            raise UsageError(f"KASPARRO_COINGECKO_PLAN must be demo or pro, not {environ['KASPARRO_COINGECKO_PLAN']!r}")
        paprika_key = environ.get("COINPAPRIKA_API_KEY") or None
        http = HttpPolicy(
            read_timeout=setting(environ, "KASPARRO_HTTP_TIMEOUT", HttpPolicy.read_timeout, SECONDS),
            connect_timeout=setting(environ, "KASPARRO_HTTP_TIMEOUT", HttpPolicy.connect_timeout, SECONDS),
            budget=setting(environ, "KASPARRO_HTTP_BUDGET", HttpPolicy.budget, SECONDS),
            max_requests=setting(environ, "KASPARRO_HTTP_MAX_REQUESTS", HttpPolicy.max_requests, COUNT),
            backoff=setting(environ, "KASPARRO_HTTP_BACKOFF", HttpPolicy.backoff, (0, DAY)),
        )
        return cls(
            db=Path(environ.get("KASPARRO_DB", "kasparro.db")),
            sources=sources or (f"csv:{SAMPLE_CSV}",),
            log_level=log_level_setting(environ),
            env=environ.get("ENV", "development"),
            coingecko_url=upstream_url(
                environ, "KASPARRO_COINGECKO_URL", COINGECKO_PRO_URL if plan == "pro" else COINGECKO_URL
            ),
            coingecko_key=environ.get("COINGECKO_API_KEY") or None,
            coingecko_plan=plan,
            coingecko_max_pages=setting(environ, "KASPARRO_COINGECKO_MAX_PAGES", cls.coingecko_max_pages, COUNT),
            coingecko_rate=request_rate(environ, "KASPARRO_COINGECKO_RATE", cls.coingecko_rate),
            coinpaprika_rate=request_rate(environ, "KASPARRO_COINPAPRIKA_RATE", cls.coinpaprika_rate),
            coinpaprika_url=upstream_url(
                environ, "KASPARRO_COINPAPRIKA_URL", COINPAPRIKA_PRO_URL if paprika_key else COINPAPRIKA_URL
            ),
            coinpaprika_key=paprika_key,
            raw_keep_runs=setting(environ, "KASPARRO_RAW_KEEP_RUNS", cls.raw_keep_runs, (0, COUNT[1])),
            retention=retention(environ),
            busy_timeout=setting(environ, "KASPARRO_BUSY_TIMEOUT", cls.busy_timeout, (0, DAY)),
            wal_checkpoint=wal_checkpoint_mode(environ.get("KASPARRO_WAL_CHECKPOINT", "truncate")),
            batch_rows=setting(environ, "KASPARRO_BATCH_ROWS", cls.batch_rows, COUNT),
            http=http,
        )


def source_list(environ: Mapping[str, str]) -> tuple[str, ...]:
    """KASPARRO_SOURCES' comma-separated items, stripped; unset or blank is none (the sample), an empty item a
    UsageError: dropping it would turn ',' into no sources at all, and so into the shipped sample."""
    text = environ.get("KASPARRO_SOURCES", "")
    if not text.strip():
        return ()
    items = tuple(item.strip() for item in text.split(","))
    if "" in items:
        raise UsageError(
            f"KASPARRO_SOURCES {text!r} has an empty item (item {items.index('') + 1} of {len(items)}): separate its"
            " sources with single commas, as in 'coingecko,coinpaprika', or leave it empty for the shipped sample"
        )
    return items


# The ranges of numeric settings, inclusive: a whole count of things, and seconds a wait may last.
Number = TypeVar("Number", int, float)
COUNT = (1, 1_000_000_000)
SECONDS = (0.001, DAY)
UNSIGNED_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"  # float()'s, in digits 0-9 with no '_'
ASCII_NUMBER = re.compile(rf"[+-]?{UNSIGNED_NUMBER}")  # a setting's syntax


def setting(environ: Mapping[str, str], name: str, default: Number, bounds: tuple[float, float]) -> Number:
    """A number from the environment, of the default's type and within `bounds`; UsageError naming the variable.

    Unset or empty is the default. A value out of range (nan, inf, a negative time) would otherwise surface
    later as a traceback in the middle of a run, or a run that quietly does nothing.
    """
    text = environ.get(name, "").strip()
    if not text:
        return default
    low, high = bounds
    try:  # int() and float() also read '_' between digits, and other scripts' digits
        value = type(default)(text) if ASCII_NUMBER.fullmatch(text) else None
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        kind = "a whole number" if isinstance(default, int) else "a number"
        raise UsageError(f"{name} must be {kind} from {low:,} to {high:,}, not {text[:40]!r}")
    return value


def request_rate(environ: Mapping[str, str], name: str, default: float) -> float:
    """A rate limit in requests a minute from the environment; UsageError unless a positive number."""
    return setting(environ, name, default, (0.001, COUNT[1]))


def upstream_url(environ: Mapping[str, str], name: str, default: str) -> str:
    """An upstream's base URL from the environment, or `default`; UsageError naming the variable unless http(s)
    with a host and a port from 1 to 65535 (which would fail the run later, or end it with a traceback)."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # an unclosed [ of an IPv6 host
        problem = "it cannot be read as a URL"
    else:
        try:
            port = parts.port
        except ValueError:  # not a number, or over 65535
            port = 0
        problem = (
            "it does not start with http:// or https://" if parts.scheme not in ("http", "https")
            else "it names no host" if not parts.hostname
            else "its port is not a number from 1 to 65,535" if port == 0
            else ""
        )  # fmt: skip
    if problem:
        example = COINGECKO_URL if "GECKO" in name else COINPAPRIKA_URL
        raise UsageError(f"{name} must be an http:// or https:// address such as {example}: {problem}")
    return value


DURATION = re.compile(r"\s*([0-9]+)\s*([dhms])\s*")
DURATION_UNITS = {"d": DAY, "h": HOUR, "m": 60, "s": 1}
# Longer than any history: a span beyond it keeps everything, as it would, and stays an integer SQLite holds.
LONGEST_SPAN = 10_000 * 365 * DAY
LONGEST_COUNT = len(str(LONGEST_SPAN))  # digits of a duration's number beyond which it is longer than LONGEST_SPAN


def retention(environ: Mapping[str, str]) -> Retention:
    """KASPARRO_KEEP_RAW and KASPARRO_KEEP_HOURLY ('7d', '36h'), or UsageError; raw may not outlast hourly."""
    spans, given = {}, {}
    for tier, name in (("raw", "KASPARRO_KEEP_RAW"), ("hourly", "KASPARRO_KEEP_HOURLY")):
        value = environ.get(name, "").strip()
        if not value:
            spans[tier] = getattr(Retention, tier)
            given[tier] = f"{spans[tier] // DAY}d, the default"
            continue
        match = DURATION.fullmatch(value)
        count = match.group(1).lstrip("0") if match else ""  # int() reads no more than 4,300 digits
        if not count:
            raise UsageError(f"{name} must be a positive duration such as 7d, 36h or 90m, not {value[:40]!r}")
        seconds = int(count) * DURATION_UNITS[match.group(2)] if len(count) <= LONGEST_COUNT else LONGEST_SPAN
        spans[tier] = min(seconds, LONGEST_SPAN)
        given[tier] = value
    if spans["hourly"] < spans["raw"]:
        raise UsageError(
            f"KASPARRO_KEEP_HOURLY ({given['hourly']}) must be at least KASPARRO_KEEP_RAW ({given['raw']}):"
            " hourly candles are made from raw observations"
        )
    return Retention(**spans)


LOG_LEVELS = "debug, info, warning, error or critical"


def log_level_setting(environ: Mapping[str, str]) -> str:
    """LOG_LEVEL lower-cased (unset or empty: info), or UsageError: an unknown one would quietly mean info."""
    text = environ.get("LOG_LEVEL", "")
    level = text.strip().lower() or "info"
    if level == "notset" or level.upper() not in logging.getLevelNamesMapping():  # warn and fatal are taken too
        raise UsageError(f"LOG_LEVEL must be {LOG_LEVELS} (in any case), not {text!r}")
    return level


WAL_CHECKPOINTS = ("truncate", "passive", "off")


def wal_checkpoint_mode(value: str) -> str:
    """KASPARRO_WAL_CHECKPOINT as one of WAL_CHECKPOINTS, or UsageError."""
    mode = value.strip().lower()
    if mode not in WAL_CHECKPOINTS:
        raise UsageError(f"KASPARRO_WAL_CHECKPOINT must be one of {', '.join(WAL_CHECKPOINTS)}, not {value!r}")
    return mode


class UsageError(Exception):
    """The command line or configuration cannot be carried out (exit 2)."""


class SourceError(Exception):
    """A source cannot be read at all; the source fails, the run goes on."""


class Interrupted(Exception):
    """The process was asked to stop (SIGTERM); the open batch rolls back."""


class BudgetSpent(SourceError):
    """A source's time budget ended before or during a request; HttpClient.get says which URL, after what."""


class CutShort(Exception):
    """A response body shorter than it says: the connection closed early, or its gzip stream ends early."""


class RecordLost(Exception):
    """The run's end could not be written to its record; the next run records it as failed.

    `cause` is the first thing that went wrong in the run, `record_error` why the record was not written.
    """

    def __init__(self, cause: str, record_error: str) -> None:
        super().__init__(cause)
        self.cause = cause
        self.record_error = record_error


# --- logging --------------------------------------------------------------


def configure_logging(level: str) -> None:
    """JSON lines on stdout, or readable console lines on a TTY, bound to contextvars."""
    tty = sys.stdout.isatty()
    renderer = structlog.dev.ConsoleRenderer() if tty else structlog.processors.JSONRenderer()
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
        logger_factory=structlog.WriteLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,  # structlog.testing.capture_logs must see every line
    )


# --- sources --------------------------------------------------------------


@dataclass(frozen=True)
class CsvSource:
    """A CSV snapshot file; its name is 'csv:' and the label given (csv:NAME=PATH), else the file's stem."""

    path: Path
    label: str | None = None

    @property
    def name(self) -> str:
        return f"csv:{self.label or self.path.stem}"


CSV_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Field:
    """A field of an upstream record: where it is, and whether a record is void without it."""

    path: tuple[str, ...]
    required: bool = False

    @property
    def label(self) -> str:
        return ".".join(self.path)


class HttpSource:
    """An upstream JSON API: its requests, and the schema its records are checked against.

    `fields` maps each canonical field to where the upstream record holds it;
    `known` lists every other field the upstream is known to send. Anything
    else is schema drift: counted, logged once per run and stored with it.
    """

    name: str
    fields: ClassVar[dict[str, Field]]
    known: ClassVar[frozenset[str]]
    known_nested: ClassVar[dict[str, frozenset[str]]] = {}
    page_limit: ClassVar[str] = ""  # the setting that caps how many pages a run reads, for a paged source

    def __init__(self, base_url: str, headers: dict[str, str], policy: HttpPolicy) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.policy = policy

    def requests(self) -> Iterator[tuple[str, int | None]]:
        """The URLs to fetch in order, each with the record count of a full page (None: no paging)."""
        raise NotImplementedError

    def status(self, record: dict) -> str:
        return "active"


PAPRIKA_USD_KNOWN = frozenset(
    [
        "price",
        "volume_24h",
        "volume_24h_change_24h",
        "market_cap",
        "market_cap_change_24h",
        "percent_change_15m",
        "percent_change_30m",
        "percent_change_1h",
        "percent_change_6h",
        "percent_change_12h",
        "percent_change_24h",
        "percent_change_7d",
        "percent_change_30d",
        "percent_change_1y",
        "ath_price",
        "ath_date",
        "percent_from_price_ath",
    ]
)


class CoinPaprika(HttpSource):
    """CoinPaprika `GET /v1/tickers`: every coin in one response."""

    name = "coinpaprika"
    fields: ClassVar[dict[str, Field]] = {
        "symbol": Field(("symbol",), required=True),
        "name": Field(("name",), required=True),
        "source_id": Field(("id",), required=True),
        "rank": Field(("rank",)),
        "price_usd": Field(("quotes", "USD", "price")),
        "market_cap_usd": Field(("quotes", "USD", "market_cap")),
        "volume_24h_usd": Field(("quotes", "USD", "volume_24h")),
        "change_24h_pct": Field(("quotes", "USD", "percent_change_24h")),
        "observed_at": Field(("last_updated",)),
    }
    known = frozenset(
        [
            "id",
            "name",
            "symbol",
            "rank",
            "circulating_supply",
            "total_supply",
            "max_supply",
            "beta_value",
            "first_data_at",
            "last_updated",
            "quotes",
        ]
    )
    known_nested: ClassVar[dict[str, frozenset[str]]] = {"quotes.USD": PAPRIKA_USD_KNOWN}

    def requests(self) -> Iterator[tuple[str, int | None]]:
        yield f"{self.base_url}/v1/tickers", None

    def status(self, record: dict) -> str:
        # /v1/tickers lists active coins only; an explicit flag wins where sent.
        return "inactive" if record.get("is_active") is False else "active"


class CoinGecko(HttpSource):
    """CoinGecko `GET /api/v3/coins/markets`, paged by market cap until a short page."""

    name = "coingecko"
    per_page = 250
    page_limit = "KASPARRO_COINGECKO_MAX_PAGES"
    fields: ClassVar[dict[str, Field]] = {
        "symbol": Field(("symbol",), required=True),
        "name": Field(("name",), required=True),
        "source_id": Field(("id",), required=True),
        "rank": Field(("market_cap_rank",)),
        "price_usd": Field(("current_price",)),
        "market_cap_usd": Field(("market_cap",)),
        "volume_24h_usd": Field(("total_volume",)),
        "change_24h_pct": Field(("price_change_percentage_24h",)),
        "observed_at": Field(("last_updated",)),
    }
    known = frozenset(
        [
            "id",
            "symbol",
            "name",
            "image",
            "current_price",
            "market_cap",
            "market_cap_rank",
            "fully_diluted_valuation",
            "total_volume",
            "high_24h",
            "low_24h",
            "price_change_24h",
            "price_change_percentage_24h",
            "market_cap_change_24h",
            "market_cap_change_percentage_24h",
            "circulating_supply",
            "total_supply",
            "max_supply",
            "ath",
            "ath_change_percentage",
            "ath_date",
            "atl",
            "atl_change_percentage",
            "atl_date",
            "roi",
            "last_updated",
        ]
    )

    def __init__(self, base_url: str, headers: dict[str, str], policy: HttpPolicy, max_pages: int) -> None:
        super().__init__(base_url, headers, policy)
        self.max_pages = max_pages

    def requests(self) -> Iterator[tuple[str, int | None]]:
        for page in range(1, self.max_pages + 1):
            query = urllib.parse.urlencode(
                {"vs_currency": "usd", "order": "market_cap_desc", "per_page": self.per_page, "page": page}
            )
            yield f"{self.base_url}/api/v3/coins/markets?{query}", self.per_page


@dataclass(frozen=True)
class ReplaySource:
    """The raw payloads a past run stored, normalised again without refetching."""

    run_id: int
    upstream: HttpSource

    @property
    def name(self) -> str:
        return self.upstream.name

    @property
    def spec(self) -> str:
        return f"replay:{self.name}@{self.run_id}"


Source = CsvSource | HttpSource | ReplaySource
MAX_RUN_ID = 2**63 - 1
UPSTREAMS = ("coinpaprika", "coingecko")  # what replay:NAME@RUN_ID can name


def parse_source(spec: str, config: EtlConfig) -> Source:
    """Turn a SOURCE argument of the CLI into a source, or raise UsageError."""
    kind, sep, rest = spec.partition(":")
    if kind == "csv" and sep and rest:
        label, named, path = rest.partition("=")
        if named and CSV_LABEL.fullmatch(label):
            if not path:
                raise UsageError(f"source {spec!r} names no file: expected csv:NAME=PATH")
            return CsvSource(Path(path), label)
        if named and "/" not in label and not Path(rest).exists():  # a typing error, not a file that is missing
            raise UsageError(
                f"source {spec!r}: {label[:70]!r} is no NAME of csv:NAME=PATH (letters, digits, '.', '_' and '-',"
                f" from a letter or digit, at most 64), and no file is named {rest!r}"
            )
        source = CsvSource(Path(rest))
        if "," in source.name or "|" in source.name:
            raise UsageError(
                f"source {spec!r} would be named {source.name!r}, but ',' and '|' separate names in"
                " filter_by=source:… and in a CSV's sources cells; name it with csv:NAME=PATH"
            )
        stem = source.name.removeprefix("csv:")
        if not stem:
            problem = "an empty name"
        elif stem != stem.strip():
            problem = "with a space at an end, which filter_by=source:… drops (no condition could select it)"
        elif CONTROL_CHARACTER.search(stem):
            problem = "with a control character, which garbles log lines and a CSV's sources cells"
        else:
            return source
        raise UsageError(f"source {spec!r} would be named {source.name!r}, {problem}; name it with csv:NAME=PATH")
    if spec == "coinpaprika":
        headers = {"Authorization": config.coinpaprika_key} if config.coinpaprika_key else {}
        policy = dataclasses.replace(config.http, rate=config.coinpaprika_rate)
        return CoinPaprika(config.coinpaprika_url, headers, policy)
    if spec == "coingecko":
        headers = {}
        if config.coingecko_key:
            headers["x-cg-pro-api-key" if config.coingecko_plan == "pro" else "x-cg-demo-api-key"] = (
                config.coingecko_key
            )
        policy = dataclasses.replace(config.http, rate=config.coingecko_rate)
        return CoinGecko(config.coingecko_url, headers, policy, config.coingecko_max_pages)
    if kind == "replay" and sep:
        name, at, run = rest.rpartition("@")
        if not at and rest in UPSTREAMS:
            raise UsageError(f"source {spec!r}: it names no run: expected replay:NAME@RUN_ID")
        if name in UPSTREAMS:
            if not (run.isascii() and run.isdigit()) or int(run) == 0:
                raise UsageError(f"source {spec!r}: RUN_ID must be a run's id, a whole number from 1, not {run!r}")
            if int(run) > MAX_RUN_ID:
                raise UsageError(f"source {spec!r}: no run has an id over {MAX_RUN_ID} (SQLite's largest integer)")
            return ReplaySource(int(run), parse_source(name, config))  # type: ignore[arg-type]
    if not spec.strip():
        raise UsageError(
            f"source {spec!r} is empty: give csv:PATH, csv:NAME=PATH, coinpaprika, coingecko or replay:NAME@RUN_ID"
        )
    raise UsageError(
        f"unknown source {spec!r}: expected csv:PATH, csv:NAME=PATH, coinpaprika, coingecko or replay:NAME@RUN_ID"
    )


def parse_sources(specs: Sequence[str], config: EtlConfig) -> list[Source]:
    """The SOURCE arguments of one run; UsageError for a bad one, or for two that share a name."""
    sources = [parse_source(spec, config) for spec in specs]
    named: dict[str, str] = {}
    for spec, source in zip(specs, sources, strict=True):
        if (key := source_key(source.name)) in named:
            both = f"sources {named[key]!r} and {spec!r} are both named {source.name!r}"
            if not isinstance(source, CsvSource):  # a CSV's name begins csv:, so the other is an upstream too
                raise UsageError(f"{both}: an upstream loads once a run (a replay of it is that upstream too)")
            raise UsageError(
                f"{both} (in any case and Unicode form, as filter_by=source:… compares names); give a CSV source its"
                " own name with csv:NAME=PATH"
            )
        named[key] = spec
    return sources


def source_key(name: str) -> str:
    """A source's name as filter_by=source:… compares it (kasparro.fold): in any case and Unicode normal form."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def stored_names(conn: sqlite3.Connection, sources: Sequence[Source]) -> list[Source]:
    """The sources, each CSV source under the name the store knows it by when that differs only in case or Unicode
    form (a file named again otherwise: csv:Feed for csv:feed), so that it stays one source."""
    checkpoints = conn.execute("SELECT source FROM checkpoint WHERE source LIKE 'csv:%' ORDER BY updated_at")
    names = [row[0] for row in checkpoints]
    stored: dict[str, str] = {}
    for name in names:  # a store loaded before names were compared so holds each spelling: the oldest is taken
        stored.setdefault(source_key(name), name)
    renamed = []
    for source in sources:
        name = stored.get(source_key(source.name), source.name)
        if isinstance(source, CsvSource) and name != source.name and source.name not in names:
            log.info("source loads under its stored name", source=source.name, stored=name)
            source = dataclasses.replace(source, label=name.removeprefix("csv:"))
        renamed.append(source)
    return renamed


class HttpClient:
    """GETs of one source's run: timeouts, retries with jittered backoff, Retry-After, a budget.

    Requests start at least 60 / policy.rate seconds apart; waiting for that counts against the
    time budget. `clock` and `sleep` are injectable for tests.
    """

    def __init__(
        self,
        source: HttpSource,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.source = source
        self.policy = source.policy
        self.clock, self.sleep = clock, sleep
        self.deadline = clock() + self.policy.budget
        self.next_start = clock()  # when the next request may start
        self.requests = 0
        self.ssl = ssl.create_default_context()

    def get(self, url: str) -> bytes:
        """The body of a 200 answer to GET url (decompressed), or SourceError saying why not."""
        policy = self.policy
        problem = None
        for attempt in range(1, policy.attempts + 1):
            retry_after = None
            try:
                status, headers, body = self._fetch(url)
            except BudgetSpent as spent:  # what the attempts before it met, if any, is the cause
                raise SourceError(f"{safe_url(url)}: {f'{problem}; ' if problem else ''}{spent}") from None
            except TimeoutError:
                problem = f"no answer within {policy.read_timeout:g} s"
            except CutShort as error:  # a dropped connection: retried, like one that sent nothing
                problem = str(error)
            except zlib.error as error:
                problem = f"the gzip body does not inflate ({str(error).rpartition(': ')[2]})"
            except (OSError, http.client.HTTPException) as error:
                problem = transport_problem(error)
            else:
                if status == 200:
                    return body
                problem = f"HTTP {status}"
                if status != 429 and status < 500:
                    raise SourceError(f"{safe_url(url)} answered {self.refusal(status, headers, body)}")
                retry_after = parse_retry_after(headers.get("retry-after"))
            if attempt == policy.attempts:
                break
            if retry_after is not None and retry_after > policy.retry_after_cap:
                raise SourceError(f"{safe_url(url)}: {problem} with Retry-After {retry_after:g} s, over the cap")
            jitter = random.uniform(0, min(policy.backoff_cap, policy.backoff * 2**attempt))  # noqa: S311 - not a secret
            delay = retry_after if retry_after is not None else jitter
            if self.clock() + delay >= self.deadline:
                raise SourceError(f"{safe_url(url)}: {problem}; time budget of {policy.budget:g} s spent")
            log.warning("retrying", url=safe_url(url), attempt=attempt, problem=problem, wait_s=round(delay, 3))
            self.sleep(delay)
        raise SourceError(f"{safe_url(url)}: {problem} after {policy.attempts} attempts")

    def refusal(self, status: int, headers: dict[str, str], body: bytes) -> str:
        """What an answer that is not retried was, in an operator's words: a redirect names where it points."""
        if 300 <= status < 400:
            location = headers.get("location", "").strip()
            target = safe_url(printable(location.encode()[:300])) if location else "no address (no Location header)"
            return (
                f"HTTP {status}, a redirect to {target}, which the ETL does not follow: set"
                f" KASPARRO_{self.source.name.upper()}_URL to the address it moved to"
            )
        return f"HTTP {status}: {printable(body[:200])}" if body.strip() else f"HTTP {status} with an empty body"

    def _pace(self, url: str) -> None:
        """Wait until the rate limit lets the next request start, or SourceError if the budget ends first."""
        wait = self.next_start - self.clock()
        if wait > 0:
            if self.clock() + wait >= self.deadline:
                raise BudgetSpent(
                    f"time budget of {self.policy.budget:g} s spent waiting"
                    f" for the rate limit of {self.policy.rate:g} requests a minute"
                )
            log.debug("pacing", url=safe_url(url), wait_s=round(wait, 3))
            self.sleep(wait)
        if self.policy.rate > 0:
            self.next_start = self.clock() + 60 / self.policy.rate

    def _fetch(self, url: str) -> tuple[int, dict[str, str], bytes]:
        if self.requests >= self.policy.max_requests:
            raise SourceError(f"{safe_url(url)}: request budget of {self.policy.max_requests} spent")
        self._pace(url)
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise BudgetSpent(f"time budget of {self.policy.budget:g} s spent")
        self.requests += 1
        parts = urllib.parse.urlsplit(url)
        timeout = min(self.policy.connect_timeout, remaining)
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=self.ssl)
        elif parts.scheme == "http":
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        else:
            raise SourceError(f"unsupported URL scheme in {safe_url(url)}")
        try:
            conn.connect()
            sock = conn.sock  # the response reads from it after getresponse() lets conn go of it
            sock.settimeout(min(self.policy.read_timeout, remaining))
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            with BudgetWatch(sock, self.deadline - self.clock(), self.policy.budget) as watch:
                conn.request("GET", target or "/", headers=self._headers())
                response = conn.getresponse()  # a hang-up ends it as if the headers were complete
                watch.now_doing("while reading")
                headers = {k.lower(): v for k, v in response.getheaders()}
                body = self._read(response)
        finally:
            conn.close()
        codings = [coding.strip().lower() for coding in headers.get("content-encoding", "").split(",")]
        for coding in reversed([coding for coding in codings if coding not in ("", "identity")]):  # undone last first
            if coding not in CODINGS:
                raise SourceError(
                    f"{safe_url(url)}: a body in the {coding[:20]!r} coding, which the ETL does not read"
                    " (it asks for gzip)"
                )
            inflate = zlib.decompressobj(wbits=CODINGS[coding])
            body = inflate.decompress(body, self.policy.max_body)
            if inflate.unconsumed_tail:
                raise SourceError(f"{safe_url(url)}: body over {self.policy.max_body} bytes when decompressed")
            if not inflate.eof:  # what a body without Content-Length shows of a connection closed early
                raise CutShort(f"the {coding} body ends early, after {len(body):,} bytes inflated")
        return response.status, headers, body

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        """The body, read as it arrives; each wait ends with the read timeout, and BudgetWatch hangs up a body
        that drips in past the time budget."""
        chunks, size = [], 0
        while True:
            chunk = response.read1(65536)  # what has arrived, not a full 64 kB
            if not chunk:
                break
            size += len(chunk)
            if size > self.policy.max_body:
                raise SourceError(f"response over {self.policy.max_body} bytes")
            chunks.append(chunk)
        if response.length:  # bytes still due: the connection closed early (http.client's read() does not say)
            raise CutShort(f"the connection closed after {size:,} of {size + response.length:,} bytes")
        return b"".join(chunks)

    def _headers(self) -> dict[str, str]:
        return {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
            "User-Agent": "kasparro-etl/1",
            **self.source.headers,
        }


class BudgetWatch:
    """Hang up a request's socket when the time budget ends, whatever it is waiting for.

    Each wait for bytes ends with the read timeout, but a status line and headers that drip in, a byte
    within each timeout, would hold the run past its budget: http.client reads them in many waits. After
    the hang-up whatever was read is cut short, so the request ends with BudgetSpent, saying what it was
    doing, however the reads took the hang-up (an error, or an end that looks like one).
    """

    def __init__(self, sock: socket.socket, seconds: float, budget: float) -> None:
        self.sock, self.budget = sock, budget
        self.doing = "waiting for the response"
        self.spent = threading.Event()
        self.timer = threading.Timer(max(0.0, seconds), self._hang_up)
        self.timer.daemon = True

    def _hang_up(self) -> None:
        self.spent.set()
        with contextlib.suppress(OSError):  # the socket's own shutdown: an SSLSocket's would drop its TLS state
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # under the thread reading it

    def __enter__(self) -> BudgetWatch:
        self.timer.start()
        return self

    def now_doing(self, doing: str) -> None:
        """Go on to the next part of the request, unless the budget ended in this one."""
        if self.spent.is_set():
            raise self._over()
        self.doing = doing

    def _over(self) -> BudgetSpent:
        return BudgetSpent(f"time budget of {self.budget:g} s spent {self.doing}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> None:
        self.timer.cancel()
        if self.spent.is_set() and (error is None or isinstance(error, Exception)):
            raise self._over() from None


# The HTTP content codings a body is inflated from, as zlib's wbits: gzip (and its old name x-gzip), deflate (zlib).
CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def safe_url(url: str) -> str:
    """A URL fit for logs: no user info, no query values that could be keys."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    shown = "&".join(f"{k}={'***' if 'key' in k.lower() else v}" for k, v in query)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host if parts.port is None else f"{host}:{parts.port}"  # the port asked, as an operator wrote it
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, shown, ""))


def transport_problem(error: OSError | http.client.HTTPException) -> str:
    """A failed exchange in the system's words ('connection refused'), else the HTTP client's."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


def json_kind(value: object) -> str:
    """A decoded JSON value's type in JSON's words: null, true, a number, an array, ..."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    kinds = ((str, "a string"), (int | float, "a number"), (list, "an array"))
    return next((kind for types, kind in kinds if isinstance(value, types)), "an object")


def printable(data: bytes) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", data.decode("utf-8", "replace"))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


# The canonical field names of a CSV row, and the header names taken for each
# (compared after header_key()).
CSV_ALIASES: dict[str, tuple[str, ...]] = {
    "symbol": ("symbol", "ticker", "sym"),
    "name": ("name", "asset_name", "coin", "coin_name"),
    "source_id": ("id", "source_id", "asset_id", "coin_id", "slug"),
    "rank": ("rank", "market_cap_rank", "cmc_rank"),
    "price_usd": ("price_usd", "price", "current_price", "price_in_usd", "usd"),
    "market_cap_usd": ("market_cap_usd", "market_cap", "mcap", "marketcap", "mkt_cap"),
    "volume_24h_usd": ("volume_24h_usd", "volume_24h", "volume", "total_volume", "vol_24h", "24h_volume"),
    "change_24h_pct": (
        "change_24h_pct",
        "change_24h",
        "percent_change_24h",
        "price_change_percentage_24h",
        "pct_change_24h",
    ),
    "status": ("status", "state", "is_active", "active"),
    "observed_at": ("last_updated", "updated_at", "observed_at", "timestamp", "time", "date", "as_of"),
}
HEADER_TO_FIELD = {alias: name for name, aliases in CSV_ALIASES.items() for alias in aliases}
# A time column's name with its zone or unit after it, as exports write them ('Last Updated (UTC)', 'timestamp_ms'):
# the observation time, where no column has a time's plain name (the first of them; any other is an unknown column).
SUFFIXED_TIMES = frozenset(
    f"{alias}_{suffix}"
    for alias in CSV_ALIASES["observed_at"]
    for suffix in ("utc", "gmt", "z", "ms", "s", "unix", "iso", "iso8601", "rfc3339")
)
REQUIRED_COLUMNS = ("symbol", "name")


def header_key(header: str) -> str:
    """'Market Cap (USD)' -> 'market_cap_usd': how header names are compared."""
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lstrip("\ufeff").casefold()).strip("_")


@dataclass
class CsvLayout:
    """Where each canonical field sits in the file's rows."""

    width: int
    columns: tuple[int | None, ...]  # per canonical field: column index or None
    ignored: tuple[str, ...]  # header names that map to no field (schema drift)
    header: tuple[str, ...] = ()  # the header's names as header_key() compares them
    names: frozenset[str] = frozenset()  # the names, stripped and case-folded

    def is_header(self, cells: Sequence[str]) -> bool:
        """Whether a row repeats the header's names, in any case, spacing or order (files concatenated with theirs)."""
        return (
            len(cells) == self.width
            and cells[0].strip().lstrip("\ufeff").casefold() in self.names  # cheap: most rows stop here
            and sorted(map(header_key, cells)) == sorted(self.header)
        )

    def labels(self, header: Sequence[str]) -> tuple[str, ...]:
        """Per canonical field, its column's name in the header (or the field's own name)."""
        return tuple(name if at is None else header[at] for name, at in zip(ROW_FIELDS, self.columns, strict=True))


DELIMITERS = {";": "semicolon (;)", "\t": "tab", "|": "pipe (|)"}


def csv_layout(header: Sequence[str]) -> CsvLayout:
    """Map a header row onto the canonical fields, or raise SourceError."""
    found: dict[str, int] = {}
    ignored = []
    keys = [header_key(raw) for raw in header]
    dated = any(HEADER_TO_FIELD.get(key) == "observed_at" for key in keys)
    for index, (raw, key) in enumerate(zip(header, keys, strict=True)):
        target = HEADER_TO_FIELD.get(key)
        if target is None and key in SUFFIXED_TIMES and not dated:  # the first of them, where no plain one is
            target, dated = "observed_at", True
        if target is None:
            ignored.append(raw)
        elif target in found:
            raise SourceError(f"columns {header[found[target]]!r} and {raw!r} both give {target}")
        else:
            found[target] = index
    missing = [name for name in REQUIRED_COLUMNS if name not in found]
    if missing:
        if not any(name.strip().lstrip("\ufeff").strip() for name in header):  # a blank line, or a lone BOM
            raise SourceError(
                "the first line is blank, where the header row belongs (symbol, name and the other columns)"
            )
        if any("\x00" in name for name in header):
            raise SourceError("the header holds NUL bytes: is it UTF-16 without a byte-order mark? Save it as UTF-8")
        delimiter = next((d for d in DELIMITERS if len(header) == 1 and d in header[0]), None)
        if delimiter:
            raise SourceError(
                f"the file looks {DELIMITERS[delimiter]}-delimited: its header is one column"
                f" {header[0][:120]!r}; only comma-separated files are read"
            )
        shown = ", ".join(repr(name[:40]) for name in header[:20]) + (", …" if len(header) > 20 else "")
        raise SourceError(f"header has no {' or '.join(missing)} column; its columns: {shown}")
    columns = tuple(found.get(name) for name in CSV_ALIASES)
    names = frozenset(name.strip().lstrip("\ufeff").casefold() for name in header)
    return CsvLayout(len(header), columns, tuple(ignored), tuple(keys), names)


@dataclass
class ReadPosition:
    """Where a reader stands; checkpoints copy it (store.sql's checkpoint.position and line)."""

    offset: int = 0  # a CSV's byte offset, or the last upstream page read
    line: int = 0  # a CSV's physical line, or the upstream records read so far


def decoded_lines(stream: BinaryIO, position: ReadPosition, end: int) -> Iterator[str]:
    """Yield the stream's lines as text up to byte `end` (what was there when its fingerprint was taken: the rest
    was written since), keeping `position` at the end of the last one.

    SourceError at the first line that is not UTF-8, naming the line and the byte.
    """
    for raw in stream:
        if position.offset + len(raw) > end:  # the line was being written then: it is not read
            return
        position.offset += len(raw)
        position.line += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SourceError(
                f"{not_utf8(raw, error, position.line)}; save the file as UTF-8, or UTF-16 with a byte-order mark"
            ) from None
        yield text


def not_utf8(raw: bytes, error: UnicodeDecodeError, line: int) -> str:
    """Where line number `line` (its bytes `raw`) stops being UTF-8, and what it may be instead."""
    byte = raw[error.start]
    guess = " (Windows-1252 or Latin-1?)" if byte >= 0x80 else ""
    return f"line {line} is not UTF-8: byte 0x{byte:02x} at byte {error.start + 1} of the line{guess}"


# Byte-order marks of the encodings decoded besides UTF-8 (the longer UTF-32 ones first).
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # fmt: skip


def utf8_document(body: bytes, where: str) -> bytes:
    """An upstream body as UTF-8 without a byte-order mark: UTF-16 or UTF-32 with one is transcoded.

    SourceError naming the line where the UTF-16 or UTF-32 text breaks.
    """
    encoding = next((name for bom, name in BOMS if body.startswith(bom)), None)
    if encoding is None:
        return body.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode(encoding).encode("utf-8")
    except UnicodeDecodeError as error:
        line = error.object[: error.start].decode(encoding, "replace").count("\n") + 1
        raise SourceError(f"{where}: line {line} is not valid {encoding.upper()}: {error.reason}") from None


def utf8_fault(body: bytes) -> str:
    """Where a body that is not UTF-8 first breaks, as a CSV file's line is reported."""
    for line, raw in enumerate(body.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return not_utf8(raw, error, line)
    return "not UTF-8"


def utf8_stream(stream: BinaryIO, size: int) -> BinaryIO:
    """An open file as UTF-8 bytes from its start: itself, or (UTF-16 or UTF-32 with a byte-order mark) a temporary
    file its first `size` bytes are transcoded to, which the caller closes.

    SourceError naming the line where the UTF-16 or UTF-32 text breaks, or when the file is shorter than `size`.
    """
    stream.seek(0)
    head = stream.read(4)
    encoding = next((name for bom, name in BOMS if head.startswith(bom)), None)
    stream.seek(0)
    if encoding is None:
        return stream
    transcoded = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    decoder = codecs.getincrementaldecoder(encoding)()
    lines = 1
    try:
        while True:
            state, chunk = decoder.getstate(), stream.read(min(1 << 20, size - stream.tell()))
            if not chunk and stream.tell() < size:
                transcoded.close()
                raise SourceError(
                    "it became shorter while it was read (a program is writing it?); the next run reads it again"
                )
            text = decoder.decode(chunk, final=not chunk)
            transcoded.write(text.encode("utf-8"))
            lines += text.count("\n")
            if not chunk:
                break
    except UnicodeDecodeError as error:
        transcoded.close()
        decoder.setstate((b"", state[1]))
        lines += decoder.decode(error.object[: error.start]).count("\n")
        raise SourceError(f"line {lines} is not valid {encoding.upper()}: {error.reason}") from None
    transcoded.seek(0)
    return transcoded


# What the csv module's errors mean, in the words of someone fixing the file.
CSV_PROBLEMS = {
    "new-line character seen in unquoted field": "a line break (CR) inside an unquoted field:"
    " old Mac line ends or a stray CR; line ends must be LF or CRLF",
    "unexpected end of data": "a quoted field is not closed before the end of the file",
    "field larger than field limit": f"a field longer than {csv.field_size_limit():,} characters",
    "expected after": "a quote inside a quoted field is not doubled, or text follows a closing quote",
}


def csv_problem(error: csv.Error) -> str:
    message = str(error)
    return next((meaning for start, meaning in CSV_PROBLEMS.items() if start in message), message)


# What a path that is no regular file names, as os.stat's mode tells (anything else: a device).
FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket"))


def open_csv(path: Path) -> BinaryIO:
    """The CSV file opened for reading; SourceError when it cannot be, or is no regular file.

    A pipe or a device cannot be read twice (its fingerprint, then its rows) nor resumed at a byte offset.
    """
    try:
        mode = path.stat().st_mode
        if stat.S_ISREG(mode):
            return path.open("rb")
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or error}") from None
    kind = next((what for test, what in FILE_KINDS if test(mode)), "a device")
    raise SourceError(
        f"{path} is {kind}, not a regular file: a CSV source is read twice (its SHA-256, then its rows) and resumed"
        " at a byte offset; save it to a file and load that"
    )


def file_state(stream: BinaryIO) -> tuple[int, int]:
    """An open file's size and modification time in nanoseconds: a write to it changes them."""
    stats = os.fstat(stream.fileno())
    return stats.st_size, stats.st_mtime_ns


def file_changed(path: Path, line: int) -> SourceError:
    """The error of a CSV file whose bytes were rewritten while a run read them, after `line` was committed."""
    return SourceError(
        f"{path} changed while it was read, after line {line:,} (a program is writing it?): the lines up to it stay"
        " loaded, and the next run reads it again"
    )


def ends_line(stream: BinaryIO, end: int) -> bool:
    """Whether the open file's first `end` bytes end with a line break (or are none)."""
    return end == 0 or os.pread(stream.fileno(), 1, end - 1) == b"\n"


def prefix_fingerprint(stream: BinaryIO, size: int) -> str:
    """sha256 of the open file's first `size` bytes as they are now ('' when it is shorter), read without moving
    the stream's position."""
    digest, offset = hashlib.sha256(), 0
    while offset < size:
        chunk = os.pread(stream.fileno(), min(1 << 20, size - offset), offset)
        if not chunk:
            return ""
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def file_fingerprint(stream: BinaryIO, path: Path) -> tuple[str, tuple[int, int]]:
    """sha256 of an open file's bytes (a checkpoint applies only to the same content) and the file_state it had
    before; SourceError when it becomes shorter meanwhile. Bytes appended meanwhile are not hashed."""
    state = file_state(stream)
    fingerprint = prefix_fingerprint(stream, state[0])
    if not fingerprint:
        raise SourceError(f"{path} became shorter while it was read (a program is writing it?); the next run reads it")
    return fingerprint, state


def time_of_undated_rows(modified_ns: int, latest: str) -> tuple[str, str | None]:
    """The observation time of a CSV row that gives none (the file's modification time, or `latest` if that is
    later), and why a row cannot take it, if it cannot: before EARLIEST (archives and build tools set 1970)."""
    try:
        modified = datetime.fromtimestamp(modified_ns / 1e9, UTC)
    except (OverflowError, ValueError, OSError):  # after 9999: later than `latest` in any case
        return latest, None
    if modified < EARLIEST:
        when = quoted(format_time(modified))
        return latest, f"observed_at: missing, and the file's modification time, taken for it, is {TOO_EARLY}: {when}"
    return min(format_time(modified), latest), None


@dataclass
class Batch:
    """Rows and rejects of one transaction, with the position they reach."""

    observations: list[tuple] = field(default_factory=list)
    rejects: list[tuple[int, str, str]] = field(default_factory=list)
    read: int = 0
    headers: list[int] = field(default_factory=list)  # lines of repeated header rows, skipped
    end: ReadPosition = field(default_factory=ReadPosition)  # where the input stands after this batch
    final: bool = False  # the input ends here
    payload: RawPage | None = None  # the upstream response the rows came from
    repeated: bool = False  # an upstream page held only listings read before in this run: paging ended there


def csv_header(reader: Iterator[list[str]], path: Path) -> list[str]:
    """The first row of a CSV file, or SourceError when there is none or it cannot be parsed."""
    try:
        return next(reader)
    except StopIteration:
        raise SourceError(f"{path} is empty: no header row") from None
    except csv.Error as error:
        raise SourceError(f"{path}: unreadable header: {csv_problem(error)}") from None


def csv_batches(
    reader: Iterator[list[str]],
    position: ReadPosition,
    layout: CsvLayout,
    default_time: str,
    batch_rows: int,
    intake: Intake,
) -> Iterator[Batch]:
    """Group parsed rows into batches, each stamped with the position it ends at.

    A repeated header (skipped) whose columns are in another order ends the batch before it, then SourceError:
    the rows after it, read in the first header's order, would mix up their fields.
    """
    batch = Batch()
    columns = layout.columns
    while True:
        first_line, offset = position.line + 1, position.offset
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            batch.read += 1
            batch.rejects.append((first_line, f"malformed CSV: {csv_problem(error)}", ""))
            continue
        if not cells or (not cells[0].strip() and not "".join(cells).strip()):  # a blank line, or ',,' of a sheet
            continue
        if layout.is_header(cells):
            if tuple(map(header_key, cells)) != layout.header:
                batch.end = ReadPosition(offset, first_line - 1)
                yield batch
                names = ", ".join(cell.strip().lstrip("\ufeff") for cell in cells[:20])
                raise SourceError(
                    f"line {first_line} repeats the header with its columns in another order ({names[:400]}): the rows"
                    " after it would be read in the first header's order; load them as a file of their own"
                )
            batch.headers.append(first_line)
            continue
        batch.read += 1
        try:
            if len(cells) != layout.width:
                raise Rejected(f"expected {layout.width} fields, got {len(cells)}")
            observation = normalise_cells([None if c is None else cells[c] for c in columns], default_time, intake)
        except Rejected as reason:
            batch.rejects.append((first_line, str(reason), raw_row(cells)))
        else:
            batch.observations.append((first_line, *msgspec.structs.astuple(observation)))
        if batch.read >= batch_rows:
            batch.end = ReadPosition(position.offset, position.line)
            yield batch
            batch = Batch()
    batch.end, batch.final = ReadPosition(position.offset, position.line), True
    yield batch


def raw_row(cells: Sequence[str]) -> str:
    """A rejected row as CSV text, cut so a hostile row cannot bloat the store."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    return out.getvalue()[:RAW_REJECT_CHARS]


@dataclass(frozen=True)
class RawPage:
    """One upstream response as received, and where it came from."""

    page: int
    fetched_at: str
    url: str
    body: bytes


MISSING = object()


def dig(record: object, path: Sequence[str]) -> object:
    """The value at `path` in nested JSON objects, or MISSING where a key is absent."""
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return MISSING
        record = record[key]
    return record


def record_cells(source: HttpSource, record: object, intake: Intake) -> list[object]:
    """One upstream record as canonical cells, counting schema drift; Rejected when it is void."""
    if not isinstance(record, dict):
        raise Rejected(f"expected a JSON object, got {json_kind(record)}")
    for key in record.keys() - source.known:
        intake.unknown[key[:60]] += 1
    for label, known in source.known_nested.items():
        nested = dig(record, label.split("."))
        if isinstance(nested, dict):
            for key in nested.keys() - known:
                intake.unknown[label + "." + key[:60]] += 1
    cells: list[object] = []
    for name in ROW_FIELDS:
        spec = source.fields.get(name)
        if spec is None:
            cells.append(source.status(record) if name == "status" else None)
            continue
        value = dig(record, spec.path)
        if value is MISSING:
            if spec.required:
                raise Rejected(f"missing required field {spec.label!r}")
            intake.missing[spec.label] += 1
            value = None
        cells.append(value)
    return cells


# float_hook=float: an out-of-range number (1e400) becomes inf, which rejects
# only its own record, instead of failing the whole response.
decode_json = msgspec.json.Decoder(float_hook=float).decode


# msgspec's words for a document that ends early, and for where it found a fault.
JSON_ENDS_EARLY = "Input data was truncated"
JSON_FAULT = re.compile(r"(?:JSON is malformed: )?(?P<what>.*?) \(byte (?P<at>\d+)\)")
# Each escape of a JSON string, left to right: a UTF-16 pair, half of one (the other half cut off upstream, as by a
# name truncated inside an emoji: valid JSON that msgspec refuses whole), or any other.
JSON_ESCAPE = re.compile(rb"\\(?:ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}|(ud[89a-f][0-9a-f]{2})|.)", re.S | re.I)


def mend_half_pairs(body: bytes) -> tuple[bytes, int]:
    """The body with each escaped half of a UTF-16 pair replaced by U+FFFD, and how many there were."""
    halves = 0

    def mend(escape: re.Match[bytes]) -> bytes:
        nonlocal halves
        if escape[1] is None:
            return escape[0]
        halves += 1
        return b"\\ufffd"

    return JSON_ESCAPE.sub(mend, body), halves


# msgspec's words for an integer longer than it reads: over 4,300 digits, CPython's own limit for int().
JSON_INTEGER_TOO_LONG = "Integer value out of range"


def long_integer(text: str) -> int | float:
    """A JSON integer as int, or one too long for int() as a float (inf: its field becomes null, as for 1e400)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def no_constant(name: str) -> object:
    """NaN, Infinity and -Infinity, which the stdlib's decoder takes: no JSON values, and msgspec refuses them."""
    raise ValueError(f"{name} is no JSON value")


def decode_long_integers(body: bytes) -> object:
    """A valid JSON document that msgspec refuses for an integer too long for it, by the stdlib's decoder."""
    return json.loads(body, parse_int=long_integer, parse_constant=no_constant)


def decode_records(body: bytes, where: str) -> list[object]:
    """The JSON array of records in a response body (UTF-8 with or without a byte-order mark, or UTF-16 or
    UTF-32 with one), or SourceError saying what came instead."""
    body = utf8_document(body, where)
    try:
        try:
            records = decode_json(body)
        except msgspec.DecodeError as error:
            mended, halves = mend_half_pairs(body)
            if str(error).startswith(JSON_INTEGER_TOO_LONG):
                records = decode_long_integers(mended)
            elif halves:
                records = decode_json(mended)
            else:
                raise
            if halves:
                log.warning("half UTF-16 pairs replaced by U+FFFD", url=where, count=halves)
    except msgspec.DecodeError as error:
        raise SourceError(f"{where}: {json_fault(body, str(error))}") from None
    except UnicodeDecodeError:  # msgspec reads the text of strings as it goes
        raise SourceError(f"{where}: {utf8_fault(body)}") from None
    except json.JSONDecodeError as error:
        at = f"at line {error.lineno}, column {error.colno}, in {len(body):,} bytes starting {printable(body[:40])!r}"
        raise SourceError(f"{where}: not valid JSON: {error.msg.lower()} {at}") from None
    except ValueError as error:  # a NaN or Infinity, which decode_long_integers refuses as msgspec does
        raise SourceError(f"{where}: not valid JSON: {error}") from None
    except RecursionError:
        raise SourceError(f"{where}: JSON nested too deeply") from None
    if not isinstance(records, list):
        raise SourceError(f"{where}: expected a JSON array of records, got {json_kind(records)}")
    return records


def json_fault(body: bytes, message: str) -> str:
    """What is wrong with a body that is not JSON, in a reader's words: where, and how it starts."""
    if not body.strip():
        return "an empty body, not JSON"
    starts = f"{len(body):,} bytes starting {printable(body[:40])!r}"
    if message == JSON_ENDS_EARLY:
        return f"not valid JSON: it ends early, in {starts}"
    fault = JSON_FAULT.fullmatch(message)
    if fault is None:
        return f"not valid JSON, in {starts}"
    at = int(fault["at"])
    line = body.count(b"\n", 0, at) + 1
    column = at - (body.rfind(b"\n", 0, at) + 1) + 1
    return f"not valid JSON: {fault['what']} at line {line}, column {column}, in {starts}"


# A page to load: the response, the record count of a full page (fewer ends
# the paging), and whether it is the last page in any case.
Page = tuple[RawPage, int | None, bool]


def fetched_pages(source: HttpSource) -> Iterator[Page]:
    """Fetch the source's requests in order."""
    client = HttpClient(source)
    for page, (url, full_page) in enumerate(source.requests(), start=1):
        body = client.get(url)  # after any wait for the rate limit
        yield RawPage(page, now(), safe_url(url), body), full_page, full_page is None


def stored_pages(conn: sqlite3.Connection, source: ReplaySource) -> Iterator[Page]:
    """The raw pages a past run stored, in the order they were fetched."""
    rows = conn.execute(
        "SELECT page, fetched_at, url FROM raw_payload WHERE source = ? AND run_id = ? ORDER BY page",
        (source.name, source.run_id),
    ).fetchall()
    if not rows:
        raise SourceError(f"no raw payload of {source.name} kept for run {source.run_id}")
    for page, fetched_at, url in rows:
        (body,) = conn.execute(
            "SELECT body FROM raw_payload WHERE source = ? AND run_id = ? AND page = ?",
            (source.name, source.run_id, page),
        ).fetchone()
        yield RawPage(page, fetched_at, url, gzip.decompress(body)), None, page == rows[-1][0]


def page_batches(upstream: HttpSource, pages: Iterator[Page], intake: Intake) -> Iterator[Batch]:
    """Normalise each page's records into one batch, stamped with the page and records reached.

    Records are numbered across pages from 1 (a reject's `line`); SourceError for a body that is
    not a JSON array of records, or an empty first page. A later page that holds only listings read
    before (an upstream that ignores `page` answers page 1 every time) is not loaded: an empty final
    batch marked `repeated` ends the paging.
    """
    run_latest, index = intake.latest, 0
    read_ids: set[str] = set()
    for raw, full_page, final in pages:
        records = decode_records(raw.body, raw.url)
        if not records and raw.page == 1:
            raise SourceError(f"{raw.url} returned no records")
        # A run can outlast its first five minutes; what was fetched then is not in the future.
        intake.latest = max(run_latest, time_after(raw.fetched_at, FUTURE_SLACK))
        batch = Batch(payload=raw)
        for record in records:
            index += 1
            batch.read += 1
            try:
                observation = normalise_cells(record_cells(upstream, record, intake), raw.fetched_at, intake)
            except Rejected as reason:
                raw_record = msgspec.json.encode(record).decode()[:RAW_REJECT_CHARS]  # whole characters
                batch.rejects.append((index, str(reason), raw_record))
            else:
                batch.observations.append((index, *msgspec.structs.astuple(observation)))
        ids = {row[STAGED_AT["source_id"]] for row in batch.observations}
        if raw.page > 1 and ids and ids <= read_ids:
            index -= batch.read
            yield Batch(end=ReadPosition(offset=raw.page - 1, line=index), final=True, repeated=True)
            return
        read_ids |= ids
        batch.end = ReadPosition(offset=raw.page, line=index)
        batch.final = final or (full_page is not None and len(records) < full_page)
        yield batch
        if batch.final:
            return


# --- normalise ------------------------------------------------------------

# The identity cells: a required field's longest length and the characters it must not hold.
TEXT_LIMITS: dict[str, tuple[int, re.Pattern[str], str]] = {
    "symbol": (32, re.compile(r"[\s\x00-\x1f\x7f]"), "a space or control character"),
    "name": (200, re.compile(r"[\x00-\x1f\x7f]"), "a control character"),
    "source_id": (200, re.compile(r"[\x00-\x1f\x7f]"), "a control character"),
}
# Each optional number: its type, and the range a plausible value lies in.
NUMBER_FIELDS: dict[str, tuple[type, float, float]] = {
    "rank": (int, 1, 100_000_000),
    "price_usd": (float, 0, 1e18),
    "market_cap_usd": (float, 0, 1e18),
    "volume_24h_usd": (float, 0, 1e18),
    "change_24h_pct": (float, -100, 1e9),
}
# Cells that mean "no value" in every field; rank 0 and market cap 0 are the upstreams' "unknown" too.
PLACEHOLDERS = frozenset(["", "n/a", "-", "\u2014", "\u2013", "?", "null", "none"])
# Every spelling of each placeholder in any case: one set lookup per cell, no casefold().
PLACEHOLDER_FORMS = frozenset(
    "".join(letters) for word in PLACEHOLDERS for letters in itertools.product(*({c, c.upper()} for c in word))
)
ZERO_IS_UNKNOWN = frozenset(["rank", "market_cap_usd"])
# One way to match each text (the dot before a fraction is not optional), so a long cell of digits and a letter
# is refused in linear time; `\d+\.?\d*`, the same language, tries each split of the digits (quadratic).
DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
FUTURE_SLACK = timedelta(minutes=5)  # clocks of upstreams and of this host disagree by a little

STATUS_WORDS = {
    "active": "active", "true": "active", "yes": "active", "1": "active", "listed": "active",
    "inactive": "inactive", "false": "inactive", "no": "inactive", "0": "inactive",
    "delisted": "inactive", "dead": "inactive",
}  # fmt: skip
EARLIEST = datetime(2009, 1, 3, tzinfo=UTC)  # the genesis block
TOO_EARLY = "before 2009-01-03, Bitcoin's genesis block"
NOT_ALNUM = re.compile(r"[\W_]+")
NOT_SLUG = re.compile(r"[^a-z0-9]+")
# Latin letters that NFKD leaves whole (no ASCII letter and marks in them), in the ASCII spelling their languages
# use for them (German, Scandinavian, Polish, Vietnamese, Icelandic, Turkish, Azerbaijani, Maltese, Sami, West
# African): slugify dropped them, so 'Straße' made 'strae', the slug of 'Strae'.
ASCII_LETTERS = str.maketrans({
    "ß": "ss", "ẞ": "SS", "ı": "i", "ȷ": "j", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ħ": "h", "Ħ": "H",
    "ŧ": "t", "Ŧ": "T", "ŋ": "ng", "Ŋ": "NG", "ĸ": "q", "ƒ": "f", "Ƒ": "F", "ə": "e", "Ə": "E", "ɛ": "e",
    "Ɛ": "E", "ɔ": "o", "Ɔ": "O", "ɨ": "i", "Ɨ": "I", "ʉ": "u", "Ʉ": "U", "ƀ": "b", "Ƀ": "B", "ɓ": "b",
    "Ɓ": "B", "ɗ": "d", "Ɗ": "D", "ƙ": "k", "Ƙ": "K", "ƴ": "y", "Ƴ": "Y",
})  # fmt: skip

Symbol = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
SourceId = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Rank = Annotated[int, Meta(ge=0, le=100_000_000)]
Usd = Annotated[float, Meta(ge=0, le=1e18)]
Pct = Annotated[float, Meta(ge=-100, le=1e9)]


class PlainRow(msgspec.Struct, array_like=True):
    """A record whose cells are all plainly valid, checked and converted by msgspec in one call.

    The fast path of normalise_cells: the same limits as TEXT_LIMITS and NUMBER_FIELDS (rank and
    market cap 0 allowed, made null after), and msgspec reads fewer number forms than read_number,
    so a record it refuses is read field by field with the same result or a precise reason.
    """

    symbol: Symbol
    name: Name
    source_id: SourceId | None = None
    rank: Rank | None = None
    price_usd: Usd | None = None
    market_cap_usd: Usd | None = None
    volume_24h_usd: Usd | None = None
    change_24h_pct: Pct | None = None
    status: str | None = None
    observed_at: str | None = None


ROW_FIELDS = PlainRow.__struct_fields__  # the canonical fields, in the order of a record's cells
assert tuple(CSV_ALIASES) == ROW_FIELDS, "CSV_ALIASES must list the fields of PlainRow in order"


class Observation(msgspec.Struct, frozen=True):
    """A normalised observation of one coin by one source, ready to load."""

    source_id: str
    symbol: str
    name: str
    name_key: str
    rank: int | None
    price_usd: float | None
    market_cap_usd: float | None
    volume_24h_usd: float | None
    change_24h_pct: float | None
    status: str
    observed_at: str


class Rejected(Exception):
    """A row failed validation; the message is the reason stored with it."""


class ValueProblem(Exception):
    """An optional value that cannot be used; `unreadable` when it is not of its field's type at all."""

    def __init__(self, problem: str, unreadable: bool = True) -> None:
        super().__init__(problem)
        self.unreadable = unreadable


# The unknown fields (or columns) a run's drift names, the most frequent first; the others share one entry, so
# records that each carry new keys (ids as keys) cannot bloat the run record, /runs, /stats and the log line.
UNKNOWN_NAMED = 50


@dataclass
class Intake:
    """How one source's records are read in one run, and the drift counted while reading them.

    A CSV row is rejected for a value that is not of its field's type; an upstream record never
    is: such a value becomes null. Either way an out-of-bounds value becomes null. Each null made
    so is counted in `drift` under the field's name in the source (`labels`) and the problem.
    """

    latest: str  # an observation after this is in the future: the run's start plus FUTURE_SLACK
    upstream: bool
    labels: Sequence[str]  # per canonical field, the name the source gives it
    drift: collections.Counter[str] = field(default_factory=collections.Counter)  # values made null
    unknown: collections.Counter[str] = field(default_factory=collections.Counter)  # fields or columns
    missing: collections.Counter[str] = field(default_factory=collections.Counter)  # fields of records
    undated: str | None = None  # why a record without a time cannot take the default time, if it cannot

    def report(self, absent: Mapping[str, str]) -> dict[str, int]:
        """The source's drift in this run: unknown and missing fields, likely renames, values made null.

        `absent` maps each name the source could have given a field it did not send to that field.
        """
        word = "field" if self.upstream else "column"
        named = dict(self.unknown.most_common(UNKNOWN_NAMED))
        report = collections.Counter({f"unknown {word} {name!r}": n for name, n in named.items()})
        if len(self.unknown) > len(named):
            more = f"{len(self.unknown) - len(named):,} more unknown {word}s, each rarer"
            report[more] = self.unknown.total() - sum(named.values())
        report.update({f"missing field {name!r}": n for name, n in self.missing.items()})
        for known, unknown, score in likely_renames(absent, named):
            report[f"likely rename {known!r} \u2192 {unknown!r} (similarity {score:.2f})"] = named[unknown]
        report.update(self.drift)
        return dict(report)

    def optional(self, index: int, value: object) -> object:
        """The value of canonical field `index` read as its type, or None (placeholder or bad value)."""
        if value is None:
            return None
        name = ROW_FIELDS[index]
        try:
            if name in NUMBER_FIELDS:
                return read_number(name, value)
            if name == "status":
                return read_status(value)
            return self.read_time(value)
        except ValueProblem as problem:
            if problem.unreadable and not self.upstream:
                raise Rejected(f"{name}: {problem}: {quoted(value)}") from None
            self.drift[f"invalid field {self.labels[index]!r}: {problem}"] += 1
            return None

    def read_time(self, value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueProblem("not a time")
        observed = parse_time(value if isinstance(value, str) else repr(value))
        if observed > self.latest:
            raise ValueProblem("in the future (later than the run's start + 5 min)")
        return observed


RENAME_CUTOFF = 0.7


def name_similarity(known: str, unknown: str) -> float:
    """0..1: the mean of difflib's ratio of two field names and of their words sorted.

    Reordered words ('price_current' for 'current_price') score half way between the two ratios. Nested names
    are compared below their common parent ('price' and 'extra' of quotes.USD), which would make up most of both.
    """
    known_parts, unknown_parts = known.split("."), unknown.split(".")
    shared = 0
    while shared < min(len(known_parts), len(unknown_parts)) - 1 and known_parts[shared] == unknown_parts[shared]:
        shared += 1
    known, unknown = ".".join(known_parts[shared:]), ".".join(unknown_parts[shared:])
    words = ["_".join(sorted(re.split(r"[_\W]+", name.casefold()))) for name in (known, unknown)]
    by_letters = difflib.SequenceMatcher(None, known.casefold(), unknown.casefold()).ratio()
    return (by_letters + difflib.SequenceMatcher(None, *words).ratio()) / 2


def likely_renames(absent: Mapping[str, str], unknown: Iterable[str]) -> list[tuple[str, str, float]]:
    """(known name, unknown name, similarity) for each unknown name that closely resembles an absent one.

    `absent` maps names to the field they give; each field and each unknown name is paired once,
    the most similar pairs first.
    """
    pairs = sorted(((name_similarity(k, u), k, u) for k in absent for u in unknown), reverse=True)
    taken: set[str] = set()
    renames = []
    for score, known, name in pairs:
        if score < RENAME_CUTOFF:
            break
        if absent[known] not in taken and name not in taken:
            taken.update((absent[known], name))
            renames.append((known, name, round(score, 2)))
    return renames


def quoted(value: object) -> str:
    """A value as a reason quotes it: text in quotes, anything else as JSON, cut to 40 characters."""
    if isinstance(value, str):
        return repr(value[:40])
    try:
        return msgspec.json.encode(value).decode()[:40]
    except (TypeError, msgspec.EncodeError):
        return type(value).__name__


def read_text(name: str, value: object) -> str:
    """A present symbol, name or source id as given, or Rejected saying why it cannot identify a coin."""
    if not isinstance(value, str):
        raise Rejected(f"{name}: not text: {quoted(value)}")
    longest, forbidden, what = TEXT_LIMITS[name]
    if len(value) > longest:
        raise Rejected(f"{name}: longer than {longest} characters: {quoted(value)}")
    if forbidden.search(value):
        raise Rejected(f"{name}: contains {what}: {quoted(value)}")
    return value


def read_number(name: str, value: object) -> int | float | None:
    """A number cell (text or JSON) as its field's type; None for the "unknown" zeros.

    ValueProblem: not a number, not finite, negative, fractional rank (unreadable), or out of the
    field's bounds (not unreadable).
    """
    kind, low, high = NUMBER_FIELDS[name]
    if isinstance(value, str):
        try:
            number = float(value)  # also reads inf and nan, refused below
        except ValueError:
            raise ValueProblem("not a number") from None
        if "_" in value:  # float() reads 1_000; a spreadsheet does not
            raise ValueProblem("not a number")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    else:
        raise ValueProblem("not a number")
    if not math.isfinite(number):
        raise ValueProblem("not finite")
    if number < 0 <= low:
        raise ValueProblem("negative, expected >= 0")
    if kind is int and not number.is_integer():
        raise ValueProblem("not a whole number")
    if number == 0 and name in ZERO_IS_UNKNOWN:
        return None
    if not low <= number <= high:
        raise ValueProblem(f"out of bounds {low:g} to {high:g}", unreadable=False)
    return int(number) if kind is int else number


def read_status(value: object) -> str:
    status = STATUS_WORDS.get(value.casefold(), "") if isinstance(value, str) else ""
    if not status:
        raise ValueProblem("expected active or inactive")
    return status


def fold_text(text: str) -> str:
    """NFKC with whitespace runs collapsed: the one text form stored."""
    return " ".join((text if text.isascii() else unicodedata.normalize("NFKC", text)).split())


def normalise_symbol(text: str) -> str:
    """Upper-case NFKC ticker, repeated to a fixed point so it stays idempotent."""
    if text.isascii():
        return text.upper()
    for _ in range(4):
        folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).upper()).strip()
        if folded == text:
            break
        text = folded
    return text


def name_key(name: str) -> str:
    """'USD Coin' and 'usd-coin' both -> 'usdcoin': names compared for identity."""
    return NOT_ALNUM.sub("", unicodedata.normalize("NFKC", name).casefold())


def made_source_id(name: str, symbol: str) -> str:
    """The source id of a CSV row that gives none: 'Bitcoin', 'BTC' -> 'bitcoin-btc'."""
    return f"{slugify(name, ' ', {}) or name_key(name)}-{symbol.lower()}"


def is_made_id(source_id: str, name: str, symbol: str) -> bool:
    """Whether a CSV listing's id is the one made for its name and symbol, in any of its name's spellings with the
    same normalised name ('usd-coin-usdc' for 'USDCoin'): a listing whose rows gave no id."""
    return NOT_ALNUM.sub("", source_id) == NOT_ALNUM.sub("", made_source_id(name, symbol))


# What the API's paths mean after /data/ (GET /data/export): an asset with such an id could not be read there.
ROUTE_WORDS = frozenset({"export"})


def slugify(text: str, mark: str = "", letters: dict[int, str] = ASCII_LETTERS) -> str:
    """ASCII slug of a name: 'Wrapped SOL' -> 'wrapped-sol', 'Pokémon' -> 'pokemon', 'Straße' -> 'strasse'; an accent
    (a combining mark once decomposed) becomes `mark`, a letter of `letters` its spelling. Source ids made for rows
    without one pass " " and no letters ('poke-mon', 'strae'), their form before accents and such letters were
    dropped, as stored listings are keyed by them."""
    if not text.isascii():
        decomposed = unicodedata.normalize("NFKD", text).translate(letters)
        spaced = "".join(ch if ch.isalnum() else mark if unicodedata.combining(ch) else " " for ch in decomposed)
        text = spaced.encode("ascii", "ignore").decode()
    return NOT_SLUG.sub("-", text.lower()).strip("-")[:64].strip("-")


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC to the second: the store's one time format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_after(stored: str, delta: timedelta) -> str:
    """A time of the store's format moved by `delta`."""
    return format_time(datetime.fromisoformat(stored) + delta)


# RFC 3339's leap second (23:59:60): the store's times are POSIX seconds, which have none, so it reads as the
# second before it, in the minute, hour and day it was observed in.
LEAP_SECOND = re.compile(r"(?<=[Tt ]\d\d:\d\d:)60(?=[.Zz+-]|$)")
# RFC 3339's date and date-time, as the API reads them (kasparro.RFC3339): seconds and offset optional (UTC when
# none). fromisoformat alone also reads ISO 8601's week dates, basic format, offsets without their colon, hours alone
# and comma fractions.
RFC3339 = re.compile(r"\d{4}-\d\d-\d\d(?:[Tt ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:[Zz]|[+-]\d\d:\d\d)?)?", re.ASCII)


@functools.lru_cache(maxsize=4096)  # snapshot rows share a few timestamps
def parse_time(text: str) -> str:
    """An RFC 3339 time, or Unix seconds or milliseconds, as the store's time format.

    A bare number is a Unix time, never an ISO date: below 1e11 seconds, else below 1e14
    milliseconds. ValueProblem for micro- or nanoseconds, unreadable text, times before EARLIEST
    and after 9999 (which no datetime holds: they must not end the run).
    """
    if DECIMAL.fullmatch(text):
        number = float(text)
        if abs(number) >= 1e14:
            raise ValueProblem(
                "a Unix time in micro- or nanoseconds, expected seconds or milliseconds"
                if math.isfinite(number)
                else "a number too large to be a time"
            )
        unit = "seconds" if abs(number) < 1e11 else "milliseconds"
        seconds = number if unit == "seconds" else number / 1000
        if seconds < EARLIEST.timestamp():
            raise ValueProblem(f"{TOO_EARLY} (read as Unix {unit})")
        return format_time(datetime.fromtimestamp(seconds, UTC))
    try:
        moment = datetime.fromisoformat(LEAP_SECOND.sub("59", text).replace("z", "Z"))
    except ValueError:
        raise ValueProblem("not an RFC 3339 time or Unix seconds or milliseconds") from None
    if not RFC3339.fullmatch(text):
        raise ValueProblem("an ISO 8601 form that is not RFC 3339, expected one like 2026-11-25T12:00:00Z")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment < EARLIEST:
        raise ValueProblem(TOO_EARLY)
    try:
        return format_time(moment)
    except OverflowError:  # 9999-12-31T23:59:59-01:00: after the last second a datetime holds
        raise ValueProblem("after 9999-12-31T23:59:59Z") from None


def normalise_cells(cells: Sequence[object], default_time: str, intake: Intake) -> Observation:
    """Read one record's cells (canonical order, None where absent) into an Observation.

    Cells are CSV text or JSON values, read the same way; a placeholder is None. Rejected when
    the symbol, name or (for an upstream) id is missing or unusable, or as `intake` decides.
    """
    values = [(None if (text := cell.strip()) in PLACEHOLDER_FORMS else text) if isinstance(cell, str) else cell
              for cell in cells]  # fmt: skip
    if isinstance(values[0], str):
        values[0] = normalise_symbol(values[0])
    if isinstance(values[1], str):
        values[1] = fold_text(values[1])
    try:
        row: PlainRow | None = msgspec.convert(values, PlainRow, strict=False)
    except msgspec.ValidationError:
        row = None
    if row is not None and (row.source_id is not None or not intake.upstream):
        symbol, name, source_id = row.symbol, row.name, row.source_id
        numbers = [row.rank or None, row.price_usd, row.market_cap_usd or None, row.volume_24h_usd, row.change_24h_pct]
    else:
        for index in (0, 1, 2) if intake.upstream else (0, 1):
            if values[index] is None:
                given = cells[index].strip() if isinstance(cells[index], str) else ""
                raise Rejected(f"{ROW_FIELDS[index]}: missing" + (f" (placeholder {given[:40]!r})" if given else ""))
        symbol, name = read_text("symbol", values[0]), read_text("name", values[1])
        source_id = None if values[2] is None else read_text("source_id", values[2])
        numbers = [intake.optional(index, values[index]) for index in range(3, 8)]
    key = name_key(name)
    if not key:
        raise Rejected(f"name: has no letters or digits: {quoted(name)}")
    rank, price, market_cap, volume, change = numbers
    status = intake.optional(8, values[8]) or "active"
    observed_at = intake.optional(9, values[9])
    if observed_at is None and intake.undated:
        raise Rejected(intake.undated)
    return Observation(
        source_id=fold_text(source_id) if source_id else made_source_id(name, symbol),
        symbol=symbol,
        name=name,
        name_key=key,
        rank=rank,  # type: ignore[arg-type]
        price_usd=price,  # type: ignore[arg-type]
        market_cap_usd=market_cap,  # type: ignore[arg-type]
        volume_24h_usd=volume,  # type: ignore[arg-type]
        change_24h_pct=change,  # type: ignore[arg-type]
        status=status,  # type: ignore[arg-type]
        observed_at=observed_at or default_time,  # type: ignore[arg-type]
    )


def observation_cells(observation: Observation) -> list[str | None]:
    """The observation written back as CSV cells in canonical order (the inverse of normalise)."""
    values = msgspec.structs.asdict(observation)
    return [None if values[name] is None else str(values[name]) for name in ROW_FIELDS]


# --- load -----------------------------------------------------------------

STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    line INTEGER PRIMARY KEY, source_id TEXT, symbol TEXT, name TEXT, name_key TEXT,
    rank INTEGER, price_usd REAL, market_cap_usd REAL, volume_24h_usd REAL,
    change_24h_pct REAL, status TEXT, observed_at TEXT, asset_id TEXT, fresh INTEGER NOT NULL DEFAULT 0,
    listing_id INTEGER
);
CREATE TEMP TABLE IF NOT EXISTS assigned (source_id TEXT PRIMARY KEY, asset_id TEXT NOT NULL);
CREATE TEMP TABLE IF NOT EXISTS observed (
    listing_id INTEGER, observed_at INTEGER, price_usd REAL, market_cap_usd REAL, volume_24h_usd REAL,
    PRIMARY KEY (listing_id, observed_at)
) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS late (
    listing_id INTEGER, observed_at INTEGER, price_usd REAL, market_cap_usd REAL, volume_24h_usd REAL,
    hourly INTEGER NOT NULL
);
CREATE TEMP TABLE IF NOT EXISTS opening (listing_id INTEGER PRIMARY KEY, t INTEGER NOT NULL);
"""

# A staged row: its line, then the Observation's fields (INSERT_STAGING's order); where each field sits in it.
STAGED_AT = {name: 1 + at for at, name in enumerate(Observation.__struct_fields__)}
INSERT_STAGING = """
INSERT INTO temp.staging (line, source_id, symbol, name, name_key, rank, price_usd, market_cap_usd,
                          volume_24h_usd, change_24h_pct, status, observed_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Identity, step 0 (a CSV source): each staged source id with no listing yet, in the order of its first line, with
# every listing of the source that has its symbol and normalised name, and whether the batch names that listing too.
SAME_COIN_LISTINGS = """
SELECT s.source_id, s.symbol, s.name, m.source_id, m.symbol, m.name, m.source_id IN (SELECT source_id FROM temp.staging)
FROM (SELECT source_id, symbol, name, name_key, min(line) AS first FROM temp.staging GROUP BY source_id) s
JOIN source_map m ON m.symbol = s.symbol AND m.name_key = s.name_key AND m.source = ?1
WHERE NOT EXISTS (SELECT 1 FROM source_map o WHERE o.source = ?1 AND o.source_id = s.source_id)
  AND NOT EXISTS (SELECT 1 FROM listing l WHERE l.source = ?1 AND l.source_id = s.source_id)
ORDER BY s.first, m.source_id
"""

# Identity, step 1: the source's own id, through the mapping table.
MATCH_BY_SOURCE_ID = """
UPDATE temp.staging SET asset_id = (
    SELECT m.asset_id FROM source_map m WHERE m.source = ?1 AND m.source_id = staging.source_id)
"""

# Identity, step 2: the same symbol and normalised name, on an asset with no listing of this
# source yet (two ids of one source are two coins). Each unmatched source id, in the order of its
# first line, with every such asset; a source id's symbol and name are those of its first line.
JOIN_CANDIDATES = """
SELECT s.source_id, m.asset_id
FROM (SELECT source_id, symbol, name_key, min(line) AS first FROM temp.staging
      WHERE asset_id IS NULL GROUP BY source_id) s
JOIN source_map m ON m.symbol = s.symbol AND m.name_key = s.name_key
WHERE NOT EXISTS (SELECT 1 FROM source_map o WHERE o.asset_id = m.asset_id AND o.source = ?1)
GROUP BY s.source_id, m.asset_id
ORDER BY min(s.first), m.asset_id
"""

# Identity, step 3: each source id still unmatched is a new coin.
UNMATCHED = """
SELECT source_id, symbol, name_key, name FROM temp.staging WHERE asset_id IS NULL
GROUP BY source_id ORDER BY min(line)
"""

ASSIGN = """
UPDATE temp.staging SET fresh = ?1, asset_id = (
    SELECT a.asset_id FROM temp.assigned a WHERE a.source_id = staging.source_id)
WHERE asset_id IS NULL
"""

TAKEN_IDS = "SELECT asset_id FROM asset WHERE asset_id IN (SELECT value FROM json_each(?1))"

# The listing's quote moves only forward in time, except from a time in the future (?2: the run's
# start + 5 min), which only a store loaded before such times were refused can hold; its asset
# never changes here.
UPSERT_LISTINGS = """
INSERT INTO source_map (source, source_id, asset_id, symbol, name, name_key, rank, price_usd,
                        market_cap_usd, volume_24h_usd, change_24h_pct, status, observed_at)
SELECT ?1, source_id, asset_id, symbol, name, name_key, rank, price_usd,
       market_cap_usd, volume_24h_usd, change_24h_pct, status, observed_at
FROM temp.staging WHERE true ORDER BY line
ON CONFLICT (source, source_id) DO UPDATE SET
    symbol = excluded.symbol, name = excluded.name, name_key = excluded.name_key,
    rank = excluded.rank, price_usd = excluded.price_usd, market_cap_usd = excluded.market_cap_usd,
    volume_24h_usd = excluded.volume_24h_usd, change_24h_pct = excluded.change_24h_pct,
    status = excluded.status, observed_at = excluded.observed_at
WHERE source_map.observed_at IS NULL OR excluded.observed_at > source_map.observed_at
   OR source_map.observed_at > ?2
"""

# History (store.sql: history): each listing's integer key, then its new observations, the candles
# they fall in, and what its retention lets go.
INSERT_LISTING_KEYS = """
INSERT OR IGNORE INTO listing (source, source_id) SELECT ?1, source_id FROM temp.staging WHERE true ORDER BY line
"""

STAGE_LISTING_KEYS = """
UPDATE temp.staging SET listing_id = (
    SELECT l.listing_id FROM listing l WHERE l.source = ?1 AND l.source_id = staging.source_id)
"""

# Every staged observation but the lines of ?1 (a JSON array: late ones in conflict with a candle), even one older
# than its listing's raw history (late: it waits there for prune_history, which rolls it up or drops it).
INSERT_OBSERVATIONS = """
INSERT OR IGNORE INTO raw_observation (listing_id, observed_at, rank, price_usd, market_cap_usd,
                                       volume_24h_usd, change_24h_pct, active)
SELECT listing_id, CAST(strftime('%s', observed_at) AS INTEGER), rank, price_usd, market_cap_usd, volume_24h_usd,
       change_24h_pct, status = 'active'
FROM temp.staging WHERE line NOT IN (SELECT value FROM json_each(?1)) ORDER BY line
RETURNING listing_id, observed_at, price_usd, market_cap_usd, volume_24h_usd
"""

# Staged observations whose listing holds one at the same second with other values, loaded first by an earlier
# line, batch or run (INSERT_OBSERVATIONS kept it and ignored these). Every staged row within raw retention
# meets its stored twin here: itself, or the one loaded first.
# Staged rows whose values differ from the stored observation of their listing and second, and the rows of ?1 (a
# JSON array of lines: those under another symbol or name than the batch's first row of that listing and second).
CONFLICTS = """
SELECT s.line, s.source_id, s.observed_at, s.symbol, s.name,
       r.rank, r.price_usd, r.market_cap_usd, r.volume_24h_usd, r.change_24h_pct, r.active,
       s.rank, s.price_usd, s.market_cap_usd, s.volume_24h_usd, s.change_24h_pct, s.status = 'active'
FROM temp.staging s
JOIN raw_observation r ON r.listing_id = s.listing_id
                      AND r.observed_at = CAST(strftime('%s', s.observed_at) AS INTEGER)
WHERE r.rank IS NOT s.rank OR r.price_usd IS NOT s.price_usd OR r.market_cap_usd IS NOT s.market_cap_usd
   OR r.volume_24h_usd IS NOT s.volume_24h_usd OR r.change_24h_pct IS NOT s.change_24h_pct
   OR r.active IS NOT (s.status = 'active') OR s.line IN (SELECT value FROM json_each(?1))
ORDER BY s.line
"""

# Late staged observations (older than their listing's raw history) at the second of their narrowest kept candle's
# first or last observation, with other values than the candle keeps of it: the price (open, close) and, of the
# last, market cap and volume; CONFLICTS' columns, the values a candle does not keep taken from the row itself.
LATE_CONFLICTS = """
SELECT s.line, s.source_id, s.observed_at, s.symbol, s.name,
       s.rank, iif(o.observed = c.first_at, c.open, c.close),
       iif(o.observed = c.last_at, c.market_cap_usd, s.market_cap_usd),
       iif(o.observed = c.last_at, c.volume_24h_usd, s.volume_24h_usd), s.change_24h_pct, s.status = 'active',
       s.rank, s.price_usd, s.market_cap_usd, s.volume_24h_usd, s.change_24h_pct, s.status = 'active'
FROM (SELECT s.line, CAST(strftime('%s', s.observed_at) AS INTEGER) AS observed,
             iif(CAST(strftime('%s', s.observed_at) AS INTEGER) >= l.hourly_before, 3600, 86400) AS width
      FROM temp.staging s JOIN listing l ON l.listing_id = s.listing_id WHERE observed < l.raw_before) o
JOIN temp.staging s ON s.line = o.line
JOIN candle c ON c.listing_id = s.listing_id AND c.width = o.width AND c.t = o.observed / o.width * o.width
WHERE (o.observed = c.first_at AND c.open IS NOT s.price_usd)
   OR (o.observed = c.last_at AND (c.close IS NOT s.price_usd OR c.market_cap_usd IS NOT s.market_cap_usd
                                   OR c.volume_24h_usd IS NOT s.volume_24h_usd))
ORDER BY s.line
"""

COMPARED = ("rank", "price_usd", "market_cap_usd", "volume_24h_usd", "change_24h_pct", "status")


def renamed_rows(observations: list[tuple]) -> dict[int, tuple[str, str]]:
    """Staged rows (INSERT_STAGING's tuples) by line that give a listing and second an earlier row of the batch
    gave under another symbol or name, each with that first row's symbol and name, which the listing takes. The
    history keeps no symbol or name (they are the listing's identity), so only rows of one batch are compared."""
    listing_second = operator.itemgetter(STAGED_AT["source_id"], STAGED_AT["observed_at"])
    if len(set(map(listing_second, observations))) == len(observations):
        return {}  # no listing and second twice: the usual batch, checked without a Python loop
    identity = operator.itemgetter(STAGED_AT["symbol"], STAGED_AT["name"])
    firsts: dict[tuple[str, str], tuple] = {}
    renamed = {}
    for row in observations:
        first = firsts.setdefault(listing_second(row), row)
        if identity(first) != identity(row):
            renamed[row[0]] = identity(first)
    return renamed


def shown(field: str, value: object) -> object:
    """A stored or staged value as a conflict's reject names it: the status by its word."""
    if field == "status":
        return "active" if value else "inactive"
    return value


# Observations older than their listing's pruned raw history (a backfill loaded after newer data, {rows} with its
# listing l): their day is kept as candles only. Of those with a price, the ones that are new: their time lies
# outside the span of their narrowest kept candle (hourly while its day's hourly candles are kept, else daily), or
# there is no such candle; each then joins its daily candle, and its hourly one while kept. One inside the span is
# taken for one loaded before: a candle cannot tell (README, History). The late rows of a load wait in
# raw_observation and are judged together in prune_history, against the candles as the load found them, so their
# order does not matter.
NEW_LATE_ROWS = """
SELECT o.listing_id, o.observed_at, o.price_usd, o.market_cap_usd, o.volume_24h_usd, o.width = 3600
FROM (SELECT r.listing_id, r.observed_at, r.price_usd, r.market_cap_usd, r.volume_24h_usd,
             iif(r.observed_at >= l.hourly_before, 3600, 86400) AS width
      FROM {rows} WHERE r.observed_at < l.raw_before AND r.price_usd IS NOT NULL) o
LEFT JOIN candle c ON c.listing_id = o.listing_id AND c.width = o.width AND c.t = o.observed_at / o.width * o.width
WHERE c.listing_id IS NULL OR o.observed_at NOT BETWEEN c.first_at AND c.last_at
"""
# How many of a batch's new raw rows are late and new (counted loaded; prune_history rolls them up).
COUNT_NEW_LATE = f"""
SELECT count(*) FROM ({NEW_LATE_ROWS.format(rows="temp.observed r JOIN listing l ON l.listing_id = r.listing_id")})
"""
# How many of a batch's new raw rows are late, and how many of those have no price (candles keep priced ones only).
COUNT_LATE = """
SELECT count(*), count(*) - count(r.price_usd) FROM temp.observed r JOIN listing l ON l.listing_id = r.listing_id
WHERE r.observed_at < l.raw_before
"""
# The batch's new raw rows within their listing's raw history: those its candles take now.
NOT_LATE = """
DELETE FROM temp.observed WHERE observed_at < (SELECT raw_before FROM listing WHERE listing_id = observed.listing_id)
"""
# The listings that have late rows, with where their raw history starts: a seek for each listing (late rows of a
# source other than the one just loaded are those a killed run left). Then their late rows that are new (?1: a JSON
# array of those listings).
LATE_LISTINGS = """
SELECT l.listing_id, l.raw_before FROM listing l
WHERE EXISTS (SELECT 1 FROM raw_observation r WHERE r.listing_id = l.listing_id AND r.observed_at < l.raw_before)
"""
STAGE_LATE = "INSERT INTO temp.late " + NEW_LATE_ROWS.format(
    rows="listing l JOIN raw_observation r ON r.listing_id = l.listing_id AND r.observed_at < l.raw_before"
    " AND l.listing_id IN (SELECT value FROM json_each(?1))"
)

# Each new observation joins its candle of width ?1, by store.sql's candle rule: in open_candle when it lies in
# its listing's open bucket, else in candle.
ROLL_UP_ROWS = """
INSERT INTO {table} (listing_id, width, t, open, high, low, close, market_cap_usd, volume_24h_usd,
                     observations, first_at, last_at)
SELECT r.listing_id, ?1, r.observed_at / ?1 * ?1, r.price_usd, r.price_usd, r.price_usd, r.price_usd,
       r.market_cap_usd, r.volume_24h_usd, 1, r.observed_at, r.observed_at
FROM {rows}
WHERE r.price_usd IS NOT NULL{also}
ON CONFLICT {key} DO UPDATE SET
    open = iif(excluded.first_at < first_at, excluded.open, open),
    high = max(high, excluded.high),
    low = min(low, excluded.low),
    close = iif(excluded.last_at > last_at, excluded.close, close),
    market_cap_usd = iif(excluded.last_at > last_at, excluded.market_cap_usd, market_cap_usd),
    volume_24h_usd = iif(excluded.last_at > last_at, excluded.volume_24h_usd, volume_24h_usd),
    observations = observations + 1,
    first_at = min(first_at, excluded.first_at),
    last_at = max(last_at, excluded.last_at)
"""
NEW_ROWS = "temp.observed r"  # the batch's new observations, with what their candles take
CANDLE_KEY, OPEN_KEY = "(listing_id, width, t)", "(listing_id, width)"

# The bucket of width ?1 each listing of the batch has open once it is stored: the newest of its open one and
# its new priced observations'.
STAGE_OPENING = f"""
INSERT INTO temp.opening (listing_id, t)
SELECT r.listing_id,
       max(max(r.observed_at / ?1 * ?1),
           coalesce((SELECT o.t FROM open_candle o WHERE o.listing_id = r.listing_id AND o.width = ?1), 0))
FROM {NEW_ROWS} WHERE r.price_usd IS NOT NULL GROUP BY r.listing_id
"""

# An open candle whose bucket a new observation has passed is closed: it moves to candle (which holds no candle
# of that bucket: only buckets older than the open one go there). CROSS JOIN keeps the batch's listings outermost,
# a seek into open_candle each: the planner, which knows no table's size, would scan open_candle.
CLOSE_CANDLES = """
INSERT INTO candle SELECT o.* FROM temp.opening g CROSS JOIN open_candle o
WHERE o.listing_id = g.listing_id AND o.width = ?1 AND o.t < g.t
"""
DROP_CLOSED = """
DELETE FROM open_candle WHERE width = ?1 AND listing_id IN (
    SELECT g.listing_id FROM temp.opening g CROSS JOIN open_candle o
    WHERE o.listing_id = g.listing_id AND o.width = ?1 AND o.t < g.t)
"""
ROLL_UP_OPEN = ROLL_UP_ROWS.format(
    table="open_candle", key=OPEN_KEY, rows=f"{NEW_ROWS} JOIN temp.opening g ON g.listing_id = r.listing_id",
    also=" AND r.observed_at / ?1 * ?1 = g.t",
)  # fmt: skip
ROLL_UP = ROLL_UP_ROWS.format(
    table="candle", key=CANDLE_KEY, rows=f"{NEW_ROWS} JOIN temp.opening g ON g.listing_id = r.listing_id",
    also=" AND r.observed_at / ?1 * ?1 < g.t",
)  # fmt: skip
# Late observations lie before their listing's raw history, so before its open buckets too.
ROLL_UP_LATE = ROLL_UP_ROWS.format(
    table="candle", key=CANDLE_KEY, rows="temp.late r", also=" AND (?1 = 86400 OR r.hourly)"
)  # daily: every one

CLOSE_STALE = "INSERT INTO candle SELECT * FROM open_candle WHERE listing_id = ?1 AND t < ?2"

# The store's clock, in Unix seconds: its newest observation, the newest of its listings' quotes (each one's latest
# observation) up to the run's limit (?1: its start + 5 min), never one dated in the future (loaded before such times
# were refused), which would prune everything current. A scan of source_map.
STORE_CLOCK = "SELECT CAST(strftime('%s', max(observed_at)) AS INTEGER) FROM source_map WHERE observed_at <= ?1"

# The raw and hourly horizons of the store's clock (?1) by KEEP_RAW (?2) and KEEP_HOURLY (?3), in Unix seconds.
HORIZONS = "SELECT (?1 - ?2) / 86400 * 86400, (?1 - ?3) / 86400 * 86400"
# Every listing whose retention horizons move (once a UTC day) to HORIZONS: loaded in this run or not (a source no
# longer loaded, a coin no longer listed). A scan of listing. MOVED_HORIZONS returns each one's new horizons.
ADVANCE_HORIZONS = """
UPDATE listing SET raw_before = max(raw_before, (?1 - ?2) / 86400 * 86400),
                   hourly_before = max(hourly_before, (?1 - ?3) / 86400 * 86400)
WHERE (?1 - ?2) / 86400 * 86400 > raw_before OR (?1 - ?3) / 86400 * 86400 > hourly_before
"""
MOVED_HORIZONS = ADVANCE_HORIZONS + "RETURNING listing_id, raw_before, hourly_before\n"


UNIFIED_COLUMNS = ("symbol", "name", "rank", "price_usd", "market_cap_usd", "volume_24h_usd",
                   "change_24h_pct", "status", "sources", "updated_at")  # fmt: skip

# A coin first seen in this batch, in one row: its unified record is that row.
INSERT_FRESH_ASSETS = """
INSERT INTO asset (asset_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd,
                   change_24h_pct, status, sources, updated_at)
SELECT asset_id, symbol, name, rank, price_usd, market_cap_usd, volume_24h_usd,
       change_24h_pct, status, json_array(?1), observed_at
FROM temp.staging WHERE fresh GROUP BY asset_id HAVING count(*) = 1
"""

# Every other asset of the batch is unified from all its listings, newest first; a listing dated
# in the future (?1, as above) comes after every other, so current quotes win over it.
TOUCHED_LISTINGS = """
SELECT m.asset_id, m.source, m.symbol, m.name, m.rank, m.price_usd, m.market_cap_usd,
       m.volume_24h_usd, m.change_24h_pct, m.status, m.observed_at, m.pinned
FROM source_map m
WHERE m.asset_id IN (SELECT asset_id FROM temp.staging WHERE NOT fresh
                     UNION ALL
                     SELECT asset_id FROM temp.staging WHERE fresh GROUP BY asset_id HAVING count(*) > 1)
  AND m.observed_at IS NOT NULL
ORDER BY m.asset_id, m.observed_at > ?1, m.observed_at DESC, m.source, m.source_id
"""

# Unchanged rows are not rewritten, so their index entries stay put.
UPSERT_ASSET = f"""
INSERT INTO asset (asset_id, {", ".join(UNIFIED_COLUMNS)}) VALUES ({", ".join("?" * 11)})
ON CONFLICT (asset_id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in UNIFIED_COLUMNS)}
WHERE ({", ".join(f"asset.{c}" for c in UNIFIED_COLUMNS)})
      IS NOT ({", ".join(f"excluded.{c}" for c in UNIFIED_COLUMNS)})
"""

ASSET_INDEXES = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'asset' AND sql IS NOT NULL"


@functools.cache
def schema_indexes(table: str = r"\w+") -> dict[str, str]:
    """The CREATE INDEX statements of store.sql (for one table, or all), by index name."""
    pattern = re.compile(rf"^CREATE INDEX IF NOT EXISTS (\w+) ON {table} \(.*?\);", re.M | re.S)
    return {match.group(1): match.group(0) for match in pattern.finditer(SCHEMA_PATH.read_text())}


def sort_indexes() -> dict[str, str]:
    """The CREATE INDEX statements of store.sql for table asset, by index name."""
    return schema_indexes("asset")


def restore_indexes(conn: sqlite3.Connection, event: str = "indexes restored") -> list[str]:
    """Create every index of store.sql that the store lacks, logging `event` with their names; return them.

    A load into an empty store drops the sort indexes and builds them when it ends ('indexes built'); one
    that was killed leaves them to the next run, which calls this first ('indexes restored').
    """
    present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    missing = {name: sql for name, sql in schema_indexes().items() if name not in present}
    if missing:
        with transaction(conn):
            for statement in missing.values():
                conn.execute(statement)
        log.info(event, indexes=sorted(missing))
    return sorted(missing)


def future_limit(conn: sqlite3.Connection, run_id: int) -> str:
    """The latest observation time a run accepts: its start plus FUTURE_SLACK."""
    (started,) = conn.execute("SELECT started_at FROM etl_run WHERE run_id = ?", (run_id,)).fetchone()
    return time_after(started, FUTURE_SLACK)


def unify(listings: Sequence[Sequence]) -> tuple:
    """One asset's unified record from its listings, newest first.

    Symbol, name and status come from the newest listing not pinned by hand
    (a pin says which asset a listing is, not what the asset is called); each
    number from the newest listing that has one; `sources` lists every source.
    """
    newest = next((row for row in listings if not row[11]), listings[0])
    numbers = [next((row[i] for row in listings if row[i] is not None), None) for i in range(4, 9)]
    sources = json.dumps(sorted({row[1] for row in listings}), separators=(",", ":"))
    return (newest[0], newest[2], newest[3], *numbers, newest[9], sources, listings[0][10])


@dataclass
class Tally:
    """Rows read, loaded (new observations) and rejected."""

    read: int = 0
    loaded: int = 0
    rejected: int = 0

    def add(self, other: Tally) -> None:
        self.read += other.read
        self.loaded += other.loaded
        self.rejected += other.rejected


@dataclass(frozen=True)
class Loaded:
    """How one source's load went: rows counted, a note for its run record, its schema drift."""

    tally: Tally
    detail: str | None = None  # e.g. 'unchanged since run 3'
    drift: dict[str, int] = field(default_factory=dict)  # what was counted -> how often
    oldest: float | None = None  # Loader.oldest


def store_uri(db: Path) -> str:
    """An SQLite URI of the file at `db`: '?', '#' and '%' in its path are escaped, which a URI would read."""
    return f"file:{urllib.parse.quote(str(db.resolve()))}"


def connect(db: Path, busy_timeout: float) -> sqlite3.Connection:
    """A writer connection in autocommit mode; transactions are explicit.

    Another process's write transaction is waited for up to `busy_timeout`
    seconds, then the statement fails with "database is locked": the run
    fails clearly instead of hanging. The store is opened by a URI of its path, as the API opens it, so that
    any path is one file: given plainly, ':memory:' would be SQLite's in-memory database.
    """
    conn = sqlite3.connect(store_uri(db), uri=True, isolation_level=None, timeout=busy_timeout)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -16384")  # 16 MB: more only held memory in the 1M-row benchmark
    # Checkpoints shrink the WAL back to this size, however long readers held it.
    conn.execute("PRAGMA journal_size_limit = 67108864")
    return conn


# The system errors that mean the same as an SQLite result code, for files beside the store.
OS_FAULTS = {errno.ENOSPC: sqlite3.SQLITE_FULL, errno.EDQUOT: sqlite3.SQLITE_FULL, errno.EROFS: sqlite3.SQLITE_READONLY,
             errno.EACCES: sqlite3.SQLITE_PERM, errno.EPERM: sqlite3.SQLITE_PERM}  # fmt: skip


def store_fault(error: sqlite3.Error | OSError, config: EtlConfig) -> str:
    """An error of the store (or of a file beside it) in an operator's words, the original message beside it.

    SQLite's result code (or errno) says the class: full, read-only, locked, corrupt; for an
    I/O error the store's filesystem is asked whether it is full or read-only. An error of
    no known class is given as its type and message.
    """
    if isinstance(error, OSError):
        code, original = OS_FAULTS.get(error.errno or 0, 0), str(error)
    else:  # an extended result code's low byte is its class
        code, original = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF, f"SQLite: {error}"
    if code == sqlite3.SQLITE_IOERR:
        code = filesystem_fault(config.db) or code
    db = config.db
    causes = {
        sqlite3.SQLITE_FULL: f"the disk holding {db} is full: free space, then run again",
        sqlite3.SQLITE_READONLY: f"the store {db} is read-only: make it and its directory writable for the ETL",
        sqlite3.SQLITE_PERM: f"the ETL's user may not open {db} or a file beside it: let that user read and write"
        " the store and its directory",
        sqlite3.SQLITE_BUSY: f"the store {db} is locked by another writer for longer than KASPARRO_BUSY_TIMEOUT"
        f" ({config.busy_timeout:g} s): end that process, or raise the timeout",
        sqlite3.SQLITE_CORRUPT: f"the store {db} is corrupt: restore it from a backup, or move it away to load anew",
        sqlite3.SQLITE_IOERR: f"the disk holding {db} failed a read or write",
        sqlite3.SQLITE_CANTOPEN: f"the store {db} cannot be opened: check that it and its directory exist and that"
        " the ETL's user may read and write them",
    }
    causes[sqlite3.SQLITE_LOCKED] = causes[sqlite3.SQLITE_BUSY]
    causes[sqlite3.SQLITE_NOTADB] = causes[sqlite3.SQLITE_CORRUPT]
    cause = causes.get(code)
    return f"{cause} ({original})" if cause else f"{type(error).__name__}: {error}"


def filesystem_fault(db: Path) -> int | None:
    """SQLITE_FULL or SQLITE_READONLY when the filesystem holding `db` is full or mounted read-only."""
    try:
        stats = os.statvfs(db.parent)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return sqlite3.SQLITE_READONLY
    return sqlite3.SQLITE_FULL if stats.f_bavail == 0 else None


@contextlib.contextmanager
def cleanup(step: str) -> Iterator[None]:
    """A step that tidies up after a failure: its own error is logged, never raised over the failure's."""
    try:
        yield
    except (sqlite3.Error, OSError) as error:
        log.warning("cleanup failed", step=step, error=f"{type(error).__name__}: {error}")


def rollback(conn: sqlite3.Connection) -> None:
    """Undo the open transaction, unless SQLite already has (it does on a full disk or an I/O error)."""
    if conn.in_transaction:
        with cleanup("rollback"):
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE, COMMIT when the block ends, ROLLBACK when it raises: every write of the ETL but the schema
    script's (apply_schema) is in one of these.

    Each commit writes page 1. A follower copy (deploy/litestream/follow) gets a commit's pages written in place in
    the rollback journal's mode, where a reader sees that the file changed only by page 1's change counter (which
    Litestream renews when it writes page 1): a commit without page 1 would be read through stale cached pages,
    mixed with new ones. SQLite writes page 1 in WAL mode only when a commit changes it (a new page, a schema
    change), so every transaction sets the application id, which lives there, to what it is.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        (application_id,) = conn.execute("PRAGMA application_id").fetchone()
        conn.execute(f"PRAGMA application_id = {int(application_id)}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def apply_schema(conn: sqlite3.Connection) -> None:
    """Create the store, or check that an existing one has a version this ETL knows."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(f"store schema version {version} is newer than this etl.py ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA_PATH.read_text()}\nCOMMIT;")
    if conn.execute("SELECT 1 FROM store_meta WHERE id = 1").fetchone() is None:
        with transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO store_meta (id, store_id, generation, committed_at) VALUES (1, ?, 0, ?)",
                (uuid.uuid4().hex[:12], now()),
            )
    restore_indexes(conn)
    conn.executescript(STAGING_DDL)


def now() -> str:
    return format_time(datetime.now(UTC))


def new_generation(conn: sqlite3.Connection) -> None:
    """Mark the open transaction's writes as a new data version (what the API's kept answers are keyed by)."""
    conn.execute("UPDATE store_meta SET generation = generation + 1, committed_at = ? WHERE id = 1", (now(),))


def prune_history(conn: sqlite3.Connection, run_id: int, retention: Retention, oldest: float | None = None) -> None:
    """Move every listing's retention horizons to the store's clock (STORE_CLOCK) and prune what they pass, in one
    transaction (store.sql: history), after rolling up the late rows that are new (NEW_LATE_ROWS). Once a source's
    load, not a batch's: every row a run loads is kept raw or rolled up as late by the horizons and candles the load
    found, whatever the order of its rows. Every listing, loaded by the run or not, so a listing no run loads any
    more is rolled up as the store moves on; the work is a seek for each listing, however long the history.
    Idempotent: what a killed run left undone, the next run does. `oldest` (Loader.oldest), when given, is the
    earliest time in the store's history: horizons that pass none of it move without a seek for each listing."""
    with transaction(conn):
        pruned = dict(conn.execute(LATE_LISTINGS).fetchall())
        late = 0
        if pruned:
            conn.execute("DELETE FROM temp.late")
            late = conn.execute(STAGE_LATE, (json.dumps(list(pruned)),)).rowcount
            for width in (HOUR, DAY):
                conn.execute(ROLL_UP_LATE, (width,))
        (clock,) = conn.execute(STORE_CLOCK, (future_limit(conn, run_id),)).fetchone()
        spans = (clock, retention.raw, retention.hourly)
        if clock is None:  # nothing observed yet: no horizon to move
            moved, advanced = [], 0
        elif oldest is not None and max(conn.execute(HORIZONS, spans).fetchone()) <= oldest:
            # Nothing lies before the new horizons: no raw row, open or hourly candle goes.
            moved, advanced = [], conn.execute(ADVANCE_HORIZONS, spans).rowcount
        else:
            moved, advanced = conn.execute(MOVED_HORIZONS, spans).fetchall(), 0
        raw_starts = [m[:2] for m in moved]  # (listing_id, raw_before)
        pruned.update(raw_starts)
        conn.executemany("DELETE FROM raw_observation WHERE listing_id = ? AND observed_at < ?", pruned.items())
        # An open candle older than the raw history (its listing's prices stopped) is closed: every candle
        # a moment before the raw history reads is in candle.
        conn.executemany(CLOSE_STALE, raw_starts)
        conn.executemany("DELETE FROM open_candle WHERE listing_id = ? AND t < ?", raw_starts)
        conn.executemany(
            f"DELETE FROM candle WHERE listing_id = ? AND width = {HOUR} AND t < ?", [(m[0], m[2]) for m in moved]
        )
        if moved or advanced or late:
            new_generation(conn)


class Loader:
    """Writes batches of one source: identity, listings, history, unified assets, checkpoint.

    Used as a context manager: however the load ends, except by a signal, the indexes it dropped
    are built again when it does (a killed load leaves them to the next run's restore_indexes).
    """

    def __init__(self, conn: sqlite3.Connection, run_id: int, source: str) -> None:
        self.conn = conn
        self.run_id = run_id
        self.source = source
        self.latest = future_limit(conn, run_id)
        self.rejected = 0  # in this run, committed: each counted, the first REJECTS_KEPT stored
        # Late rows (older than their listing's raw history) read, not loaded, in this run, committed: inside the
        # span of their kept candle (NEW_LATE_ROWS) and without a price; and the pending batch's.
        self.late_inside = self.late_unpriced = 0
        self.pending = (0, 0)
        # Into an empty store, the sort indexes are dropped and built once at
        # the end: random inserts into eight indexes would otherwise rewrite
        # most of their pages at every commit. Nothing is served from an empty
        # store meanwhile.
        indexes = {row[0] for row in conn.execute(ASSET_INDEXES)}
        self.bulk = not conn.execute("SELECT 1 FROM asset LIMIT 1").fetchone() or indexes != set(sort_indexes())
        # Into a store with no history yet (so every listing's horizons are 0 while it loads), the earliest
        # observation stored (Unix seconds; inf before the first), for prune_history; None into any other store.
        history = ("listing", "raw_observation", "candle", "open_candle")
        empty = not any(conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in history)
        self.oldest: float | None = math.inf if empty else None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> None:
        if not self.bulk or (kind is not None and (kind is Interrupted or not issubclass(kind, Exception))):
            return  # SIGTERM or ^C: stop now; the next run builds them
        try:
            restore_indexes(self.conn, "indexes built")
        except sqlite3.Error as failure:
            if error is None:
                raise
            # The load's own error is the one to report; the next run builds the indexes.
            log.warning("indexes not rebuilt", error=f"{type(failure).__name__}: {failure}")

    def commit(
        self, batch: Batch, fingerprint: str, position: ReadPosition, complete: bool, raw: RawPage | None = None
    ) -> int:
        """Apply one batch, its checkpoint and raw payload in one transaction; return new observations. An
        observation that conflicts with one loaded first joins batch.rejects (Loader._conflicts)."""
        conn = self.conn
        self.pending = (0, 0)
        with transaction(conn):
            if self.bulk:
                for (name,) in conn.execute(ASSET_INDEXES).fetchall():
                    conn.execute(f'DROP INDEX "{name}"')
            loaded = self._load(batch.observations, batch.rejects) if batch.observations else 0
            stored = batch.rejects[: max(REJECTS_KEPT - self.rejected, 0)]
            conn.executemany(
                "INSERT OR IGNORE INTO reject (run_id, source, line, reason, raw) VALUES (?, ?, ?, ?, ?)",
                [(self.run_id, self.source, line, reason, raw) for line, reason, raw in stored],
            )
            if raw is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO raw_payload (run_id, source, page, fetched_at, url, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (self.run_id, self.source, raw.page, raw.fetched_at, raw.url, gzip.compress(raw.body, 6)),
                )
            conn.execute(
                "INSERT INTO checkpoint (source, fingerprint, position, line, complete, run_id, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
                " fingerprint = excluded.fingerprint, position = excluded.position, line = excluded.line,"
                " complete = excluded.complete, run_id = excluded.run_id, updated_at = excluded.updated_at",
                (self.source, fingerprint, position.offset, position.line, int(complete), self.run_id, now()),
            )
            counts = (batch.read, loaded, len(batch.rejects))
            conn.execute(
                "UPDATE etl_run SET rows_read = rows_read + ?, rows_loaded = rows_loaded + ?,"
                " rows_rejected = rows_rejected + ? WHERE run_id = ?",
                (*counts, self.run_id),
            )
            conn.execute(
                "UPDATE run_source SET rows_read = rows_read + ?, rows_loaded = rows_loaded + ?,"
                " rows_rejected = rows_rejected + ? WHERE run_id = ? AND source = ?",
                (*counts, self.run_id, self.source),
            )
        if self.rejected <= REJECTS_KEPT < self.rejected + len(batch.rejects):
            log.warning("rejects not all stored", source=self.source, stored=REJECTS_KEPT)
        self.rejected += len(batch.rejects)
        self.late_inside += self.pending[0]
        self.late_unpriced += self.pending[1]
        return loaded

    def notes(self) -> list[str]:
        """Notes for the source's outcome: rejects not all stored, late rows read but not loaded."""
        unit = "rows" if self.source.startswith("csv:") else "records"
        notes = []
        if self.rejected > REJECTS_KEPT:
            notes.append(
                f"stored the first {REJECTS_KEPT:,} of {self.rejected:,} rejected {unit} in reject; the rest were"
                " counted only"
            )
        if self.late_inside:
            notes.append(
                f"{self.late_inside:,} {unit} older than the raw history kept lay inside the span of a candle an"
                " earlier run kept for them, so could not be told from ones loaded before: read, not loaded (load"
                " history oldest first)"
            )
            log.warning("late rows taken for ones loaded before", source=self.source, rows=self.late_inside)
        if self.late_unpriced:
            notes.append(
                f"{self.late_unpriced:,} {unit} older than the raw history kept had no price, and only candles of"
                " prices are kept there: read, not loaded"
            )
        return notes

    def _load(self, observations: list[tuple], rejects: list[tuple[int, str, str]]) -> int:
        conn = self.conn
        conn.execute("DELETE FROM temp.staging")
        conn.executemany(INSERT_STAGING, observations)
        if self.source.startswith("csv:"):
            observations = self._carry_listings(observations)
        conn.execute(MATCH_BY_SOURCE_ID, (self.source,))
        joined, claimed = {}, set()
        for source_id, asset_id in conn.execute(JOIN_CANDIDATES, (self.source,)).fetchall():
            if source_id not in joined and asset_id not in claimed:
                joined[source_id] = asset_id
                claimed.add(asset_id)
        self._assign(joined.items(), fresh=False)
        unmatched = conn.execute(UNMATCHED).fetchall()
        self._assign(self._new_asset_ids(unmatched), fresh=True)
        conn.execute(UPSERT_LISTINGS, (self.source, self.latest))
        loaded = self._add_history(observations, rejects)
        changed = conn.execute(INSERT_FRESH_ASSETS, (self.source,)).rowcount
        listings = conn.execute(TOUCHED_LISTINGS, (self.latest,)).fetchall()
        if listings:
            unified = [unify(list(group)) for _, group in itertools.groupby(listings, key=lambda row: row[0])]
            changed += conn.executemany(UPSERT_ASSET, unified).rowcount
        if loaded or changed:
            new_generation(conn)
        return loaded

    def _add_history(self, staged: list[tuple], rejects: list[tuple[int, str, str]]) -> int:
        """Store the staged observations that are new and roll them up; return how many were new (those older than
        their listing's raw history wait for prune_history: NEW_LATE_ROWS). Of the `staged` ones, one that
        conflicts with an observation loaded first, in values or in symbol or name, is added to `rejects`."""
        conn = self.conn
        conn.execute(INSERT_LISTING_KEYS, (self.source,))
        conn.execute(STAGE_LISTING_KEYS, (self.source,))
        # A late row is compared with what its candle keeps (LATE_CONFLICTS): it has no raw twin when its twin was
        # rolled up by an earlier run.
        late_rejects = self._rejects(conn.execute(LATE_CONFLICTS).fetchall(), {}, "an earlier run", in_batch=False)
        skipped = [line for line, _, _ in late_rejects]
        rejects.extend(late_rejects)
        observed = conn.execute(INSERT_OBSERVATIONS, (json.dumps(skipped),)).fetchall()
        if len(observed) + len(skipped) < len(staged):
            renamed = renamed_rows(staged)
            found = conn.execute(CONFLICTS, (json.dumps(list(renamed)),)).fetchall()
            rejects.extend(r for r in self._rejects(found, renamed, "an earlier batch or run") if r[0] not in skipped)
        if not observed:
            return 0
        if self.oldest is not None:
            self.oldest = min(self.oldest, min(map(operator.itemgetter(1), observed)))
        conn.execute("DELETE FROM temp.observed")
        conn.executemany("INSERT INTO temp.observed VALUES (?, ?, ?, ?, ?)", observed)
        (late,) = conn.execute(COUNT_NEW_LATE).fetchone()
        waiting, unpriced = conn.execute(COUNT_LATE).fetchone()
        self.pending = (waiting - late - unpriced, unpriced)
        kept = len(observed) - conn.execute(NOT_LATE).rowcount
        for width in (HOUR, DAY):
            conn.execute("DELETE FROM temp.opening")
            conn.execute(STAGE_OPENING, (width,))
            conn.execute(CLOSE_CANDLES, (width,))
            conn.execute(DROP_CLOSED, (width,))
            conn.execute(ROLL_UP_OPEN, (width,))
            conn.execute(ROLL_UP, (width,))
        return kept + late

    def _rejects(
        self, found: list[tuple], renamed: dict[int, tuple[str, str]], earlier: str, in_batch: bool = True
    ) -> list[tuple[int, str, str]]:
        """Rejects (line, reason, raw) of the staged observations (CONFLICTS' rows) that differ from the one of their
        listing and second loaded first (by an earlier line of the batch if `in_batch`, else `earlier`), in values or
        (`renamed`) in symbol or name: the store keeps the first (a reload changes nothing), and the other is named."""
        if not found:
            return []
        first_lines: dict[tuple[str, str], int] = {}
        for line, source_id, observed_at in self.conn.execute(
            "SELECT line, source_id, observed_at FROM temp.staging ORDER BY line"
        ):
            first_lines.setdefault((source_id, observed_at), line)
        unit = "line" if self.source.startswith("csv:") else "record"
        rejects = []
        for line, source_id, observed_at, symbol, name, *values in found:
            kept, here = values[: len(COMPARED)], values[len(COMPARED) :]
            first = first_lines[source_id, observed_at]
            where = f"{unit} {first} of this input" if in_batch and first < line else earlier
            differences = ", ".join(
                f"{field} {json.dumps(shown(field, a))} kept, {json.dumps(shown(field, b))} here"
                for field, a, b in zip(
                    (*COMPARED, "symbol", "name"),
                    (*kept, *renamed.get(line, (symbol, name))),
                    (*here, symbol, name),
                    strict=True,
                )
                if a != b
            )
            reason = (
                f"another observation of {source_id} at {observed_at}, from {where}, was loaded first: {differences}"
            )
            raw = json.dumps(
                {"id": source_id, "symbol": symbol, "name": name, "observed_at": observed_at}
                | {field: shown(field, value) for field, value in zip(COMPARED, here, strict=True)}
            )
            rejects.append((line, reason, raw))
        return rejects

    def _carry_listings(self, observations: list[tuple]) -> list[tuple]:
        """Keep a CSV's coin one listing when its file gains or loses an id column; return the staged rows as loaded.

        A new id that the file gives takes over the one listing of its symbol and normalised name whose id was
        made (is_made_id), unless the batch names that listing too; a row that gives no id joins the one listing
        of its symbol and normalised name, whatever its id. Two ids that files gave are never one listing.
        """
        conn = self.conn
        taken: set[str] = set()
        rekeyed: dict[str, str] = {}
        renamed: list[tuple[str, str, str]] = []
        rows = conn.execute(SAME_COIN_LISTINGS, (self.source,)).fetchall()
        for staged, group in itertools.groupby(rows, key=operator.itemgetter(0)):
            listings = list(group)
            made = is_made_id(staged, listings[0][2], listings[0][1])
            usable = [
                stored
                for _, _, _, stored, symbol, name, named in listings
                if made or (is_made_id(stored, name, symbol) and not named)
            ]
            if len(usable) != 1 or usable[0] in taken:
                continue  # none, or no telling which
            taken.add(usable[0])
            if made:
                rekeyed[staged] = usable[0]
            else:
                renamed.append((staged, self.source, usable[0]))
        if renamed:
            conn.executemany("UPDATE source_map SET source_id = ? WHERE source = ? AND source_id = ?", renamed)
            conn.executemany("UPDATE listing SET source_id = ? WHERE source = ? AND source_id = ?", renamed)
            shown = {made: given for given, _, made in renamed[:5]}
            log.info("listings take the ids the file gives", listings=len(renamed), first=shown)
        if not rekeyed:
            return observations
        conn.executemany("UPDATE temp.staging SET source_id = ?2 WHERE source_id = ?1", rekeyed.items())
        at = STAGED_AT["source_id"]
        return [(*row[:at], rekeyed[row[at]], *row[at + 1 :]) if row[at] in rekeyed else row for row in observations]

    def _assign(self, assigned: Iterable[tuple[str, str]], fresh: bool) -> None:
        """Give the staged rows of each source id its asset."""
        self.conn.execute("DELETE FROM temp.assigned")
        if self.conn.executemany("INSERT INTO temp.assigned VALUES (?, ?)", assigned).rowcount > 0:
            self.conn.execute(ASSIGN, (int(fresh),))

    def _new_asset_ids(self, unmatched: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
        """Give each new coin (source id, symbol, name key, name) a stable slug that no other asset has."""
        bases = [slugify(name) or slugify(symbol) or f"asset-{key[:16]}" for _, symbol, key, name in unmatched]
        taken = {row[0] for row in self.conn.execute(TAKEN_IDS, (json.dumps(bases),))} | ROUTE_WORDS
        assigned = []
        for (source_id, symbol, _key, _name), base in zip(unmatched, bases, strict=True):
            candidate = base
            if candidate in taken:
                candidate = f"{base}-{slugify(symbol) or 'x'}"
                suffix = 2
                while candidate in taken or self._exists(candidate):
                    candidate = f"{base}-{suffix}"
                    suffix += 1
            taken.add(candidate)
            assigned.append((source_id, candidate))
        return assigned

    def _exists(self, asset_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM asset WHERE asset_id = ?", (asset_id,)).fetchone() is not None


class Progress:
    """A one-line progress display on a TTY; silent otherwise."""

    def __init__(self, label: str, total_bytes: int) -> None:
        self.label = label
        self.total = max(total_bytes, 1)
        self.enabled = sys.stderr.isatty()
        self.started = time.monotonic()

    def show(self, position: ReadPosition, tally: Tally) -> None:
        if self.enabled:
            rate = tally.read / max(time.monotonic() - self.started, 1e-9)
            sys.stderr.write(
                f"\r{self.label}: {position.offset / self.total:6.1%}  {tally.read:,} rows"
                f"  {tally.rejected:,} rejected  {rate:,.0f} rows/s "
            )
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def load_csv(conn: sqlite3.Connection, run_id: int, source: CsvSource, config: EtlConfig) -> Loaded:
    """Stream a CSV into the store in batches, each committed with its checkpoint."""
    path = source.path
    with open_csv(path) as original:
        return load_csv_file(conn, run_id, source, config, original)


def load_csv_file(
    conn: sqlite3.Connection, run_id: int, source: CsvSource, config: EtlConfig, original: BinaryIO
) -> Loaded:
    """load_csv of the open file: its bytes as they were when the fingerprint was taken, each batch committed only
    while they still are.

    Bytes written after them (an append) are left to the next run. A program rewriting them meanwhile (in place: a
    rename over the file leaves this one whole) fails the source after the batches read before; the next run reads
    the file again, resuming if it has the same content again.
    """
    path = source.path
    fingerprint, state = file_fingerprint(original, path)
    checkpoint = conn.execute(
        "SELECT fingerprint, position, line, complete, run_id FROM checkpoint WHERE source = ?", (source.name,)
    ).fetchone()
    if checkpoint and checkpoint[0] == fingerprint and checkpoint[3]:
        return Loaded(Tally(), f"unchanged since run {checkpoint[4]}")
    resume = checkpoint is not None and checkpoint[0] == fingerprint and checkpoint[1] > 0
    tally = Tally()
    headers: list[int] = []
    size = state[0]
    with utf8_stream(original, size) as stream, Loader(conn, run_id, source.name) as loader:
        end = size if stream is original else os.fstat(stream.fileno()).st_size
        progress = Progress(source.name, end)
        row_time, undated = time_of_undated_rows(state[1], loader.latest)
        position = ReadPosition()
        lines = decoded_lines(stream, position, end)
        reader = csv.reader(lines, strict=True)
        header = csv_header(reader, path)
        layout = csv_layout(header)
        intake = Intake(loader.latest, upstream=False, labels=layout.labels(header), undated=undated)
        intake.unknown.update(layout.ignored)
        if resume:
            stream.seek(checkpoint[1])
            position.offset, position.line = checkpoint[1], checkpoint[2]
            log.info("resuming", source=source.name, line=position.line, offset=position.offset)
        done, grown = position.line, False  # the last line committed; whether bytes were appended since
        for batch in csv_batches(reader, position, layout, row_time, config.batch_rows, intake):
            if file_state(original) != state:  # written since: only after the bytes read (appended), or among them
                if prefix_fingerprint(original, size) != fingerprint:
                    raise file_changed(path, done)
                state, grown = file_state(original), True
            # The end not reached (cut short under the reader, or a line being written then), or a last line that a
            # write since may have gone on with: the next run reads the file as it then is.
            if batch.final and (batch.end.offset < end or (grown and not ends_line(stream, end))):
                raise file_changed(path, done)
            committed = loader.commit(batch, fingerprint, batch.end, complete=batch.final)
            done = batch.end.line
            tally.add(Tally(batch.read, committed, len(batch.rejects)))
            headers += batch.headers
            log.debug("batch committed", source=source.name, line=batch.end.line, rows=batch.read, loaded=committed)
            progress.show(batch.end, tally)
    progress.done()
    unmapped = [name for name, at in zip(ROW_FIELDS, layout.columns, strict=True) if at is None]
    drift = intake.report({alias: name for name in unmapped for alias in CSV_ALIASES[name]})
    if drift:
        log.warning("schema drift", source=source.name, drift=drift)
    notes = [f"resumed from line {checkpoint[2]}"] if resume else []
    notes += loader.notes()
    if headers:
        lines_shown = ", ".join(map(str, headers[:5])) + (", ..." if len(headers) > 5 else "")
        notes.append(f"skipped {len(headers)} repeated header row{'s' * (len(headers) > 1)} (line {lines_shown})")
        log.warning("repeated header rows skipped", source=source.name, lines=headers[:100], count=len(headers))
    return Loaded(tally, "; ".join(notes) or None, drift, loader.oldest)


def load_pages(
    conn: sqlite3.Connection,
    run_id: int,
    upstream: HttpSource,
    pages: Iterator[Page],
    keep_raw: bool,
) -> Loaded:
    """Normalise and load upstream pages, each committed with its checkpoint (and raw payload)."""
    labels = [spec.label if (spec := upstream.fields.get(name)) else name for name in ROW_FIELDS]
    tally = Tally()
    batch = Batch(final=True)
    with Loader(conn, run_id, upstream.name) as loader:
        intake = Intake(loader.latest, upstream=True, labels=labels)
        for batch in page_batches(upstream, pages, intake):
            raw = batch.payload
            loaded = loader.commit(batch, f"run {run_id}", batch.end, batch.final, raw if keep_raw else None)
            tally.add(Tally(batch.read, loaded, len(batch.rejects)))
            if raw is not None:
                log.info("page loaded", url=raw.url, page=raw.page, records=batch.read, loaded=loaded)
    drift = intake.report({label: label for label in intake.missing})
    if drift:
        renames = [key for key in drift if key.startswith("likely rename")]
        log.warning("schema drift", source=upstream.name, drift=drift, likely_renames=renames)
    notes = loader.notes()
    if batch.repeated:
        page = batch.end.offset + 1
        notes.append(
            f"page {page} held only listings read from earlier pages"
            " (the upstream seems to ignore the page parameter): paging stopped"
        )
        log.warning("paging stopped: a page repeated earlier ones", source=upstream.name, page=page)
    elif not batch.final:
        pages_read = batch.end.offset
        notes.append(f"stopped at the page limit, {pages_read} pages ({upstream.page_limit}): more listings may follow")
        log.warning("paging stopped at the page limit", source=upstream.name, pages=pages_read)
    return Loaded(tally, "; ".join(notes) or None, drift, loader.oldest)


def prune_raw(conn: sqlite3.Connection, source: str, keep_runs: int) -> None:
    """Keep the raw payloads of the newest `keep_runs` runs of a source."""
    with transaction(conn):
        conn.execute(
            "DELETE FROM raw_payload WHERE source = ?1 AND run_id NOT IN ("
            " SELECT DISTINCT run_id FROM raw_payload WHERE source = ?1 ORDER BY run_id DESC LIMIT ?2)",
            (source, keep_runs),
        )


# --- run records ----------------------------------------------------------


def start_run(conn: sqlite3.Connection, sources: Sequence[Source]) -> int:
    """Close runs whose process died, then record this run as running."""
    started = now()
    with transaction(conn):
        run_id, dead = record_start(conn, sources, started)
    if dead:
        log.warning("found dead runs", run_ids=dead)
    return run_id


def record_start(conn: sqlite3.Connection, sources: Sequence[Source], started: str) -> tuple[int, list[int]]:
    """In start_run's transaction: the new run's rows, and the ids of dead runs now marked failed."""
    dead = [row[0] for row in conn.execute("SELECT run_id FROM etl_run WHERE status = 'running'")]
    conn.execute(
        "INSERT INTO etl_run (started_at, status, sources, pid, host) VALUES (?, 'running', ?, ?, ?)",
        (started, json.dumps([s.name for s in sources]), os.getpid(), socket.gethostname()),
    )
    run_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    if dead:
        reason = f"the run's process died or could not record its end; found by run {run_id}"
        marks = ",".join("?" * len(dead))
        conn.execute(
            f"UPDATE etl_run SET status = 'failed', ended_at = ?, error = ? WHERE run_id IN ({marks})",
            (started, reason, *dead),
        )
        conn.execute(
            f"UPDATE run_source SET status = 'failed', ended_at = ?, error = ?"
            f" WHERE status = 'running' AND run_id IN ({marks})",
            (started, reason, *dead),
        )
    conn.executemany(
        "INSERT INTO run_source (run_id, source, started_at, status) VALUES (?, ?, ?, 'running')",
        [(run_id, s.name, started) for s in sources],
    )
    return run_id, dead


@dataclass
class SourceOutcome:
    """How one source's part of a run ended."""

    source: str
    status: str
    tally: Tally
    duration_ms: int
    detail: str | None = None
    error: str | None = None
    drift: dict[str, int] = field(default_factory=dict)


def end_source(conn: sqlite3.Connection, run_id: int, outcome: SourceOutcome) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE run_source SET status = ?, ended_at = ?, duration_ms = ?, detail = ?, error = ?, drift = ?"
            " WHERE run_id = ? AND source = ?",
            (
                outcome.status,
                now(),
                outcome.duration_ms,
                outcome.detail,
                outcome.error,
                json.dumps(outcome.drift) if outcome.drift else None,
                run_id,
                outcome.source,
            ),
        )


def end_run(conn: sqlite3.Connection, run_id: int, status: str, duration_ms: int, error: str | None) -> None:
    """Record the run's end; when it failed, the end of each of its sources still running too (an interruption)."""
    ended = now()
    with transaction(conn):
        if status == "failed":
            conn.execute(
                "UPDATE run_source SET status = 'failed', ended_at = ?, error = ?"
                " WHERE run_id = ? AND status = 'running'",
                (ended, error, run_id),
            )
        conn.execute(
            "UPDATE etl_run SET status = ?, ended_at = ?, duration_ms = ?, error = ? WHERE run_id = ?",
            (status, ended, duration_ms, error, run_id),
        )


def load_source(conn: sqlite3.Connection, run_id: int, source: Source, config: EtlConfig) -> Loaded:
    """Load one source of any kind, then prune its history (also after the source's own failure midway)."""
    try:
        loaded = load_batches(conn, run_id, source, config)
    except SourceError:
        with cleanup("history pruning"):
            prune_history(conn, run_id, config.retention)
        raise
    prune_history(conn, run_id, config.retention, loaded.oldest)
    return loaded


def load_batches(conn: sqlite3.Connection, run_id: int, source: Source, config: EtlConfig) -> Loaded:
    """A source's observations, loaded batch by batch."""
    if isinstance(source, CsvSource):
        return load_csv(conn, run_id, source, config)
    if isinstance(source, ReplaySource):
        pages = stored_pages(conn, source)
        return load_pages(conn, run_id, source.upstream, pages, keep_raw=False)
    try:
        return load_pages(conn, run_id, source, fetched_pages(source), keep_raw=True)
    finally:
        with cleanup("raw payload pruning"):
            prune_raw(conn, source.name, config.raw_keep_runs)


def run_source(conn: sqlite3.Connection, run_id: int, source: Source, config: EtlConfig) -> SourceOutcome:
    """Load one source; its failure is recorded, never raised."""
    started = time.monotonic()
    structlog.contextvars.bind_contextvars(source=source.name)
    try:
        loaded = load_source(conn, run_id, source, config)
        status = "partial" if loaded.tally.rejected else "success"
        outcome = SourceOutcome(
            source.name, status, loaded.tally, elapsed_ms(started), loaded.detail, None, loaded.drift
        )
    except (SourceError, sqlite3.Error, OSError) as error:
        if isinstance(error, sqlite3.Error):
            message = store_fault(error, config)
        else:  # an OSError here is the source's (a CSV file), not the store's
            message = str(error) if isinstance(error, SourceError) else f"{type(error).__name__}: {error}"
        log.error("source failed", error=message)
        outcome = SourceOutcome(source.name, "failed", Tally(), elapsed_ms(started), None, message)
    finally:
        structlog.contextvars.unbind_contextvars("source")
    try:
        end_source(conn, run_id, outcome)
        # The committed batches counted themselves; a source that failed midway keeps what it loaded.
        outcome.tally = Tally(
            *conn.execute(
                "SELECT rows_read, rows_loaded, rows_rejected FROM run_source WHERE run_id = ? AND source = ?",
                (run_id, source.name),
            ).fetchone()
        )
    except sqlite3.Error as error:
        cause = store_fault(error, config)
        raise RecordLost(f"{source.name}: {outcome.error}" if outcome.error else cause, cause) from error
    log.info(
        "source finished",
        source=source.name,
        status=outcome.status,
        rows_read=outcome.tally.read,
        rows_loaded=outcome.tally.loaded,
        rows_rejected=outcome.tally.rejected,
        duration_ms=outcome.duration_ms,
        detail=outcome.detail,
    )
    return outcome


def run_status(outcomes: Sequence[SourceOutcome]) -> str:
    """success when all sources loaded cleanly, failed when none loaded, else partial."""
    statuses = {o.status for o in outcomes}
    if statuses == {"success"}:
        return "success"
    if statuses == {"failed"}:
        return "failed"
    return "partial"


def truncate_wal(conn: sqlite3.Connection, attempts: int = 20) -> None:
    """Copy the WAL into the store and truncate it, so it cannot grow without bound under steady reads.

    A reader still on an older snapshot makes the checkpoint report busy; it is
    retried a few times, then left to the next run (the data is safe either way).
    """
    for attempt in range(attempts):
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            log.debug("wal truncated", frames=frames, attempts=attempt + 1)
            return
        time.sleep(0.05)
    log.warning("wal not truncated: readers kept it busy", frames=frames, copied=copied)


def end_wal(conn: sqlite3.Connection, mode: str) -> None:
    """Checkpoint the WAL at the end of a run as KASPARRO_WAL_CHECKPOINT says.

    A passive checkpoint never waits for readers (so never for the busy
    handler), which Litestream's long read transaction would make every
    truncating attempt do.
    """
    if mode == "truncate":
        truncate_wal(conn)
    elif mode == "passive":
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        log.debug("wal checkpointed", busy=bool(busy), frames=frames, copied=copied)


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


# --- CLI ------------------------------------------------------------------


def lock_path(db: Path) -> Path:
    """The writer lock's file: one per store file, whatever path (a symlink) names it."""
    real = db.resolve()
    return real.with_name(real.name + ".etl-lock")


def acquire_lock(db: Path) -> tuple[int, bool]:
    """Take the store's single-writer lock: its file's descriptor, and whether this call made that file. Raise
    BlockingIOError with the holder's pid when another run holds it.

    A POSIX record lock (not flock): the kernel drops it when the process dies,
    and the API can test for it with F_GETLK without ever taking it.
    """
    path = lock_path(db)
    while True:
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, made = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                if not path.is_symlink():
                    continue  # a run that ended early removed it meanwhile (remove_created): make it again
                fd, made = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False  # a dangling symlink's target
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)  # the file stays: unlocked, another run may hold it by now, and the next run locks it
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BlockingIOError(
                f"another ETL run (pid {holder}) is writing to {db}; try again when it ends"
            ) from None
        if same_file(fd, path):
            break
        os.close(fd)  # a run that ended early removed the file it had locked (remove_created): lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, made


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file `fd`."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def store_files(db: Path) -> list[Path]:
    """The store's file and those SQLite keeps beside it."""
    real = db.resolve()
    return [real, *(real.with_name(real.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]


def run_made(db: Path, lock_made: bool) -> list[Path]:
    """The files a run about to begin makes (its lock file when acquire_lock made it; a new store's), to remove should
    it never begin. Called under the lock: no other run makes the store meanwhile."""
    made = [lock_path(db)] if lock_made else []
    return made + ([] if db.exists() else [path for path in store_files(db) if not path.exists()])


def remove_created(paths: Sequence[Path]) -> None:
    """Remove the files a run that never began created (under the writer lock, before letting it go)."""
    for path in paths:
        with cleanup(f"removing {path}"):
            path.unlink(missing_ok=True)


SQLITE_HEADER = b"SQLite format 3\x00"


def refuse_foreign_file(db: Path) -> None:
    """UsageError when `db` is a file with something in it but no SQLite header (a CSV named as the store).

    Only its first bytes are read: SQLite would call it corrupt, and the run would leave a lock file beside it.
    An empty file is a new store, as SQLite makes it one.
    """
    try:
        with db.open("rb") as file:
            head = file.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return
    if head and head != SQLITE_HEADER:
        begins = head.decode("utf-8", errors="replace").rstrip("\x00")
        raise UsageError(
            f"the store {str(db)!r} is not an SQLite database, so not a Kasparro store (it begins {begins!r}):"
            " name the store's file with --db or KASPARRO_DB (where none is, a new store is made); if it was the"
            " store, its first bytes are damaged: restore it from a backup"
        )


def refuse_foreign_store(conn: sqlite3.Connection, db: Path) -> None:
    """UsageError when the SQLite database at `db` holds tables but no run records: another program's."""
    tables = [
        name
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        if not name.startswith("sqlite_")
    ]
    if tables and "etl_run" not in tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise UsageError(
            f"the store {str(db)!r} is an SQLite database but not a Kasparro store (it holds the"
            f" table{'s' if len(tables) > 1 else ''} {shown} and no run records): name the store's file with --db"
            " or KASPARRO_DB"
        )


def refuse_missing_replays(conn: sqlite3.Connection, db: Path, sources: Sequence[Source], keep_runs: int) -> None:
    """UsageError for a replay of a run the store does not hold, or whose raw payloads it no longer keeps."""
    for source in sources:
        if not isinstance(source, ReplaySource):
            continue
        if not conn.execute("SELECT 1 FROM etl_run WHERE run_id = ?", (source.run_id,)).fetchone():
            raise UsageError(f"source {source.spec!r}: the store {str(db)!r} holds no run {source.run_id}")
        kept = "SELECT 1 FROM raw_payload WHERE source = ? AND run_id = ? LIMIT 1"
        if not conn.execute(kept, (source.name, source.run_id)).fetchone():
            raise UsageError(
                f"source {source.spec!r}: run {source.run_id} kept no raw payload of {source.name}: only a run that"
                f" fetched it keeps them, and only its newest KASPARRO_RAW_KEEP_RUNS ({keep_runs}) runs' stay"
            )


# Held from the end of a run's loading until its end is recorded: a stop in between would leave it 'running'.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="etl.py",
        description="Load market snapshots into the Kasparro store.",
        epilog=(
            "SOURCE: csv:PATH, csv:NAME=PATH, coinpaprika, coingecko, or replay:NAME@RUN_ID (re-normalise the raw"
            " payloads a past run kept). Default: $KASPARRO_SOURCES, else the shipped sample CSV."
            " Exit codes: 0 success or partial, 1 failed, 2 usage error, 75 another run holds the lock."
        ),
    )
    parser.add_argument(
        "--db", type=Path, action=Once, help="path of the SQLite store (default: $KASPARRO_DB or kasparro.db)"
    )
    parser.add_argument(
        "--every",
        type=interval_seconds,
        action=Once,
        metavar="SECONDS",
        help="run now and then at every slot of SECONDS, until SIGTERM or SIGINT (then exit 0)",
    )
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="where to load from")
    return parser.parse_args(argv)


class Once(argparse.Action):
    """An option given once: argparse would keep the last of two without a word (`--db a.db --db b.db`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, *_: Any) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "given twice; give it once")
        setattr(namespace, self.dest, values)


EVERY = (SECONDS[0], 365 * DAY)  # a slot longer than a year is no schedule, and time.sleep takes no time_t past it
EVERY_SYNTAX = re.compile(UNSIGNED_NUMBER)


def interval_seconds(text: str) -> float:
    """--every's value: a number of seconds within EVERY, in digits 0-9."""
    seconds = float(text) if EVERY_SYNTAX.fullmatch(text) else math.nan
    if not EVERY[0] <= seconds <= EVERY[1]:  # nan too
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds from {EVERY[0]:g} to {EVERY[1]:,} (a year), got {text!r}"
        )
    return seconds


def main(argv: Sequence[str] | None = None, config: EtlConfig | None = None) -> int:
    """Run the ETL once, or on a schedule with --every; return the exit code of SPEC.md."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config or EtlConfig.from_env()
        configure_logging(config.log_level)
        db = args.db or config.db
        sources = command_sources(args.sources, config)
        if not db.parent.is_dir():
            what = "is a file, not a directory" if db.parent.exists() else "does not exist"
            raise UsageError(f"the directory of the store, {str(db.parent)!r}, {what}")
        if db.is_dir() or (db.exists() and not db.is_file()):  # '' names the current directory
            what = "is a directory" if db.is_dir() else "is not a regular file"
            raise UsageError(f"the store {str(db)!r} {what}: name its file with --db or KASPARRO_DB (kasparro.db)")
        refuse_foreign_file(db)
        replays = [source for source in sources if isinstance(source, ReplaySource)]
        if replays and not db.exists():
            raise UsageError(f"source {replays[0].spec!r} replays a run of the store {str(db)!r}, which does not exist")
        if args.every is not None:
            return every(args.every, db, sources, config)
        lock, lock_made = acquire_lock(db)
    except UsageError as error:
        print(f"etl.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BlockingIOError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as error:  # the lock file sits beside the store: a read-only or full disk shows here first
        return store_unusable(error, dataclasses.replace(config, db=db))
    created = run_made(db, lock_made)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(db, sources, config)
    except (Interrupted, KeyboardInterrupt) as stop:  # before the run was recorded as started
        remove_created(created)
        print(f"etl.py: error: {str(stop) or 'interrupted'} before the run began", file=sys.stderr)
        return EXIT_FAILED
    except UsageError as error:
        remove_created(created)
        print(f"etl.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as error:  # the run could not begin: an unreadable store, a full disk, a writer's lock
        remove_created(created)
        return store_unusable(error, dataclasses.replace(config, db=db))
    finally:
        with cleanup("writer lock release"):
            os.close(lock)


def command_sources(arguments: Sequence[str], config: EtlConfig) -> list[Source]:
    """The SOURCE arguments, else KASPARRO_SOURCES (its errors naming it), else the shipped sample."""
    if arguments:
        return parse_sources(arguments, config)
    try:
        return parse_sources(config.sources, config)
    except UsageError as error:
        raise UsageError(f"KASPARRO_SOURCES: {error}") from None


def store_unusable(error: sqlite3.Error | OSError, config: EtlConfig) -> int:
    """Report a store the run could not begin on; return exit code 1."""
    cause = store_fault(error, config)
    log.error("store unusable", db=str(config.db), error=cause)
    print(f"etl.py: error: {cause}", file=sys.stderr)
    return EXIT_FAILED


def run(db: Path, sources: Sequence[Source], config: EtlConfig) -> int:
    """One recorded run over the given sources, holding the writer lock."""
    started = time.monotonic()
    config = dataclasses.replace(config, db=db)
    conn = connect(db, config.busy_timeout)
    try:
        refuse_foreign_store(conn, db)
        apply_schema(conn)
        sources = stored_names(conn, sources)
        refuse_missing_replays(conn, db, sources, config.raw_keep_runs)
        run_id = start_run(conn, sources)
        outcomes: list[SourceOutcome] = []
        try:
            structlog.contextvars.bind_contextvars(run_id=run_id)
            log.info("run started", db=str(db), sources=[s.name for s in sources])
            outcomes = [run_source(conn, run_id, source, config) for source in sources]
            held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a stop from here waits for the end record
        except (Interrupted, KeyboardInterrupt) as stop:
            reason = str(stop) or "interrupted"
            log.error("run interrupted", reason=reason)
            try:
                end_run(conn, run_id, "failed", elapsed_ms(started), reason)
            except sqlite3.Error as fault:
                return record_lost(run_id, reason, store_fault(fault, config))
            return EXIT_FAILED
        except RecordLost as lost:
            return record_lost(run_id, lost.cause, lost.record_error)
        status = run_status(outcomes)
        error = "; ".join(f"{o.source}: {o.error}" for o in outcomes if o.error) or None
        try:
            end_run(conn, run_id, status, elapsed_ms(started), error)
        except sqlite3.Error as fault:
            cause = store_fault(fault, config)
            with contextlib.suppress(Interrupted, KeyboardInterrupt):  # the run ends here in any case
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            return record_lost(run_id, error or cause, cause)
        try:
            with cleanup("wal checkpoint"):
                signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held since the loading ended acts here
                end_wal(conn, config.wal_checkpoint)
        except (Interrupted, KeyboardInterrupt) as stop:  # the run's end is recorded, and stands
            log.warning("wal checkpoint skipped", reason=str(stop) or "interrupted")
        total = Tally()
        for outcome in outcomes:
            total.add(outcome.tally)
        log.info(
            "run finished",
            status=status,
            rows_read=total.read,
            rows_loaded=total.loaded,
            rows_rejected=total.rejected,
            duration_ms=elapsed_ms(started),
            sources={
                o.source: {
                    "status": o.status,
                    "rows_read": o.tally.read,
                    "rows_loaded": o.tally.loaded,
                    "rows_rejected": o.tally.rejected,
                    "duration_ms": o.duration_ms,
                    **({"error": o.error} if o.error else {}),
                    **({"detail": o.detail} if o.detail else {}),
                    **({"drift": o.drift} if o.drift else {}),
                }
                for o in outcomes
            },
        )
        if status == "failed":
            print(f"etl.py: error: run {run_id} failed: {error}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        structlog.contextvars.clear_contextvars()
        with cleanup("closing the store"):
            conn.close()


def record_lost(run_id: int, cause: str, record_error: str) -> int:
    """Report a run whose end its record does not hold (the next run marks it failed); return exit code 1."""
    log.error("run failed; its record was not written", cause=cause, record_error=record_error)
    why = "for the same reason" if cause.endswith(record_error) else f"({record_error})"
    print(
        f"etl.py: error: run {run_id} failed: {cause}; its end could not be written to the run record {why},"
        " so the next run will record it as failed",
        file=sys.stderr,
    )
    return EXIT_FAILED


def every(seconds: float, db: Path, sources: Sequence[Source], config: EtlConfig) -> int:
    """Run now and at every slot of `seconds` after it, until SIGTERM or SIGINT; then return 0.

    Slots are counted from the start, so runs do not drift; a slot that passes
    during a run, or whose lock another run holds, is skipped with a log line.
    """
    stop = ScheduledStop()
    started, slot = time.monotonic(), 0
    try:
        while stop.signal is None:
            scheduled_run(db, sources, config)
            if stop.signal is not None:
                break
            next_slot = math.floor((time.monotonic() - started) / seconds) + 1
            if next_slot > slot + 1:
                log.warning("run outlasted its slot", every_s=seconds, skipped_slots=next_slot - slot - 1)
            slot = next_slot
            delay = max(started + slot * seconds - time.monotonic(), 0.0)
            log.info("waiting for the next run", every_s=seconds, wait_s=round(delay, 3))
            stop.sleep(delay)
    except Interrupted:
        pass  # the signal came while waiting
    finally:
        stop.close()
    log.info("schedule stopped", signal=stop.signal)
    return EXIT_OK


def scheduled_run(db: Path, sources: Sequence[Source], config: EtlConfig) -> None:
    """One run of the schedule; a held lock or an unusable store is logged and the schedule goes on."""
    try:
        lock, lock_made = acquire_lock(db)
    except BlockingIOError as error:
        log.warning("run skipped", reason=str(error))
        return
    except OSError as error:
        log.error("run skipped", reason=f"cannot take the writer lock next to {db}: {error.strerror}")
        return
    created = run_made(db, lock_made)
    try:
        run(db, sources, config)
    except sqlite3.Error as error:
        remove_created(created)
        log.error("store unusable", db=str(db), error=f"{type(error).__name__}: {error}")
    except UsageError:  # it ends the schedule
        remove_created(created)
        raise
    finally:
        os.close(lock)


class ScheduledStop:
    """SIGTERM or SIGINT under --every: stop at once while waiting; in a run, finish the batch in hand.

    The signal interrupts the run's loading at the first instant outside a
    batch's transaction (Loader.commit), so that batch commits with its
    checkpoint and the run is recorded as stopped; the next run resumes after
    it. Until the loading starts, or once it is over, the run goes on and the
    schedule stops after it. Where the signal cannot act yet, it looks again
    every POLL seconds (SIGALRM).
    """

    POLL = 0.05

    def __init__(self) -> None:
        self.signal: str | None = None
        self.waiting = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGALRM:
            self.signal = self.signal or signal.Signals(signum).name
        if self.signal is None:
            return
        if self.waiting:
            raise Interrupted(f"stopped by {self.signal}")
        running = set()
        while frame is not None:
            running.add(frame.f_code)
            frame = frame.f_back
        if run_source.__code__ in running and Loader.commit.__code__ not in running:
            raise Interrupted(f"stopped by {self.signal}")
        signal.setitimer(signal.ITIMER_REAL, self.POLL)

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or until the stop signal (raised as Interrupted)."""
        self.waiting = True
        if self.signal is None:  # a signal that came just before `waiting` was set is not lost
            time.sleep(seconds)
        self.waiting = False

    def close(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


if __name__ == "__main__":
    sys.exit(main())
