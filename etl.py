"""Kasparro ETL: load market snapshots into the SQLite store, crash-safe and idempotent."""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
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
import os
import random
import re
import signal
import socket
import sqlite3
import ssl
import sys
import time
import unicodedata
import urllib.parse
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar

import msgspec
import structlog
from msgspec import Meta

HERE = Path(__file__).resolve().parent
SCHEMA_PATH = HERE / "store.sql"
SCHEMA_VERSION = 4
SAMPLE_CSV = HERE / "data" / "sample.csv"

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75
RAW_REJECT_CHARS = 1_000

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
    coinpaprika_url: str = COINPAPRIKA_URL
    coinpaprika_key: str | None = field(default=None, repr=False)
    raw_keep_runs: int = 48
    busy_timeout: float = 15.0  # seconds to wait for another writer's transaction
    # CSV rows per transaction: bigger batches rewrite fewer index pages per row
    # (a 1M-row load: 65 s at 10,000 rows, 46 s at 50,000 with a 16 MB page
    # cache, peak RSS 131 MB), at ~3 MB of memory per 10,000 rows.
    batch_rows: int = 50_000
    http: HttpPolicy = HttpPolicy()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> EtlConfig:
        """Build the config from the variables of SPEC.md (and a few HTTP knobs), with defaults."""
        sources = tuple(s.strip() for s in environ.get("KASPARRO_SOURCES", "").split(",") if s.strip())
        plan = environ.get("KASPARRO_COINGECKO_PLAN", "demo").strip().lower()
        paprika_key = environ.get("COINPAPRIKA_API_KEY") or None
        try:
            http = HttpPolicy(
                read_timeout=float(environ.get("KASPARRO_HTTP_TIMEOUT", HttpPolicy.read_timeout)),
                connect_timeout=float(environ.get("KASPARRO_HTTP_TIMEOUT", HttpPolicy.connect_timeout)),
                budget=float(environ.get("KASPARRO_HTTP_BUDGET", HttpPolicy.budget)),
                max_requests=int(environ.get("KASPARRO_HTTP_MAX_REQUESTS", HttpPolicy.max_requests)),
                backoff=float(environ.get("KASPARRO_HTTP_BACKOFF", HttpPolicy.backoff)),
            )
            return cls(
                db=Path(environ.get("KASPARRO_DB", "kasparro.db")),
                sources=sources or (f"csv:{SAMPLE_CSV}",),
                log_level=environ.get("LOG_LEVEL", "info").lower(),
                env=environ.get("ENV", "development"),
                coingecko_url=environ.get("KASPARRO_COINGECKO_URL")
                or (COINGECKO_PRO_URL if plan == "pro" else COINGECKO_URL),
                coingecko_key=environ.get("COINGECKO_API_KEY") or None,
                coingecko_plan=plan,
                coingecko_max_pages=int(environ.get("KASPARRO_COINGECKO_MAX_PAGES", "20")),
                coinpaprika_url=environ.get("KASPARRO_COINPAPRIKA_URL")
                or (COINPAPRIKA_PRO_URL if paprika_key else COINPAPRIKA_URL),
                coinpaprika_key=paprika_key,
                raw_keep_runs=int(environ.get("KASPARRO_RAW_KEEP_RUNS", "48")),
                busy_timeout=float(environ.get("KASPARRO_BUSY_TIMEOUT", "15")),
                batch_rows=max(1, int(environ.get("KASPARRO_BATCH_ROWS", "50000"))),
                http=http,
            )
        except ValueError as error:
            raise UsageError(f"bad number in the environment: {error}") from None


class UsageError(Exception):
    """The command line or configuration cannot be carried out (exit 2)."""


class SourceError(Exception):
    """A source cannot be read at all; the source fails, the run goes on."""


class Interrupted(Exception):
    """The process was asked to stop (SIGTERM); the open batch rolls back."""


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
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,  # structlog.testing.capture_logs must see every line
    )


# --- sources --------------------------------------------------------------


@dataclass(frozen=True)
class CsvSource:
    """A CSV snapshot file; its name is 'csv:' and the file's stem."""

    path: Path

    @property
    def name(self) -> str:
        return f"csv:{self.path.stem}"


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


Source = CsvSource | HttpSource | ReplaySource


def parse_source(spec: str, config: EtlConfig) -> Source:
    """Turn a SOURCE argument of the CLI into a source, or raise UsageError."""
    kind, sep, rest = spec.partition(":")
    if kind == "csv" and sep and rest:
        return CsvSource(Path(rest))
    if spec == "coinpaprika":
        headers = {"Authorization": config.coinpaprika_key} if config.coinpaprika_key else {}
        return CoinPaprika(config.coinpaprika_url, headers, config.http)
    if spec == "coingecko":
        headers = {}
        if config.coingecko_key:
            headers["x-cg-pro-api-key" if config.coingecko_plan == "pro" else "x-cg-demo-api-key"] = (
                config.coingecko_key
            )
        return CoinGecko(config.coingecko_url, headers, config.http, config.coingecko_max_pages)
    if kind == "replay" and sep:
        name, _, run = rest.rpartition("@")
        if name in ("coinpaprika", "coingecko") and run.isdigit():
            return ReplaySource(int(run), parse_source(name, config))  # type: ignore[arg-type]
    raise UsageError(f"unknown source {spec!r}: expected csv:PATH, coinpaprika, coingecko or replay:NAME@RUN_ID")


class HttpClient:
    """GETs of one source's run: timeouts, retries with jittered backoff, Retry-After, a budget."""

    def __init__(self, source: HttpSource) -> None:
        self.source = source
        self.policy = source.policy
        self.deadline = time.monotonic() + self.policy.budget
        self.requests = 0
        self.ssl = ssl.create_default_context()

    def get(self, url: str) -> bytes:
        """The body of a 200 answer to GET url (decompressed), or SourceError saying why not."""
        policy = self.policy
        for attempt in range(1, policy.attempts + 1):
            retry_after = None
            try:
                status, headers, body = self._fetch(url)
            except TimeoutError:
                problem = f"no answer within {policy.read_timeout:g} s"
            except (OSError, http.client.HTTPException, zlib.error) as error:
                problem = f"{type(error).__name__}: {error}"
            else:
                if status == 200:
                    return body
                problem = f"HTTP {status}"
                if status != 429 and status < 500:
                    raise SourceError(f"{safe_url(url)} answered HTTP {status}: {printable(body[:200])}")
                retry_after = parse_retry_after(headers.get("retry-after"))
            if attempt == policy.attempts:
                break
            if retry_after is not None and retry_after > policy.retry_after_cap:
                raise SourceError(f"{safe_url(url)}: {problem} with Retry-After {retry_after:g} s, over the cap")
            jitter = random.uniform(0, min(policy.backoff_cap, policy.backoff * 2**attempt))  # noqa: S311 - not a secret
            delay = retry_after if retry_after is not None else jitter
            if time.monotonic() + delay >= self.deadline:
                raise SourceError(f"{safe_url(url)}: {problem}; time budget of {policy.budget:g} s spent")
            log.warning("retrying", url=safe_url(url), attempt=attempt, problem=problem, wait_s=round(delay, 3))
            time.sleep(delay)
        raise SourceError(f"{safe_url(url)}: {problem} after {policy.attempts} attempts")

    def _fetch(self, url: str) -> tuple[int, dict[str, str], bytes]:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise SourceError(f"{safe_url(url)}: time budget of {self.policy.budget:g} s spent")
        if self.requests >= self.policy.max_requests:
            raise SourceError(f"{safe_url(url)}: request budget of {self.policy.max_requests} spent")
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
            conn.sock.settimeout(min(self.policy.read_timeout, remaining))
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target or "/", headers=self._headers())
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            body = self._read(response)
        finally:
            conn.close()
        if headers.get("content-encoding", "identity").lower() == "gzip":
            inflate = zlib.decompressobj(wbits=31)
            body = inflate.decompress(body, self.policy.max_body)
            if inflate.unconsumed_tail:
                raise SourceError(f"{safe_url(url)}: body over {self.policy.max_body} bytes when decompressed")
        return response.status, headers, body

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        chunks, size = [], 0
        while chunk := response.read(65536):
            size += len(chunk)
            if size > self.policy.max_body:
                raise SourceError(f"response over {self.policy.max_body} bytes")
            if time.monotonic() > self.deadline:
                raise SourceError(f"time budget of {self.policy.budget:g} s spent while reading")
            chunks.append(chunk)
        return b"".join(chunks)

    def _headers(self) -> dict[str, str]:
        return {
            "Accept": "application/json",
            "Accept-Encoding": "gzip",
            "User-Agent": "kasparro-etl/1",
            **self.source.headers,
        }


def safe_url(url: str) -> str:
    """A URL fit for logs: no user info, no query values that could be keys."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    shown = "&".join(f"{k}={'***' if 'key' in k.lower() else v}" for k, v in query)
    return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, shown, ""))


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


def csv_layout(header: Sequence[str]) -> CsvLayout:
    """Map a header row onto the canonical fields, or raise SourceError."""
    found: dict[str, int] = {}
    ignored = []
    for index, raw in enumerate(header):
        target = HEADER_TO_FIELD.get(header_key(raw))
        if target is None:
            ignored.append(raw)
        elif target in found:
            raise SourceError(f"columns {header[found[target]]!r} and {raw!r} both give {target}")
        else:
            found[target] = index
    missing = [name for name in REQUIRED_COLUMNS if name not in found]
    if missing:
        raise SourceError(f"header has no {' or '.join(missing)} column (header: {list(header)!r})")
    return CsvLayout(len(header), tuple(found.get(name) for name in CSV_ALIASES), tuple(ignored))


@dataclass
class ReadPosition:
    """Byte offset and physical line reached by a reader; checkpoints copy it."""

    offset: int = 0
    line: int = 0
    undecodable_line: int = 0


def decoded_lines(stream: io.BufferedReader, position: ReadPosition) -> Iterator[str]:
    """Yield the stream's lines as text, keeping `position` at the end of the last one."""
    for raw in stream:
        position.offset += len(raw)
        position.line += 1
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            position.undecodable_line = position.line
            yield raw.decode("utf-8", "replace")


def file_fingerprint(path: Path) -> str:
    """sha256 of the file's bytes: a checkpoint applies only to the same content."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- normalise ------------------------------------------------------------

Symbol = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
Name = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
SourceId = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Rank = Annotated[int, Meta(ge=1, le=100_000_000)]
Usd = Annotated[float, Meta(ge=0, le=1e18)]
Pct = Annotated[float, Meta(ge=-100, le=1e9)]

STATUS_WORDS = {
    "active": "active", "true": "active", "yes": "active", "1": "active", "listed": "active",
    "inactive": "inactive", "false": "inactive", "no": "inactive", "0": "inactive",
    "delisted": "inactive", "dead": "inactive",
}  # fmt: skip
EARLIEST = datetime(2009, 1, 3, tzinfo=UTC)  # the genesis block
NOT_ALNUM = re.compile(r"[\W_]+")
NOT_SLUG = re.compile(r"[^a-z0-9]+")


class CsvRow(msgspec.Struct, array_like=True):
    """One row in canonical field order; msgspec checks and converts its text cells."""

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


ROW_FIELDS = CsvRow.__struct_fields__
assert tuple(CSV_ALIASES) == ROW_FIELDS, "CSV_ALIASES must list the fields of CsvRow in order"


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


def slugify(text: str) -> str:
    """ASCII slug of a name: 'Wrapped SOL' -> 'wrapped-sol'."""
    if not text.isascii():
        spaced = "".join(ch if ch.isalnum() else " " for ch in unicodedata.normalize("NFKD", text))
        text = spaced.encode("ascii", "ignore").decode()
    return NOT_SLUG.sub("-", text.lower()).strip("-")[:64].strip("-")


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC to the second: the store's one time format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=4096)  # snapshot rows share a few timestamps
def parse_time(text: str) -> str:
    """An ISO 8601 / RFC 3339 time or Unix seconds, as the store's time format."""
    try:
        if re.fullmatch(r"\d{9,11}(\.\d+)?", text):
            moment = datetime.fromtimestamp(float(text), UTC)
        else:
            moment = datetime.fromisoformat(text.replace("z", "Z"))
    except (ValueError, OverflowError, OSError):
        raise Rejected(f"observed_at: not an RFC 3339 time: {text[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if moment < EARLIEST:
        raise Rejected(f"observed_at: {text[:40]!r} is before 2009")
    return format_time(moment)


def validation_reason(error: msgspec.ValidationError) -> str:
    """msgspec's message with `$[3]` replaced by the field's name."""
    message = str(error)
    match = re.search(r" - at `\$\[(\d+)\]`$", message)
    if match:
        return f"{ROW_FIELDS[int(match.group(1))]}: {message[: match.start()]}"
    return message


def normalise_cells(cells: Sequence[object], default_time: str) -> Observation:
    """Validate one row's cells (canonical order, None where absent) into an Observation.

    Cells are CSV text or JSON values; msgspec converts and checks both the same way.
    """
    text = [(cell.strip() or None) if isinstance(cell, str) else cell for cell in cells]
    symbol, name = text[0], text[1]
    if isinstance(symbol, str):
        text[0] = normalise_symbol(symbol)
    if isinstance(name, str):
        text[1] = fold_text(name)
    try:
        row = msgspec.convert(text, CsvRow, strict=False)
    except msgspec.ValidationError as error:
        raise Rejected(validation_reason(error)) from None
    status = "active"
    if row.status is not None:
        status = STATUS_WORDS.get(row.status.casefold(), "")
        if not status:
            raise Rejected(f"status: expected active or inactive, got {row.status[:40]!r}")
    key = name_key(row.name)
    if not key:
        raise Rejected(f"name: has no letters or digits: {row.name[:40]!r}")
    return Observation(
        source_id=fold_text(row.source_id) if row.source_id else f"{slugify(row.name) or key}-{row.symbol.lower()}",
        symbol=row.symbol,
        name=row.name,
        name_key=key,
        rank=row.rank,
        price_usd=row.price_usd,
        market_cap_usd=row.market_cap_usd,
        volume_24h_usd=row.volume_24h_usd,
        change_24h_pct=row.change_24h_pct,
        status=status,
        observed_at=parse_time(row.observed_at) if row.observed_at else default_time,
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
    change_24h_pct REAL, status TEXT, observed_at TEXT, asset_id TEXT, fresh INTEGER NOT NULL DEFAULT 0
);
CREATE TEMP TABLE IF NOT EXISTS new_asset (
    symbol TEXT, name_key TEXT, asset_id TEXT, PRIMARY KEY (symbol, name_key)
);
"""

INSERT_STAGING = """
INSERT INTO temp.staging (line, source_id, symbol, name, name_key, rank, price_usd, market_cap_usd,
                          volume_24h_usd, change_24h_pct, status, observed_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

# Identity, step 1: the source's own id, through the mapping table.
MATCH_BY_SOURCE_ID = """
UPDATE temp.staging SET asset_id = (
    SELECT m.asset_id FROM source_map m WHERE m.source = ?1 AND m.source_id = staging.source_id)
"""

# Identity, step 2: the same symbol and normalised name in any source.
MATCH_BY_SYMBOL_AND_NAME = """
UPDATE temp.staging SET asset_id = (
    SELECT min(m.asset_id) FROM source_map m
    WHERE m.symbol = staging.symbol AND m.name_key = staging.name_key)
WHERE asset_id IS NULL
"""

UNMATCHED = """
SELECT symbol, name_key, name FROM temp.staging WHERE asset_id IS NULL
GROUP BY symbol, name_key ORDER BY min(line)
"""

ASSIGN_NEW = """
UPDATE temp.staging SET fresh = 1, asset_id = (
    SELECT n.asset_id FROM temp.new_asset n
    WHERE n.symbol = staging.symbol AND n.name_key = staging.name_key)
WHERE asset_id IS NULL
"""

TAKEN_IDS = "SELECT asset_id FROM asset WHERE asset_id IN (SELECT value FROM json_each(?1))"

# The listing's quote moves only forward in time; its asset never changes here.
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
"""

INSERT_OBSERVATIONS = """
INSERT OR IGNORE INTO observation (source, source_id, observed_at, symbol, name, rank, price_usd,
                                   market_cap_usd, volume_24h_usd, change_24h_pct, status, run_id)
SELECT ?1, source_id, observed_at, symbol, name, rank, price_usd,
       market_cap_usd, volume_24h_usd, change_24h_pct, status, ?2
FROM temp.staging ORDER BY line
"""


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

# Every other asset of the batch is unified from all its listings, newest first.
TOUCHED_LISTINGS = """
SELECT m.asset_id, m.source, m.symbol, m.name, m.rank, m.price_usd, m.market_cap_usd,
       m.volume_24h_usd, m.change_24h_pct, m.status, m.observed_at, m.pinned
FROM source_map m
WHERE m.asset_id IN (SELECT asset_id FROM temp.staging WHERE NOT fresh
                     UNION ALL
                     SELECT asset_id FROM temp.staging WHERE fresh GROUP BY asset_id HAVING count(*) > 1)
  AND m.observed_at IS NOT NULL
ORDER BY m.asset_id, m.observed_at DESC, m.source, m.source_id
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
def sort_indexes() -> dict[str, str]:
    """The CREATE INDEX statements of store.sql for table asset, by index name."""
    pattern = re.compile(r"^CREATE INDEX IF NOT EXISTS (\w+) ON asset \(.*?\);", re.M | re.S)
    return {match.group(1): match.group(0) for match in pattern.finditer(SCHEMA_PATH.read_text())}


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


@dataclass
class Batch:
    """Rows and rejects of one transaction, with the position they reach."""

    observations: list[tuple] = field(default_factory=list)
    rejects: list[tuple[int, str, str]] = field(default_factory=list)
    read: int = 0
    end: ReadPosition = field(default_factory=ReadPosition)  # where the input stands after this batch
    final: bool = False  # the input ends here


def connect(db: Path, busy_timeout: float) -> sqlite3.Connection:
    """A writer connection in autocommit mode; transactions are explicit.

    Another process's write transaction is waited for up to `busy_timeout`
    seconds, then the statement fails with "database is locked": the run
    fails clearly instead of hanging.
    """
    conn = sqlite3.connect(db, isolation_level=None, timeout=busy_timeout)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -16384")  # 16 MB: more only held memory in the 1M-row benchmark
    # Checkpoints shrink the WAL back to this size, however long readers held it.
    conn.execute("PRAGMA journal_size_limit = 67108864")
    return conn


# The system errors that mean the same as an SQLite result code, for files beside the store.
OS_FAULTS = {errno.ENOSPC: sqlite3.SQLITE_FULL, errno.EDQUOT: sqlite3.SQLITE_FULL, errno.EROFS: sqlite3.SQLITE_READONLY,
             errno.EACCES: sqlite3.SQLITE_READONLY, errno.EPERM: sqlite3.SQLITE_READONLY}  # fmt: skip


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
        sqlite3.SQLITE_BUSY: f"the store {db} is locked by another writer for longer than KASPARRO_BUSY_TIMEOUT"
        f" ({config.busy_timeout:g} s): end that process, or raise the timeout",
        sqlite3.SQLITE_CORRUPT: f"the store {db} is corrupt: restore it from a backup, or move it away to load anew",
        sqlite3.SQLITE_IOERR: f"the disk holding {db} failed a read or write",
        sqlite3.SQLITE_CANTOPEN: f"the store {db} cannot be opened: check that it and its directory exist",
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


def apply_schema(conn: sqlite3.Connection) -> None:
    """Create the store, or check that an existing one has a version this ETL knows."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UsageError(f"store schema version {version} is newer than this etl.py ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA_PATH.read_text()}\nCOMMIT;")
    conn.execute(
        "INSERT OR IGNORE INTO store_meta (id, store_id, generation, committed_at) VALUES (1, ?, 0, ?)",
        (uuid.uuid4().hex[:12], now()),
    )
    conn.executescript(STAGING_DDL)


def now() -> str:
    return format_time(datetime.now(UTC))


class Loader:
    """Writes batches of one source: identity, listings, history, unified assets, checkpoint."""

    def __init__(self, conn: sqlite3.Connection, run_id: int, source: str) -> None:
        self.conn = conn
        self.run_id = run_id
        self.source = source
        # Into an empty store (or finishing such a load that was killed), the
        # sort indexes are dropped and built once at the end: random inserts
        # into eight indexes would otherwise rewrite most of their pages at
        # every commit. Nothing is served from an empty store meanwhile.
        indexes = {row[0] for row in conn.execute(ASSET_INDEXES)}
        self.bulk = not conn.execute("SELECT 1 FROM asset LIMIT 1").fetchone() or indexes != set(sort_indexes())

    def commit(
        self, batch: Batch, fingerprint: str, position: ReadPosition, complete: bool, raw: RawPage | None = None
    ) -> int:
        """Apply one batch, its checkpoint and raw payload in one transaction; return new observations."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self.bulk:
                for (name,) in conn.execute(ASSET_INDEXES).fetchall():
                    conn.execute(f'DROP INDEX "{name}"')
            loaded = self._load(batch.observations) if batch.observations else 0
            if self.bulk and complete:
                for statement in sort_indexes().values():
                    conn.execute(statement)
            conn.executemany(
                "INSERT OR IGNORE INTO reject (run_id, source, line, reason, raw) VALUES (?, ?, ?, ?, ?)",
                [(self.run_id, self.source, line, reason, raw) for line, reason, raw in batch.rejects],
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
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
        return loaded

    def _load(self, observations: list[tuple]) -> int:
        conn = self.conn
        conn.execute("DELETE FROM temp.staging")
        conn.execute("DELETE FROM temp.new_asset")
        conn.executemany(INSERT_STAGING, observations)
        conn.execute(MATCH_BY_SOURCE_ID, (self.source,))
        conn.execute(MATCH_BY_SYMBOL_AND_NAME)
        unmatched = conn.execute(UNMATCHED).fetchall()
        if unmatched:
            conn.executemany("INSERT INTO temp.new_asset VALUES (?, ?, ?)", self._new_asset_ids(unmatched))
            conn.execute(ASSIGN_NEW)
        conn.execute(UPSERT_LISTINGS, (self.source,))
        loaded = conn.execute(INSERT_OBSERVATIONS, (self.source, self.run_id)).rowcount
        changed = conn.execute(INSERT_FRESH_ASSETS, (self.source,)).rowcount
        listings = conn.execute(TOUCHED_LISTINGS).fetchall()
        if listings:
            unified = [unify(list(group)) for _, group in itertools.groupby(listings, key=lambda row: row[0])]
            changed += conn.executemany(UPSERT_ASSET, unified).rowcount
        if loaded or changed:
            conn.execute("UPDATE store_meta SET generation = generation + 1, committed_at = ? WHERE id = 1", (now(),))
        return loaded

    def _new_asset_ids(self, unmatched: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Give each new coin a stable slug that no other asset has."""
        bases = [slugify(name) or slugify(symbol) or f"asset-{key[:16]}" for symbol, key, name in unmatched]
        taken = {row[0] for row in self.conn.execute(TAKEN_IDS, (json.dumps(bases),))}
        assigned = []
        for (symbol, key, _name), base in zip(unmatched, bases, strict=True):
            candidate = base
            if candidate in taken:
                candidate = f"{base}-{slugify(symbol) or 'x'}"
                suffix = 2
                while candidate in taken or self._exists(candidate):
                    candidate = f"{base}-{suffix}"
                    suffix += 1
            taken.add(candidate)
            assigned.append((symbol, key, candidate))
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


def load_csv(
    conn: sqlite3.Connection, run_id: int, source: CsvSource, batch_rows: int
) -> tuple[Tally, str | None, dict[str, int]]:
    """Stream a CSV into the store in batches; return the tally, a detail note and the drift."""
    path = source.path
    try:
        fingerprint = file_fingerprint(path)
        stat = path.stat()
        size = stat.st_size
        default_time = format_time(datetime.fromtimestamp(stat.st_mtime, UTC))
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or error}") from None
    checkpoint = conn.execute(
        "SELECT fingerprint, position, line, complete, run_id FROM checkpoint WHERE source = ?", (source.name,)
    ).fetchone()
    if checkpoint and checkpoint[0] == fingerprint and checkpoint[3]:
        return Tally(), f"unchanged since run {checkpoint[4]}", {}
    resume = checkpoint is not None and checkpoint[0] == fingerprint and checkpoint[1] > 0
    loader = Loader(conn, run_id, source.name)
    tally = Tally()
    progress = Progress(source.name, size)
    with path.open("rb") as stream:
        position = ReadPosition()
        lines = decoded_lines(stream, position)
        reader = csv.reader(lines, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise SourceError(f"{path} is empty: no header row") from None
        except csv.Error as error:
            raise SourceError(f"{path}: unreadable header: {error}") from None
        layout = csv_layout(header)
        drift = {f"unknown column {name!r}": 1 for name in layout.ignored}
        if drift:
            log.warning("schema drift", source=source.name, ignored_columns=list(layout.ignored))
        if resume:
            stream.seek(checkpoint[1])
            position.offset, position.line = checkpoint[1], checkpoint[2]
            log.info("resuming", source=source.name, line=position.line, offset=position.offset)
        for batch in csv_batches(reader, position, layout, default_time, batch_rows):
            committed = loader.commit(batch, fingerprint, batch.end, complete=batch.final)
            tally.add(Tally(batch.read, committed, len(batch.rejects)))
            log.debug("batch committed", source=source.name, line=batch.end.line, rows=batch.read, loaded=committed)
            progress.show(batch.end, tally)
    progress.done()
    return tally, f"resumed from line {checkpoint[2]}" if resume else None, drift


def csv_batches(
    reader: Iterator[list[str]], position: ReadPosition, layout: CsvLayout, default_time: str, batch_rows: int
) -> Iterator[Batch]:
    """Group parsed rows into batches, each stamped with the position it ends at."""
    batch = Batch()
    columns = layout.columns
    while True:
        first_line = position.line + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            batch.read += 1
            batch.rejects.append((first_line, f"malformed CSV: {error}", ""))
            continue
        if not cells or cells == [""]:
            continue
        batch.read += 1
        try:
            if position.undecodable_line >= first_line:
                raise Rejected("not valid UTF-8")
            if len(cells) != layout.width:
                raise Rejected(f"expected {layout.width} fields, got {len(cells)}")
            observation = normalise_cells([None if c is None else cells[c] for c in columns], default_time)
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


def record_cells(source: HttpSource, record: object, drift: collections.Counter[str]) -> list[object]:
    """One upstream record as canonical cells, counting schema drift; Rejected when it is void."""
    if not isinstance(record, dict):
        raise Rejected(f"expected a JSON object, got {type(record).__name__}")
    for key in record.keys() - source.known:
        drift[f"unknown field {key[:60]!r}"] += 1
    for label, known in source.known_nested.items():
        nested = dig(record, label.split("."))
        if isinstance(nested, dict):
            for key in nested.keys() - known:
                drift[f"unknown field {label + '.' + key[:60]!r}"] += 1
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
            drift[f"missing field {spec.label!r}"] += 1
            value = None
        cells.append(value)
    return cells


# float_hook=float: an out-of-range number (1e400) becomes inf, which rejects
# only its own record, instead of failing the whole response.
decode_json = msgspec.json.Decoder(float_hook=float).decode


def decode_records(body: bytes, where: str) -> list[object]:
    """The JSON array of records in a response body, or SourceError saying what came instead."""
    try:
        records = decode_json(body)
    except msgspec.DecodeError as error:
        raise SourceError(f"{where}: not valid JSON ({error}) in {len(body)} bytes") from None
    except RecursionError:
        raise SourceError(f"{where}: JSON nested too deeply") from None
    if not isinstance(records, list):
        raise SourceError(f"{where}: expected a JSON array of records, got {type(records).__name__}")
    return records


# A page to load: the response, the record count of a full page (fewer ends
# the paging), and whether it is the last page in any case.
Page = tuple[RawPage, int | None, bool]


def fetched_pages(source: HttpSource) -> Iterator[Page]:
    """Fetch the source's requests in order."""
    client = HttpClient(source)
    for page, (url, full_page) in enumerate(source.requests(), start=1):
        fetched_at = now()
        yield RawPage(page, fetched_at, safe_url(url), client.get(url)), full_page, full_page is None


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


def load_pages(
    conn: sqlite3.Connection,
    run_id: int,
    upstream: HttpSource,
    pages: Iterator[Page],
    keep_raw: bool,
) -> tuple[Tally, str | None, dict[str, int]]:
    """Normalise and load upstream pages, each committed with its checkpoint (and raw payload)."""
    loader = Loader(conn, run_id, upstream.name)
    drift: collections.Counter[str] = collections.Counter()
    tally, index = Tally(), 0
    for raw, full_page, final in pages:
        records = decode_records(raw.body, raw.url)
        if not records and raw.page == 1:
            raise SourceError(f"{raw.url} returned no records")
        batch = Batch()
        for record in records:
            index += 1
            batch.read += 1
            try:
                observation = normalise_cells(record_cells(upstream, record, drift), raw.fetched_at)
            except Rejected as reason:
                batch.rejects.append((index, str(reason), msgspec.json.encode(record)[:RAW_REJECT_CHARS].decode()))
            else:
                batch.observations.append((index, *msgspec.structs.astuple(observation)))
        last = final or (full_page is not None and len(records) < full_page)
        position = ReadPosition(offset=raw.page, line=index)
        loaded = loader.commit(batch, f"run {run_id}", position, complete=last, raw=raw if keep_raw else None)
        tally.add(Tally(batch.read, loaded, len(batch.rejects)))
        log.info("page loaded", url=raw.url, page=raw.page, records=len(records), loaded=loaded)
        if last:
            break
    if drift:
        log.warning("schema drift", source=upstream.name, drift=dict(drift))
    return tally, None, dict(drift)


def prune_raw(conn: sqlite3.Connection, source: str, keep_runs: int) -> None:
    """Keep the raw payloads of the newest `keep_runs` runs of a source."""
    conn.execute(
        "DELETE FROM raw_payload WHERE source = ?1 AND run_id NOT IN ("
        " SELECT DISTINCT run_id FROM raw_payload WHERE source = ?1 ORDER BY run_id DESC LIMIT ?2)",
        (source, keep_runs),
    )


# --- run records ----------------------------------------------------------


def start_run(conn: sqlite3.Connection, sources: Sequence[Source]) -> int:
    """Close runs whose process died, then record this run as running."""
    started = now()
    conn.execute("BEGIN IMMEDIATE")
    try:
        run_id, dead = record_start(conn, sources, started)
    except BaseException:
        rollback(conn)
        raise
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
    conn.execute("COMMIT")
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
    conn.execute(
        "UPDATE etl_run SET status = ?, ended_at = ?, duration_ms = ?, error = ? WHERE run_id = ?",
        (status, now(), duration_ms, error, run_id),
    )


def load_source(
    conn: sqlite3.Connection, run_id: int, source: Source, config: EtlConfig
) -> tuple[Tally, str | None, dict[str, int]]:
    """Load one source of any kind."""
    if isinstance(source, CsvSource):
        return load_csv(conn, run_id, source, config.batch_rows)
    if isinstance(source, ReplaySource):
        return load_pages(conn, run_id, source.upstream, stored_pages(conn, source), keep_raw=False)
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
        tally, detail, drift = load_source(conn, run_id, source, config)
        status = "partial" if tally.rejected else "success"
        outcome = SourceOutcome(source.name, status, tally, elapsed_ms(started), detail, None, drift)
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


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


# --- CLI ------------------------------------------------------------------


def acquire_lock(db: Path) -> int:
    """Take the store's single-writer lock, or raise BlockingIOError with the holder's pid.

    A POSIX record lock (not flock): the kernel drops it when the process dies,
    and the API can test for it with F_GETLK without ever taking it.
    """
    lock_path = db.with_name(db.name + ".etl-lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise BlockingIOError(f"another ETL run (pid {holder}) is writing to {db}; try again when it ends") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="etl.py",
        description="Load market snapshots into the Kasparro store.",
        epilog=(
            "SOURCE: csv:PATH, coinpaprika, coingecko, or replay:NAME@RUN_ID (re-normalise the raw"
            " payloads a past run kept). Default: $KASPARRO_SOURCES, else the shipped sample CSV."
            " Exit codes: 0 success or partial, 1 failed, 2 usage error, 75 another run holds the lock."
        ),
    )
    parser.add_argument("--db", type=Path, help="path of the SQLite store (default: $KASPARRO_DB or kasparro.db)")
    parser.add_argument("sources", nargs="*", metavar="SOURCE", help="where to load from")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, config: EtlConfig | None = None) -> int:
    """Run the ETL once; return the exit code of SPEC.md."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config or EtlConfig.from_env()
        configure_logging(config.log_level)
        db = args.db or config.db
        sources = [parse_source(spec, config) for spec in (args.sources or config.sources)]
        if not db.parent.is_dir():
            raise UsageError(f"directory of the store does not exist: {db.parent}")
        lock = acquire_lock(db)
    except UsageError as error:
        print(f"etl.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BlockingIOError as error:
        print(f"etl.py: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as error:  # the lock file sits beside the store: a read-only or full disk shows here first
        return store_unusable(error, dataclasses.replace(config, db=db))
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return run(db, sources, config)
    except UsageError as error:
        print(f"etl.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as error:  # the run could not begin: an unreadable store, a full disk, a writer's lock
        return store_unusable(error, dataclasses.replace(config, db=db))
    finally:
        with cleanup("writer lock release"):
            os.close(lock)


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
        apply_schema(conn)
        run_id = start_run(conn, sources)
        structlog.contextvars.bind_contextvars(run_id=run_id)
        log.info("run started", db=str(db), sources=[s.name for s in sources])
        outcomes: list[SourceOutcome] = []
        try:
            outcomes = [run_source(conn, run_id, source, config) for source in sources]
        except (Interrupted, KeyboardInterrupt) as stop:
            reason = str(stop) or "interrupted"
            log.error("run interrupted", reason=reason)
            try:
                conn.execute(
                    "UPDATE run_source SET status = 'failed', ended_at = ?, error = ?"
                    " WHERE run_id = ? AND status = 'running'",
                    (now(), reason, run_id),
                )
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
            return record_lost(run_id, error or cause, cause)
        with cleanup("wal truncation"):
            truncate_wal(conn)
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


if __name__ == "__main__":
    sys.exit(main())
