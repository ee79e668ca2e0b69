-- Kasparro store: the only DDL of the project, applied by etl.py.
--
-- Every statement is idempotent, so applying this file to an existing store
-- changes nothing but what is missing: that is how etl.py migrates an older
-- store in place (version 1 -> 2 added raw_payload, 2 -> 3 made the rank
-- index covering, 3 -> 4 added run_totals, 4 -> 5 made history lean and
-- tiered, 5 -> 6 put each listing's open candles in a table of their own). `PRAGMA user_version`
-- records the schema version; etl.py refuses a store newer than it knows.
-- Times are RFC 3339 UTC text ('2026-11-25T12:00:00Z'), so text order is
-- time order; in the history tables they are Unix seconds.

PRAGMA journal_mode = WAL;

-- One row per canonical asset: the unified record the API serves.
CREATE TABLE IF NOT EXISTS asset (
    asset_id        TEXT PRIMARY KEY,           -- stable slug, never reused
    symbol          TEXT NOT NULL,              -- upper-case ticker
    name            TEXT NOT NULL,
    rank            INTEGER,
    price_usd       REAL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    change_24h_pct  REAL,
    status          TEXT NOT NULL CHECK (status IN ('active', 'inactive')),
    sources         TEXT NOT NULL,              -- JSON array of source names, sorted
    updated_at      TEXT NOT NULL               -- newest observation of any source
) WITHOUT ROWID;

-- Sort orders of /data. In a WITHOUT ROWID table each index entry ends with
-- the primary key, so (column, asset_id) order — the API's tie-break — is
-- an index scan in either direction.
--
-- The default order (rank) is read far more than any other, so its index
-- holds every column: a page of it is a few consecutive index pages instead
-- of a hundred rows scattered over the table (about 3x faster for a deep
-- page of 1M assets, for ~16 % more file). Version 3 replaced asset_rank.
DROP INDEX IF EXISTS asset_rank;
CREATE INDEX IF NOT EXISTS asset_rank_covering ON asset (
    rank, asset_id, symbol, name, price_usd, market_cap_usd, volume_24h_usd, change_24h_pct,
    status, sources, updated_at
);
CREATE INDEX IF NOT EXISTS asset_price ON asset (price_usd);
CREATE INDEX IF NOT EXISTS asset_market_cap ON asset (market_cap_usd);
CREATE INDEX IF NOT EXISTS asset_volume ON asset (volume_24h_usd);
CREATE INDEX IF NOT EXISTS asset_change ON asset (change_24h_pct);
CREATE INDEX IF NOT EXISTS asset_symbol ON asset (symbol);
CREATE INDEX IF NOT EXISTS asset_name ON asset (name COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS asset_updated ON asset (updated_at);

-- One row per listing of an asset in a source: which asset the source's own
-- id is (identity), and that listing's latest observation (its quote).
-- A mapping pinned by hand (pinned = 1, quote columns null) is honoured by
-- every later run: the ETL matches on (source, source_id) first.
CREATE TABLE IF NOT EXISTS source_map (
    source          TEXT NOT NULL,              -- 'coingecko', 'coinpaprika', 'csv:sample'
    source_id       TEXT NOT NULL,              -- the source's own id of the coin
    asset_id        TEXT NOT NULL REFERENCES asset (asset_id) DEFERRABLE INITIALLY DEFERRED,
    pinned          INTEGER NOT NULL DEFAULT 0,
    symbol          TEXT,
    name            TEXT,
    name_key        TEXT,                       -- normalised name, for matching
    rank            INTEGER,
    price_usd       REAL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    change_24h_pct  REAL,
    status          TEXT,
    observed_at     TEXT,
    PRIMARY KEY (source, source_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS source_map_asset ON source_map (asset_id, source);
CREATE INDEX IF NOT EXISTS source_map_identity ON source_map (symbol, name_key);

-- History, in three tiers (SPEC "History and retention"). Times here are
-- Unix seconds UTC (integers), and a listing is its integer key: a row of
-- history repeats no text.
--
--   raw_observation      every observation, kept KASPARRO_KEEP_RAW
--   candle width 3600    hourly candles, kept KASPARRO_KEEP_HOURLY
--   candle width 86400   daily candles, kept forever
--
-- etl.py adds each new observation to its hourly and daily candle in the
-- transaction that stores it. Retention is relative to the store's newest
-- observation N, rounded down to a UTC day: once a source's load in a run
-- has ended, every listing (loaded by the run or not: a source no longer
-- loaded, a coin no longer listed) has its raw rows before day(N - KEEP_RAW)
-- and its hourly candles before day(N - KEEP_HOURLY) deleted, in one
-- transaction (so a killed run leaves both or neither, and the next run
-- does it). A horizon never moves back (a run with a longer retention keeps
-- what is left). Every row of a load is so judged by the horizons the load
-- found, whatever the order of its rows. Whole days go at once, so every UTC
-- hour and day bucket is either wholly in raw_observation or wholly out of
-- it; the work is a seek for each listing, however long the history.
--
-- A listing's open candles (of its newest priced observation's hour and
-- day) are rows of open_candle, keyed by listing, so that a run's candle
-- writes land in a few dense pages: in candle, a listing's newest rows sit
-- in a page of their own once its history is long, and a run would dirty
-- two such pages an observation. When an observation opens a later bucket,
-- the open candle it replaces moves to candle in the same transaction, and
-- so does one that raw_before passes (a listing whose prices stopped):
-- open candles lie within the raw history, so a reader that looks before
-- it (as_of) finds every candle it needs in candle.

-- One row per listing (a source's id of a coin) that has ever been observed.
-- raw_before and hourly_before are how far its history has been pruned: an
-- observation older than raw_before (late) waits in raw_observation for
-- the end of the load, which rolls it up when its time lies
-- outside the span of its candle (else it is taken for one loaded before)
-- and deletes it, so a reload changes nothing even after pruning. Readers
-- take no raw row before raw_before.
CREATE TABLE IF NOT EXISTS listing (
    listing_id      INTEGER PRIMARY KEY,
    source          TEXT NOT NULL,
    source_id       TEXT NOT NULL,
    raw_before      INTEGER NOT NULL DEFAULT 0, -- Unix seconds: raw rows before it are pruned
    hourly_before   INTEGER NOT NULL DEFAULT 0, -- Unix seconds: hourly candles before it are pruned
    UNIQUE (source, source_id)
);

-- Every observation within KASPARRO_KEEP_RAW: the raw tier. The key makes a
-- reload of the same observation a no-op. A listing's symbol and name are
-- those of source_map (identity, not history).
CREATE TABLE IF NOT EXISTS raw_observation (
    listing_id      INTEGER NOT NULL REFERENCES listing (listing_id),
    observed_at     INTEGER NOT NULL,           -- Unix seconds UTC
    rank            INTEGER,
    price_usd       REAL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    change_24h_pct  REAL,
    active          INTEGER NOT NULL CHECK (active IN (0, 1)), -- status: 1 active, 0 inactive
    PRIMARY KEY (listing_id, observed_at)
) WITHOUT ROWID;

-- Candles of one listing: the roll-ups. The rule, the same for a candle
-- computed from raw observations, for these rows, and for the API:
--
--   * A candle is made of the observations that have a price, in one
--     bucket [t, t + width) where t is a multiple of width in Unix seconds
--     (so buckets start at whole UTC hours and at UTC midnight); a bucket
--     with no priced observation has no candle.
--   * Observations are ordered by observed time, then (when several
--     listings are merged, as for an asset) by source, then source id.
--   * open = the price of the first; close = the price of the last;
--     high, low = the greatest and least price; market_cap_usd and
--     volume_24h_usd = the last's values (null where it has none);
--     observations = how many there are.
--   * first_at, last_at = the observed times of the first and the last.
--
-- A candle over several listings (all of an asset's) follows from theirs:
-- open of the least (first_at, source, source_id), close, market cap and
-- volume of the greatest (last_at, source, source_id), the greatest high,
-- the least low, the sum of observations; and a wider bucket (4h) from the
-- narrower ones it holds (1h) by the same rule. So a candle read from these
-- rows equals the one computed from raw observations.
CREATE TABLE IF NOT EXISTS candle (
    listing_id      INTEGER NOT NULL REFERENCES listing (listing_id),
    width           INTEGER NOT NULL CHECK (width IN (3600, 86400)), -- seconds: hourly, daily
    t               INTEGER NOT NULL,           -- bucket start, Unix seconds UTC
    open            REAL NOT NULL,
    high            REAL NOT NULL,
    low             REAL NOT NULL,
    close           REAL NOT NULL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    observations    INTEGER NOT NULL,
    first_at        INTEGER NOT NULL,           -- Unix seconds of the open
    last_at         INTEGER NOT NULL,           -- Unix seconds of the close
    PRIMARY KEY (listing_id, width, t)
) WITHOUT ROWID;

-- Each listing's newest candle of each width (its open hour and day) while
-- it starts at or after the listing's raw_before, by the rule above; every
-- other candle is in candle. A candle is in exactly one of the two tables.
CREATE TABLE IF NOT EXISTS open_candle (
    listing_id      INTEGER NOT NULL REFERENCES listing (listing_id),
    width           INTEGER NOT NULL CHECK (width IN (3600, 86400)),
    t               INTEGER NOT NULL,
    open            REAL NOT NULL,
    high            REAL NOT NULL,
    low             REAL NOT NULL,
    close           REAL NOT NULL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    observations    INTEGER NOT NULL,
    first_at        INTEGER NOT NULL,
    last_at         INTEGER NOT NULL,
    PRIMARY KEY (listing_id, width)
) WITHOUT ROWID;

-- Version 4 -> 5: a store's observation table (one row an observation,
-- keyed by text) becomes the raw tier, and its candles are made from it.
-- In a newer store an empty table stands in for it and nothing is copied,
-- so this part too can be applied again.
CREATE TABLE IF NOT EXISTS observation (
    source TEXT NOT NULL, source_id TEXT NOT NULL, observed_at TEXT NOT NULL, symbol TEXT NOT NULL,
    name TEXT NOT NULL, rank INTEGER, price_usd REAL, market_cap_usd REAL, volume_24h_usd REAL,
    change_24h_pct REAL, status TEXT NOT NULL, run_id INTEGER NOT NULL,
    PRIMARY KEY (source, source_id, observed_at)
) WITHOUT ROWID;
INSERT OR IGNORE INTO listing (source, source_id)
SELECT DISTINCT source, source_id FROM observation ORDER BY source, source_id;
INSERT OR IGNORE INTO raw_observation
SELECT l.listing_id, CAST(strftime('%s', o.observed_at) AS INTEGER), o.rank, o.price_usd, o.market_cap_usd,
       o.volume_24h_usd, o.change_24h_pct, o.status = 'active'
FROM observation o JOIN listing l ON l.source = o.source AND l.source_id = o.source_id;
DROP TABLE observation;

-- The candles of every bucket that has raw observations and no candle yet
-- (all of them, in a store just upgraded from version 4; none, in one loaded
-- by etl.py, which keeps candles as it loads, but the open ones, which the
-- version 5 -> 6 step below takes back out of candle).
INSERT OR IGNORE INTO candle
SELECT b.listing_id, b.width, b.t, opening.price_usd, b.high, b.low, closing.price_usd, closing.market_cap_usd,
       closing.volume_24h_usd, b.observations, b.first_at, b.last_at
FROM (SELECT r.listing_id, w.width, r.observed_at / w.width * w.width AS t, max(r.price_usd) AS high,
             min(r.price_usd) AS low, count(*) AS observations, min(r.observed_at) AS first_at,
             max(r.observed_at) AS last_at
      FROM raw_observation r, (SELECT 3600 AS width UNION ALL SELECT 86400) w
      WHERE r.price_usd IS NOT NULL
      GROUP BY r.listing_id, w.width, t) b
JOIN raw_observation opening ON opening.listing_id = b.listing_id AND opening.observed_at = b.first_at
JOIN raw_observation closing ON closing.listing_id = b.listing_id AND closing.observed_at = b.last_at;

-- Version 5 -> 6: each listing's newest candle of each width becomes its open one (a seek each).
INSERT OR IGNORE INTO open_candle
SELECT c.* FROM listing l CROSS JOIN (SELECT 3600 AS width UNION ALL SELECT 86400) w
JOIN candle c ON c.listing_id = l.listing_id AND c.width = w.width
    AND c.t = (SELECT max(t) FROM candle WHERE listing_id = l.listing_id AND width = w.width)
WHERE c.t >= l.raw_before;
DELETE FROM candle WHERE (listing_id, width, t) IN (SELECT listing_id, width, t FROM open_candle);

-- One row per ETL run, written when it starts and again when it ends.
CREATE TABLE IF NOT EXISTS etl_run (
    run_id          INTEGER PRIMARY KEY,
    started_at      TEXT NOT NULL,
    ended_at        TEXT,
    status          TEXT NOT NULL
                    CHECK (status IN ('running', 'success', 'partial', 'failed')),
    sources         TEXT NOT NULL,              -- JSON array of the sources asked for
    rows_read       INTEGER NOT NULL DEFAULT 0,
    rows_loaded     INTEGER NOT NULL DEFAULT 0, -- new observations stored
    rows_rejected   INTEGER NOT NULL DEFAULT 0,
    duration_ms     INTEGER,
    error           TEXT,
    pid             INTEGER NOT NULL,
    host            TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS etl_run_status ON etl_run (status, run_id);

-- Each source's part of a run: its own outcome, counts and schema drift.
CREATE TABLE IF NOT EXISTS run_source (
    run_id          INTEGER NOT NULL REFERENCES etl_run (run_id),
    source          TEXT NOT NULL,
    started_at      TEXT NOT NULL,
    ended_at        TEXT,
    status          TEXT NOT NULL
                    CHECK (status IN ('running', 'success', 'partial', 'failed')),
    rows_read       INTEGER NOT NULL DEFAULT 0,
    rows_loaded     INTEGER NOT NULL DEFAULT 0,
    rows_rejected   INTEGER NOT NULL DEFAULT 0,
    duration_ms     INTEGER,
    detail          TEXT,                       -- e.g. 'unchanged since run 3'
    error           TEXT,
    drift           TEXT,                       -- JSON object: field -> count
    PRIMARY KEY (run_id, source)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS run_source_source ON run_source (source, run_id);

-- How far each source has been loaded. Written in the same transaction as
-- the rows it covers, so a killed run resumes exactly where it committed.
-- A CSV source resumes from it in a later run of the same file; an upstream
-- is fetched anew by every run, so its row only records how far that run got.
CREATE TABLE IF NOT EXISTS checkpoint (
    source          TEXT PRIMARY KEY,
    fingerprint     TEXT NOT NULL,              -- what `position` refers to: CSV, the file's sha256;
                                                -- upstream, 'run N' (the run that fetched it)
    position        INTEGER NOT NULL,           -- CSV: byte offset reached; upstream: last page loaded
    line            INTEGER NOT NULL,           -- CSV: physical line reached; upstream: records read
    complete        INTEGER NOT NULL,           -- 1 once the whole input is loaded
    run_id          INTEGER NOT NULL,
    updated_at      TEXT NOT NULL
) WITHOUT ROWID;

-- Rows that failed validation, with where they were and why.
CREATE TABLE IF NOT EXISTS reject (
    run_id          INTEGER NOT NULL REFERENCES etl_run (run_id),
    source          TEXT NOT NULL,
    line            INTEGER NOT NULL,           -- CSV line, or record index of a response
    reason          TEXT NOT NULL,
    raw             TEXT NOT NULL,              -- the row as read, cut to 1 kB
    PRIMARY KEY (run_id, source, line)
) WITHOUT ROWID;

-- The raw upstream responses of recent runs, gzip-compressed as received, so
-- a changed normaliser can re-derive the store without refetching
-- (`python etl.py replay:NAME@RUN_ID`). etl.py keeps those of the last
-- KASPARRO_RAW_KEEP_RUNS runs of each source (default 48) and deletes older ones.
CREATE TABLE IF NOT EXISTS raw_payload (
    run_id          INTEGER NOT NULL REFERENCES etl_run (run_id),
    source          TEXT NOT NULL,
    page            INTEGER NOT NULL,           -- 1-based request of that run
    fetched_at      TEXT NOT NULL,
    url             TEXT NOT NULL,              -- never holds a key: keys travel in headers
    body            BLOB NOT NULL,              -- gzip of the JSON body
    PRIMARY KEY (source, run_id, page)
) WITHOUT ROWID;

-- A single row: the version of the data, moved by every commit that
-- changes it. The API derives data_version and ETags from it.
CREATE TABLE IF NOT EXISTS store_meta (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    store_id        TEXT NOT NULL,              -- random, made once per store
    generation      INTEGER NOT NULL,
    committed_at    TEXT NOT NULL
);

-- Outcomes of every finished run, summed: scope '' for whole runs (etl_run),
-- else one source's parts (run_source). Kept by the two triggers below, in
-- the transaction that ends a run (or marks a dead one failed), so /stats
-- reads a row per source however many runs there were. A run still running
-- is not in it yet.
CREATE TABLE IF NOT EXISTS run_totals (
    scope           TEXT PRIMARY KEY,
    runs            INTEGER NOT NULL DEFAULT 0,
    successes       INTEGER NOT NULL DEFAULT 0, -- success or partial
    partials        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    rows_read       INTEGER NOT NULL DEFAULT 0,
    rows_loaded     INTEGER NOT NULL DEFAULT 0,
    rows_rejected   INTEGER NOT NULL DEFAULT 0,
    last_success_at TEXT,
    last_failure_at TEXT,
    last_error      TEXT,                       -- of the newest failed run
    last_error_run  INTEGER,
    duration_ms_sum INTEGER NOT NULL DEFAULT 0,
    durations       INTEGER NOT NULL DEFAULT 0  -- runs with a duration, for the average
) WITHOUT ROWID;

-- A store made before run_totals: its finished runs, summed once.
INSERT OR IGNORE INTO run_totals
SELECT scope, count(*), count(*) FILTER (WHERE status <> 'failed'), count(*) FILTER (WHERE status = 'partial'),
       count(*) FILTER (WHERE status = 'failed'), sum(rows_read), sum(rows_loaded), sum(rows_rejected),
       max(ended_at) FILTER (WHERE status <> 'failed'), max(ended_at) FILTER (WHERE status = 'failed'),
       NULL, max(run_id) FILTER (WHERE status = 'failed'), coalesce(sum(duration_ms), 0), count(duration_ms)
FROM (SELECT '' AS scope, run_id, status, rows_read, rows_loaded, rows_rejected, ended_at, duration_ms FROM etl_run
      UNION ALL
      SELECT source, run_id, status, rows_read, rows_loaded, rows_rejected, ended_at, duration_ms FROM run_source)
WHERE status <> 'running'
GROUP BY scope;

UPDATE run_totals SET last_error = coalesce(
    (SELECT error FROM run_source WHERE run_id = last_error_run AND source = scope),
    (SELECT error FROM etl_run WHERE run_id = last_error_run AND scope = ''))
WHERE last_error IS NULL AND last_error_run IS NOT NULL;

CREATE TRIGGER IF NOT EXISTS etl_run_totals AFTER UPDATE OF status ON etl_run
WHEN OLD.status = 'running' AND NEW.status <> 'running'
BEGIN
    INSERT OR IGNORE INTO run_totals (scope) VALUES ('');
    UPDATE run_totals SET
        runs = runs + 1,
        successes = successes + (NEW.status <> 'failed'),
        partials = partials + (NEW.status = 'partial'),
        failures = failures + (NEW.status = 'failed'),
        rows_read = rows_read + NEW.rows_read,
        rows_loaded = rows_loaded + NEW.rows_loaded,
        rows_rejected = rows_rejected + NEW.rows_rejected,
        last_success_at = iif(NEW.status = 'failed', last_success_at,
                              max(coalesce(last_success_at, NEW.ended_at), NEW.ended_at)),
        last_failure_at = iif(NEW.status = 'failed', max(coalesce(last_failure_at, NEW.ended_at), NEW.ended_at),
                              last_failure_at),
        last_error = iif(NEW.status = 'failed' AND NEW.run_id >= coalesce(last_error_run, 0), NEW.error, last_error),
        last_error_run = iif(NEW.status = 'failed', max(coalesce(last_error_run, 0), NEW.run_id), last_error_run),
        duration_ms_sum = duration_ms_sum + coalesce(NEW.duration_ms, 0),
        durations = durations + (NEW.duration_ms IS NOT NULL)
    WHERE scope = '';
END;

CREATE TRIGGER IF NOT EXISTS run_source_totals AFTER UPDATE OF status ON run_source
WHEN OLD.status = 'running' AND NEW.status <> 'running'
BEGIN
    INSERT OR IGNORE INTO run_totals (scope) VALUES (NEW.source);
    UPDATE run_totals SET
        runs = runs + 1,
        successes = successes + (NEW.status <> 'failed'),
        partials = partials + (NEW.status = 'partial'),
        failures = failures + (NEW.status = 'failed'),
        rows_read = rows_read + NEW.rows_read,
        rows_loaded = rows_loaded + NEW.rows_loaded,
        rows_rejected = rows_rejected + NEW.rows_rejected,
        last_success_at = iif(NEW.status = 'failed', last_success_at,
                              max(coalesce(last_success_at, NEW.ended_at), NEW.ended_at)),
        last_failure_at = iif(NEW.status = 'failed', max(coalesce(last_failure_at, NEW.ended_at), NEW.ended_at),
                              last_failure_at),
        last_error = iif(NEW.status = 'failed' AND NEW.run_id >= coalesce(last_error_run, 0), NEW.error, last_error),
        last_error_run = iif(NEW.status = 'failed', max(coalesce(last_error_run, 0), NEW.run_id), last_error_run),
        duration_ms_sum = duration_ms_sum + coalesce(NEW.duration_ms, 0),
        durations = durations + (NEW.duration_ms IS NOT NULL)
    WHERE scope = NEW.source;
END;

PRAGMA user_version = 6;
