//! Every database object name bluegreen generates comes from here, with one prefix and the
//! migration's name in it (two migrations of one blue table never share a trigger), so a test can
//! assert that `finalize` left nothing behind.

use crate::sql::QName;

pub const PREFIX: &str = "bluegreen_";

/// The events a blue table's change capture fires on, with the trigger-name suffix of each.
pub const EVENTS: [(&str, &str); 4] = [
    ("ins", "INSERT"),
    ("upd", "UPDATE"),
    ("del", "DELETE"),
    ("trunc", "TRUNCATE"),
];

/// Advisory-lock key text for a migration: hashed with seed 0 for the one runner
/// (`pg::locking`), with seed 1 for chunk planning (`control::chunks`).
pub fn advisory_key(migration: &str) -> String {
    format!("bluegreen:{migration}")
}

/// At most 63 bytes (PostgreSQL truncates longer names silently): a longer name is cut and ends
/// in a hash of the whole, so two long names that share a beginning stay distinct.
fn bounded(s: String) -> String {
    if s.len() <= 63 {
        return s;
    }
    let hash = blake3::hash(s.as_bytes()).to_hex();
    let mut cut = 54;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{}", &s[..cut], &hash[..8])
}

/// Per-blue-table trigger function (capture during copy, live afterwards).
pub fn sync_function(control: &str, migration: &str, n: usize) -> QName {
    QName::new(control, bounded(format!("{PREFIX}{migration}_sync_{n}")))
}

/// Trigger on a blue table (one per event) calling the sync function of the migration.
pub fn sync_trigger(migration: &str, event: &str) -> String {
    bounded(format!("{PREFIX}{migration}_{event}"))
}

/// Per green table of an invertible entry (the `n`th entry): the reverse trigger function,
/// installed by `cutover`, writing the application's green writes back into blue.
pub fn reverse_function(control: &str, migration: &str, n: usize) -> QName {
    QName::new(control, bounded(format!("{PREFIX}{migration}_rev_{n}")))
}

/// The reverse trigger on a green table (one per event).
pub fn reverse_trigger(migration: &str, event: &str) -> String {
    bounded(format!("{PREFIX}{migration}_rev_{event}"))
}

/// The transaction-local setting that carries the loop guard (which applier is writing, at which
/// trigger depth): per migration, so two migrations never read each other's, and under a prefix
/// no application setting uses.
pub fn guard_setting(migration: &str) -> String {
    let h = blake3::hash(format!("bluegreen:{migration}:guard").as_bytes()).to_hex();
    format!("bluegreen.guard_{}", &h[..16])
}

/// Everything a migration generates in the database, by name: the one list `finalize` removes
/// and its test checks is gone.
pub struct Generated {
    /// Trigger names (on blue tables, their partitions and children, and green tables).
    pub triggers: Vec<String>,
    pub functions: Vec<QName>,
}

/// The generated names of a migration reading `blue_tables` blue tables with `entries` entries.
pub fn generated(control: &str, migration: &str, blue_tables: usize, entries: usize) -> Generated {
    let mut triggers: Vec<String> = EVENTS
        .iter()
        .map(|(ev, _)| sync_trigger(migration, ev))
        .collect();
    triggers.extend(EVENTS.iter().map(|(ev, _)| reverse_trigger(migration, ev)));
    let mut functions: Vec<QName> = (0..blue_tables)
        .map(|n| sync_function(control, migration, n))
        .collect();
    functions.extend((0..entries).map(|n| reverse_function(control, migration, n)));
    Generated {
        triggers,
        functions,
    }
}

/// A 64-bit advisory-lock key from text, the same in every process (blake3, not the server's
/// hash, so the tool can compute it without a round trip).
fn lock_key(text: &str) -> i64 {
    let h = blake3::hash(text.as_bytes());
    i64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Stripes per entry: appliers serialise on `hash(key) % STRIPES`, so the locks a transaction
/// takes stay bounded however many keys it applies.
pub const STRIPES: u64 = 1024;

/// The advisory lock an applier holds while it re-derives keys of stripe `stripe` of `entry`.
pub fn stripe_lock(migration: &str, entry: &str, stripe: u64) -> i64 {
    lock_key(&format!("bluegreen:{migration}:{entry}:{stripe}"))
}

/// The stripe of a key (its column values as text, NULL as None).
pub fn stripe_of(key: &[Option<String>]) -> u64 {
    let mut h = blake3::Hasher::new();
    for v in key {
        match v {
            Some(s) => {
                h.update(&[1]);
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            None => {
                h.update(&[0]);
            }
        }
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes")) % STRIPES
}

/// The lock every applier transaction holds shared, so a command that must stop them all (the
/// cutover fence) can take it exclusively.
pub fn appliers_lock(migration: &str) -> i64 {
    lock_key(&format!("bluegreen:{migration}:appliers"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_stay_distinct_and_bounded() {
        let a = sync_trigger(&"m".repeat(70), "ins");
        let b = sync_trigger(&format!("{}x", "m".repeat(69)), "ins");
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert_eq!(sync_trigger("carbot_v2", "upd"), "bluegreen_carbot_v2_upd");
        assert_ne!(
            stripe_of(&[Some("a".into()), None]),
            stripe_of(&[None, Some("a".into())])
        );
    }
}
