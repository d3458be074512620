//! Running the green DDL inside the probe's transaction: errors located in the file, session
//! settings re-pinned after it, and no lock left on a table outside green.

use super::{Probe, db_diag, pg_err};
use crate::diag::{Diagnostic, Span};
use crate::sql::scan::transaction_control;
use crate::sql::{Ident, Sql, sql};

impl Probe<'_> {
    pub(super) async fn green_ddl(&mut self) -> Result<(), Diagnostic> {
        let m = self.m;
        let ddl = std::fs::read_to_string(&m.green_ddl).map_err(|e| {
            Diagnostic::error(
                "missing-file",
                format!("cannot read green_ddl {}: {e}", m.green_ddl.display()),
            )
            .at(Some(m.green_ddl_span.clone()))
        })?;
        // Text the lexer cannot end (an open quote) is left to PostgreSQL, which locates it.
        if let Some((line, word)) = transaction_control(&ddl).unwrap_or(None) {
            return Err(Diagnostic::error(
                "green-ddl-transaction",
                format!(
                    "green_ddl contains {word}: bluegreen runs the file in its own transaction"
                ),
            )
            .at(Some(Span::new(&m.green_ddl, line as u64, 1)))
            .hint("remove transaction control statements from the file"));
        }
        let green = Ident::new(&m.green);
        self.exec(&sql!(
            "CREATE SCHEMA IF NOT EXISTS {green}; SET LOCAL search_path = {green}"
        ))
        .await
        .map_err(db_diag)?;
        // The file is the user's own DDL, run as written: its text is the statement.
        if let Err(e) = sqlx::raw_sql(Sql::verbatim(ddl.clone()).assert_safe())
            .execute(&mut *self.conn)
            .await
        {
            let (msg, pos) = match pg_err(&e) {
                Some(p) => (
                    format!("{} (SQLSTATE {})", p.message(), p.code()),
                    match p.position() {
                        Some(sqlx::postgres::PgErrorPosition::Original(n)) => Some(n),
                        _ => None,
                    },
                ),
                None => (e.to_string(), None),
            };
            let span = pos.map(|n| {
                let before: String = ddl.chars().take(n.saturating_sub(1)).collect();
                let line = before.matches('\n').count() as u64 + 1;
                let col = before.rsplit('\n').next().unwrap_or("").chars().count() as u64 + 1;
                Span::new(&m.green_ddl, line, col)
            });
            return Err(
                Diagnostic::error("green-ddl-failed", format!("green_ddl failed: {msg}"))
                    .at(span.or(Some(Span::new(&m.green_ddl, 1, 1))))
                    .hint(
                        "fix the green DDL file; it runs with search_path set to the green schema",
                    ),
            );
        }
        // The file may have changed session settings (pg_dump output sets lock_timeout = 0): pin
        // them again. And it must not have locked anything outside green and the control schema
        // (a REFERENCES to a blue table would hold SHARE ROW EXCLUSIVE on it for the whole plan).
        self.exec(&sql!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = 0; SET LOCAL search_path = pg_catalog",
            self.lock_timeout_ms
        ))
        .await
        .map_err(db_diag)?;
        let foreign: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT format('%s (%s)', l.relation::regclass, l.mode) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.mode NOT IN ('AccessShareLock') AND c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ($1, $2, 'pg_catalog', 'pg_toast') AND n.nspname NOT LIKE 'pg\\_temp%'",
        )
        .bind(&m.green)
        .bind(&m.control_schema)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_diag)?;
        if !foreign.is_empty() {
            return Err(Diagnostic::error(
                "green-ddl-locks-blue",
                format!("green_ddl takes locks on tables outside the green schema: {}", foreign.join(", ")),
            )
            .at(Some(m.green_ddl_span.clone()))
            .hint("green must not reference blue tables (foreign keys to blue block the application's writes while they are created); keep green self-contained"));
        }
        Ok(())
    }
}
