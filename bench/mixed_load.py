"""A dashboard's mixed load on a 200,000-asset store: quiet, and while three ETL runs commit 20,000 changed rows each.

Each wrk connection asks, in turn: the first page, a filtered sorted page, page 50, an asset's detail, /health
and /stats; 64 connections, the API as the README runs it (one worker, a log line per request).
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from api_bench import DEFAULT, HOST, OUT, ROOT, Measure, Server, build_store, parse_wrk, serve

from stores import read_only_uri

ROWS = 200_000
CONNECTIONS = 64
CHANGED = 20_000  # rows each ETL run changes (new prices, a later time)
WRITES = 3

WRK_SCRIPT = """
local ids = {}
for line in io.lines(os.getenv("MIXED_IDS")) do ids[#ids + 1] = line end
local paths = {
  "/data?page_size=100",
  "/data?filter_by=active&page_size=100&sort=-market_cap_usd",
  "/data?page=50&page_size=100",
  "DETAIL",
  "/health",
  "/stats",
}
local turn = 0
request = function()
  turn = turn + 1
  local path = paths[(turn - 1) % #paths + 1]
  if path == "DETAIL" then path = "/data/" .. ids[math.floor(turn / #paths) % #ids + 1] end
  return wrk.format("GET", path)
end
"""


def changed_feed(csv: Path, folder: Path, hour: int) -> Path:
    """The first CHANGED rows of csv observed `hour` o'clock: the same source (same file name), new observations."""
    folder.mkdir(parents=True, exist_ok=True)
    feed = folder / csv.name
    with csv.open() as source, feed.open("w") as out:
        for n, line in enumerate(source):
            if n > CHANGED:
                break
            out.write(line.replace("2026-11-25T12:00:", f"2026-11-25T{hour:02d}:00:"))
    return feed


def measure(seconds: float, writes: bool) -> Measure:
    """wrk's figures for the mixed load; with writes, WRITES etl.py runs commit during it (a note says how)."""
    db, _ = build_store(ROWS, ROOT)
    work = OUT / "mixed"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "mixed.db"
    shutil.copyfile(db, store)  # the runs below write to it
    with contextlib.closing(sqlite3.connect(read_only_uri(store), uri=True)) as conn:
        ids = [row[0] for row in conn.execute("SELECT asset_id FROM asset ORDER BY rank LIMIT 100")]
    (work / "ids.txt").write_text("".join(quote(asset_id, safe="") + "\n" for asset_id in ids))
    (work / "mixed.lua").write_text(WRK_SCRIPT)
    feeds = [changed_feed(OUT / f"etl-{ROWS}.csv", work / f"feed-{n}", 13 + n) for n in range(WRITES if writes else 0)]
    runs: list[tuple[int, float]] = []

    def commit_while_loaded() -> None:
        time.sleep(seconds / 6)  # wrk first reaches its pace
        for feed in feeds:
            started = time.monotonic()
            done = subprocess.run([sys.executable, str(ROOT / "etl.py"), "--db", str(store), f"csv:{feed}"],
                                  cwd=ROOT, capture_output=True, check=False)  # fmt: skip
            runs.append((done.returncode, time.monotonic() - started))

    env = {"KASPARRO_DB": str(store), "KASPARRO_ETL_MAX_AGE": str(10 * 365 * 86_400)}
    with serve("api-mixed", "kasparro:app", env, "/health", DEFAULT) as api:
        wrk(api, max(1, round(seconds / 4)), work)  # warm-up, as every scenario has
        writer = threading.Thread(target=commit_while_loaded)
        writer.start()
        measure = wrk(api, seconds, work)
        writer.join()
    if writes:
        failed = sum(code != 0 for code, _ in runs)
        measure.non_2xx += failed  # a run that did not commit fails the scenario
        took = ", ".join(f"{seconds:.1f} s" for _, seconds in runs)
        measure.note = ", ".join(
            filter(None, [measure.note, f"{len(runs) - failed} of {WRITES} runs committed ({took})"])
        )
    return measure


def wrk(api: Server, seconds: float, work: Path) -> Measure:
    argv = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{round(seconds)}s", "--timeout=10s", "--latency", "-s",
            str(work / "mixed.lua"), f"http://{HOST}:{api.port}"]  # fmt: skip
    done = subprocess.run(argv, env={"MIXED_IDS": str(work / "ids.txt")}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"wrk failed ({done.returncode}):\n{done.stderr}")
    (work / f"wrk-{time.time():.0f}.txt").write_text(done.stdout)
    return parse_wrk(done.stdout)
