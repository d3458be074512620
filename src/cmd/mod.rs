//! One file per subcommand: glue between the CLI, the engines and the output. No logic of its own.

pub mod copy;
pub mod plan;
pub mod prepare;
pub mod status;
pub mod sync;
pub mod validate;

use crate::diag::{Diagnostic, Rejected};
use crate::mapping::Mapping;

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
