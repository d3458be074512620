//! Integration tests: one binary, one throwaway PostgreSQL per process, a database per test.

mod plan;
mod support;
