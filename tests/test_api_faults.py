"""Faults on the API side: a store lost, replaced or broken while serving, a long writer, and the doors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.asgi
import falcon.testing
import pytest

from conftest import run_etl, write_csv
from kasparro import Config, RateLimit, Store, authorize_read, create_app

PROBLEM = "application/problem+json"
RECOVERY_WITHIN_S = 10.0  # the live server re-checks its store file once a second


def problem(result: Any, status: int) -> dict[str, Any]:
    """Assert an RFC 9457 problem with the given status and return its body."""
    assert result.status_code == status, result.text
    assert result.headers["content-type"] == PROBLEM
    body = result.json
    assert body["status"] == status and body["request_id"] == result.headers["x-request-id"]
    return body


def digest(db: Path) -> str:
    return hashlib.sha256(db.read_bytes()).hexdigest()


def rename_over(db: Path, content: bytes | Path) -> None:
    """Put new bytes (or a copy of a file) at db the way a restore does: written aside, then renamed."""
    staged = db.with_name(db.name + ".staged")
    if isinstance(content, Path):
        shutil.copyfile(content, staged)
    else:
        staged.write_bytes(content)
    if db.is_dir():
        db.rmdir()
    os.replace(staged, db)


@pytest.fixture(scope="module")
def other_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different store: 40 generated assets (do not write to it)."""
    folder = tmp_path_factory.mktemp("other")
    db = folder / "other.db"
    assert run_etl(db, f"csv:{write_csv(folder / 'other.csv', 40)}").returncode == 0
    return db


# --- store faults, in process ----------------------------------------------------------------
#
# chmod 000 cannot make a file unreadable for root (CAP_DAC_OVERRIDE reads it anyway, and the tests run
# as root), so "unreadable" is made the ways that hold for root too: a directory where the file was, an
# empty file, garbage bytes over the file, or a truncated copy of a good store.


def delete(db: Path, good: Path) -> None:
    db.unlink()


def directory_in_its_place(db: Path, good: Path) -> None:
    db.unlink()
    db.mkdir()


def garbage_over_it(db: Path, good: Path) -> None:
    with db.open("r+b") as store:  # the same inode: the API's open connections keep pointing at it
        store.write(os.urandom(db.stat().st_size))


def truncated_in_place(db: Path, good: Path) -> None:
    os.truncate(db, db.stat().st_size // 3)


def truncated_copy(db: Path, good: Path) -> None:
    rename_over(db, good.read_bytes()[: good.stat().st_size // 3])


def empty_file(db: Path, good: Path) -> None:
    rename_over(db, b"")


FAULTS = [delete, directory_in_its_place, garbage_over_it, truncated_in_place, truncated_copy, empty_file]


@pytest.mark.parametrize("fault", FAULTS, ids=[fault.__name__ for fault in FAULTS])
def test_a_store_broken_while_serving_is_503_then_recovers(
    fault: Callable[[Path, Path], None], make_client: Any, store_path: Path, sample_store: Path
) -> None:
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="critical"))
    assert client.get("/data").status_code == 200
    fault(store_path, sample_store)
    for path in ("/data", "/data/bitcoin", "/stats"):
        result = client.get(path)
        assert "retry" in problem(result, 503)["detail"]
        assert result.headers["retry-after"] == "1"
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json == {"status": "unhealthy", "db_connected": False, "etl_last_run": None, "etl_status": None}
    assert "kasparro_store_up 0.0" in client.get("/metrics").text
    rename_over(store_path, sample_store)
    assert client.get("/data").json["total_items"] == 255
    assert client.get("/health").json["status"] == "healthy"
    assert "kasparro_store_up 1.0" in client.get("/metrics").text


def test_a_store_renamed_over_is_served_with_its_own_data_version(
    make_client: Any, store_path: Path, other_store: Path
) -> None:
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="critical"))
    before = client.get("/data")
    assert before.json["total_items"] == 255
    rename_over(store_path, other_store)
    after = client.get("/data", headers={"If-None-Match": before.headers["etag"]})
    assert after.status_code == 200, "an ETag of the old store must not match the new one"
    assert after.json["total_items"] == 40
    assert after.json["data_version"].split("-")[0] != before.json["data_version"].split("-")[0]
    assert client.get("/data/bitcoin").status_code == 404
    first = after.json["data"][0]["asset_id"]
    assert client.get(f"/data/{first}").json["asset_id"] == first


def test_corruption_met_by_a_query_is_a_503_not_a_500(
    capsys: pytest.CaptureFixture[str], make_client: Any, store_path: Path, sample_store: Path
) -> None:
    """The asset table's root page is garbage, the rest intact: only queries reading it can tell.

    (A page in the default order reads only the covering rank index, which is intact: it is served.)
    """
    with contextlib.closing(sqlite3.connect(store_path)) as conn:
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'asset'").fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    with store_path.open("r+b") as store:
        store.seek((root - 1) * page_size)
        store.write(os.urandom(page_size))
    client = make_client(Config(db=store_path, reopen_interval=0, log_level="warning"))
    for path in ("/data?sort=price_usd", "/data/bitcoin", "/data?sort=-name&filter_by=active"):
        problem(client.get(path), 503)
    logged = capsys.readouterr().out
    assert "database disk image is malformed" in logged and "Traceback" not in logged
    rename_over(store_path, sample_store)
    assert client.get("/data").status_code == 200


# --- store faults, through the real server ------------------------------------------------------


def wait_for(server: Any, path: str, status: int) -> dict[str, Any]:
    """Poll until `path` answers `status` (bounded); return the JSON body."""
    deadline = time.monotonic() + RECOVERY_WITHIN_S
    while True:
        answered, _, body = server.get(path)
        if answered == status:
            return json.loads(body) if body else {}
        assert server.process.poll() is None, server.output.read_text()
        assert time.monotonic() < deadline, f"{path} still {answered} after {RECOVERY_WITHIN_S} s: {body[:300]!r}"
        threading.Event().wait(0.05)  # poll interval, not a synchronisation


def assert_unavailable(server: Any) -> None:
    assert wait_for(server, "/health", 503) == {
        "status": "unhealthy", "db_connected": False, "etl_last_run": None, "etl_status": None
    }  # fmt: skip
    for path in ("/data", "/stats"):
        status, headers, body = server.get(path)
        assert status == 503 and headers["content-type"] == PROBLEM
        assert json.loads(body)["request_id"] == headers["x-request-id"]


def test_the_live_server_rides_out_delete_replace_and_corruption(
    live_server: Any, store_path: Path, sample_store: Path, other_store: Path
) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    first = wait_for(server, "/data", 200)
    delete(store_path, sample_store)
    assert_unavailable(server)
    rename_over(store_path, other_store)
    replaced = wait_for(server, "/data", 200)
    assert replaced["total_items"] == 40 and replaced["data_version"] != first["data_version"]
    assert wait_for(server, "/health", 200)["status"] == "healthy"
    garbage_over_it(store_path, sample_store)
    assert_unavailable(server)
    rename_over(store_path, sample_store)
    assert wait_for(server, "/data", 200)["total_items"] == 255
    truncated_copy(store_path, sample_store)
    assert_unavailable(server)
    rename_over(store_path, sample_store)
    wait_for(server, "/data", 200)
    directory_in_its_place(store_path, sample_store)
    assert_unavailable(server)
    rename_over(store_path, sample_store)
    assert wait_for(server, "/data", 200)["data_version"] == first["data_version"]
    assert server.process.poll() is None
    output = server.output.read_text()
    assert "Traceback" not in output and "store file changed" in output


# --- a long write transaction held by another process ----------------------------------------------


@contextlib.contextmanager
def write_transaction_held(db: Path) -> Iterator[None]:
    """Another process holds an open write transaction that changes every asset; its pages spill to the WAL."""
    script = (
        "import sqlite3, sys\n"
        f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "conn.execute('PRAGMA cache_size = 10')\n"  # a tiny cache: uncommitted pages go to the WAL
        "conn.execute('BEGIN IMMEDIATE')\n"
        "conn.execute('UPDATE asset SET price_usd = price_usd * 2, name = name || \" (uncommitted)\"')\n"
        "conn.execute('UPDATE store_meta SET generation = generation + 1')\n"
        "print('holding', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield
    finally:
        holder.communicate("")


def latencies(server: Any, paths: list[str], rounds: int) -> list[float]:
    """Seconds per request over `rounds` passes of `paths`; every answer must be a 200."""
    seconds = []
    for _ in range(rounds):
        for path in paths:
            started = time.perf_counter()
            status, _, body = server.get(path)
            seconds.append(time.perf_counter() - started)
            assert status == 200, body[:300]
    return seconds


def summary(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * len(ordered)))]
    return f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.2f} ms p99={p99 * 1000:.2f} ms"


def test_reads_answer_at_normal_latency_while_another_process_holds_a_write(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    paths = ["/data", "/data?sort=-price_usd&page_size=100", "/data/bitcoin", "/stats", "/health"]
    before = json.loads(server.get("/data/bitcoin")[2])
    baseline = latencies(server, paths, 40)
    with write_transaction_held(store_path):
        held = latencies(server, paths, 40)
        during = json.loads(server.get("/data/bitcoin")[2])
    print(f"\nreads without a writer: {summary(baseline)}; with a held write transaction: {summary(held)}")
    assert max(held) < 2.0, summary(held)
    assert during == before, "readers must see only committed data"


# --- the API cannot write ---------------------------------------------------------------------

WRITES = [
    "INSERT INTO asset (asset_id) VALUES ('pwned')",
    "UPDATE store_meta SET generation = generation + 1",
    "DELETE FROM asset",
    "DROP TABLE asset",
    "CREATE TABLE pwned (x)",
    "CREATE INDEX pwned ON asset (name)",
    "PRAGMA user_version = 99",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA query_only = 0",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "REINDEX",
    "ANALYZE",
]
REFUSALS = ("not authorized", "authorization denied", "attempt to write a readonly database")


@pytest.mark.parametrize("on_loop", [False, True], ids=["reader-thread", "loop-connection"])
def test_the_store_connections_refuse_every_write(store_path: Path, tmp_path: Path, on_loop: bool) -> None:
    """Two layers: an authorizer that allows reads only, and under it a connection opened mode=ro."""
    before = digest(store_path)
    created = [tmp_path / "attached.db", tmp_path / "vacuumed.db"]
    outside_a_transaction = [f"ATTACH DATABASE '{created[0]}' AS pwned", f"VACUUM INTO '{created[1]}'", "VACUUM"]

    def attempt(conn: sqlite3.Connection, statements: list[str]) -> dict[str, str]:
        refused = {}
        for sql in statements:
            with pytest.raises(sqlite3.DatabaseError) as error:
                conn.execute(sql)
            refused[sql] = str(error.value)
        return refused

    def attempt_all(conn: sqlite3.Connection, version: Any) -> tuple[dict[str, str], dict[str, str]]:
        refused = attempt(conn, WRITES)  # inside the read's transaction
        conn.execute("ROLLBACK")
        refused |= attempt(conn, outside_a_transaction)
        conn.execute("BEGIN")
        conn.set_authorizer(None)
        try:
            beneath = attempt(conn, WRITES[:7])
            assert conn.execute("SELECT count(*) FROM asset").fetchone()[0] == 255
        finally:
            conn.set_authorizer(authorize_read)
        return refused, beneath

    async def attempt_writes() -> tuple[dict[str, str], dict[str, str]]:
        store = Store(store_path, readers=1)
        await store.open()
        try:
            await store.watch()
            return await store.read(attempt_all, on_loop=on_loop)
        finally:
            await store.close()

    refused, beneath = asyncio.run(attempt_writes())
    assert all(reason.startswith(REFUSALS) for reason in refused.values()), refused
    assert set(beneath.values()) == {"attempt to write a readonly database"}, beneath
    assert not any(path.exists() for path in created), "no statement may create a file"
    assert digest(store_path) == before


# --- doors: API keys --------------------------------------------------------------------------

KEYS = ("k1-public-test-key", "s3cret-test-key")


@pytest.fixture
def guarded(make_client: Any, store_path: Path) -> Any:
    return make_client(Config(db=store_path, api_keys=KEYS, log_level="warning"))


@pytest.mark.parametrize(
    "path", ["/", "/health", "/metrics", "/docs", "/openapi.json", "/docs/swagger-ui.css", "/redoc",
             "/redoc/redoc.standalone.js"]
)  # fmt: skip
def test_open_paths_need_no_key(guarded: Any, path: str) -> None:
    assert guarded.get(path).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic czNjcmV0LXRlc3Qta2V5"},
        {"Authorization": "s3cret-test-key"},
        {"Authorization": "Bearer s3cret-test-ke"},
        {"Authorization": "Bearer s3cret-test-key2"},
        {"Authorization": "Bearer S3CRET-TEST-KEY"},
        {"Authorization": "Bearer k1-public-test-key,s3cret-test-key"},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": "Bearer s3cret-test-key"},
        {"Authorization": "Bearer wrong", "X-API-Key": "k1-public-test-key"},
    ],
    ids=lambda headers: repr(headers)[:40],
)
def test_wrong_or_missing_keys_are_401_problems(guarded: Any, headers: dict[str, str]) -> None:
    for path in ("/data", "/data/bitcoin", "/data/no-such-asset", "/stats"):
        result = guarded.get(path, headers=headers)
        problem(result, 401)
        assert result.headers["www-authenticate"] == 'Bearer realm="kasparro"'
        assert "test-key" not in result.text


NO_KEY = "this endpoint needs an API key: Authorization: Bearer <key> or X-API-Key"
NOT_A_KEY = "the API key sent is not one of this service's keys"
NOT_BEARER = "Authorization: {} is not taken here: send Authorization: Bearer <key> or X-API-Key"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, NO_KEY),
        ({"Authorization": "Bearer "}, NO_KEY),
        ({"X-API-Key": ""}, NO_KEY),
        ({"Authorization": "Bearer s3cret-test-ke"}, NOT_A_KEY),
        ({"X-API-Key": "wrong"}, NOT_A_KEY),
        ({"Authorization": "Bearer wrong", "X-API-Key": "k1-public-test-key"}, NOT_A_KEY),
        ({"Authorization": "Basic czNjcmV0LXRlc3Qta2V5"}, NOT_BEARER.format("Basic")),
        ({"Authorization": "basic czNjcmV0LXRlc3Qta2V5", "X-API-Key": "wrong"}, NOT_BEARER.format("basic")),
        ({"Authorization": "s3cret-test-key"}, "Authorization: send Bearer <key>, or the key in X-API-Key"),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_a_401_says_whether_a_key_was_missing_wrong_or_sent_in_another_scheme(
    guarded: Any, headers: dict[str, str], detail: str
) -> None:
    """Every refusal said the endpoint needs a key, also to a client that had sent one: a wrong key, or one sent
    as Basic credentials, read as if the header had not arrived."""
    assert problem(guarded.get("/data", headers=headers), 401)["detail"] == detail


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer s3cret-test-key"},
        {"Authorization": "bearer s3cret-test-key"},
        {"Authorization": "Bearer   k1-public-test-key  "},
        {"X-API-Key": "k1-public-test-key"},
    ],
)
def test_a_valid_key_opens_the_guarded_paths(guarded: Any, headers: dict[str, str]) -> None:
    for path in ("/data", "/data/bitcoin", "/stats"):
        assert guarded.get(path, headers=headers).status_code == 200


def test_keys_are_never_logged(capsys: pytest.CaptureFixture[str], make_client: Any, store_path: Path) -> None:
    client = make_client(Config(db=store_path, api_keys=KEYS, log_level="info"))  # debug: the live test below
    for headers in ({"Authorization": "Bearer s3cret-test-key"}, {"X-API-Key": "k1-public-test-key"},
                    {"Authorization": "Bearer guessed-test-key"}):  # fmt: skip
        for path in ("/data", "/stats", "/nowhere", "/health"):
            client.get(path, headers=headers)
    logged = capsys.readouterr()
    assert '"event":"request"' in logged.out
    assert "test-key" not in logged.out + logged.err


def test_the_live_server_never_logs_keys(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="debug", KASPARRO_API_KEYS=",".join(KEYS))
    for headers in ({"Authorization": "Bearer s3cret-test-key"}, {"X-API-Key": "guessed-test-key"}):
        assert server.get("/data", headers)[0] in (200, 401)
    server.process.terminate()
    server.process.wait(timeout=10)
    output = server.output.read_text()
    assert '"event":"request"' in output and "test-key" not in output


# --- doors: the rate limit --------------------------------------------------------------------


def test_a_cached_answer_still_needs_a_key(guarded: Any) -> None:
    for path in ("/data", "/data/bitcoin"):
        assert guarded.get(path, headers={"X-API-Key": "k1-public-test-key"}).status_code == 200
        assert guarded.get(path, headers={"X-API-Key": "k1-public-test-key"}).status_code == 200
        problem(guarded.get(path), 401)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def limited(make_client: Any, store_path: Path, rate: float, clock: FakeClock, keys: tuple[str, ...] = ()) -> Any:
    config = Config(db=store_path, rate_limit=rate, api_keys=keys, log_level="warning")
    return make_client(config, create_app(config, clock=clock))


def test_rate_limit_is_off_by_default(client: Any) -> None:
    for _ in range(50):
        result = client.get("/data")
        assert result.status_code == 200 and "ratelimit-limit" not in result.headers


def test_rate_limit_from_the_environment() -> None:
    assert Config.from_env({}).rate_limit == 0
    assert Config.from_env({"KASPARRO_RATE_LIMIT": "2.5"}).rate_limit == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(
            SystemExit, match=f"KASPARRO_RATE_LIMIT must be a number from 0 to 1,000,000,000, not '{bad}'"
        ):
            Config.from_env({"KASPARRO_RATE_LIMIT": bad})
        with pytest.raises(ValueError, match="KASPARRO_RATE_LIMIT"):  # a Config built by hand is checked too
            create_app(Config(rate_limit=float(bad)))


def test_a_client_over_the_limit_gets_429_with_retry_after(make_client: Any, store_path: Path) -> None:
    clock = FakeClock()
    client = limited(make_client, store_path, 2, clock)  # burst 4
    for remaining in (3, 2, 1, 0):
        result = client.get("/data")
        assert result.status_code == 200
        assert (result.headers["ratelimit-limit"], result.headers["ratelimit-remaining"]) == ("4", str(remaining))
    assert result.headers["ratelimit-reset"] == "2"  # 4 tokens at 2 a second
    refused = client.get("/data")
    body = problem(refused, 429)
    assert "2 requests a second" in body["detail"]
    assert refused.headers["retry-after"] == "1"
    assert (refused.headers["ratelimit-limit"], refused.headers["ratelimit-remaining"]) == ("4", "0")
    clock.now += 0.5  # one token back
    assert client.get("/data").status_code == 200
    assert client.get("/data").status_code == 429
    clock.now += 60
    assert [client.get("/data/bitcoin").status_code for _ in range(5)] == [200] * 4 + [429]


def test_retry_after_is_whole_seconds_and_at_least_one(make_client: Any, store_path: Path) -> None:
    clock = FakeClock()
    slow = limited(make_client, store_path, 0.1, clock)  # burst max(1, 0.2) = 1
    assert slow.get("/").headers["ratelimit-limit"] == "1"
    assert slow.get("/").headers["retry-after"] == "10"
    clock.now += 9.5
    assert slow.get("/").headers["retry-after"] == "1"
    fast = limited(make_client, store_path, 100, clock)  # burst 200
    statuses = [fast.get("/").status_code for _ in range(201)]
    assert statuses.count(429) == 1
    assert fast.get("/").headers["retry-after"] == "1"


def test_every_answer_carries_the_limit_headers(make_client: Any, store_path: Path) -> None:
    client = limited(make_client, store_path, 5, FakeClock())
    for path, status in (("/data/no-such-asset", 404), ("/data?page=0", 400), ("/nowhere", 404), ("/", 200)):
        result = client.get(path)
        assert result.status_code == status
        assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(result.headers)


def test_health_and_metrics_are_exempt(make_client: Any, store_path: Path) -> None:
    client = limited(make_client, store_path, 1, FakeClock())
    for _ in range(20):
        for path in ("/health", "/metrics"):
            result = client.get(path)
            assert result.status_code == 200 and "ratelimit-limit" not in result.headers
    assert client.get("/data").status_code == 200


def test_buckets_are_per_key_or_per_address(make_client: Any, store_path: Path) -> None:
    client = limited(make_client, store_path, 1, FakeClock(), keys=KEYS)  # burst 2

    def statuses(n: int, **kwargs: Any) -> list[int]:
        return [client.get("/data", **kwargs).status_code for _ in range(n)]

    first_key = {"Authorization": "Bearer s3cret-test-key"}
    assert statuses(3, headers=first_key, remote_addr="127.0.0.2") == [200, 200, 429]
    # The same key from elsewhere shares its bucket; another key has its own.
    assert statuses(1, headers=first_key, remote_addr="127.0.0.3") == [429]
    assert statuses(3, headers={"X-API-Key": "k1-public-test-key"}, remote_addr="127.0.0.2") == [200, 200, 429]
    # Without a valid key the address counts, so guessing keys is limited too.
    guesses = [{"Authorization": f"Bearer guess-{n}"} for n in range(3)]
    assert [client.get("/data", headers=h, remote_addr="127.0.0.4").status_code for h in guesses] == [401, 401, 429]
    assert statuses(1, remote_addr="127.0.0.4") == [429]
    assert statuses(1, remote_addr="127.0.0.5") == [401]


def test_the_bucket_table_stays_bounded() -> None:
    limit = RateLimit(1, (), FakeClock(), max_buckets=100)

    async def ask(address: str) -> int:
        req = falcon.testing.create_asgi_req(path="/data", remote_addr=address)
        try:
            await limit.process_request(req, falcon.asgi.Response())
        except falcon.HTTPTooManyRequests:
            return 429
        return 200

    async def scan() -> None:
        assert [await ask("127.0.0.1") for _ in range(3)] == [200, 200, 429]
        for n in range(5_000):  # requests from many addresses
            await ask(f"127.{n // 65536}.{n // 256 % 256}.{n % 256 + 1}")
            assert len(limit.buckets) <= 100
        # The drained client was evicted long ago: forgetting it cost at most its debt.
        assert await ask("127.0.0.1") == 200

    asyncio.run(scan())
