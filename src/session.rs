//! The session settings bluegreen pins, in one list: sent in the startup packet of every
//! connection it opens (`pg::options`) and set on every function it generates
//! (`plan::sync`), so a rendering or a checksum never depends on a server, role or
//! application-session default. Pure data.

/// (name, value) pairs, as PostgreSQL spells them.
pub const PINNED: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
];

/// The pinned settings a function's `SET` clause can carry. `client_encoding` is left out: it
/// belongs to the connection (a trigger must not change what the application's client receives).
pub fn function_settings() -> impl Iterator<Item = (&'static str, &'static str)> {
    PINNED
        .iter()
        .copied()
        .filter(|(name, _)| *name != "client_encoding")
}
