//! The command line (clap derive): the doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Move a live PostgreSQL schema to a new shape with no downtime.
///
/// A YAML mapping says how every table of the new ("green") schema is computed from the one in use
/// ("blue"). bluegreen builds green beside blue, copies and keeps it in step, validates it, and
/// flips search_path. Exit codes: 0 success, 1 the command found a problem, 2 error.
#[derive(Parser, Debug)]
#[command(
    name = "bluegreen",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check the mapping against the live database and show what would be done. Writes nothing.
    ///
    /// Runs green_ddl and compiles every expression inside one transaction that is rolled back;
    /// profiles the data (value maps, NOT NULL / CHECK / UNIQUE of green, determinism); prints per
    /// green table the source, estimated rows and size, chunks, sync key and rollback verdict, and
    /// every SQL statement prepare/copy/cutover/rollback will run with the lock it takes.
    /// Exit 0 when the plan is sound, 2 when the mapping has errors.
    #[command(
        after_long_help = "Locks: none on application tables (one read-only transaction, rolled back; green_ddl runs
inside it and disappears with it).

Examples:
  bluegreen plan -m mappings/carbot.yaml
  bluegreen plan -m mappings/carbot.yaml --format markdown > runbook.md
  bluegreen plan -m mappings/carbot.yaml --format json --profile full"
    )]
    Plan(PlanArgs),
    /// Create the control schema, the green schema (green_ddl) and change capture on every blue
    /// table the mapping reads. Idempotent; every lock under lock_timeout with retry.
    ///
    /// First runs the checks `plan` runs (rolled back): any error stops it before it writes
    /// anything (exit 2, the same located diagnostics as `plan`); warnings are printed.
    #[command(
        after_long_help = "Changes: creates the control schema (bluegreen), the green schema from green_ddl, and capture
triggers on each blue table the mapping reads.
Locks: SHARE ROW EXCLUSIVE on each blue table for the CREATE TRIGGER (a few milliseconds; each
wait bounded by --lock-timeout, below deadlock_timeout, retried).

Examples:
  bluegreen prepare -m mappings/carbot.yaml
  PGHOST=db.internal PGUSER=migrator bluegreen prepare -m mappings/carbot.yaml"
    )]
    Prepare(PrepareArgs),
    /// Fill green from blue while the application writes, then keep it in step (live sync).
    ///
    /// Runs the checks `plan` runs and prepare when needed (an error stops it before it writes
    /// anything: exit 2). Copies parallel chunks of each driving table (resumable: kill it
    /// and run it again; several copy processes can share the work), builds indexes and foreign
    /// keys after the data, advances sequences, replays the captured changes and switches the
    /// triggers to live mode, after which every write to blue re-derives green in its own
    /// transaction.
    #[command(
        after_long_help = "Changes: fills green (and its indexes and foreign keys), the chunk ledger and the change log;
switches the capture triggers to live sync.
Locks: none on blue beyond row reads in repeatable-read snapshots; the live switch takes SHARE
ROW EXCLUSIVE on each blue table for one short transaction. Application writes then pay for
the row-local re-derive in their own statement (row locks on green only).

Examples:
  bluegreen copy -m mappings/carbot.yaml --jobs 4 --follow
  bluegreen copy -m mappings/carbot.yaml          # resume after a kill; other machines may join"
    )]
    Copy(CopyArgs),
    /// Apply the change log: once (exit 0 when nothing is left pending or failed, 1 otherwise), or
    /// continuously with --follow.
    ///
    /// Entries that are not row-local (joins, lookups, group_by, keys not unique in blue) are
    /// kept in step by this follower: run `sync --follow` beside the application from copy until
    /// finalize. Several followers may run at once, on several machines. Ctrl-C or SIGTERM stops a
    /// follower after the batch in flight. Also retries keys whose sync failed, in small batches,
    /// and changes set aside because their keys could not be found.
    #[command(
        after_long_help = "Changes: green rows (re-derived from blue), the change log, sync failures.
Locks: row locks on the green rows of the keys it re-derives (FOR NO KEY UPDATE) and a share
lock on the blue rows of row-local keys, each wait bounded (it gives way to the application).

Examples:
  bluegreen sync -m mappings/carbot.yaml                 # once: drain, retry failures
  bluegreen sync -m mappings/carbot.yaml --follow        # the follower, until finalize
  systemd: ExecStart=/usr/local/bin/bluegreen sync --follow -m /etc/bluegreen/carbot.yaml"
    )]
    Sync(SyncArgs),
    /// Phase, per-table progress, change-log backlog and lag, followers alive, sync failures,
    /// drift, recent events.
    #[command(after_long_help = "Changes: nothing. Locks: none.

Examples:
  bluegreen status -m mappings/carbot.yaml
  watch -n 2 bluegreen status -m mappings/carbot.yaml
  bluegreen status -m mappings/carbot.yaml --format json | jq .backlog")]
    Status(StatusArgs),
    /// Prove green = M(blue) in one snapshot, locate every difference, run the checks file, and
    /// write a sign-off report.
    ///
    /// Exit 0 when every table matches and every check passes, 1 when anything differs or fails
    /// (a one-screen summary names each table and the first keys), 2 on error. Values in the
    /// report are masked unless --show-values.
    #[command(
        after_long_help = "Changes: records the result in bluegreen.validations (the cutover gate reads it); applies
pending changes of the keys it finds different before deciding.
Locks: none on application tables (repeatable-read snapshots shared by its workers); the
checks run in one snapshot taken while the change log is drained under a brief EXCLUSIVE lock
on the blue tables (reads go on; writes wait for the drain, typically milliseconds, bounded).

Examples:
  bluegreen validate -m mappings/carbot.yaml --report reports/carbot
  bluegreen validate -m mappings/carbot.yaml --show-values --max-diffs 50"
    )]
    Validate(ValidateArgs),
    /// Move the application to green: gates, then one short transaction that flips search_path,
    /// with reverse sync keeping blue in step for a lossless rollback.
    ///
    /// Gates (each refuses with its reason, exit 1, nothing changed): phase live or rolled back; a
    /// passing validation of this exact mapping, newer than --max-validation-age; no DDL drift; no
    /// sync failures; no prepared transactions; no transaction older than --max-transaction-age
    /// holding locks on blue tables; the privileges ALTER DATABASE / ALTER ROLE need; tables a
    /// rollback would lose writes to need --accept-lossy-rollback; a confirmation unless --yes.
    ///
    /// Then one transaction, retried: lock the blue tables EXCLUSIVE (reads go on), drain the change
    /// log (within --fence-timeout), lock the green tables, install the reverse triggers on green,
    /// switch the blue triggers to their post-cutover bodies, interleave generated keys, record
    /// every search_path setting exactly and set green first for the database and the roles whose
    /// own setting would override it (and those given with --role); commit. Prints how long writes
    /// were blocked. Sessions opened before the flip keep their search_path: their blue writes
    /// still reach green (or fail with "schema moved" under --refuse-old-writes), and are listed
    /// with --drain-timeout, ended with --terminate.
    #[command(
        after_long_help = "Locks: EXCLUSIVE on the blue tables (reads go on), then SHARE ROW EXCLUSIVE on the green
tables, for one transaction of typically tens of milliseconds; each wait at most 100 ms,
retried --attempts times. Changes: reverse triggers on green, the blue triggers' bodies,
sequence increments, ALTER DATABASE / ALTER ROLE ... SET search_path.

Examples:
  bluegreen cutover -m mappings/carbot.yaml --accept-lossy-rollback
  bluegreen cutover -m mappings/carbot.yaml --yes --drain-timeout 60 --terminate"
    )]
    Cutover(CutoverArgs),
    /// Move the application back to blue: restore every search_path setting byte for byte.
    ///
    /// Locks the green tables EXCLUSIVE for one short transaction, checks the settings are still as
    /// the cutover left them, restores each and compares, switches the blue triggers back to live
    /// sync; the reverse triggers stay (sessions opened meanwhile may still write green) and give
    /// way to blue writers with a retryable error. Lossless for invertible tables: every write
    /// made on green reached blue in its own transaction. `cutover` may follow again.
    #[command(
        after_long_help = "Locks: EXCLUSIVE on the green tables for one short transaction (each wait at most 100 ms,
retried). Changes: the search_path settings back, the trigger bodies back to live sync.

Examples:
  bluegreen rollback -m mappings/carbot.yaml
  bluegreen rollback -m mappings/carbot.yaml --yes --format json"
    )]
    Rollback(RollbackArgs),
    /// After the soak: take sync out, leaving only the archive (runs, validations, events).
    ///
    /// Refused while sessions still write blue (seen in the last --quiet seconds) or changes are
    /// pending, and unless the migration is cut over (or rolled back, with --abandon, which drops
    /// green instead). Drops every trigger and function bluegreen generated for the migration,
    /// puts the interleaved sequences back to plain increments past every used value, deletes the
    /// migration's change log, failures, follower state and chunk ledger. Blue tables stay unless
    /// --drop-blue.
    #[command(
        after_long_help = "Locks: ACCESS EXCLUSIVE on the tables carrying generated triggers, for one short transaction
(the DROP TRIGGERs; each wait bounded by --lock-timeout, retried).

Examples:
  bluegreen finalize -m mappings/carbot.yaml --quiet 10min
  bluegreen finalize -m mappings/carbot.yaml --abandon         # after a rollback: drop green
  bluegreen finalize -m mappings/carbot.yaml --drop-blue --yes"
    )]
    Finalize(FinalizeArgs),
    /// See the whole tool at work: the CarBot migration on a throwaway PostgreSQL while a
    /// simulated application writes, in about a minute. Needs only the PostgreSQL server binaries.
    ///
    /// Starts a private server (initdb in /tmp, Unix socket only, no TCP port), loads the legacy
    /// CarBot schema with generated data, starts application sessions (half keep one connection
    /// and stay on blue through every flip, half reconnect per transaction and follow
    /// search_path) inserting, updating and deleting leads, customers, workshops and chat
    /// messages, and runs the real commands: plan (the runbook), copy --follow, validate,
    /// cutover, validate, rollback, validate, cutover again, validate with the sign-off report.
    /// Then counts the writes lost by looking up every row the application wrote, as it last
    /// committed it, in both schemas. Exit 0 when every check passes (0 writes lost, 0
    /// application errors), 1 when one fails, 2 on error. Nothing is left running, even after
    /// Ctrl-C, unless --keep.
    #[command(after_long_help = "Examples:
  bluegreen demo
  bluegreen demo --rows 200000 --writers 8 --keep")]
    Demo(DemoArgs),
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Legacy leads to generate; workshops (rows/200), customers (rows/2) and chat messages
    /// (about 5 per lead) scale from it.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,
    /// Application sessions writing throughout (every other one long-lived).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub writers: u16,
    /// Seconds of application traffic after each step from the copy on.
    #[arg(long, default_value_t = 4)]
    pub window: u64,
    /// Where the runbook, the sign-off report, the mapping files and every command's output
    /// go (created; reused only if an earlier demo made it).
    #[arg(long, value_name = "DIR", default_value = "bluegreen-demo")]
    pub out: PathBuf,
    /// Leave the server running at the end and print a DATABASE_URL to explore it.
    #[arg(long)]
    pub keep: bool,
}

/// Flags every command that talks to a database shares.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The mapping file (YAML).
    #[arg(short = 'm', long = "mapping", value_name = "FILE")]
    pub mapping: PathBuf,
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db (a Unix socket
    /// directory goes in ?host=/path). The password is never printed. Without it (and without
    /// DATABASE_URL) bluegreen connects as psql does: PGHOST, PGPORT, PGUSER, PGDATABASE,
    /// PGPASSWORD, PGSSLMODE and the other libpq variables, and ~/.pgpass.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        value_name = "URL",
        hide_env_values = true,
        default_value = crate::pg::FROM_ENVIRONMENT,
        hide_default_value = true
    )]
    pub database_url: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables for a terminal.
    Text,
    /// Machine-readable (schema documented in README.md; `format_version` marks changes).
    Json,
    /// A maintenance-window runbook.
    Markdown,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    /// No data profiling: names, types and expressions only.
    None,
    /// Profile a sample of driving tables larger than 200k rows, the rest fully.
    Sample,
    /// Profile every row (slow on large tables).
    Full,
}

impl From<ProfileArg> for crate::plan::ProfileMode {
    fn from(p: ProfileArg) -> Self {
        match p {
            ProfileArg::None => crate::plan::ProfileMode::None,
            ProfileArg::Sample => crate::plan::ProfileMode::Sample,
            ProfileArg::Full => crate::plan::ProfileMode::Full,
        }
    }
}

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// How much of the data to profile.
    #[arg(long, value_enum, default_value_t = ProfileArg::Sample)]
    pub profile: ProfileArg,
    /// Parallel jobs the copy will use (overrides settings.jobs).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Rows per copy chunk (overrides settings.chunk_rows).
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Lock timeout for every DDL and lock, e.g. 2s or 500ms (overrides settings.lock_timeout).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
}

fn parse_duration_ms(s: &str) -> Result<u64, String> {
    crate::mapping::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| format!("`{s}` is not a positive duration: write 500ms, 2s or 1min"))
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub common: Common,
    /// How much of the data the checks before the first write profile (the checks `plan` runs;
    /// skipped once the migration is prepared with this mapping).
    #[arg(long, value_enum, default_value_t = ProfileArg::Sample)]
    pub profile: ProfileArg,
    /// Lock timeout for every DDL and lock, e.g. 2s or 500ms (overrides settings.lock_timeout).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// Pick per the benchmark: insert-select (the COPY pipe renders and parses every row once
    /// more, which cost more than the insert itself on the one-large-table benchmark; see
    /// BENCHMARKS.md).
    Auto,
    /// Server-side INSERT ... SELECT per chunk: no data leaves the server.
    InsertSelect,
    /// Binary COPY TO STDOUT piped into COPY FROM STDIN through this process.
    Copy,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[command(flatten)]
    pub common: Common,
    /// How much of the data the checks before the first write profile (the checks `plan` runs;
    /// skipped once the migration is prepared with this mapping).
    #[arg(long, value_enum, default_value_t = ProfileArg::Sample)]
    pub profile: ProfileArg,
    /// Parallel workers (overrides settings.jobs).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Rows per chunk (overrides settings.chunk_rows); used when chunks are first planned. A key
    /// in no order on a heap larger than half of shared_buffers (a random uuid) gets chunks of up
    /// to a million rows (at least 4, a multiple of --jobs): each chunk reads the whole heap.
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Copy engine.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    pub engine: EngineArg,
    /// Lock timeout for every DDL and lock (overrides settings.lock_timeout).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
    /// After the copy, stay and follow the change log (as `sync --follow`) until stopped.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub common: Common,
    /// Keep applying the change log until stopped (Ctrl-C, SIGTERM): the follower.
    #[arg(long)]
    pub follow: bool,
    /// Output format (text or json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
    /// Output format (text or json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub common: Common,
    /// Write report.md, report.json, report.html (with the migration's timeline), tables.csv and
    /// differences.csv into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<std::path::PathBuf>,
    /// Parallel workers sharing the snapshot (overrides settings.jobs).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Rows per compared chunk (overrides settings.chunk_rows); a key in no order on a heap
    /// larger than half of shared_buffers gets chunks of up to a million rows.
    #[arg(long)]
    pub chunk_rows: Option<u64>,
    /// Differences listed at most (totals are always complete).
    #[arg(long, default_value_t = 100)]
    pub max_diffs: usize,
    /// Show the differing values (masked by default: reports travel).
    #[arg(long)]
    pub show_values: bool,
    /// Do not fail on keys that stayed pending through every re-check (written continuously, so
    /// neither verified nor found different: "unverified (hot)").
    #[arg(long)]
    pub allow_hot: bool,
    /// Move a worker to a fresh snapshot between chunks once its snapshot is this old (an old
    /// snapshot keeps the change log's dead rows from being vacuumed), e.g. 60s or 5min.
    #[arg(long, value_parser = parse_duration_ms, default_value = "60s")]
    pub max_snapshot_age: u64,
    /// Output on stdout: the summary (text) or the whole report (json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct CutoverArgs {
    #[command(flatten)]
    pub common: Common,
    /// The newest validation must be younger than this, e.g. 30min or 1h.
    #[arg(long, value_parser = parse_duration_ms, default_value = "1h")]
    pub max_validation_age: u64,
    /// Cut over although a rollback would lose the writes made on green to some tables (`reverse:
    /// none`, or blue columns no reverse rebuilds; `plan` lists them).
    #[arg(long)]
    pub accept_lossy_rollback: bool,
    /// Also flip this role's own in-database search_path (repeatable). Roles whose own setting
    /// would override the database's are flipped without being named.
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// After the flip, make every blue write from a session still on the old search_path fail
    /// with a "schema moved, reconnect" error instead of reaching green.
    #[arg(long)]
    pub refuse_old_writes: bool,
    /// How long the fence may hold blue writes while it drains the change log, e.g. 500ms.
    #[arg(long, value_parser = parse_duration_ms, default_value = "500ms")]
    pub fence_timeout: u64,
    /// Lock wait per attempt (capped below the server's deadlock_timeout and at 100 ms).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
    /// Refuse while a transaction older than this holds a lock on a blue table.
    #[arg(long, value_parser = parse_duration_ms, default_value = "30s")]
    pub max_transaction_age: u64,
    /// Attempts at the fence before giving up (nothing changed).
    #[arg(long, default_value_t = 10)]
    pub attempts: u32,
    /// After the flip, wait up to this many seconds until no session has written blue for 2 s.
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// After --drain-timeout, end the sessions still writing blue (pg_terminate_backend).
    #[arg(long, requires = "drain_timeout")]
    pub terminate: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Output format (text or json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub common: Common,
    /// Lock wait per attempt (capped below the server's deadlock_timeout and at 100 ms).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
    /// Attempts at the fence before giving up (nothing changed).
    #[arg(long, default_value_t = 10)]
    pub attempts: u32,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Output format (text or json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct FinalizeArgs {
    #[command(flatten)]
    pub common: Common,
    /// After a rollback: give the migration up and drop the green schema.
    #[arg(long)]
    pub abandon: bool,
    /// Also drop the blue tables the mapping reads (asks, unless --yes).
    #[arg(long, conflicts_with = "abandon")]
    pub drop_blue: bool,
    /// Refuse while a session wrote blue within this long, e.g. 60s.
    #[arg(long, value_parser = parse_duration_ms, default_value = "60s")]
    pub quiet: u64,
    /// Lock timeout for the drops (overrides settings.lock_timeout).
    #[arg(long, value_parser = parse_duration_ms)]
    pub lock_timeout: Option<u64>,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Output format (text or json).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}
