//! Lag-aware validation (DESIGN.md, "The invariant": a key with a pending change is not a
//! difference). A key that differs in the comparison's snapshot may only be waiting for the
//! follower. Validate applies the change log itself, re-compares exactly those keys in a new
//! snapshot, and decides per key:
//! - equal now: it was pending, and is verified;
//! - still differing and no change touching it is pending in that snapshot: a real difference;
//! - still differing and pending again: re-checked in the next round, at most [`ROUNDS`] rounds;
//!   a key never quiet is "unverified (hot)".

use std::collections::{BTreeMap, BTreeSet};

use sqlx::PgConnection;

use super::Difference;
use super::locate::{self, Rows};
use crate::catalog::Catalog;
use crate::control::{self, Phase, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{db_error, exec};
use crate::sql::{QName, sql};
use crate::sync::{self, apply::Key};

/// Re-check rounds before a key still pending is called hot.
pub const ROUNDS: usize = 5;
/// The longest the checks' fence may hold blue writes while it drains the change log.
pub const FENCE_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);
/// Fences tried before hot keys are left unverified (or checks run in rounds).
const FENCE_TRIES: usize = 3;

/// What the re-checks decided.
#[derive(Debug, Default)]
pub struct Settled {
    /// Differences that stand.
    pub real: Vec<Difference>,
    /// Differences of keys still pending after every round.
    pub hot: Vec<Difference>,
    /// Keys that differed, were pending, and matched once applied (per table).
    pub rechecked: BTreeMap<String, u64>,
    /// Change-log rows validate applied itself.
    pub applied: u64,
    /// How long blue writes waited for the fence that re-checked hot keys, if one was taken.
    pub fenced_ms: Option<u64>,
}

/// The lock timeout of a fence: the mapping's (or the default), clamped below
/// `deadlock_timeout` by the fence itself.
fn fence_lock_timeout_ms(m: &Mapping) -> u64 {
    crate::plan::effective_settings(
        m,
        &crate::plan::Options {
            jobs: None,
            chunk_rows: None,
            lock_timeout_ms: None,
            profile: crate::plan::ProfileMode::None,
        },
    )
    .lock_timeout_ms
}

/// Compare `keys` (per table) in the connection's current transaction: the differences.
async fn recheck(
    conn: &mut PgConnection,
    m: &Mapping,
    cat: &Catalog,
    plan: &sync::Plan,
    keys: &BTreeMap<String, BTreeSet<Key>>,
    show_values: bool,
) -> Result<Vec<Difference>, Diagnostic> {
    let mut out = Vec::new();
    for (table, keys) in keys {
        let Some(e) = m.entry(table) else { continue };
        let Some(ae) = plan.entry(table) else {
            continue;
        };
        let gt = cat
            .table(&QName::new(&m.green, table))
            .expect("validated table");
        let columns: Vec<Vec<Option<String>>> = (0..ae.nkeys)
            .map(|j| keys.iter().map(|k| k[j].clone()).collect())
            .collect();
        out.extend(
            locate::locate(
                conn,
                m,
                e,
                gt,
                Rows::Keys {
                    blue: &ae.blue_typed,
                    green_condition: &ae.green_key_condition,
                    keys: &columns,
                },
                show_values,
            )
            .await
            .map_err(db_error)?,
        );
    }
    Ok(out)
}

/// Settle `found` (the differences of the comparison): apply, re-check, decide.
pub async fn settle(
    url: &str,
    m: &Mapping,
    found: Vec<Difference>,
    show_values: bool,
) -> Result<Settled, Diagnostic> {
    let mut out = Settled::default();
    if found.is_empty() {
        return Ok(out);
    }
    let mut conn = crate::pg::connect(url).await?;
    let cat: Catalog = control::load_catalog(&mut conn, m).await?;
    if runs::phase(&mut conn, m).await? < Phase::Copied {
        // Nothing applies the change log before the copy is done: every difference stands.
        out.real = found;
        return Ok(out);
    }
    let plan = sync::plan(&mut conn, m).await?;
    // Per table: the keys to re-check, and the differences first seen for them.
    let mut todo: BTreeMap<String, BTreeSet<Key>> = BTreeMap::new();
    for d in &found {
        todo.entry(d.table.clone())
            .or_default()
            .extend(d.sync_keys.iter().cloned());
    }
    let first: BTreeMap<String, usize> = todo.iter().map(|(t, k)| (t.clone(), k.len())).collect();
    for round in 1..=ROUNDS {
        let applied = sync::drain(&mut conn, m, &plan).await?;
        out.applied += applied.changes as u64;
        sync::apply::rederive_marked(&mut conn, m, &plan).await?;
        // A key that met a parent not written yet (23503) is "not yet", not a difference.
        sync::retry_all(&mut conn, m, &plan).await?;
        exec(
            &mut conn,
            &sql!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        )
        .await?;
        exec(
            &mut conn,
            &crate::plan::query::set_mapping_search_path(m, true),
        )
        .await?;
        let mut next: BTreeMap<String, BTreeSet<Key>> = BTreeMap::new();
        let result = async {
            for d in recheck(&mut conn, m, &cat, &plan, &todo, show_values).await? {
                let Some(ae) = plan.entry(&d.table) else {
                    continue;
                };
                let pending = pending_keys(&mut conn, m, ae).await?;
                let is_pending = match &pending {
                    None => true,
                    Some(p) => d.sync_keys.iter().any(|k| p.contains(k)),
                };
                if is_pending && round < ROUNDS {
                    next.entry(d.table.clone())
                        .or_default()
                        .extend(d.sync_keys.iter().cloned());
                } else if is_pending {
                    out.hot.push(d);
                } else {
                    out.real.push(d);
                }
            }
            Ok::<(), Diagnostic>(())
        }
        .await;
        exec(&mut conn, &sql!("COMMIT")).await?;
        result?;
        if next.is_empty() {
            break;
        }
        eprintln!(
            "bluegreen: {} key(s) still pending after re-check round {round}; applying and checking again",
            next.values().map(BTreeSet::len).sum::<usize>()
        );
        todo = next;
    }
    // Keys written without pause through every round: one last look in a snapshot where nothing
    // is pending, under a brief fence on blue writes (held at most FENCE_BUDGET plus the lock
    // wait). A key that differs there differs; one that matches is verified.
    if !out.hot.is_empty() {
        let mut hot: BTreeMap<String, BTreeSet<Key>> = BTreeMap::new();
        for d in &out.hot {
            hot.entry(d.table.clone())
                .or_default()
                .extend(d.sync_keys.iter().cloned());
        }
        let mut fence = None;
        for _ in 0..FENCE_TRIES {
            // Drained just before, the fence has the least to apply while writers wait.
            sync::drain(&mut conn, m, &plan).await?;
            fence =
                sync::fence::fenced_snapshot(url, m, &plan, fence_lock_timeout_ms(m), FENCE_BUDGET)
                    .await?;
            if fence.is_some() {
                break;
            }
        }
        if fence.is_none() {
            eprintln!(
                "bluegreen: no fence within {} ms in {FENCE_TRIES} tries: {} hot key(s) stay unverified",
                FENCE_BUDGET.as_millis(),
                hot.values().map(BTreeSet::len).sum::<usize>()
            );
        }
        if let Some(fence) = fence {
            exec(
                &mut conn,
                &sql!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
            )
            .await?;
            let imported = exec(
                &mut conn,
                &sql!(
                    "SET TRANSACTION SNAPSHOT {}",
                    crate::sql::Literal::new(&fence.snapshot)
                ),
            )
            .await;
            let held = fence.release().await?;
            imported?;
            exec(
                &mut conn,
                &crate::plan::query::set_mapping_search_path(m, true),
            )
            .await?;
            let result = recheck(&mut conn, m, &cat, &plan, &hot, show_values).await;
            exec(&mut conn, &sql!("COMMIT")).await?;
            let diffs = result?;
            eprintln!(
                "bluegreen: {} hot key(s) re-checked in a fenced snapshot (blue writes waited {} ms)",
                hot.values().map(BTreeSet::len).sum::<usize>(),
                held.as_millis()
            );
            out.fenced_ms = Some(held.as_millis() as u64);
            out.hot.clear();
            out.real.extend(diffs);
        }
    }
    // Verified after re-check: every key first seen differing that is neither real nor hot now.
    for (table, n) in first {
        let unresolved: usize = out
            .real
            .iter()
            .chain(&out.hot)
            .filter(|d| d.table == table)
            .map(|d| d.sync_keys.len().max(1))
            .sum();
        out.rechecked
            .insert(table, n.saturating_sub(unresolved) as u64);
    }
    Ok(out)
}

/// Run the checks file's checks when green has caught up: drain the change log, run them in a
/// snapshot, and accept the result when every check passes or nothing was pending in that
/// snapshot; otherwise again, at most [`ROUNDS`] times. Checks still failing with changes pending
/// in every snapshot are marked inconclusive.
pub async fn checks_when_caught_up(
    url: &str,
    m: &Mapping,
    checks: &[super::checks::Check],
) -> Result<Vec<super::checks::CheckResult>, Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    let plan = if control::exists(&mut conn, m).await?
        && runs::phase(&mut conn, m).await? >= Phase::Copied
    {
        Some(sync::plan(&mut conn, m).await?)
    } else {
        None
    };
    let backlog = control::changes::pending_work(m);
    if let Some(plan) = &plan {
        sync::drain(&mut conn, m, plan).await?;
        // A check comparing green with blue needs a snapshot with nothing pending: a brief
        // fence on blue writes gives one (writes wait at most FENCE_BUDGET and the lock wait).
        if checks.iter().any(|c| c.blue_sql.is_some()) {
            let lt = fence_lock_timeout_ms(m);
            let mut fence = None;
            for _ in 0..FENCE_TRIES {
                sync::drain(&mut conn, m, plan).await?;
                fence = sync::fence::fenced_snapshot(url, m, plan, lt, FENCE_BUDGET).await?;
                if fence.is_some() {
                    break;
                }
            }
            if let Some(fence) = fence {
                // The checks import the fence's snapshot, which lets the writers go before the
                // checks themselves run.
                let (results, _) =
                    super::checks::run_checks(&mut conn, checks, None, Some(fence)).await;
                eprintln!("bluegreen: checks ran in a fenced snapshot");
                return Ok(results);
            }
            eprintln!(
                "bluegreen: no fence within {} ms in {FENCE_TRIES} tries (writers busy, or too much pending): checks run in rounds",
                FENCE_BUDGET.as_millis()
            );
        }
    }
    let mut round = 0;
    loop {
        round += 1;
        if let Some(plan) = &plan {
            sync::drain(&mut conn, m, plan).await?;
            sync::apply::rederive_marked(&mut conn, m, plan).await?;
            sync::retry_all(&mut conn, m, plan).await?;
        }
        let (mut results, pending) = super::checks::run_checks(
            &mut conn,
            checks,
            plan.as_ref().map(|_| (&backlog, m.migration.as_str())),
            None,
        )
        .await;
        // No probe (no control schema yet): nothing is pending.
        let conclusive = plan.is_none() || pending == Some(0);
        if results.iter().all(|c| c.passed) || conclusive {
            return Ok(results);
        }
        if round >= ROUNDS {
            for c in results.iter_mut().filter(|c| !c.passed) {
                c.inconclusive = true;
            }
            return Ok(results);
        }
    }
}

/// The keys of entry `ae` that a change visible in this snapshot still touches, or None when a
/// full re-derive (TRUNCATE) of it is pending (then every key is).
async fn pending_keys(
    conn: &mut PgConnection,
    m: &Mapping,
    ae: &crate::plan::sync::ApplierEntry,
) -> Result<Option<BTreeSet<Key>>, Diagnostic> {
    let marked: bool = sqlx::query_scalar(
        sql!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE migration = $1 AND green_table = $2)",
            control::table(m, "rederive")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(&ae.name)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if marked {
        return Ok(None);
    }
    let mut keys = BTreeSet::new();
    for (x, finder) in &ae.finders {
        let truncated: bool = sqlx::query_scalar(
            sql!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE migration = $1 AND blue_table = $2 AND op = 'T')",
                control::table(m, "changes")
            )
            .assert_safe(),
        )
        .bind(&m.migration)
        .bind(x.display())
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
        if truncated {
            return Ok(None);
        }
        let ids: Vec<i64> = sqlx::query_scalar(
            sql!(
                "SELECT id FROM {} WHERE migration = $1 AND blue_table = $2 AND (all_entries OR NOT $3) AND (entries IS NULL OR $4 = ANY (entries))",
                control::table(m, "changes")
            )
            .assert_safe(),
        )
        .bind(&m.migration)
        .bind(x.display())
        .bind(ae.row_local)
        .bind(&ae.name)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
        if ids.is_empty() {
            continue;
        }
        let rows = sqlx::query(finder.assert_safe())
            .bind(&ids)
            .bind(false)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        for r in rows {
            let k: Key = (0..ae.nkeys)
                .map(|j| sqlx::Row::try_get::<Option<String>, _>(&r, j).map_err(db_error))
                .collect::<Result<_, _>>()?;
            keys.insert(k);
        }
    }
    Ok(Some(keys))
}
