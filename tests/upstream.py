"""A scriptable fake upstream HTTP server on 127.0.0.1, standing in for CoinPaprika and CoinGecko in the tests."""

from __future__ import annotations

import contextlib
import gzip as gzip_codec
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "COINGECKO_MARKETS",
    "COINPAPRIKA_TICKERS",
    "FIXTURES",
    "FakeUpstream",
    "Reply",
    "Seen",
    "coingecko_pages",
    "load_fixture",
    "paprika_tickers",
]

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COINPAPRIKA_TICKERS = "/v1/tickers"
COINGECKO_MARKETS = "/api/v3/coins/markets"

Query = dict[str, list[str]]


@dataclass
class Reply:
    """One scripted answer: status, body (bytes, str as UTF-8, anything else as JSON), headers and faults."""

    status: int = 200
    body: bytes | str | object = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    gzip: bool = False
    truncate: int | None = None

    def payload(self) -> bytes:
        """The body as bytes, before any compression."""
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass
class Seen:
    """One request as the fake upstream received it (header names lower-cased)."""

    method: str
    path: str
    query: Query
    headers: dict[str, str]
    at: float = 0.0  # time.monotonic() when the request line and headers were read


@dataclass
class _Route:
    path: str
    match: Callable[[Query], bool] | None
    replies: deque[Reply]

    def next_reply(self) -> Reply:
        return self.replies.popleft() if len(self.replies) > 1 else self.replies[0]


def _accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header allows gzip (an explicit q=0 refuses it)."""
    allowed: dict[str, bool] = {}
    for item in (header or "").split(","):
        name, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name.strip():
            allowed[name.strip().lower()] = q > 0
    return allowed.get("gzip", allowed.get("x-gzip", allowed.get("*", False)))


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeUpstream/1.0"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection is dropped after this many seconds
    upstream: FakeUpstream  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the tests read FakeUpstream.requests instead."""

    def do_GET(self) -> None:
        """Answer from the first matching route, or 404."""
        self._answer(self.upstream._record(self))

    def do_POST(self) -> None:
        """Record the request and refuse it: the upstreams are read-only."""
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.upstream._record(self)
        self._send(Reply(405, {"error": "method not allowed"}))

    def _answer(self, seen: Seen) -> None:
        reply = self.upstream._reply_for(seen)
        if reply.delay > 0 and self.upstream._stopping.wait(reply.delay):
            self.close_connection = True  # server stopping: hang up without an answer
            return
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        body = reply.payload()
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if reply.gzip and _accepts_gzip(self.headers.get("Accept-Encoding")):
            body = gzip_codec.compress(body)
            headers["Content-Encoding"] = "gzip"
        headers.update(reply.headers)
        headers["Content-Length"] = str(len(body))
        self.send_response(reply.status)
        for name, value in headers.items():
            self.send_header(name, value)
        if reply.truncate is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if reply.truncate is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[: reply.truncate])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def hang_up_all(self) -> None:
        """Wake every handler still blocked on a keep-alive connection, so its thread ends now."""
        with self.sockets_lock:
            for sock in self.open_sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class FakeUpstream:
    """A threaded HTTP server on 127.0.0.1 that answers GET requests from queued replies and records every request."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: list[Seen] = []
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, *replies: Reply, match: Callable[[Query], bool] | None = None) -> None:
        """Queue replies for GET `path` (only when match(query) is true, if given); the last reply repeats."""
        if not replies:
            raise ValueError("route() needs at least one Reply")
        with self._lock:
            self._routes.append(_Route(path, match, deque(replies)))

    def start(self) -> FakeUpstream:
        """Listen on an ephemeral 127.0.0.1 port and serve from a daemon thread."""
        if self._server is not None:
            return self
        handler = type("Handler", (_Handler,), {"upstream": self})
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-upstream", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving at once: delayed replies are abandoned and the port is released."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            server.hang_up_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        """Start the server."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server."""
        self.stop()

    def _record(self, handler: BaseHTTPRequestHandler) -> Seen:
        url = urlsplit(handler.path)
        seen = Seen(
            method=handler.command,
            path=url.path,
            query=parse_qs(url.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in handler.headers.items()},
            at=time.monotonic(),
        )
        with self._lock:
            self.requests.append(seen)
        return seen

    def _reply_for(self, seen: Seen) -> Reply:
        with self._lock:
            for route in self._routes:
                if route.path == seen.path and (route.match is None or route.match(seen.query)):
                    return route.next_reply()
        return Reply(404, {"error": "not found"})


def load_fixture(name: str) -> Any:
    """The parsed JSON of tests/fixtures/<name>."""
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def coingecko_pages(upstream: FakeUpstream, pages: list[list[dict[str, Any]]], per_page: int = 250) -> None:
    """Route CoinGecko /coins/markets by its `page` query (default 1) to pages[page-1]; later pages are []."""
    for number, page in enumerate(pages, start=1):
        if len(page) > per_page:
            raise ValueError(f"page {number} has {len(page)} items, more than per_page={per_page}")
        upstream.route(COINGECKO_MARKETS, Reply(body=page), match=lambda q, n=number: _page(q) == n)
    upstream.route(COINGECKO_MARKETS, Reply(body=[]))


def _page(query: Query) -> int | None:
    try:
        return int(query.get("page", ["1"])[0])
    except ValueError:
        return None


def paprika_tickers(upstream: FakeUpstream, tickers: list[dict[str, Any]]) -> None:
    """Route CoinPaprika /v1/tickers to the given tickers."""
    upstream.route(COINPAPRIKA_TICKERS, Reply(body=tickers))


if __name__ == "__main__":
    import urllib.request

    with FakeUpstream() as fake:
        paprika_tickers(fake, [{"id": "btc-bitcoin"}])
        coingecko_pages(fake, [[{"id": "bitcoin"}]])
        with urllib.request.urlopen(fake.base_url + COINPAPRIKA_TICKERS, timeout=5) as r:  # noqa: S310
            assert json.loads(r.read()) == [{"id": "btc-bitcoin"}]
        with urllib.request.urlopen(fake.base_url + COINGECKO_MARKETS + "?page=2", timeout=5) as r:  # noqa: S310
            assert json.loads(r.read()) == []
        assert [s.query for s in fake.requests] == [{}, {"page": ["2"]}]
    print("ok")
