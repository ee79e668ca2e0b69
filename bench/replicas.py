"""`just replicas`: a primary, two API replicas and haproxy in network namespaces, with figures.

The primary namespace runs the ETL, `litestream replicate` and an API (only to time commits by);
a store namespace runs Debian's sshd, whose SFTP holds the Litestream replica; each replica
namespace runs deploy/litestream/follow and an API with KASPARRO_ROLE=replica; a balancer
namespace runs haproxy (checking /health), wrk and a watcher that polls every API. Namespaces
are joined by veth pairs only, each a /30 of 10.231.0.0/24, and are removed at the end with
every process and file this made, however it ends. Needs root, haproxy, openssh-server, wrk,
iproute2 (Debian) and requirements-replica.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType

from api_bench import Measure, parse_wrk

from stores import read_only_uri

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
LITESTREAM = ROOT / ".venv" / "bin" / "litestream"
FOLLOW = ROOT / "deploy" / "litestream" / "follow"
PRIMARY_CONFIG = ROOT / "deploy" / "litestream" / "primary.yml"
ASSETS = 2_000  # assets of the generated market; every run moves every price
API_PORT, BALANCER_PORT = 8000, 8080
CONNECTIONS, THREADS = 64, 2
# The follower copies live in memory, as README advises: a copy is rebuilt from the replica after any unclean
# stop, so Litestream's fsyncs, made while it holds the lock the replica's reads wait on, protect nothing.
COPIES = "/dev/shm"  # noqa: S108 - the parent of a mkdtemp directory (mode 700)
CONVERGE_TIMEOUT = 60.0  # seconds a replica may take to serve the primary's data version
FLOOD_SECONDS = 60  # of wrk flooding the replicas with uncached reads while ETL runs are timed one after another
COMPARED = ("/data?page_size=100", "/data?sort=-price_usd&page_size=50&filter_by=active", "/data/coin-42",
            "/data?page=7&page_size=100")  # fmt: skip
NAMES = ("primary", "store", "r1", "r2", "lb")
# veth pairs: (namespace, namespace); pair i takes 10.231.0.4i/30, .4i+1 on the first, .4i+2 on the second.
LINKS = (("primary", "store"), ("store", "r1"), ("store", "r2"), ("lb", "r1"), ("lb", "r2"), ("lb", "primary"))


# Retries: a request that failed to connect, got no answer or a 5xx goes to the other replica.
HAPROXY = """global
    maxconn 4096
    stats socket {socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 10s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 502 503 504
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    timeout check 5s
    default-server inter 1s fall 3 rise 2
"""


def address(pair: int, side: int) -> str:
    return f"10.231.0.{4 * pair + 1 + side}"


def address_of(name: str, seen_from: str) -> str:
    """The address of namespace `name` on the veth it shares with `seen_from`."""
    for pair, link in enumerate(LINKS):
        if set(link) == {name, seen_from}:
            return address(pair, link.index(name))
    raise ValueError(f"no link between {name} and {seen_from}")


def write_market(path: Path, tick: int) -> Path:
    """ASSETS assets observed at second `tick` of one day, every price moved by the tick."""
    lines = ["id,symbol,name,rank,price_usd,market_cap_usd,volume_24h_usd,change_24h_pct,status,last_updated"]
    hour, second = divmod(tick, 3600)
    moment = f"2026-11-25T{hour:02d}:{second // 60:02d}:{second % 60:02d}Z"
    lines += [
        f"coin-{n},C{n},Coin {n},{n},{n * (1 + tick / 1000):.6f},{n * 1000},{n * 10},{tick % 20 - 10},active,{moment}"
        for n in range(1, ASSETS + 1)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- namespaces and processes ---------------------------------------------


@dataclass
class Lab:
    """Everything the demo made: namespaces, processes and a working directory; `close` removes it all."""

    tag: str
    work: Path
    copies: Path  # the replicas' follower copies
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    made_run_sshd: bool = False

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def run(self, *argv: str, **env: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
        if result.returncode:
            raise SystemExit(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def build(self) -> None:
        for name in NAMES:
            self.run("ip", "netns", "add", self.ns(name))
            self.namespaces.append(self.ns(name))
            self.run("ip", "-n", self.ns(name), "link", "set", "lo", "up")
        for pair, (a, b) in enumerate(LINKS):
            ends = [(self.ns(a), f"v{pair}{a[:4]}"), (self.ns(b), f"v{pair}{b[:4]}")]
            self.run("ip", "link", "add", ends[0][1], "netns", ends[0][0], "type", "veth",
                     "peer", "name", ends[1][1], "netns", ends[1][0])  # fmt: skip
            for side, (ns, device) in enumerate(ends):
                self.run("ip", "-n", ns, "addr", "add", f"{address(pair, side)}/30", "dev", device)
                self.run("ip", "-n", ns, "link", "set", device, "up")

    def start(self, name: str, ns: str, *argv: str, **env: str) -> subprocess.Popen[bytes]:
        """A process in namespace `ns`, in its own session (so its children stop with it), logged to work/."""
        with (self.work / f"{name}.log").open("ab") as sink:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(ns), *argv], cwd=ROOT, env={**os.environ, **env},
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes[name] = process
        return process

    def stop(self, name: str, sig: int = signal.SIGTERM) -> str:
        """Signal the process's session; after 10 s, SIGKILL. How long it took to end, in words."""
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return "not running"
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            return "still running 10 s after the signal: killed"
        return f"ended in {time.monotonic() - started:.2f} s"

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.copies, ignore_errors=True)
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


# --- the parts --------------------------------------------------------------


@dataclass
class Demo:
    lab: Lab
    primary_db: Path
    market: Path
    sftp_env: dict[str, str]
    tick: int = 0
    watcher_lines: list[dict] = field(default_factory=list)
    watcher_lock: threading.Lock = field(default_factory=threading.Lock)

    def replica_db(self, replica: str) -> Path:
        return self.lab.copies / replica / "kasparro.db"

    def replica_url(self, seen_from: str) -> str:
        return f"sftp://root@{address_of('store', seen_from)}:22{self.lab.work / 'replica'}"

    def start_sshd(self) -> None:
        keys = self.lab.work / "ssh"
        keys.mkdir()
        for key in ("host", "client"):
            self.lab.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key))
        shutil.copyfile(keys / "client.pub", keys / "authorized_keys")
        (keys / "sshd_config").write_text(
            f"HostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\nMaxStartups 100\nMaxSessions 100\n"
        )
        if not Path("/run/sshd").exists():
            Path("/run/sshd").mkdir(mode=0o755)
            self.lab.made_run_sshd = True
        (self.lab.work / "replica").mkdir()
        self.lab.start("sshd", "store", "/usr/sbin/sshd", "-D", "-e", "-f", str(keys / "sshd_config"))
        self.sftp_env = {
            "LITESTREAM_SFTP_KEY": str(keys / "client"),
            "LITESTREAM_SFTP_HOST_KEY": (keys / "host.pub").read_text().strip(),
        }
        wait_port("store", address_of("store", "primary"), 22, self.lab)

    def commit(self) -> None:
        """One ETL run on the primary with every price moved."""
        self.tick += 1
        write_market(self.market, self.tick)
        result = subprocess.run(
            ["ip", "netns", "exec", self.lab.ns("primary"), str(PYTHON), "etl.py", "--db", str(self.primary_db),
             f"csv:{self.market}"],
            cwd=ROOT, env={**os.environ, "KASPARRO_WAL_CHECKPOINT": "passive", "LOG_LEVEL": "warning"},
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode:
            raise SystemExit(f"etl.py exited {result.returncode}: {result.stderr}")

    def primary_env(self) -> dict[str, str]:
        return {"KASPARRO_DB": str(self.primary_db), "LITESTREAM_REPLICA_URL": self.replica_url("primary"),
                **self.sftp_env}  # fmt: skip

    def start_primary(self) -> None:
        self.lab.start("replicate", "primary", str(LITESTREAM), "replicate", "-config", str(PRIMARY_CONFIG),
                       **self.primary_env())  # fmt: skip
        self.start_api("primary", self.primary_db)

    def rebuild_primary(self) -> float:
        """Lose the primary's store (and Litestream's state beside it), restore it from the replica; seconds taken."""
        self.lab.stop("replicate")
        self.lab.stop("api-primary")
        shutil.rmtree(self.primary_db.parent)
        self.primary_db.parent.mkdir()
        started = time.monotonic()
        self.lab.run("ip", "netns", "exec", self.lab.ns("primary"), str(LITESTREAM), "restore", "-config",
                     str(PRIMARY_CONFIG), str(self.primary_db), **self.primary_env())  # fmt: skip
        return time.monotonic() - started

    def start_api(self, ns: str, db: Path, **env: str) -> None:
        self.lab.start(f"api-{ns}", ns, str(PYTHON), "-m", "uvicorn", "kasparro:app", "--host", "0.0.0.0",  # noqa: S104 - the namespace's own veths
                       "--port", str(API_PORT), "--no-access-log", "--timeout-graceful-shutdown", "3",
                       KASPARRO_DB=str(db), LOG_LEVEL="warning", **env)  # fmt: skip

    def start_follower(self, replica: str) -> None:
        env = {"KASPARRO_DB": str(self.replica_db(replica)), "LITESTREAM_REPLICA_URL": self.replica_url(replica),
               "LITESTREAM": str(LITESTREAM), **self.sftp_env}  # fmt: skip
        self.lab.start(f"follow-{replica}", replica, str(FOLLOW), **env)

    def start_replica(self, replica: str) -> None:
        (self.lab.copies / replica).mkdir(exist_ok=True)
        self.start_follower(replica)
        self.start_api(replica, self.replica_db(replica), KASPARRO_ROLE="replica")

    def start_balancer(self) -> None:
        servers = "".join(
            f"    server {replica} {address_of(replica, 'lb')}:{API_PORT} check\n" for replica in ("r1", "r2")
        )
        config = self.lab.work / "haproxy.cfg"
        config.write_text(HAPROXY.format(socket=self.lab.work / "haproxy.sock", port=BALANCER_PORT) + servers)
        self.lab.start("haproxy", "lb", "/usr/sbin/haproxy", "-db", "-f", str(config))
        wait_port("lb", "127.0.0.1", BALANCER_PORT, self.lab)

    def start_watcher(self) -> None:
        """Poll every API from the balancer's namespace; its lines say when each first served a version."""
        targets = [f"{name}={address_of(name, 'lb')}" for name in ("primary", "r1", "r2")]
        self.lab.start("watcher", "lb", str(PYTHON), str(Path(__file__)), "watch", *targets)

    def haproxy_stats(self) -> dict[str, dict[str, int]]:
        """Per server (and backend): retries, redispatches, failed connections and responses, 5xx."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.lab.work / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        header, *rows = [line for line in text.splitlines() if line]
        fields = header.lstrip("# ").split(",")
        wanted = ("wretr", "wredis", "econ", "eresp", "hrsp_5xx", "chkdown")
        stats = {}
        for row in rows:
            values = dict(zip(fields, row.split(","), strict=False))
            if values["pxname"] == "replicas":
                stats[values["svname"]] = {key: int(values[key] or 0) for key in wanted}
        return stats


def wait_port(ns: str, host: str, port: int, lab: Lab, within: float = 30.0) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=1).close()"
    deadline = time.monotonic() + within
    while subprocess.run(["ip", "netns", "exec", lab.ns(ns), sys.executable, "-c", probe],
                         capture_output=True).returncode:  # fmt: skip
        if time.monotonic() > deadline:
            raise SystemExit(f"nothing listens on {host}:{port} in {ns} after {within:g} s")
        time.sleep(0.2)


def in_balancer(lab: Lab, *argv: str) -> str:
    """Run this script's helper mode in the balancer's namespace; its stdout."""
    return lab.run("ip", "netns", "exec", lab.ns("lb"), str(PYTHON), str(Path(__file__)), *argv)


# --- helper modes, run inside the balancer's namespace -----------------------


def watch(targets: list[str]) -> None:
    """Print {"server", "version", "t"} each time an API first serves a new data version: one thread per API,
    each polling every 10 ms, so a slow answer from one API delays no other's."""
    printing = threading.Lock()

    def poll(name: str, host: str) -> None:
        conn: http.client.HTTPConnection | None = None
        seen = None
        while True:
            try:
                conn = conn or http.client.HTTPConnection(host, API_PORT, timeout=2)
                conn.request("GET", "/data?page_size=1")
                response = conn.getresponse()
                body = response.read()
                version = json.loads(body)["data_version"] if response.status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                conn = None
                version = None
            if version and version != seen:
                seen = version
                with printing:
                    print(json.dumps({"server": name, "version": version, "t": time.time()}), flush=True)
            time.sleep(0.01)

    pollers = [threading.Thread(target=poll, args=target.split("=")) for target in targets]
    for poller in pollers:
        poller.start()
    for poller in pollers:
        poller.join()


def fetch(targets: list[str]) -> None:
    """Print, per API, its data version and the COMPARED pages without their per-request fields."""
    pages = {}
    for target in targets:
        name, host = target.split("=")
        answers = {}
        for path in COMPARED:
            conn = http.client.HTTPConnection(host, API_PORT, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            answer = json.loads(response.read())
            answer.pop("request_id", None)
            answer.pop("api_latency_ms", None)
            answers[path] = [response.status, answer]
            conn.close()
        pages[name] = answers
    print(json.dumps(pages))


# --- measurements -------------------------------------------------------------


def follow_watcher(demo: Demo) -> None:
    log = demo.lab.work / "watcher.log"
    with log.open() as lines:
        while "watcher" in demo.lab.processes:
            line = lines.readline()
            if not line:
                time.sleep(0.01)
                continue
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with demo.watcher_lock:
                    demo.watcher_lines.append(event)


def first_seen(demo: Demo, server: str, version: str) -> float | None:
    with demo.watcher_lock:
        return next((e["t"] for e in demo.watcher_lines if e["server"] == server and e["version"] == version), None)


def primary_version(demo: Demo) -> str:
    conn = sqlite3.connect(read_only_uri(demo.primary_db), uri=True)
    try:
        store_id, generation = conn.execute("SELECT store_id, generation FROM store_meta").fetchone()
    finally:
        conn.close()
    return f"{store_id}-{generation}"


def converge(demo: Demo, within: float = CONVERGE_TIMEOUT) -> dict[str, float]:
    """Wait until both replicas served the primary's version; when each API first served it (epoch seconds)."""
    version = primary_version(demo)
    deadline = time.monotonic() + within
    while True:
        seen = {name: first_seen(demo, name, version) for name in ("primary", "r1", "r2")}
        if all(seen.values()):
            return seen
        if time.monotonic() > deadline:
            raise SystemExit(f"replicas did not serve {version} within {within:g} s: {seen}")
        time.sleep(0.02)


def lag_of(seen: dict[str, float]) -> dict[str, float]:
    """Each replica's lag behind the primary's API, seconds."""
    return {name: seen[name] - seen["primary"] for name in ("r1", "r2")}


APPLIED = re.compile(r'^time=(\S+) .*msg="follow: applied updates".* to_txid=([0-9a-f]+)')


def applied(log: Path) -> list[tuple[float, int]]:
    """(when, last txid) of each apply the follower logged."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = APPLIED.match(line)
        if match:
            found.append((datetime.fromisoformat(match[1]).timestamp(), int(match[2], 16)))
    return found


def stages(demo: Demo, replica: str, runs: list[dict[str, float]]) -> dict[str, list[float]]:
    """Each run's lag on a replica in parts, seconds, from the primary's API serving it: to Litestream making its
    LTX file (the monitor interval), to the file's upload ending (the sync interval, SFTP), to the follower's
    apply (its poll interval, listing, download, writing the pages), to the replica's API serving it. The
    apply is the last one logged before the API served the run's version; the file, the one it ended with:
    made at its mtime (Litestream sets it from the file's header), uploaded at its ctime (the rename)."""
    files = {int(path.stem.split("-")[1], 16): path.stat()
             for path in (demo.lab.work / "replica" / "ltx" / "0").glob("*.ltx")}  # fmt: skip
    applies = applied(demo.lab.work / f"follow-{replica}.log")
    parts: dict[str, list[float]] = {"make": [], "upload": [], "poll and apply": [], "serve": []}
    for seen in runs:
        when, txid = max((apply for apply in applies if apply[0] <= seen[replica] + 0.05), default=(0.0, -1))
        if txid in files:
            made, uploaded = files[txid].st_mtime, files[txid].st_ctime
            parts["make"].append(made - seen["primary"])
            parts["upload"].append(uploaded - made)
            parts["poll and apply"].append(when - uploaded)
            parts["serve"].append(seen[replica] - when)
    return parts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wrk(
    demo: Demo,
    seconds: float,
    during: list[tuple[float, str]] | None = None,
    script: str = "random_page.lua",
    commits: Callable[[Demo, threading.Event], None] | None = None,
) -> tuple[Measure, dict]:
    """wrk (bench/`script`) through haproxy at CONNECTIONS while `commits` makes ETL runs until stopped (default:
    one every ~2 s) and `during` (seconds, action) happen."""
    before = demo.haproxy_stats()
    argv = ["ip", "netns", "exec", demo.lab.ns("lb"), "wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{seconds:g}s",
            "--timeout=5s", "--latency", "-s", str(ROOT / "bench" / script),
            f"http://127.0.0.1:{BALANCER_PORT}"]  # fmt: skip
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "BENCH_PAGES": "50"})
    started = time.monotonic()
    stop = threading.Event()
    committer = threading.Thread(target=commits or functools.partial(commit_every, interval=2.0), args=(demo, stop))
    committer.start()
    for at, action in sorted(during or []):
        time.sleep(max(0.0, at - (time.monotonic() - started)))
        act(demo, action)
    load.wait()
    stop.set()
    committer.join()
    measure = parse_wrk(load.stdout.read())
    after = demo.haproxy_stats()
    delta = {server: {k: after[server][k] - before[server][k] for k in after[server]} for server in after}
    return measure, delta


def commit_every(demo: Demo, stop: threading.Event, interval: float) -> None:
    """ETL runs one after another, each starting `interval` seconds after the last began, until `stop`."""
    while not stop.is_set():
        began = time.monotonic()
        demo.commit()
        stop.wait(max(0.0, interval - (time.monotonic() - began)))


def timed_commits(timed: list[dict[str, float]], demo: Demo, stop: threading.Event) -> None:
    """ETL runs one after another until `stop`, each timed to the replicas serving it (converge) into `timed`."""
    while not stop.is_set():
        demo.commit()
        seen = converge(demo)
        if not stop.is_set():  # served while the load ran
            timed.append(seen)


def act(demo: Demo, action: str) -> None:
    verb, part = action.split(" ")
    if verb in ("kill", "term"):
        action += f" ({demo.lab.stop(part, signal.SIGKILL if verb == 'kill' else signal.SIGTERM)})"
    elif part.startswith("api-"):
        replica = part.removeprefix("api-")
        demo.start_api(replica, demo.replica_db(replica), KASPARRO_ROLE="replica")
    else:
        demo.start_follower(part.removeprefix("follow-"))
    print(f"    {time.strftime('%H:%M:%S')} {action}", flush=True)


def integrity(demo: Demo) -> dict[str, str]:
    results = {}
    for replica in ("r1", "r2"):
        conn = sqlite3.connect(read_only_uri(demo.replica_db(replica)), uri=True, timeout=10)
        try:
            results[replica] = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
    return results


def same_pages(demo: Demo) -> tuple[bool, str]:
    targets = [f"{name}={address_of(name, 'lb')}" for name in ("primary", "r1", "r2")]
    pages = json.loads(in_balancer(demo.lab, "fetch", *targets))
    versions = {name: pages[name][COMPARED[0]][1].get("data_version") for name in pages}
    return pages["r1"] == pages["primary"] == pages["r2"], json.dumps(versions)


def api_warnings(lab: Lab) -> dict[str, dict[str, int]]:
    """Warnings and errors each API logged, counted by event and reason: what the 5xx above were."""
    counts: dict[str, dict[str, int]] = {}
    for log in sorted(lab.work.glob("api-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("level") in ("warning", "error"):
                    key = f"{event.get('event')}: {event.get('reason', '')}"[:100]
                    server = counts.setdefault(log.stem, {})
                    server[key] = server.get(key, 0) + 1
    return counts


def show_lags(demo: Demo, timed: list[dict[str, float]]) -> None:
    """Each replica's commit-to-served lag over the runs `timed`, and its parts (stages)."""
    for replica in ("r1", "r2"):
        values = [lag_of(seen)[replica] for seen in timed]
        print(f"  {replica}: p50 {statistics.median(values):.2f} s, p99 {percentile(values, 0.99):.2f} s,"
              f" max {max(values):.2f} s; p50 / max of its parts: "
              + ", ".join(f"{part} {statistics.median(parts):.2f} / {max(parts):.2f} s"
                          for part, parts in stages(demo, replica, timed).items() if parts))  # fmt: skip
    print(f"load average: {' '.join(f'{value:.2f}' for value in os.getloadavg())}", flush=True)


def show_load(label: str, measure: Measure, delta: dict) -> None:
    retried = {server: {k: v for k, v in counts.items() if v} for server, counts in delta.items()}
    print(f"  {label}: {measure.requests_per_s:,.0f} req/s, p50 {measure.p50_ms:.1f} ms, p99 {measure.p99_ms:.1f} ms,"
          f" non-2xx {measure.non_2xx}, socket errors {measure.socket_errors};"
          f" haproxy: {json.dumps({s: c for s, c in retried.items() if c})}", flush=True)  # fmt: skip


def check_machine() -> None:
    """Exit with what is missing: root, the Debian tools, or Litestream in .venv."""
    missing = [tool for tool in ("ip", "haproxy", "sshd", "ssh-keygen", "wrk")
               if not shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")]  # fmt: skip
    if not LITESTREAM.exists():
        missing.append(f"{LITESTREAM} (pip install -r requirements-replica.txt)")
    if missing:
        raise SystemExit(f"just replicas needs: {', '.join(missing)} (Debian: haproxy openssh-server wrk iproute2)")
    if os.geteuid() != 0:
        raise SystemExit("just replicas makes network namespaces: run it as root")


def demo_run(runs: int) -> None:
    check_machine()
    tag = f"kr{os.getpid() % 100000}"
    lab = Lab(tag=tag, work=Path(tempfile.mkdtemp(prefix="kasparro-replicas-")),
              copies=Path(tempfile.mkdtemp(prefix="kasparro-copies-", dir=COPIES)))  # fmt: skip
    signal.signal(signal.SIGTERM, interrupted)
    try:
        lab.build()
        demo = Demo(lab=lab, primary_db=lab.work / "primary" / "kasparro.db", market=lab.work / "market.csv",
                    sftp_env={})  # fmt: skip
        (lab.work / "primary").mkdir()
        print(f"namespaces {', '.join(lab.namespaces)}; work in {lab.work}, copies in {lab.copies}", flush=True)
        demo.start_sshd()
        demo.commit()
        demo.start_primary()
        for replica in ("r1", "r2"):
            demo.start_replica(replica)
        demo.start_balancer()
        (lab.work / "watcher.log").touch()
        demo.start_watcher()
        threading.Thread(target=follow_watcher, args=(demo,), daemon=True).start()
        converge(demo)

        timed = []
        for _ in range(runs):
            demo.commit()
            timed.append(converge(demo))
        print(f"commit-to-served lag over {runs} ETL runs of {ASSETS:,} assets (primary's API to replica's API):")
        show_lags(demo, timed)

        flooded: list[dict[str, float]] = []
        measure, delta = wrk(demo, FLOOD_SECONDS, script="name_scan.lua",
                             commits=functools.partial(timed_commits, flooded))  # fmt: skip
        print(f"the same, {len(flooded)} ETL runs one after another while wrk floods the replicas through haproxy"
              " with reads nothing kept serves (bench/name_scan.lua):")  # fmt: skip
        show_lags(demo, flooded)
        show_load("the flood", measure, delta)

        print(f"through haproxy, wrk {CONNECTIONS} connections, ETL committing every ~2 s:", flush=True)
        show_load("ETL commits", *wrk(demo, 20))
        show_load("r1 API killed at 5 s, back at 12 s",
                  *wrk(demo, 30, [(5, "kill api-r1"), (12, "start api-r1")]))  # fmt: skip
        show_load("r2 API stopped by SIGTERM at 5 s, back at 12 s",
                  *wrk(demo, 20, [(5, "term api-r2"), (12, "start api-r2")]))  # fmt: skip
        show_load("r1 follower killed at 5 s, back at 12 s",
                  *wrk(demo, 30, [(5, "kill follow-r1"), (12, "start follow-r1")]))  # fmt: skip
        show_load("after recovery", *wrk(demo, 15))

        converge(demo)
        equal, versions = same_pages(demo)
        print(f"integrity_check: {integrity(demo)}; /data pages identical on primary, r1, r2: {equal} at {versions}")
        print(f"warnings the APIs logged so far: {json.dumps(api_warnings(lab))}", flush=True)

        print("lost primary: store deleted, rebuilt with litestream restore, one more ETL run:", flush=True)
        restored = demo.rebuild_primary()
        demo.start_primary()
        demo.commit()
        lag = lag_of(converge(demo))
        equal, versions = same_pages(demo)
        print(f"  restored in {restored:.1f} s; replicas served the rebuilt primary's next commit"
              f" {lag['r1']:.2f} s / {lag['r2']:.2f} s after it; integrity_check {integrity(demo)};"
              f" pages identical: {equal} at {versions}")  # fmt: skip
    finally:
        lab.close()
        print(f"removed {', '.join(lab.namespaces)}, {lab.work} and {lab.copies}")


def interrupted(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by {signal.Signals(signum).name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="demo", choices=("demo", "watch", "fetch"))
    parser.add_argument("targets", nargs="*", help="watch/fetch: NAME=ADDRESS of each API")
    parser.add_argument("--runs", type=int, default=20, help="ETL runs timed for the lag (default 20)")
    args = parser.parse_args()
    if args.mode == "watch":
        watch(args.targets)
    elif args.mode == "fetch":
        fetch(args.targets)
    else:
        demo_run(args.runs)


if __name__ == "__main__":
    main()
