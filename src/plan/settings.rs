//! The settings a command runs with: the command line over the mapping's `settings:` over the
//! defaults. Pure.

use serde::Serialize;

use crate::mapping::Mapping;

/// Defaults for settings neither the mapping nor the command line gave.
pub const DEFAULT_JOBS: u32 = 4;
pub const DEFAULT_CHUNK_ROWS: u64 = 100_000;
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 2_000;

/// How much of the data `plan` (and the checks of writing commands) profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileMode {
    /// Names, types and expressions only.
    None,
    /// A sample of driving tables larger than the sample threshold, the rest fully.
    Sample,
    /// Every row.
    Full,
}

impl std::fmt::Display for ProfileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProfileMode::None => "none",
            ProfileMode::Sample => "sample",
            ProfileMode::Full => "full",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EffectiveSettings {
    pub jobs: u32,
    pub chunk_rows: u64,
    pub lock_timeout_ms: u64,
    pub profile: ProfileMode,
}

/// Options of `plan` that are not in the mapping.
#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: Option<u32>,
    pub chunk_rows: Option<u64>,
    pub lock_timeout_ms: Option<u64>,
    pub profile: ProfileMode,
}

pub fn effective_settings(m: &Mapping, o: &Options) -> EffectiveSettings {
    EffectiveSettings {
        jobs: o.jobs.or(m.settings.jobs).unwrap_or(DEFAULT_JOBS),
        chunk_rows: o
            .chunk_rows
            .or(m.settings.chunk_rows)
            .unwrap_or(DEFAULT_CHUNK_ROWS),
        lock_timeout_ms: o
            .lock_timeout_ms
            .or(m.settings.lock_timeout.map(|d| d.as_millis() as u64))
            .unwrap_or(DEFAULT_LOCK_TIMEOUT_MS),
        profile: o.profile,
    }
}
