CREATE SCHEMA IF NOT EXISTS {control};
CREATE TABLE IF NOT EXISTS {control}.runs (
    migration      text PRIMARY KEY,
    mapping_digest text NOT NULL,
    phase          text NOT NULL,
    blue_schema    text NOT NULL,
    green_schema   text NOT NULL,
    previous_search_path jsonb,
    blue_fingerprint text,
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
-- Control schemas made before `ref_table` existed get it (checked first: ALTER TABLE would lock).
DO $upgrade$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = {control_literal} AND c.relname = 'deferred' AND a.attname = 'ref_table' AND NOT a.attisdropped) THEN
        ALTER TABLE {control}.deferred ADD COLUMN ref_table text;
    END IF;
END
$upgrade$;
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
    logged_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS changes_migration_id ON {control}.changes (migration, id);
CREATE TABLE IF NOT EXISTS {control}.sync_failures (
    migration   text NOT NULL,
    green_table text NOT NULL,
    sync_key    jsonb NOT NULL,
    error       text NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, green_table, sync_key)
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
CREATE OR REPLACE FUNCTION {control}.unmapped_value(target text, value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    IF value IS NULL THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'bluegreen: value % of % is not in its map and the column has no default', quote_literal(value), target
        USING ERRCODE = 'data_exception';
END
$fn$;
