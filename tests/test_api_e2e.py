"""The real server (uvicorn kasparro:app) keeps answering while the real etl.py writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, http_get, write_csv

READY_WITHIN_S = 30.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(base: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET without raising on HTTP errors: (status, lower-cased headers, body)."""
    return http_get(base, path, headers)


@pytest.fixture
def server(store_path: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """uvicorn kasparro:app on a free port over a copy of the sample store; killed afterwards."""
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    env = {**os.environ, "KASPARRO_DB": str(store_path), "LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server not ready in time"
            try:
                if fetch(base, "/health")[0] == 200:
                    break
            except OSError:
                threading.Event().wait(0.05)  # poll interval while the port opens
        yield base, store_path
    finally:
        process.kill()
        process.wait(timeout=10)
        log.close()


def test_api_serves_without_errors_while_the_etl_writes(server: tuple[str, Path], tmp_path: Path) -> None:
    base, db = server
    before_status, before_headers, before_body = fetch(base, "/data?filter_by=active&sort=-price_usd")
    assert before_status == 200
    before = json.loads(before_body)
    source = write_csv(tmp_path / "big.csv", 50_000)
    etl = subprocess.Popen(
        [sys.executable, "etl.py", "--db", str(db), f"csv:{source}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    paths = ["/data", "/data?page=20&page_size=100&sort=-market_cap_usd", "/data?filter_by=symbol:G7&sort=name",
             "/data/bitcoin", "/health", "/stats"]  # fmt: skip
    outcomes: list[tuple[str, int]] = []
    failures: list[str] = []

    def hammer(offset: int) -> None:
        n = offset
        while etl.poll() is None:
            path = paths[n % len(paths)]
            n += 1
            try:
                status, _, body = fetch(base, path, {"If-None-Match": before_headers["etag"]})
            except OSError as error:
                failures.append(f"{path}: {error!r}")
                continue
            outcomes.append((path, status))
            if status not in (200, 304):
                failures.append(f"{path}: {status} {body[:300]!r}")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    _, etl_errors = etl.communicate(timeout=60)
    assert etl.returncode == 0, etl_errors
    assert not failures, failures[:5]
    assert len(outcomes) >= len(threads), "the ETL ended before any request was made"

    after_status, after_headers, after_body = fetch(base, "/data?filter_by=active&sort=-price_usd")
    after = json.loads(after_body)
    assert after_status == 200
    assert after["data_version"] != before["data_version"]
    new_active = sum(1 for row in source.read_text().splitlines()[1:] if ",active," in row)
    assert after["total_items"] == before["total_items"] + new_active
    assert after_headers["etag"] != before_headers["etag"]
    stale = fetch(base, "/data?filter_by=active&sort=-price_usd", {"If-None-Match": before_headers["etag"]})
    assert stale[0] == 200
    assert fetch(base, "/data?filter_by=active&sort=-price_usd", {"If-None-Match": after_headers["etag"]})[0] == 304
    health = json.loads(fetch(base, "/health")[2])
    assert (health["status"], health["etl_status"]) == ("healthy", "success")


def test_server_recovers_when_its_store_appears(sample_store: Path, tmp_path: Path) -> None:
    db = tmp_path / "later.db"
    port = free_port()
    env = {**os.environ, "KASPARRO_DB": str(db), "LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_WITHIN_S
        status = None
        while status is None:
            assert time.monotonic() < deadline and process.poll() is None
            try:
                status, _, body = fetch(base, "/health")
            except OSError:
                threading.Event().wait(0.05)  # poll interval while the port opens
        assert status == 503 and json.loads(body)["status"] == "unhealthy"
        assert fetch(base, "/data")[0] == 503
        shutil.copyfile(sample_store, db)
        while (status := fetch(base, "/data")[0]) == 503:  # the API retries the store once a second
            assert time.monotonic() < deadline
            threading.Event().wait(0.1)
        assert status == 200
    finally:
        process.kill()
        process.wait(timeout=10)
