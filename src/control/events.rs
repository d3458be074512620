//! The audit trail (`events`): per command, who ran it (the operating-system user and host, and
//! the database role), with which arguments (the database URL's password redacted), when it
//! started and ended, and what came of it (`detail`: rows affected, how long a flip blocked
//! writes).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::PgConnection;

use super::query;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;

static STARTED: OnceLock<f64> = OnceLock::new();

fn now_epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Remember when this process started its command (called first thing by `main`).
pub fn mark_start() {
    let _ = STARTED.set(now_epoch());
}

/// The operating-system user running this process.
fn os_user() -> String {
    for v in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(v)
            && !u.is_empty()
        {
            return u;
        }
    }
    // SAFETY: getuid has no preconditions.
    format!("uid {}", unsafe { libc::getuid() })
}

fn host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The command line without the program name, every database URL's password redacted.
pub fn arguments() -> Vec<String> {
    let mut out = Vec::new();
    let mut next_is_url = false;
    for a in std::env::args().skip(1) {
        if next_is_url {
            out.push(crate::pg::redact_url(&a));
            next_is_url = false;
        } else if let Some(u) = a.strip_prefix("--database-url=") {
            out.push(format!("--database-url={}", crate::pg::redact_url(u)));
        } else {
            next_is_url = a == "--database-url";
            out.push(if a.contains("://") {
                crate::pg::redact_url(&a)
            } else {
                a
            });
        }
    }
    out
}

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
        "INSERT INTO {events} (migration, command, outcome, detail, os_user, host, args, started_at) VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::jsonb, pg_catalog.to_timestamp($8))",
    )
    .bind(command)
    .bind(outcome)
    .bind(detail.to_string())
    .bind(os_user())
    .bind(host())
    .bind(serde_json::Value::from(arguments()).to_string())
    .bind(*STARTED.get_or_init(now_epoch))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}
