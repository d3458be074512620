//! Connections: every connection bluegreen opens has the same pinned session settings
//! (`crate::session`), so that text renderings (and later checksums) never depend on a server or
//! role default. The one translation of database errors into diagnostics ([`db_error`], keeping
//! the SQLSTATE) and the one way statements are executed ([`exec`]). Also the throwaway cluster used
//! by tests and `demo`, and connection failures as diagnostics that never echo a password.

pub mod cluster;
pub mod locking;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use crate::diag::Diagnostic;
use crate::sql::Sql;

/// A database error as a diagnostic: the server's message (with its detail), its hint, and its
/// SQLSTATE kept for callers that branch on it. Errors that are not the server's (I/O, protocol)
/// keep the driver's text.
pub fn db_error(e: sqlx::Error) -> Diagnostic {
    use sqlx::postgres::PgDatabaseError;
    let Some(db) = e.as_database_error() else {
        return Diagnostic::error("database-error", e.to_string());
    };
    let code = db.code().map(|c| c.to_string());
    let mut message = db.message().to_string();
    let mut hint = None;
    if let Some(pg) = db.try_downcast_ref::<PgDatabaseError>() {
        if let Some(d) = pg.detail() {
            message.push_str(&format!(" ({d})"));
        }
        hint = pg.hint().map(str::to_string);
    }
    if let Some(c) = &code {
        message.push_str(&format!(" [SQLSTATE {c}]"));
    }
    let mut d = Diagnostic::error("database-error", message).maybe_hint(hint);
    d.sqlstate = code;
    d
}

/// [`db_error`] naming the statement that failed (its first line).
pub fn db_error_in(e: sqlx::Error, sql: &Sql) -> Diagnostic {
    let mut d = db_error(e);
    let first = sql.as_str().lines().next().unwrap_or("");
    let cut = first
        .char_indices()
        .nth(160)
        .map_or(first.len(), |(i, _)| i);
    d.message = format!("{}\nwhile running: {}", d.message, &first[..cut]);
    d
}

/// Run one statement (or several separated by `;`) without parameters.
pub async fn exec(conn: &mut PgConnection, sql: &Sql) -> Result<(), Diagnostic> {
    sqlx::raw_sql(sql.assert_safe())
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| db_error_in(e, sql))
}

/// The database URL when neither `--database-url` nor `DATABASE_URL` is given: connect as psql
/// does, from the libpq variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
/// `PGSSLMODE`, `PGSSLROOTCERT`, ...) and `~/.pgpass` (or `PGPASSFILE`), with libpq's defaults for
/// what they leave out.
pub const FROM_ENVIRONMENT: &str = "";

/// The URL with any password replaced by `***`, for messages and reports.
pub fn redact_url(url: &str) -> String {
    if url == FROM_ENVIRONMENT {
        let o = PgConnectOptions::new_without_pgpass();
        return format!(
            "the server the PG* variables name (host {}, port {}, user {}, database {})",
            o.get_host(),
            o.get_port(),
            o.get_username(),
            o.get_database().unwrap_or("(the user's)")
        );
    }
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Not a URL we can parse: show only the scheme, never the rest (it may hold a password).
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://…"),
            None => "(unparseable database URL)".to_string(),
        },
    }
}

/// Parse a URL into options with the pinned settings (and the connection-only ones).
pub fn options(url: &str) -> Result<PgConnectOptions, Diagnostic> {
    let opts = if url == FROM_ENVIRONMENT {
        Ok(PgConnectOptions::new())
    } else {
        PgConnectOptions::from_str(url)
    };
    let opts = opts.map_err(|e| {
        Diagnostic::error(
            "bad-database-url",
            format!(
                "cannot parse the database URL {}: {}",
                redact_url(url),
                scrub(&e.to_string(), url)
            ),
        )
        .hint("write it as postgres://user:password@host:port/database (or set DATABASE_URL)")
    })?;
    Ok(opts
        .application_name("bluegreen")
        .options(crate::session::PINNED.iter().copied())
        .options(crate::session::CONNECTION_ONLY.iter().copied())
        // Statements can carry data; they are never logged by the driver.
        .disable_statement_logging())
}

/// Connect, with a bounded wait, and translate failures into a diagnostic with a hint.
pub async fn connect(url: &str) -> Result<PgConnection, Diagnostic> {
    let opts = options(url)?;
    let attempt =
        tokio::time::timeout(Duration::from_secs(15), PgConnection::connect_with(&opts)).await;
    match attempt {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(connect_error(url, &e)),
        Err(_) => Err(Diagnostic::error(
            "database-unreachable",
            format!("no answer from {} within 15 s", redact_url(url)),
        )
        .hint("check host, port and firewall; is the server running?")),
    }
}

fn connect_error(url: &str, e: &sqlx::Error) -> Diagnostic {
    let shown = redact_url(url);
    if let Some(db) = e.as_database_error() {
        let code = db.code().map(|c| c.to_string()).unwrap_or_default();
        let msg = scrub(db.message(), url);
        return match code.as_str() {
            "28P01" | "28000" => Diagnostic::error(
                "authentication-failed",
                format!("authentication failed for {shown}: {msg}"),
            )
            .hint("check the user name and password in the database URL (or DATABASE_URL, or PGUSER / PGPASSWORD / ~/.pgpass)"),
            "3D000" => Diagnostic::error("database-missing", format!("{shown}: {msg}"))
                .hint("check the database name at the end of the URL"),
            _ => Diagnostic::error(
                "connect-failed",
                format!("cannot connect to {shown}: {msg} (SQLSTATE {code})"),
            ),
        };
    }
    Diagnostic::error(
        "database-unreachable",
        format!("cannot reach {shown}: {}", scrub(&e.to_string(), url)),
    )
    .hint("check host and port (or the socket directory given as ?host=/path); is the server running?")
}

/// Remove the URL's password from a message, whatever the driver put in it.
fn scrub(msg: &str, url: &str) -> String {
    let password = if url == FROM_ENVIRONMENT {
        std::env::var("PGPASSWORD").ok()
    } else {
        url::Url::parse(url)
            .ok()
            .and_then(|u| u.password().map(str::to_string))
    };
    match password {
        Some(pw) if !pw.is_empty() => msg.replace(&pw, "***"),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.example:5432/carbot"),
            "postgres://app:***@db.example:5432/carbot"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert!(!redact_url("postgres://app:s3cret@[bad").contains("s3cret"));
    }
}
