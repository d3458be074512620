//! The sign-off report: `report.md` (for people), `report.json` (same content, stable schema,
//! `format_version`), `tables.csv` and `differences.csv`. The JSON carries `report_digest`: the
//! blake3 of the JSON text rendered with `report_digest` set to the empty string, so a signed copy
//! can be checked later (`verify_digest`).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::checks::{BudgetResult, CheckResult};
use super::{Difference, TableResult};

pub const FORMAT_VERSION: u32 = 1;

/// The verdict a report signs off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Every table matches and every check passes.
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "FAIL")]
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format_version: u32,
    pub verdict: Verdict,
    pub migration: String,
    pub phase: crate::control::Phase,
    pub ran_by: String,
    pub ran_at: String,
    pub database: String,
    pub server_version: String,
    pub mapping_file: String,
    pub mapping_digest: String,
    pub snapshot_lsn: String,
    pub values_shown: bool,
    pub tables: Vec<TableResult>,
    pub differences_total: usize,
    pub differences_shown: usize,
    /// Change-log rows validate applied before re-checking pending keys.
    pub pending_applied: u64,
    /// Keys that differed while a change touching them was pending, and matched when re-checked.
    pub pending_rechecked: u64,
    /// Keys still pending after every re-check round (unverified).
    pub unverified_hot: u64,
    /// `--allow-hot`: unverified keys did not fail the validation.
    pub hot_allowed: bool,
    pub differences: Vec<Difference>,
    pub checks: Vec<CheckResult>,
    pub performance: Vec<BudgetResult>,
    pub report_digest: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }

    /// Fill `report_digest` over the JSON with the digest field empty.
    pub fn seal(&mut self) {
        self.report_digest.clear();
        let body = serde_json::to_string_pretty(self).expect("report serialises");
        self.report_digest = blake3::hash(body.as_bytes()).to_hex().to_string();
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises") + "\n"
    }
}

/// Check a report.json's digest: true when its content is exactly what was sealed.
pub fn verify_digest(json: &str) -> bool {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    let Some(claimed) = v
        .get("report_digest")
        .and_then(|d| d.as_str())
        .map(str::to_string)
    else {
        return false;
    };
    v["report_digest"] = serde_json::Value::String(String::new());
    let body = serde_json::to_string_pretty(&v).expect("json");
    blake3::hash(body.as_bytes()).to_hex().to_string() == claimed
}

pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Validation report: migration `{}`\n", r.migration);
    let _ = writeln!(o, "**Verdict: {}**\n", r.verdict);
    let _ = writeln!(o, "| | |\n|---|---|");
    for (k, v) in [
        ("ran by", r.ran_by.as_str()),
        ("ran at", r.ran_at.as_str()),
        ("database", r.database.as_str()),
        ("server", r.server_version.as_str()),
        ("mapping", r.mapping_file.as_str()),
        ("mapping blake3", r.mapping_digest.as_str()),
        ("snapshot LSN", r.snapshot_lsn.as_str()),
        ("migration phase", r.phase.as_str()),
        ("report blake3", r.report_digest.as_str()),
    ] {
        let _ = writeln!(o, "| {k} | `{v}` |");
    }
    let _ = writeln!(
        o,
        "\nBlue and green were read in one snapshot. Each row is rendered in the green column types and hashed with blake3; a digest is the row count and the sum of the row hashes.\n"
    );
    let _ = writeln!(
        o,
        "## Tables\n\n| table | result | blue rows (M) | green rows | chunks (differing) | missing | extra | duplicated | changed | blue digest | green digest |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for t in &r.tables {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | `{}` | `{}` |",
            t.table,
            if t.matches { "match" } else { "**DIFFERS**" },
            t.blue_rows,
            t.green_rows,
            t.chunks,
            t.differing_chunks,
            t.missing,
            t.extra,
            t.duplicated,
            t.changed,
            &t.blue_digest[..16],
            &t.green_digest[..16]
        );
    }
    let _ = writeln!(
        o,
        "\nPending changes: {} key(s) differed in the snapshot while a change touching them waited in the change log, and matched once it was applied ({} change(s) applied by validate); {} key(s) stayed pending through every re-check and are unverified (hot){}.",
        r.pending_rechecked,
        r.pending_applied,
        r.unverified_hot,
        if r.hot_allowed && r.unverified_hot > 0 {
            ", allowed by --allow-hot"
        } else {
            ""
        }
    );
    if r.differences_total > 0 {
        let _ = writeln!(
            o,
            "\n## Differences\n\n{} in all, {} shown{}.\n\n| table | kind | key | columns | expected (M(blue)) | found (green) |\n|---|---|---|---|---|---|",
            r.differences_total,
            r.differences_shown,
            if r.values_shown {
                ""
            } else {
                "; values masked (run with --show-values to see them)"
            }
        );
        for d in &r.differences {
            let _ = writeln!(
                o,
                "| {} | {} | `{}` | {} | {} | {} |",
                d.table,
                d.kind,
                d.key.replace('|', "\\|"),
                d.columns.join(", "),
                d.expected
                    .as_deref()
                    .map(|v| v.replace('|', "\\|"))
                    .unwrap_or_else(|| "(masked)".into()),
                d.found
                    .as_deref()
                    .map(|v| v.replace('|', "\\|"))
                    .unwrap_or_else(|| "(masked)".into())
            );
        }
    }
    if !r.checks.is_empty() {
        let _ = writeln!(
            o,
            "\n## Checks\n\n| check | result | value | expected | blue |\n|---|---|---|---|---|"
        );
        for c in &r.checks {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                c.name,
                if c.skipped {
                    "skipped"
                } else if c.passed {
                    "pass"
                } else {
                    "**FAIL**"
                },
                c.error
                    .as_deref()
                    .map(|e| format!("error: {e}"))
                    .unwrap_or_else(|| c.value.clone()),
                c.expect,
                c.blue_value.as_deref().unwrap_or("")
            );
        }
    }
    if !r.performance.is_empty() {
        let _ = writeln!(
            o,
            "\n## Performance\n\n| query | result | p50 ms | p95 ms | budget ms | runs | blue p50 ms |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for p in &r.performance {
            let _ = writeln!(
                o,
                "| {} | {} | {:.2} | {:.2} | {} | {} | {} |",
                p.name,
                if p.passed { "pass" } else { "**FAIL**" },
                p.p50_ms,
                p.p95_ms,
                p.budget_ms,
                p.runs,
                p.blue_p50_ms.map(|v| format!("{v:.2}")).unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        o,
        "\n## Sign-off\n\n| role | name | date | signature |\n|---|---|---|---|\n| migration engineer | | | |\n| data owner | | | |"
    );
    o
}

/// A one-screen summary for stdout: verdict, each table, the first differing keys.
pub fn summary(r: &Report) -> String {
    let mut o = format!("validation of {}: {}\n", r.migration, r.verdict);
    for t in &r.tables {
        let _ = write!(
            o,
            "  {:<20} {:>10} rows  {}",
            t.table,
            t.green_rows,
            if t.not_compared {
                "not compared after cutover (no reverse: green is the application's)"
            } else if t.matches {
                "match"
            } else {
                "DIFFERS"
            }
        );
        if !t.matches {
            let first: Vec<String> = r
                .differences
                .iter()
                .filter(|d| d.table == t.table)
                .take(3)
                .map(|d| format!("{} {}", d.kind, d.key))
                .collect();
            let _ = write!(
                o,
                " (missing {}, extra {}, duplicated {}, changed {}; first: {})",
                t.missing,
                t.extra,
                t.duplicated,
                t.changed,
                first.join(", ")
            );
        }
        if let Some(rr) = &t.reverse {
            if rr.matches {
                let _ = write!(o, "; reverse sync to {}: no failure", rr.blue_table);
            } else {
                let _ = write!(
                    o,
                    "; reverse sync to {}: {} green write(s) failed to reach it (`bluegreen sync` retries them; keys: {})",
                    rr.blue_table,
                    rr.failed,
                    rr.keys.join(", ")
                );
            }
        }
        if t.unverified_hot > 0 {
            let _ = write!(o, "  {} key(s) unverified (hot)", t.unverified_hot);
        }
        if t.pending_rechecked > 0 {
            let _ = write!(o, "  {} pending key(s) re-checked", t.pending_rechecked);
        }
        o.push('\n');
    }
    if r.pending_rechecked > 0 || r.pending_applied > 0 {
        let _ = writeln!(
            o,
            "  {} key(s) were pending at the snapshot and matched once applied ({} change(s) applied by validate)",
            r.pending_rechecked, r.pending_applied
        );
    }
    if r.unverified_hot > 0 {
        let _ = writeln!(
            o,
            "  {} key(s) stayed pending through every re-check: unverified (hot){}",
            r.unverified_hot,
            if r.hot_allowed {
                "; allowed by --allow-hot"
            } else {
                "; re-run when writes to them pause, or pass --allow-hot"
            }
        );
    }
    for c in r.checks.iter().filter(|c| !c.passed) {
        let _ = writeln!(
            o,
            "  check failed: {} (value {}, expected {})",
            c.name,
            c.error.as_deref().unwrap_or(&c.value),
            c.expect
        );
    }
    for p in r.performance.iter().filter(|p| !p.passed) {
        let _ = writeln!(
            o,
            "  over budget: {} (p95 {:.1} ms > {} ms)",
            p.name, p.p95_ms, p.budget_ms
        );
    }
    o
}

/// Write report.md, report.json, report.html (with the migration's timeline), tables.csv and
/// differences.csv into `dir`.
pub fn write(r: &Report, timeline: &super::timeline::Timeline, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("report.md"), markdown(r))?;
    std::fs::write(dir.join("report.html"), super::html::render(r, timeline))?;
    std::fs::write(dir.join("report.json"), r.json())?;
    // One row per table, the columns named after TableResult's fields (written out: after a
    // cutover some tables carry a reverse result and some are not compared, and a serialized
    // row would change its width from table to table).
    let mut t = csv::Writer::from_path(dir.join("tables.csv"))?;
    t.write_record([
        "table",
        "matches",
        "blue_rows",
        "green_rows",
        "blue_digest",
        "green_digest",
        "chunks",
        "differing_chunks",
        "missing",
        "extra",
        "duplicated",
        "changed",
        "pending_rechecked",
        "unverified_hot",
        "reverse_failures",
        "not_compared",
    ])?;
    for x in &r.tables {
        t.write_record([
            x.table.clone(),
            x.matches.to_string(),
            x.blue_rows.to_string(),
            x.green_rows.to_string(),
            x.blue_digest.clone(),
            x.green_digest.clone(),
            x.chunks.to_string(),
            x.differing_chunks.to_string(),
            x.missing.to_string(),
            x.extra.to_string(),
            x.duplicated.to_string(),
            x.changed.to_string(),
            x.pending_rechecked.to_string(),
            x.unverified_hot.to_string(),
            x.reverse
                .as_ref()
                .map(|r| r.failed.to_string())
                .unwrap_or_default(),
            x.not_compared.to_string(),
        ])?;
    }
    t.flush()?;
    let mut d = csv::Writer::from_path(dir.join("differences.csv"))?;
    d.write_record(["table", "kind", "key", "columns", "expected", "found"])?;
    for x in &r.differences {
        d.write_record([
            x.table.as_str(),
            x.kind.as_str(),
            x.key.as_str(),
            &x.columns.join(" "),
            x.expected.as_deref().unwrap_or("(masked)"),
            x.found.as_deref().unwrap_or("(masked)"),
        ])?;
    }
    d.flush()
}
