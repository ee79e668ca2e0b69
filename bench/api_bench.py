"""Load-test the API with wrk on a generated store, against a bare ASGI app as the machine's ceiling."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import itertools
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from urllib.parse import quote

import msgspec
import peers
from profile_summary import summarise
from runtime import runtime_python

from gen_csv import write_csv
from stores import read_only_uri

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
RESULTS = BENCH / "results.md"

HOST = "127.0.0.1"  # the only address this benchmark ever talks to
THREADS, CONNECTIONS = 1, 32
SAMPLE_IDS = 10_000  # asset ids the working-set /data/{asset_id} scenario picks from
RANDOM_PAGES = 10_000  # random pages are drawn from 1..this (fewer on a small store)
PAGE_SIZE = 100
READY_TIMEOUT = 60.0  # seconds a server may take to answer its first request
MIN_RESPONSES = 1_000  # fewer in a measured run are shown next to the figures
SETTLE_TIMEOUT = 300.0  # seconds a server may stay busy after wrk has stopped
WRK_TIMEOUT = 10  # seconds; slower responses count as socket errors and leave wrk's percentiles
RSS_LIMIT_MB = 100
PAGE_CACHE_STATES = {"warm": "read whole into the page cache", "cold": "dropped from the page cache"}
EXPORT_GROWTH_MB = 50  # the most an export of every asset may add to the server's RSS (flat: a chunk at a time)


# --- scenarios and targets ------------------------------------------------


@dataclass
class Measure:
    """What one scenario measured: throughput, latency and failures."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    seconds: float | None = None  # wall time of a finite walk
    note: str = ""
    growth_mb: float | None = None  # an export's: peak RSS of the server during it, minus its RSS before

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass(frozen=True)
class Target:
    """Issue 7's bar for a scenario; None where it sets none."""

    min_ratio: float | None = None  # of the ceiling's requests/s (or of the scenario's `versus`)
    max_p99_ms: float | None = None
    max_seconds: float | None = None
    min_rate: float | None = None  # requests (an export: rows) a second
    max_growth_mb: float | None = None

    def __str__(self) -> str:
        parts = []
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:.0%} of {self.versus or 'ceiling'}")
        if self.min_rate is not None:
            parts.append(f">= {self.min_rate:,.0f}/s")
        if self.max_growth_mb is not None:
            parts.append(f"RSS growth <= {self.max_growth_mb:g} MB")
        if self.max_p99_ms is not None:
            parts.append(f"p99 <= {self.max_p99_ms:g} ms")
        if self.max_seconds is not None:
            parts.append(f"<= {self.max_seconds:g} s")
        return ", ".join([*parts, "0 errors"])

    versus: str | None = None  # the scenario min_ratio is of, measured in the same run; None: the ceiling

    def met(self, measure: Measure, ceiling: float) -> bool:
        ratio_ok = self.min_ratio is None or measure.requests_per_s >= self.min_ratio * ceiling
        p99_ok = self.max_p99_ms is None or measure.p99_ms <= self.max_p99_ms  # False when nan
        time_ok = self.max_seconds is None or (measure.seconds is not None and measure.seconds <= self.max_seconds)
        rate_ok = self.min_rate is None or measure.requests_per_s >= self.min_rate
        growth = measure.growth_mb
        memory_ok = self.max_growth_mb is None or (growth is not None and growth <= self.max_growth_mb)
        return ratio_ok and p99_ok and time_ok and rate_ok and memory_ok and measure.errors == 0


@dataclass(frozen=True)
class Scenario:
    """A named load: a path (or a wrk Lua script) against the API or the ceiling, and its target."""

    name: str
    title: str
    path: str = "/"
    script: str | None = None
    target: Target | None = None
    on_ceiling: bool = False
    walk: bool = False  # a keyset walk by a Python client instead of wrk
    mixed: bool | None = None  # the dashboard load of bench/mixed_load.py on its own store; True: with ETL writes
    ids: str = "sample"  # the ids file random_asset.lua draws from: "sample" (SAMPLE_IDS), "all" or "zipf"
    headers: tuple[str, ...] = ()  # sent with every request by wrk
    export: bool = False  # one GET of `path`, streamed and counted by a Python client, the server's RSS sampled

    def shown_title(self, pages: int) -> str:
        """The title with the pages random_page.lua draws from (random_pages) and the ids of SAMPLE_IDS written in."""
        return self.title.replace("PAGES", str(pages)).replace("SAMPLE", f"{SAMPLE_IDS:,}")


SCENARIOS = (
    Scenario("ceiling", "ceiling: bare ASGI, constant JSON", on_ceiling=True),
    Scenario("health", "GET /health", "/health", target=Target(min_ratio=0.60)),
    Scenario("first-page", "GET /data?page_size=100", "/data?page_size=100", target=Target(min_ratio=0.50)),
    Scenario(
        "first-page-gzip",
        "GET /data?page_size=100, Accept-Encoding: gzip (a kept answer compressed once)",
        "/data?page_size=100",
        headers=("Accept-Encoding: gzip",),
        target=Target(min_ratio=0.90, versus="first-page"),
    ),
    Scenario(
        "filtered-sorted",
        "GET /data?filter_by=active&page_size=100&sort=-market_cap_usd",
        "/data?filter_by=active&page_size=100&sort=-market_cap_usd",
        target=Target(min_ratio=0.50),
    ),
    Scenario(
        "random-page",
        "GET /data?page={1..PAGES}&page_size=100, uniform",
        script="random_page.lua",
        target=Target(min_ratio=0.05, max_p99_ms=20),
    ),
    Scenario(
        "asset-zipf",
        "GET /data/{asset_id}, ids of all assets drawn by Zipf (s = 1.1) over their rank",
        script="random_asset.lua",
        ids="zipf",
        target=Target(min_ratio=0.45),
    ),
    Scenario(
        "asset",
        "GET /data/{asset_id}, uniform ids of all assets",
        script="random_asset.lua",
        ids="all",
        target=Target(min_ratio=0.20, max_p99_ms=10),
    ),
    # The same lookups within a working set small enough to stay in the answer cache (no target of its own).
    Scenario("asset-hot", "GET /data/{asset_id}, random ids of SAMPLE", script="random_asset.lua"),
    Scenario("keyset", "keyset walk, all assets by next_cursor", walk=True, target=Target(max_seconds=30)),
    Scenario(
        "export",
        "GET /data/export (CSV of all assets), rows/s",
        "/data/export",
        export=True,
        target=Target(min_rate=100_000, max_growth_mb=EXPORT_GROWTH_MB),
    ),
    Scenario(
        "export-gzip",
        "GET /data/export, Accept-Encoding: gzip, rows/s",
        "/data/export",
        headers=("Accept-Encoding: gzip",),
        export=True,
        target=Target(min_rate=100_000, max_growth_mb=EXPORT_GROWTH_MB),
    ),
    Scenario("mixed", "a dashboard's mix, 64 connections, 200,000 assets", mixed=False, target=Target(max_p99_ms=50)),
    Scenario(
        "mixed-writes",
        "the same while 3 ETL runs commit 20,000 changed rows each",
        mixed=True,
        target=Target(max_p99_ms=100),
    ),
)
BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
CEILING = SCENARIOS[0]


@dataclass(frozen=True)
class Result:
    """A scenario's measure, with the ceiling measured right before it (or, for a ceiling run, whose it is)."""

    scenario: Scenario
    measure: Measure  # in the default configuration (a log line per request)
    ceiling: Measure | None = None
    before: Scenario | None = None
    quiet: Measure | None = None  # the same scenario with LOG_LEVEL=warning, right after


# --- the store ------------------------------------------------------------


def etl_source(rev: str | None) -> Path:
    """The folder of the etl.py (and its store.sql) that builds the store: the work tree, or a commit's."""
    if rev is None:
        return ROOT
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    folder = OUT / f"etl-at-{sha[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("etl.py", "store.sql"):
        (folder / name).write_text(git("show", f"{sha}:{name}"))
    return folder


def store_key(rows: int, etl_dir: Path) -> str:
    """What the store depends on: the row count and the code that builds it."""
    digest = hashlib.blake2b(digest_size=6)
    for path in (etl_dir / "etl.py", etl_dir / "store.sql", BENCH / "gen_csv.py"):
        digest.update(path.read_bytes())
    return f"{rows}-{digest.hexdigest()}"


def remove_store(db: Path) -> None:
    """Delete a store with its WAL, lock and id sample."""
    for path in [*db.parent.glob(db.name + "*"), db.with_suffix(".ids")]:
        path.unlink(missing_ok=True)


def require(*tools: str) -> None:
    """Exit with the Debian packages to install when a tool a benchmark runs is not on PATH."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"this benchmark runs {', '.join(missing)}: apt-get install -y {' '.join(missing)}")


def build_store(rows: int, etl_dir: Path) -> tuple[Path, str]:
    """A store of `rows` generated assets loaded by the real etl.py, reused while etl.py is unchanged."""
    key = store_key(rows, etl_dir)
    OUT.mkdir(parents=True, exist_ok=True)  # a fresh clone has no bench/out yet
    db = OUT / f"api-{key}.db"
    if db.exists():
        with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
            (ms,) = conn.execute("SELECT duration_ms FROM etl_run ORDER BY run_id DESC LIMIT 1").fetchone()
        return db, f"reused {db.name} (etl.py took {ms / 1000:.1f} s when it was built)"
    for stale in OUT.glob(f"api-{rows}-*.db"):
        remove_store(stale)
    csv = OUT / f"etl-{rows}.csv"  # the same file bench/etl_bench.py makes and reuses
    if not csv.exists():
        print(f"generating {csv.name} ...", flush=True)
        write_csv(csv, rows)
    building = OUT / f"api-{key}.building.db"
    remove_store(building)
    print(f"loading {rows:,} assets with etl.py ...", flush=True)
    started = time.perf_counter()
    etl = subprocess.run(
        [sys.executable, str(etl_dir / "etl.py"), "--db", str(building), f"csv:{csv}"],
        cwd=ROOT,
        env={**os.environ, "LOG_LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        check=False,
    )
    seconds = time.perf_counter() - started
    if etl.returncode != 0:
        sys.exit(f"etl.py failed with exit code {etl.returncode}")
    for suffix in ("-wal", "-shm", ".etl-lock"):  # the WAL is checkpointed and empty once etl.py has ended
        building.with_name(building.name + suffix).unlink(missing_ok=True)
    building.rename(db)
    return db, f"built {db.name}: etl.py took {seconds:.1f} s"


def sample_ids(db: Path, count: int | None) -> Path:
    """A file of `count` real asset ids (all of them when None), drawn reproducibly, for random_asset.lua."""
    path = db.with_suffix(".ids" if count is not None else ".all-ids")
    if not path.exists():
        with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
            ids = [row[0] for row in conn.execute("SELECT asset_id FROM asset")]
        chosen = random.Random(7).sample(ids, len(ids) if count is None else min(count, len(ids)))
        path.write_text("".join(quote(asset_id, safe="") + "\n" for asset_id in chosen))
    return path


def zipf_ids(db: Path, draws: int = 1_000_000, s: float = 1.1) -> Path:
    """A file of `draws` asset ids, the asset of rank k drawn with probability k^-s / H(N, s): a few coins get
    most lookups, as they do in real traffic. random_asset.lua picks its lines uniformly."""
    path = db.with_suffix(".zipf-ids")
    if not path.exists():
        with contextlib.closing(sqlite3.connect(read_only_uri(db), uri=True)) as conn:
            ids = [row[0] for row in conn.execute("SELECT asset_id FROM asset ORDER BY rank, asset_id")]
        weights = itertools.accumulate(k**-s for k in range(1, len(ids) + 1))
        chosen = random.Random(7).choices(ids, cum_weights=list(weights), k=draws)
        path.write_text("".join(quote(asset_id, safe="") + "\n" for asset_id in chosen))
    return path


# --- servers --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A uvicorn process serving one app on HOST."""

    name: str
    process: subprocess.Popen
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_ticks(self) -> int:
        """User + system clock ticks the server has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])

    def settle(self) -> float:
        """Wait until the server is idle (requests left over by wrk are done); return the seconds waited."""
        started = time.monotonic()
        quiet, ticks = 0, self.cpu_ticks()
        while quiet < 2 and time.monotonic() - started < SETTLE_TIMEOUT:
            time.sleep(0.25)
            previous, ticks = ticks, self.cpu_ticks()
            quiet = quiet + 1 if ticks - previous <= 2 else 0
        return time.monotonic() - started

    def memory_mb(self) -> tuple[float, float]:
        """VmRSS and VmHWM (peak RSS) of the server, in MB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = {key: int(value.split()[0]) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(.*)$", status, re.M)}
        return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024


# How users run the API (README: `uvicorn kasparro:app`, LOG_LEVEL unset: info, a log line per request),
# and the quiet configuration beside it. uvicorn picks uvloop and httptools by itself when installed.
DEFAULT: dict[str, str] = {}
QUIET = {"LOG_LEVEL": "warning"}


@contextlib.contextmanager
def serve(name: str, app: str, env: dict[str, str], ready_path: str, logs: dict[str, str] = QUIET) -> Iterator[Server]:
    """Run `uvicorn app` on a free port until the block ends; it answers ready_path before we yield.

    `logs` is DEFAULT (as the README runs it) or QUIET (LOG_LEVEL=warning, uvicorn's own lines off too)."""
    port = free_port()
    argv = [runtime_python(), "-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
    if logs is QUIET:
        argv += ["--no-access-log", "--log-level", "warning"]
    environ = {key: value for key, value in os.environ.items() if key != "LOG_LEVEL"}
    with running(name, argv, {**environ, **logs, **env}, port, ready_path, OUT / f"{name}.log") as server:
        yield server


@contextlib.contextmanager
def running(name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str, log: Path) -> Iterator[Server]:
    """Run a server's command line until the block ends, its output in `log`; it answers ready_path when yielded."""
    with log.open("w") as output:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(name, process, port)
    try:
        wait_ready(server, ready_path, log)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(server: Server, path: str, log: Path, timeout: float = READY_TIMEOUT) -> None:
    """Poll until the server answers 200, it dies, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            sys.exit(f"{server.name} exited with code {server.process.returncode}; see {log}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    sys.exit(f"{server.name} did not answer {path} within {timeout:g} s; see {log}")


# --- load -----------------------------------------------------------------

UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * UNITS_MS[unit]


def parse_wrk(output: str) -> Measure:
    """Requests/s, p50, p99 and failures from wrk --latency output."""
    done = re.search(r"^\s+(\d+) requests in ", output, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (done and rate and p50 and p99):
        sys.exit(f"cannot read wrk's output:\n{output}")
    answered = int(done.group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return Measure(
        requests_per_s=float(rate.group(1)),
        p50_ms=wrk_ms(p50.group(1)) if answered else math.nan,
        p99_ms=wrk_ms(p99.group(1)) if answered else math.nan,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, sockets.groups())) if sockets else 0,
        note=f"{answered:,} responses" if answered < MIN_RESPONSES else "",
    )


def wrk(server: Server, scenario: Scenario, seconds: float, env: dict[str, str], label: str) -> Measure:
    """One wrk run; its output is kept as bench/out/wrk-<scenario>-<label>.txt."""
    argv = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds:g}s", f"--timeout={WRK_TIMEOUT}s", "--latency"]
    if scenario.script:
        argv += ["-s", str(BENCH / scenario.script)]
    for header in scenario.headers:
        argv += ["-H", header]
    argv.append(f"http://{HOST}:{server.port}{scenario.path}")
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stderr}")
    (OUT / f"wrk-{scenario.name}-{label}.txt").write_text(done.stdout)
    return parse_wrk(done.stdout)


def load(
    server: Server, scenario: Scenario, warmup: float, duration: float, env: dict[str, str], profile: bool = False
) -> Measure:
    """A wrk warm-up, then the measured wrk run, each started with the server idle; a script that draws at random
    (random_asset.lua) draws with another seed in each."""
    wrk(server, scenario, warmup, {**env, "BENCH_SEED": "7"}, "warmup")
    server.settle()
    profiler = profiled(server, scenario, duration) if profile else None
    measure = wrk(server, scenario, duration, {**env, "BENCH_SEED": "8"}, "measured")
    if profiler is not None:
        profiler.wait()
    busy = server.settle()
    if busy >= 1:  # requests wrk gave up on, still being served
        measure.note = ", ".join(filter(None, [measure.note, f"server busy {busy:.0f} s after wrk ended"]))
    return measure


def set_page_cache(db: Path, state: str) -> None:
    """Leave the store's file in the kernel's page cache as it is, read it all in (warm), or drop its pages
    (cold: POSIX_FADV_DONTNEED, which drops the clean pages no process maps, as a kernel's reclaim would)."""
    if state == "as-is":
        return
    with db.open("rb", buffering=0) as store:
        if state == "cold":
            os.posix_fadvise(store.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return
        while store.read(1 << 20):
            pass


def profile_path(scenario: Scenario) -> Path:
    return OUT / f"profile-{scenario.name}.txt"


def profiled(server: Server, scenario: Scenario, seconds: float) -> subprocess.Popen:
    """py-spy sampling the server for `seconds`, writing collapsed stacks under bench/out."""
    profile_path(scenario).unlink(missing_ok=True)
    return subprocess.Popen(
        ["py-spy", "record", "--pid", str(server.pid), "--duration", str(round(seconds)), "--rate", "200",
         "--threads", "--format", "raw", "--output", str(profile_path(scenario))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


class WalkPage(msgspec.Struct):
    """The part of a GET /data page the keyset walk reads."""

    data: list[dict[str, object]]
    next_cursor: str | None


decode_page = msgspec.json.Decoder(WalkPage).decode


def keyset_walk(server: Server, expected: int) -> Measure:
    """Follow next_cursor over every asset on one keep-alive connection; check each is seen once."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=30)
    seen: set[object] = set()
    latencies: list[float] = []
    failures, pages = 0, 0
    path: str | None = f"/data?page_size={PAGE_SIZE}"
    started = time.perf_counter()
    while path is not None:
        sent = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        latencies.append(time.perf_counter() - sent)
        pages += 1
        if response.status != 200:
            failures += 1
            print(f"keyset walk: {path} -> {response.status}: {body[:200]!r}", file=sys.stderr)
            break
        page = decode_page(body)
        seen.update(asset["asset_id"] for asset in page.data)
        path = f"/data?page_size={PAGE_SIZE}&cursor={quote(page.next_cursor)}" if page.next_cursor else None
    seconds = time.perf_counter() - started
    conn.close()
    latencies.sort()
    complete = len(seen) == expected
    return Measure(
        requests_per_s=pages / seconds,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        non_2xx=failures + (0 if complete else 1),
        socket_errors=0,
        seconds=seconds,
        note=f"{len(seen):,} distinct ids in {pages:,} pages" + ("" if complete else f", expected {expected:,}"),
    )


def export_stream(server: Server, scenario: Scenario, expected: int) -> Measure:
    """One GET of the export, read to the end in 1 MB pieces (decompressed when gzip), its rows counted, and the
    server's RSS sampled every 50 ms meanwhile: rows/s, and the peak RSS during it minus the RSS before; and the
    server's CPU time, whose rows per CPU-second other tenants of the machine do not change."""
    rss_before = server.memory_mb()[0]
    ticks = server.cpu_ticks()
    peak, done = [rss_before], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):  # sampling interval
            peak[0] = max(peak[0], server.memory_mb()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
    headers = dict(header.split(": ", 1) for header in scenario.headers)
    started = time.perf_counter()
    conn.request("GET", scenario.path, headers=headers)
    response = conn.getresponse()
    first = time.perf_counter() - started
    inflate = zlib.decompressobj(31) if response.getheader("Content-Encoding") == "gzip" else None
    lines = received = 0
    while piece := response.read(1 << 20):
        received += len(piece)
        lines += (inflate.decompress(piece) if inflate else piece).count(b"\n")
    seconds = time.perf_counter() - started
    cpu = (server.cpu_ticks() - ticks) / os.sysconf("SC_CLK_TCK")
    done.set()
    sampler.join()
    conn.close()
    rows = lines - 1  # the header row
    growth = peak[0] - rss_before
    return Measure(
        requests_per_s=rows / seconds,
        p50_ms=first * 1000,  # time to the first byte
        p99_ms=seconds * 1000,  # time to the last
        non_2xx=int(response.status != 200 or rows != expected),
        socket_errors=0,
        seconds=seconds,
        note=f"{rows:,} rows, {received / 1e6:,.0f} MB in {seconds:.1f} s; server CPU {cpu:.1f} s,"
        f" {rows / cpu if cpu else math.inf:,.0f} rows per CPU-second; server RSS {rss_before:.0f} MB before,"
        f" peak {peak[0]:.0f} MB during (+{growth:.0f} MB); p50 = first byte, p99 = last",
        growth_mb=growth,
    )


# --- report ---------------------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def commit_id() -> str:
    return git("rev-parse", "--short", "HEAD").strip() + ("+dirty" if git("status", "--porcelain").strip() else "")


def quiet_cell(result: Result, ceiling: float) -> str:
    """The quiet run's throughput and share of the same ceiling; empty without one."""
    if result.quiet is None:
        return ""
    share = f", {result.quiet.requests_per_s / ceiling:.1%}" if result.ceiling else ""
    return f"{result.quiet.requests_per_s:,.0f}{share}"


def table(results: list[Result], memory: tuple[float, float] | None, pages: int) -> list[str]:
    lines = [
        "| scenario | req/s | p50 | p99 | vs ceiling | LOG_LEVEL=warning: req/s, vs ceiling | non-2xx + socket errors"
        " | target | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        scenario, measure = result.scenario, result.measure
        ceiling = result.ceiling.requests_per_s if result.ceiling else math.inf
        ratio = f"{measure.requests_per_s / ceiling:.1%}" if result.ceiling else ""
        versus = scenario.target.versus if scenario.target else None
        base = next((r.measure for r in results if r.scenario.name == versus and not r.scenario.on_ceiling), None)
        if versus is not None:  # the target is a share of that scenario's throughput in this run
            ceiling = base.requests_per_s if base else math.inf
            ratio = f"{measure.requests_per_s / ceiling:.1%} of {versus}" if base else f"(no {versus})"
        if scenario.on_ceiling:
            ratio = "100.0%"
        if scenario.walk:
            ratio = f"{measure.seconds:.1f} s total"
        target = str(scenario.target) if scenario.target else ""
        verdict = ("PASS" if scenario.target.met(measure, ceiling) else "FAIL") if scenario.target else ""
        if scenario.target and scenario.target.min_ratio is not None and not result.ceiling and not base:
            verdict = "(no ceiling)"
        title = scenario.shown_title(pages)
        if result.before is not None:
            title = f"{title}, before {result.before.name}"
        title = f"{title} ({measure.note})" if measure.note else title
        cells = [
            title,
            f"{measure.requests_per_s:,.0f}" if measure.requests_per_s >= 100 else f"{measure.requests_per_s:.2g}",
            "n/a" if math.isnan(measure.p50_ms) else f"{measure.p50_ms:.2f} ms",
            "n/a" if math.isnan(measure.p99_ms) else f"{measure.p99_ms:.2f} ms",
            ratio,
            quiet_cell(result, ceiling),
            f"{measure.non_2xx} + {measure.socket_errors}"
            + (f" (quiet: {result.quiet.non_2xx} + {result.quiet.socket_errors})" if result.quiet else ""),
            target,
            verdict,
        ]
        lines.append(f"| {' | '.join(cells)} |")
    ceilings = [r.measure.requests_per_s for r in results if r.scenario.on_ceiling]
    if len(ceilings) > 1:
        lines.append(f"\nThe ceiling over this run: {min(ceilings):,.0f} to {max(ceilings):,.0f} req/s.")
    if memory is not None:
        rss, peak = memory
        verdict = "PASS" if rss <= RSS_LIMIT_MB else "FAIL"
        cells = ["API memory after the scenarios above", "", f"RSS {rss:.0f} MB", f"peak {peak:.0f} MB", "", "", ""]
        cells += [f"RSS <= {RSS_LIMIT_MB} MB", verdict]
        lines.insert(len(lines) - (len(ceilings) > 1), f"| {' | '.join(cells)} |")
    return lines


def peer_table(results: list[Result], args: argparse.Namespace) -> list[str]:
    """Each peer serving the same rows from its own store, on the page scenarios measured above; Kasparro's
    requests/s in its default configuration divided by the peer's (target: >= 100x on the first page)."""
    ours = {r.scenario.name: r.measure for r in results if r.scenario.name in peers.KASPARRO_PATHS}
    lines = ["| peer | scenario | req/s | p50 | p99 | non-2xx + socket errors | Kasparro / peer | target |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for peer in peers.PEERS:
        store, note = peer.build(args.rows, OUT)
        print(f"{peer.name}: {note}", flush=True)
        with peers.serve(peer, store) as server:
            for name, path in peer.paths.items():
                if name not in ours:
                    continue
                print(f"{peer.name} {name} ...", flush=True)
                scenario = Scenario(f"{peer.name}-{name}", peer.title, path)
                measure = load(server, scenario, args.warmup, args.duration, {})
                times = ours[name].requests_per_s / measure.requests_per_s if measure.requests_per_s else math.inf
                target = ">= 100x" if name == "first-page" else ""
                verdict = f" ({'PASS' if times >= 100 else 'FAIL'})" if target else ""
                cells = [peer.title, name, f"{measure.requests_per_s:,.1f}", f"{measure.p50_ms:.1f} ms",
                         f"{measure.p99_ms:.1f} ms", f"{measure.non_2xx} + {measure.socket_errors}",
                         f"{times:,.0f}x", target + verdict]  # fmt: skip
                lines.append(f"| {' | '.join(cells)} |")
    return lines


# --- CLI ------------------------------------------------------------------


def stop_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by {signal.Signals(signum).name}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="assets in the generated store")
    parser.add_argument("--duration", type=float, default=15, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of the wrk run before each measured one")
    parser.add_argument(
        "--scenario", action="append", choices=list(BY_NAME), help="run only these (repeatable; default: all)"
    )
    parser.add_argument("--etl-rev", help="build the store with etl.py as of this commit (default: the work tree)")
    parser.add_argument("--profile", action="store_true", help="py-spy the API during each measured run")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip the FastAPI and Datasette peers")
    parser.add_argument(
        "--page-cache",
        choices=("as-is", *PAGE_CACHE_STATES),
        default="as-is",
        help="the store's file before each API wrk scenario's warm-up: as the page cache holds it, read, or dropped",
    )
    parser.add_argument(
        "--no-quiet", dest="quiet", action="store_false", help="skip each scenario's run at LOG_LEVEL=warning"
    )
    return parser.parse_args(argv)


def random_pages(rows: int) -> int:
    """The pages random_page.lua draws from: 1..RANDOM_PAGES, fewer on a small store."""
    return max(1, min(RANDOM_PAGES, rows // PAGE_SIZE))


def scenario_envs(db: Path, rows: int) -> dict[str, dict[str, str]]:
    """wrk's environment for the scenarios of each `ids` (Scenario.ids): the pages and ids files their scripts read."""
    ids_files = {"sample": sample_ids(db, SAMPLE_IDS), "all": sample_ids(db, None), "zipf": zipf_ids(db)}
    return {ids: {"BENCH_PAGES": str(random_pages(rows)), "BENCH_IDS": str(path)} for ids, path in ids_files.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    chosen = [BY_NAME[name] for name in args.scenario] if args.scenario else list(SCENARIOS)
    if any(s.target and s.target.min_ratio for s in chosen) and BY_NAME["ceiling"] not in chosen:
        chosen.insert(0, BY_NAME["ceiling"])  # ratios need the ceiling of this run
    for versus in {s.target.versus for s in chosen if s.target and s.target.versus} - {s.name for s in chosen}:
        chosen.append(BY_NAME[versus])  # a share of another scenario needs that one measured in the same run
    chosen.sort(key=SCENARIOS.index)
    require("wrk")

    OUT.mkdir(parents=True, exist_ok=True)
    db, etl_note = build_store(args.rows, etl_source(args.etl_rev))
    if args.etl_rev:
        etl_note += f" (etl.py as of {args.etl_rev})"
    print(etl_note, flush=True)
    pages = random_pages(args.rows)
    envs = scenario_envs(db, args.rows)
    results: list[Result] = []
    memory = None

    def run(server: Server, scenario: Scenario, label: str = "") -> Measure:
        print(f"{scenario.name}{label} ...", flush=True)
        if scenario.walk:
            return keyset_walk(server, args.rows)
        if scenario.export:
            return export_stream(server, scenario, args.rows)
        if scenario.mixed is not None:
            import mixed_load  # it builds on this module: imported once this one is whole

            return mixed_load.measure(2 * args.duration, writes=scenario.mixed)
        if not scenario.on_ceiling:
            set_page_cache(db, args.page_cache)
        return load(server, scenario, args.warmup, args.duration, envs[scenario.ids], args.profile)

    # The machine's speed drifts by up to ±10 % within minutes (other tenants), so the ceiling is
    # measured again right before each wrk scenario and the scenario's ratio is to that measurement.
    api_runs = [s for s in chosen if not s.on_ceiling]
    with contextlib.ExitStack() as servers:
        ceiling = servers.enter_context(serve("ceiling", "bench.ceiling:app", {}, "/")) if CEILING in chosen else None
        api_env = {"KASPARRO_DB": str(db), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}
        api = servers.enter_context(serve("api", "kasparro:app", api_env, "/health", DEFAULT)) if api_runs else None
        quiet = None
        if api_runs and args.quiet:
            quiet = servers.enter_context(serve("api-quiet", "kasparro:app", api_env, "/health", QUIET))
        if ceiling is not None and not any(not s.walk for s in api_runs):
            results.append(Result(CEILING, run(ceiling, CEILING)))
        for scenario in api_runs:
            assert api is not None
            alone = scenario.walk or scenario.export or scenario.mixed is not None  # no ratio to the ceiling
            paired = None if ceiling is None or alone else run(ceiling, CEILING, f" (before {scenario.name})")
            if paired is not None:
                results.append(Result(CEILING, paired, before=scenario))
            measure = run(api, scenario)
            quiet_measure = run(quiet, scenario, " (LOG_LEVEL=warning)") if quiet and not alone else None
            results.append(Result(scenario, measure, paired, quiet=quiet_measure))
        if api is not None:
            memory = api.memory_mb()

    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    header = f"### bench-api, {args.rows:,} rows, commit {commit_id()}, {when}"
    setup = (
        f"wrk -t{THREADS} -c{CONNECTIONS} --timeout {WRK_TIMEOUT}s, warm-up {args.warmup:g} s, measured"
        f" {args.duration:g} s, server idle before each; the ceiling measured again right before each wrk scenario;"
        f" the API as the README runs it (`uvicorn kasparro:app`, LOG_LEVEL unset: a JSON log line per request to"
        f" a file, from a venv of requirements.txt alone), then at LOG_LEVEL=warning; uvicorn 1 worker, uvloop +"
        f" httptools; {os.cpu_count()} CPUs shared"
        f" by wrk and server; {etl_note}"
    )
    if args.page_cache != "as-is":
        setup += f"; the store's file {PAGE_CACHE_STATES[args.page_cache]} before each API wrk scenario's warm-up"
    lines = [header, "", setup, "", *table(results, memory, pages)]
    if args.peers and any(r.scenario.name in peers.KASPARRO_PATHS for r in results):
        lines += ["", "Peers over the same rows, each from the store it loads itself (bench/peers.py):", ""]
        lines += peer_table(results, args)
    print("\n" + "\n".join(lines))
    if args.profile:
        for result in results:
            if profile_path(result.scenario).exists() and not result.scenario.walk:
                print("", *summarise(profile_path(result.scenario)), sep="\n")
        print(f"\nprofiled run: figures perturbed by py-spy, so not appended to {RESULTS.name}")
        return
    with RESULTS.open("a") as out:
        out.write("\n".join(["", *lines, ""]))


if __name__ == "__main__":
    main()
