//! One file per subcommand: glue between the CLI, the engines and the output. No logic of its own.

pub mod plan;
pub mod run;

/// How a command ended, mapped to the process exit code by `main`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the command ran and found a problem.
    Problem,
}
