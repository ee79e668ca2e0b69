"""Cost of the API's per-request log line, in process: CPU microseconds a line, as the front door logs it.

The child writes its lines to a pipe drained by another process (as a container's or
systemd's log collector reads stdout) and reports its own timing on stderr. With valgrind
installed it also counts the instructions a line costs (cachegrind, a run of N lines minus a
run of none, PYTHONHASHSEED fixed): a figure other work on the machine does not change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(lines: int) -> float:
    """Microseconds per request log line, written the way kasparro's front door writes it."""
    sys.path.insert(0, str(ROOT))
    import kasparro

    kasparro.configure_logging("info")
    write_line = kasparro.log.bind().info  # as the front door holds it

    async def serve() -> float:
        kasparro.REQUEST_ID.set("3f1c2a9e-8d7b-4e1f-9a2b-5c6d7e8f9a0b")
        started = time.process_time()
        for _ in range(lines // 100):
            for _ in range(100):  # a turn of the loop serves several requests
                write_line("request", method="GET", route="/data", status=200, duration_ms=0.412)
            await asyncio.sleep(0)
        return time.process_time() - started

    seconds = asyncio.run(serve())
    return seconds / max(lines, 1) * 1e6


def instructions(lines: int) -> int:
    """Instructions (valgrind's I refs) of a child writing `lines` lines, to /dev/null."""
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    done = subprocess.run(
        [*valgrind, sys.executable, __file__, "--child", "--lines", str(lines)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "LOG_LEVEL": "info", "PYTHONHASHSEED": "0"},
    )
    return int(re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{measure(args.lines):.2f}", file=sys.stderr)
        return
    drain = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    runs = []
    for _ in range(5):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--lines", str(args.lines)],
            stdout=drain.stdin,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
            env={**os.environ, "LOG_LEVEL": "info"},
        )
        runs.append(float(done.stderr.strip().splitlines()[-1]))
    drain.stdin.close()
    drain.wait()
    runs.sort()
    print(
        f"request log line: {runs[len(runs) // 2]:.2f} us median of {len(runs)} runs "
        f"(min {runs[0]:.2f}, max {runs[-1]:.2f}), {args.lines:,} lines each, to a pipe"
    )
    if shutil.which("valgrind"):
        counted = 20_000
        per_line = (instructions(counted) - instructions(0)) / counted
        print(f"request log line: {per_line:,.0f} instructions (valgrind cachegrind, {counted:,} lines minus none)")


if __name__ == "__main__":
    main()
