//! Every database object name bluegreen generates comes from here, with one prefix, so a test can
//! assert that `finalize` left nothing behind.

use crate::sql::QName;

pub const PREFIX: &str = "bluegreen_";

/// Trigger on a blue table capturing one kind of event (`ins`, `upd`, `del`, `trunc`).
pub fn capture_trigger(event: &str) -> String {
    format!("{PREFIX}capture_{event}")
}

/// Trigger on a green table carrying writes back to blue after cutover.
pub fn reverse_trigger(event: &str) -> String {
    format!("{PREFIX}reverse_{event}")
}

/// The capture trigger function in the control schema.
pub fn capture_function(control: &str, migration: &str) -> QName {
    QName::new(control, format!("{PREFIX}capture_{migration}"))
}

/// Advisory-lock key text for the one runner of a migration.
pub fn advisory_key(migration: &str) -> String {
    format!("bluegreen:{migration}")
}
