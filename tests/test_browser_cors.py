"""A page of another origin reads the API in a real browser: every header an answer carries, and no credentials."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import BROWSER_FLAGS, exchange
from upstream import FakeUpstream, Reply

# What the page asks, in order, each with its API key: under a rate limit of one request per key (refilled in
# 1,000 s), the second request with a1 is a 429 with Retry-After. /health is not limited and needs no key.
STEPS = [
    ("/data?page_size=3", "a1"),
    ("/data/export?filter_by=rank%3C%3D2&format=csv", "a2"),
    ("/data?page_size=3", "a1"),
    ("/health", None),
]
SCRIPT = """
const api = %(api)s, steps = %(steps)s, out = {seen: []};
async function main() {
  for (const [path, key] of steps) {
    const answer = await fetch(api + path, {headers: key ? {"X-API-Key": key} : {}});
    await answer.arrayBuffer();
    out.seen.push({status: answer.status, names: [...answer.headers.keys()]});
  }
  try {
    await fetch(api + "/health", {credentials: "include"});
    out.credentialed = "answered";
  } catch (error) {
    out.credentialed = "refused";
  }
}
main().catch(error => { out.error = String(error); }).finally(() => {
  document.getElementById("out").textContent = JSON.stringify(out);
});
"""


@pytest.mark.parametrize("allowed", ["*", "the page's origin"])
def test_a_page_of_another_origin_reads_every_header_and_sends_no_credentials(
    live_server: Any, store_path: Path, tmp_path: Path, upstream: FakeUpstream, allowed: str
) -> None:
    """The page is served by a stdlib server on 127.0.0.1 at a port of its own: another origin than the API's."""
    browser = shutil.which("chromium")
    assert browser, "chromium is not installed: apt-get install -y chromium (.ci/run does)"
    origin = upstream.base_url
    origins = "*" if allowed == "*" else origin
    keys = "a1,a2,b1,b2"  # a* for the page, b* for the same requests sent from here
    server = live_server(store_path, LOG_LEVEL="warning", KASPARRO_API_KEYS=keys, KASPARRO_RATE_LIMIT="0.001",
                         KASPARRO_CORS_ORIGINS=origins)  # fmt: skip
    script = SCRIPT % {"api": json.dumps(server.base), "steps": json.dumps(STEPS)}
    page = f'<!doctype html><pre id="out"></pre><script>{script}</script>'
    upstream.route("/", Reply(body=page, headers={"Content-Type": "text/html; charset=utf-8"}))
    command = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
               "--dump-dom", f"{origin}/"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    dumped = result.stdout.partition('<pre id="out">')[2].partition("</pre>")[0]
    assert dumped, result.stdout[-2000:]
    seen = json.loads(html.unescape(dumped))
    assert "error" not in seen, seen
    # The same requests from outside a browser, with keys of their own: the headers each answer carries.
    sent = []
    for path, key in STEPS:
        keyed = {"X-API-Key": "b" + key[1]} if key else {}
        status, headers, _ = exchange(server.base, "GET", path, {"Origin": origin, "Accept-Encoding": "gzip", **keyed})
        sent.append({"status": status, "names": sorted(set(headers) - {"connection"})})  # exchange asks close
    assert [step["status"] for step in seen["seen"]] == [step["status"] for step in sent] == [200, 200, 429, 200]
    for read, carried in zip(seen["seen"], sent, strict=True):
        assert sorted(read["names"]) == carried["names"], (read, carried)
    everything = {name for step in seen["seen"] for name in step["names"]}
    assert {"etag", "x-request-id", "retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
            "x-data-version", "content-disposition"} <= everything  # fmt: skip
    assert seen["credentialed"] == "refused"
