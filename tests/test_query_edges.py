"""Queries at their edges, as a newcomer tried them: filter_by very long or with very many conditions, a cursor taken
to another as_of, the documented examples. Real uvicorn on 127.0.0.1 over a copy of the sample store."""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from conftest import exchange
from etl_support import query, run_etl

AS_OF = "2026-11-25T12:00:00Z"  # the sample's time: the moment's market is the whole sample
ROUTES = (
    "/data?page_size=100",
    f"/data?page_size=100&as_of={AS_OF}",
    "/data/export",
    f"/data/export?as_of={AS_OF}&format=ndjson",
)


def with_filter(route: str, filter_by: str) -> str:
    return route + ("&" if "?" in route else "?") + "filter_by=" + urllib.parse.quote(filter_by, safe="")


def problem(server: Any, path: str) -> str:
    """The detail of the 400 problem that path must answer."""
    status, headers, body = server.get(path)
    assert (status, headers["content-type"]) == (400, "application/problem+json"), body[:300]
    return json.loads(body)["detail"]


def asset_ids(server: Any, path: str) -> set[str]:
    """Every asset_id path answers (a page of 100, or the whole export)."""
    status, _, body = server.get(path)
    assert status == 200, body[:300]
    if path.startswith("/data/export?as_of"):  # NDJSON
        return {json.loads(line)["asset_id"] for line in body.splitlines()}
    if path.startswith("/data/export"):  # CSV: asset_id is the first column, and no id holds a comma
        return {line.split(b",")[0].decode() for line in body.splitlines()[1:]}
    return {asset["asset_id"] for asset in json.loads(body)["data"]}


def every_asset_id(server: Any, route: str, filter_by: str) -> set[str]:
    """Every asset_id the route answers with filter_by: each page of /data, by its cursors, or the one export."""
    found, path = set(), with_filter(route, filter_by)
    while path:
        status, _, body = server.get(path)
        assert status == 200, body[:300]
        found |= asset_ids(server, path)
        cursor = json.loads(body)["next_cursor"] if path.startswith("/data?") else None
        path = with_filter(route, filter_by) + f"&cursor={cursor}" if cursor else ""
    return found


def test_a_long_filter_refused_by_its_syntax_answers_at_once(live_server: Any, store_path: Path) -> None:
    """Checking filter_by's syntax took time quadratic in a value's length (12 kB: 6 s with the event loop held)."""
    server = live_server(store_path, LOG_LEVEL="warning")
    hostile = "name:" + "a" * 30_000 + ",\trank>1"  # a tab is not a plain space: refused, after the long value
    # http_get gives up after 10 s; the old check took minutes here, during which /health waited too.
    assert problem(server, with_filter("/data", hostile)).startswith("filter_by: '\\trank>1' is not field, operator")
    assert server.get("/health")[0] == 200


@pytest.mark.parametrize(
    ("filter_by", "detail"),
    [
        ("name~" + "a" * 51_000, "filter_by: a name~ text of 51,000 characters; at most 1,000 (no name is longer)"),
        (
            "name~" + "|".join(f"q{n}" for n in range(1_500)),
            "filter_by: name~ takes at most 100 alternatives, got 1500",
        ),
        (
            "source~" + "|".join(f"q{n}" for n in range(900)),
            "filter_by: source~ takes at most 100 alternatives, got 900",
        ),
        (",".join(f"rank>{n}" for n in range(1_500)), "filter_by: at most 100 conditions, got 1500"),
    ],
    ids=["long-contains", "many-contains", "many-source-contains", "many-conditions"],
)
def test_a_filter_beyond_sqlites_limits_is_a_400_problem(
    live_server: Any, store_path: Path, filter_by: str, detail: str
) -> None:
    """Each was a 500 from SQLite (LIKE pattern too complex, expression tree too large), and the export a 200
    whose body ended empty."""
    server = live_server(store_path, LOG_LEVEL="warning")
    for route in ROUTES:
        assert problem(server, with_filter(route, filter_by)) == detail, route


def test_filters_at_the_limits_answer_as_the_store_says(
    live_server: Any, store_path: Path, sample_assets: list[dict[str, Any]]
) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    named = {a["asset_id"] for a in sample_assets if "bitcoin" in a["name"].lower() or "ether" in a["name"].lower()}
    contains = "name~" + "|".join(["bitcoin", "ether", *(f"zz{n}" for n in range(98))])
    top = {a["asset_id"] for a in sample_assets if a["rank"] is not None and a["rank"] <= 50}
    ranks = ",".join(f"rank<={50 + n}" for n in range(99))  # 99 conditions, all implied by the first
    long_text = "name~" + "b" * 1_000
    assert 2 < len(named) < 100 and 2 < len(top) <= 50
    active = {a["asset_id"] for a in sample_assets if a["status"] == "active"}
    for route in ROUTES:
        assert asset_ids(server, with_filter(route, contains)) == named, route
        assert asset_ids(server, with_filter(route, ranks + ",active")) == top & active, route
        assert asset_ids(server, with_filter(route, long_text)) == set(), route


def test_a_cursor_taken_to_another_as_of_is_refused_naming_as_of(live_server: Any, store_path: Path) -> None:
    server = live_server(store_path, LOG_LEVEL="warning")
    status, _, body = server.get(f"/data?page_size=2&as_of={AS_OF}")
    cursor = json.loads(body)["next_cursor"]
    assert status == 200 and cursor
    assert server.get(f"/data?page_size=2&as_of={AS_OF}&cursor={cursor}")[0] == 200
    for other in ("", "&as_of=2026-11-25T11:00:00Z"):
        detail = problem(server, f"/data?page_size=2&cursor={cursor}{other}")
        assert detail == "cursor: issued for another filter_by, sort or as_of than this request's"


def test_the_documented_examples_of_a_time_name_one_moment(live_server: Any, store_path: Path) -> None:
    """The Unix-seconds example was 2025's moment beside 2026's RFC 3339 one: /docs showed an empty market for it."""
    server = live_server(store_path, LOG_LEVEL="warning")
    document = json.loads(server.get("/openapi.json")[2])
    times = {
        (path, parameter["name"]): parameter["schema"]["examples"]
        for path, item in document["paths"].items()
        for parameter in item["get"].get("parameters", [])
        if parameter["name"] in ("as_of", "from", "to")
    }
    assert {name for _, name in times} == {"as_of", "from", "to"}
    for (path, name), examples in times.items():
        answers = set()
        for example in examples:
            target = path.replace("{asset_id}", "bitcoin") + f"?{name}={example}"
            target += "&fields=asset_id,price_usd,updated_at" if path == "/data" else ""
            status, _, body = server.get(target)
            assert status == 200, (target, body[:300])
            answer = json.loads(body) if path != "/data/export" else body
            if isinstance(answer, dict):
                del answer["request_id"], answer["api_latency_ms"]
            answers.add(json.dumps(answer, sort_keys=True) if isinstance(answer, dict) else answer)
        assert len(answers) == 1, (path, name, examples)
    status, _, body = server.get(f"/data?as_of={times['/data', 'as_of'][-1]}")
    assert json.loads(body)["total_items"] > 0


@pytest.mark.parametrize(
    "moment",
    ["2026-11-25T11:59:59.5Z", "2026-11-25T11:59:59.001Z", "2026-11-25T11:59:59Z", "1795607999.5", "1795607999.000001",
     "1795607998.999", "1795607999"],
)  # fmt: skip
def test_an_updated_at_bound_with_a_fraction_compares_at_that_instant(
    live_server: Any, store_path: Path, sample_assets: list[dict[str, Any]], moment: str
) -> None:
    """A stored time is whole seconds; a bound between two seconds was read as the second before it, so
    updated_at>=11:59:59.5 kept the assets of 11:59:59 (and < lost them, and : matched them)."""
    server = live_server(store_path, LOG_LEVEL="warning")
    at = float(moment) if moment[0] != "2" else datetime.fromisoformat(moment).timestamp()  # Unix seconds or RFC 3339
    tests: dict[str, Callable[[float], bool]] = {
        ">": lambda t: t > at,
        ">=": lambda t: t >= at,
        "<": lambda t: t < at,
        "<=": lambda t: t <= at,
        ":": lambda t: t == at,
    }
    for op, holds in tests.items():
        expected = {a["asset_id"] for a in sample_assets if holds(datetime.fromisoformat(a["updated_at"]).timestamp())}
        assert 0 < len(expected) < len(sample_assets) or op == ":", op
        for route in ROUTES:
            assert every_asset_id(server, route, f"updated_at{op}{moment}") == expected, (route, op)


@pytest.mark.parametrize("fraction", ["0000001", "00000000001", "9999999", "99999999999"])
def test_a_time_with_more_than_six_decimals_is_that_instant(
    live_server: Any, store_path: Path, sample_assets: list[dict[str, Any]], fraction: str
) -> None:
    """RFC 3339 writes a fraction of any length, and each is that instant, as in Unix seconds: datetime keeps six
    digits, so 12:00:00.0000001 was read as 12:00:00, before the observations of 12:00:00 it comes after (in
    updated_at>= and <, and history's from and to, which round up)."""
    server = live_server(store_path, LOG_LEVEL="warning")
    second = "2026-11-25T11:59:59" if fraction[0] == "9" else "2026-11-25T12:00:00"
    moment, at = f"{second}.{fraction}Z", Decimal(int(datetime.fromisoformat(second + "Z").timestamp()))
    at += Decimal(f"0.{fraction}")
    tests: dict[str, Callable[[int], bool]] = {">": lambda t: t > at, ">=": lambda t: t >= at, "<": lambda t: t < at,
                                               "<=": lambda t: t <= at, ":": lambda t: t == at}  # fmt: skip
    for op, holds in tests.items():
        expected = {
            a["asset_id"] for a in sample_assets if holds(int(datetime.fromisoformat(a["updated_at"]).timestamp()))
        }
        for route in ROUTES:
            assert every_asset_id(server, route, f"updated_at{op}{moment}") == expected, (route, op)
    newest = 1_795_608_000  # bitcoin's one observation: 2026-11-25T12:00:00Z
    for window, holds in ((f"to={moment}", lambda t: t < at), (f"from={moment}", lambda t: t >= at)):
        status, _, body = server.get(f"/data/bitcoin/history?interval=raw&{window}")
        assert status == 200, body[:300]
        assert len(json.loads(body)["points"]) == holds(newest), window


def test_an_updated_at_bound_in_unix_seconds_is_that_moment(live_server: Any, store_path: Path) -> None:
    """as_of, from and to read Unix seconds, but filter_by=updated_at>1795608000 was a 400 needing RFC 3339."""
    server = live_server(store_path, LOG_LEVEL="warning")
    for seconds, moment in (("1795607999", "2026-11-25T11:59:59Z"), ("1795608000", "2026-11-25T12:00:00Z")):
        for op in (">", ">=", "<", "<=", ":"):
            for route in ROUTES:
                status, _, body = server.get(with_filter(route, f"updated_at{op}{seconds}"))
                assert status == 200, (route, op, body[:300])
                assert asset_ids(server, with_filter(route, f"updated_at{op}{seconds}")) == asset_ids(
                    server, with_filter(route, f"updated_at{op}{moment}")
                ), (route, op, seconds)
    assert problem(server, "/data?filter_by=updated_at>soon") == (
        "filter_by: updated_at needs an RFC 3339 time or Unix seconds, got 'soon'"
    )
    assert problem(server, "/data?filter_by=updated_at>1795608000000") == (
        "filter_by: updated_at needs an RFC 3339 time or Unix seconds (Unix seconds, not milliseconds),"
        " got '1795608000000'"
    )


def test_a_csv_number_is_written_as_in_json_whatever_its_neighbours(
    live_server: Any, store_path: Path, sample_assets: list[dict[str, Any]]
) -> None:
    """A CSV body with a comma in some name, or of one column, went through the csv module, which writes
    0.00001532 as 1.532e-05: a coin's price read one way on /data?format=csv's first page and another in the
    export, or with fields=price_usd alone."""
    server = live_server(store_path, LOG_LEVEL="warning")
    assert any("," in a["name"] for a in sample_assets)
    _, _, body = server.get("/data?filter_by=price_usd<0.0001&fields=asset_id,price_usd&format=ndjson&page_size=100")
    as_json = dict(re.fullmatch(rb'{"asset_id":"(.*)","price_usd":(.*)}', line).groups() for line in body.splitlines())
    assert len(as_json) == len([a for a in sample_assets if (a["price_usd"] or 1) < 1e-4]) > 2
    paths: list[tuple[str, str | None]] = [  # and the asset of a body without asset_id
        ("/data/export", None),
        ("/data/export?fields=price_usd,asset_id", None),
        ("/data/export?filter_by=price_usd<0.0001&fields=asset_id,price_usd", None),
        ("/data?page_size=100&page=3&format=csv", None),
        ("/data?filter_by=price_usd<0.0001&page_size=100&format=csv&fields=asset_id,price_usd", None),
    ]
    for asset in map(bytes.decode, as_json):
        paths.append((f"/data/{asset}/history?interval=raw&format=csv", asset))
        paths.append((f"/data?filter_by=asset_id:{asset}&format=csv&fields=price_usd", asset))
    for path, asset in paths:
        status, _, body = server.get(path)
        rows = list(csv.DictReader(io.StringIO(body.decode())))
        assert status == 200 and rows, path
        for row in rows:
            text = as_json.get((asset or row["asset_id"]).encode())
            assert text is None or row["price_usd"].encode() == text, (path, row)


def letters_store(tmp_path: Path, *listings: str) -> Path:
    """A store that etl.py loaded from a CSV of these listings (id, symbol, name), each at a price of 1 at AS_OF."""
    feed = tmp_path / "letters.csv"
    rows = "".join(f"{row},1,{AS_OF}\n" for row in listings)
    feed.write_text("id,symbol,name,price,last_updated\n" + rows, encoding="utf-8")
    db = tmp_path / "store.db"
    assert run_etl(db, f"csv:{feed}").returncode == 0
    return db


def test_text_filters_ignore_the_case_of_letters_beyond_ascii(live_server: Any, tmp_path: Path) -> None:
    """SQLite's NOCASE and LIKE fold ASCII letters only, and the value was lower-cased first: name:Über, written as
    stored, matched nothing, nor did name~über or symbol~äö."""
    db = letters_store(
        tmp_path,
        "uber,UB,Über",
        "uni,UNI,Ünïcode Tökén",
        "strasse,STR,Straße Coin",
        "sigma,ÄÖ,ΣΙΓΜΑ",
        "btc,BTC,Bitcoin",
    )
    server = live_server(db, LOG_LEVEL="warning")
    ids = dict(query(db, "SELECT source_id, asset_id FROM source_map"))
    cases = {
        "name:Über": {"uber"},
        "name:über|bitcoin": {"uber", "btc"},
        "name:ÜBER": {"uber"},
        "name:ünïcode tökén": {"uni"},
        "name:STRAßE COIN": {"strasse"},
        "name~üb": {"uber"},
        "name~TÖKÉN|coin": {"uni", "strasse", "btc"},
        "name~σιγ": {"sigma"},
        "symbol~äö": {"sigma"},
        "name:Ubex": set(),
        "name~BITCOIN": {"btc"},
    }
    routes = ("/data?page_size=100", f"/data?page_size=100&as_of={AS_OF}", "/data/export")
    for filter_by, expected in cases.items():
        for route in routes:
            assert asset_ids(server, with_filter(route, filter_by)) == {ids[i] for i in expected}, (filter_by, route)


def caseless_spellings(text: str) -> set[str]:
    """A text as a reader may write it: as shown, in either case, case-folded, composed or decomposed."""
    cases = {text, text.lower(), text.upper(), text.casefold(), text.title()}
    return {unicodedata.normalize(form, case) for case in cases for form in ("NFC", "NFD")}


def test_source_names_beyond_ascii_are_found_in_any_case_and_form(live_server: Any, tmp_path: Path) -> None:
    """A CSV source is named after its file, as the file system spells it: csv:Été from a file named in NFD
    (as macOS writes names) matched neither source:csv:été nor source:csv:Été (NFC), in filter_by or history,
    and csv:ﬁnal (a ligature) not source:csv:final."""
    decomposed = tmp_path / unicodedata.normalize("NFD", "Été.csv")
    composed = tmp_path / "ÖRE.csv"
    ligature = tmp_path / "\ufb01nal.csv"
    decomposed.write_text("id,symbol,name,price,last_updated\nbtc,BTC,Bitcoin,5,2026-11-25T12:00:00Z\n")
    composed.write_text("id,symbol,name,price,last_updated\neth,ETH,Ethereum,4,2026-11-25T12:00:00Z\n")
    ligature.write_text("id,symbol,name,price,last_updated\nxrp,XRP,XRP,3,2026-11-25T12:00:00Z\n")
    db = tmp_path / "store.db"
    assert run_etl(db, *(f"csv:{path}" for path in (decomposed, composed, ligature))).returncode == 0
    server = live_server(db, LOG_LEVEL="warning")
    listed = dict(query(db, "SELECT source, asset_id FROM source_map"))
    assert len(listed) == 3
    routes = ("/data?page_size=100", f"/data?page_size=100&as_of={AS_OF}", "/data/export")
    for source, asset in listed.items():
        for spelling in caseless_spellings(source):
            for route in routes:
                assert asset_ids(server, with_filter(route, f"source:{spelling}")) == {asset}, (spelling, route)
            assert asset_ids(server, with_filter("/data", f"source:{spelling}|csv:nothing")) == {asset}, spelling
            path = f"/data/{asset}/history?interval=raw&source={urllib.parse.quote(spelling)}"
            status, _, body = server.get(path)
            assert status == 200, (spelling, body[:300])
            answer = json.loads(body)
            assert answer["source"] == source and {p["source"] for p in answer["points"]} == {source}, spelling
    final, ore, ete = ({listed["csv:" + path.stem]} for path in (ligature, composed, decomposed))
    for filter_by, expected in {
        "source:csv:final": final,
        "source:CSV:Final": final,
        "source:csv:fi": set(),
        "source~FIN": final,
        "source~e": ore,
        "source~É": ete,
    }.items():
        assert asset_ids(server, with_filter("/data", filter_by)) == expected, filter_by
    assert asset_ids(server, with_filter("/data", "source:csv:ete")) == set()
    assert server.get(f"/data/{listed['csv:' + decomposed.stem]}/history?source=csv:ore")[0] == 404


def caseless(text: str) -> str:
    """Unicode's default caseless match of compatibility forms (no Turkish rule: dotless i is not i)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def test_symbols_and_names_are_found_as_shown_in_any_case_and_form(live_server: Any, tmp_path: Path) -> None:
    """A filter lower-cased its value, so symbol:İST (as /data shows it) matched nothing, being upper-cased back to
    the two characters I and U+0307, and symbol:ẞX found SSX but not ẞX (lower() makes ß, and upper() SS);
    name:GROSS COIN missed GROẞ Coin, name:STRASSE missed Straße, and name:σοφόσ missed Σοφός."""
    db = letters_store(
        tmp_path,
        "istanbul,İST,İstanbul Token",
        "gross,ẞX,GROẞ Coin",
        "ssx,SSX,Gross Coin",
        "strasse,ß,Straße",
        "kilic,ınu,Kılıç",
        "sophos,ΣΟΦ,Σοφός",
        "btc,BTC,Bitcoin",
        "ibtc,İBTC,Bitcoin İ",
    )
    server = live_server(db, LOG_LEVEL="warning")
    _, _, body = server.get("/data?page_size=100&fields=asset_id,symbol,name")
    shown = json.loads(body)["data"]
    assert len(shown) == 8
    routes = ("/data?page_size=100", f"/data?page_size=100&as_of={AS_OF}", "/data/export")
    for field in ("symbol", "name"):
        for spelling in {s for asset in shown for s in caseless_spellings(asset[field])}:
            expected = {a["asset_id"] for a in shown if caseless(a[field]) == caseless(spelling)}
            for route in routes:
                assert asset_ids(server, with_filter(route, f"{field}:{spelling}")) == expected, (spelling, route)
    ids = dict(query(db, "SELECT source_id, asset_id FROM source_map"))
    for filter_by, expected in {
        "symbol:ınu": {"kilic"},  # as the source wrote it: stored upper-case, INU
        "symbol:inu": {"kilic"},
        "symbol:ssx": {"gross", "ssx"},
        "symbol:ss": {"strasse"},
        "name:gross coin|bitcoin": {"gross", "ssx", "btc"},
        "name:STRASSE": {"strasse"},
        "name:kılıç": {"kilic"},
        "name:bitcoin i": set(),
        "name~STRASSE": {"strasse"},
        "name~ẞ": {"gross", "ssx", "strasse"},
        "name~i̇stanbul": {"istanbul"},
        "name~bitcoin i": {"ibtc"},  # the fold of İ is i then U+0307: an i at the end of a text may lie in it
        "name~COIN": {"gross", "ssx", "btc", "ibtc"},
    }.items():
        assert asset_ids(server, with_filter("/data?page_size=100", filter_by)) == {ids[i] for i in expected}, filter_by


# Each parameter that takes a number: a path with {n} where its digits go, and how its 400's detail starts.
NUMBER_PARAMETERS = {
    "page": ("/data?page={n}", "page: "),
    "page_size": ("/data?page_size={n}", "page_size: "),
    "as_of": ("/data?as_of={n}", "as_of: "),
    "export as_of": ("/data/export?as_of={n}", "as_of: "),
    "as_of date": ("/data?as_of=202{n}-11-25", "as_of: "),
    "rank": ("/data?filter_by=rank>{n}", "filter_by: rank "),
    "price_usd": ("/data/export?filter_by=price_usd<={n}.5", "filter_by: price_usd "),
    "market_cap_usd": ("/data?filter_by=market_cap_usd:{n}e3", "filter_by: market_cap_usd "),
    "volume_24h_usd": ("/data?filter_by=volume_24h_usd:1|{n}", "filter_by: volume_24h_usd "),
    "change_24h_pct": ("/data?filter_by=change_24h_pct<-{n}", "filter_by: change_24h_pct "),
    "updated_at": ("/data?filter_by=updated_at>{n}", "filter_by: updated_at "),
    "updated_at time": ("/data?filter_by=updated_at<2026-11-25T1{n}:00:00Z", "filter_by: updated_at "),
    "from": ("/data/bitcoin/history?from={n}", "from: "),
    "to": ("/data/bitcoin/history?to=2026-11-2{n}", "to: "),
    "limit": ("/data/bitcoin/history?limit={n}", "limit: "),
    "runs limit": ("/runs?limit={n}", "limit: "),
    "a": ("/runs/compare?a={n}&b=1", "a: "),
    "b": ("/runs/compare?a=1&b={n}", "b: "),
}


@pytest.mark.parametrize(("template", "name"), NUMBER_PARAMETERS.values(), ids=NUMBER_PARAMETERS.keys())
def test_a_number_in_other_digits_than_0_to_9_is_a_400_naming_the_parameter(
    live_server: Any, store_path: Path, template: str, name: str
) -> None:
    """Python's int() and float() read Arabic-Indic and fullwidth digits: filter_by=rank>\u0663 answered as rank>3
    (one query, many URLs and cache entries), and times and page numbers in such digits were refused without
    saying why."""
    server = live_server(store_path, LOG_LEVEL="warning")
    assert server.get(template.replace("{n}", "1"))[0] == 200, template  # the same number in 0-9 is read
    for digits in ("٣", "３", "१२", "1٠"):  # Arabic-Indic, fullwidth, Devanagari, mixed
        path = template.replace("{n}", urllib.parse.quote(digits))
        detail = problem(server, path)
        assert detail.startswith(name) and "digits 0-9 only" in detail, (path, detail)


def test_a_run_id_in_other_digits_than_0_to_9_is_an_unknown_run(live_server: Any, store_path: Path) -> None:
    """SPEC: an unknown run is a 404; /runs/٣ answers as /runs/abc does, not as /runs/3. The detail says how a run
    id is written: 'a run id is an integer from 1' was said of '01' and '1000000000', which are."""
    server = live_server(store_path, LOG_LEVEL="warning")
    assert server.get("/runs/1")[0] == 200
    for run_id in ("abc", "٣", "１", "१", "+1", "1٠", "01", "1000000000", "0"):
        status, headers, body = server.get(f"/runs/{urllib.parse.quote(run_id)}")
        assert (status, headers["content-type"]) == (404, "application/problem+json"), run_id
        assert json.loads(body)["detail"] == (
            f"no run {run_id!r}: a run id is written in digits 0-9, from 1 to 999999999 with no leading zero, as"
            " GET /runs lists them"
        ), run_id


NOT_UTF8 = ["%FF", "%80", "%C0%80", "%E2%82", "%ED%A0%80", "%F4%90%80%80", "%C3%28", "ok%FE"]  # stray byte, lone
# continuation, overlong, cut short, surrogate, past U+10FFFF, a lead byte followed by ASCII, text then a stray byte
UTF8_ROUTES = (  # each ends in a parameter it reads, the escapes to follow
    "/data?filter_by=name:",
    "/data?page_size=5&as_of=2026-11-25T12:00:00Z&filter_by=symbol:",
    "/data/export?fields=asset_id,",
    "/data/bitcoin/history?source=",
    "/data?sort=",
    "/runs?limit=",
)


def test_a_query_that_is_not_utf8_is_a_400_naming_its_parameter(live_server: Any, store_path: Path) -> None:
    """Falcon reads each byte that begins no UTF-8 character as U+FFFD: name:%FF was a filter for 'name:\ufffd',
    answered 200 with nothing. Every route refuses it, naming the parameter, the bytes and where they are."""
    server = live_server(store_path, LOG_LEVEL="warning")
    for route in UTF8_ROUTES:
        name = route.rpartition("?")[2].rpartition("&")[2].partition("=")[0]
        for escapes in NOT_UTF8:
            detail = problem(server, route + escapes)
            assert detail.startswith(f"{name}: not UTF-8 text once its %-escapes are decoded ("), (route, escapes)
            assert re.search(r"\(%[0-9A-F]{2}(?:%[0-9A-F]{2})* at byte \d+\)", detail), detail
    assert problem(server, "/data?%FF=1").startswith("a parameter's name: not UTF-8 text")
    for lenient in ("/health?x=%FF", "/metrics?%C0%80=1", "/?x=%80"):  # routes that ignore parameters ignore these
        assert server.get(lenient)[0] == 200, lenient
    assert server.get("/data?%FF=&page_size=1")[0] == 200  # an empty parameter is absent, whatever its name
    assert exchange(server.base, "OPTIONS", "/data?x=%FF")[0] == 204  # OPTIONS reads no parameter
    assert problem(server, "/data?page_size=5&filter_by=name:%C3%28").startswith("filter_by: not UTF-8")
    # Text that is UTF-8, escaped or as + for a space, is read as before.
    status, _, body = server.get("/data?filter_by=name:bit%63oin")
    assert status == 200 and [a["name"] for a in json.loads(body)["data"]] == ["Bitcoin"], body[:300]
    plus = "/data?page_size=100&filter_by=name~%C3%BCber|bit+coin"
    assert (
        asset_ids(server, plus) == asset_ids(server, with_filter("/data?page_size=100", "name~über|bit coin")) != set()
    )
