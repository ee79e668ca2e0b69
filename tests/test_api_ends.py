"""Every request ends: a bounded wait for a reader, none on a pool being dropped, and SIGTERM stops the server.

SPEC: the API never blocks while the ETL writes; every request ends (a bounded wait for a reader, then a
503 problem with Retry-After), and SIGTERM stops the server within 5 s under any load.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from test_api_faults import PROBLEM, rename_over

from conftest import run_etl, write_csv
from etl_support import query
from kasparro import Config, ReadersBusy, Store, StoreUnavailable, create_app

ASSETS = 1_500
CLIENTS = 16  # concurrent connections: several times the API's 4 readers, so requests queue for them
ANSWER_WITHIN_S = 8.0  # a request not answered by then hangs (the API's own bound on a wait is shorter)
STOP_WITHIN_S = 5.0  # SPEC: SIGTERM stops the server within 5 s under any load
SERVE = ("--timeout-graceful-shutdown", "3")  # as README's and the Containerfile's command


def routes(rng: random.Random, asset_ids: list[str]) -> list[str]:
    """One request of every route that reads through the store's readers, most of them cold."""
    return [
        "/stats",  # a reader on every request
        "/metrics",  # a reader once per commit
        "/health",
        f"/data?filter_by=rank<{rng.randint(2, ASSETS)}&page_size=5",  # a count of its own: a reader
        f"/data?page={rng.randint(100, ASSETS // 10)}",  # bookmarks found by a reader
        f"/data?sort=-price_usd&page={rng.randint(1, 400)}",
        f"/data/{rng.choice(asset_ids)}",
        "/data",
    ]


# --- the reader pool, in process -----------------------------------------------------------------------


async def data_version(store: Store) -> str:
    return str(await store.read(lambda conn, version: version))


@contextlib.asynccontextmanager
async def reader_held(store: Store) -> AsyncIterator[tuple[asyncio.Future[Any], threading.Event]]:
    """Hold a reader in a read that lasts until the block ends or the event is set; yields both."""
    holding, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection, version: Any) -> Any:
        holding.set()
        release.wait(10)
        return version

    held = asyncio.ensure_future(store.read(hold))
    try:
        assert await asyncio.to_thread(holding.wait, 10), "the read never reached a reader"
        yield held, release
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await held


def held_reader_scenario(db: Path, other: Path) -> tuple[str, str, list[str]]:
    """Five requests wait for the only reader while the store file is renamed over: (old, new, theirs)."""

    async def scenario() -> tuple[str, str, list[str]]:
        store = Store(db, readers=1, reopen_interval=0)
        try:
            async with reader_held(store) as (held, _):
                waiters = [asyncio.create_task(data_version(store)) for _ in range(5)]
                await asyncio.sleep(0)  # one turn of the loop: each waiter reaches the pool's queue
                assert not any(waiter.done() for waiter in waiters)
                rename_over(db, other)
                new = (await store.watch()).version  # notices the new file and drops the pool its waiters wait on
            async with asyncio.timeout(5):
                return str(await held), str(new), list(await asyncio.gather(*waiters))
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_requests_waiting_on_a_dropped_pool_read_the_new_store(store_path: Path, market: Any) -> None:
    old, new, theirs = held_reader_scenario(store_path, market[0])
    assert old != new and theirs == [new] * 5


def test_a_wait_for_a_reader_is_bounded(store_path: Path) -> None:
    async def scenario() -> None:
        store = Store(store_path, readers=1)
        store.READER_WAIT = 0.05
        try:
            async with reader_held(store):
                with pytest.raises(ReadersBusy):
                    await data_version(store)
            await data_version(store)  # the reader came back
            async with reader_held(store) as (_, release):
                waiter = asyncio.create_task(data_version(store))
                await asyncio.sleep(0)  # the waiter reaches the pool's queue
                closing = asyncio.create_task(store.close())  # the server stops: the waiter is answered, not forgotten
                with pytest.raises(StoreUnavailable):
                    await waiter
                release.set()  # the held read ends, and closes its connection
                await closing
        finally:
            await store.close()

    asyncio.run(scenario())


def test_all_readers_busy_is_a_503_problem_with_retry_after(store_path: Path) -> None:
    async def scenario() -> None:
        app = create_app(Config(db=store_path, readers=1, log_level="critical"))
        store = app.answers.store
        store.READER_WAIT = 0.05
        async with falcon.testing.ASGIConductor(app) as conductor:
            assert (await conductor.simulate_get("/stats")).status_code == 200
            async with reader_held(store):
                busy = await conductor.simulate_get("/stats")
                metrics = await conductor.simulate_get("/metrics")
                cold = await conductor.simulate_get("/data", params={"filter_by": "rank<7"})
            assert (await conductor.simulate_get("/stats")).status_code == 200
        for result in (busy, cold):
            assert result.status_code == 503 and result.headers["content-type"] == PROBLEM
            assert result.headers["retry-after"] == "1" and "busy" in result.json["detail"]
        assert metrics.status_code == 200  # the request metrics still go out, without the store's facts
        assert "kasparro_store_up 1.0" in metrics.text and "kasparro_assets" not in metrics.text

    asyncio.run(scenario())


# --- the real server under load ------------------------------------------------------------------------


@dataclass
class Load:
    """Client threads sending every route over keep-alive connections until told to stop."""

    port: int
    asset_ids: list[str]
    answers: list[tuple[str, int, str, str]] = field(default_factory=list)  # path, status, media type, Retry-After
    failures: list[str] = field(default_factory=list)  # requests unanswered: hangs, and resets before SIGTERM
    sigterm: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for seed in range(CLIENTS):
            thread = threading.Thread(target=self._client, args=(random.Random(seed),), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(ANSWER_WITHIN_S + 2)
        assert not any(thread.is_alive() for thread in self.threads), "a client is still waiting for an answer"

    def wait_for_answers(self, count: int) -> None:
        """Poll until `count` more requests were answered (bounded)."""
        wanted, deadline = len(self.answers) + count, time.monotonic() + 30
        while len(self.answers) < wanted and not self.failures:
            assert time.monotonic() < deadline, f"{len(self.answers)} answers, not {wanted}, in 30 s"
            threading.Event().wait(0.05)  # poll interval, not a synchronisation

    def _client(self, rng: random.Random) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=ANSWER_WITHIN_S)
        while not self.stop.is_set():
            for path in routes(rng, self.asset_ids):
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    response.read()
                except TimeoutError:
                    self.failures.append(f"{path}: no answer in {ANSWER_WITHIN_S} s")
                    return
                except (OSError, http.client.HTTPException) as error:
                    if not self.sigterm.is_set():  # after it, the stopping server closes connections: no fault
                        self.failures.append(f"{path}: {error!r}")
                    return
                self.answers.append((path, response.status, response.getheader("content-type", ""),
                                     response.getheader("retry-after", "")))  # fmt: skip


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[str]]:
    """A store of ASSETS generated assets, two later snapshots of its source with every price changed, the ids."""
    folder = tmp_path_factory.mktemp("market")
    snapshots = []
    for seed in (1, 2, 3):
        (folder / str(seed)).mkdir()
        snapshots.append(write_csv(folder / str(seed) / "market.csv", ASSETS, seed=seed))  # one source: csv:market
    store = folder / "market.db"
    assert run_etl(store, f"csv:{snapshots[0]}").returncode == 0
    return store, snapshots[1:], [asset_id for (asset_id,) in query(store, "SELECT asset_id FROM asset")]


def route_of(path: str) -> str:
    return "/data/{asset_id}" if path.startswith("/data/") else path.split("?")[0]


@pytest.mark.parametrize("round_", range(3))
def test_every_request_ends_and_sigterm_stops_the_server_while_the_etl_commits(
    round_: int, market: tuple[Path, list[Path], list[str]], live_server: Any, tmp_path: Path
) -> None:
    base, snapshots, asset_ids = market
    db = tmp_path / "kasparro.db"
    shutil.copyfile(base, db)
    server = live_server(db, *SERVE, LOG_LEVEL="warning")
    load = Load(int(server.base.rsplit(":", 1)[1]), asset_ids)
    load.start()
    assert run_etl(db, f"csv:{snapshots[0]}").returncode == 0  # commits and checkpoints under the load
    rename_over(db, base)  # a store replaced by rename: the readers of the old file are dropped
    assert run_etl(db, f"csv:{snapshots[1]}").returncode == 0
    load.wait_for_answers(CLIENTS * 8)  # the load goes on over the final store

    stopping = time.monotonic()
    load.sigterm.set()
    server.process.send_signal(signal.SIGTERM)  # under load: the clients go on sending
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(STOP_WITHIN_S)
    stopped_in = time.monotonic() - stopping
    load.finish()
    output = server.output.read_text()

    assert not load.failures, load.failures[:5]
    seen = set()
    for path, status, media, retry_after in load.answers:
        seen.add((route_of(path), status))
        unhealthy = path == "/health" and media == "application/json"  # a store replaced reads so for a moment
        assert status in (200, 304) or (status == 503 and (media == PROBLEM or unhealthy) and retry_after.isdigit()), (
            path, status, media, retry_after,
        )  # fmt: skip
    assert {route for route, status in seen if status == 200} == {
        route_of(path) for path in routes(random.Random(), asset_ids)
    }
    assert stopped_in < STOP_WITHIN_S, f"still running {stopped_in:.1f} s after SIGTERM\n{output[-3000:]}"
    assert "Traceback" not in output and "timeout graceful shutdown exceeded" not in output, output[-3000:]
