//! Every database object name bluegreen generates comes from here, with one prefix, so a test can
//! assert that `finalize` left nothing behind.

use crate::sql::QName;

pub const PREFIX: &str = "bluegreen_";

/// Advisory-lock key text for the one runner of a migration.
pub fn advisory_key(migration: &str) -> String {
    format!("bluegreen:{migration}")
}

/// At most 63 bytes (PostgreSQL truncates longer names silently).
fn bounded(s: String) -> String {
    let mut s = s;
    while s.len() > 63 {
        s.pop();
    }
    s
}

/// Per-entry sync function (`up`, `del`, `retry`) in the control schema.
pub fn entry_function(
    control: &str,
    migration: &str,
    index: usize,
    kind: &str,
    entry: &str,
) -> QName {
    QName::new(
        control,
        bounded(format!("{PREFIX}{migration}_{index}_{kind}_{entry}")),
    )
}

/// Per-blue-table trigger function (capture during copy, live afterwards).
pub fn sync_function(control: &str, migration: &str, n: usize) -> QName {
    QName::new(control, bounded(format!("{PREFIX}{migration}_sync_{n}")))
}

/// Per-blue-table change-log replay function.
pub fn catchup_function(control: &str, migration: &str, n: usize) -> QName {
    QName::new(control, bounded(format!("{PREFIX}{migration}_catchup_{n}")))
}

/// Trigger on a blue table (one per event) calling the sync function.
pub fn sync_trigger(event: &str) -> String {
    format!("{PREFIX}sync_{event}")
}
