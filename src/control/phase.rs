//! The phase of a migration as a type, with every allowed transition written down here and
//! nowhere else. Stored in the control schema as the same strings it serialises to; a string this
//! version does not know is an error when read, never silently `new`. Pure.

use std::fmt;

use serde::Serialize;

/// In the order a migration passes through them (`Ord` follows it: `phase >= Phase::Copied` means
/// the copy has finished).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Nothing prepared (no control schema, or no row for this migration).
    New,
    /// Control schema, green schema and change capture in place.
    Prepared,
    /// Chunks are being copied.
    Copying,
    /// Every chunk copied, indexes built, sequences advanced; sync not live yet.
    Copied,
    /// Green kept in step with blue.
    Live,
    /// The application uses green; reverse sync keeps blue in step.
    CutOver,
    /// Back on blue after a cutover.
    RolledBack,
    /// Sync removed; the migration is over.
    Finalized,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::New,
        Phase::Prepared,
        Phase::Copying,
        Phase::Copied,
        Phase::Live,
        Phase::CutOver,
        Phase::RolledBack,
        Phase::Finalized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::New => "new",
            Phase::Prepared => "prepared",
            Phase::Copying => "copying",
            Phase::Copied => "copied",
            Phase::Live => "live",
            Phase::CutOver => "cut_over",
            Phase::RolledBack => "rolled_back",
            Phase::Finalized => "finalized",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The transitions commands make: prepare, copy (copying, copied, live), cutover, rollback
    /// (and cutover again), finalize (after a cutover, or abandoning after a rollback).
    pub fn can_move_to(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (New, Prepared)
                | (Prepared, Copying)
                | (Copying, Copied)
                | (Copied, Live)
                | (Live, CutOver)
                | (CutOver, RolledBack)
                | (RolledBack, Live)
                | (RolledBack, CutOver)
                | (CutOver, Finalized)
                | (RolledBack, Finalized)
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_strings() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        assert_eq!(Phase::parse("cutover"), None);
        assert_eq!(Phase::parse(""), None);
    }

    #[test]
    fn transitions_follow_the_documented_graph() {
        let allowed: Vec<(Phase, Phase)> = Phase::ALL
            .into_iter()
            .flat_map(|a| Phase::ALL.into_iter().map(move |b| (a, b)))
            .filter(|(a, b)| a.can_move_to(*b))
            .collect();
        let text: Vec<String> = allowed.iter().map(|(a, b)| format!("{a}->{b}")).collect();
        assert_eq!(
            text.join(" "),
            "new->prepared prepared->copying copying->copied copied->live live->cut_over \
             cut_over->rolled_back cut_over->finalized rolled_back->live rolled_back->cut_over \
             rolled_back->finalized"
        );
        // Everything past the copy ranks as copied, so `copy` never starts again after a cutover.
        assert!(Phase::CutOver >= Phase::Copied && Phase::RolledBack >= Phase::Live);
    }
}
