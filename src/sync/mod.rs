//! Keeping green = M(blue) after the copy (DESIGN.md steps 3 and 7): the live switch (`go_live`),
//! `sync` (drain the change log once, retry failed keys) and the follower (`follow.rs`, which does
//! that continuously). The re-derivation itself is the applier (`apply.rs`); the SQL is
//! `plan::sync`.

pub mod apply;
pub mod cutover;
pub mod fence;
pub mod finalize;
pub mod follow;

use serde::Serialize;
use sqlx::PgConnection;

use crate::control::{self, Phase, changes, deferred, events, runs, status};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{db_error, exec, locking};
use crate::plan::steps::add_foreign_key_not_valid;
use crate::plan::sync::{live_trigger_function, sync_entries};

pub use apply::{Applied, Plan};

/// Change-log rows one applier transaction claims at most. Each batch costs a dozen statements
/// whatever its size (finders, deletes, upserts per entry), so larger batches drain faster: on the
/// Chinook writer mix, 4,000 drained the log 1.8x faster than 1,000 (11.5 s against 21 s for
/// 230,000 rows); the keys they touch are still applied in transactions of at most
/// [`apply::KEYS_PER_TRANSACTION`].
pub const BATCH: i64 = 4_000;
/// Failed keys retried per transaction.
pub const RETRY_BATCH: i64 = 500;

/// Apply batches until no row with an id up to the highest at the start is left to claim (rows
/// another applier holds are its own; rows logged meanwhile are the follower's). Returns what was
/// applied.
pub async fn drain(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
) -> Result<Applied, Diagnostic> {
    let upto = changes::last_id(conn, m).await?;
    let mut total = Applied::default();
    loop {
        let a = apply::apply_batch(conn, m, plan, BATCH, upto).await?;
        total.changes += a.changes;
        total.keys += a.keys;
        total.failed += a.failed;
        if a.changes == 0 {
            return Ok(total);
        }
    }
}

fn not_copied(m: &Mapping, phase: Phase) -> Diagnostic {
    Diagnostic::error(
        "not-copied",
        format!(
            "migration {} is in phase {phase}: copy has not finished",
            m.migration
        ),
    )
    .hint("run `bluegreen copy` first (it catches up and goes live by itself)")
}

/// The applier's plan for the migration as it stands (deferred foreign keys counted).
pub async fn plan(conn: &mut PgConnection, m: &Mapping) -> Result<Plan, Diagnostic> {
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let mut plan = Plan::new(m, &cat)?;
    let deadlock = crate::pg::locking::deadlock_timeout_ms(conn).await?;
    plan.lock_timeout_ms = plan.lock_timeout_ms.min(deadlock / 2).max(1);
    if runs::phase(conn, m).await? == Phase::CutOver {
        let entries = sync_entries(m, &cat);
        plan.cut_over = Some(
            crate::plan::sync::reversals(m, &entries, &cat)
                .into_iter()
                .map(|r| r.entry)
                .collect(),
        );
    }
    Ok(plan)
}

/// The live switch, once the copy is done (phase `copied`), as the migration's one runner; a
/// no-op when live. It takes no lock on blue: replacing a trigger function is atomic, and every
/// row a statement logged under the capture body is applied afterwards like any other.
///
/// 1. drain the change log the copy left;
/// 2. put green's foreign keys back NOT VALID (green only; a child applied before its parent
///    meanwhile is a 23503 failure, retried below);
/// 3. replace each blue table's capture body with the live body: row-local entries re-derive in
///    the writer's statement from now on, the others keep being logged for the follower;
/// 4. drain again, retry failed keys, phase `live`.
pub async fn go_live(url: &str, m: &Mapping, lock_timeout_ms: u64) -> Result<(), Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    locking::runner_lock_wait(&mut conn, &m.migration)
        .await
        .map_err(db_error)?;
    let r = switch(&mut conn, m, lock_timeout_ms).await;
    let _ = locking::runner_unlock(&mut conn, &m.migration, true).await;
    r
}

async fn switch(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    let phase = runs::phase(conn, m).await?;
    if phase >= Phase::Live {
        return Ok(());
    }
    let m = &runs::resolved_mapping(conn, m).await?;
    if phase < Phase::Copied {
        return Err(not_copied(m, phase));
    }
    let plan = plan(conn, m).await?;
    let first = drain(conn, m, &plan).await?;
    eprintln!(
        "bluegreen: caught up {} change(s) ({} key(s)); switching to live sync",
        first.changes, first.keys
    );
    let fks = deferred::pending_foreign_keys(conn, m).await?;
    let green: Vec<_> = m
        .tables
        .iter()
        .map(|e| crate::sql::QName::new(&m.green, &e.name))
        .collect();
    locking::run_locked(conn, lock_timeout_ms, &green, async |tx| {
        for fk in &fks {
            exec(
                tx,
                &add_foreign_key_not_valid(&fk.name, &fk.table, &fk.definition),
            )
            .await?;
        }
        Ok(())
    })
    .await?;
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let entries = sync_entries(m, &cat);
    for (n, x) in m.blue_tables_read().iter().enumerate() {
        exec(
            conn,
            &live_trigger_function(m, &entries, x, cat.table(x), n),
        )
        .await?;
    }
    let second = drain(conn, m, &plan).await?;
    let retried = retry_all(conn, m, &plan).await?;
    runs::set_phase(conn, m, Phase::Live).await?;
    events::record(
        conn,
        m,
        "copy",
        "live",
        serde_json::json!({"caught_up": first.changes + second.changes, "failed": retried.failed}),
    )
    .await?;
    let local: Vec<&str> = entries
        .iter()
        .filter(|e| e.row_local())
        .map(|e| e.entry.name.as_str())
        .collect();
    eprintln!(
        "bluegreen: live: {} re-derived in the writer's statement; the rest by the follower (run `bluegreen sync --follow`)",
        if local.is_empty() {
            "no entry".to_string()
        } else {
            local.join(", ")
        }
    );
    Ok(())
}

/// Retry every failed key, in small batches, until a round fixes none.
pub async fn retry_all(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
) -> Result<Applied, Diagnostic> {
    let mut last = i64::MAX;
    let mut total = Applied::default();
    loop {
        let (left, _) = changes::failures(conn, m, 0).await?;
        if left == 0 || left >= last {
            return Ok(total);
        }
        last = left;
        let mut done = 0;
        while done < left {
            let a = apply::retry_failures(conn, m, plan, RETRY_BATCH).await?;
            total.keys += a.keys;
            total.failed = a.failed;
            done += RETRY_BATCH;
            if a.keys == 0 {
                break;
            }
        }
    }
}

/// `sync`: drain the change log once, re-derive what a TRUNCATE marked, retry failed keys and
/// changes set aside.
pub async fn sync(conn: &mut PgConnection, m: &Mapping) -> Result<SyncReport, Diagnostic> {
    let phase = runs::phase(conn, m).await?;
    if phase < Phase::Copied {
        return Err(not_copied(m, phase));
    }
    if phase == Phase::Finalized {
        return Err(Diagnostic::error(
            "finalized",
            format!("migration {} is finalized: sync is over", m.migration),
        ));
    }
    runs::check_mapping(conn, m).await?;
    runs::check_drift(conn, m).await?;
    let m = &runs::resolved_mapping(conn, m).await?;
    let plan = plan(conn, m).await?;
    let requeued = apply::requeue_failed_changes(conn, m, &plan).await?;
    let started: String = sqlx::query_scalar("SELECT pg_catalog.clock_timestamp()::text")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    let drained = drain(conn, m, &plan).await?;
    let rederived = apply::rederive_marked(conn, m, &plan).await?;
    // Green writes back to blue first: a forward retry of a key whose reverse failed waits
    // for it (the applier does not rebuild such a key from the stale blue row).
    let (_, reverse_left) = cutover::retry_reverse(conn, m).await?;
    let retried = retry_all(conn, m, &plan).await?;
    let report = status::status(conn, m).await?;
    // Rows logged before this sync started that are still there were held by another applier
    // (or a writer): pending, not done.
    let older: i64 = sqlx::query_scalar(
        crate::sql::sql!(
            "SELECT count(*) FROM {} WHERE migration = $1 AND logged_at < $2::timestamptz",
            control::table(m, "changes")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(&started)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    events::record(
        conn,
        m,
        "sync",
        "done",
        serde_json::json!({"replayed": drained.changes, "keys": drained.keys + rederived.keys, "retried": retried.keys, "requeued": requeued}),
    )
    .await?;
    Ok(SyncReport {
        replayed: drained.changes as i64,
        keys: (drained.keys + rederived.keys) as i64,
        retried: retried.keys as i64,
        failures_left: report.failures_total + report.failed_changes + reverse_left,
        // A full re-derive still marked (keys that cannot all be computed yet) is pending too.
        pending_left: older + report.rederive.len() as i64,
        status: report,
    })
}

#[derive(Debug, Serialize)]
pub struct SyncReport {
    /// Change-log rows applied.
    pub replayed: i64,
    /// Keys re-derived for them.
    pub keys: i64,
    /// Failed keys retried.
    pub retried: i64,
    pub failures_left: i64,
    /// Rows logged before this sync started and still in the log (another applier holds them),
    /// and full re-derives still waiting.
    pub pending_left: i64,
    pub status: status::Status,
}
