//! `finalize`, after the soak: sync is taken out. Refused while sessions still write blue (seen
//! by the forward triggers after the flip) or changes are pending; allowed after a cutover, or
//! with `--abandon` after a rollback (which drops green instead). In one transaction under
//! `lock_timeout`, retried: every generated trigger and function (`names::generated`) dropped,
//! the interleaved sequences back to plain increments past every used value, this migration's
//! operational rows (change log, failures, follower state and samples, chunk ledger, blue writers) deleted;
//! the run, its validations and its audit events stay as the archive. When no other migration is
//! left unfinished in the control schema, its operational tables go too, so nothing generated
//! remains but the archive (`runs`, `validations`, `events`). Blue tables stay unless
//! `--drop-blue`.

use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, Row};

use crate::control::writers::blue_writers;
use crate::control::{self, Phase, events, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{db_error, exec, locking};
use crate::sql::{Ident, QName, join, sql};

/// The control tables that hold operational state (dropped with the last migration finalized);
/// `runs`, `validations` and `events` are the archive.
pub const OPERATIONAL: [&str; 10] = [
    "changes",
    "sync_failures",
    "failed_changes",
    "rederive",
    "followers",
    "chunks",
    "deferred",
    "blue_writers",
    "reverse_failures",
    "samples",
];

#[derive(Clone, Debug)]
pub struct FinalizeOptions {
    /// After a rollback: give the migration up and drop green.
    pub abandon: bool,
    pub drop_blue: bool,
    /// Blue writes seen within this long refuse.
    pub quiet: Duration,
    pub lock_timeout_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Finalized {
    pub already: bool,
    pub triggers_dropped: Vec<String>,
    pub functions_dropped: Vec<String>,
    pub sequences: Vec<String>,
    pub dropped_schema: Option<String>,
    pub dropped_blue: Vec<String>,
    pub control_tables_dropped: Vec<String>,
}

/// The gates of `finalize`: (gate, reason, what to do) each.
pub async fn gates(
    conn: &mut PgConnection,
    m: &Mapping,
    o: &FinalizeOptions,
) -> Result<Vec<super::cutover::Refusal>, Diagnostic> {
    let refuse = |gate, reason: String, hint: &str| super::cutover::Refusal {
        gate,
        reason,
        hint: hint.to_string(),
    };
    let mut out = Vec::new();
    match (runs::phase(conn, m).await?, o.abandon) {
        (Phase::Finalized, _) => return Ok(out),
        (Phase::CutOver, false) | (Phase::RolledBack, true) => {}
        (Phase::CutOver, true) => out.push(refuse(
            "phase",
            format!("migration {} is cut over: abandoning it would drop the schema the application uses", m.migration),
            "roll back first, or finalize without --abandon",
        )),
        (Phase::RolledBack, false) => out.push(refuse(
            "phase",
            format!("migration {} was rolled back: the application is on blue", m.migration),
            "cut over again, or give the migration up with --abandon (drops green)",
        )),
        (p, _) => out.push(refuse(
            "phase",
            format!("migration {} is in phase {p}", m.migration),
            "finalize follows a cutover (or a rollback, with --abandon)",
        )),
    }
    if !o.abandon {
        let seen = blue_writers(conn, m, o.quiet).await?;
        if !seen.is_empty() {
            out.push(refuse(
                "blue writers",
                format!(
                    "{} session(s) wrote blue in the last {} s: {}",
                    seen.len(),
                    o.quiet.as_secs(),
                    seen.iter()
                        .map(|w| format!(
                            "pid {} ({} {})",
                            w.pid,
                            w.usename.as_deref().unwrap_or("?"),
                            w.application_name.as_deref().unwrap_or("")
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                "their writes reach green only while sync is in place: move them to the new schema (or end them: cutover --drain-timeout --terminate), then finalize",
            ));
        }
        let pending: i64 = sqlx::query_scalar(control::changes::pending_work(m).assert_safe())
            .bind(&m.migration)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?;
        let reverse = super::cutover::reverse_failures(conn, m).await?;
        if reverse > 0 {
            out.push(refuse(
                "reverse failures",
                format!("{reverse} green write(s) have not reached blue (reverse failures)"),
                "see `bluegreen status`; fix the cause and run `bluegreen sync`, then finalize",
            ));
        }
        if pending > 0 {
            out.push(refuse(
                "pending",
                format!("{pending} change(s) or re-derive(s) are still pending"),
                "run `bluegreen sync` until nothing is left, then finalize",
            ));
        }
    }
    Ok(out)
}

/// Finalize (after the gates passed).
pub async fn finalize(
    conn: &mut PgConnection,
    m: &Mapping,
    o: &FinalizeOptions,
) -> Result<Finalized, Diagnostic> {
    if runs::phase(conn, m).await? == Phase::Finalized {
        return Ok(Finalized {
            already: true,
            ..Finalized::default()
        });
    }
    let m = &runs::resolved_mapping(conn, m).await?;
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let generated = crate::names::generated(
        &m.control_schema,
        &m.migration,
        m.blue_tables_read().len(),
        m.tables.len(),
    );
    // The tables carrying generated triggers, whatever they are (partitions and children too).
    let on: Vec<(String, String, String)> = sqlx::query(
        "SELECT n.nspname::text AS s, c.relname::text AS r, g.tgname::text AS t FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_class c ON c.oid = g.tgrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE g.tgname = ANY($1) ORDER BY 1, 2, 3",
    )
    .bind(&generated.triggers)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?
    .iter()
    .map(|r| (r.get("s"), r.get("r"), r.get("t")))
    .collect();
    let mut tables: Vec<QName> = on.iter().map(|(s, r, _)| QName::new(s, r)).collect();
    tables.dedup();
    let mut done = Finalized::default();
    let others: i64 = sqlx::query_scalar(
        control::statement(
            m,
            "SELECT count(*) FROM {runs} WHERE migration <> $1 AND phase <> 'finalized'",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    locking::run_locked(conn, o.lock_timeout_ms, &tables, async |tx| {
        done = Finalized::default();
        // The gates again, once no blue write can be in flight (third hostile review, finding
        // 2: an old session's write still uncommitted when the gates first ran was neither a
        // recent blue writer nor a pending change; finalize then deleted its change-log row).
        // The lock the DROP TRIGGERs below take anyway, taken first.
        if !tables.is_empty() {
            exec(
                tx,
                &sql!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", join(tables.iter(), ", ")),
            )
            .await?;
        }
        let again = gates(tx, m, o).await?;
        if !again.is_empty() {
            return Err(Diagnostic::error(
                "finalize-refused",
                format!(
                    "refused inside the locked transaction, nothing changed: {}",
                    again
                        .iter()
                        .map(|r| format!("{}: {}", r.gate, r.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
            .hint("a session wrote blue while finalize started; see `bluegreen status`, then finalize again"));
        }
        for (s, r, t) in &on {
            exec(
                tx,
                &sql!("DROP TRIGGER IF EXISTS {} ON {}", Ident::new(t), QName::new(s, r)),
            )
            .await?;
            done.triggers_dropped.push(format!("{t} on {}", QName::new(s, r).display()));
        }
        for f in &generated.functions {
            let exists: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 AND p.proname = $2)",
            )
            .bind(&f.schema)
            .bind(&f.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            if exists {
                exec(tx, &sql!("DROP FUNCTION {f}()")).await?;
                done.functions_dropped.push(f.display());
            }
        }
        done.sequences = super::cutover::plain_sequences(tx, m, &cat).await?;
        for t in OPERATIONAL {
            sqlx::query(
                sql!("DELETE FROM {} WHERE migration = $1", control::table(m, t)).assert_safe(),
            )
            .bind(&m.migration)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        if o.abandon {
            exec(tx, &sql!("DROP SCHEMA IF EXISTS {} CASCADE", Ident::new(&m.green))).await?;
            done.dropped_schema = Some(m.green.clone());
        } else if o.drop_blue {
            let blue = m.blue_tables_read();
            exec(tx, &sql!("DROP TABLE {}", join(blue.iter(), ", "))).await?;
            done.dropped_blue = blue.iter().map(QName::display).collect();
        }
        runs::set_phase(tx, m, Phase::Finalized).await?;
        if others == 0 {
            for t in OPERATIONAL {
                exec(tx, &sql!("DROP TABLE IF EXISTS {}", control::table(m, t))).await?;
                done.control_tables_dropped.push(t.to_string());
            }
            exec(
                tx,
                &sql!(
                    "DROP FUNCTION IF EXISTS {}(text, text)",
                    QName::new(&m.control_schema, "unmapped_value")
                ),
            )
            .await?;
        }
        // The audit event in the same transaction: the work and its record, or neither.
        events::record(
            tx,
            m,
            "finalize",
            if o.abandon { "abandoned" } else { "finalized" },
            serde_json::json!({"triggers": done.triggers_dropped.len(), "functions": done.functions_dropped.len(), "sequences": done.sequences, "dropped_schema": done.dropped_schema, "dropped_blue": done.dropped_blue}),
        )
        .await
    })
    .await?;
    Ok(done)
}
