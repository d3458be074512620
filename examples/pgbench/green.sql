-- Green schema for pgbench's TPC-B tables: renamed tables and columns, bigint balances.
-- Used by scripts/bench to measure the cost of live sync on a write-heavy application.
CREATE TABLE branches (
    id      integer PRIMARY KEY,
    balance bigint NOT NULL
);
CREATE TABLE tellers (
    id        integer PRIMARY KEY,
    branch_id integer NOT NULL,
    balance   bigint NOT NULL
);
CREATE TABLE accounts (
    id        integer PRIMARY KEY,
    branch_id integer NOT NULL,
    balance   bigint NOT NULL
);
CREATE INDEX accounts_branch_id_idx ON accounts (branch_id);
