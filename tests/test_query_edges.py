"""Queries at their edges, as a newcomer tried them: filter_by very long or with very many conditions, a cursor taken
to another as_of, the documented examples. Real uvicorn on 127.0.0.1 over a copy of the sample store."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any


def with_filter(route: str, filter_by: str) -> str:
    return route + ("&" if "?" in route else "?") + "filter_by=" + urllib.parse.quote(filter_by, safe="")


def problem(server: Any, path: str) -> str:
    """The detail of the 400 problem that path must answer."""
    status, headers, body = server.get(path)
    assert (status, headers["content-type"]) == (400, "application/problem+json"), body[:300]
    return json.loads(body)["detail"]


def test_a_long_filter_refused_by_its_syntax_answers_at_once(live_server: Any, store_path: Path) -> None:
    """Checking filter_by's syntax took time quadratic in a value's length (12 kB: 6 s with the event loop held)."""
    server = live_server(store_path, LOG_LEVEL="warning")
    hostile = "name:" + "a" * 30_000 + ",\trank>1"  # a tab is not a plain space: refused, after the long value
    # http_get gives up after 10 s; the old check took minutes here, during which /health waited too.
    assert problem(server, with_filter("/data", hostile)).startswith("filter_by: '\\trank>1' is not field, operator")
    assert server.get("/health")[0] == 200
