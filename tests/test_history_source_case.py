"""history?source= takes a source's name with its letters in either case, as filter_by=source: does, and answers
with the stored name. Real uvicorn over the sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def test_history_takes_a_source_name_in_any_case_as_filter_by_does(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    status, _, body = server.get("/data?filter_by=source:CSV:Sample,symbol:btc")
    assert status == 200 and [a["asset_id"] for a in json.loads(body)["data"]] == ["bitcoin"]
    exact = json.loads(server.get("/data/bitcoin/history?interval=raw&source=csv:sample")[2])
    status, _, body = server.get("/data/bitcoin/history?interval=raw&source=CSV:Sample")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["source"] == "csv:sample"  # the stored name, as in every point
    assert answer["points"] == exact["points"]
