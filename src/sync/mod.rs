//! Keeping green = M(blue) after the copy (DESIGN.md step 3 and 7): install the re-derivation
//! functions rendered by `plan::sync`, replay the change log in batches (catch-up), then switch the
//! capture triggers to live mode in one short transaction; `sync` replays or retries on demand.

use serde::Serialize;
use sqlx::PgConnection;

use crate::control::{self, Phase, changes, deferred, events, runs, status};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::names;
use crate::pg::{exec, locking};
use crate::plan::steps::add_foreign_key_not_valid;
use crate::plan::sync::{catchup_function, live_trigger_function, retry_function, sync_entries};
use crate::sql::sql;

/// Change-log rows replayed per catch-up transaction.
pub const BATCH: i64 = 5_000;
/// Backlog small enough to drain inside the live-switch transaction.
pub const SWITCH_BACKLOG: i64 = 2_000;

/// (Re)create every re-derivation function. Refuses entries sync cannot key.
pub async fn install_functions(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let cat = control::load_catalog_for_sync(conn, m).await?;
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

/// Replay the change log in batches until at most `leave` rows remain. Each batch is one
/// transaction that fixes its set of change-log ids first, replays exactly those (with the same
/// locks as the live triggers, so it may run beside them) and deletes exactly those; a writer
/// committing meanwhile is replayed by a later batch. Returns the rows replayed.
pub async fn catch_up(conn: &mut PgConnection, m: &Mapping, leave: i64) -> Result<i64, Diagnostic> {
    let tables = m.blue_tables_read();
    let mut replayed = 0;
    loop {
        if changes::backlog(conn, m).await? <= leave {
            return Ok(replayed);
        }
        exec(conn, &sql!("BEGIN")).await?;
        let result = async {
            let ids = changes::oldest_ids(conn, m, BATCH).await?;
            if ids.is_empty() {
                return Ok(0);
            }
            let present = changes::tables_of(conn, m, &ids).await?;
            for (n, x) in tables.iter().enumerate() {
                if present.contains(&x.display()) {
                    let f = names::catchup_function(&m.control_schema, &m.migration, n);
                    changes::replay(conn, &f, &ids).await?;
                }
            }
            changes::delete(conn, m, &ids).await?;
            Ok::<i64, Diagnostic>(ids.len() as i64)
        }
        .await;
        match result {
            Ok(n) => {
                exec(conn, &sql!("COMMIT")).await?;
                replayed += n;
                if n == 0 {
                    return Ok(replayed);
                }
            }
            Err(d) => {
                let _ = exec(conn, &sql!("ROLLBACK")).await;
                return Err(d);
            }
        }
    }
}

/// Catch up, then switch the triggers to live re-derivation in one short transaction that fences
/// blue writes (SHARE ROW EXCLUSIVE, under lock_timeout with retry) while it drains the last of
/// the log: after it commits, every write re-derives green inside its own transaction. Runs once
/// the copy is done (phase `copied`), as the migration's one runner; a no-op when live.
pub async fn go_live(url: &str, m: &Mapping, lock_timeout_ms: u64) -> Result<(), Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    locking::runner_lock_wait(&mut conn, &m.migration)
        .await
        .map_err(crate::pg::db_error)?;
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
    if phase < Phase::Copied {
        return Err(not_copied(m, phase));
    }
    install_functions(conn, m).await?;
    let n = catch_up(conn, m, SWITCH_BACKLOG).await?;
    eprintln!("bluegreen: caught up {n} change(s); switching to live sync");
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let entries = sync_entries(m, &cat);
    let blue = m.blue_tables_read();
    let lock = sql!(
        "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
        crate::sql::join(blue.iter(), ", ")
    );
    let fks = deferred::pending_foreign_keys(conn, m).await?;
    locking::run_locked(conn, lock_timeout_ms, &blue, async |tx| {
        exec(tx, &lock).await?;
        for (n, x) in blue.iter().enumerate() {
            let ids = changes::ids_of(tx, m, &x.display()).await?;
            if !ids.is_empty() {
                let f = names::catchup_function(&m.control_schema, &m.migration, n);
                changes::replay(tx, &f, &ids).await?;
            }
            exec(tx, &live_trigger_function(m, &entries, x, n)).await?;
        }
        for fk in &fks {
            exec(
                tx,
                &add_foreign_key_not_valid(&fk.name, &fk.table, &fk.definition),
            )
            .await?;
        }
        changes::delete_all(tx, m).await?;
        runs::set_phase(tx, m, Phase::Live).await
    })
    .await?;
    events::record(conn, m, "copy", "live", serde_json::json!({"caught_up": n})).await?;
    eprintln!("bluegreen: live: every write to blue now re-derives green in its own transaction");
    Ok(())
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

/// `sync`: replay the change log (before live) and retry keys whose re-derivation failed.
pub async fn sync(conn: &mut PgConnection, m: &Mapping) -> Result<SyncReport, Diagnostic> {
    let phase = runs::phase(conn, m).await?;
    if phase < Phase::Copied {
        return Err(not_copied(m, phase));
    }
    runs::check_mapping(conn, m).await?;
    runs::check_drift(conn, m).await?;
    install_functions(conn, m).await?;
    let replayed = catch_up(conn, m, 0).await?;
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let mut retried = 0;
    for e in sync_entries(m, &cat) {
        let n = changes::failures_of(conn, m, &e.entry.name).await?;
        if n > 0 {
            exec(
                conn,
                &sql!(
                    "SELECT {}()",
                    names::retry_function(&m.control_schema, &m.migration, e.index, &e.entry.name)
                ),
            )
            .await?;
            retried += n;
        }
    }
    let report = status::status(conn, m).await?;
    events::record(
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
        failures_left: report.failures_total,
        status: report,
    })
}

#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub replayed: i64,
    pub retried: i64,
    pub failures_left: i64,
    pub status: status::Status,
}
