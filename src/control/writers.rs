//! Sessions that wrote blue after the cutover (`blue_writers`: one row per session, refreshed by
//! the forward triggers on every statement of a session that is not applying sync), and the
//! sessions opened before the flip: what `status`, `cutover --drain-timeout` and `finalize` read.

use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, Row};

use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;

/// Sessions that wrote blue after the flip, seen within the last `within` (pid, user,
/// application, client, last write).
#[derive(Clone, Debug, Serialize)]
pub struct BlueWriter {
    pub pid: i32,
    pub usename: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub blue_table: Option<String>,
    pub writes: i64,
    pub seconds_ago: f64,
    pub alive: bool,
}

impl BlueWriter {
    /// "pid 7 user app application web from 10.0.0.5: 3 statement(s), last 1.2 s ago on public.t".
    pub fn describe(&self) -> String {
        format!(
            "pid {} user {} application {} from {}: {} statement(s), last {:.1} s ago on {}{}",
            self.pid,
            self.usename.as_deref().unwrap_or("?"),
            self.application_name.as_deref().unwrap_or(""),
            self.client_addr.as_deref().unwrap_or("local"),
            self.writes,
            self.seconds_ago,
            self.blue_table.as_deref().unwrap_or("?"),
            if self.alive { "" } else { " (disconnected)" }
        )
    }
}

pub async fn blue_writers(
    conn: &mut PgConnection,
    m: &Mapping,
    within: Duration,
) -> Result<Vec<BlueWriter>, Diagnostic> {
    let rows = sqlx::query(
        super::statement(
            m,
            "SELECT w.pid, w.usename, w.application_name, w.client_addr, w.blue_table, w.writes, extract(epoch FROM pg_catalog.clock_timestamp() - w.last_write)::float8 AS ago,
                    EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = w.pid AND a.backend_start = w.backend_start) AS alive
             FROM {blue_writers} w WHERE w.migration = $1 AND w.last_write > pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $2)
             ORDER BY w.last_write DESC",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(within.as_secs_f64())
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|r| BlueWriter {
            pid: r.get("pid"),
            usename: r.get("usename"),
            application_name: r.get("application_name"),
            client_addr: r.get("client_addr"),
            blue_table: r.get("blue_table"),
            writes: r.get("writes"),
            seconds_ago: r.get("ago"),
            alive: r.get("alive"),
        })
        .collect())
}

/// Sessions of this database opened before the flip, still connected (they keep the old
/// `search_path`).
pub async fn sessions_before_flip(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    sqlx::query_scalar(
        super::statement(
            m,
            "SELECT count(*) FROM pg_catalog.pg_stat_activity a, {runs} r WHERE r.migration = $1 AND a.datname = pg_catalog.current_database() AND a.backend_type = 'client backend' AND a.pid <> pg_catalog.pg_backend_pid() AND a.application_name IS DISTINCT FROM 'bluegreen' AND a.backend_start < r.cutover_at",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// End the sessions that wrote blue within `within` and are still connected; how many.
pub async fn terminate_blue_writers(
    conn: &mut PgConnection,
    m: &Mapping,
    within: Duration,
) -> Result<i64, Diagnostic> {
    sqlx::query_scalar(
        super::statement(
            m,
            "SELECT count(*) FILTER (WHERE pg_catalog.pg_terminate_backend(a.pid)) FROM {blue_writers} w JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid AND a.backend_start = w.backend_start WHERE w.migration = $1 AND w.last_write > pg_catalog.clock_timestamp() - pg_catalog.make_interval(secs => $2) AND a.pid <> pg_catalog.pg_backend_pid()",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(within.as_secs_f64())
    .fetch_one(conn)
    .await
    .map_err(db_error)
}
