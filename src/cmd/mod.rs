//! One file per subcommand: glue between the CLI, the engines and the output. No logic of its own.

pub mod copy;
pub mod cutover;
pub mod demo;
pub mod plan;
pub mod prepare;
pub mod status;
pub mod sync;
pub mod validate;

use crate::control::{Phase, runs};
use crate::diag::{Diagnostic, Rejected, Severity};
use crate::mapping::Mapping;
use crate::plan::ProfileMode;

/// How a command ended, mapped to the process exit code by `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the command ran and found a problem.
    Problem,
}

/// A diagnostic that stops the command (exit 2).
fn reject(d: Diagnostic) -> anyhow::Error {
    Rejected(vec![d]).into()
}

/// Before a command's first write: the checks `plan` runs, in a transaction that is rolled back.
/// Errors stop the command (exit 2) with the diagnostics `plan` prints, and nothing was written;
/// warnings are printed and it goes on. Skipped once the migration is prepared: its mapping
/// digest is then checked by the engine itself (a changed mapping is refused).
async fn check_before_writing(
    url: &str,
    m: &Mapping,
    profile: ProfileMode,
    lock_timeout_ms: u64,
) -> anyhow::Result<()> {
    let mut conn = crate::pg::connect(url).await.map_err(reject)?;
    let phase = runs::phase(&mut conn, m).await.map_err(reject)?;
    if phase >= Phase::Prepared {
        eprintln!(
            "bluegreen: {} is {phase}: the checks before writing ran at prepare; skipped",
            m.migration
        );
        return Ok(());
    }
    eprintln!(
        "bluegreen: checking {} against the database before writing (profile {profile}; plan shows every finding)",
        m.path.display()
    );
    let opts = crate::plan::Options {
        jobs: None,
        chunk_rows: None,
        lock_timeout_ms: Some(lock_timeout_ms),
        profile,
    };
    let plan = crate::probe::plan(&mut conn, m, &opts)
        .await
        .map_err(reject)?;
    for d in plan
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
    {
        eprintln!("{d}");
    }
    let errors: Vec<Diagnostic> = plan
        .diagnostics
        .into_iter()
        .filter(Diagnostic::is_error)
        .collect();
    if !errors.is_empty() {
        return Err(Rejected(errors).into());
    }
    Ok(())
}

/// An existing control schema brought up to this version before a command reads it (a migration
/// prepared by an older bluegreen).
async fn upgrade_control(url: &str, m: &Mapping) -> anyhow::Result<()> {
    let mut conn = crate::pg::connect(url).await.map_err(reject)?;
    crate::control::upgrade(&mut conn, m).await.map_err(reject)
}

/// A flag set by Ctrl-C or SIGTERM: a long-running command (the follower) checks it between
/// batches, so the batch in flight finishes.
fn stop_on_signal() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("bluegreen: stopping after the batch in flight");
        s.store(true, Ordering::Relaxed);
    });
    let s = stop.clone();
    tokio::spawn(async move {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            eprintln!("bluegreen: stopping after the batch in flight");
            s.store(true, Ordering::Relaxed);
        }
    });
    stop
}

/// The settings of a command that does not profile: flags over the mapping over the defaults.
fn settings(
    m: &Mapping,
    jobs: Option<u32>,
    chunk_rows: Option<u64>,
    lock_timeout: Option<u64>,
) -> crate::plan::EffectiveSettings {
    crate::plan::effective_settings(
        m,
        &crate::plan::Options {
            jobs,
            chunk_rows,
            lock_timeout_ms: lock_timeout,
            profile: crate::plan::ProfileMode::None,
        },
    )
}
