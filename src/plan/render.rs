//! Renders a [`Plan`] as a terminal report, as JSON (schema documented in README.md, versioned by
//! `format_version`) or as a Markdown maintenance-window runbook.

use std::fmt::Write;

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};

use super::Plan;
use crate::diag::Severity;

/// Bumped on any incompatible change to the JSON output.
pub const JSON_FORMAT_VERSION: u32 = 1;

pub fn json(plan: &Plan) -> String {
    let mut v = serde_json::to_value(plan).expect("plan serialises");
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("format_version".into(), JSON_FORMAT_VERSION.into());
        map.insert("ok".into(), serde_json::Value::Bool(plan.errors() == 0));
    }
    let mut s = serde_json::to_string_pretty(&v).expect("json");
    s.push('\n');
    s
}

pub fn human_rows(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.1}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.0}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

pub fn human_bytes(n: f64) -> String {
    const U: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn human_seconds(s: f64) -> String {
    let s = s.max(1.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED);
    t
}

pub fn text(plan: &Plan) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Plan for migration {} : {} -> {}   (database {}, PostgreSQL {})",
        plan.migration, plan.blue, plan.green, plan.database, plan.server_version
    );
    let _ = writeln!(
        o,
        "mapping {}  blake3 {}\njobs {}  chunk rows {}  lock_timeout {} ms  profile {}\n",
        plan.mapping_file,
        &plan.mapping_digest[..16],
        plan.settings.jobs,
        plan.settings.chunk_rows,
        plan.settings.lock_timeout_ms,
        plan.settings.profile
    );
    let mut t = table();
    t.set_header(vec![
        "green table",
        "from",
        "shape",
        "est. rows",
        "est. size",
        "chunks",
        "sync key",
        "rollback",
    ]);
    for tp in &plan.tables {
        let from = if tp.joins.is_empty() {
            tp.driving.display()
        } else {
            format!(
                "{} + {}",
                tp.driving.display(),
                tp.joins
                    .iter()
                    .map(|j| j.display())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let key = tp
            .sync_key
            .iter()
            .map(|(c, _)| c.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let key = format!(
            "{key} ({}{})",
            tp.sync_key_source,
            if tp.sync_key_indexed {
                ", indexed"
            } else {
                ", NOT indexed"
            }
        );
        t.add_row(vec![
            tp.name.clone(),
            from,
            tp.shape.clone(),
            human_rows(tp.estimated_rows),
            human_bytes(tp.estimated_bytes),
            tp.chunks.to_string(),
            key,
            tp.reverse.verdict.to_string(),
        ]);
    }
    let _ = writeln!(o, "{t}");
    for tp in &plan.tables {
        let mut lines = Vec::new();
        if !tp.defaults.is_empty() {
            lines.push(format!("left to DDL defaults: {}", tp.defaults.join(", ")));
        }
        if !tp.reverse.auto.is_empty() {
            lines.push(format!(
                "reverse, auto-inverted: {}",
                tp.reverse.auto.join(", ")
            ));
        }
        if !tp.reverse.declared.is_empty() {
            lines.push(format!(
                "reverse, declared: {}",
                tp.reverse.declared.join(", ")
            ));
        }
        if !tp.reverse.missing.is_empty() {
            lines.push(format!(
                "reverse, not rebuilt: {}",
                tp.reverse.missing.join(", ")
            ));
        }
        if !tp.reverse.read_only.is_empty() {
            lines.push(format!(
                "read-only after cutover (computed from blue, no reverse reads them): {}",
                tp.reverse.read_only.join(", ")
            ));
        }
        if let Some(p) = &tp.profile {
            lines.push(format!(
                "profiled ({}, {:.1}% of {}): {} driving rows -> {} green rows, ~{:.0} B/row",
                p.mode,
                p.fraction * 100.0,
                tp.driving.display(),
                p.driving_rows_read,
                p.rows_produced,
                p.avg_row_bytes
            ));
        }
        lines.push(format!("chunked on {}", tp.chunk_key.describe()));
        lines.push(match (tp.sync.mode, &tp.sync.reason) {
            ("row-local", _) => format!(
                "live sync: row-local, in the writer's statement{}",
                if tp.sync.subtransaction {
                    " (in a subtransaction: a failing step goes to the change log)"
                } else {
                    ""
                }
            ),
            (mode, Some(r)) => {
                format!("live sync: {mode}, because {r}; run `bluegreen sync --follow`")
            }
            (mode, None) => format!("live sync: {mode}"),
        });
        let _ = writeln!(o, "{}:", tp.name);
        for l in lines {
            let _ = writeln!(o, "  {l}");
        }
    }
    if !plan.unmapped_blue_tables.is_empty() {
        let _ = writeln!(
            o,
            "\nblue tables left unmapped: {}",
            plan.unmapped_blue_tables.join(", ")
        );
    }
    let _ = writeln!(
        o,
        "\nestimated: {} green rows, {}, copy about {} with {} jobs",
        human_rows(plan.estimates.total_rows),
        human_bytes(plan.estimates.total_bytes),
        human_seconds(plan.estimates.copy_seconds),
        plan.settings.jobs
    );
    let _ = writeln!(o, "\nSQL the later steps run, with the lock each takes:");
    let mut phase = "";
    for (i, s) in plan.steps.iter().enumerate() {
        if s.phase != phase {
            phase = s.phase;
            let _ = writeln!(o, "\n== {phase} ==");
        }
        let _ = writeln!(o, "\n[{}] {}   (lock: {})", i + 1, s.what, s.lock);
        for l in s.sql.lines() {
            let _ = writeln!(o, "    {l}");
        }
    }
    let _ = writeln!(o);
    for d in &plan.diagnostics {
        let _ = writeln!(o, "{d}");
    }
    let (e, w) = counts(plan);
    let _ = writeln!(
        o,
        "\n{}: {e} error(s), {w} warning(s)",
        if e == 0 { "plan OK" } else { "plan REJECTED" }
    );
    o
}

fn counts(plan: &Plan) -> (usize, usize) {
    let w = plan
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .count();
    (plan.errors(), w)
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// A maintenance-window runbook: numbered steps with the exact commands, durations estimated from
/// row counts, pre-checks, rollback, sign-off.
pub fn markdown(plan: &Plan) -> String {
    let mut o = String::new();
    let m = format!("-m {}", plan.mapping_file);
    let (e, w) = counts(plan);
    let _ = writeln!(
        o,
        "# Runbook: migration `{}` ({} → {})\n",
        plan.migration, plan.blue, plan.green
    );
    let _ = writeln!(
        o,
        "Database `{}` on PostgreSQL {}. Mapping `{}`, blake3 `{}`.\n",
        plan.database, plan.server_version, plan.mapping_file, plan.mapping_digest
    );
    let _ = writeln!(
        o,
        "Plan verdict: **{}** ({e} errors, {w} warnings). Estimated {} green rows, {}, copy about {} with {} jobs (at ~{} rows/s per job; calibrate with `scripts/bench`).\n",
        if e == 0 {
            "OK"
        } else {
            "REJECTED — fix the errors below before the window"
        },
        human_rows(plan.estimates.total_rows),
        human_bytes(plan.estimates.total_bytes),
        human_seconds(plan.estimates.copy_seconds),
        plan.settings.jobs,
        super::ROWS_PER_SECOND_PER_JOB as u64
    );
    let _ = writeln!(o, "## Tables\n");
    let _ = writeln!(
        o,
        "| green table | from | shape | est. rows | est. size | chunks | sync key | rollback |"
    );
    let _ = writeln!(o, "|---|---|---|---:|---:|---:|---|---|");
    for tp in &plan.tables {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            tp.name,
            md_escape(&tp.driving.display()),
            tp.shape,
            human_rows(tp.estimated_rows),
            human_bytes(tp.estimated_bytes),
            tp.chunks,
            md_escape(
                &tp.sync_key
                    .iter()
                    .map(|(c, _)| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            tp.reverse.verdict
        );
    }
    if !plan.unmapped_blue_tables.is_empty() {
        let _ = writeln!(
            o,
            "\nBlue tables left unmapped (stay in `{}`, not synced): {}.",
            plan.blue,
            plan.unmapped_blue_tables.join(", ")
        );
    }
    let lossy: Vec<&str> = plan
        .tables
        .iter()
        .filter(|t| t.reverse.verdict == crate::plan::Verdict::Lossy)
        .map(|t| t.name.as_str())
        .collect();
    let _ = writeln!(o, "\n## Pre-checks (before the window)\n");
    let pre = [
        format!("`bluegreen plan {m}` prints **plan OK** against production (this document was generated by `bluegreen plan {m} --format markdown`)."),
        format!(
            "A backup of the blue schema exists and a restore was tested, e.g. `pg_dump --format=custom --schema={blue} --file={db}-{blue}-before-{mig}.dump \"$DATABASE_URL\"` and `pg_restore --list {db}-{blue}-before-{mig}.dump` (or a fresh base backup / volume snapshot).",
            blue = plan.blue,
            db = plan.database,
            mig = plan.migration
        ),
        format!(
            "Disk: green needs about {} for its rows plus as much again for indexes and the change log; check `SELECT pg_size_pretty(pg_database_size(current_database()));` against the free space of the data directory (`df -h` on the server) and keep at least {} free.",
            human_bytes(plan.estimates.total_bytes),
            human_bytes(plan.estimates.total_bytes * 2.0)
        ),
        format!(
            "Privileges of the role bluegreen connects as: `CREATE` on database `{db}` (schemas `{ctl}` and `{green}`), ownership of the blue tables the mapping reads (triggers), membership in `pg_read_all_stats` (to see other sessions at the cutover gates), the database's ownership for `ALTER DATABASE ... SET search_path`, `CREATEROLE` (or ownership) for the roles whose own search_path must flip, and `pg_signal_backend` if `cutover --terminate` is to end stragglers.",
            db = plan.database,
            ctl = plan.control_schema,
            green = plan.green
        ),
        "Settings: `SHOW deadlock_timeout;` is at least `1s` (every lock bluegreen waits for is bounded below it, 100 ms at the flip); the application's own `lock_timeout` / `statement_timeout` leave room for a flip of a few hundred milliseconds; a connection pooler in transaction mode is configured to reconnect after the flip (new server connections pick up the new search_path).".to_string(),
        "No long-running transactions: `SELECT pid, now() - xact_start AS age, query FROM pg_stat_activity WHERE xact_start < now() - interval '5 minutes';` returns nothing (cutover refuses transactions older than 30 s holding locks on blue tables).".to_string(),
        "The application release that reads the green schema is built and ready to deploy.".to_string(),
        "Everyone on the call knows the rollback command (step R1) and who decides on it.".to_string(),
    ];
    for (i, p) in pre.iter().enumerate() {
        let _ = writeln!(o, "{}. [ ] {p}", i + 1);
    }
    let cutover_cmd = format!(
        "bluegreen cutover {m}{} --drain-timeout 60",
        if lossy.is_empty() {
            String::new()
        } else {
            " --accept-lossy-rollback".to_string()
        }
    );
    let _ = writeln!(o, "\n## Steps\n");
    let steps = [
        (
            "Prepare: the checks `plan` runs, then control schema, green schema, change capture (brief SHARE ROW EXCLUSIVE lock per blue table, below deadlock_timeout, retried).",
            format!("bluegreen prepare {m}"),
            "under a minute".to_string(),
        ),
        (
            "Copy blue into green in parallel chunks, build indexes and foreign keys, catch up, switch sync to live; then stay as the follower that keeps the non-row-local tables in step (keep it running until finalize; a second follower elsewhere is welcome: `bluegreen sync --follow`).",
            format!("bluegreen copy {m} --jobs {} --follow", plan.settings.jobs),
            human_seconds(plan.estimates.copy_seconds),
        ),
        (
            "Check progress and the change-log backlog at any time.",
            format!("bluegreen status {m}"),
            "seconds".to_string(),
        ),
        (
            "Validate in one snapshot and write the sign-off report.",
            format!("bluegreen validate {m} --report reports/{}", plan.migration),
            human_seconds(plan.estimates.copy_seconds / 2.0),
        ),
        (
            "Review and sign the report (section below). Do not continue on a failed validation.",
            "open reports/".to_string() + &plan.migration + "/report.md",
            "as needed".to_string(),
        ),
        (
            "Go / no-go (all must hold, else stop here: nothing has changed for the application): the validation of step 4 PASSed and is less than an hour old (cutover checks); `status` shows a backlog near 0, lag under a second, a follower alive, no sync failures and no drift; the application's error rate is normal; the people who sign are on the call.",
            format!("bluegreen status {m}"),
            "minutes".to_string(),
        ),
        (
            "Cut over: gates, then one short transaction fences blue writes and flips search_path (writes wait for its length, printed at the end); waits until sessions opened before the flip stop writing blue (listed; add `--terminate` to end them after the wait).",
            cutover_cmd,
            "seconds".to_string(),
        ),
        (
            "Deploy the application release for the green schema; watch error rates.",
            "(your deploy command)".to_string(),
            "as needed".to_string(),
        ),
        (
            "Validate after the flip: green = M(blue) still holds for the invertible tables (a rollback would lose nothing there) and no reverse failure stands.",
            format!(
                "bluegreen validate {m} --report reports/{}-after-cutover",
                plan.migration
            ),
            human_seconds(plan.estimates.copy_seconds / 2.0),
        ),
        (
            "Soak: keep the follower running; watch `status` (old sessions still writing blue, reverse failures) until the agreed soak period is over.",
            format!("bluegreen status {m}"),
            "the agreed soak (hours to days)".to_string(),
        ),
    ];
    for (i, (what, cmd, dur)) in steps.iter().enumerate() {
        let _ = writeln!(
            o,
            "{}. {what} Expected: {dur}.\n   ```sh\n   {cmd}\n   ```",
            i + 1
        );
    }
    if !lossy.is_empty() {
        let _ = writeln!(
            o,
            "\n> Rollback loses writes made on green to: {}. Cutover needs `--accept-lossy-rollback`.",
            lossy.join(", ")
        );
    }
    let _ = writeln!(o, "\n## Rollback\n");
    let _ = writeln!(
        o,
        "Decide on it when the new release misbehaves, validation after the flip fails, or reverse failures stand that cannot be fixed in the window. `rollback` refuses (nothing changed) while a reverse failure stands: fix its cause and run `bluegreen sync` first.\n"
    );
    let _ = writeln!(
        o,
        "R1. Flip back in one short transaction; reverse sync kept blue current for invertible tables.\n   ```sh\n   bluegreen rollback {m} --yes\n   ```"
    );
    let _ = writeln!(
        o,
        "R2. Redeploy the previous application release and restart every connection pool of the new one right away (sessions still on green keep writing green; their writes reach blue, but they can deadlock with blue writers on the same rows)."
    );
    let _ = writeln!(
        o,
        "R3. Validate again (green is re-derived from blue for the tables without a reverse; the next cutover needs a validation newer than the rollback).\n   ```sh\n   bluegreen validate {m} --report reports/{}-after-rollback\n   ```",
        plan.migration
    );
    let _ = writeln!(
        o,
        "R4. To give the migration up instead of retrying: drop green and every trigger (blue stays as it is).\n   ```sh\n   bluegreen finalize {m} --abandon\n   ```"
    );
    let _ = writeln!(o, "\n## Cleanup after the soak\n");
    let _ = writeln!(
        o,
        "C1. Take sync out once no session has written blue for a while (refused otherwise, with the sessions named): triggers, functions and the change log go; `runs`, `validations` and `events` stay as the archive.\n   ```sh\n   bluegreen finalize {m} --quiet 10min\n   ```"
    );
    let _ = writeln!(
        o,
        "C2. Stop the follower (Ctrl-C or SIGTERM: it finishes its batch)."
    );
    let _ = writeln!(
        o,
        "C3. Later, once nothing reads the blue tables any more (after a last backup of them): drop them.\n   ```sh\n   bluegreen finalize {m} --drop-blue\n   ```"
    );
    let _ = writeln!(o, "\n## SQL run by each step, with locks\n");
    for (i, s) in plan.steps.iter().enumerate() {
        let _ = writeln!(
            o,
            "{}. **{}** — {} _(lock: {})_\n\n```sql\n{}\n```\n",
            i + 1,
            s.phase,
            s.what,
            s.lock,
            s.sql
        );
    }
    if !plan.diagnostics.is_empty() {
        let _ = writeln!(o, "## Findings\n");
        for d in &plan.diagnostics {
            let _ = writeln!(o, "- {}", d.to_string().replace('\n', " "));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o, "## Sign-off\n");
    let _ = writeln!(
        o,
        "| role | name | date | signature |\n|---|---|---|---|\n| migration engineer | | | |\n| database owner | | | |\n| application owner | | | |"
    );
    o
}
