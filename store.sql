-- Kasparro store: the only DDL of the project, applied by etl.py.
--
-- Every statement is idempotent, so applying this file to an existing store
-- changes nothing but what is missing: that is how etl.py migrates an older
-- store in place (version 1 -> 2 added raw_payload, 2 -> 3 made the rank
-- index covering, 3 -> 4 added run_totals). `PRAGMA user_version`
-- records the schema version; etl.py refuses a store newer than it knows.
-- Times are RFC 3339 UTC text ('2026-11-25T12:00:00Z'), so text order is
-- time order.

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

-- Every observation ever loaded: the history. The key makes a reload of the
-- same observation a no-op.
CREATE TABLE IF NOT EXISTS observation (
    source          TEXT NOT NULL,
    source_id       TEXT NOT NULL,
    observed_at     TEXT NOT NULL,
    symbol          TEXT NOT NULL,
    name            TEXT NOT NULL,
    rank            INTEGER,
    price_usd       REAL,
    market_cap_usd  REAL,
    volume_24h_usd  REAL,
    change_24h_pct  REAL,
    status          TEXT NOT NULL,
    run_id          INTEGER NOT NULL,
    PRIMARY KEY (source, source_id, observed_at),
    FOREIGN KEY (source, source_id) REFERENCES source_map (source, source_id)
        DEFERRABLE INITIALLY DEFERRED
) WITHOUT ROWID;

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

PRAGMA user_version = 4;
