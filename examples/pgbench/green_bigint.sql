-- Green schema for pgbench's TPC-B tables with every key widened to bigint: the commonest
-- migration there is (a key running out of room). Used by scripts/bench (figure 3b): a widening
-- key stays row-local, and blue is looked up by its own integer index.
CREATE TABLE branches (
    id      bigint PRIMARY KEY,
    balance bigint NOT NULL
);
CREATE TABLE tellers (
    id        bigint PRIMARY KEY,
    branch_id bigint NOT NULL,
    balance   bigint NOT NULL
);
CREATE TABLE accounts (
    id        bigint PRIMARY KEY,
    branch_id bigint NOT NULL,
    balance   bigint NOT NULL
);
CREATE INDEX accounts_branch_id_idx ON accounts (branch_id);
