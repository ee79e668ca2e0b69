"""Shared fixtures: a sample store built by the real etl.py, and API clients over it."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import falcon.testing
import pytest
from falcon.util import async_to_sync

import kasparro
from etl_support import ROOT, SmallDisk, run_etl, write_csv
from kasparro import Config, create_app
from stores import read_only_uri
from upstream import FakeUpstream

__all__ = ["ROOT", "exchange", "http_get", "referenced_urls", "run_etl", "write_csv"]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test talks to anything but this machine's loopback (subprocesses get loopback URLs)."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                loopback = ipaddress.ip_address(address[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise AssertionError(f"a test tried to connect to {address!r}, outside 127.0.0.1")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(autouse=True)
def log_stream_of_the_test() -> Iterator[None]:
    """The API's log lines go to the stdout each test has: create_app points them at sys.stdout as it finds it, and
    a test with capsys leaves them pointing at a capture closed at its end, which a later test's lines would meet."""
    yield
    kasparro.log_lines.flush()
    kasparro.log_lines.stream = sys.stdout.buffer


class SyncConductor:
    """An ASGIConductor driven from plain test functions: one app lifespan around many requests."""

    def __init__(self, app: Any) -> None:
        self.conductor = falcon.testing.ASGIConductor(app)

    def __enter__(self) -> Self:
        async_to_sync(self.conductor.__aenter__)
        return self

    def __exit__(self, *exc_info: object) -> None:
        async_to_sync(self.conductor.__aexit__, None, None, None)

    def get(self, path: str, **kwargs: Any) -> falcon.testing.Result:
        return async_to_sync(self.conductor.simulate_get, path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> falcon.testing.Result:
        return async_to_sync(self.conductor.simulate_request, method, path, **kwargs)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    """A fake CoinPaprika and CoinGecko on 127.0.0.1, stopped after the test."""
    with FakeUpstream() as server:
        yield server


@pytest.fixture(scope="session")
def big_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200k generated rows, every 997th invalid."""
    return write_csv(tmp_path_factory.mktemp("big") / "big.csv", 200_000, bad_every=997)


@pytest.fixture(scope="session")
def big_clean(tmp_path_factory: pytest.TempPathFactory, big_csv: Path) -> Path:
    """The store one uninterrupted run makes of big_csv (do not write to it)."""
    db = tmp_path_factory.mktemp("clean") / "clean.db"
    result = run_etl(db, f"csv:{big_csv}")
    assert result.returncode == 0, result.stderr
    return db


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped sample loaded by the real etl.py, once per session (do not write to it)."""
    db = tmp_path_factory.mktemp("sample") / "kasparro.db"
    result = run_etl(db)
    assert result.returncode == 0, result.stderr + result.stdout
    return db


@pytest.fixture
def store_path(sample_store: Path, tmp_path: Path) -> Path:
    """A private copy of the sample store (the ETL checkpointed its WAL when it ended)."""
    db = tmp_path / "kasparro.db"
    shutil.copyfile(sample_store, db)
    return db


@pytest.fixture
def make_client() -> Iterator[Any]:
    """Factory: a started client over create_app(config); every client is shut down after the test."""
    started: list[SyncConductor] = []

    def make(config: Config, app: Any = None) -> SyncConductor:
        client = SyncConductor(app if app is not None else create_app(config)).__enter__()
        started.append(client)
        return client

    yield make
    for client in started:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Any, store_path: Path) -> SyncConductor:
    """A client over a private copy of the sample store."""
    return make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))


@pytest.fixture(scope="session")
def shared_client(sample_store: Path) -> Iterator[SyncConductor]:
    """A read-only client over the session's sample store, for property tests."""
    with SyncConductor(create_app(Config(db=sample_store, log_level="warning"))) as conductor:
        yield conductor


@pytest.fixture(scope="session")
def sample_assets(sample_store: Path) -> list[dict[str, Any]]:
    """Every asset of the sample store with its listed sources, read directly for checking answers."""
    conn = sqlite3.connect(read_only_uri(sample_store), uri=True)
    conn.row_factory = sqlite3.Row
    try:
        assets = [dict(row) for row in conn.execute("SELECT * FROM asset")]
        listed: dict[str, set[str]] = {}
        for asset_id, source in conn.execute("SELECT asset_id, source FROM source_map WHERE observed_at IS NOT NULL"):
            listed.setdefault(asset_id, set()).add(source)
    finally:
        conn.close()
    for asset in assets:
        asset["listed"] = listed.get(asset["asset_id"], set())
    return assets


@dataclass
class LiveServer:
    """A running `uvicorn kasparro:app` on 127.0.0.1, with its output collected in a file."""

    base: str
    process: subprocess.Popen[bytes]
    output: Path

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET without raising on HTTP errors: (status, lower-cased headers, body)."""
        return http_get(self.base, path, headers)


def http_get(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET without raising on HTTP errors: (status, lower-cased headers, body)."""
    request = urllib.request.Request(base + path, headers=headers or {})  # noqa: S310 - http to 127.0.0.1
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def exchange(
    base: str,
    method: str,
    target: str,
    headers: dict[str, str | bytes] | Sequence[tuple[str, str | bytes]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection, read until the server closes it: (status, lower-cased headers,
    every byte after the headers). A HEAD whose server sent a body shows it here. A header value given as
    bytes is sent as they are (a str in UTF-8); headers given as (name, value) pairs may repeat a name, a line
    each."""
    address = urlsplit(base)
    assert address.hostname and address.port
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: {address.netloc}".encode(), b"Connection: close"]
    pairs = headers.items() if isinstance(headers, dict) else headers or ()
    lines += [name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
              for name, value in pairs]  # fmt: skip
    received = bytearray()
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        while chunk := conn.recv(1 << 16):
            received += chunk
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}, body


class References(HTMLParser):
    """Every URL an HTML page makes the browser load: src of scripts, images and frames, href of links."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = "href" if tag == "link" else "src"
        self.urls += [value for name, value in attrs if name == wanted and value]


def referenced_urls(html: bytes) -> list[str]:
    parser = References()
    parser.feed(html.decode())
    return parser.urls


# Debian's chromium, headless, with every host but 127.0.0.1 unresolvable and none of its own traffic.
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip

BIND_TRIES = 3  # a free port is found by binding port 0, then given to uvicorn: another process may take it between


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: start uvicorn over a store with extra arguments and environment; ready once /health answers."""
    started: list[LiveServer] = []

    def start(db: Path, *args: str, ready_within: float = 30.0, **env: str) -> LiveServer:
        for _ in range(BIND_TRIES):
            server = launch(db, args, env)
            started.append(server)
            deadline = time.monotonic() + ready_within
            while server.process.poll() is None:
                assert time.monotonic() < deadline, f"server not ready in {ready_within} s\n{server.output.read_text()}"
                try:
                    if server.get("/health")[0] == 200:
                        return server
                except OSError:
                    threading.Event().wait(0.05)  # poll interval while the port opens
            log = server.output.read_text()
            assert "address already in use" in log, log  # another process took the free port first: try another
        raise AssertionError(f"no free port taken in {BIND_TRIES} tries")

    def launch(db: Path, args: tuple[str, ...], env: dict[str, str]) -> LiveServer:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        output = tmp_path / f"server-{port}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("KASPARRO_", "PROMETHEUS_"))}
        with output.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", str(port), *args],
                cwd=ROOT, env={**environ, "KASPARRO_DB": str(db), **env}, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return LiveServer(f"http://127.0.0.1:{port}", process, output)

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 3 MB tmpfs: room for the sample store, not for the feed (needs the right to mount)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()!r}); the page-limit case still runs")
    try:
        yield SmallDisk(folder)
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
