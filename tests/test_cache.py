"""Cached answers are the fresh answers: byte for byte, before and after an ETL commit."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import kasparro
from conftest import run_etl, write_csv
from kasparro import BOOKMARK_EVERY, Config
from stores import read_only_uri

PER_REQUEST = re.compile(rb'"request_id":"[^"]*","api_latency_ms":[0-9.e+-]+,')

QUERIES = [
    "/data",
    "/data?page_size=100",
    "/data?filter_by=active&page_size=100&sort=-market_cap_usd",
    "/data?page=350&page_size=10",  # past several bookmarks of the default order
    "/data?page=301&page_size=10&sort=-price_usd",  # bookmarks of a nullable sort
    "/data?page=120&page_size=25&sort=name&filter_by=active",  # bookmarks of a filtered sort (off the loop)
    "/data?page=999&page_size=100",  # beyond the end: an empty page
    "/data?filter_by=symbol:usdc",
    "/data/bitcoin",
    "/data/usdc",
]


def data_of(result: Any) -> bytes:
    """The body without the fields that belong to one request."""
    assert result.status_code == 200, result.text
    return PER_REQUEST.sub(b"", result.content)


@pytest.fixture
def big_store(tmp_path: Path) -> Path:
    """The sample plus 4,000 generated assets: enough rows for deep pages to use bookmarks."""
    db = tmp_path / "kasparro.db"
    assert run_etl(db).returncode == 0
    assert run_etl(db, f"csv:{write_csv(tmp_path / 'more.csv', 4_000, seed=3)}").returncode == 0
    return db


def test_cached_answers_equal_fresh_ones_across_an_etl_commit(make_client: Any, big_store: Path, tmp_path: Path):
    config = Config(db=big_store, reopen_interval=0, log_level="warning")
    warm = make_client(config)
    first = {path: data_of(warm.get(path)) for path in QUERIES}
    assert {path: data_of(warm.get(path)) for path in QUERIES} == first  # served from the caches
    assert {path: data_of(make_client(config).get(path)) for path in QUERIES} == first  # a cold app agrees
    assert b'"data":[]' in first["/data?page=999&page_size=100"]
    assert max(350 * 10, 301 * 10) > 3 * BOOKMARK_EVERY  # the deep pages above start from bookmarks

    # New prices for every generated coin (same ids, later time) and 50 new coins: one commit.
    changed = tmp_path / "more.csv"
    changed.write_text(changed.read_text().replace("2026-11-25T12:00:", "2026-11-25T13:00:"))
    assert run_etl(big_store, f"csv:{changed}", f"csv:{write_csv(tmp_path / 'new.csv', 50, seed=4)}").returncode == 0

    after = {path: data_of(warm.get(path)) for path in QUERIES}
    assert after == {path: data_of(make_client(config).get(path)) for path in QUERIES}
    assert after["/data"] != first["/data"]  # the data version moved with the commit
    assert after["/data?page=350&page_size=10"] != first["/data?page=350&page_size=10"]


@pytest.mark.parametrize(
    ("sort", "filter_by", "sql_order", "sql_where"),
    [
        ("rank", "", "rank IS NULL, rank, asset_id", "1"),
        ("-price_usd", "", "price_usd IS NULL, price_usd DESC, asset_id DESC", "1"),
        ("change_24h_pct", "active", "change_24h_pct IS NULL, change_24h_pct, asset_id", "status = 'active'"),
        ("-name", "", "name COLLATE NOCASE DESC, asset_id DESC", "1"),
        (
            "-volume_24h_usd",
            "inactive",
            "volume_24h_usd IS NULL, volume_24h_usd DESC, asset_id DESC",
            "status = 'inactive'",
        ),
    ],
)
def test_deep_pages_from_bookmarks_match_plain_sql(
    make_client: Any, big_store: Path, sort, filter_by, sql_order, sql_where
):

    client = make_client(Config(db=big_store, reopen_interval=0, log_level="warning"))
    conn = sqlite3.connect(read_only_uri(big_store), uri=True)
    total = conn.execute(f"SELECT count(*) FROM asset WHERE {sql_where}").fetchone()[0]
    # (102, 10) and (151, 20) start where the page before them ended: from its last row, skipping nothing.
    deep = ((1, 10), (101, 10), (102, 10), (150, 20), (151, 20), (int(total / 7) + 1, 7), (total // 3 + 1, 3))
    for page, size in (*deep, (total + 1, 1)):
        expected = [
            row[0]
            for row in conn.execute(
                f"SELECT asset_id FROM asset WHERE {sql_where} ORDER BY {sql_order} LIMIT ? OFFSET ?",
                (size, (page - 1) * size),
            )
        ]
        params = {"sort": sort, "page": str(page), "page_size": str(size)} | (
            {"filter_by": filter_by} if filter_by else {}
        )
        body = client.get("/data", params=params).json
        assert [a["asset_id"] for a in body["data"]] == expected, (sort, filter_by, page, size)
        assert body["total_items"] == total
    conn.close()


def test_the_front_door_answers_as_falcon_does(monkeypatch: pytest.MonkeyPatch, make_client: Any, big_store: Path):
    """A repeated GET is answered before Falcon: same status, headers and data as Falcon's first answer."""
    through_falcon: list[str] = []
    for resource, responder in ((kasparro.AssetPagesResource, "on_get"), (kasparro.AssetResource, "on_get"),
                                (kasparro.HealthResource, "on_get")):  # fmt: skip
        original = getattr(resource, responder)

        async def spy(self: Any, req: Any, resp: Any, *args: Any, _original: Any = original, **kw: Any) -> None:
            through_falcon.append(req.relative_uri)
            await _original(self, req, resp, *args, **kw)

        monkeypatch.setattr(resource, responder, spy)
    client = make_client(Config(db=big_store, reopen_interval=0, log_level="warning"))
    for path in (*QUERIES, "/health"):
        client.get(path)  # read once: not kept yet
        first = client.get(path)  # read again: kept
        tag = first.headers.get("etag")
        seen = len(through_falcon)
        again = client.get(path, headers={"X-Request-ID": "front-door-test"})
        assert len(through_falcon) == seen, f"{path} went through Falcon again"
        assert again.status_code == first.status_code == 200
        per_request = {"x-request-id": "", "content-length": ""}  # the id echoed is shorter than a UUID
        assert {**again.headers, **per_request} == {**first.headers, **per_request}
        assert int(again.headers["content-length"]) == len(again.content)
        assert again.headers["x-request-id"] == "front-door-test"
        assert data_of(again) == data_of(first)
        if path.startswith("/data?"):
            assert again.json["request_id"] == "front-door-test"
        if tag is not None:
            current = client.get(path, headers={"If-None-Match": f'"x", {tag}'})
            assert len(through_falcon) == seen
            assert (current.status_code, current.content, current.headers["etag"]) == (304, b"", tag)
    assert client.get("/data?page_size=0").status_code == 400  # not an answer: Falcon's, every time
    assert client.get("/data?page_size=0").status_code == 400


def test_the_front_door_reads_an_uncached_asset_as_falcon_would(
    monkeypatch: pytest.MonkeyPatch, make_client: Any, store_path: Path
):
    """A plain GET /data/{asset_id} not kept is read before Falcon: same answer as Falcon's for it."""
    through_falcon: list[str] = []
    original = kasparro.AssetResource.on_get

    async def spy(self: Any, req: Any, resp: Any, asset_id: str) -> None:
        through_falcon.append(req.method + " " + req.path)
        await original(self, req, resp, asset_id=asset_id)

    monkeypatch.setattr(kasparro.AssetResource, "on_get", spy)
    client = make_client(Config(db=store_path, log_level="warning"))
    front = client.get("/data/bitcoin")
    current = client.get("/data/ethereum", headers={"If-None-Match": client.get("/data/ethereum").headers["etag"]})
    assert through_falcon == []
    head = client.request("HEAD", "/data/bitcoin")  # the front door's too: GET's headers, no body
    assert (head.status_code, head.content, head.headers["content-length"]) == (200, b"", str(len(front.content)))
    assert client.get("/data/no-such-coin").status_code == 404  # Falcon's 404, as problem+json
    assert client.get("/data/bitcoin", params={"fields": "asset_id"}).status_code == 200  # a query string: Falcon's
    assert through_falcon == ["GET /data/no-such-coin", "GET /data/bitcoin"]

    config = Config(db=store_path, log_level="warning")
    falcon_only = kasparro.create_app(config)
    falcon_only.kept_routes = frozenset()  # the front door answers nothing: Falcon reads every lookup
    falcon_client = make_client(config, falcon_only)
    by_falcon = falcon_client.get("/data/bitcoin")
    tag = falcon_client.get("/data/ethereum").headers["etag"]
    current_by_falcon = falcon_client.get("/data/ethereum", headers={"If-None-Match": tag})
    assert len(through_falcon) == 5
    per_request = {"x-request-id": ""}
    assert front.status_code == by_falcon.status_code == 200
    assert {**front.headers, **per_request} == {**by_falcon.headers, **per_request}
    assert front.content == by_falcon.content
    assert (current.status_code, current.content) == (current_by_falcon.status_code, b"") == (304, b"")
    assert {**current.headers, **per_request} == {**current_by_falcon.headers, **per_request}


def test_an_uncached_asset_behind_api_keys_goes_through_falcon(make_client: Any, store_path: Path) -> None:
    client = make_client(Config(db=store_path, api_keys=("k1",), log_level="warning"))
    assert client.get("/data/bitcoin").status_code == 401
    assert client.get("/data/bitcoin", headers={"X-API-Key": "k1"}).json["asset_id"] == "bitcoin"


@pytest.mark.parametrize("request_id", ["0b0e3b6c-4a2f-4c55-9d1e-2f6a1c9b7e10", 'a"quote\\and-backslash'])
@pytest.mark.parametrize(("page", "next_cursor"), [(3, "abc"), (None, None)])
def test_a_page_spliced_from_its_kept_tail_is_the_whole_encoding(
    request_id: str, page: int | None, next_cursor: str | None
) -> None:
    asset = kasparro.Asset(
        "bitcoin", "BTC", "Bitcoin", 1, 0.1, None, 3e20, -1.5, "active", kasparro.msgspec.Raw(b'["csv:sample"]'),
        "2026-11-25T12:00:00Z",
    )  # fmt: skip
    fields = dict(data=[asset], page=page, page_size=10, total_items=21, total_pages=3, next_cursor=next_cursor,
                  data_version="s1-7")  # fmt: skip
    blank = kasparro.AssetPage(request_id="", api_latency_ms=0.0, **fields)
    answer = kasparro.Answer(1, kasparro.encode(blank), etag="t", stamped=True)
    status, body = answer.reply(request_id, kasparro.time.perf_counter(), None)
    latency = kasparro.msgspec.json.decode(body)["api_latency_ms"]
    assert status == 200
    assert body == kasparro.encode(kasparro.AssetPage(request_id=request_id, api_latency_ms=latency, **fields))


def test_bookmark_sets_bound_their_page_ends_across_all_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kasparro.BookmarkSets, "SETS", 2)
    monkeypatch.setattr(kasparro.BookmarkSets, "PAGE_ENDS", 5)
    sets = kasparro.BookmarkSets()

    def token(n: int) -> kasparro.CursorToken:
        return kasparro.CursorToken("digest", False, n, f"asset-{n}")

    def kept() -> int:
        assert sets.page_ends == sum(len(marks.page_ends) for marks in sets.sets.values())
        return sets.page_ends

    rank, name = sets.get("rank"), sets.get("name")
    for offset in (10, 20, 30, 30):  # a page served twice is kept once
        sets.page_served(rank, offset, token(offset))
    for offset in (10, 20, 30):
        sets.page_served(name, offset, token(offset))
    assert (kept(), len(rank.page_ends), len(name.page_ends)) == (5, 3, 2)  # the budget ran out
    assert sets.get("rank") is rank  # and it is now the most recently used
    sets.get("price")  # a third set pushes out the least recently used one
    assert (list(sets.sets), kept()) == (["rank", "price"], 3)


def test_bookmark_sets_bound_their_marks_across_all_sets_but_the_one_walked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kasparro.BookmarkSets, "MARKS", 4)
    sets = kasparro.BookmarkSets()

    def walk(marks: kasparro.Bookmarks, count: int) -> None:
        for n in range(count):
            sets.found(marks, len(marks.marks), kasparro.CursorToken(marks.digest, False, n, f"asset-{n}"))

    def kept() -> int:
        assert sets.marks == sum(len(marks.marks) for marks in sets.sets.values())
        return sets.marks

    rank, name = sets.get("rank"), sets.get("name")
    walk(rank, 3)
    walk(name, 1)
    sets.found(rank, 1, kasparro.CursorToken("rank", False, 9, "late"))  # another walk got past mark 1 first
    assert (kept(), len(rank.marks), rank.marks[1].asset_id) == (4, 3, "asset-1")
    walk(name, 1)  # a fifth mark pushes out the least recently used set
    assert (list(sets.sets), kept()) == (["name"], 2)
    walk(name, 5)  # the set walked keeps every mark it finds
    assert (kept(), len(name.marks)) == (7, 7)
    sets.found(name, 7, None)
    assert name.complete and kept() == 7
    walk(rank, 2)  # a set pushed out goes on with the requests holding it, counted nowhere
    price = sets.get("price")
    walk(price, 1)  # and a set walked past the budget is pushed out by the next one walked
    assert (list(sets.sets), kept(), len(rank.marks), len(name.marks)) == (["price"], 1, 5, 7)


def test_a_page_reads_through_its_converters_the_values_and_types_sqlite_stores(store_path: Path) -> None:
    """PAGE_COLUMNS converts the rank and the never-empty texts itself (holding the GIL): the same cells as SQLite's."""
    order = "ORDER BY rank IS NULL, rank, asset_id"
    with sqlite3.connect(store_path, detect_types=kasparro.COLUMN_TYPES) as conn:
        converted = conn.execute(f"SELECT {kasparro.PAGE_COLUMNS} FROM asset {order}").fetchall()
    with sqlite3.connect(store_path) as conn:
        plain = conn.execute(f"SELECT {kasparro.ASSET_COLUMNS} FROM asset {order}").fetchall()
    assert len(converted) > 200 and any(row[3] is None for row in plain)  # unranked assets among them
    assert [[(cell, type(cell)) for cell in row] for row in converted] == [
        [(cell, type(cell)) for cell in row] for row in plain
    ]


def test_what_requests_learn_from_a_commit_is_dropped_with_it(store_path: Path, tmp_path: Path) -> None:
    """Counts, bookmarks and facts live in the Commit: a run's commit (even one with no new data) brings a new one."""

    async def main() -> tuple[Any, ...]:
        store = kasparro.Store(store_path, readers=1, reopen_interval=0)
        try:
            first = await store.watch()
            first.counts["active"] = 1
            await asyncio.sleep(0)  # the next turn of the loop looks again
            same = await store.watch()
            assert run_etl(store_path, f"csv:{write_csv(tmp_path / 'none.csv', 0)}").returncode == 0
            await asyncio.sleep(0)
            after = await store.watch()
            return first, same, after
        finally:
            await store.close()

    first, same, after = asyncio.run(main())
    assert same is first and after is not first and after.number > first.number
    assert after.counts == {} and first.counts == {"active": 1}


def test_a_first_count_or_bookmark_walk_runs_off_the_loop(
    monkeypatch: pytest.MonkeyPatch, make_client: Any, big_store: Path
) -> None:
    """Pages that must count or walk bookmarks first read in a reader thread; short index ranges inline."""
    where: list[str] = []
    read = kasparro.Store.read

    def recorded(self: kasparro.Store, fn: Any, *, on_loop: bool = False) -> Any:
        where.append("loop" if on_loop else "thread")
        return read(self, fn, on_loop=on_loop)

    monkeypatch.setattr(kasparro.Store, "read", recorded)
    client = make_client(Config(db=big_store, log_level="warning"))
    deep = 3 * BOOKMARK_EVERY // 10 + 1  # page_size=10: past three bookmarks
    expected = {
        "/data?page_size=10": "thread",  # the first count of this data version
        "/data?page=2&page_size=10": "loop",
        f"/data?page={deep}&page_size=10": "thread",  # three bookmarks to find first
        f"/data?page={deep + 5}&page_size=10": "loop",  # the same bookmarks
        f"/data?page={deep}&page_size=10&sort=-price_usd": "thread",  # another order's bookmarks
        "/data?page=2&page_size=10&filter_by=active": "thread",  # a filter may scan
    }
    for path, place in expected.items():
        where.clear()
        assert client.get(path).status_code == 200
        assert where == [place], path


def test_an_answer_is_kept_when_read_a_second_time(store_path: Path) -> None:
    """A stream of requests that never repeat does not push out the answers asked for again."""

    async def main() -> None:
        store = kasparro.Store(store_path, readers=1)
        await store.open()
        commit = await store.watch()
        try:
            answers = kasparro.AnswerCache(store, budget=10 * (100 + kasparro.ENTRY_OVERHEAD))

            def detail(n: int) -> kasparro.Answer:
                return kasparro.Answer(commit.number, b"x" * 100, etag=f"t{n}")

            hot, answer = ("/data/hot", b""), detail(0)
            answers.put(hot, answer)
            assert await answers.lookup(hot) is None  # made once
            answers.put(hot, answer)
            assert await answers.lookup(hot) is answer  # made twice: kept
            for n in range(1, 1_000):  # each made once: none kept, and the hot one stays
                answers.put((f"/data/cold-{n}", b""), detail(n))
            assert (list(answers.entries), await answers.lookup(hot)) == ([hot], answer)
        finally:
            await store.close()

    asyncio.run(main())


# What the worker holds from its startup is out of the collector's way.
STARTED_WORKER = """
import asyncio, gc, sys
from pathlib import Path
import falcon.testing
import kasparro

async def main():
    app = kasparro.create_app(kasparro.Config(db=Path(sys.argv[1]), log_level="warning"))
    born = gc.get_objects()  # held: no object made later can take the address (id) of one of them
    ids = {id(o) for o in born}
    async with falcon.testing.ASGIConductor(app):  # the ASGI lifespan's startup, as uvicorn sends it
        print(sum(id(o) in ids for o in gc.get_objects()), gc.get_freeze_count(), len(born))

asyncio.run(main())
"""


def test_what_a_worker_holds_from_its_startup_is_frozen_out_of_the_collector(store_path: Path) -> None:
    """Full collections do not walk the modules, the app and its documents again and again (each walk stops the
    event loop): the lifespan's startup freezes them, once a process."""
    done = subprocess.run(
        [sys.executable, "-c", STARTED_WORKER, str(store_path)], capture_output=True, text=True, check=True
    )
    left, frozen, born = map(int, done.stdout.split())
    assert born > 10_000  # the objects the collector tracked before the startup
    assert (left, frozen > born // 2) == (0, True), done.stdout  # tracked no more: frozen, or collected


# --- one read per answer and commit ------------------------------------------


def read_together(db: Path, reads: Callable[[kasparro.AnswerCache], list[Awaitable[Any]]]) -> list[Any]:
    """Run the reads concurrently in one loop over a fresh store and cache; their results, exceptions included."""

    async def main() -> list[Any]:
        store = kasparro.Store(db, readers=2)
        answers = kasparro.AnswerCache(store, 1 << 20)
        try:
            await store.watch()
            return await asyncio.gather(*reads(answers), return_exceptions=True)
        finally:
            await store.close()

    return asyncio.run(main())


def counted(calls: list[str], name: str, value: Any = None, fails: bool = False) -> kasparro.Make:
    async def read(commit: kasparro.Commit) -> Any:
        calls.append(name)
        await asyncio.sleep(0)  # the others arrive while this read runs
        if fails:
            raise kasparro.StoreUnavailable("the store went away")
        return value

    return read


def test_concurrent_misses_of_one_answer_share_one_read(store_path: Path) -> None:
    calls: list[str] = []
    health = kasparro.Answer(0, b"{}", until=0.0)  # never fresh: never kept

    def reads(answers: kasparro.AnswerCache) -> list[Awaitable[Any]]:
        same = [answers.read(("/health", b""), "/health", counted(calls, f"health-{n}", health)) for n in range(8)]
        other = answers.read(("/health", b"x"), "/health", counted(calls, "other", health))
        none = [answers.read(("/data/nope", b""), "/data/{asset_id}", counted(calls, f"nope-{n}")) for n in range(3)]
        failing = [answers.read(("/stats", b""), "/stats", counted(calls, f"stats-{n}", fails=True)) for n in range(3)]
        return [*same, other, *none, *failing]

    results = read_together(store_path, reads)
    assert calls == ["health-0", "other", "nope-0", "stats-0"]  # one read per key, by the first to miss
    shared, other = results[0], results[8]
    assert all(answer is shared for answer in results[:8]) and other is not shared  # one answer per key
    assert (shared.body, shared.route, other.body) == (health.body, "/health", health.body)
    assert results[9:12] == [None] * 3
    assert all(isinstance(error, kasparro.StoreUnavailable) for error in results[12:])


def test_a_request_that_goes_away_does_not_cancel_the_read_the_others_wait_on(store_path: Path) -> None:
    calls: list[str] = []
    health = kasparro.Answer(0, b"{}", until=0.0)

    async def slow(commit: kasparro.Commit) -> kasparro.Answer:
        calls.append("read")
        for _ in range(3):
            await asyncio.sleep(0)
        return health

    def reads(answers: kasparro.AnswerCache) -> list[Awaitable[Any]]:
        async def leaves() -> Any:
            first = asyncio.ensure_future(answers.read(("/health", b""), "/health", slow))
            await asyncio.sleep(0)
            first.cancel()  # its client went away while the read ran
            return await asyncio.gather(first, return_exceptions=True)

        return [
            leaves(),
            answers.read(("/health", b""), "/health", slow),
            answers.read(("/health", b""), "/health", slow),
        ]

    left, *stayed = read_together(store_path, reads)
    assert calls == ["read"] and isinstance(left[0], asyncio.CancelledError)
    assert stayed[0] is stayed[1] and stayed[0].body == health.body


def asset_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The asset ids read_asset is asked for from now on (the loop's read of a detail)."""
    asked: list[str] = []
    read_asset = kasparro.read_asset

    def counted(conn: sqlite3.Connection, version: kasparro.DataVersion, asset_id: str) -> Any:
        asked.append(asset_id)
        return read_asset(conn, version, asset_id)

    monkeypatch.setattr(kasparro, "read_asset", counted)
    return asked


def detail(answers: kasparro.AnswerCache, asset_id: str) -> Awaitable[Any]:
    """GET /data/{asset_id} as the front door asks the AnswerCache for it: a read queued on the loop, no task."""
    resource = kasparro.AssetResource(answers.store, answers)
    return resource.answer(kasparro.DETAIL_ROUTE, (f"/data/{asset_id}", b""), {}, asset_id=asset_id)


def test_concurrent_misses_of_one_asset_share_one_read_on_the_loop(
    monkeypatch: pytest.MonkeyPatch, store_path: Path
) -> None:
    asked = asset_reads(monkeypatch)
    making: list[Any] = []

    def reads(answers: kasparro.AnswerCache) -> list[Awaitable[Any]]:
        async def after_all() -> Any:
            making.append(dict(answers._making))
            return await detail(answers, "no-such-coin")

        return [*(detail(answers, "bitcoin") for _ in range(5)), detail(answers, "ethereum"), after_all()]

    *bitcoin, ethereum, missing = read_together(store_path, reads)
    assert asked == ["bitcoin", "ethereum", "no-such-coin"]  # one read per key, in the order asked
    assert all(answer is bitcoin[0] for answer in bitcoin) and ethereum is not bitcoin[0]
    assert kasparro.msgspec.json.decode(bitcoin[0].body)["asset_id"] == "bitcoin" and missing is None
    assert bitcoin[0].route == kasparro.DETAIL_ROUTE and list(making[0]) == [
        ("/data/bitcoin", b""),
        ("/data/ethereum", b""),
    ]


def test_a_request_that_goes_away_does_not_cancel_the_loop_read_the_others_wait_on(
    monkeypatch: pytest.MonkeyPatch, store_path: Path
) -> None:
    """The first to miss queued the read; it leaves before the read runs, and the read still runs for the others.
    When every request has gone, the read still ends, and is forgotten."""
    asked = asset_reads(monkeypatch)
    outcomes: dict[str, Any] = {}

    def reads(answers: kasparro.AnswerCache) -> list[Awaitable[Any]]:
        async def leaves(asset_id: str) -> None:
            first = asyncio.ensure_future(detail(answers, asset_id))
            await asyncio.sleep(0)  # its read is queued, not run yet
            assert asset_id not in asked and (f"/data/{asset_id}", b"") in answers._making
            first.cancel()
            outcomes[asset_id] = await asyncio.gather(first, return_exceptions=True)

        async def stays() -> Any:
            await asyncio.sleep(0)  # arrives while the first waits
            return await detail(answers, "bitcoin")

        async def alone() -> Any:
            await leaves("ethereum")  # nobody else asks
            while answers._making:
                await asyncio.sleep(0)
            return answers._making

        return [leaves("bitcoin"), stays(), stays(), alone()]

    _, stayed, also, making = read_together(store_path, reads)
    assert asked == ["bitcoin", "ethereum"]  # one read each, though every request for ethereum went away
    assert isinstance(outcomes["bitcoin"][0], asyncio.CancelledError)
    assert isinstance(outcomes["ethereum"][0], asyncio.CancelledError)
    assert stayed is also and kasparro.msgspec.json.decode(stayed.body)["asset_id"] == "bitcoin"
    assert making == {}


def test_a_loop_read_that_fails_fails_every_request_waiting_on_it(
    monkeypatch: pytest.MonkeyPatch, store_path: Path
) -> None:
    def broken(conn: sqlite3.Connection, version: kasparro.DataVersion, asset_id: str) -> Any:
        raise ValueError("a bug in the read")

    monkeypatch.setattr(kasparro, "read_asset", broken)
    results = read_together(store_path, lambda answers: [detail(answers, "bitcoin") for _ in range(3)])
    assert [type(result) for result in results] == [ValueError] * 3 and results[0] is results[1]
