//! Run state in the control schema: the phase of a migration (saved before the work it announces,
//! so an interrupted command knows where it stopped), audit events, and the blue-schema fingerprint
//! that detects DDL drift.

use sqlx::PgConnection;

use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::sql::{Literal, QName, Sql};

/// Phases in order. A command moves a migration forward only.
pub const PHASES: &[&str] = &["new", "prepared", "copying", "copied", "live"];

pub fn phase_rank(p: &str) -> usize {
    PHASES.iter().position(|x| *x == p).unwrap_or(0)
}

pub async fn exec(conn: &mut PgConnection, sql: &Sql) -> Result<(), Diagnostic> {
    sqlx::raw_sql(sql.assert_safe())
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| {
            Diagnostic::error(
                "database-error",
                format!("{e}\nwhile running: {}", first_line(sql.as_str())),
            )
        })
}

fn first_line(s: &str) -> &str {
    let l = s.lines().next().unwrap_or("");
    &l[..l.len().min(160)]
}

/// The current phase (`new` when nothing was prepared).
pub async fn phase(conn: &mut PgConnection, m: &Mapping) -> Result<String, Diagnostic> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(QName::new(&m.control_schema, "runs").to_string())
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    if !exists {
        return Ok("new".into());
    }
    Ok(runs_field(conn, m, "phase")
        .await?
        .unwrap_or_else(|| "new".into()))
}

pub async fn set_phase(
    conn: &mut PgConnection,
    m: &Mapping,
    phase: &str,
) -> Result<(), Diagnostic> {
    exec(
        conn,
        &Sql(format!(
            "UPDATE {} SET phase = {}, updated_at = now() WHERE migration = {}",
            QName::new(&m.control_schema, "runs"),
            Literal::new(phase),
            Literal::new(&m.migration)
        )),
    )
    .await
}

/// Append an audit event: who (the database role), when, which command, what came of it.
pub async fn event(
    conn: &mut PgConnection,
    m: &Mapping,
    command: &str,
    outcome: &str,
    detail: serde_json::Value,
) -> Result<(), Diagnostic> {
    exec(
        conn,
        &Sql(format!(
            "INSERT INTO {} (migration, command, outcome, detail) VALUES ({}, {}, {}, {}::jsonb)",
            QName::new(&m.control_schema, "events"),
            Literal::new(&m.migration),
            Literal::new(command),
            Literal::new(outcome),
            Literal::new(detail.to_string())
        )),
    )
    .await
}

/// One text column of this migration's row in `runs` (None when there is no row or it is NULL).
async fn runs_field(
    conn: &mut PgConnection,
    m: &Mapping,
    column: &str,
) -> Result<Option<String>, Diagnostic> {
    let v: Option<Option<String>> = sqlx::query_scalar(
        Sql(format!(
            "SELECT {}::text FROM {} WHERE migration = $1",
            crate::sql::Ident::new(column),
            QName::new(&m.control_schema, "runs")
        ))
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    Ok(v.flatten())
}

fn db(e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("database-error", e.to_string())
}

/// A digest of the columns and types of every blue table the mapping reads.
pub async fn blue_fingerprint(conn: &mut PgConnection, m: &Mapping) -> Result<String, Diagnostic> {
    let names: Vec<String> = m.blue_tables_read().iter().map(|q| q.to_string()).collect();
    let text: Option<String> = sqlx::query_scalar(
        "SELECT string_agg(format('%s.%s %s %s', a.attrelid::regclass, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull), E'\\n' ORDER BY a.attrelid::regclass::text, a.attnum)
         FROM pg_attribute a
         WHERE a.attrelid = ANY (SELECT to_regclass(n)::oid FROM unnest($1::text[]) n) AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(&names)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    Ok(text.unwrap_or_default())
}

/// Refuse to go on when a blue table's columns or types changed since `prepare`.
pub async fn check_drift(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let Some(saved) = runs_field(conn, m, "blue_fingerprint").await? else {
        return Ok(());
    };
    let now = blue_fingerprint(conn, m).await?;
    if saved == now {
        return Ok(());
    }
    let before: Vec<&str> = saved.lines().collect();
    let after: Vec<&str> = now.lines().collect();
    let mut changes: Vec<String> = before
        .iter()
        .filter(|l| !after.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    changes.extend(
        after
            .iter()
            .filter(|l| !before.contains(l))
            .map(|l| format!("+ {l}")),
    );
    Err(Diagnostic::error(
        "ddl-drift",
        format!("blue tables changed since prepare (columns or types):\n  {}", changes.join("\n  ")),
    )
    .hint("DDL on blue during a migration is not followed: revert the change, or finalize this migration and plan a new one"))
}

/// Refuse a mapping whose text changed since `prepare`.
pub async fn check_mapping(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let saved = runs_field(conn, m, "mapping_digest").await?;
    match saved {
        Some(d) if d != m.digest() => Err(Diagnostic::error(
            "mapping-changed",
            format!(
                "{} changed since prepare (blake3 {} then, {} now)",
                m.path.display(),
                &d[..16],
                &m.digest()[..16]
            ),
        )
        .hint(
            "run with the mapping that was prepared; a changed mapping needs a new migration name",
        )),
        _ => Ok(()),
    }
}
