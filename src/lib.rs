//! bluegreen: zero-downtime PostgreSQL schema migrations. See ARCHITECTURE.md for the code map.

// Diagnostics are the error type of user-facing checks; they are built on cold paths only, and
// keeping them unboxed keeps every call site plain.
#![allow(clippy::result_large_err)]

pub mod catalog;
pub mod cli;
pub mod cmd;
pub mod control;
pub mod copy;
pub mod demo;
pub mod diag;
pub mod mapping;
pub mod names;
pub mod output;
pub mod pg;
pub mod plan;
pub mod probe;
pub mod session;
pub mod sql;
pub mod sync;
pub mod validate;
