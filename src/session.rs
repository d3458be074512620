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

/// Settings of bluegreen's own connections only, never of the functions it generates (a trigger
/// must not change the application's timeouts): a database's `statement_timeout` (30 s is a
/// common production default) would cancel a copy chunk or a validate range half way, and its
/// `idle_in_transaction_session_timeout` the session that holds a claim while it streams. Every
/// lock bluegreen waits for has its own bound (`lock_timeout` where it is taken).
pub const CONNECTION_ONLY: &[(&str, &str)] = &[
    ("statement_timeout", "0"),
    ("idle_in_transaction_session_timeout", "0"),
];

/// The pinned settings a function's `SET` clause can carry. `client_encoding` is left out: it
/// belongs to the connection (a trigger must not change what the application's client receives).
pub fn function_settings() -> impl Iterator<Item = (&'static str, &'static str)> {
    PINNED
        .iter()
        .copied()
        .filter(|(name, _)| *name != "client_encoding")
}
