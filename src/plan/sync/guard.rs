//! What every generated trigger body shares about waiting and the loop guard: the short lock
//! wait of a step inside an application's statement, and the transaction-local setting that says
//! which applier is writing (DESIGN.md step 6; `reverse.rs` describes the values).

use crate::mapping::Mapping;
use crate::names;
use crate::sql::Literal;

/// How long a row-local step inside the writer's statement may wait for a lock (an applier's
/// short transaction) before it gives way to the change log: 50 ms, or half the session's
/// `deadlock_timeout` when that is shorter (in a lock cycle the step gives way, never the
/// writer).
pub const STEP_LOCK_TIMEOUT: &str = "GREATEST(1, LEAST(50, pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.current_setting('deadlock_timeout')::pg_catalog.interval) * 500)))::pg_catalog.int4::pg_catalog.text || 'ms'";

/// The guard value test: this statement is forward sync's own write, one trigger level below
/// the apply that set the guard (an applier outside any trigger sets depth 0). A write made
/// deeper, by an application trigger or a foreign-key cascade that the apply set off, is the
/// application's, and reverses like any other (design review L1).
pub(super) fn in_forward_apply() -> &'static str {
    "bluegreen_guard = 'f:' || (bluegreen_depth - 1)::pg_catalog.text"
}

/// `DECLARE` lines reading the guard once.
pub(super) fn guard_declare(m: &Mapping) -> String {
    format!(
        "    bluegreen_guard text := COALESCE(pg_catalog.current_setting({}, true), '');\n    bluegreen_depth pg_catalog.int4 := pg_catalog.pg_trigger_depth();\n",
        Literal::new(names::guard_setting(&m.migration))
    )
}

/// Set the guard to `value` (an SQL text expression).
pub(super) fn set_guard(m: &Mapping, value: &str) -> String {
    format!(
        "bluegreen_set := pg_catalog.set_config({}, {value}, true);",
        Literal::new(names::guard_setting(&m.migration))
    )
}

/// The old session's statement giving way after the flip: its step waited for a green row a
/// session on the new schema holds (the one sync-caused error an application sees: retry it).
pub(super) const GIVE_WAY: &str = "RAISE EXCEPTION 'bluegreen: this blue write waited for a green row a session on the new schema holds; retry it (or reconnect to use the new schema)' USING ERRCODE = 'serialization_failure'";
