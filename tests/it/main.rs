//! Integration tests: one binary, one throwaway PostgreSQL per process, a database per test.

mod copy;
mod cutover;
mod demo;
mod examples;
mod explain;
mod hostile;
mod hostile2;
mod hostile3;
mod hostile4;
mod hostile5;
mod hostile6;
mod hostile7;
mod hostile8;
mod hostile9;
mod keys;
mod live;
mod narrow;
mod plan;
mod random;
mod random_cutover;
mod refuse;
mod review;
mod rules;
mod shapes;
mod support;
mod validate;
