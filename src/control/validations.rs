//! Validation results (`validations`), newest last: what the cutover gate reads.

use sqlx::PgConnection;

use super::query;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;

/// One validation's outcome as recorded.
pub struct Recorded<'a> {
    pub passed: bool,
    pub mapping_digest: &'a str,
    pub report_digest: &'a str,
    pub snapshot_lsn: &'a str,
    pub summary: serde_json::Value,
}

pub async fn record(
    conn: &mut PgConnection,
    m: &Mapping,
    v: &Recorded<'_>,
) -> Result<(), Diagnostic> {
    query(
        m,
        "INSERT INTO {validations} (migration, passed, mapping_digest, report_digest, snapshot_lsn, summary) VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
    )
    .bind(v.passed)
    .bind(v.mapping_digest)
    .bind(v.report_digest)
    .bind(v.snapshot_lsn)
    .bind(v.summary.to_string())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
