//! Keeping green = M(blue) after the copy (DESIGN.md step 3 and 7): install the re-derivation
//! functions rendered by `plan::sync`, replay the change log in batches (catch-up), then switch the
//! capture triggers to live mode in one short transaction; `sync` replays or retries on demand;
//! `status` reports.

use serde::Serialize;
use sqlx::{PgConnection, Row};

use crate::copy::load_catalog_for_sync as load_catalog;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::names;
use crate::pg::locking;
use crate::plan::sync::{catchup_function, live_trigger_function, retry_function, sync_entries};
use crate::sql::{Literal, QName, Sql};
use crate::state::{self, exec};

/// Change-log rows replayed per catch-up transaction.
pub const BATCH: i64 = 5_000;
/// Backlog small enough to drain inside the live-switch transaction.
pub const SWITCH_BACKLOG: i64 = 2_000;

fn db(e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("database-error", e.to_string())
}

/// (Re)create every re-derivation function. Refuses entries sync cannot key.
pub async fn install_functions(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let cat = load_catalog(conn, m).await?;
    let entries = sync_entries(m, &cat);
    for e in &m.tables {
        if !entries.iter().any(|s| s.entry.name == e.name) {
            return Err(Diagnostic::error(
                "no-upsert-key",
                format!("green table {} has no primary or unique key made of mapped columns, so sync cannot update its rows", e.name),
            )
            .table(&e.name)
            .hint("add a primary key to the green table and map its columns"));
        }
    }
    for e in &entries {
        exec(conn, &retry_function(m, e)).await?;
    }
    for (n, x) in m.blue_tables_read().iter().enumerate() {
        exec(conn, &catchup_function(m, &entries, x, n)).await?;
    }
    Ok(())
}

async fn backlog(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    sqlx::query_scalar(
        Sql(format!(
            "SELECT count(*) FROM {} WHERE migration = $1",
            QName::new(&m.control_schema, "changes")
        ))
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(conn)
    .await
    .map_err(db)
}

/// Replay the change log in batches until at most `leave` rows remain. Each batch is one
/// transaction that fixes its set of change-log ids first, replays exactly those (with the same
/// locks as the live triggers, so it may run beside them) and deletes exactly those; a writer
/// committing meanwhile is replayed by a later batch. Returns the rows replayed.
pub async fn catch_up(conn: &mut PgConnection, m: &Mapping, leave: i64) -> Result<i64, Diagnostic> {
    let changes = QName::new(&m.control_schema, "changes");
    let tables = m.blue_tables_read();
    let mut replayed = 0;
    loop {
        if backlog(conn, m).await? <= leave {
            return Ok(replayed);
        }
        exec(conn, &Sql("BEGIN".into())).await?;
        let result = async {
            let ids: Vec<i64> = sqlx::query_scalar(
                Sql(format!(
                    "SELECT id FROM {changes} WHERE migration = $1 ORDER BY id LIMIT {BATCH}"
                ))
                .assert_safe(),
            )
            .bind(&m.migration)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let list = format!(
                "ARRAY[{}]::bigint[]",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            );
            let present: Vec<String> = sqlx::query_scalar(
                Sql(format!(
                    "SELECT DISTINCT blue_table FROM {changes} WHERE id = ANY ({list})"
                ))
                .assert_safe(),
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
            for (n, x) in tables.iter().enumerate() {
                if present.contains(&x.display()) {
                    exec(
                        conn,
                        &Sql(format!(
                            "SELECT {}({list})",
                            names::catchup_function(&m.control_schema, &m.migration, n)
                        )),
                    )
                    .await?;
                }
            }
            exec(
                conn,
                &Sql(format!("DELETE FROM {changes} WHERE id = ANY ({list})")),
            )
            .await?;
            Ok::<i64, Diagnostic>(ids.len() as i64)
        }
        .await;
        match result {
            Ok(n) => {
                exec(conn, &Sql("COMMIT".into())).await?;
                replayed += n;
                if n == 0 {
                    return Ok(replayed);
                }
            }
            Err(d) => {
                let _ = exec(conn, &Sql("ROLLBACK".into())).await;
                return Err(d);
            }
        }
    }
}

/// Catch up, then switch the triggers to live re-derivation in one short transaction that fences
/// blue writes (SHARE ROW EXCLUSIVE, under lock_timeout with retry) while it drains the last of
/// the log: after it commits, every write re-derives green inside its own transaction.
pub async fn go_live(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    if state::phase(conn, m).await? == "live" {
        return Ok(());
    }
    install_functions(conn, m).await?;
    let n = catch_up(conn, m, SWITCH_BACKLOG).await?;
    eprintln!("bluegreen: caught up {n} change(s); switching to live sync");
    let cat = load_catalog(conn, m).await?;
    let entries = sync_entries(m, &cat);
    let blue = m.blue_tables_read();
    let mut stmts = vec![Sql(format!(
        "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
        crate::sql::join(blue.iter(), ", ")
    ))];
    for (n, x) in blue.iter().enumerate() {
        stmts.push(Sql(format!(
            "SELECT {}(ARRAY(SELECT id FROM {} WHERE migration = {} AND blue_table = {}))",
            names::catchup_function(&m.control_schema, &m.migration, n),
            QName::new(&m.control_schema, "changes"),
            Literal::new(&m.migration),
            Literal::new(x.display())
        )));
        stmts.push(live_trigger_function(m, &entries, x, n));
    }
    for (name, table, def) in crate::copy::pending_foreign_keys(conn, m).await? {
        stmts.push(crate::copy::add_foreign_key_not_valid(&name, &table, &def));
    }
    stmts.push(Sql(format!(
        "DELETE FROM {} WHERE migration = {}",
        QName::new(&m.control_schema, "changes"),
        Literal::new(&m.migration)
    )));
    stmts.push(Sql(format!(
        "UPDATE {} SET phase = 'live', updated_at = now() WHERE migration = {}",
        QName::new(&m.control_schema, "runs"),
        Literal::new(&m.migration)
    )));
    locking::run_locked(conn, lock_timeout_ms, &stmts, &blue).await?;
    state::event(conn, m, "copy", "live", serde_json::json!({"caught_up": n})).await?;
    eprintln!("bluegreen: live: every write to blue now re-derives green in its own transaction");
    Ok(())
}

/// `sync`: replay the change log (before live) and retry keys whose re-derivation failed.
pub async fn sync(conn: &mut PgConnection, m: &Mapping) -> Result<SyncReport, Diagnostic> {
    let phase = state::phase(conn, m).await?;
    if state::phase_rank(&phase) < state::phase_rank("copied") {
        return Err(Diagnostic::error(
            "not-copied",
            format!(
                "migration {} is in phase {phase}: copy has not finished",
                m.migration
            ),
        )
        .hint("run `bluegreen copy` first (it catches up and goes live by itself)"));
    }
    state::check_mapping(conn, m).await?;
    state::check_drift(conn, m).await?;
    install_functions(conn, m).await?;
    let replayed = catch_up(conn, m, 0).await?;
    let cat = load_catalog(conn, m).await?;
    let failures = QName::new(&m.control_schema, "sync_failures");
    let mut retried = 0;
    for e in sync_entries(m, &cat) {
        let n: i64 = sqlx::query_scalar(
            Sql(format!(
                "SELECT count(*) FROM {failures} WHERE migration = $1 AND green_table = $2"
            ))
            .assert_safe(),
        )
        .bind(&m.migration)
        .bind(&e.entry.name)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
        if n > 0 {
            exec(
                conn,
                &Sql(format!(
                    "SELECT {}()",
                    names::entry_function(
                        &m.control_schema,
                        &m.migration,
                        e.index,
                        "retry",
                        &e.entry.name
                    )
                )),
            )
            .await?;
            retried += n;
        }
    }
    let report = status(conn, m).await?;
    state::event(
        conn,
        m,
        "sync",
        "done",
        serde_json::json!({"replayed": replayed, "retried": retried}),
    )
    .await?;
    Ok(SyncReport {
        replayed,
        retried,
        failures_left: report.failures.len() as i64,
        status: report,
    })
}

#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub replayed: i64,
    pub retried: i64,
    pub failures_left: i64,
    pub status: Status,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub migration: String,
    pub phase: String,
    pub tables: Vec<TableStatus>,
    pub backlog: i64,
    pub failures: Vec<Failure>,
    pub events: Vec<Event>,
}

#[derive(Debug, Serialize)]
pub struct TableStatus {
    pub table: String,
    pub chunks_done: i64,
    pub chunks: i64,
    pub rows_copied: i64,
    pub green_rows_estimate: f64,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub table: String,
    pub sync_key: String,
    pub error: String,
    pub failed_at: String,
}

#[derive(Debug, Serialize)]
pub struct Event {
    pub at: String,
    pub who: String,
    pub command: String,
    pub outcome: String,
}

/// Phase, per-table progress, change-log backlog, sync failures, recent events.
pub async fn status(conn: &mut PgConnection, m: &Mapping) -> Result<Status, Diagnostic> {
    let phase = state::phase(conn, m).await?;
    let mut st = Status {
        migration: m.migration.clone(),
        phase: phase.clone(),
        tables: Vec::new(),
        backlog: 0,
        failures: Vec::new(),
        events: Vec::new(),
    };
    if phase == "new" {
        return Ok(st);
    }
    let c = |t: &str| QName::new(&m.control_schema, t);
    for r in sqlx::query(Sql(format!(
        "SELECT green_table, count(*) FILTER (WHERE state = 'done') AS done, count(*) AS total, coalesce(sum(rows_copied), 0)::int8 AS rows FROM {} WHERE migration = $1 GROUP BY 1",
        c("chunks")
    )).assert_safe())
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?
    {
        st.tables.push(TableStatus {
            table: r.get("green_table"),
            chunks_done: r.get("done"),
            chunks: r.get("total"),
            rows_copied: r.get("rows"),
            green_rows_estimate: 0.0,
        });
    }
    for e in &m.tables {
        if !st.tables.iter().any(|t| t.table == e.name) {
            st.tables.push(TableStatus {
                table: e.name.clone(),
                chunks_done: 0,
                chunks: 0,
                rows_copied: 0,
                green_rows_estimate: 0.0,
            });
        }
    }
    for t in &mut st.tables {
        t.green_rows_estimate = sqlx::query_scalar::<_, f64>("SELECT coalesce((SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = to_regclass($1)), 0)")
            .bind(QName::new(&m.green, &t.table).to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
    }
    st.tables
        .sort_by_key(|t| m.tables.iter().position(|e| e.name == t.table));
    st.backlog = backlog(conn, m).await?;
    for r in sqlx::query(Sql(format!(
        "SELECT green_table, sync_key::text AS k, error, failed_at::text AS at FROM {} WHERE migration = $1 ORDER BY failed_at DESC LIMIT 100",
        c("sync_failures")
    )).assert_safe())
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?
    {
        st.failures.push(Failure { table: r.get("green_table"), sync_key: r.get("k"), error: r.get("error"), failed_at: r.get("at") });
    }
    for r in sqlx::query(Sql(format!(
        "SELECT at::text AS at, who, command, outcome FROM {} WHERE migration = $1 ORDER BY id DESC LIMIT 10",
        c("events")
    )).assert_safe())
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?
    {
        st.events.push(Event { at: r.get("at"), who: r.get("who"), command: r.get("command"), outcome: r.get("outcome") });
    }
    Ok(st)
}

pub fn render_status(st: &Status) -> String {
    let mut o = format!("migration {}: phase {}\n", st.migration, st.phase);
    for t in &st.tables {
        o.push_str(&format!(
            "  {:<20} chunks {}/{}  rows copied {}  green rows ~{:.0}\n",
            t.table, t.chunks_done, t.chunks, t.rows_copied, t.green_rows_estimate
        ));
    }
    o.push_str(&format!("change-log backlog: {}\n", st.backlog));
    if st.failures.is_empty() {
        o.push_str("sync failures: none\n");
    } else {
        o.push_str(&format!(
            "sync failures: {} (retry with `bluegreen sync`)\n",
            st.failures.len()
        ));
        for f in st.failures.iter().take(10) {
            o.push_str(&format!(
                "  {} key {}: {} (at {})\n",
                f.table, f.sync_key, f.error, f.failed_at
            ));
        }
    }
    if !st.events.is_empty() {
        o.push_str("recent events:\n");
        for e in &st.events {
            o.push_str(&format!(
                "  {} {} {} {}\n",
                e.at, e.who, e.command, e.outcome
            ));
        }
    }
    o
}
