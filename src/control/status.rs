//! `bluegreen status`: phase, per-table progress, change-log backlog and lag, followers alive,
//! sync failures, drift, recent events, read from the control schema (and green's row estimates).
//! Warnings say what needs doing (changes waiting and no follower running; blue changed).

use serde::Serialize;
use sqlx::{PgConnection, Row};

use super::{Phase, changes, chunks, query, runs, scalar};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::QName;

/// Failures listed at most (the total is always given).
const FAILURES_SHOWN: i64 = 100;

/// A follower counts as alive while its session is connected and its heartbeat this recent.
pub const ALIVE_SECONDS: f64 = 5.0;

#[derive(Debug, Serialize)]
pub struct Status {
    pub migration: String,
    pub phase: Phase,
    pub tables: Vec<TableStatus>,
    /// Change-log rows waiting for an applier.
    pub backlog: i64,
    /// Seconds since the oldest of them was logged.
    pub lag_seconds: Option<f64>,
    /// Entries waiting for a full re-derive (after a TRUNCATE).
    pub rederive: Vec<String>,
    pub followers: Vec<Follower>,
    pub failures_total: i64,
    pub failures: Vec<changes::Failure>,
    /// Change-log rows set aside because their keys could not be found.
    pub failed_changes: i64,
    /// After cutover: green writes whose reverse into blue failed, and the newest of them
    /// (table, green key, error).
    pub reverse_failures: i64,
    pub reverse_failure_list: Vec<(String, String, String)>,
    pub warnings: Vec<String>,
    pub events: Vec<Event>,
    /// Sessions that wrote blue after the cutover, in the last [`BLUE_WRITERS_WINDOW`].
    pub blue_writers: Vec<super::writers::BlueWriter>,
}

/// How far back `status` looks for blue writers.
pub const BLUE_WRITERS_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Serialize)]
pub struct Follower {
    pub host: String,
    pub pid: i32,
    pub started_at: String,
    pub heartbeat_at: String,
    pub heartbeat_age_seconds: f64,
    pub alive: bool,
    pub applied: i64,
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
    /// The database role.
    pub who: String,
    pub command: String,
    pub outcome: String,
    pub os_user: String,
    pub host: String,
    /// From the command's start to this event.
    pub seconds: f64,
    /// For cutover and rollback: how long application writes were blocked.
    pub writes_blocked_ms: Option<i64>,
}

pub async fn status(conn: &mut PgConnection, m: &Mapping) -> Result<Status, Diagnostic> {
    let phase = runs::phase(conn, m).await?;
    let mut st = Status {
        migration: m.migration.clone(),
        phase,
        tables: Vec::new(),
        backlog: 0,
        lag_seconds: None,
        rederive: Vec::new(),
        followers: Vec::new(),
        failures_total: 0,
        failures: Vec::new(),
        failed_changes: 0,
        reverse_failures: 0,
        reverse_failure_list: Vec::new(),
        warnings: Vec::new(),
        events: Vec::new(),
        blue_writers: Vec::new(),
    };
    if phase == Phase::New {
        return Ok(st);
    }
    if phase == Phase::Finalized {
        // Only the archive is left: the run, its validations and its events.
        st.events = recent_events(conn, m).await?;
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
    st.lag_seconds = changes::lag_seconds(conn, m).await?;
    (st.failures_total, st.failures) = changes::failures(conn, m, FAILURES_SHOWN).await?;
    st.failed_changes = changes::set_aside(conn, m).await?;
    st.rederive = scalar(
        m,
        "SELECT green_table FROM {rederive} WHERE migration = $1 ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    for r in query(m, "SELECT host, pid, started_at::text AS s, heartbeat_at::text AS h, extract(epoch FROM pg_catalog.now() - heartbeat_at)::float8 AS age, applied, EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid = f.backend_pid AND a.backend_start <= f.started_at) AS connected FROM {followers} f WHERE migration = $1 ORDER BY host, pid")
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?
    {
        let age: f64 = r.get("age");
        st.followers.push(Follower {
            host: r.get("host"),
            pid: r.get("pid"),
            started_at: r.get("s"),
            heartbeat_at: r.get("h"),
            heartbeat_age_seconds: age,
            // A killed follower's session is gone at once; a hung one stops beating.
            alive: age <= ALIVE_SECONDS && r.get::<bool, _>("connected"),
            applied: r.get("applied"),
        });
    }
    let alive = st.followers.iter().any(|f| f.alive);
    if (st.backlog > 0 || !st.rederive.is_empty()) && !alive && phase >= Phase::Live {
        st.warnings.push(format!(
            "{} change(s) wait in the change log and no follower runs: start `bluegreen sync --follow -m {}` (or run `bluegreen sync`)",
            st.backlog,
            m.path.display()
        ));
    }
    if st.failed_changes > 0 {
        st.warnings.push(format!(
            "{} change(s) could not be followed (their keys do not fit green): fix the cause, then `bluegreen sync` retries them",
            st.failed_changes
        ));
    }
    if let Err(d) = runs::check_drift(conn, m).await {
        st.warnings.push(d.message);
    }
    if matches!(st.phase, Phase::CutOver | Phase::RolledBack) {
        st.blue_writers = super::writers::blue_writers(conn, m, BLUE_WRITERS_WINDOW).await?;
        for r in query(m, "SELECT green_table, green_key::text AS k, error, count(*) OVER () AS n FROM {reverse_failures} WHERE migration = $1 ORDER BY failed_at DESC LIMIT 10")
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?
        {
            st.reverse_failures = r.get("n");
            st.reverse_failure_list.push((r.get("green_table"), r.get("k"), r.get("error")));
        }
    }
    st.events = recent_events(conn, m).await?;
    Ok(st)
}

/// The last audit events, newest first.
async fn recent_events(conn: &mut PgConnection, m: &Mapping) -> Result<Vec<Event>, Diagnostic> {
    let mut out = Vec::new();
    for r in query(m, "SELECT at::text AS at, who, command, outcome, coalesce(os_user, '') AS os_user, coalesce(host, '') AS host, coalesce(extract(epoch FROM at - started_at)::float8, 0) AS seconds, coalesce((detail->>'writes_blocked_ms')::int8, -1) AS blocked FROM {events} WHERE migration = $1 ORDER BY id DESC LIMIT 10")
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?
    {
        let blocked: i64 = r.get("blocked");
        out.push(Event {
            at: r.get("at"),
            who: r.get("who"),
            command: r.get("command"),
            outcome: r.get("outcome"),
            os_user: r.get("os_user"),
            host: r.get("host"),
            seconds: r.get("seconds"),
            writes_blocked_ms: (blocked >= 0).then_some(blocked),
        });
    }
    Ok(out)
}

pub fn render(st: &Status) -> String {
    let mut o = format!("migration {}: phase {}\n", st.migration, st.phase);
    for t in &st.tables {
        o.push_str(&format!(
            "  {:<20} chunks {}/{}  rows copied {}  green rows ~{:.0}\n",
            t.table, t.chunks_done, t.chunks, t.rows_copied, t.green_rows_estimate
        ));
    }
    o.push_str(&format!(
        "change-log backlog: {}{}\n",
        st.backlog,
        st.lag_seconds
            .map(|l| format!(" (oldest logged {l:.1} s ago)"))
            .unwrap_or_default()
    ));
    if !st.rederive.is_empty() {
        o.push_str(&format!(
            "waiting for a full re-derive (TRUNCATE): {}\n",
            st.rederive.join(", ")
        ));
    }
    if st.followers.is_empty() {
        o.push_str("followers: none\n");
    }
    for f in &st.followers {
        o.push_str(&format!(
            "follower {}:{} {} (heartbeat {:.1} s ago, {} change(s) applied, since {})\n",
            f.host,
            f.pid,
            if f.alive { "alive" } else { "gone" },
            f.heartbeat_age_seconds,
            f.applied,
            f.started_at
        ));
    }
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
    if st.reverse_failures > 0 {
        o.push_str(&format!(
            "reverse failures: {} green write(s) did not reach blue (retry with `bluegreen sync`; rollback refuses meanwhile)\n",
            st.reverse_failures
        ));
        for (t, k, e) in &st.reverse_failure_list {
            o.push_str(&format!("  {t} key {k}: {e}\n"));
        }
    }
    if !st.blue_writers.is_empty() {
        o.push_str(&format!(
            "sessions that wrote blue after the cutover (last {} s):\n",
            BLUE_WRITERS_WINDOW.as_secs()
        ));
        for w in &st.blue_writers {
            o.push_str(&format!("  {}\n", w.describe()));
        }
    }
    for w in &st.warnings {
        o.push_str(&format!("warning: {w}\n"));
    }
    if !st.events.is_empty() {
        o.push_str("recent events:\n");
        for e in &st.events {
            let by = if e.os_user.is_empty() {
                e.who.clone()
            } else {
                format!("{} ({}@{})", e.who, e.os_user, e.host)
            };
            let blocked = e
                .writes_blocked_ms
                .map(|b| format!(", writes blocked {b} ms"))
                .unwrap_or_default();
            o.push_str(&format!(
                "  {} {by} {} {} ({:.1} s{blocked})\n",
                e.at, e.command, e.outcome, e.seconds
            ));
        }
    }
    o
}
