//! Locks without queues: every DDL and lock on an application table runs in a transaction under
//! `lock_timeout`, retried a bounded number of times with exponential backoff and jitter. While a
//! statement waits for a lock, every later writer queues behind it
//! (<https://www.postgresql.org/docs/15/explicit-locking.html>), so waiting long is never an option:
//! after the retries the command fails and names the transactions in the way (pid, age, query).
//!
//! Each attempt's `lock_timeout` is shorter than the server's `deadlock_timeout`: when the tool's
//! lock wait and an application transaction wait for each other, the tool's wait ends first, before
//! any deadlock check runs, so the application is never the one chosen as the deadlock victim; a
//! deadlock the tool is chosen for (40P01) is retried like a lock timeout (55P03).
//!
//! Also the advisory locks that make one runner per migration.

use std::time::Duration;

use sqlx::{Connection, PgConnection, Row};

use super::{db_error, exec};
use crate::diag::Diagnostic;
use crate::sql::{Literal, QName, Sql, sql};

/// How often a lock is tried before giving up.
pub const ATTEMPTS: u32 = 6;

/// The `lock_timeout` an attempt uses: the one asked for, but below `deadlock_timeout` (four
/// fifths of it), and at least 10 ms.
pub fn attempt_timeout_ms(asked_ms: u64, deadlock_timeout_ms: u64) -> u64 {
    asked_ms.min(deadlock_timeout_ms * 4 / 5).max(10)
}

/// The server's `deadlock_timeout`, in ms.
pub async fn deadlock_timeout_ms(conn: &mut PgConnection) -> Result<u64, Diagnostic> {
    let ms: i64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM current_setting('deadlock_timeout')::interval) * 1000)::int8",
    )
    .fetch_one(conn)
    .await
    .map_err(db_error)?;
    Ok(ms.max(1) as u64)
}

/// A lock not granted in time, or a deadlock this session was chosen to break: worth a retry.
pub fn is_transient(d: &Diagnostic) -> bool {
    matches!(d.sqlstate(), Some("55P03" | "40P01"))
}

/// Run `work` in one transaction under `lock_timeout` (clamped below `deadlock_timeout`),
/// retrying when a lock is not granted in time or a deadlock chose this transaction. `tables` are
/// the application tables it locks (named in the error when the retries run out).
pub async fn run_locked(
    conn: &mut PgConnection,
    lock_timeout_ms: u64,
    tables: &[QName],
    work: impl AsyncFnMut(&mut PgConnection) -> Result<(), Diagnostic>,
) -> Result<(), Diagnostic> {
    let attempt_ms = attempt_timeout_ms(lock_timeout_ms, deadlock_timeout_ms(conn).await?);
    run_locked_for(conn, attempt_ms, tables, work).await
}

/// [`run_locked`] for green tables no application uses yet (copy's index builds): each attempt
/// waits past `deadlock_timeout`, which is when a waiting backend cancels an autovacuum worker in
/// its way. An autovacuum of a table copy just filled holds SHARE UPDATE EXCLUSIVE for minutes
/// (a 10-million-row green table: every build's attempts ran out below `deadlock_timeout`).
pub async fn run_locked_green(
    conn: &mut PgConnection,
    lock_timeout_ms: u64,
    tables: &[QName],
    work: impl AsyncFnMut(&mut PgConnection) -> Result<(), Diagnostic>,
) -> Result<(), Diagnostic> {
    let attempt_ms = lock_timeout_ms.max(1) + 2 * deadlock_timeout_ms(conn).await?;
    run_locked_for(conn, attempt_ms, tables, work).await
}

async fn run_locked_for(
    conn: &mut PgConnection,
    lock_timeout_ms: u64,
    tables: &[QName],
    mut work: impl AsyncFnMut(&mut PgConnection) -> Result<(), Diagnostic>,
) -> Result<(), Diagnostic> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=ATTEMPTS {
        let result = async {
            let mut tx = conn.begin().await.map_err(db_error)?;
            exec(
                &mut tx,
                &sql!("SET LOCAL lock_timeout = '{lock_timeout_ms}ms'"),
            )
            .await?;
            work(&mut tx).await?;
            tx.commit().await.map_err(db_error)
        }
        .await;
        let lock_timeout = is_transient;
        match result {
            Ok(()) => return Ok(()),
            Err(d) if lock_timeout(&d) && attempt < ATTEMPTS => {
                let jitter = Duration::from_millis(
                    u64::from(std::process::id() % 97) + (attempt as u64 * 37) % 89,
                );
                let why = if d.sqlstate() == Some("40P01") {
                    "deadlock with an application transaction: gave way".to_string()
                } else {
                    format!("lock not granted within {lock_timeout_ms} ms")
                };
                eprintln!(
                    "bluegreen: {why} (attempt {attempt}/{ATTEMPTS}); retrying in {} ms",
                    (delay + jitter).as_millis()
                );
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(d) if lock_timeout(&d) => {
                let who = blockers(conn, tables).await.unwrap_or_default();
                return Err(Diagnostic::error(
                    "lock-timeout",
                    format!(
                        "could not lock {} within {lock_timeout_ms} ms after {ATTEMPTS} attempts; in the way: {}",
                        tables.iter().map(QName::display).collect::<Vec<_>>().join(", "),
                        if who.is_empty() { "(the blocking transaction ended meanwhile)".to_string() } else { who.join("; ") }
                    ),
                )
                .hint("wait for or end those transactions (pg_terminate_backend(pid)), then re-run; raise --lock-timeout only if writers can afford to wait that long"));
            }
            Err(d) => return Err(d),
        }
    }
    unreachable!("the last attempt returns")
}

/// Sessions holding or waiting for locks on `tables`: "pid 123 (idle in transaction for 42 s: UPDATE ...)".
pub async fn blockers(
    conn: &mut PgConnection,
    tables: &[QName],
) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
    let rows = sqlx::query(
        "SELECT DISTINCT a.pid, coalesce(a.state, '') AS state,
                extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))::int8 AS age,
                left(coalesce(a.query, ''), 80) AS query
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.granted AND l.relation = ANY (SELECT to_regclass(n)::oid FROM unnest($1::text[]) n)
           AND a.pid <> pg_backend_pid()
         ORDER BY 3 DESC",
    )
    .bind(&names)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "pid {} ({} for {} s: {})",
                r.get::<i32, _>("pid"),
                r.get::<String, _>("state"),
                r.get::<i64, _>("age"),
                r.get::<String, _>("query")
            )
        })
        .collect())
}

fn key(migration: &str) -> Sql {
    sql!(
        "hashtextextended({}, 0)",
        Literal::new(crate::names::advisory_key(migration))
    )
}

/// Take the migration's runner lock on this session: exclusive (prepare, finishing steps) or shared
/// (copy workers, which may run in several processes at once). Fails fast when taken.
pub async fn try_runner_lock(
    conn: &mut PgConnection,
    migration: &str,
    exclusive: bool,
) -> Result<(), Diagnostic> {
    let f = if exclusive {
        "pg_try_advisory_lock"
    } else {
        "pg_try_advisory_lock_shared"
    };
    let got: bool = sqlx::query_scalar(sql!("SELECT {f}({})", key(migration)).assert_safe())
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    if got {
        return Ok(());
    }
    Err(Diagnostic::error(
        "migration-busy",
        format!("another bluegreen command is working on migration `{migration}` right now"),
    )
    .hint("wait for it to finish (see `bluegreen status`), then re-run"))
}

/// Wait for the exclusive runner lock (finishing steps after a shared phase).
pub async fn runner_lock_wait(conn: &mut PgConnection, migration: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql!("SELECT pg_advisory_lock({})", key(migration)).assert_safe())
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn runner_unlock(
    conn: &mut PgConnection,
    migration: &str,
    exclusive: bool,
) -> Result<(), sqlx::Error> {
    let f = if exclusive {
        "pg_advisory_unlock"
    } else {
        "pg_advisory_unlock_shared"
    };
    sqlx::raw_sql(sql!("SELECT {f}({})", key(migration)).assert_safe())
        .execute(conn)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn attempts_give_way_before_the_deadlock_check() {
        use super::attempt_timeout_ms;
        assert_eq!(attempt_timeout_ms(2_000, 1_000), 800);
        assert_eq!(attempt_timeout_ms(500, 1_000), 500);
        assert_eq!(attempt_timeout_ms(5_000, 200), 160);
        assert_eq!(attempt_timeout_ms(5_000, 5), 10);
    }
}
