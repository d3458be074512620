//! The follower (`bluegreen sync --follow`, `copy --follow`): applies the change log continuously,
//! in batches, until stopped. Several may run at once, on several machines: they claim different
//! change rows and serialise per key (`apply.rs`). Each keeps a heartbeat row in the control
//! schema (`followers`), which `status` reads. Ctrl-C or SIGTERM set `stop`; the batch in flight
//! finishes and the follower leaves. A lost connection is reconnected with backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use super::apply::{self, Applied, Plan};
use super::{BATCH, RETRY_BATCH};
use crate::control::{changes, table};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::sql;

/// Polling interval while the log is empty.
const IDLE: Duration = Duration::from_millis(100);
/// Heartbeat interval; `status` counts a follower alive for three of them.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often a follower records the backlog and lag it sees (`samples`, the run report's
/// timeline).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Failed keys are retried this often (a parent written meanwhile fixes a 23503).
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// What a follower did before it stopped.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Followed {
    pub changes: u64,
    pub keys: u64,
    pub failed: u64,
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

async fn register(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    sqlx::query(sql!(
        "INSERT INTO {} (migration, host, pid, backend_pid) VALUES ($1, $2, $3, pg_catalog.pg_backend_pid()) ON CONFLICT (migration, host, pid) DO UPDATE SET backend_pid = EXCLUDED.backend_pid, started_at = pg_catalog.now(), heartbeat_at = pg_catalog.now(), applied = 0",
        table(m, "followers")
    ).assert_safe())
    .bind(&m.migration)
    .bind(host())
    .bind(std::process::id() as i32)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn sample(conn: &mut PgConnection, m: &Mapping, applied: u64) -> Result<(), Diagnostic> {
    let backlog = changes::backlog(conn, m).await?;
    let lag = changes::lag_seconds(conn, m).await?;
    sqlx::query(
        crate::control::statement(
            m,
            "INSERT INTO {samples} (migration, backlog, lag_seconds, applied) VALUES ($1, $2, $3, $4)",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(backlog)
    .bind(lag)
    .bind(applied as i64)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn heartbeat(conn: &mut PgConnection, m: &Mapping, applied: u64) -> Result<(), Diagnostic> {
    sqlx::query(sql!(
        "UPDATE {} SET heartbeat_at = pg_catalog.now(), applied = $4 WHERE migration = $1 AND host = $2 AND pid = $3",
        table(m, "followers")
    ).assert_safe())
    .bind(&m.migration)
    .bind(host())
    .bind(std::process::id() as i32)
    .bind(applied as i64)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn leave(conn: &mut PgConnection, m: &Mapping) {
    let _ = sqlx::query(
        sql!(
            "DELETE FROM {} WHERE migration = $1 AND host = $2 AND pid = $3",
            table(m, "followers")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(host())
    .bind(std::process::id() as i32)
    .execute(conn)
    .await;
}

/// One connected stretch of following; returns when stopped, or with the error that broke the
/// connection.
async fn run(
    url: &str,
    m: &Mapping,
    stop: &AtomicBool,
    done: &mut Followed,
) -> Result<(), Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    if crate::control::runs::phase(&mut conn, m).await? == crate::control::Phase::Finalized {
        eprintln!(
            "bluegreen: follower: migration {} is finalized: nothing to follow",
            m.migration
        );
        return Ok(());
    }
    crate::control::runs::check_mapping(&mut conn, m).await?;
    crate::control::runs::check_drift(&mut conn, m).await?;
    let m = &crate::control::runs::resolved_mapping(&mut conn, m).await?;
    let mut plan: Plan = super::plan(&mut conn, m).await?;
    register(&mut conn, m).await?;
    let mut last_beat = Instant::now();
    let mut last_sample = Instant::now()
        .checked_sub(SAMPLE_EVERY)
        .unwrap_or_else(Instant::now);
    let mut last_retry = Instant::now();
    let mut last_report = Instant::now();
    let mut since_report = Applied::default();
    while !stop.load(Ordering::Relaxed) {
        let a = match apply::apply_batch(&mut conn, m, &plan, BATCH, i64::MAX).await {
            Err(d) if d.code == "finalized" => {
                eprintln!("bluegreen: follower: {}; stopping", d.message);
                return Ok(());
            }
            Err(d) if d.code == "phase-changed" => {
                // A cutover or rollback committed: apply as the new phase says.
                plan = super::plan(&mut conn, m).await?;
                eprintln!("bluegreen: follower: {}; re-planned", d.message);
                continue;
            }
            r => r?,
        };
        done.changes += a.changes as u64;
        done.keys += a.keys as u64;
        done.failed += a.failed as u64;
        since_report.changes += a.changes;
        since_report.keys += a.keys;
        let r = apply::rederive_marked(&mut conn, m, &plan).await?;
        done.keys += r.keys as u64;
        // Failed keys are retried now and then, and as soon as the log is drained (a 23503 met
        // across batches is "not yet", and the log being drained is when it should be gone).
        let idle = a.changes == 0 && last_retry.elapsed() >= Duration::from_secs(1);
        if last_retry.elapsed() >= RETRY_EVERY || idle {
            let f = apply::retry_failures(&mut conn, m, &plan, RETRY_BATCH).await?;
            done.keys += f.keys as u64;
            last_retry = Instant::now();
            // A trigger disabled or blue altered meanwhile: writes may be going uncaptured.
            if let Err(d) = crate::control::runs::check_drift(&mut conn, m).await {
                eprintln!("bluegreen: follower: {}", d.message);
            }
        }
        if last_beat.elapsed() >= HEARTBEAT {
            heartbeat(&mut conn, m, done.changes).await?;
            last_beat = Instant::now();
        }
        if last_sample.elapsed() >= SAMPLE_EVERY {
            sample(&mut conn, m, done.changes).await?;
            last_sample = Instant::now();
        }
        if last_report.elapsed() >= Duration::from_secs(5) && since_report.changes > 0 {
            let backlog = changes::backlog(&mut conn, m).await?;
            let lag = changes::lag_seconds(&mut conn, m).await?;
            eprintln!(
                "bluegreen: follower: {} change(s), {} key(s) in {:.0} s; backlog {backlog}, lag {}",
                since_report.changes,
                since_report.keys,
                last_report.elapsed().as_secs_f64(),
                lag.map_or("0 s".to_string(), |l| format!("{l:.1} s"))
            );
            last_report = Instant::now();
            since_report = Applied::default();
        }
        if a.changes == 0 {
            tokio::time::sleep(IDLE).await;
        }
    }
    leave(&mut conn, m).await;
    Ok(())
}

/// Follow until `stop` is set. Connection failures are retried with backoff (up to 30 s apart);
/// an error in the mapping or the catalog (which no retry fixes) ends it.
pub async fn follow(url: &str, m: &Mapping, stop: Arc<AtomicBool>) -> Result<Followed, Diagnostic> {
    let mut done = Followed::default();
    let mut delay = Duration::from_millis(500);
    eprintln!(
        "bluegreen: following the change log of {} (Ctrl-C or SIGTERM stops after the batch in flight)",
        m.migration
    );
    loop {
        match run(url, m, &stop, &mut done).await {
            Ok(()) => return Ok(done),
            Err(d)
                if [
                    "no-upsert-key",
                    "not-copied",
                    "mapping-changed",
                    "unknown-phase",
                    "ddl-drift",
                ]
                .contains(&d.code) =>
            {
                return Err(d);
            }
            Err(d) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(done);
                }
                eprintln!(
                    "bluegreen: follower: {} (retrying in {} ms)",
                    d.message.lines().next().unwrap_or(""),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}
