//! The audit trail (`events`): who (the database role), when, which command, what came of it.

use sqlx::PgConnection;

use super::table;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::sql::sql;

/// Append an event.
pub async fn record(
    conn: &mut PgConnection,
    m: &Mapping,
    command: &str,
    outcome: &str,
    detail: serde_json::Value,
) -> Result<(), Diagnostic> {
    sqlx::query(
        sql!(
            "INSERT INTO {} (migration, command, outcome, detail) VALUES ($1, $2, $3, $4::jsonb)",
            table(m, "events")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(command)
    .bind(outcome)
    .bind(detail.to_string())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
