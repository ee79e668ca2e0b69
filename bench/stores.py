"""How a benchmark opens a store read-only: by the URI the API opens it by (kasparro.Store), its path escaped."""

from __future__ import annotations

import urllib.parse
from pathlib import Path


def read_only_uri(db: str | Path) -> str:
    """An SQLite URI that opens the file at `db` read-only. '?', '#', '%' and spaces of its path are escaped: in a
    bare f"file:{db}" SQLite reads them as the query, the fragment and escapes, and opens another file or none."""
    return f"file:{urllib.parse.quote(str(Path(db).resolve()))}?mode=ro"
