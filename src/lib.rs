//! bluegreen: zero-downtime PostgreSQL schema migrations. See ARCHITECTURE.md for the code map.

pub mod catalog;
pub mod cli;
pub mod cmd;
pub mod diag;
pub mod mapping;
pub mod names;
pub mod output;
pub mod pg;
pub mod plan;
pub mod probe;
pub mod sql;
