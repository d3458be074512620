//! After the data: deferred indexes (in parallel), sequences advanced, statistics. Then sync takes
//! over (`sync::go_live`, which puts the foreign keys back NOT VALID), and after it the deferred
//! foreign keys are validated here.

use futures::StreamExt;
use sqlx::PgConnection;

use super::Options;
use crate::control::{self, Phase, deferred, events, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{self, db_error, exec, locking};
use crate::plan::steps::{self, DeferralKind};
use crate::sql::{Ident, QName, sql};

/// Indexes, sequences, statistics, then phase `copied`. Foreign keys come back in the live switch
/// (NOT VALID, instant) and are validated after it: chunks were copied at different instants, so
/// green is consistent only once the change log is drained.
pub(super) async fn finish(
    conn: &mut PgConnection,
    url: &str,
    m: &Mapping,
    o: &Options,
) -> Result<(), Diagnostic> {
    if runs::phase(conn, m).await? < Phase::Copied {
        let builds: Vec<deferred::Pending> = deferred::pending(conn, m)
            .await?
            .into_iter()
            .filter(|p| p.kind.builds_index())
            .collect();
        // Index builds in parallel, at most `jobs` at once: secondary indexes are done when
        // built; a key's index is attached as its constraint after every build (ACCESS
        // EXCLUSIVE, which a build beside it on the same table would hold up).
        let results = futures::stream::iter(builds.iter().map(|ix| {
            let url = url.to_string();
            let m = m.clone();
            let lock_timeout_ms = o.lock_timeout_ms;
            async move {
                let mut c = pg::connect(&url).await?;
                // The definition is pg_get_indexdef's text, read from the catalog at prepare.
                let build = sql!("{}", ix.definition);
                let drop = sql!("DROP INDEX IF EXISTS {}", QName::new(&m.green, &ix.name));
                let table = std::slice::from_ref(&ix.table);
                locking::run_locked_green(&mut c, lock_timeout_ms, table, async |tx| {
                    exec(tx, &drop).await?;
                    exec(tx, &build).await.map_err(|d| key_not_unique(d, ix))?;
                    if ix.kind == DeferralKind::Index {
                        deferred::mark_done(tx, &m, DeferralKind::Index, &ix.name).await?;
                    }
                    Ok(())
                })
                .await?;
                eprintln!("bluegreen: built index {}", ix.name);
                Ok::<(), Diagnostic>(())
            }
        }))
        .buffer_unordered(o.jobs.max(1) as usize)
        .collect::<Vec<_>>()
        .await;
        for r in results {
            r?;
        }
        for k in builds.iter().filter(|p| p.kind != DeferralKind::Index) {
            let attach = steps::attach_key(k.kind, &k.table, &k.name);
            locking::run_locked_green(
                conn,
                o.lock_timeout_ms,
                std::slice::from_ref(&k.table),
                async |tx| {
                    exec(tx, &attach).await?;
                    deferred::mark_done(tx, m, k.kind, &k.name).await
                },
            )
            .await?;
        }
        let cat = control::load_catalog(conn, m).await?;
        for (_, sql) in steps::advance_sequences(m, &cat) {
            exec(conn, &sql).await?;
        }
        for e in &m.tables {
            exec(conn, &sql!("ANALYZE {}", QName::new(&m.green, &e.name))).await?;
        }
        runs::set_phase(conn, m, Phase::Copied).await?;
        events::record(conn, m, "copy", "copied", serde_json::json!({})).await?;
    }
    Ok(())
}

/// A key's index that cannot be built because green holds a key twice: the mapping produces two
/// rows with one key (copy's chunks cannot: each key value is in one chunk).
fn key_not_unique(d: Diagnostic, ix: &deferred::Pending) -> Diagnostic {
    if d.sqlstate.as_deref() != Some("23505") || ix.kind == DeferralKind::Index {
        return d;
    }
    Diagnostic::error(
        "duplicate-key",
        format!(
            "green's {} {} cannot be built after the copy: {}",
            ix.kind.as_str(),
            ix.name,
            d.message
        ),
    )
    .table(&ix.table.name)
    .hint("the mapping produces two rows with one key in one snapshot of blue (a join that repeats the driving row?): find them with `bluegreen plan --profile full`; a fixed mapping needs a new migration name (and green schema)")
}

/// VALIDATE every foreign key added NOT VALID at the live switch (run after `sync::go_live`, by
/// the one runner). Runs while live sync keeps green consistent; takes SHARE UPDATE EXCLUSIVE on
/// green tables only, which no writer needs.
pub async fn validate_foreign_keys(
    url: &str,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    locking::runner_lock_wait(&mut conn, &m.migration)
        .await
        .map_err(db_error)?;
    for fk in deferred::pending_foreign_keys(&mut conn, m).await? {
        let validate = sql!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            fk.table,
            Ident::new(&fk.name)
        );
        let tables = [fk.table.clone()];
        locking::run_locked(&mut conn, lock_timeout_ms, &tables, async |tx| {
            exec(tx, &validate).await.map_err(|d| {
                if locking::is_transient(&d) {
                    return d;
                }
                d.table(&fk.table.name).hint("a green foreign key does not hold: the mapping produces child rows whose parent it does not produce (check the joins and filters of both entries)")
            })?;
            deferred::mark_done(tx, m, DeferralKind::ForeignKey, &fk.name).await
        })
        .await?;
        eprintln!("bluegreen: validated foreign key {}", fk.name);
    }
    Ok(())
}
