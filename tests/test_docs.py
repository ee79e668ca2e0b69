"""The docs pages (/docs: Swagger UI, /redoc: ReDoc) are served whole by the app and render offline."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from conftest import BROWSER_FLAGS, ROOT, LiveServer, exchange, referenced_urls

PAGES = {"/docs": "/redoc", "/redoc": "/docs"}  # each docs page and the other one it links to
MEDIA = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".txt": "text/plain"}
REDOC = ROOT / "vendor" / "redoc"


class Endpoints(HTMLParser):
    """The operations ReDoc rendered: the text of the span after each `http-verb` span, with its verb."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()
        self._verb: str | None = None
        self._path: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "span" and "http-verb" in classes:
            self._verb = ""
        elif tag == "span" and self._verb:
            self._path = []

    def handle_data(self, data: str) -> None:
        if self._path is not None:
            self._path.append(data)
        elif self._verb == "":
            self._verb = data.strip().upper()

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._path is not None:
            self.found.add(f"{self._verb} {''.join(self._path).strip()}")
            self._verb, self._path = None, None


def test_docs_pages_and_every_file_they_load_are_served_by_the_app(live_server: Any, store_path: Path) -> None:
    server: LiveServer = live_server(store_path, LOG_LEVEL="warning")
    for page, other in PAGES.items():
        status, headers, html = exchange(server.base, "GET", page)
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert exchange(server.base, "GET", page + "/")[::2] == (200, html), f"{page}/ is not the same page"
        assert b"://" not in html, f"an external URL in {page}"
        assert f'href="{other}"'.encode() in html, f"{page} does not link {other}"
        urls = referenced_urls(html)
        assert any(url.endswith(".js") for url in urls), urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            status, headers, body = exchange(server.base, "GET", url)
            assert status == 200 and body, url
            assert headers["content-type"].startswith(MEDIA[Path(url).suffix]), (url, headers["content-type"])
    index = json.loads(exchange(server.base, "GET", "/")[2])
    document = json.loads(exchange(server.base, "GET", "/openapi.json")[2])
    for page in PAGES:
        assert f"GET {page}" in index["endpoints"]
        assert "text/html" in document["paths"][page]["get"]["responses"]["200"]["content"]
    licence = exchange(server.base, "GET", "/redoc/redoc.standalone.js.LICENSE.txt")
    assert licence[0] == 200 and b"license" in licence[2].lower()


def test_the_vendored_redoc_is_the_pinned_release_with_its_licence() -> None:
    """vendor/redoc holds the npm package's files named in SHA256SUMS, unchanged (`just vendor-redoc`)."""
    sums = [line.split("  ", 1) for line in (REDOC / "SHA256SUMS").read_text().splitlines()]
    assert {name for _, name in sums} == {"LICENSE", "bundles/redoc.standalone.js",
                                          "bundles/redoc.standalone.js.LICENSE.txt"}  # fmt: skip
    for digest, name in sums:
        assert hashlib.sha256((REDOC / name).read_bytes()).hexdigest() == digest, name
    assert "MIT License" in (REDOC / "LICENSE").read_text()
    assert (REDOC / "VERSION").read_text().strip().count(".") == 2


def test_redoc_renders_every_endpoint_in_a_headless_browser(live_server: Any, store_path: Path, tmp_path: Path) -> None:
    """Debian's chromium loads /redoc with every host but 127.0.0.1 unresolvable; the rendered page lists
    every path of /openapi.json with its verb. .ci/run installs chromium; this test installs nothing."""
    browser = shutil.which("chromium")
    assert browser, "chromium is not installed: apt-get install -y chromium (.ci/run does)"
    server: LiveServer = live_server(store_path, LOG_LEVEL="warning")
    paths = json.loads(exchange(server.base, "GET", "/openapi.json")[2])["paths"]
    command = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
               "--dump-dom", f"{server.base}/redoc"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    endpoints = Endpoints()
    endpoints.feed(result.stdout)
    assert {"GET /data", "GET /data/{asset_id}"} <= endpoints.found, (endpoints.found, result.stdout[-2000:])
    assert endpoints.found == {f"GET {path}" for path in paths}
