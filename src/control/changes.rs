//! The change log (`changes`: rows the capture triggers logged, replayed by catch-up and `sync`)
//! and the sync failures (`sync_failures`: keys whose re-derivation green rejected).

use sqlx::{PgConnection, Row};

use super::{query, scalar};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::{QName, sql};

/// Work still pending (bound: migration `$1`): change-log rows, full re-derives, and keys failed
/// "not yet" rather than failed: a row an application transaction held past the applier's lock
/// timeout (55P03), a lock cycle the applier gave way in (40P01, 40001), a green parent not
/// written yet (23503). Those are retried: pending work, not a difference.
pub fn pending_work(m: &Mapping) -> crate::sql::Sql {
    super::statement(
        m,
        "SELECT (SELECT count(*) FROM {changes} WHERE migration = $1) + (SELECT count(*) FROM {rederive} WHERE migration = $1) + (SELECT count(*) FROM {sync_failures} WHERE migration = $1 AND error ~ '^(55P03|40P01|40001|23503)')",
    )
}

/// Change-log rows waiting to be replayed.
pub async fn backlog(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    scalar(m, "SELECT count(*) FROM {changes} WHERE migration = $1")
        .fetch_one(conn)
        .await
        .map_err(db_error)
}

/// The highest id in this migration's change log (0 when empty).
pub async fn last_id(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    scalar(
        m,
        "SELECT coalesce(max(id), 0)::int8 FROM {changes} WHERE migration = $1",
    )
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// Seconds since the oldest row still in the log was logged (None when the log is empty). The
/// clock starts when a writer logs the row, before it commits: a long transaction's rows look late
/// the moment it commits.
pub async fn lag_seconds(conn: &mut PgConnection, m: &Mapping) -> Result<Option<f64>, Diagnostic> {
    scalar(
        m,
        "SELECT extract(epoch FROM pg_catalog.clock_timestamp() - min(logged_at))::float8 FROM {changes} WHERE migration = $1",
    )
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// The ids of the oldest `limit` change-log rows.
pub async fn oldest_ids(
    conn: &mut PgConnection,
    m: &Mapping,
    limit: i64,
) -> Result<Vec<i64>, Diagnostic> {
    scalar(
        m,
        "SELECT id FROM {changes} WHERE migration = $1 ORDER BY id LIMIT $2",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// The ids of every change-log row of blue table `blue_table` (`schema.table`).
pub async fn ids_of(
    conn: &mut PgConnection,
    m: &Mapping,
    blue_table: &str,
) -> Result<Vec<i64>, Diagnostic> {
    scalar(
        m,
        "SELECT id FROM {changes} WHERE migration = $1 AND blue_table = $2 ORDER BY id",
    )
    .bind(blue_table)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// Empty this migration's change log (inside the live switch, which fences blue writes).
pub async fn delete_all(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    query(m, "DELETE FROM {changes} WHERE migration = $1")
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// The blue tables (as `schema.table`) the change-log rows `ids` were logged for.
pub async fn tables_of(
    conn: &mut PgConnection,
    m: &Mapping,
    ids: &[i64],
) -> Result<Vec<String>, Diagnostic> {
    scalar(
        m,
        "SELECT DISTINCT blue_table FROM {changes} WHERE migration = $1 AND id = ANY ($2)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// Replay the rows `ids` of a blue table with its catch-up function.
pub async fn replay(
    conn: &mut PgConnection,
    function: &QName,
    ids: &[i64],
) -> Result<(), Diagnostic> {
    sqlx::query(sql!("SELECT {function}($1)").assert_safe())
        .bind(ids)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Delete exactly the rows `ids` (in the transaction that replayed them).
pub async fn delete(conn: &mut PgConnection, m: &Mapping, ids: &[i64]) -> Result<(), Diagnostic> {
    query(
        m,
        "DELETE FROM {changes} WHERE migration = $1 AND id = ANY ($2)",
    )
    .bind(ids)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Keys of `green_table` whose sync failed.
pub async fn failures_of(
    conn: &mut PgConnection,
    m: &Mapping,
    green_table: &str,
) -> Result<i64, Diagnostic> {
    scalar(
        m,
        "SELECT count(*) FROM {sync_failures} WHERE migration = $1 AND green_table = $2",
    )
    .bind(green_table)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// A key whose sync failed, with the database's error.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub table: String,
    pub sync_key: String,
    pub error: String,
    pub failed_at: String,
}

/// How many keys failed, and the newest `limit` of them.
pub async fn failures(
    conn: &mut PgConnection,
    m: &Mapping,
    limit: i64,
) -> Result<(i64, Vec<Failure>), Diagnostic> {
    let total: i64 = scalar(
        m,
        "SELECT count(*) FROM {sync_failures} WHERE migration = $1",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    let rows = query(
        m,
        "SELECT green_table, sync_key::text AS k, error, failed_at::text AS at FROM {sync_failures} WHERE migration = $1 ORDER BY failed_at DESC LIMIT $2",
    )
    .bind(limit)
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    let list = rows
        .iter()
        .map(|r| Failure {
            table: r.get("green_table"),
            sync_key: r.get("k"),
            error: r.get("error"),
            failed_at: r.get("at"),
        })
        .collect();
    Ok((total, list))
}

/// Change-log rows set aside because their keys could not be found (`failed_changes`).
pub async fn set_aside(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    scalar(
        m,
        "SELECT count(*) FROM {failed_changes} WHERE migration = $1",
    )
    .fetch_one(conn)
    .await
    .map_err(db_error)
}
