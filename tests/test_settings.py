"""Numeric settings and arguments at their edges, as a newcomer tried them: each value out of its range is a usage
error (the ETL's exit 2) naming it, before anything is written or served. The real etl.py and uvicorn as
subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import etl
from etl_support import ROOT, etl_env, run_etl

SECONDS = "a number from 0.001 to 86,400"
COUNT = "a whole number from 1 to 1,000,000,000"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KASPARRO_BUSY_TIMEOUT", "nan", "a number from 0 to 86,400"),  # was a ValueError traceback
        ("KASPARRO_BUSY_TIMEOUT", "1e400", "a number from 0 to 86,400"),  # an OverflowError traceback
        ("KASPARRO_HTTP_TIMEOUT", "-1", SECONDS),  # a traceback in the run, left 'running'
        ("KASPARRO_HTTP_TIMEOUT", "0", SECONDS),  # 'BlockingIOError: Operation now in progress'
        ("KASPARRO_HTTP_TIMEOUT", "nan", SECONDS),
        ("KASPARRO_HTTP_BUDGET", "nan", SECONDS),  # a budget that never ends
        ("KASPARRO_HTTP_BACKOFF", "inf", "a number from 0 to 86,400"),
        ("KASPARRO_HTTP_MAX_REQUESTS", "0", COUNT),
        ("KASPARRO_HTTP_MAX_REQUESTS", "ten", COUNT),  # 'invalid literal for int() with base 10', naming nothing
        ("KASPARRO_COINGECKO_MAX_PAGES", "0", COUNT),  # a run that succeeded loading nothing
        ("KASPARRO_COINGECKO_MAX_PAGES", "-3", COUNT),
        ("KASPARRO_RAW_KEEP_RUNS", "99999999999999999999", "a whole number from 0 to 1,000,000,000"),  # OverflowError
        ("KASPARRO_BATCH_ROWS", "-5", COUNT),  # quietly 1 row a transaction
        ("KASPARRO_COINGECKO_RATE", "fast", "a number from 0.001 to 1,000,000,000"),
        # int() and float() read '_' between digits and other scripts' digits, which no other number here takes
        ("KASPARRO_BATCH_ROWS", "1_000", COUNT),
        ("KASPARRO_HTTP_MAX_REQUESTS", "\u0661\u0660", COUNT),
        ("KASPARRO_COINGECKO_RATE", "3_0", "a number from 0.001 to 1,000,000,000"),
    ],
)
def test_a_numeric_setting_out_of_range_is_a_usage_error_naming_it(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    db = tmp_path / "store.db"
    result = run_etl(db, "coingecko", **{name: value})
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: {name} must be {expected}, not {value!r}\n",
    )
    assert not db.exists()


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("KASPARRO_COINGECKO_URL", "http://[::1", "it cannot be read as a URL"),  # tracebacks, the run left 'running'
        ("KASPARRO_COINGECKO_URL", "http://localhost:99999", "its port is not a number from 1 to 65,535"),
        ("KASPARRO_COINPAPRIKA_URL", "http://localhost:80a0", "its port is not a number from 1 to 65,535"),
        ("KASPARRO_COINPAPRIKA_URL", "localhost:8000", "it does not start with http:// or https://"),  # failed the run
        ("KASPARRO_COINGECKO_URL", "ftp://mirror.example", "it does not start with http:// or https://"),
        ("KASPARRO_COINGECKO_URL", "https://", "it names no host"),
    ],
)
def test_an_upstream_url_that_is_not_one_is_a_usage_error_naming_it(
    tmp_path: Path, name: str, value: str, problem: str
) -> None:
    db = tmp_path / "store.db"
    result = run_etl(db, "coingecko", "coinpaprika", **{name: value})
    example = etl.COINGECKO_URL if "GECKO" in name else etl.COINPAPRIKA_URL
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: {name} must be an http:// or https:// address such as {example}: {problem}\n",
    )
    assert not db.exists()


@pytest.mark.parametrize("plan", ["enterprise", "paid", "analyst"])
def test_a_coingecko_plan_other_than_demo_or_pro_is_a_usage_error(tmp_path: Path, plan: str) -> None:
    """Any other word was taken for demo: a paid key went in the demo header to the public URL, and the run
    failed with CoinGecko's refusal, naming no setting."""
    db = tmp_path / "store.db"
    result = run_etl(db, "coingecko", KASPARRO_COINGECKO_PLAN=plan, COINGECKO_API_KEY="k")
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: KASPARRO_COINGECKO_PLAN must be demo or pro, not {plan!r}\n",
    )
    assert not db.exists()


def test_upstream_urls_are_taken_as_given_or_defaulted() -> None:
    config = etl.EtlConfig.from_env(
        {"KASPARRO_COINGECKO_URL": " http://[::1]:8080/ ", "KASPARRO_COINPAPRIKA_URL": "", "COINGECKO_API_KEY": "k"}
    )
    assert (config.coingecko_url, config.coinpaprika_url) == ("http://[::1]:8080/", etl.COINPAPRIKA_URL)
    config = etl.EtlConfig.from_env({"KASPARRO_COINGECKO_PLAN": " Pro ", "COINPAPRIKA_API_KEY": "k"})
    assert (config.coingecko_url, config.coinpaprika_url) == (etl.COINGECKO_PRO_URL, etl.COINPAPRIKA_PRO_URL)


def test_numeric_settings_in_range_are_taken(tmp_path: Path) -> None:
    config = etl.EtlConfig.from_env(
        {"KASPARRO_HTTP_TIMEOUT": " 0.5 ", "KASPARRO_BUSY_TIMEOUT": "0", "KASPARRO_RAW_KEEP_RUNS": "0",
         "KASPARRO_COINGECKO_MAX_PAGES": "3", "KASPARRO_BATCH_ROWS": "", "KASPARRO_HTTP_BACKOFF": "0"}
    )  # fmt: skip
    assert (config.http.read_timeout, config.http.connect_timeout, config.busy_timeout) == (0.5, 0.5, 0.0)
    assert (config.raw_keep_runs, config.coingecko_max_pages, config.batch_rows) == (0, 3, etl.EtlConfig.batch_rows)
    assert config.http.backoff == 0.0


def test_a_replay_of_a_run_id_sqlite_cannot_hold_is_a_usage_error(tmp_path: Path) -> None:
    """It was an OverflowError traceback that left the run 'running'."""
    db = tmp_path / "store.db"
    result = run_etl(db, "replay:coingecko@99999999999999999999999")
    assert result.returncode == etl.EXIT_USAGE
    assert result.stderr == (
        "etl.py: error: source 'replay:coingecko@99999999999999999999999': no run has an id over"
        f" {2**63 - 1} (SQLite's largest integer)\n"
    )
    assert not db.exists()


@pytest.mark.parametrize(
    "value",
    ["99999999999", "1e300", "0.0001", "1e-300", "0", "-1", "nan", "inf", "soon",
     "1_0", "١٠", " 10", "10 ", "0x10", "1e3s"],
)  # fmt: skip
def test_an_every_out_of_range_is_a_usage_error_before_the_first_run(tmp_path: Path, value: str) -> None:
    """--every 99999999999 ran once, then ended in an OverflowError traceback (time_t) instead of waiting;
    1e-300 ran back to back, logging skipped slots by the 10**300. float() read '1_0' as 10 and Arabic-Indic
    digits as digits, which the API refuses in any number ('digits 0-9 only')."""
    db = tmp_path / "store.db"
    result = run_etl(db, "--every", value)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        etl.EXIT_USAGE,
        "etl.py: error: argument --every: expected a number of seconds from 0.001 to 31,536,000 (a year),"
        f" got {value!r}",
    )
    assert not db.exists()


@pytest.mark.parametrize("where", ["empty", "directory", "device"])
def test_a_store_path_that_cannot_be_a_file_is_a_usage_error(tmp_path: Path, where: str) -> None:
    """An empty --db or KASPARRO_DB was a ValueError traceback ('PosixPath('.') has an empty name'); a directory
    said to check that it exists, and /dev/null that its disk failed a read or write."""
    path, shown = {"empty": ("", "."), "directory": (str(tmp_path), str(tmp_path)), "device": ("/dev/null",) * 2}[where]
    what = "is not a regular file" if where == "device" else "is a directory"
    for args, env in ((["--db", path], {}), ([], {"KASPARRO_DB": path})):
        result = subprocess.run(
            [sys.executable, str(ROOT / "etl.py"), *args], cwd=ROOT, env=etl_env(**env), capture_output=True, text=True
        )
        assert (result.returncode, result.stderr) == (
            etl.EXIT_USAGE,
            f"etl.py: error: the store {shown!r} {what}: name its file with --db or KASPARRO_DB (kasparro.db)\n",
        )
    assert list(tmp_path.iterdir()) == []


def test_a_store_under_a_file_is_a_usage_error_saying_so(tmp_path: Path) -> None:
    """--db data/sample.csv/kasparro.db said 'directory of the store does not exist: data/sample.csv', which does."""
    parent = tmp_path / "feed.csv"
    parent.write_text("symbol,name\n")
    for missing in (False, True):
        folder = tmp_path / "nowhere" if missing else parent
        result = run_etl(folder / "store.db")
        what = "does not exist" if missing else "is a file, not a directory"
        assert (result.returncode, result.stderr) == (
            etl.EXIT_USAGE,
            f"etl.py: error: the directory of the store, {str(folder)!r}, {what}\n",
        )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["feed.csv"]


@pytest.mark.parametrize("name", [":memory:", "store#1?.db", "100%.db"])
def test_a_store_path_is_one_file_for_the_etl_and_the_api_whatever_its_characters(
    live_server: Any, tmp_path: Path, name: str
) -> None:
    """KASPARRO_DB=:memory: loaded the sample into SQLite's in-memory database: exit 0, 255 rows 'loaded', nothing
    kept (the API reads a file of that name). A path with '#' or '?' was written by the ETL and read by the API,
    which opens it by a URI, only up to that character: unhealthy for as long as it ran."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "etl.py")],
        cwd=tmp_path,
        env=etl_env(KASPARRO_DB=name),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    db = tmp_path / name
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM asset").fetchone() == (255,)
    assert sorted(path.name for path in tmp_path.iterdir()) == [name, f"{name}.etl-lock"]
    server = live_server(db, LOG_LEVEL="warning")
    status, _, body = server.get("/data/bitcoin")
    assert status == 200 and json.loads(body)["symbol"] == "BTC"


@pytest.mark.parametrize("stem", ["a|b", "markets,2026-11-25"])
def test_a_csv_whose_stem_cannot_be_a_source_name_must_be_named(tmp_path: Path, stem: str) -> None:
    """A stem with ',' or '|' made a source name that filter_by=source: splits and a CSV sources cell garbles."""
    feed = tmp_path / f"{stem}.csv"
    feed.write_text("symbol,name,price\nBTC,Bitcoin,1\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: source 'csv:{feed}' would be named 'csv:{stem}', but ',' and '|' separate names in"
        " filter_by=source:… and in a CSV's sources cells; name it with csv:NAME=PATH\n",
    )
    assert not db.exists()
    assert run_etl(db, f"csv:feed={feed}").returncode == 0


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KASPARRO_RATE_LIMIT", "nan", "a number from 0 to 1,000,000,000"),  # was a ValueError traceback at start
        ("KASPARRO_RATE_LIMIT", "1_0", "a number from 0 to 1,000,000,000"),  # float() reads '_' between digits
        ("KASPARRO_ETL_MAX_AGE", "\u0666\u0660", "a whole number from 1 to 10,000,000,000"),  # and other digits
        ("KASPARRO_RATE_LIMIT", "-1", "a number from 0 to 1,000,000,000"),
        ("KASPARRO_ETL_MAX_AGE", "-5", "a whole number from 1 to 10,000,000,000"),  # taken: /health always degraded
        ("KASPARRO_ETL_MAX_AGE", "6h", "a whole number from 1 to 10,000,000,000"),  # 'invalid literal for int()'
        ("KASPARRO_DB", "", "the path of the store's file"),  # served 503s forever, waiting for '.' to appear
        ("KASPARRO_DB", "/", "the path of the store's file"),
        ("KASPARRO_DB", "/dev/null", "the path of the store's file"),
    ],
)
def test_an_api_setting_out_of_range_stops_the_start_naming_it(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env={**environ, "KASPARRO_DB": str(tmp_path / "store.db"), name: value},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"kasparro: {name} must be {expected}, not {value!r}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


LEVELS = "debug, info, warning, error or critical"


@pytest.mark.parametrize("level", ["verbose", "trace", "inf0"])
def test_an_unknown_log_level_is_a_usage_error_naming_it(tmp_path: Path, level: str) -> None:
    """An unknown LOG_LEVEL meant info, silently: LOG_LEVEL=trace asked for more and got less."""
    db = tmp_path / "store.db"
    result = run_etl(db, LOG_LEVEL=level)
    assert (result.returncode, result.stderr) == (
        etl.EXIT_USAGE,
        f"etl.py: error: LOG_LEVEL must be {LEVELS} (in any case), not {level!r}\n",
    )
    assert not db.exists()


def test_known_log_levels_are_taken_in_any_case(tmp_path: Path) -> None:
    for level in ("WARNING", "Error", ""):
        assert run_etl(tmp_path / "store.db", LOG_LEVEL=level).returncode == 0, level


def test_an_unknown_log_level_stops_the_api_start_naming_it(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env={**environ, "KASPARRO_DB": str(tmp_path / "store.db"), "LOG_LEVEL": "verbose"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"kasparro: LOG_LEVEL must be {LEVELS} (in any case), not 'verbose'" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("stem", ["feed ", " feed", "feed\u00a0", "two\nlines", "tab\tbed", "bell\x07"])
def test_a_csv_whose_stem_filter_by_cannot_name_must_be_named(tmp_path: Path, stem: str) -> None:
    """filter_by reads its conditions without the spaces around them, so a source named 'csv:feed ' (a file
    'feed .csv') loaded listings that filter_by=source: could never select; a control character in a name garbles
    the log lines and CSV cells that show it. Such a stem is refused, before anything is written, as ',' is."""
    feed = tmp_path / f"{stem}.csv"
    feed.write_text("symbol,name,price\nBTC,Bitcoin,1\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{feed}")
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr.startswith(f"etl.py: error: source {f'csv:{feed}'!r} would be named {f'csv:{stem}'!r}, ")
    assert result.stderr.endswith("; name it with csv:NAME=PATH\n"), result.stderr
    assert not db.exists()
    assert run_etl(db, f"csv:feed={feed}").returncode == 0


@pytest.mark.parametrize("key", ["kéy-s3cret", "s3cret\x7f", "s3cret\x01x", "€uro-s3cret"])
def test_an_api_key_no_client_can_send_stops_the_start_without_showing_it(tmp_path: Path, key: str) -> None:
    """An API key beyond printable ASCII was taken at start and then refused to every client: a header's bytes
    are read one character each (Latin-1), so 'kéy' sent in UTF-8 arrives as 'kÃ©y'. The message names the
    variable and the key's place, never the key (a secret)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KASPARRO_")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "kasparro:app", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, env={**environ, "KASPARRO_DB": str(tmp_path / "store.db"), "KASPARRO_API_KEYS": f"good,{key}"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "kasparro: KASPARRO_API_KEYS: key 2 holds a character other than printable ASCII" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("name", "again"), [("--db", ["--db", "other.db"]), ("--every", ["--every", "60", "--every", "60"])]
)
def test_an_option_given_twice_is_a_usage_error_naming_it(tmp_path: Path, name: str, again: list[str]) -> None:
    """argparse keeps the last of a repeated option: `--db a.db --db b.db` loaded b.db without a word (a script
    that adds its own --db to a cron line's), where a query parameter given twice is a 400 on the API."""
    db = tmp_path / "store.db"
    result = run_etl(db, *(str(tmp_path / word) if word.endswith(".db") else word for word in again))
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        etl.EXIT_USAGE,
        f"etl.py: error: argument {name}: given twice; give it once",
    )
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", ["a b", "\u00e9t\u00e9", "-x", ".", "", "x" * 65, "a,b"])
def test_a_csv_name_that_is_no_name_is_a_usage_error_not_a_missing_file(tmp_path: Path, label: str) -> None:
    """csv:NAME=PATH with a NAME out of its syntax was read as the path 'NAME=PATH': the run was recorded failed
    ('cannot read a b=…: No such file or directory', exit 1, /health degraded) for what is a typing error. A
    path holding '=' still reads as a path when it is one (test_real_inputs) or is written with a '/' first."""
    feed = tmp_path / "feed.csv"
    feed.write_text("symbol,name,price\nBTC,Bitcoin,1\n")
    db = tmp_path / "store.db"
    result = run_etl(db, f"csv:{label}={feed}")
    assert result.returncode == etl.EXIT_USAGE, result.stderr
    assert result.stderr == (
        f"etl.py: error: source {f'csv:{label}={feed}'!r}: {label!r} is no NAME of csv:NAME=PATH (letters,"
        " digits, '.', '_' and '-', from a letter or digit, at most 64), and no file is named"
        f" {f'{label}={feed}'!r}\n"
    )
    assert not db.exists()
