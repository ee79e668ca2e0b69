"""GET /runs?limit=100, /runs/{run_id} and /runs/compare over a store recording a year of 10-minute runs (52,560),
in the README's configuration: the run history reads by run id and (source, run_id), so its cost does not grow
with the history's length. Reuses the store of `just bench-stats`."""

from __future__ import annotations

import http.client
import time

from api_bench import DEFAULT, HOST, serve
from stats_bench import history


def timed(client: http.client.HTTPConnection, path: str, requests: int) -> list[float]:
    """Milliseconds of `requests` GETs of path, sorted; each must be a 200."""
    latencies = []
    for _ in range(requests):
        sent = time.perf_counter()
        client.request("GET", path)
        response = client.getresponse()
        body = response.read()
        latencies.append((time.perf_counter() - sent) * 1000)
        assert response.status == 200, body[:300]
    return sorted(latencies)


def main() -> None:
    args, _, env = history(__doc__)
    newest = args.runs + 1  # the sample's own run, then the recorded ones
    with serve("api-runs", "kasparro:app", env, "/health", DEFAULT) as api:
        client = http.client.HTTPConnection(HOST, api.port, timeout=30)
        for path in ("/runs?limit=100", "/runs", f"/runs/{newest}", f"/runs/compare?a={newest - 1}&b={newest}"):
            latencies = timed(client, path, args.requests)
            p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
            print(
                f"GET {path} at {args.runs:,}+ runs: p50 {p50:.2f} ms, p99 {p99:.2f} ms over {args.requests} requests"
            )
        client.close()


if __name__ == "__main__":
    main()
