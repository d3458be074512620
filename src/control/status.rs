//! `bluegreen status`: phase, per-table progress, change-log backlog, sync failures, recent
//! events, read from the control schema (and green's row estimates).

use serde::Serialize;
use sqlx::{PgConnection, Row};

use super::{Phase, changes, chunks, query, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::QName;

/// Failures listed at most (the total is always given).
const FAILURES_SHOWN: i64 = 100;

#[derive(Debug, Serialize)]
pub struct Status {
    pub migration: String,
    pub phase: Phase,
    pub tables: Vec<TableStatus>,
    pub backlog: i64,
    pub failures_total: i64,
    pub failures: Vec<changes::Failure>,
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
pub struct Event {
    pub at: String,
    pub who: String,
    pub command: String,
    pub outcome: String,
}

pub async fn status(conn: &mut PgConnection, m: &Mapping) -> Result<Status, Diagnostic> {
    let phase = runs::phase(conn, m).await?;
    let mut st = Status {
        migration: m.migration.clone(),
        phase,
        tables: Vec::new(),
        backlog: 0,
        failures_total: 0,
        failures: Vec::new(),
        events: Vec::new(),
    };
    if phase == Phase::New {
        return Ok(st);
    }
    let progress = chunks::progress(conn, m).await?;
    for e in &m.tables {
        let p = progress.iter().find(|p| p.green_table == e.name);
        let green_rows_estimate = sqlx::query_scalar::<_, f64>("SELECT coalesce((SELECT greatest(reltuples, 0)::float8 FROM pg_class WHERE oid = to_regclass($1)), 0)")
            .bind(QName::new(&m.green, &e.name).to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?;
        st.tables.push(TableStatus {
            table: e.name.clone(),
            chunks_done: p.map_or(0, |p| p.done),
            chunks: p.map_or(0, |p| p.total),
            rows_copied: p.map_or(0, |p| p.rows),
            green_rows_estimate,
        });
    }
    st.backlog = changes::backlog(conn, m).await?;
    (st.failures_total, st.failures) = changes::failures(conn, m, FAILURES_SHOWN).await?;
    for r in query(m, "SELECT at::text AS at, who, command, outcome FROM {events} WHERE migration = $1 ORDER BY id DESC LIMIT 10")
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?
    {
        st.events.push(Event { at: r.get("at"), who: r.get("who"), command: r.get("command"), outcome: r.get("outcome") });
    }
    Ok(st)
}

pub fn render(st: &Status) -> String {
    let mut o = format!("migration {}: phase {}\n", st.migration, st.phase);
    for t in &st.tables {
        o.push_str(&format!(
            "  {:<20} chunks {}/{}  rows copied {}  green rows ~{:.0}\n",
            t.table, t.chunks_done, t.chunks, t.rows_copied, t.green_rows_estimate
        ));
    }
    o.push_str(&format!("change-log backlog: {}\n", st.backlog));
    if st.failures_total == 0 {
        o.push_str("sync failures: none\n");
    } else {
        o.push_str(&format!(
            "sync failures: {} (retry with `bluegreen sync`)\n",
            st.failures_total
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
