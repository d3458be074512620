//! A brief fence on blue writes, to get a snapshot in which green is exactly M(blue): pause the
//! other appliers (their lock, exclusively), lock the blue tables the mapping reads `EXCLUSIVE`
//! (reads go on; no writer is in flight once granted, so the change log is frozen), drain the log
//! with an applier on another connection, export a snapshot, let the caller import it, release. Writes wait only while the fence is held, which is bounded
//! by `budget`; the lock is taken under a `lock_timeout` below `deadlock_timeout`, in one fixed
//! order, and retried, so the fence gives way rather than the application (DESIGN.md, the cutover
//! fence, steps 1 and 2). Used by validate for the checks that compare green with blue.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::{Plan, drain};
use crate::control::{Phase, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::locking::{attempt_timeout_ms, deadlock_timeout_ms, is_transient};
use crate::pg::{db_error, exec};
use crate::sql::{join, sql};

/// How long one attempt at the fence's locks waits at most (ms), and how many attempts.
const FENCE_LOCK_WAIT_MS: u64 = 100;
const FENCE_ATTEMPTS: usize = 12;
/// Keys the fence re-verifies one by one after its drain, at most (beyond, the drain's own apply
/// is the check, and `validate` the proof).
const VERIFY_KEYS: usize = 20_000;

/// A held fence: the transaction holding the locks, and the snapshot it exported.
pub struct Fence {
    conn: PgConnection,
    pub snapshot: String,
    granted: Instant,
}

impl Fence {
    /// Release the locks (after the caller imported the snapshot); how long they were held.
    pub async fn release(mut self) -> Result<Duration, Diagnostic> {
        exec(&mut self.conn, &sql!("COMMIT")).await?;
        let held = self.granted.elapsed();
        self.conn.close().await.map_err(db_error)?;
        Ok(held)
    }
}

/// Why a fence was not held (nothing is then).
pub enum NotHeld {
    /// The blue locks were not granted through every attempt.
    NotGranted,
    /// The change log did not drain within the budget.
    NotDrained,
    /// Another command moved the migration to this phase meanwhile (read once the locks were
    /// held).
    Moved(Phase),
}

/// Fence blue writes, drain, export a snapshot. None when the lock is not granted after the
/// retries or the drain does not finish within `budget` (nothing is held then).
pub async fn fenced_snapshot(
    url: &str,
    m: &Mapping,
    plan: &Plan,
    lock_timeout_ms: u64,
    budget: Duration,
) -> Result<Option<Fence>, Diagnostic> {
    let (mut f, granted) = match fence_blue(url, m, plan, lock_timeout_ms, budget, None).await? {
        Ok(held) => held,
        Err(_) => return Ok(None),
    };
    let snapshot: String = sqlx::query_scalar("SELECT pg_catalog.pg_export_snapshot()")
        .fetch_one(&mut f)
        .await
        .map_err(db_error)?;
    Ok(Some(Fence {
        conn: f,
        snapshot,
        granted,
    }))
}

/// Steps 1 and 2 of the cutover fence: pause the other appliers, lock the blue tables the
/// mapping reads `EXCLUSIVE`, drain the change log with an applier on another connection. On
/// success the returned connection is inside the transaction holding those locks, with when they
/// were granted; otherwise nothing is held.
pub async fn fence_blue(
    url: &str,
    m: &Mapping,
    plan: &Plan,
    lock_timeout_ms: u64,
    budget: Duration,
    expect: Option<&[Phase]>,
) -> Result<Result<(PgConnection, Instant), NotHeld>, Diagnostic> {
    let mut f = crate::pg::connect(url).await?;
    let mut tables = m.blue_tables_read();
    tables.sort();
    let lock = sql!("LOCK TABLE {} IN EXCLUSIVE MODE", join(tables.iter(), ", "));
    // Each attempt waits briefly: while it waits for one table it holds the ones before it, and
    // a writer's statement in flight on that table may need one of those (a foreign-key check
    // locks the referenced table, a delete the referencing one; no order avoids both). Such a
    // writer waits until the attempt gives way: at most this long, then it goes on. With
    // attempts of up to 800 ms (below deadlock_timeout) the fence once gave up through all six
    // under four Chinook writers (tests/it/live.rs), stalling them each time; such cycles are
    // the likely cause, and short attempts, more of them, resolve one quickly.
    let timeout = attempt_timeout_ms(lock_timeout_ms, deadlock_timeout_ms(&mut f).await?)
        .min(FENCE_LOCK_WAIT_MS);
    let mut granted = false;
    let mut delay = Duration::from_millis(20);
    for _ in 0..FENCE_ATTEMPTS {
        exec(&mut f, &sql!("BEGIN")).await?;
        // Other appliers first (their transactions in flight finish; new ones wait): the fence's
        // drain then runs alone, and none of them is left waiting on the fenced tables.
        sqlx::query("SELECT pg_catalog.pg_advisory_xact_lock($1)")
            .bind(crate::names::appliers_lock(&m.migration))
            .execute(&mut f)
            .await
            .map_err(db_error)?;
        exec(&mut f, &sql!("SET LOCAL lock_timeout = '{timeout}ms'")).await?;
        match exec(&mut f, &lock).await {
            Ok(()) => {
                granted = true;
                break;
            }
            Err(d) if is_transient(&d) => {
                exec(&mut f, &sql!("ROLLBACK")).await?;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(320));
            }
            Err(d) => {
                let _ = exec(&mut f, &sql!("ROLLBACK")).await;
                return Err(d);
            }
        }
    }
    if !granted {
        eprintln!("bluegreen: fence: blue's writers held the tables through every lock attempt");
        return Ok(Err(NotHeld::NotGranted));
    }
    let granted_at = Instant::now();
    // The phase as committed now, in a statement after the locks (a second cutover that waited
    // for the first one's fence must not drain, nor flip, again).
    if let Some(expect) = expect {
        let now = runs::phase(&mut f, m).await?;
        if !expect.contains(&now) {
            exec(&mut f, &sql!("ROLLBACK")).await?;
            return Ok(Err(NotHeld::Moved(now)));
        }
    }
    // No blue writer is in flight, so the applier need not hold blue rows: its FOR SHARE would
    // wait for this very fence.
    let fenced = plan.fenced();
    let mut a = crate::pg::connect(url).await?;
    // The keys the frozen backlog touches, to re-verify once drained (cutover fence, step 3).
    // (The cutover's fence only: validate's fence compares everything itself, and after a
    // cutover entries without a reverse are the application's.)
    let pending = if expect.is_some() && fenced.cut_over.is_none() {
        super::apply::keys_pending(&mut a, m, &fenced, VERIFY_KEYS).await?
    } else {
        None
    };
    match tokio::time::timeout(budget, caught_up(&mut a, m, &fenced)).await {
        Ok(Ok(_)) => {
            if let Some(keys) = &pending {
                let differ = super::apply::verify_keys(&mut a, &fenced, keys).await?;
                if !differ.is_empty() {
                    let _ = exec(&mut f, &sql!("ROLLBACK")).await;
                    return Err(Diagnostic::error(
                        "fence-verify",
                        format!(
                            "after draining inside the fence, green differs from M(blue) for keys it applied: {}",
                            differ.join(", ")
                        ),
                    )
                    .hint("run `bluegreen validate` to see the rows; nothing was changed"));
                }
            }
        }
        Ok(Err(d)) => {
            let _ = exec(&mut f, &sql!("ROLLBACK")).await;
            return Err(d);
        }
        Err(_) => {
            // Over budget: let the writers go; the applier's transaction dies with its
            // connection.
            drop(a);
            exec(&mut f, &sql!("ROLLBACK")).await?;
            eprintln!(
                "bluegreen: fence: the change log did not drain within {} ms; writers let go",
                budget.as_millis()
            );
            return Ok(Err(NotHeld::NotDrained));
        }
    }
    Ok(Ok((f, granted_at)))
}

/// With blue fenced and the other appliers paused: apply the log and the full re-derives, and
/// retry the failed keys (a key set aside because a writer held its row, or whose parent was not
/// there yet, is not done), until nothing but failures that stand is left.
async fn caught_up(conn: &mut PgConnection, m: &Mapping, plan: &Plan) -> Result<(), Diagnostic> {
    let left = crate::control::changes::pending_work(m);
    loop {
        drain(conn, m, plan).await?;
        super::apply::rederive_marked(conn, m, plan).await?;
        super::retry_all(conn, m, plan).await?;
        let n: i64 = sqlx::query_scalar(left.assert_safe())
            .bind(&m.migration)
            .fetch_one(&mut *conn)
            .await
            .map_err(db_error)?;
        if n == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
