//! `prepare` (DESIGN.md step 1): the control schema, the green DDL (secondary indexes and foreign
//! keys recorded, then dropped until the data is in), and capture triggers on every blue table the
//! mapping reads, committed before any copy snapshot is taken.

use sqlx::PgConnection;

use crate::catalog::{self, Catalog};
use crate::control::{self, Phase, events, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{self, db_error, exec, locking};
use crate::plan::steps;
use crate::sql::{Ident, Sql, sql};

/// `prepare`: idempotent; a no-op once the migration is prepared.
pub async fn prepare(url: &str, m: &Mapping, lock_timeout_ms: u64) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    locking::try_runner_lock(&mut conn, &m.migration, true).await?;
    let r = prepare_locked(&mut conn, m, lock_timeout_ms).await;
    let _ = locking::runner_unlock(&mut conn, &m.migration, true).await;
    r
}

async fn prepare_locked(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    exec(conn, &sql!("{}", steps::control_ddl(&m.control_schema))).await?;
    let phase = runs::phase(conn, m).await?;
    if phase != Phase::New {
        runs::check_mapping(conn, m).await?;
        runs::check_drift(conn, m).await?;
        eprintln!(
            "bluegreen: migration {} is already prepared (phase {phase})",
            m.migration
        );
        return Ok(());
    }
    runs::register(conn, m).await?;
    // The expressions as PostgreSQL resolves them now, kept for every later command.
    runs::resolved_mapping(conn, m).await?;
    events::record(conn, m, "prepare", "started", serde_json::json!({})).await?;
    green_ddl(conn, m, lock_timeout_ms).await?;

    // The mapping must fit the catalog before anything touches blue (plan checks much more).
    let cat = control::load_catalog(conn, m).await?;
    static_gate(m, &cat)?;

    // Capture: a trigger per event on every blue table read and on each of its partitions and
    // inheritance children, under lock_timeout with retry.
    for (n, x) in m.blue_tables_read().iter().enumerate() {
        exec(conn, &crate::plan::sync::capture_trigger_function(m, x, n)).await?;
        let f = crate::names::sync_function(&m.control_schema, &m.migration, n);
        let names: Vec<String> = crate::names::EVENTS
            .iter()
            .map(|(ev, _)| crate::names::sync_trigger(&m.migration, ev))
            .collect();
        for target in catalog::with_descendants(conn, x).await.map_err(db_error)? {
            let have: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_catalog.pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = ANY ($2) AND tgenabled = 'A' AND tgfoid = to_regprocedure($3)")
                .bind(target.to_string())
                .bind(&names)
                .bind(format!("{f}()"))
                .fetch_one(&mut *conn)
                .await
                .map_err(db_error)?;
            if have == names.len() as i64 {
                continue;
            }
            let stmts = steps::capture_triggers(m, &target, n);
            locking::run_locked(
                conn,
                lock_timeout_ms,
                std::slice::from_ref(&target),
                async |tx| {
                    for s in &stmts {
                        exec(tx, s).await?;
                    }
                    Ok(())
                },
            )
            .await?;
            eprintln!("bluegreen: capturing changes on {}", target.display());
        }
    }
    runs::mark_prepared(conn, m).await?;
    events::record(conn, m, "prepare", "done", serde_json::json!({})).await?;
    Ok(())
}

/// The green DDL, once, in one transaction (under lock_timeout, retried); secondary indexes and
/// foreign keys are recorded and dropped so the copy writes into bare tables (they come back
/// after the data).
async fn green_ddl(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    let green_has_tables: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind IN ('r','p'))",
    )
    .bind(&m.green)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if green_has_tables {
        return Ok(());
    }
    let ddl = std::fs::read_to_string(&m.green_ddl).map_err(|e| {
        Diagnostic::error(
            "missing-file",
            format!("cannot read green_ddl {}: {e}", m.green_ddl.display()),
        )
    })?;
    if let Some((line, word)) = crate::sql::scan::transaction_control(&ddl).unwrap_or(None) {
        return Err(Diagnostic::error(
            "green-ddl-transaction",
            format!(
                "green_ddl contains {word} (line {line}): bluegreen runs the file in its own transaction"
            ),
        ));
    }
    let green = Ident::new(&m.green);
    let ddl = Sql::verbatim(ddl);
    locking::run_locked(conn, lock_timeout_ms, &[], async |tx| {
        exec(
            tx,
            &sql!("CREATE SCHEMA IF NOT EXISTS {green}; SET LOCAL search_path = {green}"),
        )
        .await?;
        exec(tx, &ddl).await.map_err(|d| {
            if locking::is_transient(&d) {
                return d;
            }
            Diagnostic::error(
                "green-ddl-failed",
                format!("green_ddl failed: {}", d.message),
            )
            .hint("run `bluegreen plan` to locate the error")
        })?;
        exec(tx, &sql!("SET LOCAL search_path = pg_catalog")).await?;
        // Blue too: whether copy can leave a green key out depends on the blue table it chunks.
        let schemas = m.catalog_schemas();
        let refs: Vec<&str> = schemas.iter().map(String::as_str).collect();
        let cat = catalog::load(tx, &refs).await.map_err(db_error)?;
        for d in steps::deferrals(m, &cat) {
            control::deferred::defer(tx, m, &d).await?;
        }
        Ok(())
    })
    .await
}

/// Refuse a mapping that does not fit the catalog (names, keys), before any work.
pub(super) fn static_gate(m: &Mapping, cat: &Catalog) -> Result<(), Diagnostic> {
    match crate::plan::static_checks(m, cat)
        .into_iter()
        .find(|d| d.is_error())
    {
        Some(d) => Err(d.hint_or("run `bluegreen plan` for every finding")),
        None => Ok(()),
    }
}
