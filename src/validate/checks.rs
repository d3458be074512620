//! The checks file (`checks:` in the mapping): named SQL data-quality checks with an expectation,
//! and query-performance budgets, run on green after the comparison.
//!
//! ```yaml
//! checks:
//!   - name: no orphan leads
//!     sql: SELECT count(*) FROM carbot_v2.leads l LEFT JOIN carbot_v2.workshops w ON w.id = l.workshop_id WHERE w.id IS NULL
//!     expect: "= 0"                 # = != < <= > >= a number, or "= blue" (the blue_sql result)
//!   - name: leads copied
//!     sql: SELECT count(*) FROM carbot_v2.leads
//!     blue_sql: SELECT count(*) FROM public.leads WHERE deleted_at IS NULL
//!     expect: "= blue"
//!     until_cutover: true           # skipped while cut over (green is the new application's)
//! performance:
//!   - name: lead dashboard
//!     sql: SELECT ...
//!     budget_ms: 50
//!     runs: 20                      # default 10
//!     blue_sql: SELECT ...          # optional: the same question on blue, timed side by side
//! ```
//!
//! The SQL in this file is the migration engineer's own, run as written (read-only transaction).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use crate::diag::Diagnostic;
use crate::sql::Sql;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    #[serde(default)]
    pub checks: Vec<Check>,
    #[serde(default)]
    pub performance: Vec<Budget>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    pub sql: String,
    pub expect: String,
    pub blue_sql: Option<String>,
    /// Holds only while blue is the application's (it compares green with blue on a table that
    /// has no reverse): skipped while cut over, where green is the new application's.
    #[serde(default)]
    pub until_cutover: bool,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub name: String,
    pub sql: String,
    pub budget_ms: f64,
    pub runs: Option<u32>,
    pub blue_sql: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub value: String,
    pub expect: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blue_value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed in every snapshot tried, each with changes still pending: unverified (a check
    /// comparing green with blue cannot tell lag from a difference).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inconclusive: bool,
    /// `until_cutover` while cut over: not run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

impl CheckResult {
    /// A check marked `until_cutover`, not run while cut over.
    pub fn skipped(c: &Check) -> Self {
        CheckResult {
            name: c.name.clone(),
            passed: true,
            value: "skipped while cut over (until_cutover)".into(),
            expect: c.expect.clone(),
            blue_value: None,
            error: None,
            inconclusive: false,
            skipped: true,
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct BudgetResult {
    pub name: String,
    pub passed: bool,
    pub budget_ms: f64,
    pub runs: u32,
    pub p50_ms: f64,
    pub p95_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blue_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn load(path: &Path) -> Result<ChecksFile, Diagnostic> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostic::error(
            "missing-file",
            format!("cannot read checks file {}: {e}", path.display()),
        )
    })?;
    crate::mapping::yaml::read(path, &text)
}

/// `op value` from an expectation string.
fn parse_expect(s: &str) -> Option<(&str, &str)> {
    let s = s.trim();
    for op in ["<=", ">=", "!=", "=", "<", ">"] {
        if let Some(rest) = s.strip_prefix(op) {
            return Some((op, rest.trim()));
        }
    }
    None
}

fn compare(op: &str, got: &str, want: &str) -> bool {
    match (got.trim().parse::<f64>(), want.trim().parse::<f64>()) {
        (Ok(g), Ok(w)) => match op {
            "=" => (g - w).abs() <= f64::EPSILON * w.abs().max(1.0),
            "!=" => (g - w).abs() > f64::EPSILON * w.abs().max(1.0),
            "<" => g < w,
            "<=" => g <= w,
            ">" => g > w,
            ">=" => g >= w,
            _ => false,
        },
        _ => match op {
            "=" => got == want,
            "!=" => got != want,
            _ => false,
        },
    }
}

/// One value, inside the caller's read-only snapshot transaction (a savepoint keeps a failing
/// check from aborting the others).
async fn scalar(conn: &mut PgConnection, sql: &str) -> Result<String, sqlx::Error> {
    sqlx::raw_sql("SAVEPOINT bluegreen_check")
        .execute(&mut *conn)
        .await?;
    // The checks file's SQL is the user's own, run as written.
    let r: Result<Option<String>, sqlx::Error> = sqlx::query_scalar(
        Sql::verbatim(format!(
            "SELECT ({})::text",
            sql.trim().trim_end_matches(';')
        ))
        .assert_safe(),
    )
    .fetch_one(&mut *conn)
    .await;
    match r {
        Ok(v) => {
            sqlx::raw_sql("RELEASE SAVEPOINT bluegreen_check")
                .execute(&mut *conn)
                .await?;
            Ok(v.unwrap_or_else(|| "NULL".into()))
        }
        Err(e) => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT bluegreen_check")
                .execute(&mut *conn)
                .await?;
            Err(e)
        }
    }
}

/// Run the checks in one REPEATABLE READ, read-only snapshot: a check comparing green with blue
/// reads both at the same instant while the application writes.
/// Run every check in one read-only snapshot. `probe` (a statement and its `$1`), when given,
/// runs in the same snapshot first (validate counts the changes still pending there) and its
/// value is returned.
pub async fn run_checks(
    conn: &mut PgConnection,
    checks: &[Check],
    probe: Option<(&Sql, &str)>,
    fence: Option<crate::sync::fence::Fence>,
) -> (Vec<CheckResult>, Option<i64>) {
    let mut out = Vec::new();
    let mut begin = sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *conn)
        .await
        .map(|_| ());
    if let Some(f) = fence {
        // In the fence's snapshot (green is exactly M(blue) there), then release the fence.
        if begin.is_ok() {
            begin = sqlx::query(
                crate::sql::sql!(
                    "SET TRANSACTION SNAPSHOT {}",
                    crate::sql::Literal::new(&f.snapshot)
                )
                .assert_safe(),
            )
            .execute(&mut *conn)
            .await
            .map(|_| ());
        }
        if let Err(d) = f.release().await {
            eprintln!("bluegreen: releasing the fence: {}", d.message);
        }
    }
    if let Err(e) = begin {
        let failed = checks
            .iter()
            .map(|c| CheckResult {
                name: c.name.clone(),
                passed: false,
                value: String::new(),
                expect: c.expect.clone(),
                blue_value: None,
                error: Some(e.to_string()),
                inconclusive: false,
                skipped: false,
            })
            .collect();
        return (failed, None);
    }
    let mut probed = None;
    if let Some((p, arg)) = probe {
        probed = sqlx::query_scalar::<_, i64>(p.assert_safe())
            .bind(arg)
            .fetch_one(&mut *conn)
            .await
            .ok();
    }
    let out_ref = &mut out;
    run_checks_in(conn, checks, out_ref).await;
    let _ = sqlx::raw_sql("COMMIT").execute(&mut *conn).await;
    (out, probed)
}

async fn run_checks_in(conn: &mut PgConnection, checks: &[Check], out: &mut Vec<CheckResult>) {
    for c in checks {
        let mut r = CheckResult {
            name: c.name.clone(),
            passed: false,
            value: String::new(),
            expect: c.expect.clone(),
            blue_value: None,
            error: None,
            inconclusive: false,
            skipped: false,
        };
        let Some((op, want)) = parse_expect(&c.expect) else {
            r.error = Some(format!(
                "expectation `{}` is not `<op> <value>` (ops: = != < <= > >=)",
                c.expect
            ));
            out.push(r);
            continue;
        };
        match scalar(conn, &c.sql).await {
            Ok(v) => r.value = v,
            Err(e) => {
                r.error = Some(e.to_string());
                out.push(r);
                continue;
            }
        }
        let want = if want == "blue" {
            match &c.blue_sql {
                Some(b) => match scalar(conn, b).await {
                    Ok(v) => {
                        r.blue_value = Some(v.clone());
                        v
                    }
                    Err(e) => {
                        r.error = Some(format!("blue_sql: {e}"));
                        out.push(r);
                        continue;
                    }
                },
                None => {
                    r.error = Some("`= blue` needs `blue_sql`".into());
                    out.push(r);
                    continue;
                }
            }
        } else {
            want.to_string()
        };
        r.passed = compare(op, &r.value, &want);
        out.push(r);
    }
}

async fn timings(conn: &mut PgConnection, sql: &str, runs: u32) -> Result<(f64, f64), sqlx::Error> {
    let mut times = Vec::new();
    // One warm-up run, not counted.
    scalar_rows(conn, sql).await?;
    for _ in 0..runs {
        let t = Instant::now();
        scalar_rows(conn, sql).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    Ok((pick(0.5), pick(0.95)))
}

async fn scalar_rows(conn: &mut PgConnection, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(Sql::verbatim(sql).assert_safe())
        .execute(conn)
        .await
        .map(|_| ())
}

pub async fn run_budgets(conn: &mut PgConnection, budgets: &[Budget]) -> Vec<BudgetResult> {
    let mut out = Vec::new();
    for b in budgets {
        let runs = b.runs.unwrap_or(10).max(1);
        let mut r = BudgetResult {
            name: b.name.clone(),
            passed: false,
            budget_ms: b.budget_ms,
            runs,
            p50_ms: 0.0,
            p95_ms: 0.0,
            blue_p50_ms: None,
            error: None,
        };
        match timings(conn, &b.sql, runs).await {
            Ok((p50, p95)) => {
                r.p50_ms = p50;
                r.p95_ms = p95;
                r.passed = p95 <= b.budget_ms;
            }
            Err(e) => r.error = Some(e.to_string()),
        }
        if let Some(blue) = &b.blue_sql {
            match timings(conn, blue, runs).await {
                Ok((p50, _)) => r.blue_p50_ms = Some(p50),
                Err(e) => r.error = Some(format!("blue_sql: {e}")),
            }
        }
        out.push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations() {
        assert!(compare("=", "0", "0"));
        assert!(compare(">=", "0.995", "0.99"));
        assert!(!compare(">=", "0.98", "0.99"));
        assert!(compare("=", "4712", "4712"));
        assert!(compare("!=", "a", "b"));
        assert_eq!(parse_expect(">= 0.99"), Some((">=", "0.99")));
        assert_eq!(parse_expect("= blue"), Some(("=", "blue")));
        assert_eq!(parse_expect("about 3"), None);
    }
}
