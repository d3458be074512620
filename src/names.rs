//! Every database object name bluegreen generates comes from here, with one prefix, so a test can
//! assert that `finalize` left nothing behind.

use crate::sql::QName;

pub const PREFIX: &str = "bluegreen_";

/// Advisory-lock key text for a migration: hashed with seed 0 for the one runner
/// (`pg::locking`), with seed 1 for chunk planning (`control::chunks`).
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

/// Per-entry function re-deriving the keys recorded as failed, in the control schema.
pub fn retry_function(control: &str, migration: &str, index: usize, entry: &str) -> QName {
    QName::new(
        control,
        bounded(format!("{PREFIX}{migration}_{index}_retry_{entry}")),
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
