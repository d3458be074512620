//! Integration tests: one binary, one throwaway PostgreSQL per process, a database per test.

mod copy;
mod plan;
mod refuse;
mod shapes;
mod support;
mod validate;
