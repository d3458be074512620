//! `bluegreen cutover`, `rollback` and `finalize`: gates (exit 1 when one refuses), a
//! confirmation, the work, then for cutover the sessions still writing blue.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use super::{Outcome, reject, settings};
use crate::cli::{CutoverArgs, FinalizeArgs, Format, RollbackArgs};
use crate::control::events;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::sync::cutover::{self as engine, Flipped, Refusal};

/// Ask on the terminal; refuse when there is none (a runbook passes --yes).
fn confirm(what: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(reject(
            Diagnostic::error(
                "confirmation",
                format!("{what}: stdin is not a terminal, so it cannot ask for confirmation"),
            )
            .hint("pass --yes"),
        ));
    }
    eprint!("{what}\nType yes to go on: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

async fn refused(
    url: &str,
    m: &Mapping,
    command: &str,
    r: &[Refusal],
    format: Format,
) -> anyhow::Result<Outcome> {
    if let Ok(mut conn) = crate::pg::connect(url).await {
        let _ = events::record(
            &mut conn,
            m,
            command,
            "refused",
            serde_json::json!({"gates": r}),
        )
        .await;
    }
    let out = match format {
        Format::Json => serde_json::to_string_pretty(&serde_json::json!({"refused": r}))? + "\n",
        _ => {
            let mut s = format!("{command} refused; nothing was changed:\n");
            for x in r {
                s.push_str(&format!("  - {}: {}\n    {}\n", x.gate, x.reason, x.hint));
            }
            s
        }
    };
    crate::output::print_stdout(&out)?;
    Ok(Outcome::Problem)
}

fn render(command: &str, m: &Mapping, f: &Flipped) -> String {
    if f.already {
        return format!(
            "migration {} was already {command}; nothing to do\n",
            m.migration
        );
    }
    let mut s = format!(
        "{command}: done in one transaction; application writes blocked at most {} ms (attempt {})\n",
        f.writes_blocked_ms, f.attempts
    );
    if !f.reverse_triggers.is_empty() {
        s.push_str(&format!(
            "  reverse sync on: {}\n",
            f.reverse_triggers.join(", ")
        ));
    }
    for q in &f.sequences {
        s.push_str(&format!("  sequence {q}\n"));
    }
    for q in &f.statements {
        s.push_str(&format!("  {q}\n"));
    }
    s
}

pub async fn run(a: &CutoverArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    let url = &a.common.database_url;
    let s = settings(&m, None, None, a.lock_timeout);
    let o = engine::CutoverOptions {
        max_validation_age: Duration::from_millis(a.max_validation_age),
        accept_lossy_rollback: a.accept_lossy_rollback,
        roles: a.roles.clone(),
        refuse_old_writes: a.refuse_old_writes,
        fence_timeout: Duration::from_millis(a.fence_timeout),
        lock_timeout_ms: s.lock_timeout_ms,
        max_transaction_age: Duration::from_millis(a.max_transaction_age),
        attempts: a.attempts.max(1),
    };
    let mut conn = crate::pg::connect(url).await.map_err(reject)?;
    let gates = engine::cutover_gates(&mut conn, &m, &o)
        .await
        .map_err(reject)?;
    if !gates.is_empty() {
        return refused(url, &m, "cutover", &gates, a.format).await;
    }
    if !a.yes
        && !confirm(&format!(
            "Cut over {}: new sessions will use schema {} (blue {} stays, kept in step by reverse sync).",
            m.migration, m.green, m.blue
        ))?
    {
        eprintln!("bluegreen: not confirmed; nothing was changed");
        return Ok(Outcome::Problem);
    }
    for p in engine::pooler_suspected(&mut conn).await.map_err(reject)? {
        eprintln!(
            "bluegreen: warning: {p} is connected: a pooler in transaction mode keeps its server connections on the old search_path; set the search_path in the pooler (or server_reset_query / track_extra_parameters) and reconnect its pool after the cutover"
        );
    }
    let flipped = engine::cutover(url, &m, &o).await.map_err(reject)?;
    let mut out = render("cutover", &m, &flipped);
    let before = crate::control::writers::sessions_before_flip(&mut conn, &m)
        .await
        .map_err(reject)?;
    out.push_str(&format!(
        "  sessions opened before the flip, still connected: {before} (they keep the old search_path)\n"
    ));
    let mut drained = None;
    if let Some(secs) = a.drain_timeout {
        let d = engine::drain_blue_writers(&mut conn, &m, Duration::from_secs(secs), a.terminate)
            .await
            .map_err(reject)?;
        if d.still_writing.is_empty() {
            out.push_str(&format!(
                "  no session wrote blue in the last {} s (waited {} ms)\n",
                engine::QUIET.as_secs(),
                d.waited_ms
            ));
        } else {
            for w in &d.still_writing {
                out.push_str(&format!("  still writing blue: {}\n", w.describe()));
            }
            if a.terminate {
                out.push_str(&format!("  terminated {} session(s)\n", d.terminated));
            }
        }
        drained = Some(d);
    }
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(
                &serde_json::json!({"cutover": flipped, "sessions_before_flip": before, "drain": drained}),
            )? + "\n"
        }
        _ => out,
    };
    crate::output::print_stdout(&text)?;
    Ok(Outcome::Success)
}

pub async fn rollback(a: &RollbackArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    let url = &a.common.database_url;
    let s = settings(&m, None, None, a.lock_timeout);
    let mut conn = crate::pg::connect(url).await.map_err(reject)?;
    let gates = engine::rollback_gates(&mut conn, &m)
        .await
        .map_err(reject)?;
    if !gates.is_empty() {
        return refused(url, &m, "rollback", &gates, a.format).await;
    }
    if !a.yes
        && !confirm(&format!(
            "Roll back {}: new sessions will use schema {} again (green {} stays, kept in step by live sync).",
            m.migration, m.blue, m.green
        ))?
    {
        eprintln!("bluegreen: not confirmed; nothing was changed");
        return Ok(Outcome::Problem);
    }
    let o = engine::RollbackOptions {
        lock_timeout_ms: s.lock_timeout_ms,
        attempts: a.attempts.max(1),
    };
    let flipped = engine::rollback(url, &m, &o).await.map_err(reject)?;
    let text = match a.format {
        Format::Json => {
            serde_json::to_string_pretty(&serde_json::json!({"rollback": flipped}))? + "\n"
        }
        _ => render("rolled back", &m, &flipped),
    };
    crate::output::print_stdout(&text)?;
    Ok(Outcome::Success)
}

pub async fn finalize(a: &FinalizeArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    let url = &a.common.database_url;
    let s = settings(&m, None, None, a.lock_timeout);
    let o = crate::sync::finalize::FinalizeOptions {
        abandon: a.abandon,
        drop_blue: a.drop_blue,
        quiet: Duration::from_millis(a.quiet),
        lock_timeout_ms: s.lock_timeout_ms,
    };
    let mut conn = crate::pg::connect(url).await.map_err(reject)?;
    let gates = crate::sync::finalize::gates(&mut conn, &m, &o)
        .await
        .map_err(reject)?;
    if !gates.is_empty() {
        return refused(url, &m, "finalize", &gates, a.format).await;
    }
    let what = if a.abandon {
        format!(
            "Abandon {}: drop schema {} and every trigger and function of the migration; blue stays as it is.",
            m.migration, m.green
        )
    } else if a.drop_blue {
        format!(
            "Finalize {}: remove sync and DROP the blue tables {}.",
            m.migration,
            m.blue_tables_read()
                .iter()
                .map(crate::sql::QName::display)
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else {
        format!(
            "Finalize {}: remove sync (triggers, functions, change log); blue tables stay.",
            m.migration
        )
    };
    if !a.yes && !confirm(&what)? {
        eprintln!("bluegreen: not confirmed; nothing was changed");
        return Ok(Outcome::Problem);
    }
    let f = match crate::sync::finalize::finalize(&mut conn, &m, &o).await {
        Ok(f) => f,
        // A gate that closed while finalize waited for its locks: refused, like the gates above.
        Err(d) if d.code == "finalize-refused" => {
            eprintln!("{d}");
            return Ok(Outcome::Problem);
        }
        Err(d) => return Err(reject(d)),
    };
    let text = match a.format {
        Format::Json => serde_json::to_string_pretty(&serde_json::json!({"finalize": f}))? + "\n",
        _ if f.already => format!(
            "migration {} was already finalized; nothing to do\n",
            m.migration
        ),
        _ => {
            let mut t = format!(
                "finalized {}: {} trigger(s) and {} function(s) dropped\n",
                m.migration,
                f.triggers_dropped.len(),
                f.functions_dropped.len()
            );
            for q in &f.sequences {
                t.push_str(&format!("  sequence {q}\n"));
            }
            if let Some(g) = &f.dropped_schema {
                t.push_str(&format!("  dropped schema {g}\n"));
            }
            if !f.dropped_blue.is_empty() {
                t.push_str(&format!(
                    "  dropped blue tables {}\n",
                    f.dropped_blue.join(", ")
                ));
            }
            if !f.control_tables_dropped.is_empty() {
                t.push_str(&format!(
                    "  control schema {}: only the archive is left (runs, validations, events)\n",
                    m.control_schema
                ));
            }
            t
        }
    };
    crate::output::print_stdout(&text)?;
    Ok(Outcome::Success)
}
