"""Summarise py-spy's collapsed stacks (`--format raw`): the functions with the most samples, in text."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_label(frame: str) -> str:
    """'send (/x/site-packages/falcon/asgi/app.py:123)' -> 'send (falcon/asgi/app.py)'."""
    match = FRAME.match(frame)
    if match is None:
        return frame
    file = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        file = file.split(marker, 1)[-1]
    return f"{match['function']} ({file})"


def summarise(path: Path, top: int = 15) -> list[str]:
    """Each thread's share of samples, then the top functions by inclusive and by self samples.

    Frames on every stack of their thread (the entry points: runpy, click, the
    thread's bootstrap) are left out of the inclusive list: they say nothing.
    """
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    per_thread: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith("thread") else "(all threads)"
        labels = [frame_label(frame) for frame in frames if not frame.startswith(("thread", "process"))]
        threads[thread] += samples
        for label in set(labels):
            inclusive[label] += samples
            per_thread.setdefault(thread, Counter())[label] += samples
        if labels:
            own[labels[-1]] += samples
    total = threads.total()
    if not total:
        return [f"{path.name}: no samples"]
    roots = {label for thread, seen in per_thread.items() for label, n in seen.items() if n == threads[thread]}
    lines = [f"{path.name}: {total:,} samples of busy threads"]
    lines += [f"  {n / total:6.1%}  {thread}" for thread, n in threads.most_common()]
    lines.append("  inclusive (the function and what it calls), entry frames left out:")
    ranked = [(label, n) for label, n in inclusive.most_common() if label not in roots][:top]
    lines += [f"  {n / total:6.1%}  {label}" for label, n in ranked]
    lines.append("  self (the function's own code, and C code it calls):")
    lines += [f"  {n / total:6.1%}  {label}" for label, n in own.most_common(top)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path, help="files written by py-spy record --format raw")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.profiles:
        print("\n".join(summarise(path, args.top)))


if __name__ == "__main__":
    main()
