//! The control schema and the run ledger: everything about a migration's state that `prepare`,
//! `copy`, `sync`, `validate`, `status` (and the commands after them) share, so no engine reaches
//! into another. Every value a statement here writes or filters on is a bound `$n` parameter; only
//! the schema-qualified table names are rendered. The DDL is `plan/control.sql`.
//!
//! - `phase`: the phase as a type and its transitions (pure); `runs`: reading and moving it, the
//!   blue fingerprint (DDL drift) and the mapping digest.
//! - `chunks`: the chunk ledger and the one quantile query copy and validate split tables with.
//! - `changes`: the change log and the sync failures.
//! - `deferred`: green indexes and foreign keys held back until the data is in.
//! - `events`, `validations`: the audit trail and the results the cutover gate reads.
//! - `status`: all of it for `bluegreen status`.

pub mod changes;
pub mod chunks;
pub mod deferred;
pub mod events;
pub mod phase;
pub mod runs;
pub mod status;
pub mod validations;
pub mod writers;

use sqlx::PgConnection;
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::{Query, QueryScalar};

use crate::catalog::{self, Catalog};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{db_error, exec};
use crate::plan::query::set_mapping_search_path;
use crate::sql::{QName, Sql, sql};

pub use phase::Phase;

/// The tables of the control schema (`plan/control.sql`).
const TABLES: [&str; 13] = [
    "runs",
    "deferred",
    "chunks",
    "changes",
    "sync_failures",
    "failed_changes",
    "rederive",
    "followers",
    "validations",
    "events",
    "blue_writers",
    "reverse_failures",
    "samples",
];

/// A table of the control schema, e.g. `table(m, "runs")`.
pub fn table(m: &Mapping, name: &str) -> QName {
    QName::new(&m.control_schema, name)
}

/// A fixed statement over control tables, each `{table}` placeholder rendered as the table's
/// schema-qualified name (the only part of these statements that is not a `$n` parameter).
pub fn statement(m: &Mapping, text: &'static str) -> Sql {
    let mut s = text.to_string();
    for t in TABLES {
        s = s.replace(&format!("{{{t}}}"), &table(m, t).to_string());
    }
    debug_assert!(!s.contains('{'), "unknown control table in: {text}");
    sql!("{s}")
}

/// [`statement`] with this migration bound as `$1`: every statement here is about one migration.
fn query(m: &Mapping, text: &'static str) -> Query<'static, Postgres, PgArguments> {
    sqlx::query(statement(m, text).assert_safe()).bind(&m.migration)
}

/// [`query`] returning one column.
fn scalar<O>(m: &Mapping, text: &'static str) -> QueryScalar<'static, Postgres, O, PgArguments>
where
    (O,): for<'r> sqlx::FromRow<'r, PgRow>,
{
    sqlx::query_scalar(statement(m, text).assert_safe()).bind(m.migration.clone())
}

/// Bring an existing control schema up to this version (tables and columns added since it was
/// created, in place; nothing when it is current or absent), before a command that reads them.
pub async fn upgrade(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    // A finalized migration keeps only its archive: nothing is recreated for it.
    if !exists(conn, m).await? || runs::phase(conn, m).await? == Phase::Finalized {
        return Ok(());
    }
    // Current already (the usual case): nothing runs. The DDL would take locks on control tables
    // the application's triggers write (CREATE INDEX IF NOT EXISTS locks the change log before it
    // looks), and a writer's open transaction would then hold every later writer behind it.
    let current: bool = sqlx::query_scalar(
        "SELECT pg_catalog.to_regclass($2) IS NOT NULL AND (SELECT count(*) FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT a.attisdropped AND (c.relname, a.attname) IN (('events', 'started_at'), ('changes', 'skip_entry'), ('runs', 'refuse_old_writes'), ('samples', 'lag_seconds'))) = 4",
    )
    .bind(&m.control_schema)
    .bind(table(m, "reverse_failures").to_string())
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if current {
        return Ok(());
    }
    eprintln!(
        "bluegreen: upgrading control schema {} in place (tables and columns this version added)",
        m.control_schema
    );
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(db_error)?;
    exec(&mut tx, &sql!("SET LOCAL lock_timeout = '2s'")).await?;
    exec(
        &mut tx,
        &sql!("{}", crate::plan::steps::control_ddl(&m.control_schema)),
    )
    .await?;
    tx.commit().await.map_err(db_error)
}

/// Whether the control schema holds its tables yet (it does after the first `prepare`).
pub async fn exists(conn: &mut PgConnection, m: &Mapping) -> Result<bool, Diagnostic> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table(m, "runs").to_string())
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// The catalog of the schemas the mapping names, read with `search_path = pg_catalog` (so type
/// names come out schema-qualified); leaves the session on the mapping's search_path.
/// The keys copy left out (still deferred) are put back in (`deferred::restore_keys`).
pub async fn load_catalog(conn: &mut PgConnection, m: &Mapping) -> Result<Catalog, Diagnostic> {
    Ok(load_catalog_and_deferred(conn, m).await?.0)
}

/// [`load_catalog`], and what is still deferred (read once for both).
async fn load_catalog_and_deferred(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<(Catalog, Vec<deferred::Pending>), Diagnostic> {
    exec(conn, &sql!("SET search_path = pg_catalog")).await?;
    let schemas = m.catalog_schemas();
    let refs: Vec<&str> = schemas.iter().map(String::as_str).collect();
    let mut cat = catalog::load(conn, &refs).await.map_err(db_error)?;
    exec(conn, &set_mapping_search_path(m, false)).await?;
    let pending = deferred::pending_if_any(conn, m).await?;
    deferred::restore_keys(&mut cat, &pending)?;
    Ok((cat, pending))
}

/// The catalog with the green foreign keys that are still deferred (dropped for the copy) put
/// back from their recorded definitions, so sync orders its upserts and deletes by them.
pub async fn load_catalog_for_sync(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Catalog, Diagnostic> {
    let (mut cat, pending) = load_catalog_and_deferred(conn, m).await?;
    for fk in pending
        .into_iter()
        .filter(|p| p.kind == crate::plan::steps::DeferralKind::ForeignKey)
    {
        let Some(ref_table) = fk.ref_table else {
            continue;
        };
        if let Some(t) = cat
            .tables
            .get_mut(&(fk.table.schema.clone(), fk.table.name.clone()))
            && !t.foreign_keys.iter().any(|f| f.name == fk.name)
        {
            t.foreign_keys.push(catalog::ForeignKey {
                name: fk.name,
                columns: Vec::new(),
                ref_table,
                ref_columns: Vec::new(),
                definition: fk.definition,
                validated: false,
            });
        }
    }
    Ok(cat)
}
