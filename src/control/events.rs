//! The audit trail (`events`): who (the database role), when, which command, what came of it.

use sqlx::PgConnection;

use super::query;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;

/// Append an event.
pub async fn record(
    conn: &mut PgConnection,
    m: &Mapping,
    command: &str,
    outcome: &str,
    detail: serde_json::Value,
) -> Result<(), Diagnostic> {
    query(
        m,
        "INSERT INTO {events} (migration, command, outcome, detail) VALUES ($1, $2, $3, $4::jsonb)",
    )
    .bind(command)
    .bind(outcome)
    .bind(detail.to_string())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
