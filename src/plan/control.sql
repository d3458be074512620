CREATE SCHEMA IF NOT EXISTS {control};
CREATE TABLE IF NOT EXISTS {control}.runs (
    migration      text PRIMARY KEY,
    mapping_digest text NOT NULL,
    phase          text NOT NULL,
    blue_schema    text NOT NULL,
    green_schema   text NOT NULL,
    previous_search_path jsonb,
    blue_fingerprint text,
    -- the mapping's expressions as PostgreSQL resolved them at prepare (fully qualified)
    resolved       jsonb,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {control}.deferred (
    migration   text NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    green_table text NOT NULL,
    definition  text NOT NULL,
    done        boolean NOT NULL DEFAULT false,
    ref_table   text,               -- a foreign key's referenced table, quoted and qualified
    PRIMARY KEY (migration, kind, name)
);
CREATE TABLE IF NOT EXISTS {control}.chunks (
    migration   text NOT NULL,
    green_table text NOT NULL,
    chunk_no    int  NOT NULL,
    key_sql     text NOT NULL,
    key_type    text NOT NULL,
    lower_bound text,
    upper_bound text,
    null_keys   boolean NOT NULL DEFAULT false,
    state       text NOT NULL DEFAULT 'pending',
    rows_copied bigint,
    done_at     timestamptz,
    PRIMARY KEY (migration, green_table, chunk_no)
);
CREATE TABLE IF NOT EXISTS {control}.changes (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration  text NOT NULL,
    blue_table text NOT NULL,
    op         char(1) NOT NULL,
    old_row    jsonb,
    new_row    jsonb,
    txid       xid8 NOT NULL DEFAULT pg_current_xact_id(),
    logged_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- true: re-derive every entry reading the table (capture before live, a row-local step that
    -- gave way, TRUNCATE); false: only the entries the follower keeps.
    all_entries boolean NOT NULL DEFAULT false,
    -- An updated row: the entries whose columns it changed (NULL: every entry reading the table).
    entries    text[],
    -- After cutover: the entry whose reverse wrote these blue rows (not re-derived from them).
    skip_entry text
);
-- An applier claims, with the oldest rows (by the primary key, in order), every other row their
-- transactions logged (by txid). Each index is one more entry per row the application's writes
-- log: two, not three (the Chinook writer mix: 5,400 tps with three, 5,949 with two).
CREATE INDEX IF NOT EXISTS changes_txid ON {control}.changes (txid);
CREATE TABLE IF NOT EXISTS {control}.sync_failures (
    migration   text NOT NULL,
    green_table text NOT NULL,
    sync_key    jsonb NOT NULL,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, green_table, sync_key)
);
-- Change-log rows whose touched keys could not even be found (a key that does not fit its type):
-- kept with their images as the failure record, out of the way of the rows behind them.
CREATE TABLE IF NOT EXISTS {control}.failed_changes (
    id          bigint NOT NULL,
    migration   text NOT NULL,
    green_table text NOT NULL,
    blue_table  text NOT NULL,
    op          char(1) NOT NULL,
    old_row     jsonb,
    new_row     jsonb,
    all_entries boolean NOT NULL DEFAULT false,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id, green_table)
);
-- Entries to re-derive whole (a TRUNCATE of a table they read): pending until done.
CREATE TABLE IF NOT EXISTS {control}.rederive (
    migration    text NOT NULL,
    green_table  text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, green_table)
);
-- Followers alive (heartbeat) and what they applied.
CREATE TABLE IF NOT EXISTS {control}.followers (
    migration    text NOT NULL,
    host         text NOT NULL,
    pid          int  NOT NULL,
    backend_pid  int  NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    applied      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (migration, host, pid)
);
CREATE TABLE IF NOT EXISTS {control}.validations (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration      text NOT NULL,
    at             timestamptz NOT NULL DEFAULT now(),
    who            text NOT NULL DEFAULT current_user,
    passed         boolean NOT NULL,
    mapping_digest text NOT NULL,
    report_digest  text NOT NULL,
    snapshot_lsn   text,
    summary        jsonb NOT NULL
);
CREATE TABLE IF NOT EXISTS {control}.events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    who       text NOT NULL DEFAULT current_user,
    command   text NOT NULL,
    outcome   text NOT NULL,
    detail    jsonb
);
-- A small time series for the run report's timeline: the change-log backlog and lag a follower
-- saw, every two seconds while it runs.
CREATE TABLE IF NOT EXISTS {control}.samples (
    migration   text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    backlog     bigint NOT NULL,
    lag_seconds float8,
    applied     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_at ON {control}.samples (migration, at);
-- After cutover: green writes whose reverse into blue failed (the green write stands), by green
-- key; `sync` retries them, `rollback` refuses while any is left.
CREATE TABLE IF NOT EXISTS {control}.reverse_failures (
    migration   text NOT NULL,
    green_table text NOT NULL,
    green_key   jsonb NOT NULL,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, green_table, green_key)
);
-- Sessions that wrote blue after the cutover (old sessions, or sessions pinned to blue): one row
-- per session, refreshed by every statement; `status`, `cutover --drain-timeout` and `finalize`
-- read "blue writes seen in the last N seconds" from it.
CREATE TABLE IF NOT EXISTS {control}.blue_writers (
    migration        text NOT NULL,
    pid              int  NOT NULL,
    backend_start    timestamptz NOT NULL,
    usename          text,
    application_name text,
    client_addr      text,
    blue_table       text,
    first_write      timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_write       timestamptz NOT NULL DEFAULT clock_timestamp(),
    writes           bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (migration, pid, backend_start)
);
-- Columns added since a control schema may have been created: added in place (checked first, so
-- a control schema that has them takes no lock).
DO $upgrade$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT * FROM (VALUES ('deferred', 'ref_table', 'text'),
                                   ('changes', 'all_entries', 'boolean NOT NULL DEFAULT false'),
                                   ('changes', 'entries', 'text[]'),
                                   ('runs', 'resolved', 'jsonb'),
                                   ('runs', 'cutover_at', 'timestamptz'),
                                   ('runs', 'rollback_at', 'timestamptz'),
                                   ('runs', 'refuse_old_writes', 'boolean NOT NULL DEFAULT false'),
                                   ('changes', 'skip_entry', 'text'),
                                   ('events', 'os_user', 'text'),
                                   ('events', 'host', 'text'),
                                   ('events', 'args', 'jsonb'),
                                   ('events', 'started_at', 'timestamptz')) AS v(tab, col, def)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class t ON t.oid = a.attrelid
                       JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace
                       WHERE n.nspname = {control_literal} AND t.relname = c.tab AND a.attname = c.col AND NOT a.attisdropped) THEN
            EXECUTE pg_catalog.format('ALTER TABLE %I.%I ADD COLUMN %I %s', {control_literal}, c.tab, c.col, c.def);
        END IF;
    END LOOP;
END
$upgrade$;
CREATE OR REPLACE FUNCTION {control}.unmapped_value(target text, value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'bluegreen: value % of % is not in its map and the column has no default', quote_literal(value), target
        USING ERRCODE = 'data_exception';
END
$fn$;
