//! The migration's timeline for the run report: the audit events (phases, flips with their
//! write-block time), the chunk ledger (copy throughput), the follower's samples (backlog, lag)
//! and the validations, each at its time in seconds since the migration's first event.

use sqlx::{PgConnection, Row};

use crate::control;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::{Sql, sql};

#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// When the first event happened (UTC, as text); every `t` below counts from it.
    pub origin: String,
    pub events: Vec<Event>,
    /// (t, rows copied by then).
    pub copied: Vec<(f64, f64)>,
    /// (t, backlog, lag in seconds).
    pub samples: Vec<(f64, f64, f64)>,
    /// (t, passed).
    pub validations: Vec<(f64, bool)>,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub t: f64,
    pub command: String,
    pub outcome: String,
    /// How long application writes were blocked (cutover, rollback).
    pub writes_blocked_ms: Option<f64>,
}

impl Timeline {
    /// The last time anything happened, in seconds since the origin.
    pub fn end(&self) -> f64 {
        let last = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0, f64::max);
        last(&mut self.events.iter().map(|e| e.t))
            .max(last(&mut self.copied.iter().map(|c| c.0)))
            .max(last(&mut self.samples.iter().map(|s| s.0)))
            .max(last(&mut self.validations.iter().map(|v| v.0)))
    }
}

/// Everything the control schema recorded about `m`, in time order.
pub async fn load(conn: &mut PgConnection, m: &Mapping) -> Result<Timeline, Diagnostic> {
    let events_t = control::table(m, "events");
    let origin: Option<String> = sqlx::query_scalar(
        sql!("SELECT pg_catalog.to_char(min(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM {events_t} WHERE migration = $1").assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let Some(origin) = origin else {
        return Ok(Timeline::default());
    };
    let since = format!(
        "extract(epoch FROM x.at - (SELECT min(at) FROM {events_t} WHERE migration = $1))::pg_catalog.float8"
    );
    let rows = async |conn: &mut PgConnection, q: Sql| {
        sqlx::query(q.assert_safe())
            .bind(&m.migration)
            .fetch_all(conn)
            .await
            .map_err(db_error)
    };
    let events = rows(
        conn,
        sql!("SELECT {since} AS t, x.command, x.outcome, (x.detail ->> 'writes_blocked_ms')::pg_catalog.float8 AS blocked FROM {events_t} AS x WHERE x.migration = $1 ORDER BY x.at, x.id"),
    )
    .await?
    .iter()
    .map(|r| Event {
        t: r.get("t"),
        command: r.get("command"),
        outcome: r.get("outcome"),
        writes_blocked_ms: r.get("blocked"),
    })
    .collect();
    let copied = rows(
        conn,
        sql!(
            "SELECT {since} AS t, (sum(x.rows_copied) OVER (ORDER BY x.at))::pg_catalog.float8 AS rows FROM (SELECT done_at AS at, coalesce(rows_copied, 0) AS rows_copied FROM {} WHERE migration = $1 AND done_at IS NOT NULL) AS x ORDER BY x.at",
            control::table(m, "chunks")
        ),
    )
    .await?
    .iter()
    .map(|r| (r.get("t"), r.get("rows")))
    .collect();
    let samples = rows(
        conn,
        sql!(
            "SELECT {since} AS t, x.backlog::pg_catalog.float8 AS backlog, coalesce(x.lag_seconds, 0)::pg_catalog.float8 AS lag FROM {} AS x WHERE x.migration = $1 ORDER BY x.at",
            control::table(m, "samples")
        ),
    )
    .await?
    .iter()
    .map(|r| (r.get("t"), r.get("backlog"), r.get("lag")))
    .collect();
    let validations = rows(
        conn,
        sql!(
            "SELECT {since} AS t, x.passed FROM {} AS x WHERE x.migration = $1 ORDER BY x.at",
            control::table(m, "validations")
        ),
    )
    .await?
    .iter()
    .map(|r| (r.get("t"), r.get("passed")))
    .collect();
    Ok(Timeline {
        origin,
        events,
        copied,
        samples,
        validations,
    })
}
